"""Eviction policies for the expert cache: which resident expert gives up its slot.

A policy sees keys (layer position, expert) and events; it knows nothing about tensors. The same classes run
in the engine's cache and in the replay simulator (tracing/replay.py), so a replayed trace gives the engine's counts.

    on_call(layer, experts)   a layer call starts; `experts` is what the router really chose (ascending ids)
    on_insert(key)            a key was loaded for the current call (it is used now)
    on_prefetch(key)          a key was loaded ahead of the call that will need it
    on_hit(key)               a call used a resident (or arriving) key
    on_evict(key)             a key left the cache
    victim(excluded)          the key to evict; never one in `excluded` (the call's own experts, keys arriving)
    victims(excluded, n)      the next n victims in turn (each evicted before the next is asked for), in one step
    worth_prefetching(k, v)   whether loading k is worth evicting v
    on_predictions(layer, p)  a predictor's ranked experts for the next layers (PredictivePolicy only)
"""

from __future__ import annotations

import bisect
import heapq
from collections import OrderedDict
from collections.abc import Sequence

import numba
import numpy as np

Key = tuple[int, int]


class NoVictimError(RuntimeError):
    """Every resident expert is protected: the cache has fewer slots than one call needs."""


class Victims:
    """victim() as the first of victims(): each policy ranks its victims once, in victims()."""

    def victim(self, excluded: set) -> Key:
        found = self.victims(excluded, 1)
        if not found:
            raise NoVictimError("every resident expert is protected; the cache needs more slots")
        return found[0]


