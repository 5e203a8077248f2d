"""`history`: predict from routing alone, so it also runs on real traces that carry no hidden states.

Two kinds of evidence, both learned online from what the router really chose:
- co-occurrence: how often expert b is used at layer j when expert a was used `distance` layers before (in
  the same token, or in the previous one past the last layer): P(b | a), from counts;
- repetition: a token tends to reuse the experts the last known token used at the same layer; the share
  reused is measured per layer.
The score of b at layer j is naive Bayes over every expert of this token's last SOURCES layers and the
repetition: log P(b) + sum over evidence of log(P(b | evidence) / P(b)). On the shared FLAME-MoE trace,
three source layers raise recall@k one layer ahead from 0.44 (the current layer only) to 0.48.

Besides the next layers it predicts each layer's own next call (the next token's routing there, L layers
ahead), so the predictive cache has a prediction for every resident expert's next chance (foresight/__init__.py).
"""

from __future__ import annotations

import numba
import numpy as np

from .base import LayerContext, Prediction, Predictor, target_layers

SMOOTHING = 4.0  # pseudo-counts towards the target layer's usage, per source expert
SOURCES = 3  # this token's layers used as evidence: the current one and the two before it
REPEAT_DECAY = 0.02
PRODUCT = 8  # source experts whose ratios are multiplied before one logarithm (_scores)


class HistoryPredictor(Predictor):
    name = "history"
    wraps = True

    def __init__(self, num_layers: int, num_experts: int, top_k: int, max_depth: int = 3):
        self.num_layers, self.num_experts, self.top_k, self.max_depth = num_layers, num_experts, top_k, max_depth
        # the (source, target) distances the evidence needs: the next max_depth layers from this token's last
        # SOURCES layers, and each layer's own next call (the next token's same layer, L ahead) from them
        needed = set(range(1, max_depth + SOURCES)) | set(range(num_layers, num_layers + SOURCES))
        self.distances = np.array(sorted(needed), dtype=np.int64)
        self.slot = np.full(self.distances[-1] + 1, -1, dtype=np.int64)  # distance -> its index in the tables
        self.slot[self.distances] = np.arange(len(self.distances))
        # the depths it can score: every source's distance to the target kept
        self.depths = {d for d in range(1, len(self.slot)) if all(d + b in needed for b in range(SOURCES))}
        D = len(self.distances)
        # L=layers, D=distances, E=experts: co[l, i, a, b] counts tokens with a at l and b at l + distances[i]
        self.co = np.zeros((num_layers, D, num_experts, num_experts), dtype=np.float32)
        self.seen = np.zeros((num_layers, D, num_experts), dtype=np.float32)  # tokens with a at l
        self.usage = np.zeros((num_layers, num_experts), dtype=np.float64)
        self.repeat = np.full(num_layers, 0.5)  # share of a layer's experts the next token reuses

    def observe(self, ctx: LayerContext) -> None:
        """Learn from the call at ctx.layer (ctx.paths already holds it)."""
        paths = ctx.paths
        _observe(self.co, self.seen, self.usage, self.repeat, paths.current, paths.previous, ctx.layer,
                 self.distances, REPEAT_DECAY)

    def scores(self, ctx: LayerContext, depth: int, target: int) -> np.ndarray:
        """[rows, E] log-odds-like scores of each expert being used at `target`, `depth` layers ahead, from
        the counts as they are now (only the rows of this token's experts: a table of every pair, recomputed
        every few calls, cost a DeepSeek-sized model 270 ms a token)."""
        if depth not in self.depths:
            raise ValueError(f"the history predictor keeps no evidence for {depth} layers ahead "
                             f"(it predicts 1..{self.max_depth} and {self.num_layers})")
        paths = ctx.paths
        return _scores(self.co, self.seen, self.usage, self.slot, self.repeat, paths.current, paths.previous,
                       ctx.layer, depth, target, SOURCES, self.top_k, SMOOTHING)

    def predict(self, ctx: LayerContext, depth: int, n: int) -> list[Prediction]:
        """The next min(depth, max_depth) layers; with depth >= L, also this layer's own next call (the next
        token's), so that every layer has a prediction of its next call. Every target's scores and ranking in
        one compiled call (ranked(scores(...)) for each)."""
        L = self.num_layers
        targets = target_layers(ctx.layer, min(depth, self.max_depth), L, self.wraps)
        if depth >= L and self.max_depth < L:
            targets.append((L, ctx.layer))
        if not targets:
            return []
        wanted = np.array(targets, dtype=np.int64)  # [targets, 2]: (distance, layer)
        paths = ctx.paths
        best = _ranked_targets(self.co, self.seen, self.usage, self.slot, self.repeat, paths.current, paths.previous,
                               ctx.layer, wanted, SOURCES, self.top_k, SMOOTHING, n)
        return [Prediction(d, j, best[i]) for i, (d, j) in enumerate(targets)]


