"""offload_engine: run Mixture-of-Experts models on GPUs too small to hold them, with exact output."""

from .errors import (
    CheckpointError,
    ConfigError,
    GenerationInputError,
    MemoryBudgetError,
    OffloadEngineError,
    TraceFormatError,
    UnsupportedModelError,
)
from .engine import GenerationResult, GenerationStats, OffloadEngine, TokenEvent
from .memory_plan import MemoryPlan, parse_bytes
from .run_config import RunConfig
