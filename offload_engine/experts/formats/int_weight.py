"""Experts quantized at load (`--expert-dtype int8|int4`): weight-only, the checkpoint's bf16/fp16/fp32 weights
encoded once and held, moved and cached in that form.

- int8: symmetric, one scale per output channel in the compute dtype: q = round(w / s), s = max|w| / 127;
  w' = q * s. 1 byte a weight plus one scale per output row (0.50x of bf16 at real shapes).
- int4: asymmetric in groups of GROUP inputs (64 or 32 where the input size is not a multiple), a scale s and a
  zero z per group in the compute dtype, as torch's int4 kernels read them: w' = (q - 8) * s + z, q in 0..15,
  s = (max - min) / 15, z = min + 8 s. 0.5 bytes a weight plus 2 x 2 bytes a group (0.28x of bf16 with
  groups of 128).
Weights are quantized by output rows ([out, in]; a transposed runtime weight is quantized transposed back).
Biases stay as they are. The output is no longer the reference's: BENCHMARKS.md publishes what it costs.

How an expert is computed: on the CPU (every one of its experts, so that the result is the same whatever the
cache size or where an expert runs) with PyTorch's weight-only kernels, `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu`, which read the quantized weight as it is: 3-4x faster than bf16 at a decode
step's few tokens (benchmarks/bench_int_kernels.py). The int4 kernel wants its own tiled byte order, which
depends on the CPU's instruction set, so on the CPU the slots hold that order (made at load, on this
machine). Elsewhere (CUDA) the expert is expanded to the compute dtype in the call, as the pre-quantized
formats are, and transformers' experts function runs on it.
"""

from __future__ import annotations

import torch

from . import ExpertFormat, StoredTensor

INT_DTYPES = ("int8", "int4")
INT4_GROUPS = (128, 64, 32)  # what torch's int4 kernels take (256 too), largest first


