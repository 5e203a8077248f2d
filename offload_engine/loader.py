"""One loader for every way an expert reaches a slot, and one kind of ticket for waiting on it.

    ticket = loader.load(layer, [(expert, slot), ...], counters, demand=True)   # a batch of one layer's loads
    ticket.done()            # finished (or failed), without waiting
    ticket.wait(stream)      # CUDA: the stream waits for the copies (the host does not); CPU: the host waits
    loader.used(slots)       # CUDA: the compute stream's queued kernels read these slots
    loader.drain()           # the host waits for every copy in flight, on every stream and thread

Where the bytes go and how:

- CUDA: demand loads on a high-priority copy stream, prefetches on their own normal-priority one, so a
  demand load never queues behind a prefetch; each batch records an event the compute stream waits on, and a
  copy into a reused slot first waits for the last kernels that read it (`used`). From pinned memory the
  copies are asynchronous; from pageable memory, the memory map or the files they are not (yet: no bounce
  buffers), and the host waits for each.
- CPU slots (x86-64): compiled copies (copy_worker.py): demand loads in the calling thread with the GIL
  released, prefetches on a thread that never takes the GIL.
- Otherwise (a dtype to convert, another architecture): torch's copies, prefetches on a one-thread pool.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence

import numpy as np
import torch

from . import copy_worker
from .counters import LayerCounters
from .expert_store import ExpertStore

COPY_TIME_DECAY = 0.1  # weight of the newest copy in the running copy time


class Ticket:
    """Loads that completed in the calling thread: nothing to wait for."""

    __slots__ = ()

    def done(self) -> bool:
        return True

    def error(self) -> BaseException | None:
        return None

    def wait(self, stream=None) -> None:
        pass


DONE = Ticket()


class PoolTicket(Ticket):
    __slots__ = ("future",)

    def __init__(self, future: Future):
        self.future = future

    def done(self) -> bool:
        return self.future.done()

    def error(self) -> BaseException | None:
        return self.future.exception() if self.future.done() else None

    def wait(self, stream=None) -> None:
        self.future.result()


class WorkerTicket(Ticket):
    __slots__ = ("posted",)

    def __init__(self, posted: copy_worker.CopyTicket):
        self.posted = posted

    def done(self) -> bool:
        return self.posted.done()

    def error(self) -> BaseException | None:
        return self.posted.exception()

    def wait(self, stream=None) -> None:
        self.posted.result()


class CudaTicket(Ticket):
    __slots__ = ("event",)

    def __init__(self, event: torch.cuda.Event):
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def wait(self, stream=None) -> None:
        stream.wait_event(self.event)


class Loader:
    def __init__(self, store: ExpertStore, pool: dict[str, torch.Tensor], device: torch.device, lock: threading.Lock,
                 expert_bytes: int):
        self.store, self.pool, self.device, self.lock = store, pool, device, lock
        self.expert_bytes = expert_bytes
        cuda = device.type == "cuda"
        # demand loads on a high-priority stream: they never wait behind a prefetch's copies
        self.demand_stream = torch.cuda.Stream(device, priority=-1) if cuda else None
        self.prefetch_stream = torch.cuda.Stream(device) if cuda else None
        self.non_blocking = cuda and store.pinned
        self.last_use: dict[int, torch.cuda.Event] = {}  # CUDA: slot -> after the last kernels that read it
        # CUDA copy timings: (counters, start, end, experts copied), read once the copies are done
        self._copy_events: list[tuple[LayerCounters, torch.cuda.Event, torch.cuda.Event, int]] = []
        self.copy_time = 0.0  # CUDA: running mean of one expert's copy, from the events (prefetch depth reads it)
        self._pool_thread: ThreadPoolExecutor | None = None
        # CPU slots filled by compiled copies: where a store's bytes cannot be copied as they are, torch's copies
        # (a benchmark sets it False to compare the two)
        self.compiled_copies = device.type == "cpu" and copy_worker.available()
        self._pool_base = np.array([t.data_ptr() for t in pool.values()], dtype=np.int64)
        self._pool_stride = np.array([t[0].numel() * t.element_size() for t in pool.values()], dtype=np.int64)
        self._worker: copy_worker.CopyWorker | None = None
        if self.compiled_copies:
            copy_worker.warm()
        self._templates: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, tuple] | None] = {}

    @property
    def timed_by_events(self) -> bool:
        return self.demand_stream is not None

    # -- loading ----------------------------------------------------------------------------------------------
    def load(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters, demand: bool) -> Ticket:
        """Start copying `loads` (expert, slot) of one MoE layer; demand loads on the CPU are done on return."""
        if self.demand_stream is not None:
            return self._load_cuda(layer_pos, loads, c, self.demand_stream if demand else self.prefetch_stream)
        if demand:  # the call waits for its own copies: they are stall time too
            start = time.perf_counter()
            self._copy(layer_pos, loads)
            elapsed = time.perf_counter() - start
            with self.lock:
                c.copy_s += elapsed
                c.stall_s += elapsed
            return DONE
        tasks = self._copy_tasks(layer_pos, loads)
        if tasks is not None:
            if self._worker is None:
                self._worker = copy_worker.CopyWorker(keepalive=(self.pool, self.store.tensors))
            return WorkerTicket(self._worker.post(tasks))  # not timed: the copy thread never comes back to Python
        if self._pool_thread is None:
            self._pool_thread = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch")
        # one task a layer (less Python per call): a call waits for its layer's whole batch, and one failed
        # copy drops the batch's experts (they were all predicted for that same call)
        return PoolTicket(self._pool_thread.submit(self._timed_copy, layer_pos, loads, c))

    def used(self, slots: Sequence[int]) -> None:
        """The current stream's kernels read these slots (CUDA): a later copy into them waits for the kernels."""
        if self.demand_stream is None:
            return
        stream = torch.cuda.current_stream(self.device)
        for slot in slots:
            event = self.last_use.get(slot)
            if event is None:
                event = self.last_use[slot] = torch.cuda.Event()
            event.record(stream)

    def drain(self) -> None:
        """The host waits until every copy posted so far has finished (before timing, or before the pinned
        memory the copies read from is unlocked)."""
        if self._worker is not None:
            self._worker.wait(int(self._worker.box[copy_worker.POSTED]))
        if self._pool_thread is not None:
            self._pool_thread.submit(lambda: None).result()  # one thread, in order: every earlier task is done
        if self.demand_stream is not None:
            self.demand_stream.synchronize()
            self.prefetch_stream.synchronize()

    def close(self) -> None:
        self.drain()
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._pool_thread is not None:
            self._pool_thread.shutdown(wait=True)
            self._pool_thread = None

    # -- copies ---------------------------------------------------------------------------------------------
    def _copy(self, layer_pos: int, loads: list[tuple[int, int]]) -> int:
        tasks = self._copy_tasks(layer_pos, loads)
        if tasks is not None:
            if not copy_worker.copy_now(tasks):
                raise copy_worker.read_error(f"expert(s) {[e for e, _ in loads]} of MoE layer {layer_pos}")
            return len(loads) * self.expert_bytes
        return sum(self.store.copy_into(layer_pos, e, {name: t[s] for name, t in self.pool.items()},
                                        self.non_blocking) for e, s in loads)

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

    def _timed_copy(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters) -> None:
        start = time.perf_counter()
        with torch.inference_mode():  # the pool may be an inference tensor (made under inference mode)
            self._copy(layer_pos, loads)
        with self.lock:
            c.copy_s += time.perf_counter() - start

    def _load_cuda(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters,
                   stream: torch.cuda.Stream) -> CudaTicket:
        self.harvest_copy_times(wait=False)
        with torch.cuda.stream(stream):
            for _, slot in loads:  # a reused slot may still be read by queued kernels
                if slot in self.last_use:
                    stream.wait_event(self.last_use[slot])
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self._copy(layer_pos, loads)
            end.record(stream)
        self._copy_events.append((c, start, end, len(loads)))
        return CudaTicket(end)

    def harvest_copy_times(self, wait: bool) -> None:
        """CUDA copy times, read from their events once the copies are done: without `wait`, only those already
        done (no wait on the hot path)."""
        if not self._copy_events:
            return
        if wait:
            self.demand_stream.synchronize()
            self.prefetch_stream.synchronize()
        left = []
        for counters, start, end, n in self._copy_events:
            if not wait and not end.query():  # two streams: a later batch may finish first
                left.append((counters, start, end, n))
                continue
            elapsed = start.elapsed_time(end) / 1000
            counters.copy_s += elapsed
            per_expert = elapsed / max(n, 1)
            self.copy_time += COPY_TIME_DECAY * (per_expert - self.copy_time) if self.copy_time else per_expert
        self._copy_events = left
