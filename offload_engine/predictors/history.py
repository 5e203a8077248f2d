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
ahead), so the predictive cache has a prediction for every resident expert's next chance (foresight.py).
"""

from __future__ import annotations

import numba
import numpy as np

from .base import LayerContext, Prediction, Predictor, ranked, target_layers

SMOOTHING = 4.0  # pseudo-counts towards the target layer's usage, per source expert
SOURCES = 3  # this token's layers used as evidence: the current one and the two before it
REPEAT_DECAY = 0.02
REFRESH = 32  # calls between recomputations of the log-probability tables (counts change slowly)


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
        # derived from the counts every REFRESH calls: log P(b) per layer and log(P(b | a) / P(b)) per pair
        self.log_prior = np.zeros((num_layers, num_experts))
        self.evidence = np.zeros((num_layers, D, num_experts, num_experts), dtype=np.float32)
        self._since_refresh = REFRESH

    def _refresh(self) -> None:
        k, E = self.top_k, self.num_experts
        prior = (self.usage + 1) / (self.usage.sum(axis=1, keepdims=True) + E) * k  # [L, E], rows sum to k
        self.log_prior = np.log(prior)
        for i, d in enumerate(self.distances.tolist()):
            target_prior = np.roll(prior, -d, axis=0)  # the prior of layer l + d (wrapped), per source layer l
            p = (self.co[:, i] + SMOOTHING * target_prior[:, None, :] / k) / (self.seen[:, i, :, None] + SMOOTHING)
            self.evidence[:, i] = np.log(p) - np.log(target_prior)[:, None, :]
        self._since_refresh = 0

    def observe(self, ctx: LayerContext) -> None:
        """Learn from the call at ctx.layer (ctx.paths already holds it)."""
        paths = ctx.paths
        _observe(self.co, self.seen, self.usage, self.repeat, paths.current, paths.previous, ctx.layer,
                 self.distances, REPEAT_DECAY)
        self._since_refresh += 1

    def scores(self, ctx: LayerContext, depth: int, target: int) -> np.ndarray:
        """[rows, E] log-odds-like scores of each expert being used at `target`, `depth` layers ahead."""
        if self._since_refresh >= REFRESH:
            self._refresh()
        if depth not in self.depths:
            raise ValueError(f"the history predictor keeps no evidence for {depth} layers ahead "
                             f"(it predicts 1..{self.max_depth} and {self.num_layers})")
        paths = ctx.paths
        return _scores(self.evidence, self.slot, self.log_prior, self.repeat, paths.current, paths.previous,
                       ctx.layer, depth, target, SOURCES, self.top_k)

    def predict(self, ctx: LayerContext, depth: int, n: int) -> list[Prediction]:
        """The next min(depth, max_depth) layers; with depth >= L, also this layer's own next call (the next
        token's), so that every layer has a prediction of its next call."""
        L = self.num_layers
        targets = target_layers(ctx.layer, min(depth, self.max_depth), L, self.wraps)
        if depth >= L and self.max_depth < L:
            targets.append((L, ctx.layer))
        return [Prediction(d, j, ranked(self.scores(ctx, d, j), n)) for d, j in targets]


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
def _scores(evidence, slot, log_prior, repeat, current, previous, layer, depth, target, sources,
            k):  # pragma: no cover - compiled
    rows, L, _ = current.shape
    E = log_prior.shape[1]
    out = np.empty((rows, E))
    for r in range(rows):
        for b in range(E):
            out[r, b] = log_prior[target, b]
        for back in range(sources):
            src_layer = layer - back
            src = current if src_layer >= 0 else previous
            src_layer %= L
            if src[r, src_layer, 0] < 0:
                continue
            for i in range(k):
                if src[r, src_layer, i] < 0:
                    continue
                row = evidence[src_layer, slot[depth + back], src[r, src_layer, i]]
                for b in range(E):
                    out[r, b] += row[b]
        # the last token known at `target`: this token's if it wraps to the next one, else the previous one's
        last = current if target <= layer else previous
        if last[r, target, 0] >= 0:
            hit = np.log(repeat[target])
            miss = np.log((1.0 - repeat[target]) * k / max(1, E - k))
            for b in range(E):
                out[r, b] += miss - log_prior[target, b]
            for j in range(k):
                b = last[r, target, j]
                if b >= 0:
                    out[r, b] += hit - miss
    return out
