"""Experts quantized at load (`--expert-dtype int8|int4`): weight-only, the checkpoint's bf16/fp16/fp32 weights
encoded once and held, moved and cached in that form.

- int8: symmetric, one fp32 scale per output channel: q = round(w / s), s = max|w| / 127; w' = q * s.
  1 byte a weight plus 4 per output row (0.50x of bf16 at real shapes).
- int4: asymmetric in groups of GROUP inputs (fewer where the input size is not a multiple), a scale and a
  minimum per group: q = round((w - m) / s) in 0..15, s = (max - m) / 15; w' = q * s + m. Two codes a byte,
  low nibble first; 0.5 bytes a weight plus 2 x 2 bytes per group (0.28x of bf16 with groups of 128).
Weights are quantized by output rows ([out, in]; a transposed runtime weight is stored transposed back) and
expanded to the compute dtype where the expert is computed. Biases stay as they are. The output is no longer
the reference's: BENCHMARKS.md publishes what it costs.
"""

from __future__ import annotations

import torch

from . import ExpertFormat, StoredTensor

INT_DTYPES = ("int8", "int4")
GROUP = 128
GROUP_CHOICES = (128, 64, 32, 16)


class IntWeight(ExpertFormat):
    expands = True
    stored_on_disk = False

    def __init__(self, spec, dtype: torch.dtype, kind: str, transposed: bool = False):
        super().__init__(spec, dtype)
        if kind not in INT_DTYPES:
            raise ValueError(f"expert dtype must be one of {INT_DTYPES}, not {kind!r}")
        self.name = kind
        self.transposed = transposed  # runtime weights [in, out] (gpt-oss): quantized as [out, in]
        stored = []
        for p in spec.expert_params:
            if p.name.endswith("_bias") or len(p.shape) != 2:
                stored.append(StoredTensor(p.name, p.name, "bias", p.shape, dtype))
                continue
            out_f, in_f = self._out_in(p.shape)
            if kind == "int8":
                stored.append(StoredTensor(p.name, p.name, "q8", (out_f, in_f), torch.int8))
                stored.append(StoredTensor(f"{p.name}_scale", p.name, "scale", (out_f,), torch.float32))
            else:
                group = group_size(in_f)
                stored.append(StoredTensor(p.name, p.name, "q4", (out_f, (in_f + 1) // 2), torch.uint8))
                stored.append(StoredTensor(f"{p.name}_scale", p.name, "scale", (out_f, in_f // group), torch.bfloat16))
                stored.append(StoredTensor(f"{p.name}_min", p.name, "min", (out_f, in_f // group), torch.bfloat16))
        self.stored = tuple(stored)

    def _out_in(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (shape[1], shape[0]) if self.transposed else shape

    def encode(self, source: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        for t in self.stored:
            if t.kind == "bias":
                out[t.name].copy_(source[t.name])
            elif t.kind in ("q8", "q4"):
                w = source[t.name].to(torch.float32)
                if self.transposed:
                    w = w.transpose(-1, -2)
                parts = quantize_int8(w) if t.kind == "q8" else quantize_int4(w, group_size(w.shape[-1]))
                for suffix, value in zip(("", "_scale", "_min"), parts):
                    out[f"{t.name}{suffix}"].copy_(value)

    def expand(self, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for t in self.stored:
            if t.kind == "bias":
                out[t.name] = stored[t.name]
                continue
            if t.kind == "q8":
                w = dequantize_int8(stored[t.name], stored[f"{t.name}_scale"], self.dtype)
            elif t.kind == "q4":
                w = dequantize_int4(stored[t.name], stored[f"{t.name}_scale"], stored[f"{t.name}_min"], self.dtype)
            else:
                continue
            out[t.name] = w.transpose(-1, -2).contiguous() if self.transposed else w
        return out

    def describe(self) -> str:
        if self.name == "int8":
            return "int8, one scale per output channel (quantized at load)"
        return "int4 in groups, a scale and a minimum per group (quantized at load)"


def group_size(in_features: int) -> int:
    return next((g for g in GROUP_CHOICES if in_features % g == 0), in_features)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., out, in] fp32 -> (int8 [..., out, in], fp32 scales [..., out])."""
    scale = w.abs().amax(dim=-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)


def quantize_int4(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., out, in] fp32 -> (uint8 [..., out, in / 2] codes, bf16 scales and minima [..., out, in / group]).
    The scale and minimum are rounded to bf16 first and the codes chosen against the rounded values."""
    *lead, out_f, in_f = w.shape
    g = w.reshape(*lead, out_f, in_f // group, group)
    low = g.amin(dim=-1).to(torch.bfloat16)
    scale = ((g.amax(dim=-1) - low.float()) / 15.0).to(torch.bfloat16)
    s = torch.where(scale.float() > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    codes = torch.round((g - low.float().unsqueeze(-1)) / s.unsqueeze(-1)).clamp_(0, 15).to(torch.uint8)
    codes = codes.reshape(*lead, out_f, in_f)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, scale, low


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    *lead, out_f, half = packed.shape
    groups = scale.shape[-1]
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*lead, out_f, groups, half * 2 // groups)
    w = codes.to(torch.float32) * scale.float().unsqueeze(-1) + low.float().unsqueeze(-1)
    return w.reshape(*lead, out_f, half * 2).to(dtype)


def int4_loop(w: torch.Tensor, group: int) -> torch.Tensor:
    """Plain-loop twin of quantize_int4 then dequantize_int4 for one [out, in] fp32 weight, value by value:
    what the expert computes with, in fp32."""
    out_f, in_f = w.shape
    result = torch.empty(out_f, in_f, dtype=torch.float32)
    for r in range(out_f):
        for g0 in range(0, in_f, group):
            vals = [float(v) for v in w[r, g0:g0 + group]]
            low = float(torch.tensor(min(vals)).to(torch.bfloat16))
            scale = float(torch.tensor((max(vals) - low) / 15.0).to(torch.bfloat16))
            step = scale if scale > 0 else 1.0
            for i, v in enumerate(vals):
                code = min(15, max(0, round((v - low) / step)))
                result[r, g0 + i] = code * scale + low
    return result


def int8_loop(w: torch.Tensor) -> torch.Tensor:
    """Plain-loop twin of quantize_int8 then dequantize_int8 for one [out, in] fp32 weight."""
    out_f, in_f = w.shape
    result = torch.empty(out_f, in_f, dtype=torch.float32)
    for r in range(out_f):
        vals = [float(v) for v in w[r]]
        scale = max(abs(v) for v in vals) / 127.0 or 1.0
        for i, v in enumerate(vals):
            result[r, i] = min(127, max(-127, round(v / scale))) * scale
    return result
