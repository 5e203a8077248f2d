"""The experts forward that transformers calls for every MoE layer, served from the expert cache.

transformers applies the model's own routing (softmax/sigmoid, grouped top-k, renormalisation, scaling) and
hands us `(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])`. A call runs in four steps:

    route    which experts the call needs (ascending ids), in one group or, with fewer slots, several: from the
             routing read to the host once (host_read.py), the call's only wait for the device;
    stage    make them resident (ExpertCache.fetch: hits, demand loads, waits for prefetches), then let the
             predictor see the routing and start loading what the next layers are predicted to need;
    execute  transformers' own experts function (the one the reference model uses) over the slot pool;
    reduce   once, as the reference does: with one group the function itself reduces; with several, each
             expert runs with unit weights and the weighted [T, k, H] contributions are summed at the end.

Same kernel and same reduction as the reference, so bf16 output is bit for bit the reference's.

This module holds the binding transformers calls and the steps; runtime.py holds the engine's side of a call
(the cache, the predictor, the request) and uses the steps. The dependency goes one way: a binding is given
the layer call to forward to when it is made, and never names the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import ExpertCache
from .host_read import CallRouting
from ..packed_weights import linear as packed_linear
from ..packed_weights import packable
from .packed_experts import PackedExperts

IMPLEMENTATION_NAME = "offload_engine"
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
    """What one experts module needs at run time: its MoE layer position, the engine's layer call that serves
    it, and transformers' experts function the reference model would use (grouped_mm by default)."""

    layer_pos: int
    layer_call: Callable  # (binding, hidden_states, top_k_index, top_k_weights) -> output; the engine's
    module: object  # the transformers experts module
    compute: Callable
    implementation: str
    spans: dict[tuple[int, int], SlotExperts] = field(default_factory=dict)  # by (first slot, end): reused

    def span(self, cache: ExpertCache, lo: int, hi: int) -> SlotExperts:
        if cache.store.format.expands:  # quantized slots: expanded for this call only, never kept
            return SlotExperts(self.module, cache.store.format.expand(cache.pool, list(range(lo, hi))))
        view = self.spans.get((lo, hi))
        if view is None:
            if len(self.spans) >= MAX_SPANS:  # scattered slots give many spans: keep the memo small
                self.spans.clear()
            view = self.spans[lo, hi] = SlotExperts(self.module, {name: t[lo:hi] for name, t in cache.pool.items()})
        return view


def bind(module, layer_pos: int, layer_call: Callable, implementation: str) -> ExpertsBinding:
    """layer_call: what serves the module's calls (the engine's Runtime.layer_call); implementation: the
    experts implementation transformers picks for the reference model."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if implementation == "eager":
        compute = type(module).forward.__wrapped__  # the class's own loop, under the decorator
    else:
        compute = ALL_EXPERTS_FUNCTIONS[implementation]
    return ExpertsBinding(layer_pos, layer_call, module, compute, implementation)


def register_experts_implementation() -> None:
    """The one place the engine touches transformers' registry of experts implementations."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION_NAME, offloaded_experts_forward)


