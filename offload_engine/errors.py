"""The engine's own exceptions: each message is one line saying what is wrong and what to do.

The CLI prints `error: <message>` for any of these and exits with code 2; anything else is a bug.
"""


class OffloadEngineError(Exception):
    """Base of every error the engine raises on purpose (bad input, not bugs)."""


class CheckpointError(OffloadEngineError):
    """The checkpoint is missing, incomplete, corrupt or has no config.json."""


class UnsupportedModelError(OffloadEngineError):
    """The architecture or the tensor format (e.g. quantized experts) is not one the engine can serve."""


class ConfigError(OffloadEngineError):
    """A run setting (device, dtype, slot count, host memory mode, policy...) is invalid."""


class MemoryBudgetError(OffloadEngineError):
    """The memory budget cannot be parsed or is too small for the model."""


class GenerationInputError(OffloadEngineError):
    """A prompt or a sampling setting is invalid (too long, negative temperature, no tokenizer...)."""


class TraceFormatError(OffloadEngineError):
    """A routing-trace file is malformed: wrong keys, shapes, dtypes or expert ids."""
