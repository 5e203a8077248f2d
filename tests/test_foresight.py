"""Foresight: predictors, the predictive cache, prefetch and the replay simulator.

Offloading changes speed, never results: tokens and logits are the same with prediction and prefetch on or
off. The replay simulator is the engine's own cache without the model: replaying a generation's trace gives
the engine's own counters. Plain-loop twins check the simulator, the predictor metrics and the history
predictor's compiled kernels.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import tiny_models as tm
from offload_engine import OffloadEngine
from offload_engine.experts.counters import new_counters
from offload_engine.experts.policies import BeladyPolicy, LRUPolicy, PredictivePolicy
from offload_engine.experts.runtime import Runtime
from offload_engine.experts.slot_map import SlotMap
from offload_engine.foresight.predictors import HistoryPredictor
from offload_engine.foresight.predictors.base import LayerContext, Paths, Prediction, Predictor, ranked
from offload_engine.foresight.predictors.evaluate import evaluate
from offload_engine.foresight.predictors.metrics import NEXT_TOKEN, Tally
from offload_engine.request import Request
from offload_engine.tracing.replay import layer_calls, replay
from offload_engine.tracing.trace_file import RoutingTrace
from test_exactness import checkpoints  # noqa: F401 (the shared fixture of tiny checkpoints)
from test_exactness import NEW_TOKENS, PROMPT, engine_steps, max_rel_error, reference_no_eos, REL_TOL

FORESIGHT = {  # name -> engine settings
    "next-gate, predictive, prefetch 2": dict(policy="predictive", predictor="next-gate", prefetch_depth=2),
    "history, predictive, prefetch 1": dict(policy="predictive", predictor="history", prefetch_depth=1),
    "next-gate, lru, prefetch auto": dict(policy="lru", predictor="next-gate"),
}


# -- offloading never changes results ---------------------------------------------------------------------
@pytest.mark.parametrize("layout", tm.LAYOUTS)
@pytest.mark.parametrize("name", list(tm.ARCHITECTURES))
def test_prediction_and_prefetch_never_change_tokens_or_logits(checkpoints, name, layout):
    path, ref_tokens, ref_logits = checkpoints(name, layout)
    probe = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", expert_slots=1 << 20, progress=False)
    spec = probe.spec
    for slots in sorted({spec.total_experts, max(spec.top_k, spec.total_experts // 4), spec.top_k}):
        for label, settings in FORESIGHT.items():
            engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", expert_slots=slots,
                                                   progress=False, **settings)
            tokens, logits = engine_steps(engine, PROMPT)
            where = f"{name}/{layout}/{slots} slots/{label}"
            assert tokens.tolist() == ref_tokens.tolist(), f"{where}: tokens differ"
            assert max_rel_error(logits, ref_logits) < REL_TOL, f"{where}: logits differ"
            engine.cache.drain()
            table = {key: int(engine.cache.slot_table[key]) for key in engine.cache.slot_of}
            assert table == engine.cache.slot_of  # the gather table mirrors the map, prefetches included


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_bf16_bit_identical_with_prediction_and_the_smallest_cache(tmp_path, name):
    """bf16 logits equal transformers' bit for bit with prefetch on, and also with top_k slots, where a prompt
    needs more experts than there are slots (served a group at a time, reduced once as the reference does)."""
    from transformers import AutoModelForCausalLM

    tm.build_reference(name).to(torch.bfloat16).save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ref_tokens, ref_logits = reference_no_eos(ref, torch.tensor([PROMPT]))
    for slots, settings in ((2, {}), (2, FORESIGHT["next-gate, predictive, prefetch 2"]),
                            (5, FORESIGHT["history, predictive, prefetch 1"])):
        engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", expert_slots=slots, progress=False, **settings)
        tokens, logits = engine_steps(engine, PROMPT)
        assert tokens.tolist() == ref_tokens.tolist()
        assert torch.equal(logits, ref_logits), f"{name}, {slots} slots, {settings}"


def test_prefetch_loads_ahead_and_counts_it(checkpoints):
    path, ref_tokens, _ = checkpoints("mixtral")
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=6, progress=False,
                                           **FORESIGHT["next-gate, predictive, prefetch 2"])
    stats = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).stats
    assert stats.prefetches > 0 and 0 < stats.prefetch_hits <= stats.prefetches
    expert = engine.store.expert_nbytes()
    assert stats.bytes_to_device == (stats.misses + stats.prefetches) * expert
    assert sum(c["prefetches"] for c in stats.per_layer) == stats.prefetches
    off = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=6, progress=False, policy="predictive",
                                        predictor="next-gate", prefetch_depth=0)
    assert off.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).stats.prefetches == 0


class EveryDistance(Predictor):
    """Names experts 10 d and 10 d + 1 at every distance d it is asked for, so a key tells its distance."""

    name = "every-distance"
    wraps = True  # asked for the whole horizon: L layers ahead

    def predict(self, ctx, depth, n):
        L = ctx.paths.current.shape[1]
        return [Prediction(d, (ctx.layer + d) % L, np.array([[10 * d, 10 * d + 1]])) for d in range(1, depth + 1)]


class PrefetchRecorder:
    """What the runtime needs of an ExpertCache for a look-ahead; keeps the keys it is asked to prefetch."""

    device = torch.device("cpu")
    store = SimpleNamespace(expert_nbytes=lambda: 1, spec=SimpleNamespace(expert_numel=lambda: 1),
                            format=SimpleNamespace(expand_limit=lambda top_k, rows: None))

    def __init__(self, resident=()):
        self.policy, self.slot_of, self.prefetched = LRUPolicy(), {key: 0 for key in resident}, []

    def prefetch(self, keys, protected, counters=None):
        self.prefetched += keys
        return len(keys)


def look_ahead_once(prefetch_depth, top_k=2, load_time=0.0, layer_time=0.0, layer=5, resident=()):
    """The runtime's look-ahead after one decode call of `layer` (of 8): (its depth, the keys it prefetched)."""
    L = 8
    cache = PrefetchRecorder(resident)
    runtime = Runtime(cache, L, top_k, EveryDistance(), prefetch_depth)
    runtime.load_time, runtime.layer_time = load_time, layer_time
    request = Request(rows=1, num_layers=L, top_k=top_k)
    context = runtime.foresight.observe(request.paths, layer, np.arange(top_k)[None], None)
    runtime._look_ahead(request, context, set())
    return runtime.depth(), cache.prefetched


