"""Filling the slots of one pool from the expert store: the CPU's own slots, the pinned bounce buffers a
CUDA copy starts from, or (from pinned memory) CUDA slots directly.

- Host slots, x86-64, bytes copied as they are: compiled copies (copy_worker.py), `now` in the calling thread
  with the GIL released, `post` on a thread that never takes the GIL.
- Otherwise (CUDA slots, a dtype to convert, another architecture): torch's copies, `post` on a one-thread
  pool.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import copy_worker
from .counters import LayerCounters
from .store import ExpertStore
from .tickets import PoolTicket, Ticket, WorkerTicket


class SlotFill:
    def __init__(self, store: ExpertStore, pool: dict[str, torch.Tensor], lock: threading.Lock):
        self.store, self.pool, self.lock = store, pool, lock
        # compiled copies where a store's bytes can be copied as they are (a benchmark sets it False to compare)
        self.compiled = copy_worker.available() and all(t.device.type == "cpu" for t in pool.values())
        self._pool_base = np.array([t.data_ptr() for t in pool.values()], dtype=np.int64)
        self._pool_stride = np.array([t[0].numel() * t.element_size() if len(t) else 0 for t in pool.values()],
                                     dtype=np.int64)
        self._worker: copy_worker.CopyWorker | None = None
        self._pool_thread: ThreadPoolExecutor | None = None
        self._scratch = None  # the calling thread's aligned buffer for direct reads (the copy thread has its own)
        if self.compiled:
            copy_worker.warm()
        self._templates: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, tuple] | None] = {}

    def now(self, layer_pos: int, loads: list[tuple[int, int]], non_blocking: bool = False) -> None:
        """Fill (expert, slot) `loads` of one MoE layer in this thread."""
        tasks = self._copy_tasks(layer_pos, loads)
        if tasks is not None:
            if self._scratch is None:
                self._scratch = copy_worker.scratch_buffer()
            if not copy_worker.copy_now(tasks, self._scratch):
                raise copy_worker.read_error(f"expert(s) {[e for e, _ in loads]} of MoE layer {layer_pos}")
            return
        for e, s in loads:
            self.store.copy_into(layer_pos, e, {name: t[s] for name, t in self.pool.items()}, non_blocking)

    def post(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters) -> Ticket:
        """Fill `loads` in the background."""
        tasks = self._copy_tasks(layer_pos, loads)
        if tasks is not None:
            if self._worker is None:
                self._worker = copy_worker.CopyWorker(keepalive=(self.pool, self.store.tensors))
            return WorkerTicket(self._worker.post(tasks))  # not timed: the copy thread never comes back to Python
        if self._pool_thread is None:
            self._pool_thread = ThreadPoolExecutor(1, thread_name_prefix="expert-prefetch")
        # one task a batch (less Python per call): a call waits for its layer's whole batch, and one failed
        # copy drops the batch's experts (they were all predicted for that same call)
        return PoolTicket(self._pool_thread.submit(self._timed_fill, layer_pos, loads, c))

    def drain(self) -> None:
        """The host waits until every posted fill has finished."""
        if self._worker is not None:
            self._worker.wait(int(self._worker.box[copy_worker.POSTED]))
        if self._pool_thread is not None:
            self._pool_thread.submit(lambda: None).result()  # one thread, in order: every earlier task is done

    def close(self) -> None:
        self.drain()
        if self._worker is not None:
            self._worker.close()
            self._worker = None
        if self._pool_thread is not None:
            self._pool_thread.shutdown(wait=True)
            self._pool_thread = None

    @property
    def worker_started(self) -> bool:
        return self._worker is not None

    def _timed_fill(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters) -> None:
        start = time.perf_counter()
        with torch.inference_mode():  # the pool may be an inference tensor (made under inference mode)
            self.now(layer_pos, loads)
        with self.lock:
            c.copy_s += time.perf_counter() - start

    def _copy_tasks(self, layer_pos: int, loads: list[tuple[int, int]]) -> np.ndarray | None:
        """The loads as copy_worker task rows (destination in the pool, source in host memory or the files), or
        None where they need torch's copies (a dtype to convert, not x86-64)."""
        if not self.compiled:
            return None
        parts, destinations, files = [], [], set()
        for e, slot in loads:
            template = self._templates.get((layer_pos, e))
            if template is None:
                template = self._templates[layer_pos, e] = self._template(layer_pos, e)
                if template is None:
                    self.compiled = False  # one layout for every expert: the others cannot be copied as they are
                    return None
            rows, at_slot_0, strides, sources = template
            parts.append(rows)
            # a decode batch's few rows: Python's integers beat a numpy product and concatenation per batch
            destinations += [d + slot * s for d, s in zip(at_slot_0, strides)]
            files.update(sources)
        self.store.check_sources(files)
        tasks = np.concatenate(parts)  # a new array: the templates stay as they are
        tasks[:, 0] = destinations
        return tasks

    def _template(self, layer_pos: int, e: int):
        """An expert's task rows for slot 0, their destinations there and the per-row stride of one slot (as
        Python integers), and its source files."""
        spans = self.store.copy_spans(layer_pos, e)
        if spans is None:
            return None
        rows, sources = spans
        param = rows[:, 0]
        tasks = copy_worker.task_rows(len(rows))
        tasks[:, 0] = self._pool_base[param] + rows[:, 1]
        tasks[:, 1:] = rows[:, 2:]
        return tasks, tasks[:, 0].tolist(), self._pool_stride[param].tolist(), sources
