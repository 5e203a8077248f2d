"""MXFP4 experts (gpt-oss): per weight `{param}_blocks` uint8 [rows, cols/32, 16] (two 4-bit E2M1 codes a byte,
low nibble first) and `{param}_scales` uint8 [rows, cols/32] (E8M0: 2^(s - 127)), rows being the weight's
output features; biases as stored. 4.25 bits a weight.

Expanded as transformers' `integrations/mxfp4.py` (`_convert_moe_packed_tensors`) does: a table lookup into
the compute dtype, `ldexp` by the block's exponent, then transposed to the runtime's [in, out].
"""

from __future__ import annotations

import torch

from ...errors import CheckpointError, UnsupportedModelError
from . import ExpertFormat, StoredTensor

# transformers' FP4_VALUES: the E2M1 code -> value table
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values a scale covers


class MXFP4(ExpertFormat):
    name = "mxfp4"
    expands = True
    expand_fp32_copies, expand_dtype_copies = 0.5, 2.5  # int32 codes of half the values; values, transposed

    def __init__(self, spec, dtype: torch.dtype):
        super().__init__(spec, dtype)
        stored = []
        for p in spec.expert_params:
            if p.name.endswith("_bias"):
                stored.append(StoredTensor(p.name, p.name, "bias", p.shape, dtype))
                continue
            if len(p.shape) != 2 or p.shape[0] % BLOCK:
                raise UnsupportedModelError(
                    f"model type {spec.model_type!r}: MXFP4 expert weight {p.name} {list(p.shape)} is not "
                    f"[in, out] with `in` a multiple of {BLOCK}; the engine reads gpt-oss's MXFP4 layout only")
            cols, rows = p.shape  # runtime [in, out]: stored by output rows
            stored.append(StoredTensor(f"{p.name}_blocks", p.name, "blocks", (rows, cols // BLOCK, BLOCK // 2),
                                       torch.uint8, as_stored=True))
            stored.append(StoredTensor(f"{p.name}_scales", p.name, "scales", (rows, cols // BLOCK), torch.uint8, as_stored=True))
        self.stored = self.sources = tuple(stored)
        self.pairs = {t.param: (t.name, f"{t.param}_scales") for t in stored if t.kind == "blocks"}

    def dequantize_into(self, blocks: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        dequantize(blocks, scales, self.dtype, out)

    def check_scales(self, key: str, scales: torch.Tensor) -> None:
        nan = scales == 255  # E8M0's NaN
        if bool(nan.any()):
            raise CheckpointError(f"{key} has {int(nan.sum())} NaN scale(s) (E8M0 byte 255); the file is damaged: "
                                  "re-download it")

    def describe(self) -> str:
        return f"MXFP4 (4.25 bits a weight, expanded to {str(self.dtype).removeprefix('torch.')} where computed)"


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """blocks [n, R, G, 16] uint8, scales [n, R, G] uint8 -> [n, G * 32, R] in `dtype`, into `out` if given:
    compiled on the CPU (cpu_expand.py), torch's ops elsewhere; the same bits either way."""
    from . import cpu_expand

    if cpu_expand.usable(blocks, scales, dtype=dtype):
        return cpu_expand.mxfp4(blocks, scales, dtype, out)
    result = dequantize_torch(blocks, scales, dtype)
    return result if out is None else out.copy_(result)


def dequantize_torch(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """transformers' `_convert_moe_packed_tensors` step for step (same table dtype, same ldexp)."""
    n, rows, groups, half = blocks.shape
    lut = torch.tensor(E2M1_VALUES, dtype=dtype, device=blocks.device)
    exp = scales.to(torch.int32).reshape(-1, 1) - 127
    flat = blocks.reshape(-1, half)
    out = torch.empty(flat.shape[0], half * 2, dtype=dtype, device=blocks.device)
    out[:, 0::2] = lut[(flat & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(flat >> 4).to(torch.int)]
    torch.ldexp(out, exp, out=out)
    return out.view(n, rows, groups * half * 2).transpose(1, 2).contiguous()


def dequantize_loop(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The plain-loop twin of `dequantize` for one expert ([R, G, 16], [R, G]), value by value in float64:
    code -> table value -> times 2^(scale - 127), rounded once to `dtype`, transposed to [G * 32, R]."""
    rows, groups, half = blocks.shape
    out = torch.empty(groups * half * 2, rows, dtype=torch.float64)
    for r in range(rows):
        for g in range(groups):
            scale = 2.0 ** (int(scales[r, g]) - 127)
            for b in range(half):
                byte = int(blocks[r, g, b])
                for nibble, code in enumerate((byte & 0x0F, byte >> 4)):
                    out[g * half * 2 + 2 * b + nibble, r] = E2M1_VALUES[code] * scale
    return out.to(dtype)
