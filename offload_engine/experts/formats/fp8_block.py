"""FP8 block-quantized experts (Qwen3-30B-A3B-FP8, Qwen3-Next-FP8, DeepSeek-V3): each weight [rows, cols] as
float8_e4m3fn with `weight_scale_inv` [rows / b0, cols / b1] (one scale a block of b0 x b1; W = q * scale),
biases as stored. About 8 bits a weight (8.002 with 128 x 128 blocks of fp32 scales).

Expanded as transformers' `Fp8Dequantize._dequantize_one` does: values and scales to fp32, multiplied block
by block, rounded once to the compute dtype. Gate and up, stored as two tensors per expert, are concatenated
by rows, scales too: every block lies inside one of them (the layout checks that blocks divide each weight).
"""

from __future__ import annotations

import math

import torch

from ...errors import CheckpointError
from . import ExpertFormat, StoredTensor

E8M0 = getattr(torch, "float8_e8m0fnu", None)


class FP8Block(ExpertFormat):
    name = "fp8"
    expands = True
    expand_fp32_copies, expand_dtype_copies = 1.0, 1.0  # values in fp32 (scaled in place), then rounded

    def __init__(self, spec, dtype: torch.dtype, block: tuple[int, int], scale_dtype: torch.dtype,
                 row_splits: dict[str, list[int]] | None = None):
        """`row_splits`: the rows of each on-disk tensor a runtime weight is made of (gate and up for
        gate_up_proj in a per-expert layout); each has its own grid of scales, ceil(rows / b0) rows of them."""
        super().__init__(spec, dtype)
        self.block = block
        b0, b1 = block
        stored = []
        for p in spec.expert_params:
            if p.name.endswith("_bias"):
                stored.append(StoredTensor(p.name, p.name, "bias", p.shape, dtype))
                continue
            rows, cols = p.shape
            splits = (row_splits or {}).get(p.name, [rows])
            srows, scols = sum(-(-r // b0) for r in splits), -(-cols // b1)
            # transformers reads a block as the weight over its grid (rows // grid rows): the grid must tile each
            # tensor exactly, in blocks of b0 x b1 or, where a dimension is smaller than a block, in one
            tiles = all(r % b0 == 0 or r < b0 for r in splits) and (cols % b1 == 0 or cols < b1) and \
                len({r // -(-r // b0) for r in splits}) == 1
            if not tiles:
                raise CheckpointError(
                    f"FP8 expert weight {p.name} (on-disk rows {splits}, {cols} columns) is not divided by the "
                    f"checkpoint's blocks {list(block)} (quantization_config.weight_block_size); blocks that do "
                    "not divide the weight are not read")
            stored.append(StoredTensor(p.name, p.name, "weight", p.shape, torch.float8_e4m3fn, as_stored=True))
            stored.append(StoredTensor(f"{p.name}_scale_inv", p.name, "scale_inv", (srows, scols), scale_dtype,
                                       rows_per_row=rows // srows, as_stored=True))
        self.stored = self.sources = tuple(stored)
        self.pairs = {t.param: (t.name, f"{t.name}_scale_inv") for t in stored if t.kind == "weight"}

    def dequantize_into(self, values: torch.Tensor, scales: torch.Tensor, out: torch.Tensor) -> None:
        dequantize(values, scales, self.dtype, out)

    def check_scales(self, key: str, scales: torch.Tensor) -> None:
        check_scales(key, scales)

    def describe(self) -> str:
        return (f"FP8 e4m3 in {self.block[0]}x{self.block[1]} blocks (expanded to "
                f"{str(self.dtype).removeprefix('torch.')} where computed)")


def scale_to_fp32(scales: torch.Tensor) -> torch.Tensor:
    """transformers' reading of a scale: E8M0 bytes as 2^(s - 127), any float as it is."""
    if scales.dtype == torch.uint8:
        return (scales.to(torch.float32) - 127.0).exp2()
    return scales.to(torch.float32)  # float8_e8m0fnu converts to 2^(s - 127) itself


def dequantize(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """values [n, R, C] float8, scales [n, R / b0, C / b1] -> [n, R, C] in `dtype` (transformers' formula),
    into `out` if given: compiled on the CPU (cpu_expand.py), torch's ops elsewhere."""
    from . import cpu_expand

    if cpu_expand.usable(values, scales, dtype=dtype):
        return cpu_expand.fp8(values, scales, dtype, out)
    result = dequantize_torch(values, scales, dtype)
    return result if out is None else out.copy_(result)


def dequantize_torch(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    n, rows, cols = values.shape
    srows, scols = scales.shape[-2:]
    q = values.to(torch.float32).reshape(n, srows, rows // srows, scols, cols // scols)
    s = scale_to_fp32(scales).reshape(n, srows, 1, scols, 1)
    return q.mul_(s).to(dtype).reshape(n, rows, cols)  # in place: one fp32 copy of the weight, not two


def dequantize_loop(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The plain-loop twin of `dequantize` for one expert ([R, C], [R / b0, C / b1]), element by element."""
    rows, cols = values.shape
    b0, b1 = rows // scales.shape[0], cols // scales.shape[1]
    scale = scale_to_fp32(scales)
    out = torch.empty(rows, cols, dtype=torch.float32)
    for r in range(rows):
        for c in range(cols):
            out[r, c] = float(values[r, c].to(torch.float32)) * float(scale[r // b0, c // b1])
    return out.to(dtype)


def check_grid(key: str, weight: tuple[int, ...], grid: tuple[int, ...], block: tuple[int, int]) -> None:
    """The scales of a weight [rows, cols] must be a grid of ceil(rows / b0) x ceil(cols / b1) blocks (the last
    of a dimension may be partial: DeepSeek-V3's kv_a_proj_with_mqa has 576 rows)."""
    ok = len(weight) == 2 and len(grid) == 2 and all(g == -(-n // b) for n, g, b in zip(weight, grid, block))
    if not ok:
        raise CheckpointError(
            f"{key} has a grid of {list(grid)} scales for a weight of {list(weight)} in blocks of {list(block)} "
            "(weight_block_size): not one scale a block; the file does not match its config")


def dequantize_blocks(values: torch.Tensor, scales: torch.Tensor, block: tuple[int, int],
                      dtype: torch.dtype) -> torch.Tensor:
    """A non-expert weight [R, C] with scales [ceil(R / b0), ceil(C / b1)], the last block of a dimension
    possibly partial: each weight times its block's scale, in fp32, rounded once to `dtype`. Where the blocks
    divide the weight these are the products transformers' dequantization computes; where they do not,
    transformers' CPU dequantization reads another block size (rows // grid rows) or refuses the weight, and
    this is the block-wise meaning its GPU kernels and DeepSeek's own `weight_dequant` give it."""
    rows, cols = values.shape
    s = scale_to_fp32(scales).repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (values.to(torch.float32) * s).to(dtype)


def check_scales(name: str, scales: torch.Tensor) -> None:
    """A NaN, infinite or negative scale would turn a whole block of weights into garbage: refuse it at load."""
    s = scale_to_fp32(scales.view(torch.uint8) if scales.dtype == E8M0 else scales)
    bad = ~torch.isfinite(s) | (s < 0)
    if bool(bad.any()):
        raise CheckpointError(f"{name} has {int(bad.sum())} NaN, infinite or negative scale(s) of "
                              f"{math.prod(s.shape)}; the file is damaged: re-download it")
