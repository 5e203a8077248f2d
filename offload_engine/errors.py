"""The engine's own exceptions: each message is one line saying what is wrong and what to do.

The CLI prints `error: <message>` for any of these and exits with code 2; anything else is a bug.
"""

import unicodedata


class OffloadEngineError(Exception):
    """Base of every error the engine raises on purpose (bad input, not bugs)."""


class CheckpointError(OffloadEngineError):
    """The checkpoint is missing, incomplete, corrupt or has no config.json."""


class UnsupportedModelError(OffloadEngineError):
    """The architecture or the tensor format (e.g. quantized experts) is not one the engine can serve."""


class ConfigError(OffloadEngineError):
    """A run setting (device, dtype, slot count, host memory mode, policy...) is invalid."""


class ContextTooLongError(ConfigError):
    """The context asked for is longer than the model's; `asked` and `limit` let a command name its own flag."""

    def __init__(self, message: str, asked: int, limit: int):
        super().__init__(message)
        self.asked, self.limit = asked, limit


class MemoryBudgetError(OffloadEngineError):
    """The memory budget cannot be parsed or is too small for the model."""


class GenerationInputError(OffloadEngineError):
    """A prompt or a sampling setting is invalid (too long, negative temperature, no tokenizer...)."""


class TraceFormatError(OffloadEngineError):
    """A routing-trace file is malformed: wrong keys, shapes, dtypes or expert ids."""


def one_line(message: str) -> str:
    """`message` with every control or separator character but the space escaped as Python writes it in a
    string literal: a path holding a newline (or a terminal escape) must not break the one-line contract.

    >>> one_line("cannot read a\\nb.json\\x1b[2J")
    'cannot read a\\\\nb.json\\\\x1b[2J'
    """
    return "".join(c if c == " " or unicodedata.category(c)[0] not in "CZ" else c.encode("unicode_escape").decode()
                   for c in message)


def short_repr(value: object, limit: int = 60) -> str:
    """repr of a value quoted in a message, cut to `limit` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int of more digits than Python converts to text
        return f"(a {type(value).__name__} too large to print)"
    return text if len(text) <= limit else text[: limit - 3] + "..."
