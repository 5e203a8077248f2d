"""What the checkpoint is: the architecture, its MoE layers and the per-expert tensor shapes.

The model is built by transformers itself on the meta device (no memory), and the spec is read off that
module tree: every experts module that transformers routes through its experts interface is an MoE layer.
This keeps the engine architecture-agnostic: no table of model classes to maintain.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, UnsupportedModelError, short_repr

TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "top_k", "experts_per_token")
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
# Sizes the memory plan and transformers' modules are built from: whole numbers >= 1 (or null) where present.
SIZE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "max_position_embeddings",
    "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", *TOP_K_KEYS, "kv_lora_rank",
    "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group",
)
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
MAX_SIZE = 2**31 - 1  # a product of two sizes must still fit the int64 of a tensor shape
MAX_INT = 2**63 - 1  # any integer at all must fit the int64 transformers and torch store it in


@dataclass(frozen=True)
class ExpertParam:
    """One tensor of one expert in transformers' runtime format, e.g. gate_up_proj (2I, H)."""

    name: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    architecture: str
    num_layers: int
    moe_layers: tuple[int, ...]  # the model's layer index of each MoE layer
    experts_paths: tuple[str, ...]  # runtime module path of each MoE layer's experts, e.g. model.layers.3.mlp.experts
    num_experts: int
    top_k: int
    expert_params: tuple[ExpertParam, ...]
    vocab_size: int
    max_position_embeddings: int
    hidden_size: int

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def total_experts(self) -> int:
        return self.num_moe_layers * self.num_experts

    def expert_numel(self) -> int:
        return sum(math.prod(p.shape) for p in self.expert_params)


def check_config(raw: dict, path: Path) -> None:
    """CheckpointError (one line, naming the field) unless every field the engine and transformers build the
    model from has the right type and range: a negative max_position_embeddings would plan a negative KV
    cache, a vocab_size of 1e30 overflows a tensor shape."""
    for where, value in _numbers(raw, ""):
        if isinstance(value, float) and not math.isfinite(value):
            raise CheckpointError(f"{path}: {where} = {value} is not a finite number (too large for a float?); "
                                  "restore config.json from the original checkpoint")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise CheckpointError(f"{path}: {where} is too large for a 64-bit integer; "
                                  "restore config.json from the original checkpoint")
    if "model_type" in raw and not isinstance(raw["model_type"], str):
        raise CheckpointError(f"{path}: model_type = {short_repr(raw['model_type'])} is not a string; fix config.json")
    sections = [("", raw)] + [(f"{k}.", v) for k, v in raw.items() if k.endswith("_config") and isinstance(v, dict)]
    for prefix, section in sections:
        for key in SIZE_FIELDS:
            value = section.get(key)
            if value is not None and not (_is_int(value) and 1 <= value <= MAX_SIZE):
                raise CheckpointError(f"{path}: {prefix}{key} = {short_repr(value)} must be a whole number from 1 to "
                                      f"{MAX_SIZE}; fix config.json")
        for key in TOKEN_ID_FIELDS:
            value = section.get(key)
            ids = value if isinstance(value, list) else [value]
            if value is not None and not all(_is_int(i) and abs(i) <= MAX_SIZE for i in ids):
                raise CheckpointError(f"{path}: {prefix}{key} = {short_repr(value)} must be a token id or a list "
                                      "of them; fix config.json")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(value, where: str):
    """(dotted path, number) of every number in a parsed JSON value, without recursion."""
    stack = [(where, value)]
    while stack:
        where, node = stack.pop()
        if isinstance(node, dict):
            # a key with a newline or another control character is named escaped: the error stays one line
            keys = ((k if k.isprintable() else repr(k), v) for k, v in node.items())
            stack.extend((f"{where}.{k}" if where else k, v) for k, v in keys)
        elif isinstance(node, list):
            stack.extend((f"{where}[{i}]", v) for i, v in enumerate(node))
        elif isinstance(node, (int, float)):
            yield where, node


def is_experts_module(module: nn.Module) -> bool:
    """Modules decorated with transformers' @use_experts_implementation carry these attributes."""
    return hasattr(module, "is_concatenated") and hasattr(module, "_is_expert_parallel")


def find_top_k(config) -> int:
    for key in TOP_K_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UnsupportedModelError(
        f"model type {config.model_type!r}: cannot tell how many experts each token uses (none of {TOP_K_KEYS} "
        "in config.json)"
    )


def describe(model: nn.Module, config) -> ModelSpec:
    """Read the MoE structure off a (meta) transformers model."""
    experts = [(name, m) for name, m in model.named_modules() if is_experts_module(m)]
    if not experts:
        raise UnsupportedModelError(
            f"model type {config.model_type!r} has no MoE layers served through transformers' experts interface "
            "(a dense model, or an MoE class without @use_experts_implementation); run it with transformers directly"
        )
    first = experts[0][1]
    params = [(n, p) for n, p in first.named_parameters(recurse=False)]
    num_experts = params[0][1].shape[0]
    expert_params = tuple(ExpertParam(n, tuple(p.shape[1:])) for n, p in params)
    for name, m in experts:
        shapes = tuple(ExpertParam(n, tuple(p.shape[1:])) for n, p in m.named_parameters(recurse=False))
        if shapes != expert_params or any(p.shape[0] != num_experts for p in m.parameters(recurse=False)):
            raise UnsupportedModelError(
                f"model type {config.model_type!r}: MoE layers differ in expert shapes ({name}); not supported yet"
            )
    moe_layers = []
    for name, _ in experts:
        match = LAYER_INDEX.search(f".{name}.")
        if match is None:
            raise UnsupportedModelError(f"model type {config.model_type!r}: cannot find the layer index of {name}")
        moe_layers.append(int(match.group(1)))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    top_k = find_top_k(text)
    if top_k > num_experts:  # the router's own count, off the built experts module, whatever config.json calls it
        raise CheckpointError(
            f"model type {config.model_type!r}: config.json routes each token to {top_k} experts, but its MoE "
            f"layers have only {num_experts}; fix num_experts_per_tok (or the expert count) in config.json"
        )
    sizes = {"vocab_size": getattr(text, "vocab_size", None), "hidden_size": getattr(text, "hidden_size", None),
             "max_position_embeddings": getattr(text, "max_position_embeddings", None) or 0}  # 0: no stated limit
    for key, value in sizes.items():
        if not _is_int(value) or value < 0 or (value == 0 and key != "max_position_embeddings"):
            raise CheckpointError(f"model type {config.model_type!r}: {key} = {short_repr(value)} is not a "
                                  "positive whole number; fix config.json")
    return ModelSpec(
        model_type=config.model_type,
        architecture=type(model).__name__,
        num_layers=int(getattr(text, "num_hidden_layers", len(experts))),
        moe_layers=tuple(moe_layers),
        experts_paths=tuple(name for name, _ in experts),
        num_experts=int(num_experts),
        top_k=top_k,
        expert_params=expert_params,
        vocab_size=sizes["vocab_size"],
        max_position_embeddings=sizes["max_position_embeddings"],
        hidden_size=sizes["hidden_size"],
    )


def dtype_from_config(config, default: torch.dtype = torch.float32) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else default