# -- kernels: a decode step calls these once per layer, so they must cost microseconds, not numpy dispatches --
@numba.njit(cache=True)
def _observe(co, seen, usage, repeat, current, previous, layer, distances, decay):  # pragma: no cover - compiled
    # current/previous [rows, L, k]: ids per row and layer, -1 unknown
    rows, L, k = current.shape
    for r in range(rows):
        if current[r, layer, 0] < 0:
            continue
        for j in range(k):
            if current[r, layer, j] >= 0:
                usage[layer, current[r, layer, j]] += 1.0
        for di in range(len(distances)):
            src_layer = layer - distances[di]
            if src_layer < -L:  # two tokens back: the paths do not keep it
                continue
            src = current if src_layer >= 0 else previous
            src_layer %= L
            if src[r, src_layer, 0] < 0:
                continue
            for i in range(k):
                a = src[r, src_layer, i]
                if a < 0:
                    continue
                seen[src_layer, di, a] += 1.0
                for j in range(k):
                    if current[r, layer, j] >= 0:
                        co[src_layer, di, a, current[r, layer, j]] += 1.0
        if previous[r, layer, 0] >= 0:
            reused = 0
            for i in range(k):
                for j in range(k):
                    if current[r, layer, i] >= 0 and current[r, layer, i] == previous[r, layer, j]:
                        reused += 1
            repeat[layer] += decay * (reused / k - repeat[layer])


@numba.njit(cache=True)
def _scores(co, seen, usage, slot, repeat, current, previous, layer, depth, target, sources, k,
            smoothing):  # pragma: no cover - compiled
    """log P(b) + sum over the sources' experts a of log(P(b | a) / P(b)) + the repetition term, with
    P(b) = (usage + 1) / (calls + E) k at the target layer and P(b | a) = (co + s P(b) / k) / (seen + s).
    The ratios P(b | a) of up to PRODUCT source experts are multiplied before one logarithm (a logarithm
    each was most of a decode call's time: 3 sources x k x E of them per target); each ratio is at least
    s P(b) / k / (seen + s), so the product of PRODUCT of them stays far from float64's smallest number."""
    rows, L, _ = current.shape
    E = usage.shape[1]
    total = 0.0
    for b in range(E):
        total += usage[target, b]
    prior = np.empty(E)
    log_prior = np.empty(E)
    for b in range(E):
        prior[b] = (usage[target, b] + 1.0) / (total + E) * k
        log_prior[b] = np.log(prior[b])
    out = np.empty((rows, E))
    product = np.empty(E)
    for r in range(rows):
        for b in range(E):
            out[r, b] = log_prior[b]
        for back in range(sources):
            src_layer = layer - back
            src = current if src_layer >= 0 else previous
            src_layer %= L
            if src[r, src_layer, 0] < 0:
                continue
            i = slot[depth + back]
            factors = 0
            for j in range(k):
                a = src[r, src_layer, j]
                if a < 0:
                    continue
                if factors == 0:
                    product[:] = 1.0
                counts, n = co[src_layer, i, a], seen[src_layer, i, a] + smoothing
                for b in range(E):
                    product[b] *= (counts[b] + smoothing * prior[b] / k) / n
                factors += 1
                if factors == PRODUCT:
                    for b in range(E):
                        out[r, b] += np.log(product[b]) - factors * log_prior[b]
                    factors = 0
            if factors:
                for b in range(E):
                    out[r, b] += np.log(product[b]) - factors * log_prior[b]
        # the last token known at `target`: this token's if it wraps to the next one, else the previous one's
        last = current if target <= layer else previous
        if last[r, target, 0] >= 0:
            hit = np.log(repeat[target])
            miss = np.log((1.0 - repeat[target]) * k / max(1, E - k))
            for b in range(E):
                out[r, b] += miss - log_prior[b]
            for j in range(k):
                b = last[r, target, j]
                if b >= 0:
                    out[r, b] += hit - miss
    return out


@numba.njit(cache=True)
def _ranked_targets(co, seen, usage, slot, repeat, current, previous, layer, targets, sources, k, smoothing,
                    n):  # pragma: no cover - compiled
    """[targets, rows, min(n, E)]: for each (distance, layer) row of `targets`, _scores' experts best first
    (ties: the lower id), as ranked() orders them."""
    rows = current.shape[0]
    E = usage.shape[1]
    out = np.empty((len(targets), rows, min(n, E)), dtype=np.int64)
    for t in range(len(targets)):
        scores = _scores(co, seen, usage, slot, repeat, current, previous, layer, targets[t, 0], targets[t, 1],
                         sources, k, smoothing)
        for r in range(rows):
            out[t, r] = np.argsort(-scores[r], kind="mergesort")[:out.shape[2]]
    return out
