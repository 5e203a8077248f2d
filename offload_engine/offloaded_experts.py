"""The experts forward that transformers calls for every MoE layer, served from the expert cache.

transformers applies the model's own routing (softmax/sigmoid, grouped top-k, renormalisation, scaling) and
hands us `(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`. We make the call's experts
resident, map expert ids to slot ids and run transformers' own experts function (the one the reference model
uses) on the slot pool: same kernel, same reduction, so bf16 output is bit for bit the reference's. Only when
a call needs more experts than there are slots is it served a group at a time, each expert through that same
function on its own tokens (the module's own `_apply_gate`, `act_fn` and flags keep gpt-oss's clamped,
interleaved gate right too).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .expert_cache import ExpertCache

IMPLEMENTATION_NAME = "offload_engine"
SMALL_CALL = 64  # routed (token, expert) pairs up to which the needed experts are found in Python
MAX_SPANS = 256


@dataclass
class RoutingRecorder:
    """Collects each MoE layer call's routing while attached (for traces)."""

    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def record(self, layer_pos: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        self.calls.append((layer_pos, top_k_index.detach().to("cpu", torch.int16),
                           top_k_weights.detach().to("cpu", torch.float32)))


class SlotExperts:
    """An experts module seen through the cache: its own flags, gate and activation, with (a span of) the slot
    pool [S, ...] as its weights, so transformers' experts functions run unchanged on resident experts."""

    # read on every call by transformers' experts functions: copied once, since nn.Module's attribute lookup
    # through __getattr__ cost about 30 us per call
    COPIED = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm", "act_fn",
              "_apply_gate", "post_expert_norm")

    def __init__(self, module, pool: dict[str, torch.Tensor]):
        self._module = module
        for name in self.COPIED:
            if hasattr(module, name):
                setattr(self, name, getattr(module, name))
        self.num_experts = next(iter(pool.values())).shape[0]
        self._is_expert_parallel = False
        for name, tensor in pool.items():
            setattr(self, name, tensor)

    def __getattr__(self, name):  # flags, act_fn, _apply_gate, post_expert_norm...: the real module's
        return getattr(self._module, name)


@dataclass
class ExpertsBinding:
    """What one experts module needs at run time: its MoE layer position, the cache, transformers' experts
    function the reference model would use (grouped_mm by default), and an optional recorder."""

    layer_pos: int
    cache: ExpertCache
    module: object  # the transformers experts module
    compute: Callable
    recorder: RoutingRecorder | None = None
    spans: dict[tuple[int, int], SlotExperts] = field(default_factory=dict)  # by (first slot, end): reused

    def span(self, lo: int, hi: int) -> SlotExperts:
        view = self.spans.get((lo, hi))
        if view is None:
            if len(self.spans) >= MAX_SPANS:  # scattered slots give many spans: keep the memo small
                self.spans.clear()
            pool = self.cache.pool
            view = self.spans[lo, hi] = SlotExperts(self.module, {name: t[lo:hi] for name, t in pool.items()})
        return view


def bind(module, layer_pos: int, cache: ExpertCache, implementation: str) -> ExpertsBinding:
    """implementation: the experts implementation transformers picks for the reference model."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if implementation == "eager":
        compute = type(module).forward.__wrapped__  # the class's own loop, under the decorator
    else:
        compute = ALL_EXPERTS_FUNCTIONS[implementation]
    return ExpertsBinding(layer_pos, cache, module, compute)


def register_experts_implementation() -> None:
    """The one place the engine touches transformers' registry of experts implementations."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION_NAME, offloaded_experts_forward)


def offloaded_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    # T=tokens, k=active experts per token, H=hidden; S=cache slots
    binding: ExpertsBinding = self._offload
    cache = binding.cache
    if binding.recorder is not None:
        binding.recorder.record(binding.layer_pos, top_k_index, top_k_weights)
    # the experts this call needs, ascending; on CUDA the one sync a layer needs. Few ids (decode): in Python,
    # cheaper than torch.unique's dispatch
    if top_k_index.numel() <= SMALL_CALL:
        experts = sorted(set(top_k_index.view(-1).tolist()))
    else:
        experts = top_k_index.unique().tolist()
    if len(experts) <= cache.num_slots:
        # the common case: all of this call's experts resident at once, then transformers' own kernel and
        # reduction over the slot pool, bit for bit what the reference computes over its [E, ...] tensors
        slots = cache.fetch(binding.layer_pos, experts)
        # only the span of slots in use: grouped_mm's cost grows with the number of groups it is handed
        lo, hi = min(slots), max(slots) + 1
        slot_index = cache.slot_table[binding.layer_pos][top_k_index]
        if lo:
            slot_index = slot_index - lo
        return binding.compute(binding.span(lo, hi), hidden_states, slot_index, top_k_weights)
    # more experts than slots: a group at a time, each expert on its own tokens through the same function
    out = torch.zeros_like(hidden_states)
    for start in range(0, len(experts), cache.num_slots):
        group = experts[start:start + cache.num_slots]
        for e, slot in zip(group, cache.fetch(binding.layer_pos, group)):
            token_idx, rank = torch.where(top_k_index == e)
            weights = top_k_weights[token_idx, rank, None]  # [t, 1]: each token routed to this one expert
            y = binding.compute(binding.span(slot, slot + 1), hidden_states[token_idx],
                                torch.zeros_like(weights, dtype=top_k_index.dtype), weights)
            out.index_add_(0, token_idx, y.to(out.dtype))
    return out
