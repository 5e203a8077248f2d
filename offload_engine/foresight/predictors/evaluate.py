"""Run a predictor over a routing trace the way the engine would, and score its predictions."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from tqdm.auto import tqdm

from .base import LayerContext, Paths, Predictor
from .metrics import NEXT_TOKEN, Accuracy, Tally, summarise


def evaluate(predictor: Predictor, ids: np.ndarray, hidden: np.ndarray | None = None, depth: int = 3,
             ns: tuple[int, ...] | None = None, progress: bool = False) -> Accuracy:
    """ids [N, T, L, k] (-1 = padding), hidden [N, T, L, H] or None. All sequences advance together, token by
    token and layer by layer; at each call the predictor first sees the call's routing (as the engine's
    predictor does), then predicts the next `depth` layers; each prediction is scored against the trace."""
    # N=sequences, T=tokens, L=layers, k=active
    N, T, L, k = ids.shape
    ns = ns or (k, 2 * k)
    paths = Paths.empty(N, L, k)
    tallies: dict = defaultdict(Tally)
    for t in tqdm(range(T), desc=f"evaluating {predictor.name}", unit="token", disable=not progress):
        for layer in range(L):
            routed = ids[:, t, layer].astype(np.int64)
            paths.observe(layer, routed)
            residual = None if hidden is None else torch.from_numpy(hidden[:, t, layer].astype(np.float32))
            ctx = LayerContext(layer, routed, residual, paths)
            predictor.observe(ctx)
            for p in predictor.predict(ctx, depth, max(ns)):
                same_token = p.layer > layer  # else past the last layer: the next token's
                target_t = t if same_token else t + 1
                if target_t < T:
                    group = p.depth if same_token else NEXT_TOKEN
                    tallies[(layer, group)].add(p.experts, ids[:, target_t, p.layer], ns)
    return summarise(dict(tallies), ns)
