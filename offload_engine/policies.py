"""Eviction policies for the expert cache: which resident expert gives up its slot.

A policy sees keys (layer position, expert) and events; it knows nothing about tensors. The same classes run
in the engine's cache and in the replay simulator (replay.py), so a replayed trace gives the engine's counts.

    on_call(layer, experts)   a layer call starts; `experts` is what the router really chose (ascending ids)
    on_insert(key)            a key was loaded for the current call (it is used now)
    on_prefetch(key)          a key was loaded ahead of the call that will need it
    on_hit(key)               a call used a resident (or arriving) key
    on_evict(key)             a key left the cache
    victim(excluded)          the key to evict; never one in `excluded` (the call's own experts, keys arriving)
    worth_prefetching(k, v)   whether loading k is worth evicting v
    on_predictions(layer, p)  a predictor's ranked experts for the next layers (PredictivePolicy only)
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence

import numba
import numpy as np

Key = tuple[int, int]


class NoVictimError(RuntimeError):
    """Every resident expert is protected: the cache has fewer slots than one call needs."""


class LRUPolicy:
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

    def victim(self, excluded: set) -> Key:
        for key in self._order:
            if key not in excluded:
                return key
        raise NoVictimError("every resident expert is protected; the cache needs more slots")

    def worth_prefetching(self, key: Key, victim: Key) -> bool:
        return True

    def on_predictions(self, layer: int, predictions) -> None:
        pass

    def reuse(self, key: Key) -> float:
        """Expected further uses of `key` soon if it were loaded now: LRU keeps no such knowledge."""
        return 0.0


class PredictivePolicy:
    """Evict the resident expert expected to be needed furthest in the future (ExpertFlow's predictive cache),
    with every probability learned at run time from what the router really chose.

    MoE layers run in a fixed order, so the next call of layer j comes d_j calls after the current layer l
    (d_j = (j - l) mod L, or L for l itself). An expert's chance of being used at a call depends on its age
    (calls of its layer since its last use): the engine counts, per layer, how often an expert of each age
    was used (a hazard h(age)); from it, T(a) = expected calls of its layer skipped before the next use at
    age a (T(a) = (1 - h(a)) (1 + T(a + 1))). Expected distance to the next use:

        d_j + L * T(age + 1)                                       no prediction pending for layer j
        d_j + L * (1 - p) * (1 + T(age + 2))                       a predictor named (or did not name) e

    where p = P(used | predicted or not, age, prediction distance), counted the same way from the
    predictions already graded against the router's real choices (so a poor predictor earns little trust).
    """

    name = "predictive"
    MAX_AGE = 64  # ages are counted up to this; older experts share one bucket
    MAX_DEPTH = 8
    PRIOR = 2.0  # pseudo-calls at the uniform rate k/E in every count, so early estimates stay sane

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        L, E, N, D = num_layers, num_experts, self.MAX_AGE, self.MAX_DEPTH
        base = top_k / num_experts
        self.resident = np.zeros((L, E), dtype=bool)
        self.age = np.full((L, E), N, dtype=np.int64)  # calls of the layer since the expert's last use
        # hazard counts by age at a call (index 1..N+1): uses and opportunities, per layer
        self.uses = np.full((L, N + 2), self.PRIOR * base)
        self.calls = np.full((L, N + 2), self.PRIOR)
        self.skipped = np.zeros((L, N + 3))  # T(a) per layer
        # the same by (prediction distance, named by the predictor or not, age), over all layers
        self.pred_uses = np.full((D + 1, 2, N + 2), self.PRIOR * base)
        self.pred_calls = np.full((D + 1, 2, N + 2), self.PRIOR)
        self.predicted = np.zeros((L, D + 1, E), dtype=bool)  # pending predictions of each layer's next call
        self.pending = np.zeros((L, D + 1), dtype=bool)
        self.layer = L - 1
        d = (np.arange(L)[None, :] - np.arange(L)[:, None]) % L  # [current layer, layer j]: calls until j's next
        d[np.arange(L), np.arange(L)] = L
        self._bases = d.astype(np.float64)
        self._base = self._bases[self.layer]
        self._distance: np.ndarray | None = None  # cached until the next event that changes it
        for j in range(L):
            self._refresh(j)

    def _set_position(self, layer: int) -> None:
        self.layer = layer
        self._base = self._bases[layer]

    def _refresh(self, layer: int) -> None:
        _expected_skips(self.uses[layer], self.calls[layer], self.skipped[layer])

    def on_call(self, layer: int, experts: Sequence[int]) -> None:
        used = np.zeros(self.num_experts, dtype=np.bool_)
        used[list(experts)] = True
        _count_call(self.age, self.uses, self.calls, self.pred_uses, self.pred_calls, self.predicted, self.pending,
                    layer, used, self.MAX_AGE)
        self._refresh(layer)
        self._set_position(layer)
        self._distance = None

    def on_predictions(self, layer: int, predictions) -> None:
        """predictions: (distance d >= 1, target layer j, ranked expert ids) for layers after `layer`."""
        for depth, target, experts in predictions:
            if target != layer and depth <= self.MAX_DEPTH:
                _mark(self.predicted[target, depth], experts)
                self.pending[target, depth] = True
        self._distance = None

    def expected_distance(self) -> np.ndarray:
        """[L, E] expected calls until each expert's next use."""
        if self._distance is not None:
            return self._distance
        L, N = self.num_layers, self.MAX_AGE
        age1 = np.minimum(self.age + 1, N + 1)
        skipped = np.take_along_axis(self.skipped, age1, axis=1)
        has = self.pending.any(axis=1)
        if has.any():
            depth = np.argmax(self.pending, axis=1)  # the nearest pending prediction of each layer
            named = self.predicted[np.arange(L), depth].astype(np.int64)
            p = self.pred_uses[depth[:, None], named, age1] / self.pred_calls[depth[:, None], named, age1]
            after = 1 + np.take_along_axis(self.skipped, np.minimum(self.age + 2, N + 1), axis=1)
            skipped = np.where(has[:, None], (1 - p) * after, skipped)
        self._distance = self._base[:, None] + L * skipped
        return self._distance

    def on_insert(self, key: Key) -> None:
        self.resident[key] = True

    on_prefetch = on_insert

    def on_hit(self, key: Key) -> None:
        pass

    def on_evict(self, key: Key) -> None:
        self.resident[key] = False

    def victim(self, excluded: set) -> Key:
        flat = np.array([layer * self.num_experts + e for layer, e in excluded], dtype=np.int64)
        best = _furthest(self.expected_distance().ravel(), self.resident.ravel(), flat)
        if best < 0:
            raise NoVictimError("every resident expert is protected; the cache needs more slots")
        return divmod(int(best), self.num_experts)

    def worth_prefetching(self, key: Key, victim: Key) -> bool:
        distance = self.expected_distance()
        return bool(distance[key] < distance[victim])

    def reuse(self, key: Key) -> float:
        """Expected further uses soon, if loaded now: p / (1 - p) with p = P(used at its layer's next call)
        (the expected run of consecutive uses if each follows with probability p)."""
        layer, _ = key
        p = min(0.95, float(self.uses[layer, 1] / self.calls[layer, 1]))  # just used: age 1 at the next call
        return p / (1 - p)


class BeladyPolicy:
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

    def victim(self, excluded: set) -> Key:
        candidates = [k for k in self.resident if k not in excluded]
        if not candidates:
            raise NoVictimError("every resident expert is protected; the cache needs more slots")
        return max(candidates, key=lambda k: (self.next_use(k), k))

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
def _expected_skips(uses, calls, skipped):  # pragma: no cover - compiled
    """skipped[a] = T(a) = (1 - h(a)) (1 + T(a + 1)), h(a) = uses[a] / calls[a]; the oldest bucket geometric."""
    last = uses.shape[0] - 1
    h = min(max(uses[last] / calls[last], 1e-4), 1.0)
    skipped[last] = skipped[last + 1] = (1 - h) / h
    for a in range(last - 1, 0, -1):
        h = min(max(uses[a] / calls[a], 1e-4), 1.0)
        skipped[a] = (1 - h) * (1 + skipped[a + 1])


@numba.njit(cache=True)
def _count_call(age, uses, calls, pred_uses, pred_calls, predicted, pending, layer, used, max_age):  # pragma: no cover
    """One call of `layer`: grade its pending predictions and its experts' ages against what was used."""
    E = age.shape[1]
    for e in range(E):
        a = min(age[layer, e] + 1, max_age + 1)  # the age the expert has at this call
        u = 1.0 if used[e] else 0.0
        for d in range(pending.shape[1]):
            if pending[layer, d]:
                named = 1 if predicted[layer, d, e] else 0
                pred_calls[d, named, a] += 1.0
                pred_uses[d, named, a] += u
        calls[layer, a] += 1.0
        uses[layer, a] += u
        age[layer, e] = 0 if used[e] else min(age[layer, e] + 1, max_age)
    for d in range(pending.shape[1]):
        pending[layer, d] = False


@numba.njit(cache=True)
def _furthest(distance, resident, excluded):  # pragma: no cover - compiled
    """The resident, not excluded index with the largest distance (ties: the larger index); -1 if none."""
    best, best_d = -1, -np.inf
    for i in range(distance.shape[0]):
        if resident[i] and distance[i] >= best_d:
            skip = False
            for x in excluded:
                if x == i:
                    skip = True
                    break
            if not skip:
                best, best_d = i, distance[i]
    return best


@numba.njit(cache=True)
def _mark(row, experts):  # pragma: no cover - compiled
    row[:] = False
    for e in experts:
        row[e] = True
