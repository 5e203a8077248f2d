"""Output files written whole or not at all: into a temporary file beside the target, then renamed over it.

A failed write (a full disk, an interrupted run) leaves the user's earlier file as it was and no partial file
behind, and the error names the file. An output that is not a regular file (/dev/stdout, a FIFO, /dev/null)
is written directly: renaming over it would replace the device instead of writing to it.

>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
>>> with atomic_output(out) as f:
...     _ = f.write(b"hello")
>>> out.read_bytes(), sorted(p.name for p in out.parent.iterdir())
(b'hello', ['a.txt'])
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import ConfigError


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse, before the work that produces it, an output that cannot be written."""
    path = Path(path)
    if "\x00" in str(path):
        raise ConfigError(f"cannot write {path}: a file name cannot hold a NUL character")
    if path.is_dir():
        raise ConfigError(f"cannot write {path}: it is a directory; give a file name inside it")
    if not path.parent.is_dir():
        raise ConfigError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


def check_not_an_input(output: str | os.PathLike, flag: str,
                       inputs: Iterable[tuple[str, str | os.PathLike | None]]) -> None:
    """Refuse an output that would replace what the command reads: an input file (also through a symbolic or
    hard link), or any file inside an input folder (a model's weights, config, tokenizer or predictor: the
    atomic rename would swap the checkpoint for the output while the run still reads the old one). `inputs`
    are (how the message names it, path) pairs, a path of None for one not given; an output not there yet is
    no input.

    >>> import tempfile, pathlib
    >>> model = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (model / "config.json").write_text("{}")
    >>> check_not_an_input(model / "config.json", "--out", [("the model in", model)])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    offload_engine.errors.ConfigError: --out ... would overwrite a file of the model in ..., which this command reads; write it elsewhere
    """
    try:
        written = os.stat(output)
    except (OSError, ValueError):  # not there (or not a name at all): check_output_path says what is wrong
        return
    places = {os.path.abspath(output), os.path.realpath(output)}  # the name given, and the file it reaches
    for what, path in inputs:
        if path is None:
            continue
        try:
            read = os.stat(path)
        except (OSError, ValueError):
            continue
        if stat.S_ISDIR(read.st_mode):
            folders = {os.path.abspath(path), os.path.realpath(path)}
            if any(os.path.commonpath([p, f]) == f for p in places for f in folders) or _holds(path, written):
                raise ConfigError(f"{flag} {output} would overwrite a file of {what} {path}, which this command "
                                  "reads; write it elsewhere")
        elif os.path.samestat(written, read):
            raise ConfigError(f"{flag} {output} would overwrite {what} {path}, which this command reads; "
                              "write it elsewhere")


def _holds(folder: str | os.PathLike, file: os.stat_result) -> bool:
    """Whether one of the folder's own entries is `file`: a hard link to it, or a link into a hub cache's
    blobs/ (a checkpoint's files are at its top level)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return False
    for entry in entries:
        try:
            if os.path.samestat(os.stat(entry.path), file):
                return True
        except OSError:
            continue
    return False


def _naming(error: OSError, path: Path) -> OSError:
    """The same error, naming the user's file (a write to a full disk names nothing; a rename names the
    temporary file)."""
    return OSError(error.errno, error.strerror or str(error), str(path))  # OSError picks the errno's subclass


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file whose bytes replace `path` only once the `with` block completes without an error."""
    path = check_output_path(path)
    target = Path(os.path.realpath(path))  # through a symbolic link: the link stays, the file it names changes
    try:
        existing = os.stat(target)
    except FileNotFoundError:
        existing = None
    except OSError as e:
        raise _naming(e, path) from None
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        try:
            with open(target, "wb") as f:
                yield f
        except OSError as e:
            raise _naming(e, path) from None
        return
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)  # less the umask
    except OSError as e:
        raise _naming(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if existing is not None:  # the new file keeps the old one's permissions
                os.fchmod(f.fileno(), stat.S_IMODE(existing.st_mode))
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        if isinstance(e, OSError):
            raise _naming(e, path) from None
        raise
