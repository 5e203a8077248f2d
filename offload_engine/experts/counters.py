"""The cache's counters, per MoE layer and in total: what a request (or the whole engine) cost in loads."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class LayerCounters:
    hits: int = 0  # needed experts resident or already arriving when their call started
    misses: int = 0  # loads a call had to start itself (demand loads)
    prefetches: int = 0  # loads started ahead of the call that needs them
    prefetch_hits: int = 0  # prefetched experts used by a call before their eviction
    prefetches_dropped: int = 0  # prefetches still queued when their layer's routing proved them wrong (never moved)
    bytes_to_device: int = 0  # every load: demand and prefetch
    evictions: int = 0
    stall_s: float = 0.0  # time calls waited for their experts (demand loads and unfinished prefetches)
    copy_s: float = 0.0  # time spent copying experts into slots (CUDA: measured with events; on the CPU the
    # copy thread's prefetches are not timed, it never returns to Python: demand loads and pool copies only)
    cpu_experts: int = 0  # experts computed on the CPU from host memory instead of a slot
    cpu_s: float = 0.0  # time spent computing them
    cpu_packed: int = 0  # CPU experts packed for oneDNN at their first call (each holds its bytes in RAM from then)
    predict_s: float = 0.0  # time the predictor took (observing the routing, predicting, informing the policy)
    host_syncs: int = 0  # reads of the device the host waited for (host_read.py: one per layer call)

    def add(self, other: "LayerCounters") -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def new_counters(num_layers: int) -> list[LayerCounters]:
    return [LayerCounters() for _ in range(num_layers)]


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of the counters: totals, and per MoE layer position in `per_layer`."""

    hits: int
    misses: int
    prefetches: int
    prefetch_hits: int
    prefetches_dropped: int
    bytes_to_device: int
    evictions: int
    stall_s: float
    copy_s: float
    cpu_experts: int
    cpu_s: float
    cpu_packed: int
    predict_s: float
    host_syncs: int
    per_layer: tuple[LayerCounters, ...] = field(repr=False)

    @classmethod
    def of(cls, counters: list[LayerCounters]) -> "CacheStats":
        per_layer = tuple(LayerCounters(**asdict(c)) for c in counters)
        totals = LayerCounters()
        for c in per_layer:
            totals.add(c)
        return cls(**asdict(totals), per_layer=per_layer)

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def minus(self, earlier: "CacheStats") -> "CacheStats":
        layers = []
        for a, b in zip(self.per_layer, earlier.per_layer):
            layers.append(LayerCounters(**{f.name: getattr(a, f.name) - getattr(b, f.name) for f in fields(a)}))
        return CacheStats.of(layers)