def test_prefetch_depth_d_prefetches_exactly_distances_one_to_d():
    layer = 5
    for depth in range(0, 6):
        got_depth, prefetched = look_ahead_once(depth, layer=layer)
        want = [((layer + d) % 8, e) for d in range(1, depth + 1) for e in (10 * d, 10 * d + 1)]
        assert got_depth == depth and prefetched == want, depth
    _, prefetched = look_ahead_once(2, layer=layer, resident=[(6, 10)])  # a resident key is never prefetched
    assert prefetched == [(6, 11), (7, 20), (7, 21)]


def test_automatic_prefetch_depth_follows_its_formula():
    """Unset, the depth is ceil(top_k * one expert's load time / one layer's time), from 1 to AUTO_DEPTH_LIMIT
    (3); 1 before a layer time is measured. The look-ahead prefetches exactly that many distances."""
    cases = [  # (top_k, load time, layer time) -> depth
        ((2, 5.0, 0.0), 1), ((2, 0.0, 1.0), 1), ((2, 0.25, 1.0), 1), ((2, 0.5, 1.0), 1), ((2, 0.6, 1.0), 2),
        ((2, 1.0, 1.0), 2), ((2, 1.1, 1.0), 3), ((2, 30.0, 1.0), 3), ((4, 0.5, 1.0), 2), ((4, 0.3, 0.1), 3),
        ((1, 0.15, 0.1), 2),
    ]
    for (top_k, load_time, layer_time), depth in cases:
        got_depth, prefetched = look_ahead_once(None, top_k, load_time, layer_time)
        assert got_depth == depth, (top_k, load_time, layer_time)
        assert sorted({e // 10 for _, e in prefetched}) == list(range(1, depth + 1))


# -- the cache: protected experts, arriving slots ---------------------------------------------------------
def test_a_prefetch_never_evicts_what_the_current_call_needs():
    policy = LRUPolicy()
    cache = SlotMap(3, policy, expert_bytes=1)
    counters = new_counters(2)
    for e in (0, 1, 2):
        cache.call(0, [e], counters)
        cache.arrived(cache.slot_of[(0, e)])
    protected = {(0, 0), (0, 1), (0, 2)}
    assert cache.prefetch((1, 5), protected, counters, []) is None  # every resident expert is needed now
    assert cache.prefetch((1, 5), {(0, 1), (0, 2)}, counters, []) == cache.key_in.index((1, 5))
    assert (0, 0) not in cache.slot_of and counters[0].evictions == 1 and counters[1].prefetches == 1


def test_an_arriving_slot_is_never_given_away():
    cache = SlotMap(2, LRUPolicy(), expert_bytes=1)
    counters = new_counters(1)
    cache.call(0, [0], counters)
    cache.arrived(cache.slot_of[(0, 0)])
    cache.prefetch((0, 1), set(), counters, [])  # in flight
    staging = cache.call(0, [2], counters)  # must evict expert 0, not the arriving 1
    assert (0, 1) in cache.slot_of and (0, 0) not in cache.slot_of
    assert staging.evicted == [(0, 0)]
    staged = cache.call(0, [1], counters)
    assert staged.waits == [cache.slot_of[(0, 1)]] and counters[0].prefetch_hits == 1


@pytest.mark.parametrize("make_room", ["call", "prefetch"])
def test_an_arriving_slot_is_never_given_away_even_as_the_oldest(make_room):
    """The arriving key is LRU's first choice of victim here (loaded before the resident one), so only the
    arriving protection keeps its slot, for a call's miss and for a prefetch alike."""
    cache = SlotMap(2, LRUPolicy(), expert_bytes=1)
    counters = new_counters(2)
    arriving = cache.prefetch((0, 1), set(), counters, [])  # in flight, and the oldest in LRU order
    cache.call(0, [0], counters)
    cache.arrived(cache.slot_of[(0, 0)])
    assert cache.policy.victim(set()) == (0, 1)  # unprotected, LRU would take the arriving slot
    evicted = []
    if make_room == "call":
        evicted = cache.call(1, [2], counters).evicted
    else:
        assert cache.prefetch((1, 2), set(), counters, evicted) is not None
    assert evicted == [(0, 0)]
    assert cache.slot_of[(0, 1)] == arriving and cache.slot_of[(1, 2)] != arriving
    cache.call(0, [1], counters)  # every other key is now arriving or protected: nothing may be evicted
    assert cache.prefetch((1, 3), set(), counters, []) is None
    assert cache.key_in[arriving] == (0, 1)


def test_prefetch_hits_count_only_prefetched_experts_used_before_eviction():
    cache = SlotMap(2, LRUPolicy(), expert_bytes=1)
    counters = new_counters(1)
    cache.prefetch((0, 3), set(), counters, [])
    cache.arrived(cache.slot_of[(0, 3)])
    cache.call(0, [3], counters)
    cache.call(0, [3], counters)  # a second use is an ordinary hit
    assert (counters[0].hits, counters[0].prefetch_hits, counters[0].misses) == (2, 1, 0)


# -- replay: the engine's cache without the model ---------------------------------------------------------
def test_own_layer_predictions_are_graded_at_that_layers_next_call(checkpoints):
    """With experts on the CPU and more device experts than slots (two rows, two slots), a call's fetch runs
    once per group, and each tells the policy of a call of the layer; the look-ahead, which predicts the layer's
    own next call too, runs after the last of them, so that prediction is graded at the layer's next call and
    not against the rest of this one."""
    path, _, _ = checkpoints("mixtral", "per_expert")
    engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", expert_slots=2, max_batch=2,
                                           policy="predictive", predictor="history", prefetch_depth=1,
                                           cold_experts="cpu", progress=False)
    runtime, policy = engine.runtime, engine.cache.policy

    def one_cold_expert_on_the_cpu(layer, routing):
        cold = [e for e in routing.experts if (layer, e) not in engine.cache.slot_of]
        return {max(cold)} if cold else set()

    runtime._place = one_cold_expert_on_the_cpu
    events = []
    on_call, on_predictions = policy.on_call, policy.on_predictions
    policy.on_call = lambda layer, experts: (events.append(("call", layer)), on_call(layer, experts))
    policy.on_predictions = lambda layer, predictions: (
        events.append(("predict", layer, {target for _, target, _ in predictions})),
        on_predictions(layer, predictions))
    engine.generate([[5, 17, 33, 9], [70, 3, 44, 101]], max_new_tokens=8, ignore_eos=True)
    calls = [e for e in events if e[0] == "call"]
    assert any(a == b for a, b in zip(calls, calls[1:]))  # some call was fetched in groups
    own = [i for i, e in enumerate(events) if e[0] == "predict" and e[1] in e[2]]
    assert own  # history predicts each layer's own next call
    for i in own:
        following = next((e for e in events[i + 1:] if e[0] == "call"), None)
        assert following is None or following[1] != events[i][1], events[i - 2:i + 2]


def test_predictive_policy_grades_a_prediction_of_the_layers_own_next_call():
    """A prediction at distance L names experts for the layer that was just called (its next token's call);
    it is graded at that call, also where L is past MAX_DEPTH (the farther distances share its bucket)."""
    for L in (3, 12):
        E, k = 6, 2
        policy = PredictivePolicy(L, E, k)
        d = min(L, PredictivePolicy.MAX_DEPTH)
        for _ in range(40):
            for layer in range(L):
                policy.on_call(layer, [0, 1] if layer == 0 else [2, 3])
                if layer == 0:
                    policy.on_predictions(0, [(L, 0, np.array([0, 1]))])
                    assert policy.pending[0, d] and policy.predicted[0, d, :2].all()
        assert policy.pred_calls[d, 1].sum() - policy.pred_calls[d, 1].size * PredictivePolicy.PRIOR == 39 * 2
        named = policy.pred_uses[d, 1] / policy.pred_calls[d, 1]
        assert named.max() > 0.9  # the named experts were used every time
        probability = policy.use_probability()
        assert probability[0, 0] == pytest.approx(named[1])  # age 0 now: graded at age 1 at the next call


def random_trace(seed, n=3, t=20, layers=3, experts=8, k=2, missing=0.0):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(n * t * layers)]).reshape(n, t, layers, k)
    ids = ids.astype(np.int16)
    if missing:
        ids[rng.random(ids.shape[:3]) < missing] = -1
    return RoutingTrace(expert_ids=ids, num_experts=experts, moe_layers=np.arange(layers))


