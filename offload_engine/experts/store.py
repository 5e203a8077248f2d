"""The host-side home of every expert: where cold experts are copied from.

Five ways to hold them:
- "mmap": nothing held; each miss copies the expert straight from a memory map of the safetensors files,
  then drops those pages from the process (RAM smaller than the model; the CPU default). Experts computed
  on the CPU in place (--cold-experts cpu) keep their pages mapped, as llama.cpp does;
- "files": the same through one positional read (preadv) per tensor instead of the map;
- "ram": each layer's experts in ordinary host memory, in the compute dtype;
- "pinned": the same in page-locked memory, so host-to-GPU copies can run asynchronously (the CUDA default);
- "direct": nothing held, and nothing left in the page cache either: each miss reads the expert from the
  files with O_DIRECT (aligned blocks through a scratch buffer; where the filesystem refuses O_DIRECT, a
  read whose pages are then dropped), so the slot pool is the only cache and the process stays within a
  memory limit smaller than the model (the tier for models larger than RAM).
Experts are read one at a time, each from its own tensors; a layer's experts share one host buffer per
runtime parameter, never the whole model in one stack. Into CPU slots (x86-64) "mmap" and "files" both copy by
compiled positional reads (copy_spans, copy_worker.py): through the page cache, no page mapped, so there is
nothing to drop afterwards (a map's page faults and the drop cost more than the copy).
"""

from __future__ import annotations

import math
import os
import threading
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoint.directory import CheckpointTensors
from ..checkpoint.layout import CheckpointLayout
from ..checkpoint.model_spec import ModelSpec
from ..errors import MemoryBudgetError
from . import copy_worker
from .formats import ExpertFormat

HOST_MODES = ("mmap", "files", "ram", "pinned", "direct")
READ_ON_DEMAND = ("mmap", "files", "direct")


