"""Eviction policies for the expert cache: which resident expert gives up its slot.

A policy sees keys (any hashable, the cache uses (layer, expert)) and three events; it knows nothing about
models. `victim` must never return a protected key (one the current layer call still needs).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable


class LRUPolicy:
    """Least recently used: evict the key whose last use is oldest."""

    name = "lru"

    def __init__(self):
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # oldest first

    def on_insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_hit(self, key: Hashable) -> None:
        self._order.move_to_end(key)

    def on_evict(self, key: Hashable) -> None:
        del self._order[key]

    def victim(self, protected: set) -> Hashable:
        for key in self._order:
            if key not in protected:
                return key
        raise RuntimeError("every resident expert is protected; the cache needs more slots")


POLICIES = {"lru": LRUPolicy}


def make_policy(name: str):
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}") from None
