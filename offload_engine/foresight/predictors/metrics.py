"""How well a predictor guesses the routing: recall@n and precision@n per source layer and distance.

Pure functions over recorded predictions. For one prediction of a token's experts at some later layer:
recall@n = |top n predicted ∩ actual| / |actual|, precision@n = |top n predicted ∩ actual| / n (n = k: the
two agree when the predictor names k experts; at n = 2k recall rises and precision falls). Means are over
every (token, source layer) pair that has both a prediction and a known target.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Tally:
    """Running sums for one (source layer, distance): hits over the top n, tokens scored."""

    hits: dict[int, int] = field(default_factory=dict)  # n -> sum of |top n ∩ actual|
    actual: int = 0  # sum of |actual|
    tokens: int = 0

    def add(self, predicted: np.ndarray, actual: np.ndarray, ns: tuple[int, ...]) -> None:
        """predicted [rows, >= max n] ranked, actual [rows, k]; rows with an unknown target (-1) are skipped."""
        keep = (actual >= 0).all(axis=1) & (predicted[:, 0] >= 0)
        if not keep.any():
            return
        predicted, actual = predicted[keep], actual[keep]
        for n in ns:
            top = predicted[:, :n]
            hit = (top[:, :, None] == actual[:, None, :]).any(-1) & (top >= 0)  # [rows, n]
            self.hits[n] = self.hits.get(n, 0) + int(hit.sum())
        self.actual += actual.size
        self.tokens += len(actual)

    def recall(self, n: int) -> float:
        return self.hits.get(n, 0) / self.actual if self.actual else float("nan")

    def precision(self, n: int) -> float:
        return self.hits.get(n, 0) / (n * self.tokens) if self.tokens else float("nan")


NEXT_TOKEN = "next token"  # the group of predictions whose target layer belongs to the next token


@dataclass(frozen=True)
class Accuracy:
    """recall/precision at each n, per group ("overall") and per (source layer, group). A group is a distance in
    MoE layers within the token (1, 2, 3...) or NEXT_TOKEN (a prediction past the last layer)."""

    ns: tuple[int, ...]
    overall: dict  # group -> {"recall": {n: x}, "precision": {n: x}, "tokens": t}
    per_layer: dict  # source layer -> group -> same

    def as_json(self) -> dict:
        def groups(tallies: dict) -> dict:
            return {str(d): {"recall": {str(n): v["recall"][n] for n in self.ns},
                             "precision": {str(n): v["precision"][n] for n in self.ns}, "tokens": v["tokens"]}
                    for d, v in tallies.items()}

        return {"n": list(self.ns), "overall": groups(self.overall),
                "per_layer": {str(layer): groups(v) for layer, v in self.per_layer.items()}}


def summarise(tallies: dict, ns: tuple[int, ...]) -> Accuracy:
    """tallies by (source layer, group) -> Accuracy (overall = the tallies of a group summed over layers)."""
    def figures(t: Tally) -> dict:
        return {"recall": {n: t.recall(n) for n in ns}, "precision": {n: t.precision(n) for n in ns},
                "tokens": t.tokens}

    def order(key):
        layer, group = key
        return (layer, group == NEXT_TOKEN, 0 if group == NEXT_TOKEN else group)

    overall: dict = {}
    per_layer: dict = {}
    for layer, group in sorted(tallies, key=order):
        t = tallies[layer, group]
        total = overall.setdefault(group, Tally())
        for n in ns:
            total.hits[n] = total.hits.get(n, 0) + t.hits.get(n, 0)
        total.actual += t.actual
        total.tokens += t.tokens
        per_layer.setdefault(layer, {})[group] = figures(t)
    groups = sorted(overall, key=lambda g: (g == NEXT_TOKEN, 0 if g == NEXT_TOKEN else g))
    return Accuracy(ns, {g: figures(overall[g]) for g in groups}, per_layer)
