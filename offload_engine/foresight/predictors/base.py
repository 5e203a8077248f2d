"""What every routing predictor sees and returns.

At a MoE layer call the engine knows: the layer (its position l among the MoE layers), the experts the router
chose for each token of the call, the residual stream entering the layer's MoE block (after the attention
residual add, before any norm: see foresight/residual_stream.py), and the paths of earlier tokens. A predictor returns, for the next `depth` MoE layers,
the experts it expects each token to use, best first. Layers after the last one wrap to the next token's
first layers; only predictors that can see that far (history) answer for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class Paths:
    """Per request: each row's experts at every MoE layer for the current and the previous token.

    Rows are the sequences of a batch; ids are [rows, L, k], -1 where nothing is known yet."""

    current: np.ndarray
    previous: np.ndarray

    @classmethod
    def empty(cls, rows: int, num_layers: int, top_k: int) -> "Paths":
        blank = np.full((rows, num_layers, top_k), -1, dtype=np.int64)
        return cls(blank, blank.copy())

    def observe(self, layer: int, ids: np.ndarray) -> None:
        """ids [rows, k]: this layer's routing of each row's newest token; layer 0 starts a new token."""
        if layer == 0:
            self.previous, self.current = self.current, np.full_like(self.current, -1)
        self.current[:, layer] = ids


@dataclass(frozen=True)
class Prediction:
    """Experts expected at a later MoE layer: `experts` [rows, n] ranked best first per row (-1 = none: only
    at the end of a row, after the experts it names)."""

    depth: int  # MoE layers ahead (1 = the next one)
    layer: int  # its position, 0..L-1 (wrapped: a layer of the next token)
    experts: np.ndarray

    def union(self, limit: int | None = None) -> np.ndarray:
        """The distinct experts over all rows, rank by rank (every row's best first)."""
        if len(self.experts) == 1:  # one row (decode at batch 1, every layer call): already distinct and ranked
            row = self.experts[0]
            if not row.size or row[-1] >= 0:
                return row[:limit]
            return row[:limit][row[:limit] >= 0]
        seen: dict[int, None] = {}
        for col in self.experts.T:
            for e in col.tolist():
                if e >= 0:
                    seen[e] = None
        out = np.fromiter(seen, dtype=np.int64, count=len(seen))
        return out[:limit] if limit is not None else out


@dataclass
class LayerContext:
    """One MoE layer call, as a predictor sees it (decode: one token per row)."""

    layer: int
    experts: np.ndarray  # [rows, k] the router's choice at this layer, descending score
    residual: torch.Tensor | None  # [rows, H] the residual stream entering this layer's MoE block
    paths: Paths = field(repr=False)
    staged: np.ndarray | None = field(default=None, repr=False)  # Predictor.stage's result, read to the host


class Predictor:
    """Base: `predict` returns up to `depth` Predictions, nearest first; `observe` learns from each call."""

    name = "none"
    needs_residual = False
    wraps = False  # can predict the next token's layers

    def predict(self, ctx: LayerContext, depth: int, n: int) -> list[Prediction]:
        return []

    def stage(self, layer: int, residual: torch.Tensor, depth: int, n: int) -> torch.Tensor | None:
        """Device work for predict(ctx, depth, n) at `layer`, from the residual [rows, H]: queued before the
        layer call's one read of the device and handed back, on the host, as ctx.staged (None: no device
        work). A predictor that reads the residual must do so here: reading it in predict would wait for
        the device a second time."""
        return None

    def observe(self, ctx: LayerContext) -> None:
        pass


def target_layers(layer: int, depth: int, num_layers: int, wraps: bool) -> list[tuple[int, int]]:
    """(distance, layer position) of the next `depth` MoE layers; past the last, the next token's if `wraps`
    (never further: at most the layer's own next call, L layers ahead)."""
    out = []
    for d in range(1, min(depth, num_layers) + 1):
        j = layer + d
        if j >= num_layers:
            if not wraps:
                break
            j -= num_layers
        out.append((d, j))
    return out


def ranked(scores: np.ndarray, n: int) -> np.ndarray:
    """[rows, E] scores -> [rows, n] expert ids, best first (ties: the lower id)."""
    return np.argsort(-scores, axis=-1, kind="stable")[:, :n]
