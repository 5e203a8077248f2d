"""How an expert is held: the tensors a slot and the host store keep per expert, and how they become the
runtime weights transformers' experts functions compute with.

- plain: the runtime tensors themselves, in the compute dtype (what every checkpoint without quantization
  gets, and the only format that computes on the slot pool as it is);
- mxfp4 (gpt-oss): 4-bit E2M1 values in blocks of 32 with one E8M0 scale a block, as the files store them;
- fp8 (Qwen3-*-FP8, DeepSeek-V3): float8_e4m3fn values with one float scale per block of rows and columns;
- int8 / int4: bf16/fp16/fp32 experts quantized at load (--expert-dtype), weight-only.

A format stores bytes and expands them where the expert is computed (the slots of one call, on the device,
or one expert on the CPU), with the formulas transformers' own dequantization uses, so the expanded weights
are bit for bit the weights transformers' dequantized reference model holds.
"""

from __future__ import annotations

import math
import threading

import torch

from ...checkpoint.layout import StoredTensor, plain_sources
from ...errors import UnsupportedModelError

__all__ = ["ExpertFormat", "StoredTensor", "expert_format"]


class ExpertFormat:
    """The plain format, and the base of the others: stored = runtime tensors in the compute dtype."""

    name = "plain"
    expands = False  # False: slots hold the runtime tensors, computed on as they are
    kernel = False  # True: computed from the stored form by the format's own `linear` (int8/int4 on the CPU)
    pairs: dict[str, tuple[str, str]] = {}  # runtime weight -> the names of its stored values and scales
    # what expanding one expert holds besides its stored bytes and its expanded weights, per runtime weight: so
    # many fp32 temporaries and so many more copies in the compute dtype (experts are expanded one at a time
    # into the call's output: their temporaries count once); checked against the bytes really held
    # (tests/live_bytes.py) in tests/test_quantized_experts.py
    expand_fp32_copies = 0.0
    expand_dtype_copies = 0.0
    # read from the checkpoint as stored (True), or read as `sources` and encoded at load (int8/int4)
    stored_on_disk = True

    def __init__(self, spec, dtype: torch.dtype):
        self.spec, self.dtype = spec, dtype
        self._buffers = threading.local()  # expanded weights, per thread (_buffer)
        self.runtime = {p.name: p.shape for p in spec.expert_params}
        self.sources = self.stored = plain_sources(spec, dtype)

    def expert_nbytes(self) -> int:
        """Bytes a slot holds and a miss moves, scales included."""
        return sum(t.nbytes for t in self.stored)

    def runtime_nbytes(self) -> int:
        """Bytes of one expert expanded to the compute dtype."""
        return sum(math.prod(shape) for shape in self.runtime.values()) * self.dtype.itemsize

    def expand_limit(self, top_k: int, rows: int) -> int | None:
        """Experts one layer call expands at once (a decode step's); a call with more (a prefill) expands one
        expert at a time. None: no expansion (plain)."""
        return top_k * rows if self.expands else None

    def expand_bytes(self, rows: int) -> int:
        """Working memory the expansion of one call needs at its peak (a decode step's experts at once, expanded
        straight from their slots)."""
        limit = self.expand_limit(self.spec.top_k, rows)
        if limit is None:
            return 0
        numel = self.runtime_nbytes() // self.dtype.itemsize
        temporaries = 4 * self.expand_fp32_copies + self.dtype.itemsize * self.expand_dtype_copies
        return int(limit * (self.expert_nbytes() + self.runtime_nbytes()) + numel * temporaries)

    def expand(self, stored: dict[str, torch.Tensor], index: list[int] | None = None) -> dict[str, torch.Tensor]:
        """Stored tensors [S, ...] -> runtime tensors [n, ...] in the compute dtype of the experts at `index`
        (positions in S, in order; default all): a call's slots expand straight from the pool. Biases are
        taken as stored; each weight of `pairs` is expanded from its values and scales (dequantize_into)."""
        pick = (lambda t: t) if index is None else (lambda t: t[index])
        out = {t.name: pick(stored[t.name]) for t in self.stored if not self.expands or t.kind == "bias"}
        for param, (values, scales) in self.pairs.items():
            out[param] = self._expanded(param, self.dequantize_into, stored[values], stored[scales], index=index)
        return out

    def _buffer(self, param: str, n: int, device: torch.device) -> torch.Tensor:
        """This thread's buffer for n expanded experts of `param`, reused call after call: the plan counts it as
        working memory, and on the CPU a fresh allocation of tens of MB a call cost more in page faults than the
        expansion itself. Safe to reuse: a call's expanded weights are read before the next call expands (the
        CPU computes in the call; CUDA's kernels run in stream order)."""
        buffers = self._buffers.__dict__.setdefault("by_key", {})
        key = (param, device)
        buf = buffers.get(key)
        if buf is None or buf.shape[0] < n:
            buf = buffers[key] = torch.empty((n, *self.runtime[param]), dtype=self.dtype, device=device)
        return buf[:n]

    def dequantize_into(self, values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        """One expert's weight [1, ...] from its stored values and scales into `out` (formats that expand)."""
        raise NotImplementedError

    def _expanded(self, param: str, fn, *stored: torch.Tensor, index: list[int] | None) -> torch.Tensor:
        """fn(*one expert's stored tensors [1, ...], out=[1, ...]) over the experts at `index`, one at a time
        into one [n, ...] result: an expansion's temporaries (fp32 copies, indices) exist for one expert at a
        time, not for the whole call, and nothing is gathered first."""
        index = range(stored[0].shape[0]) if index is None else index
        out = self._buffer(param, len(index), stored[0].device)
        for i, e in enumerate(index):
            fn(*(t[e:e + 1] for t in stored), out=out[i:i + 1])
        return out

    def encode(self, source: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        """Runtime tensors read from the checkpoint into the stored tensors `out`: the formats not stored on
        disk (int8/int4) only."""
        raise NotImplementedError(f"the {self.name} format is read as stored, never encoded")

    def check_scales(self, key: str, scales: torch.Tensor) -> None:
        """Refuse (CheckpointError) a scale tensor that would make garbage weights: NaN, infinite."""

    def linear(self, x: torch.Tensor, expert: dict[str, torch.Tensor], param: str) -> torch.Tensor:
        """x [T, in] through one expert's weight `param` (and bias), computed from the stored form: formats
        with `kernel` only."""
        raise NotImplementedError(f"the {self.name} format is expanded, not computed in place")

    def describe(self) -> str:
        return ""  # the plain format needs no line of its own in the plan


def expert_format(spec, dtype: torch.dtype, quantization: dict | None = None, expert_dtype: str | None = None,
                  transposed: bool = False, scale_dtype: torch.dtype = torch.float32,
                  row_splits: dict[str, list[int]] | None = None, on_cpu: bool = True) -> ExpertFormat:
    """The format of a checkpoint's experts: its own quantization (checkpoint/quantization.py read it), or the
    one asked for (--expert-dtype) on an unquantized checkpoint, or plain."""
    from .fp8_block import FP8Block
    from .int_weight import IntWeight
    from .mxfp4 import MXFP4

    if quantization is not None:
        method = quantization["quant_method"]
        if method == "mxfp4":
            if spec.model_type != "gpt_oss":  # transformers reads MXFP4 experts for gpt-oss only
                raise UnsupportedModelError(f"model type {spec.model_type!r} with MXFP4 experts: transformers reads "
                                            "MXFP4 for gpt-oss only, so there is no reference to match")
            return MXFP4(spec, dtype)
        return FP8Block(spec, dtype, tuple(quantization["weight_block_size"]), scale_dtype, row_splits)
    if expert_dtype in (None, "auto") or expert_dtype == str(dtype).removeprefix("torch."):
        return ExpertFormat(spec, dtype)
    return IntWeight(spec, dtype, expert_dtype, transposed, on_cpu)
