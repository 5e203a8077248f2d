"""offload_engine: run Mixture-of-Experts models on GPUs too small to hold them, with exact output."""

from pathlib import Path

from .errors import (
    CheckpointError,
    ConfigError,
    GenerationInputError,
    MemoryBudgetError,
    OffloadEngineError,
    TraceFormatError,
    UnsupportedModelError,
)

# The bundled default model (its model card: default_model/README.md): what the CLI runs without --model.
DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"

__all__ = [
    "DEFAULT_MODEL", "CheckpointError", "ConfigError", "GenerationInputError", "MemoryBudgetError", "OffloadEngineError",
    "TraceFormatError", "UnsupportedModelError", "OffloadEngine", "GenerationResult", "GenerationStats",
    "TokenEvent", "MemoryPlan", "parse_bytes", "RunConfig", "RoutingTrace", "load_trace", "save_trace",
]

# The engine pulls in torch and transformers: import it on first use, so that `python -m
# offload_engine.tracing.trace_file` and the metrics stay light and runpy sees no half-imported module.
_LAZY = {
    "OffloadEngine": "engine", "GenerationResult": "engine", "GenerationStats": "engine", "TokenEvent": "engine",
    "MemoryPlan": "planning.memory_plan", "parse_bytes": "planning.memory_plan", "RunConfig": "run_config",
    "RoutingTrace": "tracing.trace_file", "load_trace": "tracing.trace_file", "save_trace": "tracing.trace_file",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
