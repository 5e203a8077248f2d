"""A fixed pool of expert slots on the compute device, filled on demand from the expert store.

Ask for the experts one layer needs, get slot indices back; the slot tensors then hold exactly those
experts' weights. Counters per MoE layer: hits, misses, bytes moved to the device, evictions.
On CUDA, misses are copied on a separate stream and the compute stream waits only for those copies.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .expert_store import ExpertStore
from .policies import LRUPolicy


@dataclass
class LayerCounters:
    hits: int = 0
    misses: int = 0
    bytes_to_device: int = 0
    evictions: int = 0
    copy_s: float = 0.0  # wall time of synchronous copies (CPU device or pageable memory); 0 when asynchronous


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the counters (totals and per MoE layer position)."""

    hits: int
    misses: int
    bytes_to_device: int
    evictions: int
    copy_s: float
    per_layer: tuple[LayerCounters, ...] = field(repr=False)

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def minus(self, earlier: "CacheStats") -> "CacheStats":
        layers = tuple(
            LayerCounters(a.hits - b.hits, a.misses - b.misses, a.bytes_to_device - b.bytes_to_device,
                          a.evictions - b.evictions, a.copy_s - b.copy_s)
            for a, b in zip(self.per_layer, earlier.per_layer)
        )
        return CacheStats(self.hits - earlier.hits, self.misses - earlier.misses,
                          self.bytes_to_device - earlier.bytes_to_device, self.evictions - earlier.evictions,
                          self.copy_s - earlier.copy_s, layers)


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device, policy=None):
        if num_slots < 1:
            raise ValueError("the expert cache needs at least one slot")
        self.store = store
        self.num_slots = num_slots
        self.device = torch.device(device)
        self.policy = policy or LRUPolicy()
        # S=slots; one [S, *shape] tensor per runtime expert parameter (gate_up_proj, down_proj, biases...)
        self.pool = {
            p.name: torch.empty((num_slots, *p.shape), dtype=store.dtype, device=self.device)
            for p in store.spec.expert_params
        }
        self.slot_of: dict[tuple[int, int], int] = {}
        # the same map as a device tensor, [L, E] -> slot (-1: not resident), so a layer call turns expert ids
        # into slot ids with one gather; updated on misses and evictions only
        self.slot_table = torch.full((store.spec.num_moe_layers, store.spec.num_experts), -1, dtype=torch.long,
                                     device=self.device)
        self.key_in: list[tuple[int, int] | None] = [None] * num_slots
        self.free = list(range(num_slots - 1, -1, -1))
        self.counters = [LayerCounters() for _ in range(store.spec.num_moe_layers)]
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.non_blocking = cuda and store.pinned

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool.values())

    def slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return {name: t[slot] for name, t in self.pool.items()}

    def fetch(self, layer_pos: int, experts: Sequence[int]) -> list[int]:
        """Make `experts` of one MoE layer resident together and return their slots, in the same order."""
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} experts asked for at once, but the cache has {self.num_slots} slots")
        counters = self.counters[layer_pos]
        wanted = {(layer_pos, e) for e in experts}
        slots, loads = [], []
        for e in experts:
            key = (layer_pos, e)
            slot = self.slot_of.get(key)
            if slot is None:
                slot = self._claim_slot(protected=wanted)
                self.slot_of[key], self.key_in[slot] = slot, key
                self.slot_table[layer_pos, e] = slot
                self.policy.on_insert(key)
                loads.append((e, slot))
                counters.misses += 1
            else:
                self.policy.on_hit(key)
                counters.hits += 1
            slots.append(slot)
        if loads:
            start = time.perf_counter()
            try:
                counters.bytes_to_device += self._load(layer_pos, loads)
            except BaseException:  # a slot whose copy failed must not be found resident later
                for e, slot in loads:
                    del self.slot_of[(layer_pos, e)]
                    self.slot_table[layer_pos, e] = -1
                    self.policy.on_evict((layer_pos, e))
                    self.key_in[slot] = None
                    self.free.append(slot)
                raise
            if not self.non_blocking:
                counters.copy_s += time.perf_counter() - start
        return slots

    def _claim_slot(self, protected: set) -> int:
        if self.free:
            return self.free.pop()
        victim = self.policy.victim(protected)
        slot = self.slot_of.pop(victim)
        self.slot_table[victim] = -1
        self.policy.on_evict(victim)
        self.key_in[slot] = None
        self.counters[victim[0]].evictions += 1
        return slot

    def _load(self, layer_pos: int, loads: list[tuple[int, int]]) -> int:
        if self.copy_stream is None:
            return sum(self.store.copy_into(layer_pos, e, self.slot_tensors(s)) for e, s in loads)
        compute = torch.cuda.current_stream(self.device)
        # A reused slot may still be read by queued kernels: copies start only after them.
        self.copy_stream.wait_stream(compute)
        with torch.cuda.stream(self.copy_stream):
            written = sum(self.store.copy_into(layer_pos, e, self.slot_tensors(s), self.non_blocking)
                          for e, s in loads)
        compute.wait_stream(self.copy_stream)
        return written

    def preload(self, keys: Sequence[tuple[int, int]], progress: bool = True) -> None:
        """Fill free slots with `keys` up front (e.g. every expert, when all fit); counted as bytes moved."""
        for layer_pos, e in tqdm(keys, desc="experts to device", disable=not progress, unit="expert"):
            if not self.free:
                break
            if (layer_pos, e) not in self.slot_of:
                self.fetch(layer_pos, [e])
                self.counters[layer_pos].misses -= 1  # preloading is not a lookup

    def stats(self) -> CacheStats:
        per_layer = tuple(LayerCounters(**vars(c)) for c in self.counters)
        return CacheStats(
            hits=sum(c.hits for c in per_layer), misses=sum(c.misses for c in per_layer),
            bytes_to_device=sum(c.bytes_to_device for c in per_layer),
            evictions=sum(c.evictions for c in per_layer), copy_s=sum(c.copy_s for c in per_layer),
            per_layer=per_layer,
        )
