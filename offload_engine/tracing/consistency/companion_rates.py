"""Companion hit rates under SCH's rules (batched lookup, warm start, per sequence): LRU, LFU and Belady.

LRU evicts the least recent use; LFU the fewest total past uses (counts survive eviction), ties by least
recent use; Belady the furthest next use in the flattened request stream (never again = furthest; ties
by least recent use, which cannot change a hit count). With batched lookups Belady is not a strict upper
bound of SCH. These are the metric definitions' caches, compared with SCH; the engine's own cache, with its
own rules, is replayed by tracing/replay.py (sch_simulator.py lists the differences).
"""

from __future__ import annotations

from ..trace_file import RoutingTrace
from .sch_simulator import HitRate, hit_rate


def lru(trace: RoutingTrace, capacity: int, layer: int | None = None) -> HitRate:
    """LRU hit rate with `capacity` experts, for the model (layer=None) or one layer."""
    return hit_rate(trace, "lru", capacity, layer=layer)


def lfu(trace: RoutingTrace, capacity: int, layer: int | None = None) -> HitRate:
    """LFU hit rate with `capacity` experts, for the model (layer=None) or one layer."""
    return hit_rate(trace, "lfu", capacity, layer=layer)


def belady(trace: RoutingTrace, capacity: int, layer: int | None = None) -> HitRate:
    """Belady (furthest next use) hit rate with `capacity` experts, for the model or one layer."""
    return hit_rate(trace, "belady", capacity, layer=layer)
