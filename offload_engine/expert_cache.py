"""A fixed pool of expert slots on the compute device, filled from the expert store on demand or ahead of time.

Ask for the experts one layer call needs (`fetch`), get slot indices back; the slot tensors then hold exactly
those experts' weights. `prefetch` starts loading experts a later call is predicted to need, without waiting.
Which expert is in which slot is SlotMap's business (slot_map.py), which slot gives way the policy's.

Loads run where they overlap compute: on CUDA on a copy stream, each slot with a `ready` event (the compute
stream waits for it) and a `last_use` event recorded after the kernels that read it (a copy into a reused
slot waits for it: a slot is never overwritten while a queued kernel still reads it). On the CPU (x86-64),
compiled copies (copy_worker.py): demand loads in the calling thread, prefetches on a thread that never takes
the GIL; where the bytes need converting, torch's copies (prefetches on a thread pool).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from . import copy_worker
from .counters import CacheStats, LayerCounters, new_counters
from .expert_store import ExpertStore
from .policies import Key, LRUPolicy
from .slot_map import SlotMap, Staging

COPY_TIME_DECAY = 0.1  # weight of the newest copy in the running copy time


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device, policy=None):
        self.store = store
        self.device = torch.device(device)
        spec = store.spec
        self.policy = policy or LRUPolicy()
        self.map = SlotMap(num_slots, self.policy, store.expert_nbytes())
        self.num_slots = num_slots
        # S=slots; one [S, *shape] tensor per runtime expert parameter (gate_up_proj, down_proj, biases...)
        self.pool = {
            p.name: torch.empty((num_slots, *p.shape), dtype=store.dtype, device=self.device)
            for p in spec.expert_params
        }
        # [L, E] -> slot (-1: not resident), on the host: a layer call turns its routing, already read to the
        # host, into slot ids with one numpy gather (a write ~100 ns; a device table cost a queued fill a write
        # and a torch gather and subtraction a call)
        self.slot_table = np.full((spec.num_moe_layers, spec.num_experts), -1, dtype=np.int64)
        self.counters = new_counters(spec.num_moe_layers)  # used when no request's counters are given
        self.lock = threading.Lock()  # the map is touched by the forward thread and by prefetch completions
        cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.non_blocking = cuda and store.pinned
        self.ready: dict[int, torch.cuda.Event | Future | copy_worker.CopyTicket] = {}  # slot -> completion of its last load
        self.last_use: dict[int, torch.cuda.Event] = {}  # CUDA: slot -> after the last kernels that read it
        # CUDA copy timings: (counters, start, end, experts copied), read once the copies are done
        self._copy_events: list[tuple[LayerCounters, torch.cuda.Event, torch.cuda.Event, int]] = []
        self.copy_time = 0.0  # CUDA: running mean of one expert's copy, from the events (prefetch depth reads it)
        self._loader: ThreadPoolExecutor | None = None
        # CPU slots filled by compiled copies (copy_worker.py): demand loads in this thread, prefetches on a thread
        # that never takes the GIL; where a store's bytes cannot be copied as they are, torch's copies (a benchmark
        # sets it False to compare the two)
        self.compiled_copies = self.device.type == "cpu" and copy_worker.available()
        self._pool_base = np.array([t.data_ptr() for t in self.pool.values()], dtype=np.int64)
        self._pool_stride = np.array([t[0].numel() * t.element_size() for t in self.pool.values()], dtype=np.int64)
        self._worker: copy_worker.CopyWorker | None = None
        if self.compiled_copies:
            copy_worker.warm()
        self._templates: dict[Key, tuple[np.ndarray, np.ndarray, tuple] | None] = {}

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

    def stats(self, counters: list[LayerCounters] | None = None) -> CacheStats:
        self._resolve_copy_times()
        return CacheStats.of(self.counters if counters is None else counters)

    # -- demand ---------------------------------------------------------------------------------------------
    def fetch(self, layer_pos: int, experts: Sequence[int], counters: list[LayerCounters] | None = None) -> list[int]:
        """Make `experts` (distinct) of one MoE layer resident together; their slots, in the same order."""
        counters = self.counters if counters is None else counters
        self._sweep()
        if len(self.map.arriving) > self.num_slots - len(experts):
            self._wait(list(self.map.arriving), counters[layer_pos])  # too many slots still being written
        with self.lock:
            staging = self.map.call(layer_pos, experts, counters)
            self._retable(staging.evicted, [(layer_pos, e, s) for e, s in staging.loads])
        waits = staging.waits
        if staging.loads:
            self._load(layer_pos, staging.loads, counters[layer_pos], demand=True)
            if self.copy_stream is not None:  # the compute stream must wait for the call's own copies too
                waits = waits + [slot for _, slot in staging.loads]
        self._wait(waits, counters[layer_pos])
        return staging.slots

    def used(self, slots: Sequence[int]) -> None:
        """The current stream's kernels read these slots (CUDA): a later copy into them waits for the kernels."""
        if self.copy_stream is None:
            return
        stream = torch.cuda.current_stream(self.device)
        for slot in slots:
            event = self.last_use.get(slot)
            if event is None:
                event = self.last_use[slot] = torch.cuda.Event()
            event.record(stream)

    # -- ahead of time --------------------------------------------------------------------------------------
    def prefetch(self, keys: Sequence[Key], protected: set, counters: list[LayerCounters] | None = None) -> int:
        """Start loading `keys` (best first) where the policy finds them worth a victim; returns how many."""
        counters = self.counters if counters is None else counters
        self._sweep()
        started: dict[int, list[tuple[int, int]]] = {}
        evicted: list[Key] = []
        with self.lock:
            excluded = self.map.excluded(protected)
            for key in keys:
                slot = self.map.prefetch(key, protected, counters, evicted, excluded)
                if slot is not None:
                    excluded.add(key)
                    started.setdefault(key[0], []).append((key[1], slot))
            self._retable(evicted, [(layer, e, s) for layer, loads in started.items() for e, s in loads])
        batches = list(started.items())
        for i, (layer, loads) in enumerate(batches):
            try:
                self._load(layer, loads, counters[layer], demand=False)
            except BaseException:  # _load forgot its own slots; the layers not yet started must not look resident
                self._forget([slot for _, later in batches[i + 1:] for _, slot in later])
                raise
        return sum(map(len, started.values()))

    def drain(self) -> None:
        """Wait for every load in flight (before timing, or before the engine goes away)."""
        self._wait(list(self.map.arriving), LayerCounters())

    def close(self) -> None:
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._loader = None

    # -- loads ----------------------------------------------------------------------------------------------
    def _retable(self, evicted: list[Key], placed: list[tuple[int, int, int]]) -> None:
        for key in evicted:
            self.slot_table[key] = -1
        for layer, e, slot in placed:
            self.slot_table[layer, e] = slot

    def _copy(self, layer_pos: int, loads: list[tuple[int, int]]) -> int:
        tasks = self._copy_tasks(layer_pos, loads)
        if tasks is not None:
            if not copy_worker.copy_now(tasks):
                raise copy_worker.read_error(f"expert(s) {[e for e, _ in loads]} of MoE layer {layer_pos}")
            return len(loads) * self.map.expert_bytes
        return sum(self.store.copy_into(layer_pos, e, self.slot_tensors(s), self.non_blocking) for e, s in loads)

    def _copy_tasks(self, layer_pos: int, loads: list[tuple[int, int]]) -> np.ndarray | None:
        """The loads as copy_worker task rows (destination in the slot pool, source in host memory or the map),
        or None where they need torch's copies (CUDA, a dtype to convert, not x86-64)."""
        if not self.compiled_copies:
            return None
        parts, files = [], set()
        for e, slot in loads:
            template = self._templates.get((layer_pos, e))
            if template is None:
                template = self._templates[layer_pos, e] = self._template(layer_pos, e)
                if template is None:
                    self.compiled_copies = False  # one layout for every expert: the others cannot be copied as they are
                    return None
            rows, strides, sources = template
            rows = rows.copy()
            rows[:, 0] += slot * strides
            parts.append(rows)
            files.update(sources)
        self.store.check_sources(files)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _template(self, layer_pos: int, e: int):
        """An expert's task rows for slot 0, the per-row stride of one slot, and its source files."""
        plan = self.store.copy_plan(layer_pos, e)
        if plan is None:
            return None
        rows, sources = plan
        param = rows[:, 0]
        tasks = copy_worker.task_rows(len(rows))
        tasks[:, 0] = self._pool_base[param] + rows[:, 1]
        tasks[:, 1:] = rows[:, 2:]
        return tasks, self._pool_stride[param], sources

    def _load(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters, demand: bool) -> None:
        try:
            if self.copy_stream is not None:
                self._load_cuda(layer_pos, loads, c)
            elif demand:  # the call waits for its own copies: they are stall time too
                start = time.perf_counter()
                self._copy(layer_pos, loads)
                elapsed = time.perf_counter() - start
                with self.lock:
                    c.copy_s += elapsed
                    c.stall_s += elapsed
                    for _, slot in loads:
                        self.map.arrived(slot)
            elif (tasks := self._copy_tasks(layer_pos, loads)) is not None:
                if self._worker is None:
                    self._worker = copy_worker.CopyWorker(keepalive=(self.pool, self.store.tensors))
                ticket = self._worker.post(tasks)  # not timed: the copy thread never comes back to Python
                for _, slot in loads:
                    self.ready[slot] = ticket
            else:
                if self._loader is None:
                    self._loader = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch")
                # one task a layer (less Python per call): a call waits for its layer's whole batch, and one
                # failed copy drops the batch's experts (they were all predicted for that same call)
                done = self._loader.submit(self._timed_copy, layer_pos, loads, c)
                for _, slot in loads:
                    self.ready[slot] = done
        except BaseException:  # a slot whose copy failed must not be found resident later
            self._forget([slot for _, slot in loads])
            raise

    def _timed_copy(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters) -> None:
        start = time.perf_counter()
        with torch.inference_mode():  # the pool may be an inference tensor (made under inference mode)
            self._copy(layer_pos, loads)
        with self.lock:
            c.copy_s += time.perf_counter() - start

    def _load_cuda(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters) -> None:
        self._harvest_copy_times(wait=False)
        with torch.cuda.stream(self.copy_stream):
            for _, slot in loads:  # a reused slot may still be read by queued kernels
                if slot in self.last_use:
                    self.copy_stream.wait_event(self.last_use[slot])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.copy_stream)
            self._copy(layer_pos, loads)
            end.record(self.copy_stream)
        self._copy_events.append((c, start, end, len(loads)))
        for _, slot in loads:
            self.ready[slot] = end

    def _wait(self, slots: Sequence[int], c: LayerCounters) -> None:
        """Block the compute (CUDA: the compute stream; CPU: this thread) until these slots hold their bytes."""
        if not slots:
            return
        start = time.perf_counter()
        failed = None
        for slot in slots:
            handle = self.ready.pop(slot, None)
            if handle is None:
                continue
            if isinstance(handle, (Future, copy_worker.CopyTicket)):
                try:
                    handle.result()
                except BaseException as e:  # the prefetch failed: the slot holds nothing
                    failed = failed or e
                    self._forget([slot])
                    continue
            else:
                torch.cuda.current_stream(self.device).wait_event(handle)
        with self.lock:
            for slot in slots:
                self.map.arrived(slot)
        c.stall_s += time.perf_counter() - start
        if failed is not None:
            raise failed

    def _sweep(self) -> None:
        """Mark finished loads as arrived (an arriving slot cannot be evicted); drop failed prefetches."""
        done, failed = [], []
        for slot, handle in list(self.ready.items()):
            if isinstance(handle, (Future, copy_worker.CopyTicket)):
                if handle.done():
                    (failed if handle.exception() is not None else done).append(slot)
            elif handle.query():
                done.append(slot)
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

    def _resolve_copy_times(self) -> None:
        """CUDA copy times of every copy queued so far (waits for them)."""
        self._harvest_copy_times(wait=True)

    def _harvest_copy_times(self, wait: bool) -> None:
        """CUDA copy times, read from their events once the copies are done: without `wait`, only those already
        done (no sync on the hot path)."""
        if wait and self._copy_events:
            self.copy_stream.synchronize()
        done = 0
        for counters, start, end, n in self._copy_events:
            if not wait and not end.query():
                break  # one stream: later copies finish later
            elapsed = start.elapsed_time(end) / 1000
            counters.copy_s += elapsed
            per_expert = elapsed / max(n, 1)
            self.copy_time += COPY_TIME_DECAY * (per_expert - self.copy_time) if self.copy_time else per_expert
            done += 1
        del self._copy_events[:done]

    def preload(self, keys: Sequence[Key], progress: bool = True) -> None:
        """Fill free slots with `keys` up front (e.g. every expert, when all fit); counted as bytes moved."""
        for layer_pos, e in tqdm(keys, desc="experts to device", disable=not progress, unit="expert"):
            if not self.map.free:
                break
            if (layer_pos, e) not in self.map.slot_of:
                self.fetch(layer_pos, [e])
                self.counters[layer_pos].misses -= 1  # preloading is not a lookup
