"""A Hugging Face checkpoint directory: config.json, tokenizer files and safetensors shards.

Safetensors headers are parsed here (not by the safetensors package) so that one expert of a fused tensor can
be reached by itself, and a truncated or corrupt file is caught before anything is loaded. Two ways to get
a tensor's bytes: a zero-copy view of a private memory map (pages dropped again once copied, so they do
not pile up in the process), or one positional read straight into a destination tensor. Which tensor
means what is decided in checkpoint_layout.py, never here.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def resolve_checkpoint(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a hub id, fetched with huggingface_hub (needs a network)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; pass the model directory that holds config.json")
        return path
    text = str(name_or_path)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"no such model directory: {path}; pass a directory with config.json and *.safetensors")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=HUB_PATTERNS))
    except Exception as e:  # the hub client raises many types; all mean "could not get it"
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"could not fetch {text!r} from the Hugging Face hub ({reason}); "
            "without a network, download it elsewhere and pass the local directory"
        ) from None


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json; pass a Hugging Face model directory")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore the file from the original checkpoint") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} is not a JSON object; restore the file from the original checkpoint")
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


class SafetensorsFile:
    """One .safetensors file: its validated header and a private (copy-on-write) memory map of its bytes."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file shorter than its 8-byte header length")
                (header_len,) = struct.unpack("<Q", head)
                if header_len > min(size - 8, 100_000_000):
                    raise ValueError(f"header length {header_len} exceeds the file")
                header = json.loads(f.read(header_len))
                if not isinstance(header, dict):
                    raise ValueError("header is not a JSON object")
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a valid safetensors file ({e}); re-download or re-save it") from None
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            try:
                begin, end = (int(x) for x in entry["data_offsets"])
                dtype_name, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: malformed header entry for {key!r}; re-download or re-save it") from None
            if dtype_name not in SAFETENSORS_DTYPES:
                raise CheckpointError(
                    f"{path}: tensor {key!r} has dtype {dtype_name}, which the engine cannot read; "
                    "use an unquantized (bf16/fp16/fp32) checkpoint"
                )
            info = TensorInfo(key, path, SAFETENSORS_DTYPES[dtype_name], shape, data_start + begin)
            if not 0 <= begin <= end or end - begin != info.nbytes or data_start + end > size:
                raise CheckpointError(
                    f"{path} is truncated or corrupt (tensor {key!r} lies past the end of the file); "
                    "re-download or re-save the checkpoint"
                )
            self.tensors[key] = info
        self._fd: int | None = None
        self._map: mmap.mmap | None = None

    def _span(self, info: TensorInfo, index: int | None) -> tuple[int, int]:
        """(absolute offset, bytes) of a tensor, or of expert `index` of a fused [E, ...] one."""
        if index is None:
            return info.begin, info.nbytes
        nbytes = info.nbytes // info.shape[0]
        return info.begin + index * nbytes, nbytes

    def view(self, info: TensorInfo, index: int | None = None) -> torch.Tensor:
        """Zero-copy tensor over the mapped file (private: writes would never reach the file)."""
        begin, nbytes = self._span(info, index)
        shape = info.shape[1:] if index is not None else info.shape
        if nbytes == 0:
            return torch.empty(shape, dtype=info.dtype)
        if self._map is None:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=begin)
        return flat.view(info.dtype).view(shape)

    def release(self, info: TensorInfo, index: int | None = None) -> None:
        """Drop a copied tensor's pages from this process (the page cache keeps them): without it every expert
        ever read would stay resident in the process."""
        begin, nbytes = self._span(info, index)
        if self._map is None or nbytes == 0:
            return
        start = begin - begin % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, begin + nbytes - start)

    def read_into(self, info: TensorInfo, out: torch.Tensor, index: int | None = None) -> None:
        """Read a tensor (or expert `index` of a fused [E, ...] tensor) straight into `out`, a contiguous CPU
        tensor of the same dtype and element count: one positional read, through the OS page cache."""
        begin, nbytes = self._span(info, index)
        if out.numel() * out.element_size() != nbytes or out.dtype != info.dtype or not out.is_contiguous():
            raise ValueError(f"cannot read {info.key} into a {out.dtype} tensor of shape {list(out.shape)}")
        if nbytes == 0:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        done = 0
        while done < nbytes:  # a positional read may return short
            got = os.preadv(self._fd, [view[done:]], begin + done)
            if got <= 0:
                raise CheckpointError(f"{self.path} ended early while reading {info.key}; the file was truncated")
            done += got

    def read(self, info: TensorInfo, index: int | None = None) -> torch.Tensor:
        shape = info.shape[1:] if index is not None else info.shape
        out = torch.empty(shape, dtype=info.dtype)
        self.read_into(info, out, index)
        return out

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class CheckpointTensors:
    """Every tensor of a checkpoint directory, by on-disk name, across shards."""

    def __init__(self, directory: Path):
        self.directory = directory
        index_path = directory / INDEX_NAME
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index_path} is malformed; re-download it") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (directory / n).is_file()]
            if missing:
                raise CheckpointError(f"shard {missing[0]} listed in {INDEX_NAME} is missing from {directory}")
        else:
            names = sorted(p.name for p in directory.glob("*.safetensors"))
            if not names:
                has_bin = any(directory.glob("*.bin")) or any(directory.glob("*.pt"))
                hint = " (.bin/.pt checkpoints are not read: re-save it with safetensors)" if has_bin else ""
                raise CheckpointError(f"{directory} has no *.safetensors files{hint}")
        self.files = {name: SafetensorsFile(directory / name) for name in names}
        self.infos: dict[str, TensorInfo] = {}
        for f in self.files.values():
            self.infos.update(f.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.infos

    def keys(self):
        return self.infos.keys()

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        info = self.infos[key]
        return self.files[info.file.name].read(info, index)

    def read_into(self, key: str, out: torch.Tensor, index: int | None = None) -> None:
        info = self.infos[key]
        self.files[info.file.name].read_into(info, out, index)

    def view(self, key: str, index: int | None = None) -> torch.Tensor:
        info = self.infos[key]
        return self.files[info.file.name].view(info, index)

    def release(self, key: str, index: int | None = None) -> None:
        info = self.infos[key]
        self.files[info.file.name].release(info, index)
