"""Tiny pre-quantized checkpoints in the two formats real MoE checkpoints ship, and transformers' own
dequantized reference for them.

- MXFP4 (gpt-oss): experts as `*_blocks` (uint8, two E2M1 codes a byte, low nibble first, 32 values a block
  along the input dim) and `*_scales` (uint8 E8M0, bias 127); everything else bf16.
- FP8 block (Qwen3-*-FP8, DeepSeek-V3): every nn.Linear weight except the router, embeddings and lm_head as
  float8_e4m3fn with a float32 `.weight_scale_inv` per [b0, b1] block (W ~= q * scale); the rest bf16
  (DeepSeek-V3's e_score_correction_bias fp32).

The quantizers live in benchmarks/checkpoint_formats.py (make_checkpoint.py --format writes with them).
transformers loads both on CPU by dequantizing (Mxfp4Config(dequantize=True) /
FineGrainedFP8Config(dequantize=True)); `load_dequantized_reference` returns that model in bf16 eval mode.

Caveat (FP8): transformers' Fp8Dequantize derives the block from the scale grid (rows // scale_rows), not
from `weight_block_size`. A block smaller than a weight dim that does not divide it gives a grid of
ceil(rows / b0) rows that transformers either rejects (rows % grid != 0) or silently reads with another block
(e.g. rows 24, block 16: grid 2, read as blocks of 12). So `save_fp8_checkpoint` refuses such blocks; a block
at least as large as a dim (e.g. the real [128, 128] on these tiny models) is one block over that dim.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

from benchmarks.checkpoint_formats import (FP4_VALUES, fp8_config, mxfp4_config, quantize_fp8_shard,
                                         quantize_mxfp4)
from tests import tiny_models

FP8_BLOCK = (8, 8)  # divides every weight of the tiny qwen3_moe / deepseek_v3 configs


def gpt_oss_mxfp4():
    """tiny_models.gpt_oss with intermediate_size 32, so both expert matrices have an input dim that is a
    multiple of the MXFP4 block of 32 (hidden 32 for gate_up, intermediate 32 for down)."""
    config = tiny_models.gpt_oss()
    config.intermediate_size = 32
    return config


def build_mxfp4_reference(seed=0):
    """The fp32 gpt-oss reference (tiny_models.build_reference("gpt_oss") weights tweaks) at MXFP4-able sizes."""
    return tiny_models.build_reference("gpt_oss", seed=seed, config=gpt_oss_mxfp4())


# ----------------------------------------------------------------------------------------------------- MXFP4


def dequantize_mxfp4(blocks, scales):
    """Inverse of quantize_mxfp4: [..., N, G, 16], [..., N, G] -> float32 [..., N, G*32]."""
    lut = torch.tensor(FP4_VALUES + tuple(-v for v in FP4_VALUES))
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 2 * blocks.shape[-1])
    values = lut[codes.long()] * torch.exp2(scales.float() - 127).unsqueeze(-1)
    return values.reshape(*scales.shape[:-1], -1)


def save_mxfp4_checkpoint(model, path, dtype=torch.bfloat16):
    """Write the gpt-oss `model` as gpt-oss ships: experts MXFP4, everything else `dtype`. Returns the path.

    Runtime gate_up_proj is [E, H, 2I] and down_proj [E, I, H] (input dim first); on disk they are stored
    output-major, [E, 2I, H/32, 16] and [E, H, I/32, 16], as transformers' dequantizer transposes back.
    """
    if model.config.model_type != "gpt_oss":
        raise ValueError(f"MXFP4 checkpoints are gpt-oss only, got {model.config.model_type}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            blocks, scales = quantize_mxfp4(tensor.transpose(-1, -2))
            tensors[name + "_blocks"] = blocks
            tensors[name + "_scales"] = scales
        else:
            tensors[name] = tensor.detach().to(dtype).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    config["quantization_config"] = mxfp4_config()
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


# ------------------------------------------------------------------------------------------------------ FP8


def dequantize_fp8_block(q, scale_inv):
    rows, cols = q.shape
    sr, sc = scale_inv.shape
    x = q.float().reshape(sr, rows // sr, sc, cols // sc) * scale_inv[:, None, :, None]
    return x.reshape(rows, cols)


def save_fp8_checkpoint(model, path, block=FP8_BLOCK):
    """Write `model` (per-expert original layout: qwen3_moe, deepseek_v3, ...) as block-FP8 checkpoints ship.

    Quantized: every `*_proj.weight` (attention, dense MLP, shared experts, each routed expert's
    gate/up/down) -> float8_e4m3fn + `.weight_scale_inv` float32 [rows/b0, cols/b1]. Kept: router
    `mlp.gate.weight` and embeddings / lm_head / norms in bf16, `e_score_correction_bias` in fp32.
    `block` must divide every quantized weight (see the module docstring). Returns the path.
    """
    path = Path(path)
    model.save_pretrained(path)  # the original (per-expert) key layout, via transformers' reverse conversion
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        raise RuntimeError(f"expected one safetensors file, got {files}")
    with safe_open(files[0], "pt") as f:
        original = {k: f.get_tensor(k) for k in f.keys()}
    tensors = quantize_fp8_shard(original, block)  # (a refused block raises before the bf16 file goes)
    files[0].unlink()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["dtype"] = "bfloat16"
    not_converted = ["lm_head", "model.embed_tokens"] + sorted(
        {k.removesuffix(".weight") for k in tensors if k.endswith("mlp.gate.weight")},
        key=lambda n: (len(n), n),
    )
    config["quantization_config"] = fp8_config(not_converted, block)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


# ------------------------------------------------------------------------------------------------ reference


def quant_method(path):
    return json.loads((Path(path) / "config.json").read_text())["quantization_config"]["quant_method"]


def load_dequantized_reference(path, dtype=torch.bfloat16):
    """transformers' own model for a checkpoint written above, dequantized on load (CPU) to `dtype`, eval."""
    method = quant_method(path)
    if method == "mxfp4":
        qconfig = Mxfp4Config(dequantize=True)
    elif method == "fp8":
        qconfig = FineGrainedFP8Config(dequantize=True)
    else:
        raise ValueError(f"unknown quant_method {method!r}")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=qconfig, dtype=dtype)
    return model.eval()