def twin_replay(trace, slots, policy):
    """A plain loop of the replay's rules, written apart from SlotMap and policies.py (LRU and Belady)."""
    calls = list(layer_calls(trace))
    future = {}
    for i, (_, _, layer, experts) in enumerate(calls):
        for e in experts:
            future.setdefault((layer, e), []).append(i)
    cache, last_use, hits, misses = set(), {}, 0, 0
    for i, (_, _, layer, experts) in enumerate(calls):
        for e in experts:  # ascending ids
            key = (layer, e)
            if key in cache:
                hits += 1
            else:
                misses += 1
                if len(cache) >= slots:
                    candidates = [x for x in cache if x[0] != layer or x[1] not in experts]
                    if policy == "lru":
                        victim = min(candidates, key=lambda x: last_use[x])
                    else:
                        def next_use(x):
                            later = [j for j in future[x] if j > i]
                            return later[0] if later else float("inf")
                        victim = max(candidates, key=lambda x: (next_use(x), x))
                    cache.remove(victim)
                cache.add(key)
            last_use[key] = (i, e)  # within a call, ascending ids are used in order
    return hits, misses


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("policy", ["lru", "belady"])
def test_replay_equals_its_plain_loop_twin(seed, policy):
    trace = random_trace(seed, missing=0.1 if seed % 3 == 0 else 0.0)
    for slots in (2, 3, 5, 9):
        result = replay(trace, slots, policy)
        assert (result.hits, result.misses) == twin_replay(trace, slots, policy), (seed, policy, slots)


