"""The experts computed on the CPU with their weights packed for oneDNN (packed_weights.py): each expert's
weights are packed on its first call on the CPU (or at load, where every call of a layer runs on the CPU) and
kept, so later calls read them at about twice the rate."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..packed_weights import pack


class PackedExperts:
    """Each CPU-computed expert's weights, packed on its first call on the CPU and kept, up to `capacity_bytes`
    (beyond it an expert is computed as stored). Counters: `experts` packed, `bytes` they hold (counted as
    stored; oneDNN's blocked layout may pad a width that is not a multiple of its blocks). Used by the thread
    running the forward only, under the runtime's lock, so it takes no lock of its own."""

    def __init__(self, store, capacity_bytes: int):
        self.store = store
        self.capacity_bytes = capacity_bytes
        self.experts = 0
        self.bytes = 0
        self._packed: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def preload(self, keys: list[tuple[int, int]], progress: bool) -> None:
        """Pack these experts now, as far as the capacity goes: a first call would otherwise pack in the middle of
        a token (about 2 GB/s: allocation and reorder, several times a stored product's cost)."""
        for layer_pos, expert in tqdm(keys, desc="packing CPU experts", disable=not progress, unit="expert"):
            if self.weights(layer_pos, expert) is None:
                return

    def clear(self) -> None:
        """Drop every packed expert (engine.close): they are packed again on their next call."""
        self._packed.clear()
        self.experts = self.bytes = 0

    def weights(self, layer_pos: int, expert: int) -> dict[str, torch.Tensor] | None:
        """The expert's packed weights by runtime parameter name; None when they would not fit."""
        key = (layer_pos, expert)
        found = self._packed.get(key)
        if found is not None:
            return found
        nbytes = self.store.expert_nbytes()
        if self.bytes + nbytes > self.capacity_bytes:
            return None
        found = self._packed[key] = {name: pack(t[0]) for name, t in self.store.host_view(layer_pos, expert).items()}
        self.experts += 1
        self.bytes += nbytes
        return found