def expected_dequantized_experts(path):
    """What transformers' dequantized reference holds in its experts modules, computed from the files alone:
    runtime parameter name -> bf16 tensor.

    gpt-oss: `...mlp.experts.gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H] (dequantized, transposed).
    Per-expert FP8: the fused runtime `...mlp.experts.gate_up_proj` [E, 2I, H] (gate rows then up rows) and
    `down_proj` [E, H, I].
    """
    path = Path(path)
    with safe_open(path / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    if quant_method(path) == "mxfp4":
        for key in tensors:
            if key.endswith("_blocks"):
                name = key.removesuffix("_blocks")
                w = dequantize_mxfp4(tensors[key], tensors[name + "_scales"])
                out[name] = w.transpose(-1, -2).to(torch.bfloat16)
        return out
    experts = {}
    for key in tensors:
        if ".mlp.experts." in key and key.endswith(".weight"):
            prefix, rest = key.split(".mlp.experts.")
            index, proj, _ = rest.split(".")
            w = dequantize_fp8_block(tensors[key], tensors[key + "_scale_inv"]) if key + "_scale_inv" in tensors \
                else tensors[key].float()
            experts.setdefault(prefix, {}).setdefault(proj, {})[int(index)] = w
    for prefix, projs in experts.items():
        stack = {p: torch.stack([v[e] for e in sorted(v)]) for p, v in projs.items()}
        gate_up = torch.cat([stack["gate_proj"], stack["up_proj"]], 1)
        out[f"{prefix}.mlp.experts.gate_up_proj"] = gate_up.to(torch.bfloat16)
        out[f"{prefix}.mlp.experts.down_proj"] = stack["down_proj"].to(torch.bfloat16)
    return out


def relative_error(approx, exact):
    approx, exact = approx.float(), exact.float()
    return ((approx - exact).norm() / exact.norm()).item()
