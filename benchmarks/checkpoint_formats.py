"""The two pre-quantized formats real MoE checkpoints ship, as make_checkpoint.py writes them shard by shard
(tests/quantized_checkpoints.py writes its tiny checkpoints with the same quantizers).

- MXFP4 (gpt-oss): experts as `*_blocks` (uint8, two E2M1 codes a byte, low nibble first, 32 values a block
  along the input dim) and `*_scales` (uint8 E8M0, bias 127); everything else bf16.
- FP8 block (Qwen3-*-FP8, DeepSeek-V3): every linear weight except the router, embeddings and lm_head as
  float8_e4m3fn with a float32 `.weight_scale_inv` per [b0, b1] block (W ~= q * scale_inv); the rest bf16.

transformers derives an FP8 block from the scale grid (rows // grid rows), not from `weight_block_size`: a
block smaller than a weight dim that does not divide it is read wrong or refused, so it is refused here too.
"""

from __future__ import annotations

import torch

MXFP4_BLOCK = 32
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # E2M1 magnitudes; code | 8 is the negative
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
FP8_BLOCK = (128, 128)  # the real releases' weight_block_size
MXFP4_NOT_CONVERTED = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
MXFP4_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
QUANTIZE_ROWS = 4096  # rows quantized at a time: bounds the fp32 temporaries of a large expert tensor


