"""Which expert is in which cache slot: the bookkeeping of the expert cache, without tensors.

The engine's cache (cache.py) and the replay simulator (tracing/replay.py) both drive this class, so a
replayed routing trace gives exactly the engine's hits, misses and evictions. Keys are (MoE layer position,
expert). A slot is free, arriving (a load was started: the bytes are not all there yet) or resident.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .counters import LayerCounters
from .policies import Key


@dataclass
class Staging:
    """What a layer call must do before it can run: its slots (in the call's expert order), the loads it has to
    start itself (misses), the slots still arriving from earlier loads, and the keys that lost their slots."""

    slots: list[int] = field(default_factory=list)
    loads: list[tuple[int, int]] = field(default_factory=list)  # (expert, slot)
    waits: list[int] = field(default_factory=list)  # slots arriving (prefetched, not yet complete)
    evicted: list[Key] = field(default_factory=list)


class SlotMap:
    def __init__(self, num_slots: int, policy, expert_bytes: int):
        if num_slots < 0:
            raise ValueError("the expert cache cannot have a negative number of slots")
        self.num_slots, self.policy, self.expert_bytes = num_slots, policy, expert_bytes
        self.slot_of: dict[Key, int] = {}
        self.key_in: list[Key | None] = [None] * num_slots
        self.free = list(range(num_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.arriving: set[int] = set()
        self.unused_prefetches: set[Key] = set()  # prefetched, not used by a call yet

    def call(self, layer: int, experts: Sequence[int], counters: list[LayerCounters]) -> Staging:
        """A layer call needs `experts` (distinct) resident together; victims are never among them."""
        if len(experts) > self.num_slots:
            raise ValueError(f"{len(experts)} experts asked for at once, but the cache has {self.num_slots} slots")
        self.policy.on_call(layer, experts)
        protected = None  # the call's keys, never a victim: built at its first miss (most calls have none)
        c = counters[layer]
        out = Staging()
        # every call runs this loop over its experts: the lookups it repeats are bound once
        slot_of, on_hit, unused, arriving, slots = (self.slot_of, self.policy.on_hit, self.unused_prefetches,
                                                    self.arriving, out.slots)
        for e in experts:
            key = (layer, e)
            slot = slot_of.get(key)
            if slot is None:
                if protected is None:
                    protected = {(layer, e) for e in experts}
                slot = self._claim(protected, counters, out.evicted)
                self._assign(key, slot)
                self.policy.on_insert(key)
                out.loads.append((e, slot))
                c.misses += 1
                c.bytes_to_device += self.expert_bytes
            else:
                on_hit(key)
                c.hits += 1
                if key in unused:
                    unused.discard(key)
                    c.prefetch_hits += 1
                if slot in arriving:
                    out.waits.append(slot)
            slots.append(slot)
        return out

    def prefetch(self, key: Key, protected: set, counters: list[LayerCounters], evicted: list[Key]) -> int | None:
        """Start loading `key` ahead of its call if the policy finds it worth a victim; returns its slot."""
        started = self.prefetch_many([key], protected, counters, evicted)
        return started[0][1] if started else None

    def prefetch_many(self, keys: Sequence[Key], protected: set, counters: list[LayerCounters],
                      evicted: list[Key]) -> list[tuple[Key, int]]:
        """prefetch() for each of `keys` in turn (best first); the (key, slot) of those started. The victims
        are asked for once, in turn (policy.victims): nothing between two of them changes the policy's
        ranking, each key started is resident but protected from the next, each victim taken is gone."""
        excluded = self.excluded(protected)
        victims, taken = None, 0
        started = []
        for key in keys:
            if key in self.slot_of:
                continue
            if self.free:
                slot = self.free.pop()
            else:
                if victims is None:
                    victims = self.policy.victims(excluded, len(keys))
                if taken == len(victims):  # every resident expert is protected or arriving
                    continue
                if not self.policy.worth_prefetching(key, victims[taken]):
                    continue
                slot = self._evict(victims[taken], counters, evicted)
                taken += 1
            self._assign(key, slot)
            self.policy.on_prefetch(key)
            self.unused_prefetches.add(key)
            c = counters[key[0]]
            c.prefetches += 1
            c.bytes_to_device += self.expert_bytes
            excluded.add(key)
            started.append((key, slot))
        return started

    def arrived(self, slot: int) -> None:
        self.arriving.discard(slot)

    def drop(self, slot: int) -> Key | None:
        """Forget a slot whose load failed: it must never be found resident."""
        key = self.key_in[slot]
        if key is not None:
            del self.slot_of[key]
            self.policy.on_evict(key)
            self.unused_prefetches.discard(key)
            self.key_in[slot] = None
            self.free.append(slot)
        self.arriving.discard(slot)
        return key

    def excluded(self, protected: set) -> set:
        """Keys no victim may be: `protected` and every key still arriving (its slot is being written)."""
        return protected | {self.key_in[s] for s in self.arriving}

    def _assign(self, key: Key, slot: int) -> None:
        self.slot_of[key], self.key_in[slot] = slot, key
        self.arriving.add(slot)

    def _claim(self, protected: set, counters: list[LayerCounters], evicted: list[Key]) -> int:
        if self.free:
            return self.free.pop()
        # an arriving slot is being written: it cannot be given away before its load completes
        return self._evict(self.policy.victim(self.excluded(protected)), counters, evicted)

    def _evict(self, victim: Key, counters: list[LayerCounters], evicted: list[Key]) -> int:
        slot = self.slot_of.pop(victim)
        self.policy.on_evict(victim)
        self.unused_prefetches.discard(victim)
        self.key_in[slot] = None
        counters[victim[0]].evictions += 1
        evicted.append(victim)
        return slot
