"""The experts forward that transformers calls for every MoE layer, served from the expert cache.

transformers applies the model's own routing (softmax/sigmoid, grouped top-k, renormalisation, scaling) and
hands us `(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`; we compute exactly what its
eager experts loop computes, with each expert's weights taken from a cache slot instead of the module's
fused parameters. The module's own `_apply_gate`, `act_fn` and flags keep every architecture's expert MLP
(gpt-oss's clamped, interleaved gate included) identical to the reference.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .expert_cache import ExpertCache

IMPLEMENTATION_NAME = "offload_engine"


@dataclass
class RoutingRecorder:
    """Collects each MoE layer call's routing while attached (for traces)."""

    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def record(self, layer_pos: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        self.calls.append((layer_pos, top_k_index.detach().to("cpu", torch.int16),
                           top_k_weights.detach().to("cpu", torch.float32)))


@dataclass
class ExpertsBinding:
    """What one experts module needs at run time: its MoE layer position, the cache, an optional recorder."""

    layer_pos: int
    cache: ExpertCache
    recorder: RoutingRecorder | None = None


def register_experts_implementation() -> None:
    """The one place the engine touches transformers' registry of experts implementations."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION_NAME, offloaded_experts_forward)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    if transposed:  # weight is [in, out] (gpt-oss)
        y = x @ weight
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


def expert_mlp(module, x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """One expert's MLP on tokens x [t, H], with weights w in transformers' per-expert runtime format."""
    transposed = module.is_transposed
    if module.has_gate:
        h = module._apply_gate(_linear(x, w["gate_up_proj"], w.get("gate_up_proj_bias"), transposed))
    else:
        h = module.act_fn(_linear(x, w["up_proj"], w.get("up_proj_bias"), transposed))
    y = _linear(h, w["down_proj"], w.get("down_proj_bias"), transposed)
    if module.has_post_expert_norm:
        y = module.post_expert_norm(y)
    return y


def offloaded_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    # T=tokens, k=active experts per token, H=hidden; S=cache slots
    binding: ExpertsBinding = self._offload
    cache = binding.cache
    if binding.recorder is not None:
        binding.recorder.record(binding.layer_pos, top_k_index, top_k_weights)
    out = torch.zeros_like(hidden_states)
    if hidden_states.shape[0] == 1:  # decode: no gathers, k small matmuls on the single token
        ranked = top_k_index[0].tolist()
        order = sorted(range(len(ranked)), key=ranked.__getitem__)  # ascending id, like the eager loop
        slots = cache.fetch(binding.layer_pos, [ranked[j] for j in order])
        for j, slot in zip(order, slots):
            y = expert_mlp(self, hidden_states, cache.slot_tensors(slot))
            out += (y * top_k_weights[0, j]).to(out.dtype)
        return out
    experts = top_k_index.unique().tolist()  # ascending
    for start in range(0, len(experts), cache.num_slots):  # more experts than slots: a group at a time
        group = experts[start:start + cache.num_slots]
        for e, slot in zip(group, cache.fetch(binding.layer_pos, group)):
            token_idx, rank = torch.where(top_k_index == e)
            y = expert_mlp(self, hidden_states[token_idx], cache.slot_tensors(slot))
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, rank, None]).to(out.dtype))
    return out