def quantize_mxfp4(weight):
    """[..., N, K] float -> (blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32]).

    OCP MX rule: shared exponent floor(log2(absmax)) - 2 (E2M1's largest power is 2^2), values divided by
    2^exp, saturated to 6 and rounded to the nearest E2M1 magnitude (ties to the smaller); all-zero blocks get
    exponent -127.

    >>> blocks, scales = quantize_mxfp4(torch.tensor([[1.0, -0.5] + [0.0] * 30]))
    >>> blocks.shape, scales.tolist(), hex(blocks[0, 0, 0].item())
    (torch.Size([1, 1, 16]), [[125]], '0xc6')
    """
    *prefix, n, k = weight.shape
    if k % MXFP4_BLOCK:
        raise ValueError(f"input dim {k} is not a multiple of {MXFP4_BLOCK}")
    rows = weight.detach().reshape(-1, k)
    blocks = torch.empty(rows.shape[0], k // 2, dtype=torch.uint8)
    scales = torch.empty(rows.shape[0], k // MXFP4_BLOCK, dtype=torch.uint8)
    mids = torch.tensor([(a + b) / 2 for a, b in zip(FP4_VALUES, FP4_VALUES[1:])])
    for start in range(0, rows.shape[0], QUANTIZE_ROWS):
        x = rows[start:start + QUANTIZE_ROWS].float().reshape(-1, k // MXFP4_BLOCK, MXFP4_BLOCK)
        absmax = x.abs().amax(-1, keepdim=True)
        exp = torch.where(absmax > 0, torch.floor(torch.log2(absmax.clamp_min(1e-38))) - 2,
                          torch.full_like(absmax, -127)).clamp(-127, 127)
        scaled = (x / torch.exp2(exp)).clamp(-6.0, 6.0)
        code = torch.bucketize(scaled.abs(), mids).to(torch.uint8)  # the nearest magnitude; a tie: the smaller
        code |= (scaled < 0).to(torch.uint8) << 3
        blocks[start:start + QUANTIZE_ROWS] = (code[..., 0::2] | (code[..., 1::2] << 4)).reshape(-1, k // 2)
        scales[start:start + QUANTIZE_ROWS] = (exp.squeeze(-1) + 127).to(torch.uint8)
    return blocks.reshape(*prefix, n, k // MXFP4_BLOCK, 16), scales.reshape(*prefix, n, k // MXFP4_BLOCK)


def fp8_block_misfit(shape, block=FP8_BLOCK) -> bool:
    """Whether a [rows, cols] weight has a dim larger than the block that the block does not divide."""
    return any(dim > b and dim % b for dim, b in zip(shape, block))


def quantize_fp8_block(weight, block=FP8_BLOCK):
    """[R, C] float -> (float8_e4m3fn [R, C], float32 scale_inv [ceil(R/b0), ceil(C/b1)]) with W ~= q * scale_inv,
    scale_inv = block absmax / 448 (1 for all-zero blocks).

    A block larger than a dim is one block over the whole dim (grid 1), which transformers reads right; a
    block smaller than a dim must divide it (transformers derives the block as dim // grid).

    >>> q, s = quantize_fp8_block(torch.full((256, 64), 0.5))
    >>> q.dtype, tuple(s.shape), round(float(q[0, 0].float() * s[0, 0]), 4)
    (torch.float8_e4m3fn, (2, 1), 0.5)
    """
    rows, cols = weight.shape
    if fp8_block_misfit((rows, cols), block):
        raise ValueError(f"block {tuple(block)} does not divide weight shape {(rows, cols)}")
    b0, b1 = min(block[0], rows), min(block[1], cols)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(rows // b0, cols // b1, dtype=torch.float32)
    step = max(b0, QUANTIZE_ROWS // b0 * b0)
    for start in range(0, rows, step):
        x = weight[start:start + step].detach().float()
        x = x.reshape(x.shape[0] // b0, b0, cols // b1, b1)
        s = x.abs().amax(dim=(1, 3)) / FP8_MAX
        s = torch.where(s > 0, s, torch.ones_like(s))
        q[start:start + step] = (x / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn) \
            .reshape(-1, cols)
        scale[start // b0:(start + x.shape[0] * b0) // b0] = s
    return q, scale


def is_fp8_target(key: str, shape) -> bool:
    """Whether an on-disk (per-expert layout) tensor is one the FP8 releases quantize: every linear weight
    (attention, dense MLP, shared and routed experts; Mixtral's w1/w2/w3) but the router, embeddings, lm_head."""
    if not key.endswith(".weight") or len(shape) != 2:
        return False
    module = key.removesuffix(".weight")
    leaf = module.rsplit(".", 1)[-1]
    if module.endswith(("mlp.gate", "block_sparse_moe.gate", "lm_head", "embed_tokens")) or "norm" in leaf:
        return False
    return leaf.endswith(("_proj", "_proj_with_mqa")) or leaf in ("w1", "w2", "w3")


def quantize_fp8_shard(tensors: dict, block=FP8_BLOCK) -> dict:
    """One shard's tensors (per-expert names) as an FP8 release stores them: targets -> float8 + scale_inv,
    e_score_correction_bias fp32, the rest bf16."""
    out = {}
    for key, t in tensors.items():
        if is_fp8_target(key, t.shape):
            out[key], out[key + "_scale_inv"] = quantize_fp8_block(t, block)
        elif key.endswith("e_score_correction_bias"):
            out[key] = t.float().contiguous()
        else:
            out[key] = t.to(torch.bfloat16).contiguous()
    return out


def quantize_mxfp4_shard(tensors: dict) -> dict:
    """One gpt-oss shard (runtime names) as gpt-oss ships: experts' [E, H, 2I] / [E, I, H] stored output-major
    as blocks [E, 2I, H/32, 16] / [E, H, I/32, 16] and scales, everything else bf16."""
    out = {}
    for key, t in tensors.items():
        if key.endswith(MXFP4_EXPERTS):
            out[key + "_blocks"], out[key + "_scales"] = quantize_mxfp4(t.transpose(-1, -2))
        else:
            out[key] = t.to(torch.bfloat16).contiguous()
    return out


def fp8_config(modules_to_not_convert: list[str], block=FP8_BLOCK) -> dict:
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block),
            "modules_to_not_convert": modules_to_not_convert}


def mxfp4_config() -> dict:
    return {"quant_method": "mxfp4", "modules_to_not_convert": list(MXFP4_NOT_CONVERTED)}
