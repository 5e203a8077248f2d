"""A Hugging Face checkpoint directory: config.json, tokenizer files and safetensors shards.

Safetensors headers are parsed here (not by the safetensors package) so that one expert of a fused tensor can
be reached by itself, and a truncated or corrupt file is caught before anything is loaded. Two ways to get
a tensor's bytes: a zero-copy view of a private memory map (pages dropped again once copied, so they do
not pile up in the process), or one positional read straight into a destination tensor. Every file is opened
through files.py (regular files inside the checkpoint, identity recorded). Which tensor means
what is decided in layout.py, never here.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
import threading
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path, PurePosixPath

import torch

from ..errors import CheckpointError
from .files import (
    checkpoint_root, open_regular, parse_json, pread_exact, read_json, regular_file, stat_entry,
)
from .metadata import check_metadata_files
from .model_spec import check_config

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    **({"F8_E8M0": torch.float8_e8m0fnu} if hasattr(torch, "float8_e8m0fnu") else {}),
}
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
USIZE = 2**64  # offsets, dimensions and sizes are u64 in the safetensors library


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, fetched with huggingface_hub (needs a network). Either way
    the directory is vetted (vet_directory) before anything reads it."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise CheckpointError(f"the model must be a directory path or a hub id, not {name_or_path!r}")
    try:
        path = Path(name_or_path).expanduser()
    except RuntimeError:  # ~user that this system does not know
        raise CheckpointError(f"cannot resolve the home directory in {str(name_or_path)!r}; write the full path") from None
    if os.path.lexists(path):
        if not stat.S_ISDIR(stat_entry(path).st_mode):
            raise CheckpointError(f"{path} is not a directory; pass the model directory that holds config.json")
        vet_directory(path)
        return path
    text = str(name_or_path)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"no such model directory: {path}; pass a directory with config.json and *.safetensors")
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"could not fetch {text!r} from the Hugging Face hub ({reason}); "
            "without a network, download it elsewhere and pass the local directory"
        ) from None
    vet_directory(path)
    return path


def vet_directory(directory: Path) -> None:
    """Every file the engine or transformers reads here (what a hub download fetches: HUB_PATTERNS) must be a
    regular file inside the checkpoint, and the JSON files beside config.json must have the shapes their
    readers assume: no reader further on may block on a FIFO, recurse without end or fail with a traceback."""
    root = checkpoint_root(directory)
    try:
        names = set(os.listdir(directory))
    except OSError as e:
        raise CheckpointError(f"{directory} cannot be listed ({e.strerror}); check its permissions") from None
    for name in sorted(names):
        if any(fnmatch(name, pattern) for pattern in HUB_PATTERNS):
            regular_file(directory / name, root)
    check_metadata_files(directory, root, names)


def read_config(directory: Path) -> dict:
    """config.json, its fields checked (model_spec.check_config) before any model is built from it."""
    path = directory / "config.json"
    if not os.path.lexists(path):
        raise CheckpointError(f"{directory} has no config.json; pass a Hugging Face model directory")
    config = read_json(path, checkpoint_root(directory))
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; restore the file from the original checkpoint")
    check_config(config, path)
    return config


@dataclass(frozen=True)
class TensorInfo:
    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset of the data in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _is_usize(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < USIZE


class SafetensorsFile:
    """One .safetensors file: its validated header, a descriptor kept open, and (once asked for) a private
    copy-on-write memory map of its bytes. The descriptor keeps the loaded file readable when its name is
    deleted or replaced; a change to the file itself is refused before any read (FileIdentity)."""

    def __init__(self, path: Path, root: Path):
        self.path = path
        self._map: mmap.mmap | None = None
        self._map_lock = threading.Lock()  # demand loads and the prefetch thread may map at once
        self._fd, self._identity = open_regular(path, root)
        self._direct_fd: int | None = None
        try:
            self.tensors: dict[str, TensorInfo] = self._read_header()
        except BaseException:
            self.close()
            raise

    def _invalid(self, reason: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid safetensors file ({reason}); re-download or re-save it")

    def _read_header(self) -> dict[str, TensorInfo]:
        """Parsed and checked as the safetensors library does: the tensors, sorted by offsets, tile the data
        region exactly (no gap, no overlap, nothing after the last one), each exactly as long as its shape."""
        size = self._identity.size
        head = pread_exact(self._fd, 8, 0, self.path)
        if len(head) < 8:
            raise self._invalid("file shorter than its 8-byte header length")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, MAX_HEADER_BYTES):
            raise self._invalid(f"header length {header_len} exceeds the file or the 100 MB limit")
        try:
            header = parse_json(pread_exact(self._fd, header_len, 8, self.path))
        except ValueError as e:
            raise self._invalid(f"header {e}") from None
        if not isinstance(header, dict):
            raise self._invalid("header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        if metadata is not None and not (isinstance(metadata, dict) and all(
                isinstance(v, str) for v in metadata.values())):
            raise self._invalid("__metadata__ must map strings to strings")
        data_start = 8 + header_len
        tensors = {key: self._tensor_info(key, entry, data_start) for key, entry in header.items()}
        end = 0
        for info in sorted(tensors.values(), key=lambda i: (i.begin, i.begin + i.nbytes)):
            if info.begin - data_start != end:
                raise self._invalid(f"tensor {info.key!r} starts at data offset {info.begin - data_start}, not "
                                    f"{end}: tensors overlap or leave a gap")
            end += info.nbytes
        if data_start + end > size:
            raise CheckpointError(
                f"{self.path} is truncated or corrupt (its tensors need {data_start + end} bytes, the file has "
                f"{size}); re-download or re-save the checkpoint"
            )
        if data_start + end < size:
            raise self._invalid(f"{size - data_start - end} bytes after the last tensor")
        return tensors

    def _tensor_info(self, key: str, entry, data_start: int) -> TensorInfo:
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        dtype_name = entry.get("dtype") if isinstance(entry, dict) else None
        if (not isinstance(dtype_name, str) or not isinstance(shape, list) or not all(map(_is_usize, shape))
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_usize, offsets))):
            raise CheckpointError(f"{self.path}: malformed header entry for {key!r} (dtype, shape and data_offsets "
                                  "must be a string and lists of non-negative integers); re-download or re-save it")
        if dtype_name not in SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {key!r} has dtype {dtype_name}, which the engine cannot read; "
                "use an unquantized (bf16/fp16/fp32) checkpoint"
            )
        info = TensorInfo(key, self.path, SAFETENSORS_DTYPES[dtype_name], tuple(shape), data_start + offsets[0])
        if info.nbytes >= USIZE or offsets[1] - offsets[0] != info.nbytes:
            raise self._invalid(f"tensor {key!r} spans {offsets[1] - offsets[0]} bytes, its dtype and shape "
                                f"{list(shape)} need {info.nbytes}")
        return info

    def span(self, info: TensorInfo, index: int | None = None) -> tuple[int, int]:
        """(absolute offset, bytes) of a tensor, or of expert `index` of a fused [E, ...] one."""
        if index is None:
            return info.begin, info.nbytes
        nbytes = info.nbytes // info.shape[0]
        return info.begin + index * nbytes, nbytes

    def view(self, info: TensorInfo, index: int | None = None) -> torch.Tensor:
        """Zero-copy tensor over the mapped file (private: writes would never reach the file). Valid until
        the file changes: the caller copies it at once (a truncation in between is the one SIGBUS left)."""
        begin, nbytes = self.span(info, index)
        shape = info.shape[1:] if index is not None else info.shape
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        self.check_identity()  # a page past a truncated end is a SIGBUS, not an exception
        flat = torch.frombuffer(self._mapped(), dtype=torch.uint8, count=nbytes, offset=begin)
        return flat.view(info.dtype).view(shape)

    def _mapped(self) -> mmap.mmap:
        with self._map_lock:
            if self._map is None:
                try:
                    self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as e:
                    raise CheckpointError(f"{self.path} cannot be memory-mapped ({e}); "
                                          "use --host-memory files") from None
            return self._map

    def fileno(self) -> int:
        """The descriptor kept open (compiled copies read it with pread); check_identity() before each use."""
        return self._fd

    def direct_fileno(self) -> int:
        """A second descriptor of the same open file (not of whatever its name points at now) whose reads
        bypass the page cache (O_DIRECT), or -1 where the filesystem refuses O_DIRECT."""
        if self._direct_fd is None:
            try:
                self._direct_fd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            except OSError:
                self._direct_fd = -1
            if not getattr(os, "O_DIRECT", 0) and self._direct_fd >= 0:
                os.close(self._direct_fd)
                self._direct_fd = -1
        return self._direct_fd

    def check_identity(self) -> None:
        """Refuse a file changed on disk since it was loaded (before every read of it)."""
        self._identity.check(self._fd, self.path)

    def release(self, info: TensorInfo, index: int | None = None) -> None:
        """Drop a copied tensor's pages from this process (the page cache keeps them): without it every expert
        ever read would stay resident in the process."""
        begin, nbytes = self.span(info, index)
        if self._map is None or nbytes == 0:
            return
        start = begin - begin % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, begin + nbytes - start)

    def read_into(self, info: TensorInfo, out: torch.Tensor, index: int | None = None) -> None:
        """Read a tensor (or expert `index` of a fused [E, ...] tensor) straight into `out`, a contiguous CPU
        tensor of the same dtype and element count: one positional read, through the OS page cache."""
        begin, nbytes = self.span(info, index)
        if out.numel() * out.element_size() != nbytes or out.dtype != info.dtype or not out.is_contiguous():
            raise ValueError(f"cannot read {info.key} into a {out.dtype} tensor of shape {list(out.shape)}")
        if nbytes == 0:
            return
        self.check_identity()
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        done = 0
        while done < nbytes:  # a positional read may return short
            try:
                got = os.preadv(self._fd, [view[done:]], begin + done)
            except OSError as e:
                raise CheckpointError(f"{self.path} cannot be read ({e.strerror}) at {info.key}; check the disk, "
                                      "then reload the model") from None
            if got <= 0:
                raise CheckpointError(f"{self.path} ended early while reading {info.key}; the file was truncated "
                                      "after loading, reload the model")
            done += got

    def read(self, info: TensorInfo, index: int | None = None) -> torch.Tensor:
        shape = info.shape[1:] if index is not None else info.shape
        out = torch.empty(shape, dtype=info.dtype)
        self.read_into(info, out, index)
        return out

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if getattr(self, "_direct_fd", None) is not None and self._direct_fd >= 0:
            os.close(self._direct_fd)
        self._direct_fd = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def shard_names(directory: Path, root: Path) -> list[str]:
    """The safetensors files of a checkpoint, as paths relative to it: those its index lists, else *.safetensors."""
    index_path = directory / INDEX_NAME
    if not os.path.lexists(index_path):
        names = sorted(p.name for p in directory.glob("*.safetensors"))
        if not names:
            has_bin = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
            hint = " (.bin/.pt checkpoints are not read: re-save it with safetensors)" if has_bin else ""
            raise CheckpointError(f"{directory} has no *.safetensors files{hint}")
        return names
    index = read_json(index_path, root)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path} has no weight_map object (tensor name -> shard file); re-download it")
    names = set()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name.strip() or "\x00" in name:
            raise CheckpointError(f"{index_path}: weight_map[{key!r}] = {name!r} is not a shard file name; "
                                  "re-download it")
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or relative == PurePosixPath("."):
            raise CheckpointError(f"{index_path} lists shard {name!r}, a path outside the checkpoint directory; "
                                  "re-download it")
        names.add(str(relative))
    for name in sorted(names):
        if not os.path.lexists(directory / name):
            raise CheckpointError(f"shard {name} listed in {INDEX_NAME} is missing from {directory}")
    return sorted(names)


class CheckpointTensors:
    """Every tensor of a checkpoint directory, by on-disk name, across shards."""

    def __init__(self, directory: Path):
        self.directory = directory
        root = checkpoint_root(directory)
        self.files: dict[str, SafetensorsFile] = {}  # by path relative to the directory, as the index names them
        try:
            for name in shard_names(directory, root):
                self.files[name] = SafetensorsFile(directory / name, root)
        except BaseException:
            for f in self.files.values():
                f.close()
            raise
        self._by_path = {f.path: f for f in self.files.values()}
        self.infos: dict[str, TensorInfo] = {}
        for f in self.files.values():
            for key, info in f.tensors.items():
                if key in self.infos:
                    raise CheckpointError(f"tensor {key} is stored twice, in {self.infos[key].file} and {f.path}; "
                                          "re-download the checkpoint")
                self.infos[key] = info

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def keys(self):
        return self.infos.keys()

    def locate(self, key: str) -> tuple[SafetensorsFile, TensorInfo]:
        """The file holding a tensor, and its entry."""
        return self._file(key)

    def _file(self, key: str) -> tuple[SafetensorsFile, TensorInfo]:
        info = self.infos[key]
        return self._by_path[info.file], info

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        f, info = self._file(key)
        return f.read(info, index)

    def read_into(self, key: str, out: torch.Tensor, index: int | None = None) -> None:
        f, info = self._file(key)
        f.read_into(info, out, index)

    def view(self, key: str, index: int | None = None) -> torch.Tensor:
        f, info = self._file(key)
        return f.view(info, index)

    def release(self, key: str, index: int | None = None) -> None:
        f, info = self._file(key)
        f.release(info, index)
