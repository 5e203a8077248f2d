"""What a checkpoint's config.json says about quantization: the formats the engine reads (gpt-oss's MXFP4,
FP8 in blocks), or one line naming a format it does not (GPTQ, AWQ, bitsandbytes, compressed-tensors...)."""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError, UnsupportedModelError, short_repr

READ = ("mxfp4", "fp8")
NAMES = {
    "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed-tensors",
    "gguf": "GGUF", "hqq": "HQQ", "torchao": "torchao", "quanto": "quanto", "aqlm": "AQLM", "eetq": "EETQ",
    "fbgemm_fp8": "FBGEMM FP8", "exl2": "EXL2", "nvfp4": "NVFP4", "auto-round": "AutoRound",
}
WHAT_WE_READ = ("the engine reads gpt-oss's MXFP4 and block-scaled FP8 (Qwen3-*-FP8, DeepSeek-V3) checkpoints, and "
                "unquantized ones (which --expert-dtype int8|int4 quantizes at load)")


def read_quantization(raw: dict, path: Path) -> dict | None:
    """None for an unquantized checkpoint; else the config's quantization_config, checked: quant_method one the
    engine reads, and for FP8 an e4m3 format with a two-number block size."""
    for key in ("compression_config",):
        if raw.get(key):
            raise UnsupportedModelError(f"{path}: the checkpoint is quantized with compressed-tensors ({key}); "
                                        f"{WHAT_WE_READ}")
    q = raw.get("quantization_config")
    if not q:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{path}: quantization_config = {short_repr(q)} is not an object; fix config.json")
    method = q.get("quant_method")
    if not isinstance(method, str) or method not in READ:
        if method is None and (q.get("load_in_4bit") or q.get("load_in_8bit")):
            method = "bitsandbytes"
        name = NAMES.get(method, repr(method)) if isinstance(method, str) else short_repr(method)
        raise UnsupportedModelError(f"model type {raw.get('model_type')!r} is quantized with {name} "
                                    f"(quantization_config.quant_method = {short_repr(method)}); {WHAT_WE_READ}")
    if method == "fp8":
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise UnsupportedModelError(f"{path}: FP8 format {short_repr(fmt)} (quantization_config.fmt); the engine "
                                        "reads float8_e4m3fn weights with block scales")
        block = q.get("weight_block_size")
        if block is None:
            raise UnsupportedModelError(f"{path}: FP8 without weight_block_size (one scale per tensor or channel); "
                                        "the engine reads block-scaled FP8 (Qwen3-*-FP8, DeepSeek-V3)")
        if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and 1 <= b <= 2**20 for b in block)):
            raise CheckpointError(f"{path}: quantization_config.weight_block_size = {short_repr(block)} must be two "
                                  "whole numbers, such as [128, 128]; fix config.json")
    return q