class IntWeight(ExpertFormat):
    expands = True
    stored_on_disk = False
    expand_dtype_copies = 1.0  # expanded on CUDA only: on the CPU the kernels read the stored form

    def __init__(self, spec, dtype: torch.dtype, kind: str, transposed: bool = False, on_cpu: bool = True):
        super().__init__(spec, dtype)
        if kind not in INT_DTYPES:
            raise ValueError(f"expert dtype must be one of {INT_DTYPES}, not {kind!r}")
        self.name = kind
        self.expand_fp32_copies = 1.25 if kind == "int8" else 2.25  # codes in fp32, then scaled
        self.transposed = transposed  # runtime weights [in, out] (gpt-oss): quantized as [out, in]
        weights = {p.name: self._out_in(p.shape) for p in spec.expert_params
                   if not p.name.endswith("_bias") and len(p.shape) == 2}
        self.groups = {name: group_size(in_f) for name, (_, in_f) in weights.items()}
        # the CPU kernels: int4 needs every input size a multiple of a group it takes; torch 2.13's int8 kernel
        # crashes the process (bf16, two tokens or more) where an input size is not a multiple of 16
        sizes_ok = all(in_f % 16 == 0 for _, in_f in weights.values()) if kind == "int8" else \
            all(g is not None for g in self.groups.values())
        self.kernel = on_cpu and sizes_ok
        self.expands = not self.kernel
        stored = []
        for p in spec.expert_params:
            if p.name not in weights:
                stored.append(StoredTensor(p.name, p.name, "bias", p.shape, dtype))
                continue
            out_f, in_f = weights[p.name]
            if kind == "int8":
                stored.append(StoredTensor(p.name, p.name, "q8", (out_f, in_f), torch.int8))
                stored.append(StoredTensor(f"{p.name}_scale", p.name, "scale", (out_f,), dtype))
            else:
                group = self.groups[p.name] or in_f
                stored.append(StoredTensor(p.name, p.name, "q4", (out_f, in_f // 2), torch.uint8))
                stored.append(StoredTensor(f"{p.name}_sz", p.name, "sz", (in_f // group, out_f, 2), dtype))
        self.stored = tuple(stored)
        self.pairs = {t.name: (t.name, f"{t.name}_scale" if kind == "int8" else f"{t.name}_sz")
                      for t in stored if t.kind in ("q8", "q4")}

    def _out_in(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (shape[1], shape[0]) if self.transposed else shape

    def expand_limit(self, top_k: int, rows: int) -> int | None:
        return None if self.kernel else super().expand_limit(top_k, rows)

    def encode(self, source: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        for t in self.stored:
            if t.kind == "bias":
                out[t.name].copy_(source[t.name])
            elif t.kind in ("q8", "q4"):
                w = source[t.name].to(torch.float32)
                if self.transposed:
                    w = w.transpose(-1, -2)
                if t.kind == "q8":
                    q, scale = quantize_int8(w, self.dtype)
                    out[t.name].copy_(q)
                    out[f"{t.name}_scale"].copy_(scale)
                    continue
                codes, sz = quantize_int4(w, self.groups[t.name] or w.shape[-1], self.dtype)
                out[t.name].copy_(pack_for_cpu(codes) if self.kernel else pack_int4(codes))
                out[f"{t.name}_sz"].copy_(sz)

    def expand(self, stored: dict[str, torch.Tensor], index: list[int] | None = None) -> dict[str, torch.Tensor]:
        if self.kernel:
            raise RuntimeError("int experts on the CPU are computed by the packed kernels (linear), never expanded")
        return super().expand(stored, index)

    def dequantize_into(self, q: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        if self.name == "int8":
            w = dequantize_int8(q, scales, self.dtype)
        else:
            w = dequantize_int4(unpack_int4(q), scales, self.dtype)
        out.copy_(w.transpose(-1, -2) if self.transposed else w)

    def linear(self, x: torch.Tensor, expert: dict[str, torch.Tensor], param: str) -> torch.Tensor:
        """x [T, in] times one expert's quantized weight `param` ([out, in]), plus its bias: [T, out]."""
        if self.name == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x, expert[param], expert[f"{param}_scale"])
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, expert[param], self.groups[param],
                                                           expert[f"{param}_sz"])
        bias = expert.get(f"{param}_bias")
        return y if bias is None else y + bias

    def describe(self) -> str:
        how = "torch's packed CPU kernel" if self.kernel else f"expanded to {str(self.dtype).removeprefix('torch.')}"
        if self.name == "int8":
            return f"int8, one scale per output channel (quantized at load; {how})"
        groups = sorted({g for g in self.groups.values() if g})
        return f"int4 in groups of {'/'.join(map(str, groups)) or 'a row'} (quantized at load; {how})"


def group_size(in_features: int) -> int | None:
    """The int4 group: the largest the kernels take that divides the input size; None if none does."""
    return next((g for g in INT4_GROUPS if in_features % g == 0), None)


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] fp32 -> (int8 [..., out, in], scales [..., out] in `dtype`); codes against the rounded scale."""
    scale = (w.abs().amax(dim=-1) / 127.0).to(dtype)
    s = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    q = torch.round(w / s.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale.float().unsqueeze(-1)).to(dtype)


def quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] fp32 -> (codes uint8 [..., out, in] in 0..15, scales_and_zeros [..., in / group, out, 2] in
    `dtype`: the kernels' layout). Scale and zero are rounded to `dtype` first, the codes chosen against them."""
    *lead, out_f, in_f = w.shape
    g = w.reshape(*lead, out_f, in_f // group, group)
    low, high = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((high - low) / 15.0).to(dtype)
    zero = (low + 8 * scale.float()).to(dtype)
    s = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.round((g - zero.float().unsqueeze(-1)) / s.unsqueeze(-1) + 8).clamp_(0, 15).to(torch.uint8)
    sz = torch.stack([scale, zero], dim=-1).transpose(-3, -2)  # [..., in / group, out, 2]
    return codes.reshape(*lead, out_f, in_f), sz.contiguous()


def dequantize_int4(codes: torch.Tensor, sz: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., out, in], scales_and_zeros [..., in / group, out, 2] -> (q - 8) * s + z in `dtype`."""
    *lead, out_f, in_f = codes.shape
    groups = sz.shape[-3]
    scale, zero = sz[..., 0].transpose(-1, -2).float(), sz[..., 1].transpose(-1, -2).float()  # [..., out, groups]
    q = codes.reshape(*lead, out_f, groups, in_f // groups).to(torch.float32)
    w = (q - 8) * scale.unsqueeze(-1) + zero.unsqueeze(-1)
    return w.reshape(*lead, out_f, in_f).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes [..., out, in] -> bytes [..., out, in / 2], two a byte, the even input in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def pack_for_cpu(codes: torch.Tensor) -> torch.Tensor:
    """Codes [out, in] (or [1, out, in]) -> the byte order `_weight_int4pack_mm_for_cpu` reads on this CPU."""
    flat = codes.reshape(codes.shape[-2:]).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(flat, 1).reshape(*codes.shape[:-1], -1)


def int8_loop(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Plain-loop twin of quantize_int8 then dequantize_int8 for one [out, in] fp32 weight, in fp32."""
    out_f, in_f = w.shape
    result = torch.empty(out_f, in_f, dtype=torch.float32)
    for r in range(out_f):
        vals = [float(v) for v in w[r]]
        scale = float(torch.tensor(max(abs(v) for v in vals) / 127.0, dtype=torch.float32).to(dtype)) or 1.0
        for i, v in enumerate(vals):
            result[r, i] = min(127, max(-127, round(v / scale))) * scale
    return result


def int4_loop(w: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Plain-loop twin of quantize_int4 then dequantize_int4 for one [out, in] fp32 weight, value by value, in
    fp32 (the scale and zero rounded to `dtype` as stored)."""
    out_f, in_f = w.shape
    result = torch.empty(out_f, in_f, dtype=torch.float32)
    as_dtype = lambda v: float(torch.tensor(v, dtype=torch.float32).to(dtype))  # noqa: E731
    for r in range(out_f):
        for g0 in range(0, in_f, group):
            vals = [float(v) for v in w[r, g0:g0 + group]]
            scale = as_dtype((max(vals) - min(vals)) / 15.0)
            zero = as_dtype(min(vals) + 8 * scale)
            step = scale if scale > 0 else 1.0
            for i, v in enumerate(vals):
                code = min(15, max(0, round((v - zero) / step + 8)))
                result[r, g0 + i] = (code - 8) * scale + zero
    return result
