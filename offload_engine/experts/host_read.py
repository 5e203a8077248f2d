"""The engine's reads of the device: what a layer call needs on the host, fetched with one synchronisation.

A CUDA kernel queue runs ahead of Python only while Python never waits for it; every `.tolist()`, `.cpu()`,
`.item()` or data-dependent shape (`torch.where(mask)`, `unique`) waits. A layer call needs its routing on the
host (which experts to fetch), so it reads once: the routing, and with it whatever else the call will need
there (the predictor's device-side work, the hidden states CPU experts compute on). Everything after that
works from the host copies.

    # T=tokens, k=active experts per token
    routing = CallRouting.read(top_k_index, staged, hidden)     # the call's one device-to-host read
    routing.experts                                             # distinct ids, ascending
    routing.positions(e)                                        # (tokens, ranks) routed to expert e
"""

from __future__ import annotations

import numpy as np
import torch

SMALL_CALL = 64  # routed (token, expert) pairs up to which the distinct experts are found in Python


def read_to_host(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Host copies of `tensors` (None stays None) after one synchronisation: asynchronous copies into pinned
    memory, then one wait for the stream. On the CPU nothing is waited for, but the copies are made all the
    same (a few KiB at decode), so that what the host holds never aliases what the model computes with."""
    device = None
    for t in tensors:
        if t is not None and t.is_cuda:
            device = t.device
            break
    if device is None:
        return [None if t is None else t.detach().clone() for t in tensors]
    out = [None if t is None else t.detach().to("cpu", non_blocking=True) for t in tensors]
    torch.cuda.current_stream(device).synchronize()
    return out


class CallRouting:
    """A layer call's routing on the host, read once: ids [T, k], and what was read with them."""

    __slots__ = ("ids", "staged", "hidden", "experts", "_groups")

    def __init__(self, ids: np.ndarray, staged: np.ndarray | None = None, hidden: torch.Tensor | None = None):
        self.ids = ids  # [T, k] int64
        self.staged = staged  # the predictor's device-side work for this call (Predictor.stage)
        self.hidden = hidden  # [T, H] the call's hidden states, where CPU experts may need them
        self._groups: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
        flat = ids.reshape(-1)
        if flat.size <= SMALL_CALL:  # decode: a Python set beats numpy's dispatch
            self.experts = sorted(set(flat.tolist()))  # distinct, ascending
        else:
            self.experts = np.unique(flat).tolist()

    @classmethod
    def read(cls, top_k_index: torch.Tensor, staged: torch.Tensor | None = None,
             hidden: torch.Tensor | None = None) -> "CallRouting":
        ids, staged, hidden = read_to_host([top_k_index, staged, hidden])
        ids = ids.numpy()
        return cls(ids if ids.dtype == np.int64 else ids.astype(np.int64), None if staged is None else staged.numpy(),
                   hidden)

    def positions(self, expert: int) -> tuple[np.ndarray, np.ndarray]:
        """(token indices ascending, ranks) of the routings to `expert`: what torch.where(top_k_index == e)
        gives, from the host copy (grouped for the whole call the first time it is asked)."""
        if self._groups is None:
            self._groups = self._group()
        return self._groups.get(expert, (np.empty(0, np.int64), np.empty(0, np.int64)))

    def _group(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        k = self.ids.shape[-1]
        flat = self.ids.reshape(-1)
        if flat.size <= SMALL_CALL:  # a few routings: Python's loop beats numpy's dispatch
            lists: dict[int, tuple[list[int], list[int]]] = {}
            for i, e in enumerate(flat.tolist()):
                tokens, ranks = lists.setdefault(e, ([], []))
                tokens.append(i // k)
                ranks.append(i % k)
            return {e: (np.array(tokens, np.int64), np.array(ranks, np.int64)) for e, (tokens, ranks) in lists.items()}
        order = np.argsort(flat, kind="stable")
        ordered = flat[order]
        lows = np.searchsorted(ordered, self.experts, "left").tolist()
        highs = np.searchsorted(ordered, self.experts, "right").tolist()
        return {e: (order[lo:hi] // k, order[lo:hi] % k) for e, lo, hi in zip(self.experts, lows, highs)}

    def counts(self) -> np.ndarray:
        """Routings per expert id, [max id + 1]."""
        return np.bincount(self.ids.reshape(-1), minlength=max(self.experts) + 1)
