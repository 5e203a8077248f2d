"""The experts forward that transformers calls for every MoE layer, served from the expert cache.

transformers applies the model's own routing (softmax/sigmoid, grouped top-k, renormalisation, scaling) and
hands us `(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`. A call runs in four steps:

    plan     which experts the call needs (ascending ids), in one group or, with fewer slots, several;
    stage    make them resident (expert_cache.fetch: hits, demand loads, waits for prefetches), then let the
             predictor see the routing and start loading what the next layers are predicted to need;
    execute  transformers' own experts function (the one the reference model uses) over the slot pool;
    reduce   once, as the reference does: with one group the function itself reduces; with several, each
             expert runs with unit weights and the weighted [T, k, H] contributions are summed at the end.

Same kernel and same reduction as the reference, so bf16 output is bit for bit the reference's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .expert_cache import ExpertCache

IMPLEMENTATION_NAME = "offload_engine"
SMALL_CALL = 64  # routed (token, expert) pairs up to which the needed experts are found in Python
MAX_SPANS = 256


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
    """What one experts module needs at run time: its MoE layer position, the engine's runtime, and
    transformers' experts function the reference model would use (grouped_mm by default)."""

    layer_pos: int
    runtime: object  # runtime.Runtime
    module: object  # the transformers experts module
    compute: Callable
    implementation: str
    spans: dict[tuple[int, int], SlotExperts] = field(default_factory=dict)  # by (first slot, end): reused

    def span(self, cache: ExpertCache, lo: int, hi: int) -> SlotExperts:
        view = self.spans.get((lo, hi))
        if view is None:
            if len(self.spans) >= MAX_SPANS:  # scattered slots give many spans: keep the memo small
                self.spans.clear()
            view = self.spans[lo, hi] = SlotExperts(self.module, {name: t[lo:hi] for name, t in cache.pool.items()})
        return view


def bind(module, layer_pos: int, runtime, implementation: str) -> ExpertsBinding:
    """implementation: the experts implementation transformers picks for the reference model."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if implementation == "eager":
        compute = type(module).forward.__wrapped__  # the class's own loop, under the decorator
    else:
        compute = ALL_EXPERTS_FUNCTIONS[implementation]
    return ExpertsBinding(layer_pos, runtime, module, compute, implementation)


def register_experts_implementation() -> None:
    """The one place the engine touches transformers' registry of experts implementations."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION_NAME, offloaded_experts_forward)


def offloaded_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    binding: ExpertsBinding = self._offload
    return binding.runtime.layer_call(binding, hidden_states, top_k_index, top_k_weights)


# -- the steps ------------------------------------------------------------------------------------------------
def plan(top_k_index: torch.Tensor) -> list[int]:
    """The experts a call needs, ascending; on CUDA the one sync a layer needs. Few ids (decode): found in
    Python, cheaper than torch.unique's dispatch."""
    if top_k_index.numel() <= SMALL_CALL:
        return sorted(set(top_k_index.view(-1).tolist()))
    return top_k_index.unique().tolist()


