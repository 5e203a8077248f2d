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

HOST_MODES = ("mmap", "files", "ram", "pinned", "direct")
READ_ON_DEMAND = ("mmap", "files", "direct")


class ExpertStore:
    def __init__(
        self,
        tensors: CheckpointTensors,
        layout: CheckpointLayout,
        spec: ModelSpec,
        dtype: torch.dtype,
        mode: str = "mmap",
        progress: bool = True,
    ):
        if mode not in HOST_MODES:
            raise ValueError(f"host memory mode must be one of {HOST_MODES}, not {mode!r}")
        self.tensors, self.layout, self.spec, self.dtype = tensors, layout, spec, dtype
        self.mode = mode
        self.pinned = False  # true only once page-locked buffers really hold the experts
        self.host: list[dict[str, torch.Tensor]] = []  # per MoE layer: runtime param name -> [E, *shape]
        self._staging = threading.local()  # per thread: demand loads and the prefetch thread read at once
        self._spans: dict[tuple[int, int], tuple[np.ndarray, tuple] | None] = {}  # copy_spans', by (layer, expert)
        if mode not in READ_ON_DEMAND:
            self._load_host(progress)

    def expert_nbytes(self) -> int:
        """Bytes of one expert in the compute dtype (what a slot holds and a miss moves)."""
        return self.spec.expert_numel() * self.dtype.itemsize

    def copy_spans(self, layer_pos: int, expert: int) -> tuple[np.ndarray, tuple] | None:
        """One expert's byte spans for the compiled copier (copy_worker.py): rows [n, 6] (int64) of the runtime
        parameter's index (spec.expert_params order), the byte offset in the expert's tensor, then the task's
        source, bytes, file and how it is read (ram: an address, -1; mmap and files: an offset and the open
        file's descriptor, read with pread through the page cache, so no page stays mapped; direct: the
        file's O_DIRECT descriptor); and the files whose identity the
        caller must check before the copies run (check_sources), as every read checks it. None when the bytes
        cannot be copied as they are (another dtype on disk)."""
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
        for i, p in enumerate(self.spec.expert_params):
            row_bytes = math.prod(p.shape[1:]) * self.dtype.itemsize
            for piece in pieces[p.name]:
                f, info = self.tensors.locate(piece.key)
                begin, nbytes = f.span(info, piece.index)
                if info.dtype != self.dtype or nbytes != (piece.stop - piece.start) * row_bytes:
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
        """Every expert in host memory: one allocation for the whole model, viewed per layer and parameter.
        Pinned mode page-locks that one allocation with cudaHostRegister: PyTorch's pinned allocator rounds each
        allocation up to a power of two (a 33 GB model would lock 64 GB)."""
        numels = [self.spec.num_experts * math.prod(p.shape) for p in self.spec.expert_params]
        total = self.spec.num_moe_layers * sum(numels)
        try:
            arena = torch.empty(total, dtype=self.dtype)
        except RuntimeError:
            raise MemoryBudgetError("not enough host RAM to hold the experts; use --host-memory mmap (read on demand)") from None
        self.pinned = self.mode == "pinned" and self._register(arena)
        offset = 0
        for layer_pos in tqdm(range(self.spec.num_moe_layers), desc="experts to host memory", disable=not progress,
                              unit="layer"):
            buffers = {}
            for p, numel in zip(self.spec.expert_params, numels):
                buf = arena[offset:offset + numel].view(self.spec.num_experts, *p.shape)
                offset += numel
                for e in range(self.spec.num_experts):
                    self._read(layer_pos, e, p.name, buf[e])
                buffers[p.name] = buf
            self.host.append(buffers)

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
        out = {}
        pieces = self.layout.expert_pieces(layer_pos, expert)
        for p in self.spec.expert_params:
            parts = pieces[p.name]
            info = self.tensors.infos[parts[0].key]
            if self.mode == "mmap" and len(parts) == 1 and info.dtype == self.dtype:
                view = self.tensors.view(parts[0].key, parts[0].index)
                if tuple(view.shape) == p.shape:
                    out[p.name] = view.unsqueeze(0)
                    continue
            scratch = self._scratch(p.name, p.shape)
            self._read(layer_pos, expert, p.name, scratch[0], mapped=self.mode == "mmap")
            out[p.name] = scratch
        return out

    def host_pieces(self, layer_pos: int, expert: int) -> dict[str, list[torch.Tensor]] | None:
        """One expert's runtime tensors as row blocks mapped straight from the files, in order (e.g. gate_up_proj
        = [the file's gate, the file's up]), for a CPU kernel that reads them in place; None when they cannot be
        used as they are (not memory-mapped, another dtype, a block that is not whole rows)."""
        if self.mode != "mmap":
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

    def _scratch(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        buffers = self._staging.__dict__.setdefault("scratch", {})
        buf = buffers.get(name)
        if buf is None:
            buf = buffers[name] = torch.empty((1, *shape), dtype=self.dtype)
        return buf

    def copy_into(self, layer_pos: int, expert: int, dst: dict[str, torch.Tensor], non_blocking: bool = False) -> int:
        """Write one expert's tensors into `dst` (name -> tensor of the per-expert shape); returns bytes written."""
        written = 0
        for name, out in dst.items():
            if self.mode in READ_ON_DEMAND:
                self._read(layer_pos, expert, name, out, mapped=self.mode == "mmap")
            else:
                out.copy_(self.host[layer_pos][name][expert], non_blocking=non_blocking)
            written += out.numel() * out.element_size()
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