class ExpertStore:
    def __init__(
        self,
        tensors: CheckpointTensors,
        layout: CheckpointLayout,
        spec: ModelSpec,
        fmt: ExpertFormat | torch.dtype,
        mode: str = "mmap",
        progress: bool = True,
    ):
        """`fmt`: how an expert is held (experts/formats); a dtype for plain experts in that dtype."""
        if mode not in HOST_MODES:
            raise ValueError(f"host memory mode must be one of {HOST_MODES}, not {mode!r}")
        self.format = fmt if isinstance(fmt, ExpertFormat) else ExpertFormat(spec, fmt)
        self.tensors, self.layout, self.spec, self.dtype = tensors, layout, spec, self.format.dtype
        self.mode = mode
        self.pinned = False  # true only once page-locked buffers really hold the experts
        self.host: list[dict[str, torch.Tensor]] = []  # per MoE layer: runtime param name -> [E, *shape]
        self._staging = threading.local()  # per thread: demand loads and the prefetch thread read at once
        self._spans: dict[tuple[int, int], tuple[np.ndarray, tuple] | None] = {}  # copy_spans', by (layer, expert)
        self._check_scales()
        if mode not in READ_ON_DEMAND:
            self._load_host(progress)

    def expert_nbytes(self) -> int:
        """Bytes of one expert as held (what a slot holds and a miss moves): the compute dtype's, or the
        quantized format's with its scales."""
        return self.format.expert_nbytes()

    def _check_scales(self) -> None:
        """Every expert scale of a quantized checkpoint, read once: a NaN or infinite scale is an error now,
        never wrong tokens later (one byte per 32 weights with MXFP4, ~1/17 of its stored bytes: 0.6 GB for
        gpt-oss-20b's experts; four bytes per 128x128 block with FP8, ~1/4096)."""
        for key, name in self.layout.scale_keys().items():
            self.format.check_scales(key, self.tensors.read(key))

    def copy_spans(self, layer_pos: int, expert: int) -> tuple[np.ndarray, tuple] | None:
        """One expert's byte spans for the compiled copier (copy_worker.py): rows [n, 6] (int64) of the runtime
        stored tensor's index (format.stored order), the byte offset in the expert's tensor, then the task's
        source, bytes, file and how it is read (ram: an address, -1; mmap and files: an offset and the open
        file's descriptor, read with pread through the page cache, so no page stays mapped; direct: the
        file's O_DIRECT descriptor); and the files whose identity the
        caller must check before the copies run (check_sources), as every read checks it. None when the bytes
        cannot be copied as they are (another dtype on disk)."""
        if not self.format.stored_on_disk and self.mode in READ_ON_DEMAND:
            return None  # encoded on each read (int8/int4 from the files)
        key = (layer_pos, expert)
        if key not in self._spans:
            self._spans[key] = self._find_spans(layer_pos, expert)
        return self._spans[key]

    @staticmethod
    def check_sources(files) -> None:
        for f in files:
            f.check_identity()  # refuses a file changed since loading

    def _find_spans(self, layer_pos: int, expert: int):
        if self.mode not in READ_ON_DEMAND:
            rows = [(i, 0, t[expert].data_ptr(), t[expert].numel() * t.element_size(), -1, copy_worker.CACHED)
                    for i, t in enumerate(self.host[layer_pos].values())]
            return np.array(rows, dtype=np.int64), ()
        rows, files = [], set()
        pieces = self.layout.expert_pieces(layer_pos, expert)
        for i, t in enumerate(self.format.stored):
            row_bytes = math.prod(t.shape[1:]) * t.dtype.itemsize
            for piece in pieces[t.name]:
                f, info = self.tensors.locate(piece.key)
                begin, nbytes = f.span(info, piece.index)
                if info.dtype != t.dtype or nbytes != (piece.stop - piece.start) * row_bytes:
                    return None
                rows.append((i, piece.start * row_bytes, begin, nbytes, *self._descriptor(f)))
                files.add(f)
        return np.array(rows, dtype=np.int64), tuple(files)

    def _descriptor(self, f) -> tuple[int, int]:
        """How the compiled copier reads file `f`: its descriptor and copy_worker's HOW."""
        if self.mode != "direct":
            return f.fileno(), copy_worker.CACHED
        direct = f.direct_fileno()
        if direct < 0:  # a filesystem without O_DIRECT (tmpfs): read, then drop the pages
            return f.fileno(), copy_worker.DROP
        return direct, copy_worker.DIRECT

    def _read(self, layer_pos: int, expert: int, name: str, out: torch.Tensor, mapped: bool = False) -> None:
        for piece in self.layout.expert_pieces(layer_pos, expert)[name]:
            info = self.tensors.infos[piece.key]
            dst = out[piece.start:piece.stop]
            if mapped:
                dst.copy_(self.tensors.view(piece.key, piece.index))
                self.tensors.release(piece.key, piece.index)
            elif dst.device.type == "cpu" and dst.dtype == info.dtype and dst.is_contiguous():
                self.tensors.read_into(piece.key, dst, piece.index)
            else:  # another dtype or device: read into a reused host buffer, then convert while copying
                stage = self._stage(info.dtype, dst.numel())
                self.tensors.read_into(piece.key, stage, piece.index)
                dst.copy_(stage.view(dst.shape))
            if self.mode == "direct":  # torch's copies read through the page cache: drop what they brought in
                f, info = self.tensors.locate(piece.key)
                begin, nbytes = f.span(info, piece.index)
                os.posix_fadvise(f.fileno(), begin, nbytes, os.POSIX_FADV_DONTNEED)

    def _stage(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buffers = self._staging.__dict__.setdefault("by_dtype", {})
        buf = buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
        return buf[:numel]

    def _load_host(self, progress: bool) -> None:
        """Every expert in host memory: one allocation for the whole model, viewed per layer and stored tensor
        (each at a 64-byte boundary: their dtypes differ in a quantized format). Pinned mode page-locks that
        one allocation with cudaHostRegister: PyTorch's pinned allocator rounds each allocation up to a power
        of two (a 33 GB model would lock 64 GB)."""
        E = self.spec.num_experts
        sizes = [-(-E * t.nbytes // 64) * 64 for t in self.format.stored]
        try:
            arena = torch.empty(self.spec.num_moe_layers * sum(sizes), dtype=torch.uint8)
        except RuntimeError:
            raise MemoryBudgetError("not enough host RAM to hold the experts; use --host-memory mmap (read on demand)") from None
        self.pinned = self.mode == "pinned" and self._register(arena)
        offset = 0
        for layer_pos in tqdm(range(self.spec.num_moe_layers), desc="experts to host memory", disable=not progress,
                              unit="layer"):
            buffers = {}
            for t, size in zip(self.format.stored, sizes):
                buffers[t.name] = arena[offset:offset + E * t.nbytes].view(t.dtype).view(E, *t.shape)
                offset += size
            for e in range(E):
                self._fill(layer_pos, e, {name: b[e] for name, b in buffers.items()})
            self.host.append(buffers)

    def _fill(self, layer_pos: int, expert: int, dst: dict[str, torch.Tensor], mapped: bool = False) -> None:
        """One expert's stored tensors into `dst`: read as they are, or (int8/int4) read and encoded."""
        if self.format.stored_on_disk:
            for name, out in dst.items():
                self._read(layer_pos, expert, name, out, mapped)
            return
        source = {}
        for t in self.format.sources:
            source[t.name] = self._scratch(f"source.{t.name}", t.shape, self.dtype)[0]
            self._read(layer_pos, expert, t.name, source[t.name], mapped)
        self.format.encode(source, dst)

    def _register(self, arena: torch.Tensor) -> bool:
        """Page-lock `arena` for asynchronous copies; on failure, warn and stay pageable (the loader then copies
        through its pinned bounce buffers)."""
        nbytes = arena.numel() * arena.element_size()
        cudart = torch.cuda.cudart()
        code = cudart.cudaHostRegister(arena.data_ptr(), nbytes, 0)
        if int(code) != 0:
            clear_cuda_error()
            warnings.warn(f"pinning {nbytes / 2**30:.2f} GiB of host memory failed (CUDA error {int(code)}); using "
                          "pageable memory, copied to the device through small pinned bounce buffers", stacklevel=3)
            return False
        self._registered = arena
        return True

    def close(self) -> None:
        """Unlock the pinned arena (the engine calls this when it is done with the store)."""
        arena, self._registered = getattr(self, "_registered", None), None
        if arena is not None:
            torch.cuda.cudart().cudaHostUnregister(arena.data_ptr())
            self.pinned = False

    def host_view(self, layer_pos: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's tensors in host memory, in the runtime format, each shaped [1, ...] (for the CPU
        executor): views of the host buffers (ram, pinned), of the memory map when the file holds the runtime
        tensor as it is (one piece, same dtype), else assembled in this thread's scratch buffers (read once,
        never kept: a per-expert file layout splits gate and up into two tensors)."""
        if self.mode not in READ_ON_DEMAND:
            return {name: t[expert:expert + 1] for name, t in self.host[layer_pos].items()}
        mapped = self.mode == "mmap"
        if not self.format.stored_on_disk:
            out = {t.name: self._scratch(t.name, t.shape, t.dtype) for t in self.format.stored}
            self._fill(layer_pos, expert, {name: v[0] for name, v in out.items()}, mapped)
            return out
        out = {}
        pieces = self.layout.expert_pieces(layer_pos, expert)
        for t in self.format.stored:
            parts = pieces[t.name]
            info = self.tensors.infos[parts[0].key]
            if mapped and len(parts) == 1 and info.dtype == t.dtype:
                view = self.tensors.view(parts[0].key, parts[0].index)
                if tuple(view.shape) == t.shape:
                    out[t.name] = view.unsqueeze(0)
                    continue
            scratch = self._scratch(t.name, t.shape, t.dtype)
            self._read(layer_pos, expert, t.name, scratch[0], mapped=mapped)
            out[t.name] = scratch
        return out

    def host_pieces(self, layer_pos: int, expert: int) -> dict[str, list[torch.Tensor]] | None:
        """One expert's runtime tensors as row blocks mapped straight from the files, in order (e.g. gate_up_proj
        = [the file's gate, the file's up]), for a CPU kernel that reads them in place; None when they cannot be
        used as they are (not memory-mapped, another dtype, a block that is not whole rows)."""
        if self.mode != "mmap" or self.format.name != "plain":  # a quantized expert is not the file's bytes
            return None
        out = {}
        for p, parts in self.layout.expert_pieces(layer_pos, expert).items():
            blocks = []
            for piece in parts:
                if self.tensors.infos[piece.key].dtype != self.dtype:
                    return None
                view = self.tensors.view(piece.key, piece.index)
                rows = piece.stop - piece.start
                shape = next(q.shape for q in self.spec.expert_params if q.name == p)
                if view.numel() != rows * math.prod(shape[1:]):
                    return None
                blocks.append(view.reshape(rows, *shape[1:]))
            out[p] = blocks
        return out

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        buffers = self._staging.__dict__.setdefault("scratch", {})
        buf = buffers.get(name)
        if buf is None:
            buf = buffers[name] = torch.empty((1, *shape), dtype=dtype)
        return buf

    def copy_into(self, layer_pos: int, expert: int, dst: dict[str, torch.Tensor], non_blocking: bool = False) -> int:
        """Write one expert's tensors into `dst` (name -> tensor of the per-expert shape); returns bytes written."""
        written = sum(out.numel() * out.element_size() for out in dst.values())
        if self.mode in READ_ON_DEMAND:
            if self.format.stored_on_disk or all(out.device.type == "cpu" for out in dst.values()):
                self._fill(layer_pos, expert, dst, mapped=self.mode == "mmap")
                return written
            staged = {t.name: self._scratch(f"encoded.{t.name}", t.shape, t.dtype)[0] for t in self.format.stored}
            self._fill(layer_pos, expert, staged, mapped=self.mode == "mmap")  # encoded on the host, then copied
            for name, out in dst.items():
                out.copy_(staged[name], non_blocking=False)
            return written
        for name, out in dst.items():
            out.copy_(self.host[layer_pos][name][expert], non_blocking=non_blocking)
        return written


def clear_cuda_error() -> bool:
    """Read (and so reset) the CUDA runtime's last error. A failed call such as cudaHostRegister also leaves
    its error as the "last error", which PyTorch's next kernel-launch check would report as that kernel's
    own. torch's cudart bindings do not expose cudaGetLastError: call it in the runtime library this process
    already loaded (the same instance PyTorch uses). False if that library cannot be found."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            path = next((line.split()[-1] for line in maps if "libcudart" in line.split()[-1]), None)
        if path is None:
            return False
        ctypes.CDLL(path).cudaGetLastError()
        return True
    except OSError:
        return False