def test_belady_is_never_worse_than_lru_or_predictive():
    for seed in range(6):
        trace = random_trace(seed, t=40)
        for slots in (2, 4, 8):
            best = replay(trace, slots, "belady").misses
            assert best <= replay(trace, slots, "lru").misses
            assert best <= replay(trace, slots, "predictive").misses


@pytest.mark.parametrize("settings", [dict(policy="lru"), dict(policy="predictive", predictor="history", prefetch_depth=0),
                                      dict(policy="predictive")])
def test_replaying_a_generation_reproduces_the_engine_counters(checkpoints, settings):
    """One-token prompt: prefill is one decode-like step, so every layer call of the engine is one of the
    replay's. The predictive policy and the history predictor are the same code in both."""
    path, _, _ = checkpoints("mixtral")
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=4, progress=False, **settings)
    result = engine.generate([PROMPT[0]], max_new_tokens=40, ignore_eos=True, record_trace=True)
    predictor = settings.get("predictor", "none")
    replayed = replay(result.trace, 4, settings["policy"], use_predictor=predictor != "none")
    assert (replayed.hits, replayed.misses) == (result.stats.hits, result.stats.misses)
    assert replayed.stats.evictions == result.stats.evictions
    assert [c.misses for c in replayed.stats.per_layer] == [c["misses"] for c in result.stats.per_layer]


# -- the predictive policy --------------------------------------------------------------------------------
def run_calls(policy, slots, calls):
    cache = SlotMap(slots, policy, expert_bytes=1)
    counters = new_counters(3)
    for layer, experts in calls:
        for slot in cache.call(layer, experts, counters).slots:
            cache.arrived(slot)
    return sum(c.hits for c in counters)


def twin_prefetch(cache, keys, protected, counters, evicted):
    """SlotMap.prefetch_many as it was written before victims came in one step: one victim() per key."""
    from offload_engine.experts.policies import NoVictimError

    excluded, started = cache.excluded(protected), []
    for key in keys:
        if key in cache.slot_of:
            continue
        if cache.free:
            slot = cache.free.pop()
        else:
            try:
                victim = cache.policy.victim(excluded)
            except NoVictimError:
                continue
            if not cache.policy.worth_prefetching(key, victim):
                continue
            slot = cache._evict(victim, counters, evicted)
        cache._assign(key, slot)
        cache.policy.on_prefetch(key)
        cache.unused_prefetches.add(key)
        counters[key[0]].prefetches += 1
        excluded.add(key)
        started.append((key, slot))
    return started


