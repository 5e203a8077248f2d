"""Routing-aware admission (`schedule="routing"`): which waiting requests join the running batch's free rows,
so that a decode step needs as few distinct experts as possible.

Each waiting request gets a routing signature before it runs: an [L, E] histogram of the experts the model's
own routers (`model_routers`, next_gate.py) pick for its prompt tokens' input embeddings, each MoE layer's
router through that layer's own norm, top-k per token, counted over the prompt's last SIGNATURE_TOKENS tokens
and divided by their number (each layer sums to k). It is an approximation, next-gate's premise taken to its
end: the residual stream before any attention is the embedding, and a router read off it guesses the layer's
routing. A request keeps its prompt's signature while it runs. Following what its row routes instead (0.5 x
the old signature + 0.5 x the step's experts, as an earlier version did where a predictor tracked the rows'
paths; without one the update was a no-op) moved more bytes: a step is one token's k experts a layer, a
noisier guess of the row's next steps than the prompt's histogram. In benchmarks/sim_serve.py (16 clients,
8 runs on each of the first two prompt draws) 3.69 / 3.94 MB per token against 3.59 / 3.61; and signatures
that were each prompt's own decode routing, known in advance, did no better (3.56 / 3.88): the guess is not
what limits the schedule, the ageing bound and the queue's mix of domains are (BENCHMARKS.md).

A request's likely experts are the top-k of its signature at each layer. When more requests wait than rows
are free, each free row goes to the request among the queue's first WINDOW_PER_ROW x max_batch that adds the
fewest likely experts to the union of the running rows' (and those already chosen), summed over layers, less
URGENCY per younger request already admitted ahead of it; ties to the older; with no row running, the oldest
request seeds the batch. Why the urgency: a request the bound will soon force in takes whatever row frees
then, however badly it fits; taking it now, while it fits nearly as well as the best, spends the bound's
skips where they buy the most. In benchmarks/sim_serve.py (first two prompt draws, 8 runs each, max_skips 6)
MB moved per token: urgency 0: 3.62 / 3.72; 0.5: 3.50 / 3.69; 1: 3.45 / 3.63; 2: 3.76 / 3.74 (fifo 4.64 / 4.63).

Ageing bound: a request that `max_skips` younger requests were admitted ahead of is admitted at the next free
row, before anything else (several such: the oldest first). So no request sees more than `max_skips`
requests that arrived after it start before it does; `max_skips=0` is first in, first out.

The signatures run the embedding, norm and router modules' own `forward` (not `__call__`: no engine hooks
fire) in the engine thread, between its forwards, and only read weights.

>>> likely(np.array([[0.0, 2.0, 1.0, 1.5], [4.0, 0.0, 0.0, 0.0]]), 2).astype(int).tolist()
[[0, 1, 0, 1], [1, 0, 0, 0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..foresight.predictors.next_gate import model_routers

SCHEDULES = ("fifo", "routing")
WINDOW_PER_ROW = 4  # the choice looks at the queue's first WINDOW_PER_ROW x max_batch requests
SIGNATURE_TOKENS = 64  # a prompt's signature counts its last this many tokens
URGENCY = 1  # likely experts a request may add beyond the best fit, per younger request admitted ahead of it


class RouterSignature:
    """The signatures of prompts for one engine's model (L=MoE layers, E=experts, k=top-k,
    P=prompt tokens, H=hidden)."""

    def __init__(self, engine):
        model = engine.model
        self.embed = model.get_input_embeddings()
        self.routers, self.norms = model_routers(model, engine.spec.experts_paths)
        self.num_experts, self.top_k = engine.spec.num_experts, engine.spec.top_k
        self.device = engine.run.device

    def prompt(self, ids: Sequence[int]) -> np.ndarray:
        """[L, E] float32: each layer's top-k experts per prompt token, counted, over the tokens counted."""
        ids = list(ids)[-SIGNATURE_TOKENS:]
        counts = np.zeros((len(self.routers), self.num_experts), dtype=np.float32)
        with torch.inference_mode():
            x = self.embed.forward(torch.tensor(ids, dtype=torch.long, device=self.device))  # [P, H]
            for layer, (router, norm) in enumerate(zip(self.routers, self.norms)):
                h = norm.forward(x) if norm is not None else x
                index = top_experts(router.forward(h), self.top_k)  # [P, k]
                counts[layer] = torch.bincount(index.reshape(-1), minlength=self.num_experts).cpu().numpy()
        return counts / len(ids)


def top_experts(out, k: int) -> torch.Tensor:
    """[P, k] long: a router's chosen experts; transformers 5.x routers return (logits, weights, indices), older
    ones the logits alone."""
    if isinstance(out, tuple):
        return out[2].reshape(-1, k).long()
    return out.float().topk(k, dim=-1).indices


def likely(signature: np.ndarray, k: int) -> np.ndarray:
    """[L, E] bool: each layer's k highest-scored experts (ties: the lower id), those scored above 0."""
    order = np.argsort(-signature, axis=1, kind="stable")[:, :k]
    chosen = np.zeros(signature.shape, dtype=bool)
    np.put_along_axis(chosen, order, True, axis=1)
    return chosen & (signature > 0)


def choose(waiting: list, free: int, running: list[np.ndarray], k: int, window: int, max_skips: int
           ) -> tuple[list[int], int]:
    """(positions in `waiting` of the requests to admit, in order; how many of them skipped the queue's head).
    `waiting`: oldest first, each with `.signature` [L, E] and `.passed_over`, which grows for each request a
    younger one is admitted ahead of."""
    if len(waiting) <= free:
        return list(range(len(waiting))), 0
    union = np.zeros(waiting[0].signature.shape, dtype=bool)
    for signature in running:
        union |= likely(signature, k)
    left, chosen, skips = list(range(len(waiting))), [], 0
    while len(chosen) < free:
        due = [i for i in left if waiting[i].passed_over >= max_skips]
        if due:
            pick = due[0]
        elif not running and not chosen:
            pick = left[0]
        else:
            pick = min(left[:window], key=lambda i: (int((likely(waiting[i].signature, k) & ~union).sum())
                                                     - URGENCY * waiting[i].passed_over, i))
        for i in left:
            if i < pick:
                waiting[i].passed_over += 1
        skips += pick != left[0]
        left.remove(pick)
        chosen.append(pick)
        union |= likely(waiting[pick].signature, k)
    return chosen, skips