def offloaded_experts_forward(
    self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    binding: ExpertsBinding = self._offload
    return binding.layer_call(binding, hidden_states, top_k_index, top_k_weights)


# -- the steps ------------------------------------------------------------------------------------------------
# route: host_read.CallRouting (the call's one read of the device: its distinct experts and each one's tokens)


def execute(binding: ExpertsBinding, cache: ExpertCache, routing: CallRouting, slots: list[int],
            hidden_states: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """All of the call's experts resident at once: transformers' own kernel and reduction over the slot pool,
    bit for bit what the reference computes over its [E, ...] tensors."""
    fmt = cache.store.format
    if fmt.kernel:  # int8/int4 on the CPU: each expert by the packed kernels, then the reference's reduction
        contributions = hidden_states.new_zeros((*routing.ids.shape, hidden_states.shape[-1]))
        execute_unweighted(binding, cache, routing, routing.experts, slots, hidden_states, contributions)
        return reduce(binding, contributions, routing, top_k_weights, hidden_states.dtype)
    slot_index = cache.slot_table[binding.layer_pos][routing.ids]  # [T, k], on the host
    if fmt.expands:  # quantized slots: expand exactly the call's experts, numbered in the order of `slots`
        position = np.empty(cache.num_slots, dtype=np.int64)
        position[slots] = np.arange(len(slots))
        (slot_index,) = _on(hidden_states.device, position[slot_index])
        view = SlotExperts(binding.module, fmt.expand(cache.pool, list(slots)))
        return binding.compute(view, hidden_states, slot_index, top_k_weights)
    # only the span of slots in use: grouped_mm's cost grows with the number of groups it is handed
    lo, hi = min(slots), max(slots) + 1
    if lo:
        slot_index -= lo
    (slot_index,) = _on(hidden_states.device, slot_index)
    return binding.compute(binding.span(cache, lo, hi), hidden_states, slot_index, top_k_weights)


def execute_unweighted(binding: ExpertsBinding, cache: ExpertCache, routing: CallRouting, experts: list[int],
                       slots: list[int], hidden_states: torch.Tensor, contributions: torch.Tensor) -> None:
    """Each expert of a group on its own tokens, with unit weights, into contributions [T, k, H]."""
    device = hidden_states.device
    fmt = cache.store.format
    for e, slot in zip(experts, slots):
        token_idx, rank = _on(device, *routing.positions(e))
        if fmt.kernel:
            y = one_expert(binding, fmt, {name: t[slot:slot + 1] for name, t in cache.pool.items()},
                           hidden_states[token_idx])
        else:  # the span's view: memoized for plain slots, expanded for quantized ones
            y = unit_weight(binding, binding.span(cache, slot, slot + 1), hidden_states[token_idx])
        contributions[token_idx, rank] = y.to(contributions.dtype)


def one_expert(binding: ExpertsBinding, fmt, stored: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One expert on tokens x [T, H] at unit weight from its stored tensors, each [1, ...]: computed by the
    format's own kernels, or expanded (a plain format's are the weights) for transformers' function."""
    if fmt.kernel:
        expert = {name: t[0] for name, t in stored.items()}
        return mlp(binding.module, x, lambda x, p: fmt.linear(x, expert, p))
    return unit_weight(binding, SlotExperts(binding.module, fmt.expand(stored)), x)


def unit_weight(binding: ExpertsBinding, view: SlotExperts, x: torch.Tensor) -> torch.Tensor:
    """transformers' experts function on a one-expert view, every token routed to it with weight one."""
    ones = torch.ones((x.shape[0], 1), dtype=x.dtype, device=x.device)
    return binding.compute(view, x, torch.zeros((x.shape[0], 1), dtype=torch.long, device=x.device), ones)


def reduce(binding: ExpertsBinding, contributions: torch.Tensor, routing: CallRouting, top_k_weights: torch.Tensor,
           dtype: torch.dtype) -> torch.Tensor:
    """The reference's reduction of per-(token, rank) outputs [T, k, H]: grouped_mm and batched_mm weight them
    and sum over k (accumulating in fp32); the eager loop adds each expert's weighted output in expert order."""
    weighted = contributions * top_k_weights.unsqueeze(-1)
    if binding.implementation != "eager":
        return weighted.sum(dim=1).to(dtype)
    out = torch.zeros(contributions.shape[0], contributions.shape[-1], dtype=dtype, device=contributions.device)
    for e in routing.experts:
        token_idx, rank = _on(contributions.device, *routing.positions(e))
        out.index_add_(0, token_idx, weighted[token_idx, rank].to(dtype))
    return out


def execute_on_cpu(binding: ExpertsBinding, store, layer_pos: int, routing: CallRouting, experts: list[int],
                   contributions: torch.Tensor, packed: PackedExperts | None = None) -> None:
    """Experts computed on the CPU where they lie (host buffers, or the memory map), into contributions
    [T, k, H] with unit weights: no slot, no copy to the device but the outputs'. The inputs are the call's
    hidden states as read to the host with its routing (routing.hidden): no wait for the device here, so on
    CUDA the device's kernels, queued first, run meanwhile. Weights split over several file tensors (a
    per-expert layout's gate and up) are read in place, block by block (piecewise); the others go through
    transformers' own experts function on a one-expert view. With `packed` (packed_experts.py: where it gives
    the same bits), each expert's weights are packed once for oneDNN and the products skip its reorder."""
    module = binding.module
    device = contributions.device
    # T=tokens routed to the expert, H=hidden
    hidden = routing.hidden
    packing, plain = packs(packed, module), plain_mlp(module)
    for e in experts:
        token_idx, rank = routing.positions(e)
        # every token of the call (a decode step's one row, and often a few rows'): the host copy itself
        x = hidden if len(token_idx) == hidden.shape[0] else hidden[torch.as_tensor(token_idx)]
        weights = packed.weights(layer_pos, e) if packing and packable(x) else None
        pieces = store.host_pieces(layer_pos, e) if weights is None and plain else None
        if weights is not None:
            y = packed_expert(module, weights, x)
        elif pieces is not None:
            y = piecewise(module, pieces, x)
        else:
            y = one_expert(binding, store.format, store.host_view(layer_pos, e), x.to(contributions.dtype))
        if len(token_idx) == 1 and device.type == "cpu":  # one element's copy, not an indexed write
            contributions[token_idx[0], rank[0]] = y[0]
            continue
        token_idx, rank = _on(device, token_idx, rank)
        contributions[token_idx, rank] = y.to(device, contributions.dtype, non_blocking=True)
    # The memory map's pages stay mapped, as llama.cpp keeps them: they are clean file pages the kernel may
    # reclaim under memory pressure, and dropping them after each call (as a copy into a slot does) made the
    # next token fault every page back in (the 213M Mixtral-shaped benchmark model: 29 -> 37 tok/s on 2 cores).


def _on(device: torch.device, *arrays: np.ndarray) -> tuple[torch.Tensor, ...]:
    """Host index arrays as index tensors on `device` (host to device: queued, never a wait). Each shares its
    array's memory (from_numpy: a third of as_tensor's cost, which every layer call paid)."""
    tensors = tuple(torch.from_numpy(a) if a.flags.writeable else torch.as_tensor(a) for a in arrays)
    if device.type == "cpu":
        return tensors
    return tuple(t.to(device, non_blocking=True) for t in tensors)


def packs(packed: PackedExperts | None, module) -> bool:
    """Whether this module's CPU experts are computed from packed weights: packing is on, and the module's math
    is mlp's plain case (packed_linear has no transposed weights; a bias is left to transformers' function)."""
    return packed is not None and plain_mlp(module)


def plain_mlp(module) -> bool:
    """The experts functions' math for a gated or plain MLP without biases, weights [out, in] (not transposed)."""
    return not getattr(module, "is_transposed", False) and not getattr(module, "has_bias", False)


def piecewise(module, pieces: dict[str, list[torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """One expert as grouped_mm_experts_forward computes it at unit weight, with each weight given as row blocks
    (outputs concatenated: every output element is the same dot product). Bit for bit the function's result on
    this CPU (tests/test_cpu_experts.py)."""
    def project(x, param):
        blocks = pieces[param]
        if len(blocks) == 1:
            return torch.nn.functional.linear(x, blocks[0])
        return torch.cat([torch.nn.functional.linear(x, w) for w in blocks], dim=-1)

    return mlp(module, x, project)


def packed_expert(module, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """One expert at unit weight from its weights packed for oneDNN (packed_experts.py): piecewise's result,
    bit for bit, for the inputs packing_is_exact covers (`packable` x; the gate's output is a new contiguous
    tensor of as many rows)."""
    return mlp(module, x, lambda x, p: packed_linear(x, weights[p]))


def mlp(module, x: torch.Tensor, project: Callable) -> torch.Tensor:
    """One expert at unit weight, as transformers' experts functions compute it, with `project(x, param)` doing
    each weight's matrix product (and bias): up (or gate_up), the module's own gate or activation, down, the
    optional post-expert norm."""
    out = project(x, "gate_up_proj" if module.has_gate else "up_proj")
    out = module._apply_gate(out) if module.has_gate else module.act_fn(out)
    out = project(out, "down_proj")
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return out.to(x.dtype)
