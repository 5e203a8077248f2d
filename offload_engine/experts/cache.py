"""A fixed pool of expert slots on the compute device, filled from the expert store on demand or ahead of time.

Ask for the experts one layer call needs (`fetch`), get slot indices back; the slot tensors then hold exactly
those experts' weights. `prefetch` starts loading experts a later call is predicted to need, without waiting.
Which expert is in which slot is SlotMap's business (slot_map.py), which slot gives way the policy's.

Loads go through one loader (loader.py: demand before prefetch, CUDA streams and events, the CPU's compiled
copies and copy thread); each arriving slot keeps its load's ticket until the slot is found complete.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .counters import CacheStats, LayerCounters, new_counters
from .loader import Loader, Ticket
from .policies import Key, LRUPolicy
from .slot_map import SlotMap
from .store import ExpertStore


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device, policy=None,
                 prefetch_window: int | None = -1, bounce: int | None = None):
        """`prefetch_window`, `bounce`: the loader's (loader.py): prefetched experts in flight at most (-1: the
        device's default), bounce buffers per ring (None: where the device needs them)."""
        self.store = store
        self.device = torch.device(device)
        spec = store.spec
        self.policy = policy or LRUPolicy()
        self.map = SlotMap(num_slots, self.policy, store.expert_nbytes())
        self.num_slots = num_slots
        # S=slots; one [S, *shape] tensor per stored expert tensor (gate_up_proj, down_proj, biases...; a quantized
        # format's values and scales)
        self.pool = {
            t.name: torch.empty((num_slots, *t.shape), dtype=t.dtype, device=self.device)
            for t in store.format.stored
        }
        # [L, E] -> slot (-1: not resident), on the host: a layer call turns its routing, already read to the
        # host, into slot ids with one numpy gather (a write ~100 ns; a device table cost a queued fill a write
        # and a torch gather and subtraction a call)
        self.slot_table = np.full((spec.num_moe_layers, spec.num_experts), -1, dtype=np.int64)
        self.counters = new_counters(spec.num_moe_layers)  # used when no request's counters are given
        self.lock = threading.Lock()  # the map is touched by the forward thread and by prefetch completions
        self.loader = Loader(store, self.pool, self.device, self.lock, store.expert_nbytes(), spec.top_k,
                             prefetch_window, bounce)
        self.ready: dict[int, Ticket] = {}  # slot -> its load's ticket, until the slot is found complete

    # -- views ----------------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pool.values())

    @property
    def slot_of(self) -> dict[Key, int]:
        return self.map.slot_of

    @property
    def key_in(self) -> list[Key | None]:
        return self.map.key_in

    def slot_tensors(self, slot: int) -> dict[str, torch.Tensor]:
        return {name: t[slot] for name, t in self.pool.items()}

    @property
    def copy_time(self) -> float:
        """CUDA: the running mean of one expert's copy, from the copies' events (0 elsewhere)."""
        return self.loader.copy_time

    def stats(self, counters: list[LayerCounters] | None = None) -> CacheStats:
        self.loader.harvest_copy_times(wait=True)
        return CacheStats.of(self.counters if counters is None else counters)

    # -- demand ---------------------------------------------------------------------------------------------
    def fetch(self, layer_pos: int, experts: Sequence[int], counters: list[LayerCounters] | None = None) -> list[int]:
        """Make `experts` (distinct) of one MoE layer resident together; their slots, in the same order."""
        counters = self.counters if counters is None else counters
        self._drop_stale(layer_pos, experts, counters[layer_pos])
        self._sweep()
        if len(self.map.arriving) > self.num_slots - len(experts):
            self._wait(list(self.map.arriving), counters[layer_pos])  # too many slots still being written
        with self.lock:
            staging = self.map.call(layer_pos, experts, counters)
            if staging.loads:  # a call of hits changes no slot
                self._retable(staging.evicted, [(layer_pos, e, s) for e, s in staging.loads])
        waits = staging.waits
        if staging.loads:
            self._load(layer_pos, staging.loads, counters[layer_pos], demand=True)
            waits = waits + [slot for _, slot in staging.loads]  # the call's own copies (CUDA: not done yet)
        self._wait(waits, counters[layer_pos])
        return staging.slots

    def used(self, slots: Sequence[int]) -> None:
        """The current stream's kernels read these slots (CUDA): a later copy into them waits for the kernels."""
        self.loader.used(slots)

    # -- ahead of time --------------------------------------------------------------------------------------
    def prefetch(self, keys: Sequence[Key], protected: set, counters: list[LayerCounters] | None = None) -> int:
        """Start loading `keys` (best first) where the policy finds them worth a victim; returns how many."""
        counters = self.counters if counters is None else counters
        self._sweep()
        evicted: list[Key] = []
        with self.lock:
            started = self.map.prefetch_many(keys, protected, counters, evicted)
            table = self.slot_table  # _retable's writes, without its lists (a prefetching call's hot path)
            for key in evicted:
                table[key] = -1
            for key, slot in started:
                table[key] = slot
        if not started:
            return 0
        batches = _by_layer(started)
        for i, (layer, loads) in enumerate(batches):
            try:
                self._load(layer, loads, counters[layer], demand=False)
            except BaseException:  # _load forgot its own slots; the layers not yet started must not look resident
                self._forget([slot for _, later in batches[i + 1:] for _, slot in later])
                raise
        return len(started)

    def drain(self) -> None:
        """The host waits for every load in flight, on every stream and thread (before timing, or before the
        engine goes away and unlocks the pinned memory the copies read)."""
        self.loader.drain()
        self._sweep()

    def close(self) -> None:
        """Every load finished, the copy thread and pool stopped (they restart if the cache is used again)."""
        self.loader.close()
        self._sweep()

    # -- loads ----------------------------------------------------------------------------------------------
    def _retable(self, evicted: list[Key], placed: list[tuple[int, int, int]]) -> None:
        for key in evicted:
            self.slot_table[key] = -1
        for layer, e, slot in placed:
            self.slot_table[layer, e] = slot

    def _load(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters, demand: bool) -> None:
        try:
            tickets = self.loader.load(layer_pos, loads, c, demand)
        except BaseException:  # a slot whose copy failed must not be found resident later
            self._forget([slot for _, slot in loads])
            raise
        for (_, slot), ticket in zip(loads, tickets):
            self.ready[slot] = ticket

    def _wait(self, slots: Sequence[int], c: LayerCounters) -> None:
        """Make the compute wait until these slots hold their bytes (CUDA: the compute stream waits for the
        copies' events, the host does not; CPU: this thread waits for the copy thread or pool)."""
        if not slots:
            return
        start = time.perf_counter()
        failed = None
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        for slot in slots:
            ticket = self.ready.pop(slot, None)
            if ticket is None:
                continue
            try:
                ticket.wait(stream)
            except BaseException as e:  # the prefetch failed: the slot holds nothing
                failed = failed or e
                self._forget([slot])
        with self.lock:
            for slot in slots:
                self.map.arrived(slot)
        c.stall_s += time.perf_counter() - start
        if failed is not None:
            raise failed

    def _drop_stale(self, layer_pos: int, experts: Sequence[int], c: LayerCounters) -> None:
        """Prefetches of this layer still queued that its routing did not ask for never start: their slots are
        free for this call's misses, and the bytes they would have moved are not counted."""
        if not self.loader.queue:
            return
        dropped = self.loader.drop_stale(layer_pos, set(experts))
        if dropped:
            self._forget(dropped)
            with self.lock:
                c.prefetches -= len(dropped)
                c.prefetches_dropped += len(dropped)
                c.bytes_to_device -= len(dropped) * self.map.expert_bytes

    def _sweep(self) -> None:
        """Start queued prefetches that now have room; mark finished loads as arrived (an arriving slot cannot
        be evicted); drop failed prefetches."""
        self.loader.pump()
        done, failed = [], []
        settled: dict[Ticket, bool] = {}  # a batch's slots share its ticket: asked once (done stays done)
        for slot, ticket in list(self.ready.items()):
            ok = settled.get(ticket)
            if ok is None:
                if not ticket.done():
                    continue
                ok = settled[ticket] = ticket.error() is None
            (done if ok else failed).append(slot)
        if failed:
            self._forget(failed)
        if done:
            with self.lock:
                for slot in done:
                    self.ready.pop(slot, None)
                    self.map.arrived(slot)

    def _forget(self, slots: list[int]) -> None:
        with self.lock:
            dropped = []
            for slot in slots:
                key = self.map.drop(slot)
                if key is not None:
                    dropped.append(key)
                self.ready.pop(slot, None)
            self._retable(dropped, [])

    def preload(self, keys: Sequence[Key], progress: bool = True) -> None:
        """Fill free slots with `keys` up front (e.g. every expert, when all fit); counted as bytes moved."""
        for layer_pos, e in tqdm(keys, desc="experts to device", disable=not progress, unit="expert"):
            if not self.map.free:
                break
            if (layer_pos, e) not in self.map.slot_of:
                self.fetch(layer_pos, [e])
                self.counters[layer_pos].misses -= 1  # preloading is not a lookup


def _by_layer(started: list[tuple[Key, int]]) -> list[tuple[int, list[tuple[int, int]]]]:
    """(layer, [(expert, slot), ...]) per layer, in the order the layers first come; usually there is one."""
    layer = started[0][0][0]
    if all(key[0] == layer for key, _ in started):
        return [(layer, [(e, slot) for (_, e), slot in started])]
    batches: dict[int, list[tuple[int, int]]] = {}
    for (layer, e), slot in started:
        batches.setdefault(layer, []).append((e, slot))
    return list(batches.items())
