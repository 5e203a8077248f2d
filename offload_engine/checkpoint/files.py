"""The files of a checkpoint directory, opened so that no reader further on can block, recurse or crash.

- Only regular files are read: a FIFO named config.json would block every reader forever, a directory named
  model.safetensors fails deep inside the loader. Files are stat'ed first and opened with O_NONBLOCK, then
  checked again on the descriptor (the name could change in between).
- A symbolic link must resolve inside the checkpoint directory; in the Hugging Face hub cache
  (`.../models--org--name/snapshots/<rev>/file` -> `.../models--org--name/blobs/<hash>`) inside the
  repository folder that holds `snapshots/` and `blobs/`.
- JSON is parsed with a nesting limit: the result is what every reader downstream (transformers' config
  classes, the tokenizers library, which stops at 128 levels) can take.
- A file's identity (device, inode, size, modification time) is recorded when it is opened, so that a file
  changed on disk after loading is an error instead of a SIGBUS on the next read of a memory map.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

MAX_JSON_DEPTH = 64  # real configs and tokenizers nest under 10 levels
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def checkpoint_root(directory: Path) -> Path:
    """The folder a checkpoint's files may resolve into: the directory itself, or for a hub-cache snapshot
    the repository folder whose `blobs/` the snapshot's links point to."""
    real = Path(os.path.realpath(directory))
    if real.parent.name == "snapshots" and real.parent.parent.name.startswith("models--"):
        return real.parent.parent
    return real


def stat_entry(path: Path) -> os.stat_result:
    """os.stat, with every failure as one line naming the file (missing, a broken link, a loop, unreadable)."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CheckpointError(f"{path} is a broken symbolic link (to {os.readlink(path)}); "
                                  "restore the file it points to") from None
        raise CheckpointError(f"{path} does not exist; restore it from the original checkpoint") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link loop; replace it with the file it should be") from None
        raise CheckpointError(f"{path} cannot be read ({e.strerror}); check its permissions") from None


def _refuse_special(path: Path, mode: int) -> None:
    for test, kind in _KINDS:
        if test(mode):
            raise CheckpointError(f"{path} is {kind}, not a regular file; replace it with the checkpoint's file")


def regular_file(path: Path, root: Path) -> os.stat_result:
    """The stat of `path`, which must be a regular file resolving inside `root` (see checkpoint_root)."""
    st = stat_entry(path)
    _refuse_special(path, st.st_mode)
    real = os.path.realpath(path)
    if os.path.commonpath([real, root]) != str(root):
        raise CheckpointError(f"{path} resolves to {real}, outside the checkpoint directory {root}; "
                              "copy the file into the checkpoint instead of linking to it")
    return st


@dataclass(frozen=True)
class FileIdentity:
    """What must not change while a file is in use: a truncated memory-mapped file kills the process on read."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileIdentity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def check(self, fd: int, path: Path) -> None:
        """CheckpointError if the open file `fd` is no longer what was loaded (an fstat: about a microsecond)."""
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read any more ({e.strerror}); reload the model") from None
        # compared field by field: a new FileIdentity and its __eq__ cost more than the fstat (every prefetch
        # batch checks its files)
        if (st.st_mtime_ns != self.mtime_ns or st.st_size != self.size or st.st_ino != self.inode
                or st.st_dev != self.device):
            now = FileIdentity.of(st)
            change = f"size {self.size} -> {now.size} bytes" if now.size != self.size else "modified"
            raise CheckpointError(f"{path} changed on disk after loading ({change}); reload the model")


def open_regular(path: Path, root: Path) -> tuple[int, FileIdentity]:
    """A read-only descriptor of a regular file inside `root`, and its identity; never blocks on a FIFO."""
    regular_file(path, root)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise CheckpointError(f"{path} cannot be opened ({e.strerror}); check the file and its permissions") from None
    try:
        st = os.fstat(fd)
        _refuse_special(path, st.st_mode)  # the name may have been swapped between the stat and the open
    except BaseException:
        os.close(fd)
        raise
    return fd, FileIdentity.of(st)


def pread_exact(fd: int, nbytes: int, offset: int, path: Path) -> bytes:
    """`nbytes` bytes at `offset` (positional reads may return short); fewer only at the end of the file."""
    chunks, done = [], 0
    while done < nbytes:
        try:
            chunk = os.pread(fd, nbytes - done, offset + done)
        except OSError as e:
            raise CheckpointError(f"{path} cannot be read ({e.strerror}); check the file") from None
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


def read_file(path: Path, root: Path) -> bytes:
    fd, identity = open_regular(path, root)
    try:
        return pread_exact(fd, identity.size, 0, path)
    finally:
        os.close(fd)


def parse_json(data: bytes) -> object:
    """The JSON value of UTF-8 `data`; ValueError with a short reason (not UTF-8, not JSON, nested too deep)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {e.start})") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:  # JSONDecodeError, and integers with more digits than Python converts
        raise ValueError(f"not valid JSON ({str(e).splitlines()[0]})") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def json_depth(value: object) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion; stops once past the limit.

    >>> json_depth({"a": [1, {"b": 2}]}), json_depth(3)
    (3, 0)
    """
    deepest, stack = 0, [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack and deepest <= MAX_JSON_DEPTH:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


def read_json(path: Path, root: Path) -> object:
    """Parse a checkpoint's JSON file; one-line CheckpointError naming it if it cannot be."""
    try:
        return parse_json(read_file(path, root))
    except ValueError as e:
        raise CheckpointError(f"{path} is {e}; restore the file from the original checkpoint") from None
