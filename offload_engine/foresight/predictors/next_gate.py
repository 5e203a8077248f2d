"""`next-gate`: the next layers' own routers applied to the current residual stream (no training).

The residual stream changes little from one layer to the next, so layer j's router, through the norm layer j's
MoE block reads the stream through (none in a post-norm model: foresight/residual_stream.py), applied to the residual
entering layer l's MoE block, guesses layer j's routing. The routers are the model's
own modules (transformers 5.x routers return (logits, weights, indices)), so softmax or sigmoid scoring,
grouped top-k, correction biases and scaling are the architecture's, whatever it is.
"""

from __future__ import annotations

import torch
from torch import nn

from ..residual_stream import residual_tap
from .base import LayerContext, Prediction, Predictor, target_layers


class NextGatePredictor(Predictor):
    name = "next-gate"
    needs_residual = True

    def __init__(self, routers: list[nn.Module], norms: list[nn.Module | None]):
        self.routers, self.norms = routers, norms

    def ranking(self, residual: torch.Tensor, target: int, n: int) -> torch.Tensor:
        """[rows, n] experts best first, on the residual's device: the router's own choice (by its weights),
        then the others by logit (ties: the lower id)."""
        norm = self.norms[target]
        x = norm(residual) if norm is not None else residual
        logits, weights, index = self.routers[target](x)
        if n <= index.shape[-1]:  # the router's top-k, already ordered: no full ranking needed (the engine's case)
            order = weights.float().reshape(index.shape).argsort(dim=-1, descending=True, stable=True)
            return index.gather(-1, order)[:, :n].long()
        logits = logits.float().reshape(index.shape[0], -1)
        # the chosen k rank above every logit, in the order of their routing weights
        top = logits.max(dim=-1, keepdim=True).values + 1
        scores = logits.scatter(1, index.long(), top + weights.float().reshape(index.shape))
        return scores.sort(dim=-1, descending=True, stable=True).indices[:, :n]

    def stage(self, layer: int, residual: torch.Tensor, depth: int, n: int) -> torch.Tensor | None:
        """[targets, rows, n]: every target layer's ranking, computed where the residual is."""
        targets = target_layers(layer, depth, len(self.routers), wraps=False)
        if not targets:
            return None
        return torch.stack([self.ranking(residual, j, n) for _, j in targets])

    def predict(self, ctx: LayerContext, depth: int, n: int) -> list[Prediction]:
        targets = target_layers(ctx.layer, depth, len(self.routers), wraps=False)
        staged = ctx.staged
        if staged is None or staged.shape[0] != len(targets) or staged.shape[-1] != n:
            if ctx.residual is None or not targets:
                return []
            staged = self.stage(ctx.layer, ctx.residual, depth, n).cpu().numpy()
        return [Prediction(d, j, staged[i]) for i, (d, j) in enumerate(targets)]


def model_routers(model: nn.Module, experts_paths: tuple[str, ...]) -> tuple[list[nn.Module], list[nn.Module | None]]:
    """Each MoE layer's router (the MoE block's `gate`/`router` child) and the norm between the residual stream
    and that block (foresight/residual_stream.py; None where the block reads the stream as it is), found from the
    experts modules' paths (e.g. model.layers.3.mlp.experts)."""
    routers, norms = [], []
    for path in experts_paths:
        block_path, _, _ = path.rpartition(".")
        block = model.get_submodule(block_path)
        router = next((m for name, m in block.named_children() if name in ("gate", "router")), None)
        if router is None:
            raise ValueError(f"{block_path} has no router module named gate or router")
        routers.append(router)
        tap = residual_tap(model, block_path)
        norms.append(tap.norm if tap is not None else None)
    return routers, norms
