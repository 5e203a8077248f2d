"""Compiled expansion of FP8 and MXFP4 experts on the CPU: one pass over the stored bytes, no temporaries.

torch's own ops take several passes on the CPU (FP8 to fp32 is not vectorized there: ~4 ns a weight, so a
Qwen3-30B-A3B-shaped FP8 model decoded at 1.6 tokens/s against bf16's 21). These loops compute the same
numbers: FP8 through a table of its 256 values (each exactly representable in fp32, as torch's conversion
gives them), times the block's fp32 scale in fp32, rounded to bf16 to nearest even (torch's rounding); MXFP4
through the E2M1 table times 2^(scale - 127), exact in bf16 as transformers' lut-and-ldexp is. The twins and
transformers' own functions check them in tests/test_quantized_experts.py.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from .mxfp4 import E2M1_VALUES

# fp32 value of each float8_e4m3fn byte, as torch converts it
FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).numpy()
MXFP4_VALUES = np.array(E2M1_VALUES, dtype=np.float32)
# 2^(s - 127) for each E8M0 byte (255, its NaN, is refused at load)
E8M0_VALUES = np.ldexp(np.float32(1), np.arange(255) - 127).astype(np.float32).tolist() + [float("nan")]
E8M0_VALUES = np.array(E8M0_VALUES, dtype=np.float32)
KINDS = (torch.bfloat16, torch.float32)  # compute dtypes these loops write
TILE = 128  # rows of an MXFP4 weight transposed at a time


def usable(*tensors: torch.Tensor, dtype: torch.dtype) -> bool:
    return dtype in KINDS and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


@numba.njit(inline="always")
def _store(values: np.ndarray, out, to_bf16: bool) -> None:
    """fp32 values into `out`: as they are (their bits), or as bf16 bit patterns rounded to nearest even, NaN
    to a quiet NaN (c10's rounding)."""
    bits = values.view(np.uint32)
    if not to_bf16:
        out[:] = bits
        return
    for i in range(bits.shape[0]):
        b = bits[i]
        rounded = (b + (((b >> 16) & 1) + 0x7FFF)) >> 16
        out[i] = 0x7FC0 if (b & 0x7FFFFFFF) > 0x7F800000 else rounded


@numba.njit(parallel=True, nogil=True, cache=False)
def _fp8(values, scales, table, out_bits, to_bf16):
    """values [n, R, C] uint8, scales [n, SR, SC] fp32 -> out [n, R, C] (bf16 bits as uint16, or fp32 bits as
    uint32 when not to_bf16)."""
    n, rows, cols = values.shape
    bm, bn = rows // scales.shape[1], cols // scales.shape[2]
    for e in range(n):
        for r in numba.prange(rows):
            row = np.empty(cols, dtype=np.float32)
            codes = values[e, r]
            for cb in range(scales.shape[2]):
                scale = scales[e, r // bm, cb]
                for c in range(cb * bn, (cb + 1) * bn):
                    row[c] = table[codes[c]] * scale
            _store(row, out_bits[e, r], to_bf16)


@numba.njit(parallel=True, nogil=True, cache=False)
def _mxfp4(blocks, scales, table, pow2, out_bits, to_bf16):
    """blocks [n, R, G, 16] uint8, scales [n, R, G] uint8 -> out [n, G * 32, R] (transposed, as transformers
    gives it): code value times 2^(scale - 127), exact. Transposed through [32, TILE] tiles that stay in L1."""
    n, rows, groups, half = blocks.shape
    tiles = (rows + TILE - 1) // TILE
    for e in range(n):
        for task in numba.prange(groups * tiles):
            g, r0 = task // tiles, (task % tiles) * TILE
            r1 = min(rows, r0 + TILE)
            tile = np.empty((2 * half, r1 - r0), dtype=np.float32)
            for r in range(r0, r1):
                scale = pow2[scales[e, r, g]]
                for b in range(half):
                    byte = blocks[e, r, g, b]
                    tile[2 * b, r - r0] = table[byte & 0x0F] * scale
                    tile[2 * b + 1, r - r0] = table[byte >> 4] * scale
            for j in range(2 * half):
                _store(tile[j], out_bits[e, g * 2 * half + j, r0:r1], to_bf16)


def _run(kernel, args, shape, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is None or not out.is_contiguous():
        result = _run(kernel, args, shape, dtype, torch.empty(shape, dtype=dtype))
        return result if out is None else out.copy_(result)
    bits = out.view(torch.int16 if dtype == torch.bfloat16 else torch.int32).numpy()
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    kernel(*args, bits.view(np.uint16 if dtype == torch.bfloat16 else np.uint32), dtype == torch.bfloat16)
    return out


def fp8(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    from .fp8_block import scale_to_fp32

    s = scale_to_fp32(scales).contiguous().numpy()
    return _run(_fp8, (values.view(torch.uint8).numpy(), s, FP8_VALUES), values.shape, dtype, out)


def mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype,
          out: torch.Tensor | None = None) -> torch.Tensor:
    n, rows, groups, half = blocks.shape
    return _run(_mxfp4, (blocks.numpy(), scales.numpy(), MXFP4_VALUES, E8M0_VALUES), (n, groups * half * 2, rows),
                dtype, out)