def execute(binding: ExpertsBinding, cache: ExpertCache, slots: list[int], hidden_states: torch.Tensor,
            top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """All of the call's experts resident at once: transformers' own kernel and reduction over the slot pool,
    bit for bit what the reference computes over its [E, ...] tensors."""
    # only the span of slots in use: grouped_mm's cost grows with the number of groups it is handed
    lo, hi = min(slots), max(slots) + 1
    slot_index = cache.slot_table[binding.layer_pos][top_k_index]
    if lo:
        slot_index = slot_index - lo
    return binding.compute(binding.span(cache, lo, hi), hidden_states, slot_index, top_k_weights)


def execute_unweighted(binding: ExpertsBinding, cache: ExpertCache, experts: list[int], slots: list[int],
                       hidden_states: torch.Tensor, top_k_index: torch.Tensor, contributions: torch.Tensor) -> None:
    """Each expert of a group on its own tokens, with unit weights, into contributions [T, k, H]."""
    for e, slot in zip(experts, slots):
        token_idx, rank = torch.where(top_k_index == e)
        ones = torch.ones((len(token_idx), 1), dtype=contributions.dtype, device=hidden_states.device)
        y = binding.compute(binding.span(cache, slot, slot + 1), hidden_states[token_idx],
                            torch.zeros((len(token_idx), 1), dtype=top_k_index.dtype, device=top_k_index.device), ones)
        contributions[token_idx, rank] = y.to(contributions.dtype)


def reduce(binding: ExpertsBinding, contributions: torch.Tensor, top_k_index: torch.Tensor,
           top_k_weights: torch.Tensor, experts: list[int], dtype: torch.dtype) -> torch.Tensor:
    """The reference's reduction of per-(token, rank) outputs [T, k, H]: grouped_mm and batched_mm weight them
    and sum over k (accumulating in fp32); the eager loop adds each expert's weighted output in expert order."""
    weighted = contributions * top_k_weights.unsqueeze(-1)
    if binding.implementation != "eager":
        return weighted.sum(dim=1).to(dtype)
    out = torch.zeros(contributions.shape[0], contributions.shape[-1], dtype=dtype, device=contributions.device)
    for e in experts:
        token_idx, rank = torch.where(top_k_index == e)
        out.index_add_(0, token_idx, weighted[token_idx, rank].to(dtype))
    return out


def execute_on_cpu(binding: ExpertsBinding, store, layer_pos: int, experts: list[int], hidden_states: torch.Tensor,
                   top_k_index: torch.Tensor, contributions: torch.Tensor) -> None:
    """Experts computed on the CPU where they lie (host buffers, or the memory map), into contributions
    [T, k, H] with unit weights: no slot, no copy to the device but the outputs'. Weights split over several
    file tensors (a per-expert layout's gate and up) are read in place, block by block (piecewise); the
    others go through transformers' own experts function on a one-expert view."""
    cpu = torch.device("cpu")
    module = binding.module
    # T=tokens routed to the expert, H=hidden
    for e in experts:
        token_idx, rank = torch.where(top_k_index == e)
        x = hidden_states[token_idx].to(cpu)
        pieces = store.host_pieces(layer_pos, e) if _piecewise_ok(module) else None
        if pieces is not None:
            y = piecewise(module, pieces, x)
        else:
            view = SlotExperts(module, store.host_view(layer_pos, e))
            ones = torch.ones((len(token_idx), 1), dtype=contributions.dtype)
            y = binding.compute(view, x, torch.zeros((len(token_idx), 1), dtype=top_k_index.dtype), ones)
        contributions[token_idx, rank] = y.to(contributions.device, contributions.dtype, non_blocking=True)
    # The memory map's pages stay mapped, as llama.cpp keeps them: they are clean file pages the kernel may
    # reclaim under memory pressure, and dropping them after each call (as a copy into a slot does) made the
    # next token fault every page back in (the 213M Mixtral-shaped benchmark model: 29 -> 37 tok/s on 2 cores).


def _piecewise_ok(module) -> bool:
    """The experts functions' math for a gated or plain MLP without biases, weights [out, in] (not transposed)."""
    return not getattr(module, "is_transposed", False) and not getattr(module, "has_bias", False)


def piecewise(module, pieces: dict[str, list[torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """One expert as grouped_mm_experts_forward computes it at unit weight, with each weight given as row blocks
    (outputs concatenated: every output element is the same dot product): up (or gate_up), the module's own
    gate or activation, down, the optional post-expert norm. Bit for bit the function's result on this CPU
    (tests/test_cpu_experts.py)."""
    first = pieces["gate_up_proj" if module.has_gate else "up_proj"]
    out = torch.cat([torch.nn.functional.linear(x, w) for w in first], dim=-1) if len(first) > 1 else \
        torch.nn.functional.linear(x, first[0])
    out = module._apply_gate(out) if module.has_gate else module.act_fn(out)
    out = torch.cat([torch.nn.functional.linear(out, w) for w in pieces["down_proj"]], dim=-1)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return out.to(x.dtype)
