"""Foresight: a predictor's view of each layer call, and its predictions handed to the eviction policy.

The engine's runtime and the replay simulator both run a call as: observe the routing the router chose
(the request's paths, the predictor's online learning), stage the experts (the cache), then look ahead
(predictions for the next layers, which the policy uses to rank its victims and the runtime to prefetch).
This class is the shared part, so that a replay of a trace sees what the engine saw.
"""

from __future__ import annotations

import numpy as np
import torch

from .predictors.base import LayerContext, Paths, Prediction, Predictor

HORIZON = 3  # MoE layers ahead within reach of every predictor (prefetch may use fewer); see Foresight


class Foresight:
    def __init__(self, predictor: Predictor, policy, top_k: int, num_layers: int):
        self.predictor, self.policy, self.top_k = predictor, policy, top_k
        # A predictor that sees past the token (history; learned with its next-call heads) is also asked for
        # every layer's own next call, L layers ahead, so every resident expert's next chance has a prediction
        # (BENCHMARKS.md: +0.002-0.02 of hit rate on FLAME, +0.011 at one token's experts on the bundled model).
        # The others reach HORIZON layers (next-gate would run a router per layer asked).
        self.horizon = num_layers if predictor.wraps else HORIZON

    def stage(self, layer: int, residual: torch.Tensor) -> torch.Tensor | None:
        """The predictor's device-side work for this call (residual [rows, H]), queued before the call's one
        read of the device and read to the host with its routing (experts/host_read.py)."""
        return self.predictor.stage(layer, residual, self.horizon, self.top_k)

    def observe(self, paths: Paths, layer: int, ids: np.ndarray, residual: torch.Tensor | None,
                staged: np.ndarray | None = None) -> LayerContext:
        """ids [rows, k]: the call's routing, one token per row; staged: stage()'s result, on the host."""
        paths.observe(layer, ids)
        context = LayerContext(layer, ids, residual, paths, staged)
        self.predictor.observe(context)
        return context

    def look_ahead(self, context: LayerContext) -> list[tuple[int, int, np.ndarray]]:
        """(distance, layer, experts best first) for the next layers; the policy learns of them."""
        predictions: list[Prediction] = self.predictor.predict(context, self.horizon, self.top_k)
        wanted = [(p.depth, p.layer, p.union()) for p in predictions]
        self.policy.on_predictions(context.layer, wanted)
        return wanted