class LRUPolicy(Victims):
    """Least recently used: evict the key whose last use is oldest."""

    name = "lru"

    def __init__(self, num_layers: int = 0, num_experts: int = 0, top_k: int = 0):
        self._order: OrderedDict[Key, None] = OrderedDict()  # oldest first

    def on_call(self, layer: int, experts: Sequence[int]) -> None:
        pass

    def on_insert(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    on_prefetch = on_insert

    def on_hit(self, key: Key) -> None:
        self._order.move_to_end(key)

    def on_evict(self, key: Key) -> None:
        del self._order[key]

    def victims(self, excluded: set, n: int) -> list[Key]:
        out = []
        for key in self._order:
            if len(out) == n:
                break
            if key not in excluded:
                out.append(key)
        return out

    def worth_prefetching(self, key: Key, victim: Key) -> bool:
        return True

    def on_predictions(self, layer: int, predictions) -> None:
        pass

    def reuse(self, key: Key) -> float:
        """Expected further uses of `key` soon if it were loaded now: LRU keeps no such knowledge."""
        return 0.0


class PredictivePolicy(Victims):
    """Evict the resident expert with the lowest hit density: its probability of being used at its layer's
    next call, per call it would hold the slot until then (LHD, Beckmann et al., NSDI 2018, with the layer
    order known), every probability learned at run time from what the router really chose (ExpertFlow's
    predictive cache, corrected by the router).

    MoE layers run in a fixed order, so every resident expert's next chance comes at its layer's next call,
    d calls ahead. Its chance there is counted per layer, by the expert's age (calls of its layer since its
    last use) and its popularity (a running mean of its use per call of its layer, bucketed against the
    uniform rate k/E): the hazard h(layer, popularity, age) = uses / calls at that (layer, bucket, age). An
    expert a predictor names for a layer's next call gets P(used | named, prediction distance, age) instead,
    counted the same way from the predictions already graded against the router's choices, so a poor
    predictor earns little trust. An expert a predictor left out keeps its hazard.

    Measured on the bundled model's held-out trace (BENCHMARKS.md), against the expected distance to the next
    use that this policy first used: the popularity adds 0.04-0.05 to the hit rate at every size above one
    token's experts; the density (rather than the expected distance, whose long tails made it tie LRU at a
    cache of one token's experts) is what moves it past LRU there.
    """

    name = "predictive"
    MAX_AGE = 64  # ages are counted up to this; older experts share one bucket
    MAX_DEPTH = 8
    PRIOR = 2.0  # pseudo-calls at the uniform rate k/E in every count, so early estimates stay sane
    POPULARITY_DECAY = 1 / 16  # weight of the newest call in an expert's running popularity
    POPULARITY_EDGES = (0.125, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 6)  # bucket edges, in units of k/E

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        L, E, N, D = num_layers, num_experts, self.MAX_AGE, self.MAX_DEPTH
        base = top_k / num_experts
        self.edges = np.asarray(self.POPULARITY_EDGES, dtype=np.float64) * base
        B = len(self.edges) + 1
        self.resident = np.zeros((L, E), dtype=bool)
        self.age = np.full((L, E), N, dtype=np.int64)  # calls of the layer since the expert's last use
        self.popularity = np.full((L, E), base)
        # each expert's popularity bucket, kept with its popularity (searchsorted over every expert, each time the
        # probabilities were recomputed, was most of their cost)
        self.bucket = np.searchsorted(self.edges, self.popularity, side="right").astype(np.int64)
        # hazard counts at a call by (layer, popularity bucket, age 1..N+1): uses and opportunities
        self.uses = np.full((L, B, N + 2), self.PRIOR * base)
        self.calls = np.full((L, B, N + 2), self.PRIOR)
        # the same by (prediction distance, named by the predictor or not, age), over all layers
        self.pred_uses = np.full((D + 1, 2, N + 2), self.PRIOR * base)
        self.pred_calls = np.full((D + 1, 2, N + 2), self.PRIOR)
        self.predicted = np.zeros((L, D + 1, E), dtype=bool)  # pending predictions of each layer's next call
        self.pending = np.zeros((L, D + 1), dtype=bool)
        self.layer = L - 1
        d = (np.arange(L)[None, :] - np.arange(L)[:, None]) % L  # [current layer, layer j]: calls until j's next
        d[np.arange(L), np.arange(L)] = L
        self._distances = d.astype(np.int64)
        self._probability: np.ndarray | None = None  # cached until the next event that changes it
        self._warm()

    def _warm(self) -> None:
        """Load (or compile) the kernels now, while the engine loads: the first call of a process costs numba
        about a second, which would otherwise land on the first token. Runs on copies: nothing is counted."""
        used = np.zeros(self.num_experts, dtype=np.bool_)
        _count_call(self.age.copy(), self.popularity.copy(), self.bucket.copy(), self.edges, self.uses.copy(),
                    self.calls.copy(), self.pred_uses.copy(), self.pred_calls.copy(), self.predicted.copy(),
                    self.pending.copy(), 0, used, self.MAX_AGE, self.POPULARITY_DECAY)
        _mark(self.predicted.copy(), self.pending.copy(), 0, 0, np.zeros(1, dtype=np.int64))
        _least_likely(self.use_probability(), self._distances[0], self.resident, np.zeros(0, dtype=np.int64), 1)
        _least_likely_afresh(np.empty((self.num_layers, self.num_experts)), self.age, self.bucket, self.uses,
                             self.calls, self.pred_uses, self.pred_calls, self.predicted, self.pending, self.MAX_AGE,
                             self._distances[0], self.resident, np.zeros(0, dtype=np.int64), 1)

    def on_call(self, layer: int, experts: Sequence[int]) -> None:
        used = np.zeros(self.num_experts, dtype=np.bool_)
        for e in experts:  # a decode call's few experts: cheaper than numpy's conversion of a list index
            used[e] = True
        _count_call(self.age, self.popularity, self.bucket, self.edges, self.uses, self.calls, self.pred_uses,
                    self.pred_calls, self.predicted, self.pending, layer, used, self.MAX_AGE, self.POPULARITY_DECAY)
        self.layer = layer
        self._probability = None

    def on_predictions(self, layer: int, predictions) -> None:
        """predictions: (distance d >= 1, target layer j, ranked expert ids) for the calls after `layer`'s."""
        for depth, target, experts in predictions:  # depth L: the layer's own next call (the next token's)
            # the farther ones share the last bucket of graded predictions
            _mark(self.predicted, self.pending, target, min(depth, self.MAX_DEPTH), experts)
        self._probability = None

    def use_probability(self) -> np.ndarray:
        """[L, E] each expert's probability of being used at its layer's next call."""
        if self._probability is None:
            self._probability = _use_probability(self.age, self.bucket, self.uses, self.calls, self.pred_uses,
                                                 self.pred_calls, self.predicted, self.pending, self.MAX_AGE)
        return self._probability

    def on_insert(self, key: Key) -> None:
        self.resident[key] = True

    on_prefetch = on_insert

    def on_hit(self, key: Key) -> None:
        pass

    def on_evict(self, key: Key) -> None:
        self.resident[key] = False

    def victims(self, excluded: set, n: int) -> list[Key]:
        """The n lowest hit densities in turn: what n calls of victim() give while each victim is evicted (the
        probabilities do not change in between: a prefetch asks for several, and a call each cost ~5 us)."""
        flat = np.array([layer * self.num_experts + e for layer, e in excluded], dtype=np.int64)
        distance = self._distances[self.layer]
        if self._probability is None:  # stale (every call and prediction makes it so): recomputed in the same call
            self._probability = np.empty((self.num_layers, self.num_experts))
            best = _least_likely_afresh(self._probability, self.age, self.bucket, self.uses, self.calls,
                                        self.pred_uses, self.pred_calls, self.predicted, self.pending, self.MAX_AGE,
                                        distance, self.resident, flat, n)
        else:
            best = _least_likely(self._probability, distance, self.resident, flat, n)
        return [divmod(i, self.num_experts) for i in best.tolist()]

    def worth_prefetching(self, key: Key, victim: Key) -> bool:
        probability = self.use_probability()
        return bool(probability[key] > probability[victim])

    def reuse(self, key: Key) -> float:
        """Expected further uses soon, if loaded now: p / (1 - p) with p = P(used at its layer's next call)
        just after a use (the expected run of consecutive uses if each follows with probability p)."""
        layer, e = key
        b = self.bucket[layer, e]
        p = min(0.95, float(self.uses[layer, b, 1] / self.calls[layer, b, 1]))
        return p / (1 - p)


class BeladyPolicy(Victims):
    """Clairvoyant (replay only): evict the key whose next request is furthest away (never: infinitely far;
    ties towards the larger (layer, expert)). `requests` maps each key to the ascending call indices that ask
    for it; the replay calls on_call once per call, in order."""

    name = "belady"

    def __init__(self, requests: dict[Key, list[int]]):
        self.requests = requests
        self.call = -1
        self.resident: set[Key] = set()

    def on_call(self, layer: int, experts: Sequence[int]) -> None:
        self.call += 1

    def next_use(self, key: Key) -> float:
        uses = self.requests.get(key, ())
        i = bisect.bisect_right(uses, self.call)
        return uses[i] if i < len(uses) else float("inf")

    def on_insert(self, key: Key) -> None:
        self.resident.add(key)

    on_prefetch = on_insert

    def on_hit(self, key: Key) -> None:
        pass

    def on_evict(self, key: Key) -> None:
        self.resident.discard(key)

    def victims(self, excluded: set, n: int) -> list[Key]:
        candidates = [k for k in self.resident if k not in excluded]
        return heapq.nlargest(n, candidates, key=lambda k: (self.next_use(k), k))

    def worth_prefetching(self, key: Key, victim: Key) -> bool:
        return self.next_use(key) < self.next_use(victim)

    def on_predictions(self, layer: int, predictions) -> None:
        pass


POLICIES = {"lru": LRUPolicy, "predictive": PredictivePolicy}


def make_policy(name: str, num_layers: int, num_experts: int, top_k: int):
    try:
        return POLICIES[name](num_layers, num_experts, top_k)
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None


# -- kernels: the engine calls these on every layer call, so they must cost microseconds ----------------------
@numba.njit(cache=True)
def _count_call(age, popularity, bucket, edges, uses, calls, pred_uses, pred_calls, predicted, pending, layer, used,
                max_age, decay):  # pragma: no cover - compiled
    """One call of `layer`: grade its pending predictions and its experts' hazards against what was used, then
    age the experts and update their popularity (and its bucket: searchsorted(edges, popularity, right))."""
    E = age.shape[1]
    depths = np.nonzero(pending[layer])[0]  # the distances of this call's pending predictions, ascending
    for e in range(E):
        a = min(age[layer, e] + 1, max_age + 1)  # the age the expert has at this call
        u = 1.0 if used[e] else 0.0
        for d in depths:
            named = 1 if predicted[layer, d, e] else 0
            pred_calls[d, named, a] += 1.0
            pred_uses[d, named, a] += u
        b = bucket[layer, e]  # its bucket at this call
        calls[layer, b, a] += 1.0
        uses[layer, b, a] += u
        age[layer, e] = 0 if used[e] else min(age[layer, e] + 1, max_age)
        popularity[layer, e] += decay * (u - popularity[layer, e])
        bucket[layer, e] = _rebucket(edges, b, popularity[layer, e])
    for d in range(pending.shape[1]):
        pending[layer, d] = False


@numba.njit(cache=True)
def _rebucket(edges, b, x):  # pragma: no cover - compiled
    """searchsorted(edges, x, side="right") from the bucket b that x was in before one popularity update: a call
    moves a popularity by at most 1/16, so the answer is b or next to it (a search per expert was most of a call)."""
    while b < len(edges) and edges[b] <= x:
        b += 1
    while b > 0 and edges[b - 1] > x:
        b -= 1
    return b


@numba.njit(cache=True)
def _use_probability(age, bucket, uses, calls, pred_uses, pred_calls, predicted, pending,
                     max_age):  # pragma: no cover - compiled
    """[L, E] P(used at the layer's next call): the hazard, or for an expert named by the nearest pending
    prediction of its layer, the graded rate of such predictions."""
    out = np.empty(age.shape)
    _fill_probability(out, age, bucket, uses, calls, pred_uses, pred_calls, predicted, pending, max_age)
    return out


@numba.njit(cache=True)
def _least_likely_afresh(probability, age, bucket, uses, calls, pred_uses, pred_calls, predicted, pending, max_age,
                         distance, resident, excluded, n):  # pragma: no cover - compiled
    """_least_likely over probabilities first written into `probability` (as _use_probability gives them): one
    call instead of two where they are stale, as they are at a call's victims (~1 us each to enter)."""
    _fill_probability(probability, age, bucket, uses, calls, pred_uses, pred_calls, predicted, pending, max_age)
    return _least_likely(probability, distance, resident, excluded, n)


@numba.njit(cache=True)
def _fill_probability(out, age, bucket, uses, calls, pred_uses, pred_calls, predicted, pending,
                      max_age):  # pragma: no cover - compiled
    L, E = age.shape
    for layer in range(L):
        depth = -1
        for d in range(pending.shape[1]):
            if pending[layer, d]:
                depth = d
                break
        for e in range(E):
            a = min(age[layer, e] + 1, max_age + 1)
            if depth >= 0 and predicted[layer, depth, e]:
                out[layer, e] = pred_uses[depth, 1, a] / pred_calls[depth, 1, a]
            else:
                b = bucket[layer, e]
                out[layer, e] = uses[layer, b, a] / calls[layer, b, a]


@numba.njit(cache=True)
def _least_likely(probability, distance, resident, excluded, n):  # pragma: no cover - compiled
    """The flat indices of up to n resident, not excluded keys, lowest hit density first: P(used at its layer's
    next call) / calls until that call (ties: the larger distance, then the larger index), each the lowest of
    those left. One pass, the n lowest kept sorted as the keys go by (a scan per victim, as this was written
    before, cost a prefetch asking for len(keys) victims a scan each)."""
    L, E = probability.shape
    skip = np.zeros(L * E, dtype=np.bool_)
    for x in excluded:
        skip[x] = True
    out = np.empty(n, dtype=np.int64)
    best_s = np.empty(n)
    best_d = np.empty(n, dtype=np.int64)
    found = 0
    for layer in range(L):
        d = distance[layer]
        for e in range(E):
            if not resident[layer, e] or skip[layer * E + e]:
                continue
            s = probability[layer, e] / d
            # the first kept key this one comes before: the index rises as the keys go by, so a tie in density
            # and distance puts this one first
            at = found
            while at > 0 and (s < best_s[at - 1] or (s == best_s[at - 1] and d >= best_d[at - 1])):
                at -= 1
            if at == n:
                continue
            for j in range(min(found, n - 1), at, -1):
                out[j], best_s[j], best_d[j] = out[j - 1], best_s[j - 1], best_d[j - 1]
            out[at], best_s[at], best_d[at] = layer * E + e, s, d
            found = min(found + 1, n)
    return out[:found]


@numba.njit(cache=True)
def _mark(predicted, pending, target, d, experts):  # pragma: no cover - compiled
    """A prediction at distance d of layer `target`'s next call (indexed here: a view and a write from Python,
    three times a call, cost more than the marking)."""
    row = predicted[target, d]
    row[:] = False
    for e in experts:
        row[e] = True
    pending[target, d] = True
