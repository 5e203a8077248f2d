"""Replay a routing trace through the engine's own cache bookkeeping and policies, without the model.

The engine's decode, as it really runs: the trace's sequences in order, each token one decode step at batch
1, the MoE layers in order, each layer call asking for its distinct experts in ascending id order; one cache
of C slots shared by all layers, keyed (layer, expert), cold at the start and carried over from one sequence
to the next. A hit is an expert resident when its call starts; victims are never among the call's own
experts. The cache is experts/slot_map.py's SlotMap and the policies are experts/policies.py's, exactly as in
the engine; a predictive policy gets its predictions from a predictor that sees each call as the engine's
does (history: a trace has no hidden states). Loads complete at once (no prefetch: this is about what to keep).
The hit rate is pooled: hits / (hits + misses) over the whole trace.

These are the engine's cache semantics, and the one place outside the engine that computes hit rates with
them (`moe-offload simulate`, and the hit rates `moe-offload estimate` reads from a trace). The consistency
metrics' LRU, LFU and Belady (consistency/companion_rates.py) follow SCH's published rules instead: each
sequence on its own with a warm start, one batched lookup per token across all layers; consistency/
sch_simulator.py lists the differences. Belady here knows the whole trace's future, in calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..experts.counters import CacheStats, new_counters
from ..experts.policies import BeladyPolicy, make_policy
from ..experts.slot_map import SlotMap
from ..foresight import Foresight
from ..foresight.predictors.base import Paths
from ..foresight.predictors.history import HistoryPredictor
from .trace_file import RoutingTrace

REPLAY_POLICIES = ("lru", "belady", "predictive")


@dataclass(frozen=True)
class ReplayResult:
    slots: int
    policy: str
    stats: CacheStats

    @property
    def hits(self) -> int:
        return self.stats.hits

    @property
    def misses(self) -> int:
        return self.stats.misses

    @property
    def hit_rate(self) -> float:
        return self.stats.hit_rate


def layer_calls(trace: RoutingTrace):
    """(sequence, token, layer, ascending distinct experts) of every call with at least one expert, in order."""
    ids = trace.expert_ids
    for n, length in enumerate(trace.lengths()):
        for t in range(int(length)):
            for layer in range(trace.num_layers):
                experts = sorted({int(e) for e in ids[n, t, layer] if e >= 0})
                if experts:
                    yield n, t, layer, experts


def _requests(trace: RoutingTrace) -> dict[tuple[int, int], list[int]]:
    out: dict[tuple[int, int], list[int]] = {}
    for call, (_, _, layer, experts) in enumerate(layer_calls(trace)):
        for e in experts:
            out.setdefault((layer, e), []).append(call)
    return out


def replay(trace: RoutingTrace, slots: int, policy: str, predictor=None, use_predictor: bool = True) -> ReplayResult:
    """Hits and misses of the engine's cache with `slots` slots and `policy` on this trace. `predictor`
    (predictive policy only) defaults to a fresh history predictor; use_predictor=False runs the predictive
    policy on its own usage counts."""
    if policy not in REPLAY_POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {REPLAY_POLICIES}")
    L, E, k = trace.num_layers, trace.num_experts, trace.k
    if slots < k:
        raise ValueError(f"{slots} slots cannot hold one call's {k} experts")
    rule = BeladyPolicy(_requests(trace)) if policy == "belady" else make_policy(policy, L, E, k)
    cache = SlotMap(slots, rule, expert_bytes=1)
    counters = new_counters(L)
    foresight = None
    if policy == "predictive" and use_predictor:
        foresight = Foresight(predictor or HistoryPredictor(L, E, k), rule, k, L)
    paths, sequence = None, -1
    ids = trace.expert_ids
    for n, t, layer, experts in layer_calls(trace):
        context = None
        if foresight is not None:
            if n != sequence:  # a new sequence: a new request, with no paths yet
                paths, sequence = Paths.empty(1, L, k), n
            context = foresight.observe(paths, layer, ids[n, t, layer][None].astype(np.int64), None)
        staging = cache.call(layer, experts, counters)
        for slot in staging.slots:
            cache.arrived(slot)
        if context is not None:
            foresight.look_ahead(context)
    return ReplayResult(slots, policy, CacheStats.of(counters))


def replay_all(trace: RoutingTrace, slots: Sequence[int], policies: Sequence[str],
               predictor_factory=None, use_predictor: bool = True,
               progress: bool = False) -> dict[int, dict[str, ReplayResult]]:
    """Every (slots, policy) pair; each predictive run gets a fresh predictor from `predictor_factory()`.
    progress=True: a bar over the runs (a few seconds each on a real trace)."""
    from tqdm.auto import tqdm

    out: dict[int, dict[str, ReplayResult]] = {}
    bar = tqdm(total=len(slots) * len(policies), desc="replaying", unit="run", disable=not progress)
    for c in slots:
        for p in policies:
            bar.set_postfix_str(f"{c} slots, {p}")
            predictor = predictor_factory() if (p == "predictive" and predictor_factory) else None
            out.setdefault(c, {})[p] = replay(trace, c, p, predictor, use_predictor)
            bar.update()
    bar.close()
    return out
