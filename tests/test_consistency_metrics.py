"""Fast metrics against their plain-Python twins (exact), edge cases, properties and the FLAME figures.

The hit rates here have SCH's rules (the metric definitions); the engine's cache is replay's, tested against
its own twin in test_foresight.py, and one test below relates the two."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_engine.tracing.consistency import (
    capacity_for_ratio,
    domain_specialisation,
    hit_rate,
    hit_rates,
    load_balance,
    sch,
    srp,
    srp_from_histogram,
    srp_histograms,
    vocabulary_specialisation,
)
from offload_engine.tracing.consistency.reference import (
    ref_domain_specialisation,
    ref_hit_rate,
    ref_hits,
    ref_load_balance,
    ref_srp,
    ref_vocabulary_specialisation,
)
from offload_engine.tracing.replay import replay
from offload_engine.tracing.trace_file import RoutingTrace, load_trace

from consistency_traces import FLAME, random_trace, trace_from_lists

POLICIES = ("sch", "lru", "lfu", "belady")


def _layers(rng, trace):
    return [None, int(rng.integers(0, trace.num_layers))]


def test_srp_matches_brute_force_on_random_traces():
    rng = np.random.default_rng(1)
    for _ in range(300):
        trace = random_trace(rng)
        m = int(rng.integers(1, trace.num_tokens + 3))  # includes m > T
        for layer in _layers(rng, trace):
            fast, ref = srp(trace, m, layer), ref_srp(trace, m, layer)
            assert list(fast.histogram) == ref["histogram"]
            assert fast.threshold == ref["threshold"]
            assert fast.srp == float(ref["srp"])
            assert fast.rho_hat == float(ref["rho_hat"])
            assert fast.act_r == float(ref["act_r"])


def test_hit_counts_match_brute_force_on_random_traces():
    rng = np.random.default_rng(2)
    for _ in range(250):
        trace = random_trace(rng)
        for layer in _layers(rng, trace):
            group = trace.num_experts * (1 if layer is not None else trace.num_layers)
            capacity = int(rng.integers(0, group + 3))  # includes C >= every distinct expert
            m = int(rng.integers(1, trace.num_tokens + 3))
            for policy in POLICIES:
                hits, reqs = ref_hits(trace, policy, capacity, m if policy == "sch" else None, layer)
                for method in ("tree", "stack"):
                    fast = hit_rate(trace, policy, capacity, m=m, layer=layer, method=method)
                    assert (list(fast.hits), list(fast.requests)) == (hits, reqs), (policy, capacity, m, layer, method)
                assert fast.hit_rate == pytest.approx(ref_hit_rate(trace, policy, capacity, m, layer), rel=1e-12)


def test_one_stack_pass_equals_one_tree_pass_per_size():
    rng = np.random.default_rng(4)
    for _ in range(150):
        trace = random_trace(rng)
        layer = [None, int(rng.integers(0, trace.num_layers))][int(rng.integers(0, 2))]
        group = trace.num_experts * (1 if layer is not None else trace.num_layers)
        sizes = list(range(group + 2))
        m = int(rng.integers(1, trace.num_tokens + 2))
        for policy in POLICIES:
            stack = hit_rates(trace, policy, sizes, m=m, layer=layer, method="stack")
            tree = hit_rates(trace, policy, sizes, m=m, layer=layer, method="tree")
            assert [h.hits for h in stack] == [h.hits for h in tree]


def test_edge_cases_single_expert_k1_and_all_padding():
    one = trace_from_lists([[[[0]], [[0]], [[0]]]], num_experts=1)  # one expert, k = 1
    assert srp(one, 2).srp == 1.0 and srp(one, 2).act_r == 1.0
    assert sch(one, 2, 1).hit_rate == 1.0  # warm start: the first distinct expert is preloaded
    empty = trace_from_lists([[[[-1, -1]], [[-1, -1]]], [[[0, 1]], [[1, 2]]]], num_experts=3)
    r = hit_rate(empty, "lru", 2)
    assert r.requests == (0, 4) and r.hit_rate == 0.75  # the empty sequence is left out of the mean
    assert srp(empty, 5).srp == 0.0 and srp(empty, 5).histogram == (0,) * 6  # m > T: no window
    assert hit_rate(empty, "belady", 0).hit_rate == 0.0


def test_missing_cell_requests_nothing_but_keeps_its_token():
    # token 1 of layer 0 is missing: the SRP window 0..1 still spans two tokens
    trace = trace_from_lists([[[[0]], [[-1]], [[0]]]], num_experts=2)
    assert srp(trace, 2).histogram == (2, 2, 0)  # 2 windows x 2 experts; expert 0 seen once in each
    assert hit_rate(trace, "lru", 1).requests == (2,)


def test_sch_evicts_by_pending_uses_then_recency():
    # stream 0 1 2 0: with C = 2 and m = 4, inserting 2 evicts 1 (no pending use) and keeps 0
    trace = trace_from_lists([[[[0]], [[1]], [[2]], [[0]]]], num_experts=3)
    assert sch(trace, 4, 2).hits == (3,)  # warm 0, warm 1, miss 2, hit 0
    assert hit_rate(trace, "lru", 2).hits == (2,)  # LRU evicted 0


def test_the_metric_caches_and_the_engine_cache_differ_on_one_layer_only_by_the_warm_start():
    """Two semantics, two simulators. hit_rate has SCH's rules (the metric definitions: each sequence on its
    own, the first C distinct experts warm, one batched lookup per token); replay has the engine's cache (cold
    at the start, a lookup per layer call, carried across sequences, pooled). With one sequence, one layer and
    one expert a token, batching and carrying over change nothing, so for LRU and Belady the metric's hits are
    the engine's plus the warm start's min(C, distinct experts)."""
    rng = np.random.default_rng(5)
    for _ in range(100):
        experts, tokens = int(rng.integers(2, 9)), int(rng.integers(1, 40))
        ids = rng.integers(0, experts, size=(1, tokens, 1, 1)).astype(np.int16)
        trace = RoutingTrace(ids, num_experts=experts, moe_layers=np.array([0]))
        distinct = len(set(ids.reshape(-1).tolist()))
        for capacity in range(1, experts + 1):
            for policy in ("lru", "belady"):
                metric, engine = hit_rate(trace, policy, capacity), replay(trace, capacity, policy)
                assert metric.requests == (tokens,) and engine.hits + engine.misses == tokens
                assert metric.hits == (engine.hits + min(capacity, distinct),), (policy, capacity, ids.ravel())


def test_srp_from_histogram_takes_the_first_argmax():
    # H = [0, 2, 0, 1] at m = 3: F1 at j = 0..3 are 10/14, 10/14, 6/10 -> 3/5, 6/9 ...
    r = srp_from_histogram((0, 2, 0, 1), 3)
    f1 = [Fraction(2 * 5, 9 + 5), Fraction(2 * 5, 9 + 5), Fraction(2 * 3, 3 + 5), Fraction(2 * 3, 3 + 5)]
    assert r.threshold == f1.index(max(f1)) and r.srp == float(max(f1))


def test_specialisation_matches_brute_force():
    rng = np.random.default_rng(3)
    for _ in range(60):
        trace = random_trace(rng, domains=True, vocab=4)
        m = int(rng.integers(1, 5))
        assert load_balance(trace, m).std == pytest.approx(ref_load_balance(trace, m), rel=1e-9, abs=1e-15)
        fast_d, ref_d = domain_specialisation(trace, m), ref_domain_specialisation(trace, m)
        assert (fast_d is None) == (ref_d is None)
        if fast_d is not None:
            assert fast_d.score == pytest.approx(ref_d, rel=1e-9, abs=1e-15)
        fast_v, ref_v = vocabulary_specialisation(trace, 2), ref_vocabulary_specialisation(trace, 2)
        assert (fast_v is None) == (ref_v is None)
        if fast_v is not None:
            assert fast_v.score == pytest.approx(ref_v, rel=1e-12)


def test_capacity_for_ratio_is_exact_floor():
    trace = trace_from_lists([[[[0, 1, 2]] * 2]], num_experts=4)  # k = 3, L = 2
    assert [capacity_for_ratio(trace, r) for r in ("0.5", "1", "2", "0.1")] == [3, 6, 12, 0]
    assert capacity_for_ratio(trace, "0.5", layer=1) == 1


traces = st.builds(lambda seed: random_trace(np.random.default_rng(seed)), st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None)
@given(trace=traces, m=st.integers(1, 14))
def test_srp_properties(trace, m):
    r = srp(trace, m)
    assert 0.0 <= r.srp <= 1.0
    if r.act_r > 0:
        assert r.srp >= 2 * r.act_r / (1 + r.act_r) - 1e-12  # j = 0 is a lower bound
        assert srp(trace, 1).srp == 1.0  # m = 1: the window's own experts are exactly right
    layers = srp_histograms(trace, [m])[:, 0, : m + 1]
    assert tuple(layers.sum(axis=0)) == r.histogram  # model group = union of the layers' pairs


@settings(max_examples=60, deadline=None)
@given(trace=traces, m=st.integers(1, 6), policy=st.sampled_from(POLICIES))
def test_hits_grow_with_cache_size_and_saturate(trace, m, policy):
    # every policy here is a priority policy with content-independent keys: caches nest as C grows
    group = trace.num_experts * trace.num_layers
    hits = [sum(h.hits) for h in hit_rates(trace, policy, list(range(group + 2)), m=m, method="tree")]
    assert hits == sorted(hits)
    full = hit_rate(trace, policy, group, m=m)
    assert full.hits == full.requests  # C >= distinct experts: everything is warm and never evicted


def test_flame_reference_figures():
    trace = load_trace(FLAME, num_experts=64)
    r = srp(trace, 16)
    assert round(r.srp, 3) == 0.330 and r.threshold == 3 and round(r.rho_hat, 2) == 2.26
    c = capacity_for_ratio(trace, "2")
    assert c == 96 and round(sch(trace, 16, c).hit_rate, 3) == 0.496
