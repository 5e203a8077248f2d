"""Per-request state: what one generation (or one traced batch) carries through the layer calls.

The model's modules are shared by every request; nothing a request owns is stored on them. The engine hands
its Request to the runtime for the duration of each forward pass (under the runtime's lock), and the layer
calls read it from there: the request's own counters, its routing recorder and its routing history.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .experts.counters import LayerCounters, new_counters
from .foresight.predictors.base import Paths


@dataclass
class RoutingRecorder:
    """Collects each MoE layer call's routing (and, if asked, the residual entering the layer) for traces."""

    hidden_states: bool = False
    calls: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    residuals: list[torch.Tensor] = field(default_factory=list)  # per call, with hidden_states=True

    def record(self, layer_pos: int, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
               residual: torch.Tensor | None = None) -> None:
        self.calls.append((layer_pos, top_k_index.detach().to("cpu", torch.int16),
                           top_k_weights.detach().to("cpu", torch.float32)))
        if self.hidden_states:
            if residual is None:
                raise RuntimeError("no residual stream was captured for this layer call")
            self.residuals.append(residual.detach().reshape(top_k_index.shape[0], -1).to("cpu", torch.float16))


@dataclass
class Request:
    rows: int  # sequences in the batch (a decode step's call has one token per row)
    num_layers: int
    top_k: int
    counters: list[LayerCounters] = field(default=None)
    recorder: RoutingRecorder | None = None
    paths: Paths = field(default=None)
    residuals: dict[int, torch.Tensor] = field(default_factory=dict)  # this forward's, by MoE layer position

    def __post_init__(self):
        if self.counters is None:
            self.counters = new_counters(self.num_layers)
        if self.paths is None:
            self.paths = Paths.empty(self.rows, self.num_layers, self.top_k)

    @property
    def wants_residual(self) -> bool:
        return self.recorder is not None and self.recorder.hidden_states
