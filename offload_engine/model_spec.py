"""What the checkpoint is: the architecture, its MoE layers and the per-expert tensor shapes.

The model is built by transformers itself on the meta device (no memory), and the spec is read off that
module tree: every experts module that transformers routes through its experts interface is an MoE layer.
This keeps the engine architecture-agnostic: no table of model classes to maintain.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError

TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_k", "num_experts_per_token", "top_k", "experts_per_token")
QUANTIZED_MARKERS = ("quantization_config", "compression_config")
LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


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


def refuse_quantized(raw_config: dict) -> None:
    for key in QUANTIZED_MARKERS:
        if raw_config.get(key):
            method = raw_config[key].get("quant_method", "unknown") if isinstance(raw_config[key], dict) else "unknown"
            raise UnsupportedModelError(
                f"model type {raw_config.get('model_type')!r} is quantized ({key}.quant_method={method!r}); "
                "the engine serves unquantized (bf16/fp16/fp32) checkpoints only"
            )


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
    return ModelSpec(
        model_type=config.model_type,
        architecture=type(model).__name__,
        num_layers=int(getattr(text, "num_hidden_layers", len(experts))),
        moe_layers=tuple(moe_layers),
        experts_paths=tuple(name for name, _ in experts),
        num_experts=int(num_experts),
        top_k=find_top_k(text),
        expert_params=expert_params,
        vocab_size=int(text.vocab_size),
        max_position_embeddings=int(getattr(text, "max_position_embeddings", 0) or 0),
        hidden_size=int(text.hidden_size),
    )


def dtype_from_config(config, default: torch.dtype = torch.float32) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else default