@pytest.mark.parametrize("policy", ["lru", "predictive"])
def test_prefetching_many_keys_takes_the_victims_one_victim_call_at_a_time_would(policy):
    """prefetch_many asks the policy for its victims once; the same keys start in the same slots, the same
    victims go, as with a victim() per key, on random routings, predictions, protected and arriving keys."""
    from offload_engine.experts.policies import make_policy

    L, E, k, slots = 4, 12, 2, 10
    for seed in range(6):
        rng = np.random.default_rng(seed)
        maps = [SlotMap(slots, make_policy(policy, L, E, k), expert_bytes=1) for _ in range(2)]
        counters = [new_counters(L), new_counters(L)]
        for step in range(60):
            layer = step % L
            experts = sorted(rng.choice(E, k, replace=False).tolist())
            predictions = [(d, (layer + d) % L, rng.choice(E, k, replace=False)) for d in (1, 2)]
            keys = [(int(j), int(e)) for _, j, named in predictions for e in named]
            protected = {(layer, e) for e in experts}
            results = []
            for m, c, prefetch in zip(maps, counters, (twin_prefetch, SlotMap.prefetch_many)):
                staging = m.call(layer, experts, c)
                for s in staging.slots:
                    m.arrived(s)
                m.policy.on_predictions(layer, predictions)
                evicted = []
                started = prefetch(m, keys, protected, c, evicted)
                for _, s in started[:len(started) // 2]:  # some land, the rest stay arriving
                    m.arrived(s)
                results.append((started, evicted, dict(m.slot_of), [(x.prefetches, x.evictions) for x in c]))
            assert results[0] == results[1], (policy, seed, step)


def twin_least_likely(probability, distance, resident, excluded, n):
    """policies._least_likely as it was written before its one pass: a scan of every key per victim."""
    L, E = probability.shape
    skip, out = set(excluded), []
    while len(out) < n:
        best, best_s, best_d = -1, math.inf, -1
        for layer in range(L):
            d = int(distance[layer])
            for e in range(E):
                if not resident[layer, e] or layer * E + e in skip:
                    continue
                s = probability[layer, e] / d
                if s < best_s or (s == best_s and d >= best_d):
                    best, best_s, best_d = layer * E + e, s, d
        if best < 0:
            break
        out.append(best)
        skip.add(best)
    return out


def test_the_one_pass_victims_are_the_scan_per_victims():
    """_least_likely's one pass keeps the victims a scan per victim finds, in order, ties included (coarse
    probabilities and repeated distances make many), on random residents, exclusions and counts."""
    from offload_engine.experts.policies import _least_likely

    rng = np.random.default_rng(0)
    for trial in range(300):
        L, E = int(rng.integers(1, 5)), int(rng.integers(1, 20))
        probability = rng.integers(0, 4, size=(L, E)) / 4 if trial % 2 else rng.random((L, E))
        distance = rng.integers(1, 4, size=L)
        resident = rng.random((L, E)) < rng.random()
        excluded = rng.choice(L * E, int(rng.integers(0, L * E + 1)), replace=False).astype(np.int64)
        for n in (0, 1, 3, L * E + 2):
            got = _least_likely(probability, distance.astype(np.int64), resident, excluded, n).tolist()
            assert got == twin_least_likely(probability, distance, resident, excluded, n), (trial, n)


def test_victims_from_stale_probabilities_recompute_them_as_use_probability_does():
    """PredictivePolicy.victims recomputes stale probabilities in the same compiled call: the same victims as
    from use_probability(), which then returns exactly what _use_probability computes, on random trained states."""
    from offload_engine.experts.policies import _least_likely, _use_probability

    L, E, k = 3, 10, 2
    rng = np.random.default_rng(1)
    policy = PredictivePolicy(L, E, k)
    cache = SlotMap(12, policy, expert_bytes=1)
    counters = new_counters(L)
    for step in range(200):
        layer = step % L
        for s in cache.call(layer, sorted(rng.choice(E, k, replace=False).tolist()), counters).slots:
            cache.arrived(s)
        policy.on_predictions(layer, [(d, (layer + d) % L, rng.choice(E, k, replace=False)) for d in (1, 2)])
        assert policy._probability is None  # every call and prediction leaves them stale
        excluded = {(int(rng.integers(L)), int(rng.integers(E))) for _ in range(3)}
        fresh = _use_probability(policy.age, policy.bucket, policy.uses, policy.calls, policy.pred_uses,
                                 policy.pred_calls, policy.predicted, policy.pending, policy.MAX_AGE)
        flat = np.array([j * E + e for j, e in excluded], dtype=np.int64)
        expected = _least_likely(fresh, policy._distances[policy.layer], policy.resident, flat, 4).tolist()
        assert [j * E + e for j, e in policy.victims(excluded, 4)] == expected
        assert np.array_equal(policy.use_probability(), fresh)
        assert [j * E + e for j, e in policy.victims(excluded, 4)] == expected  # from the cached ones


def test_predictive_policy_knows_the_layer_order():
    """Three layers that always use their expert 0, two slots: LRU evicts exactly the expert the next layer
    needs (0 hits); the predictive policy evicts the one needed furthest ahead, as Belady does (1 in 2)."""
    calls = [(layer, [0]) for _ in range(100) for layer in range(3)]
    assert run_calls(LRUPolicy(), 2, calls) == 0
    requests = {}
    for i, (layer, experts) in enumerate(calls):
        requests.setdefault((layer, experts[0]), []).append(i)
    belady = run_calls(BeladyPolicy(requests), 2, calls)
    predictive = run_calls(PredictivePolicy(3, 4, 1), 2, calls)
    assert belady == 149 and predictive >= belady - 5


def trained_predictive_cache(residents):
    """A predictive policy that has seen 30 tokens of layer 0 using experts 0 and 1, layer 1 using 2 and 3, and
    a cache holding `residents` (loaded into free slots: no victim was weighed)."""
    policy = PredictivePolicy(2, 6, 2)
    for _ in range(30):
        policy.on_call(0, [0, 1])
        policy.on_call(1, [2, 3])
    cache, counters = SlotMap(len(residents), policy, expert_bytes=1), new_counters(2)
    for key in residents:
        cache.arrived(cache.prefetch(key, set(), counters, []))
    return cache, counters


def test_predictive_policy_refuses_a_prefetch_less_likely_than_its_victim():
    """Expert 5 of layer 0 was never used: loading it would cost a resident that is used at every call."""
    cache, counters = trained_predictive_cache([(0, 0), (0, 1)])
    probability = cache.policy.use_probability()
    assert probability[0, 5] < 0.1 < 0.9 < probability[0, 0]
    assert not cache.policy.worth_prefetching((0, 5), (0, 0))
    evicted = []
    assert cache.prefetch((0, 5), set(), counters, evicted) is None
    assert evicted == [] and set(cache.slot_of) == {(0, 0), (0, 1)}
    assert (counters[0].prefetches, counters[0].evictions) == (2, 0)


def test_predictive_policy_accepts_a_prefetch_more_likely_than_its_victim():
    """Expert 1 of layer 0 is used at every call; the resident expert 5 never is: it gives way."""
    cache, counters = trained_predictive_cache([(0, 0), (0, 5)])
    assert cache.policy.worth_prefetching((0, 1), (0, 5))
    evicted = []
    slot = cache.slot_of[(0, 5)]
    assert cache.prefetch((0, 1), set(), counters, evicted) == slot
    assert evicted == [(0, 5)] and set(cache.slot_of) == {(0, 0), (0, 1)}
    assert (counters[0].prefetches, counters[0].evictions) == (3, 1)


def test_predictive_probabilities_match_their_formula():
    """The compiled counts and use probabilities against the formula written out with plain loops: hazards by
    (layer, popularity bucket, age), predictions graded by (distance, named, age), a named expert's
    probability from the graded predictions, a victim the lowest hit density (ties: the farthest layer)."""
    rng = np.random.default_rng(0)
    L, E, k = 3, 6, 2
    P = PredictivePolicy
    policy = P(L, E, k)
    N, base = P.MAX_AGE, k / E
    edges = [x * base for x in P.POPULARITY_EDGES]
    bucket_of = lambda x: sum(1 for edge in edges if edge <= x)  # noqa: E731 - searchsorted, right side
    ages = {(j, e): N for j in range(L) for e in range(E)}
    pop = {(j, e): base for j in range(L) for e in range(E)}
    uses = {(j, b, a): P.PRIOR * base for j in range(L) for b in range(len(edges) + 1) for a in range(N + 2)}
    calls = {key: P.PRIOR for key in uses}
    pred_uses = {(d, n, a): P.PRIOR * base for d in range(P.MAX_DEPTH + 1) for n in (0, 1) for a in range(N + 2)}
    pred_calls = {key: P.PRIOR for key in pred_uses}
    pending: dict[int, dict[int, set]] = {j: {} for j in range(L)}  # layer -> distance -> named experts
    for step in range(90):
        layer = step % L
        experts = sorted(rng.choice(E, k, replace=False).tolist())
        policy.on_call(layer, experts)
        for e in range(E):
            age = min(ages[layer, e] + 1, N + 1)
            used = e in experts
            for d, named in pending[layer].items():
                pred_calls[d, int(e in named), age] += 1
                pred_uses[d, int(e in named), age] += used
            b = bucket_of(pop[layer, e])
            calls[layer, b, age] += 1
            uses[layer, b, age] += used
            ages[layer, e] = 0 if used else min(ages[layer, e] + 1, N)
            pop[layer, e] += P.POPULARITY_DECAY * (used - pop[layer, e])
        pending[layer] = {}
        if step % 2:  # predictions for the next two layers, some steps only
            for d in (1, 2):
                named = rng.choice(E, k, replace=False)
                policy.on_predictions(layer, [(d, (layer + d) % L, named)])
                pending[(layer + d) % L][d] = set(named.tolist())
    probability = policy.use_probability()
    expected = {}
    for j in range(L):
        for e in range(E):
            age = min(ages[j, e] + 1, N + 1)
            near = min(pending[j], default=None)
            if near is not None and e in pending[j][near]:
                expected[j, e] = pred_uses[near, 1, age] / pred_calls[near, 1, age]
            else:
                b = bucket_of(pop[j, e])
                expected[j, e] = uses[j, b, age] / calls[j, b, age]
            assert probability[j, e] == pytest.approx(expected[j, e], rel=1e-12)
    for key in [(j, e) for j in range(L) for e in range(E) if (j + e) % 2]:
        policy.on_insert(key)
    residents = [(j, e) for j in range(L) for e in range(E) if (j + e) % 2]
    distance = lambda j: (j - layer) % L or L  # noqa: E731 - calls until layer j's next call
    want = min(residents, key=lambda key: (expected[key] / distance(key[0]), -distance(key[0]), -key[0], -key[1]))
    assert policy.victim(set()) == want
    assert policy.victim({want}) != want


# -- predictors ------------------------------------------------------------------------------------------
def twin_tally(predicted, actual, n):
    hits = total = tokens = 0
    for row_p, row_a in zip(predicted, actual):
        if any(x < 0 for x in row_a) or row_p[0] < 0:
            continue
        hits += len(set(x for x in row_p[:n] if x >= 0) & set(row_a))
        total += len(row_a)
        tokens += 1
    return hits / total, hits / (n * tokens)


def test_recall_and_precision_equal_their_plain_loop_twin():
    rng = np.random.default_rng(3)
    for _ in range(50):
        rows, k, E = int(rng.integers(1, 9)), 3, 12
        actual = np.stack([rng.permutation(E)[:k] for _ in range(rows)])
        predicted = np.stack([rng.permutation(E)[:2 * k] for _ in range(rows)])
        actual[rng.random(rows) < 0.2, 0] = -1
        tally = Tally()
        tally.add(predicted, actual, (k, 2 * k))
        if tally.tokens == 0:
            continue
        for n in (k, 2 * k):
            recall, precision = twin_tally(predicted, actual, n)
            assert tally.recall(n) == pytest.approx(recall) and tally.precision(n) == pytest.approx(precision)


class Oracle(Predictor):
    """Names the trace's own next experts: recall 1 at every distance, by construction."""

    name = "oracle"

    def __init__(self, ids):
        self.ids, self.t = ids, -1

    def observe(self, ctx):
        self.t += ctx.layer == 0

    def predict(self, ctx, depth, n):
        L = self.ids.shape[2]
        return [Prediction(d, ctx.layer + d, self.ids[:, self.t, ctx.layer + d]) for d in range(1, depth + 1)
                if ctx.layer + d < L]


def test_evaluation_scores_an_oracle_perfectly_and_counts_every_prediction():
    trace = random_trace(1, n=4, t=10, layers=4)
    acc = evaluate(Oracle(trace.expert_ids.astype(np.int64)), trace.expert_ids, depth=3)
    assert [acc.overall[d]["recall"][2] for d in (1, 2, 3)] == [1.0, 1.0, 1.0]
    assert [acc.overall[d]["tokens"] for d in (1, 2, 3)] == [4 * 10 * 3, 4 * 10 * 2, 4 * 10 * 1]


class TwinHistory:
    """The history predictor written out with Python loops: every table learned here from the routing observed
    (nothing read from the predictor under test), and its score from them: naive Bayes with the target layer's
    smoothed usage as the prior, each source expert's smoothed co-occurrence as evidence, and the repetition."""

    def __init__(self, L, E, k, distances):
        self.L, self.E, self.k, self.distances = L, E, k, list(distances)
        D = len(self.distances)
        self.co = np.zeros((L, D, E, E))  # co[l, i, a, b]: tokens with a at l and b at l + distances[i]
        self.seen = np.zeros((L, D, E))  # tokens with a at l
        self.usage = np.zeros((L, E))
        self.repeat = np.full(L, 0.5)  # share of a layer's experts the next token reuses

    def observe(self, paths, layer):
        from offload_engine.foresight.predictors.history import REPEAT_DECAY

        for r in range(paths.current.shape[0]):
            if paths.current[r, layer, 0] < 0:
                continue
            ids = [b for b in paths.current[r, layer].tolist() if b >= 0]
            for b in ids:
                self.usage[layer, b] += 1
            for i, d in enumerate(self.distances):
                if d > layer + self.L:  # the source would be two tokens back
                    continue
                src = paths.current if layer - d >= 0 else paths.previous
                src_layer = (layer - d) % self.L
                if src[r, src_layer, 0] < 0:
                    continue
                for a in src[r, src_layer].tolist():
                    if a >= 0:
                        self.seen[src_layer, i, a] += 1
                        for b in ids:
                            self.co[src_layer, i, a, b] += 1
            last = paths.previous[r, layer].tolist()
            if last[0] >= 0:
                reused = len(set(ids) & set(last))
                self.repeat[layer] += REPEAT_DECAY * (reused / self.k - self.repeat[layer])

    def scores(self, paths, layer, depth, target, sources):
        from offload_engine.foresight.predictors.history import SMOOTHING

        rows, L, _ = paths.current.shape
        E, k = self.E, self.k
        prior = [(self.usage[target, b] + 1) / (self.usage[target].sum() + E) * k for b in range(E)]
        out = np.zeros((rows, E))
        for r in range(rows):
            for b in range(E):
                out[r, b] = np.log(prior[b])
            for back in range(sources):
                src_layer = layer - back
                src = paths.current if src_layer >= 0 else paths.previous
                src_layer %= L
                if src[r, src_layer, 0] < 0:
                    continue
                i = self.distances.index(depth + back)
                for a in src[r, src_layer]:
                    if a >= 0:
                        for b in range(E):
                            given_a = ((self.co[src_layer, i, a, b] + SMOOTHING * prior[b] / k)
                                       / (self.seen[src_layer, i, a] + SMOOTHING))
                            out[r, b] += np.log(given_a / prior[b])
            last = paths.current if target <= layer else paths.previous
            if last[r, target, 0] >= 0:
                for b in range(E):
                    used = b in set(last[r, target].tolist())
                    prob = self.repeat[target] if used else (1 - self.repeat[target]) * k / (E - k)
                    out[r, b] += np.log(prob / prior[b])
        return out


def test_history_predictor_kernels_equal_their_plain_loop_twin():
    """Every table and score against the twin's own, at 6 layers (distances 1-4 and the own layer's next call,
    6-8), at 4 (where the two overlap and a distance past L would reach two tokens back: not counted), and with
    a fifth of the calls unknown (-1, as a trace pads them)."""
    from offload_engine.foresight.predictors import history

    for L, missing in ((6, 0.0), (4, 0.0), (6, 0.2)):
        trace = random_trace(5, n=3, t=30, layers=L, experts=10, k=3, missing=missing)
        p = HistoryPredictor(L, 10, 3)
        wanted = sorted(set(range(1, 3 + history.SOURCES)) | set(range(L, L + history.SOURCES)))
        assert p.distances.tolist() == wanted
        twin = TwinHistory(L, 10, 3, wanted)
        paths = Paths.empty(3, L, 3)
        for t in range(30):
            for layer in range(L):
                ids = trace.expert_ids[:, t, layer].astype(np.int64)
                paths.observe(layer, ids)
                ctx = LayerContext(layer, ids, None, paths)
                p.observe(ctx)
                twin.observe(paths, layer)
                if t > 3:
                    for d in (1, 3, L):
                        got = p.scores(ctx, d, (layer + d) % L)
                        assert np.allclose(got, twin.scores(paths, layer, d, (layer + d) % L, history.SOURCES))
                    predictions = p.predict(ctx, L, 3)
                    predicted = [(q.depth, q.layer) for q in predictions]
                    assert predicted[-1] == (L, layer) and len(predicted) == min(3, L) + (L > 3)
                    for q in predictions:  # one compiled call ranks every target as ranked() ranks its scores
                        assert np.array_equal(q.experts, ranked(p.scores(ctx, q.depth, q.layer), 3))
        for table in ("co", "seen", "usage"):
            assert np.array_equal(getattr(p, table), getattr(twin, table)), (L, missing, table)
        assert np.allclose(p.repeat, twin.repeat) and np.abs(twin.repeat - 0.5).min() > 0.05  # learned, and moved
    with pytest.raises(ValueError, match="no evidence for 4 layers ahead"):
        HistoryPredictor(8, 10, 3).scores(LayerContext(0, ids, None, Paths.empty(3, 8, 3)), 4, 4)


def test_history_scores_stay_finite_after_a_billion_tokens():
    """_scores multiplies up to PRODUCT ratios before a logarithm: with counts of a billion tokens and experts
    never seen together, each ratio is ~1e-19, and the products must neither underflow nor drift from the twin's
    sum of logarithms."""
    from offload_engine.foresight.predictors import history

    L, E, k = 4, 64, 16
    p = HistoryPredictor(L, E, k)
    p.usage[:] = 1e9
    p.usage[:, 0] = 0.0
    p.seen[:] = 1e9
    twin = TwinHistory(L, E, k, p.distances.tolist())
    twin.co, twin.seen, twin.usage = p.co.astype(np.float64), p.seen.astype(np.float64), p.usage.copy()
    paths = Paths.empty(1, L, k)
    for layer in range(L):
        paths.observe(layer, np.arange(E - k, E)[None] - layer)
    ctx = LayerContext(L - 1, paths.current[:, L - 1], None, paths)
    got = p.scores(ctx, 1, 0)
    assert np.isfinite(got).all()
    assert np.allclose(got, twin.scores(paths, L - 1, 1, 0, history.SOURCES), rtol=1e-12, atol=1e-9)


def test_history_predictor_learns_a_deterministic_path():
    """Routing where layer l+1 always uses (layer l's experts + 1): recall climbs towards 1 as it learns
    (random guessing: k / E = 0.25)."""
    L, E, k, T = 4, 8, 2, 300
    ids = np.zeros((1, T, L, k), dtype=np.int16)
    rng = np.random.default_rng(0)
    for t in range(T):
        first = rng.permutation(E)[:k]
        for layer in range(L):
            ids[0, t, layer] = (first + layer) % E
    early = evaluate(HistoryPredictor(L, E, k), ids[:, :30], depth=2)
    acc = evaluate(HistoryPredictor(L, E, k), ids, depth=2)
    assert acc.overall[1]["recall"][k] > 0.8 and acc.overall[2]["recall"][k] > 0.8
    assert early.overall[1]["recall"][k] < acc.overall[1]["recall"][k]
    assert NEXT_TOKEN in acc.overall  # history also guesses the next token's first layers


def twin_router_logits(norm_weight, eps, router_weight, x):
    """A softmax router's logits for one residual row x [H], written out: RMSNorm, then one dot product per
    expert (softmax keeps their order, so the router's top-k are the k largest)."""
    rms = math.sqrt(sum(float(v) ** 2 for v in x) / len(x) + eps)
    normed = x / rms * norm_weight
    return [float(torch.dot(w, normed)) for w in router_weight]


@pytest.mark.parametrize("name", ["default", "qwen3_moe"])
def test_next_gate_names_each_target_layers_own_router_top_k(tmp_path, name):
    """Next-gate's prediction for layer l + d is layer (l + d)'s router (after its post-attention norm) applied to
    the residual given, for every layer and distance: the bundled model (6 MoE layers) and a tiny qwen3-moe whose
    MoE layers are decoder layers 1 and 3 (a position is not a decoder layer's index)."""
    from offload_engine import DEFAULT_MODEL
    from offload_engine.foresight import HORIZON

    path = DEFAULT_MODEL if name == "default" else tm.save_checkpoint(tm.build_reference(name), tmp_path, "fused")
    engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", predictor="next-gate", progress=False)
    spec, config = engine.spec, engine.model.config
    L, E, k = spec.num_moe_layers, spec.num_experts, spec.top_k
    decoder = engine.model.model.layers
    rows = 5
    residual = torch.randn(rows, config.hidden_size, generator=torch.Generator().manual_seed(0))
    logits, top = {}, {}
    for j in range(L):
        layer = decoder[spec.moe_layers[j]]
        for r in range(rows):
            logits[j, r] = twin_router_logits(layer.post_attention_layernorm.weight.detach(), config.rms_norm_eps,
                                              layer.mlp.gate.weight.detach(), residual[r])
            order = sorted(range(E), key=lambda e: -logits[j, r][e])
            gaps = [logits[j, r][a] - logits[j, r][b] for a, b in zip(order[:k], order[1:k + 1])]
            assert min(gaps) > 1e-5, (j, r)  # no near-tie within the top k or at its edge
            top[j, r] = order[:k]
    predictor = engine.runtime.predictor
    for layer in range(L):
        ctx = LayerContext(layer, np.zeros((rows, k), dtype=np.int64), residual, Paths.empty(rows, L, k))
        for n in (k, E):  # the router's own top-k (the engine's case), and the full ranking after it
            predictions = predictor.predict(ctx, HORIZON, n)
            assert [(p.depth, p.layer) for p in predictions] == [(d, layer + d) for d in range(1, HORIZON + 1)
                                                                 if layer + d < L]
            for p in predictions:
                for r in range(rows):
                    ranking = p.experts[r].tolist()
                    assert ranking[:k] == top[p.layer, r], (layer, p.depth, n, r)
                    ranked = [logits[p.layer, r][e] for e in ranking]  # best first, up to rounding
                    assert len(set(ranking)) == len(ranking) == n
                    assert all(a >= b - 1e-5 for a, b in zip(ranked, ranked[1:])), (layer, p.depth, r)


def test_rebucket_is_searchsorted_from_any_start():
    """The policy's bucket update (one step from the old bucket) against numpy's searchsorted, right side, on
    random popularities, from every starting bucket, edges included."""
    from offload_engine.experts.policies import _rebucket

    rng = np.random.default_rng(0)
    edges = np.asarray(PredictivePolicy.POPULARITY_EDGES) * (8 / 128)
    values = np.concatenate([rng.uniform(0, 1, 500), edges, [0.0, 1.0]])
    for x in values:
        want = int(np.searchsorted(edges, x, side="right"))
        assert all(_rebucket(edges, b, x) == want for b in range(len(edges) + 1)), x
