"""One loader for every way an expert reaches a slot, demand loads first, and one kind of ticket for waiting.

    ticket = loader.load(layer, [(expert, slot), ...], counters, demand=True)   # a batch of one layer's loads
    loader.drop_stale(layer, routed)   # prefetches of this layer not started yet and not routed: their slots
    loader.pump()            # start queued prefetches that now have room (every layer call does)
    ticket.done()            # finished (or failed), without waiting
    ticket.wait(stream)      # CUDA: the stream waits for the copies (the host does not); CPU: the host waits
    loader.used(slots)       # CUDA: the compute stream's queued kernels read these slots
    loader.drain()           # the host waits for every load, queued or in flight, on every stream and thread

Demand loads start at once. Prefetches queue and start while fewer than `window` prefetched experts are in
flight (on CUDA and from the disk twice the top-k; on the CPU from memory no limit, its copies are
memcpy-fast), so a prefetch the router
has since proved wrong can still be dropped before it takes the link, and one it proved right starts at once
as a demand load.

Where the bytes go and how:

- CUDA: demand loads on a high-priority copy stream, prefetches on their own normal-priority one, so a
  demand load never queues behind a prefetch; each batch records an event the compute stream waits on, and a
  copy into a reused slot first waits for the last kernels that read it (`used`). From pinned memory the
  copies go straight to the slots. From pageable memory (the memory map, the files, ordinary RAM, or a failed
  pin) they go through a ring of pinned bounce buffers: the GIL-free copy thread (or, for a demand load, the
  calling thread) fills a buffer, then an asynchronous copy moves it to the slot; a buffer is reused once
  that copy is done. No host mode blocks the forward thread on the link.
- CPU slots: filled directly (slot_fill.py: compiled copies or torch's).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence

import torch

from .counters import LayerCounters
from .slot_fill import SlotFill
from .store import ExpertStore
from .tickets import DONE, CudaTicket, Ticket

COPY_TIME_DECAY = 0.1  # weight of the newest copy in the running copy time
BOUNCE_BYTES = 1 << 30  # pinned bytes a ring may take, beyond its two buffers


class BounceRing:
    """Host buffers of one expert each that copies to the device start from (pinned where it can: the copy is
    then asynchronous). A buffer is free again once the copy that read it is done."""

    def __init__(self, like: dict[str, torch.Tensor], n: int, pin: bool):
        try:
            self.pool = {name: torch.empty((n, *t.shape[1:]), dtype=t.dtype, pin_memory=pin) for name, t in like.items()}
            self.pinned = pin
        except RuntimeError as e:
            warnings.warn(f"pinning {n} bounce buffers failed ({str(e).splitlines()[0]}); copies from pageable "
                          "memory will be synchronous", stacklevel=4)
            self.pool = {name: torch.empty((n, *t.shape[1:]), dtype=t.dtype) for name, t in like.items()}
            self.pinned = False
        self.size = n
        self.free = list(range(n - 1, -1, -1))
        self.reading: list[tuple[torch.cuda.Event, list[int]]] = []  # copies in flight and the buffers they read

    def available(self) -> int:
        self._release()
        return len(self.free)

    def take(self, n: int) -> list[int]:
        """`n` free buffers (the caller made sure there are)."""
        return [self.free.pop() for _ in range(n)]

    def take_waiting(self) -> int:
        """A buffer, the host waiting for the oldest copy in flight if none is free."""
        while not self.available():
            event, buffers = self.reading.pop(0)
            event.synchronize()
            self.free.extend(buffers)
        return self.free.pop()

    def release_after(self, buffers: list[int], event: torch.cuda.Event | None) -> None:
        if event is None:
            self.free.extend(buffers)
        else:
            self.reading.append((event, buffers))

    def _release(self) -> None:
        if self.reading:
            left = []
            for event, buffers in self.reading:
                if event.query():
                    self.free.extend(buffers)
                else:
                    left.append((event, buffers))
            self.reading = left


class BounceTicket(Ticket):
    """A prefetch through the bounce ring: the copy thread fills the buffers; once it has, the forward thread
    (at its next look: `done`, `wait`) queues the copies to the slots, and the buffers come free after them."""

    __slots__ = ("loader", "pairs", "fill", "c", "event", "published")

    def __init__(self, loader: "Loader", pairs: list[tuple[int, int]], fill: Ticket, c: LayerCounters):
        self.loader, self.pairs, self.fill, self.c = loader, pairs, fill, c  # pairs: (slot, buffer)
        self.event, self.published = None, False

    def _advance(self) -> None:
        if not self.published and self.fill.done():
            self.published = True
            ring = self.loader.prefetch_ring
            if self.fill.error() is None:
                self.event = self.loader._publish(self.pairs, self.loader.prefetch_stream, ring, self.c)
            else:
                ring.release_after([b for _, b in self.pairs], None)

    def done(self) -> bool:
        self._advance()
        return self.published and (self.event is None or self.event.query())

    def error(self) -> BaseException | None:
        return self.fill.error()

    def wait(self, stream=None) -> None:
        if not self.published:
            try:
                self.fill.wait()
            finally:
                self._advance()
        if self.event is not None:
            stream.wait_event(self.event)

    def settle(self) -> None:
        try:
            self.fill.wait()
        except Exception:
            pass
        self._advance()
        if self.event is not None:
            self.event.synchronize()


class QueuedLoad(Ticket):
    """One prefetched expert of a queued batch: not started yet, or the ticket of its started part."""

    __slots__ = ("batch", "expert", "slot", "part")

    def __init__(self, batch: "QueuedBatch", expert: int, slot: int):
        self.batch, self.expert, self.slot, self.part = batch, expert, slot, None

    def done(self) -> bool:
        return self.part is not None and self.part.done()

    def error(self) -> BaseException | None:
        return None if self.part is None else self.part.error()

    def wait(self, stream=None) -> None:
        if self.part is None:  # a call needs it now: what of its batch has not started starts as a demand load
            self.batch.loader._promote(self.batch)
        self.part.wait(stream)


class QueuedBatch:
    """One layer's prefetches, in the queue until the window has room for them."""

    __slots__ = ("loader", "layer_pos", "c", "loads")

    def __init__(self, loader: "Loader", layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters):
        self.loader, self.layer_pos, self.c = loader, layer_pos, c
        self.loads = [QueuedLoad(self, e, s) for e, s in loads]  # not started yet

    def start(self, n: int, demand: bool) -> None:
        started, self.loads = self.loads[:n], self.loads[n:]
        part = self.loader._start(self.layer_pos, [(q.expert, q.slot) for q in started], self.c, demand)
        for q in started:
            q.part = part


class Loader:
    def __init__(self, store: ExpertStore, pool: dict[str, torch.Tensor], device: torch.device, lock: threading.Lock,
                 expert_bytes: int, top_k: int = 2, window: int | None = -1, bounce: int | None = None):
        """`window`: prefetched experts in flight at most (None: no limit; -1: the device's default).
        `bounce`: buffers per bounce ring (None: CUDA from pageable memory only; a CPU run may ask for a ring,
        to test it)."""
        self.store, self.pool, self.device, self.lock = store, pool, device, lock
        self.expert_bytes = expert_bytes
        cuda = device.type == "cuda"
        # demand loads on a high-priority stream: they never wait behind a prefetch's copies
        self.demand_stream = torch.cuda.Stream(device, priority=-1) if cuda else None
        self.prefetch_stream = torch.cuda.Stream(device) if cuda else None
        if bounce is None and cuda and not store.pinned:
            bounce = max(2, min(top_k, BOUNCE_BYTES // max(expert_bytes, 1)))
        self.demand_ring = self.prefetch_ring = None
        if bounce:  # two rings: a demand load never waits for a buffer a prefetch holds
            self.demand_ring = BounceRing(pool, bounce, pin=cuda)
            self.prefetch_ring = BounceRing(pool, bounce, pin=cuda)
            self.demand_fill = SlotFill(store, self.demand_ring.pool, lock)
            self.prefetch_fill = SlotFill(store, self.prefetch_ring.pool, lock)
            self.non_blocking = cuda and self.demand_ring.pinned
        else:
            self.demand_fill = self.prefetch_fill = SlotFill(store, pool, lock)
            self.non_blocking = cuda and store.pinned
        if window == -1:  # where the link is slow (PCIe, the disk) stale prefetches must not hold it up
            window = 2 * top_k if cuda or store.mode == "direct" else None
        if self.prefetch_ring is not None:  # a started prefetch holds its buffers until its copy is done
            window = self.prefetch_ring.size if window is None else min(window, self.prefetch_ring.size)
        if window is not None and window < 1:
            raise ValueError(f"the prefetch window must hold at least one expert, not {window}")
        self.window = window
        self.queue: list[QueuedBatch] = []
        self._in_flight: list[tuple[Ticket, int]] = []  # started prefetches and their experts
        self.last_use: dict[int, torch.cuda.Event] = {}  # CUDA: slot -> after the last kernels that read it
        # CUDA copy timings: (counters, start, end, experts copied), read once the copies are done
        self._copy_events: list[tuple[LayerCounters, torch.cuda.Event, torch.cuda.Event, int]] = []
        self.copy_time = 0.0  # CUDA: running mean of one expert's copy, from the events (prefetch depth reads it)

    @property
    def timed_by_events(self) -> bool:
        return self.demand_stream is not None

    @property
    def compiled_copies(self) -> bool:
        return self.prefetch_fill.compiled

    @compiled_copies.setter
    def compiled_copies(self, on: bool) -> None:  # a benchmark compares them with torch's copies
        self.demand_fill.compiled = self.prefetch_fill.compiled = on

    # -- loading ----------------------------------------------------------------------------------------------
    def load(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters, demand: bool) -> list[Ticket]:
        """Start copying `loads` (expert, slot) of one MoE layer (a prefetch may wait in the queue); each load's
        ticket. Demand loads on the CPU are done on return."""
        if demand or self.window is None:  # no window: a prefetch starts at once, like a demand load
            return [self._start(layer_pos, loads, c, demand)] * len(loads)
        batch = QueuedBatch(self, layer_pos, loads, c)
        tickets = list(batch.loads)
        self.queue.append(batch)
        self.pump()
        return tickets

    def pump(self) -> None:
        """Start queued prefetches, oldest first, while the window has room."""
        while self.queue:
            head = self.queue[0]
            room = self._room()
            if room <= 0:
                return
            head.start(room, demand=False)
            if not head.loads:
                self.queue.pop(0)

    def drop_stale(self, layer_pos: int, routed: set[int]) -> list[int]:
        """Drop the queued (not started) prefetches of `layer_pos` whose expert its call did not route to;
        their slots, for the cache to forget."""
        dropped = []
        for batch in self.queue:
            if batch.layer_pos == layer_pos:
                dropped += [q.slot for q in batch.loads if q.expert not in routed]
                batch.loads = [q for q in batch.loads if q.expert in routed]
        if dropped:
            self.queue = [b for b in self.queue if b.loads]
        return dropped

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
        """The host waits until every load posted so far, queued or started, has finished (before timing, or
        before the pinned memory the copies read from is unlocked)."""
        while self.queue:  # what waits for room starts now, in this thread
            self._promote(self.queue[0])
        for ticket, _ in self._in_flight:
            _settle(ticket)
        self._in_flight = []
        self.demand_fill.drain()
        self.prefetch_fill.drain()
        if self.demand_stream is not None:
            self.demand_stream.synchronize()
            self.prefetch_stream.synchronize()

    def close(self) -> None:
        self.drain()
        for fill in {id(f): f for f in (self.demand_fill, self.prefetch_fill)}.values():
            fill.close()

    # -- starting ---------------------------------------------------------------------------------------------
    def _room(self) -> int:
        if self.window is None:
            return len(self.queue[0].loads)
        self._in_flight = [(t, n) for t, n in self._in_flight if not t.done()]
        room = self.window - sum(n for _, n in self._in_flight)
        if self.prefetch_ring is not None:
            room = min(room, self.prefetch_ring.available())
        return room

    def _promote(self, batch: QueuedBatch) -> None:
        self.queue.remove(batch)
        batch.start(len(batch.loads), demand=True)

    def _start(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters, demand: bool) -> Ticket:
        if self.demand_ring is not None:
            ticket = self._bounced(layer_pos, loads, c, demand)
        elif self.demand_stream is not None:
            ticket = self._cuda(layer_pos, loads, c, self.demand_stream if demand else self.prefetch_stream)
        elif demand:  # the call waits for its own copies: they are stall time too
            start = time.perf_counter()
            self.demand_fill.now(layer_pos, loads)
            self._timed(c, time.perf_counter() - start)
            ticket = DONE
        else:
            ticket = self.prefetch_fill.post(layer_pos, loads, c)
        if not demand and self.window is not None:
            self._in_flight.append((ticket, len(loads)))
        return ticket

    def _timed(self, c: LayerCounters, elapsed: float) -> None:
        with self.lock:
            c.copy_s += elapsed
            c.stall_s += elapsed

    def _cuda(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters,
              stream: torch.cuda.Stream) -> CudaTicket:
        """From pinned memory: asynchronous copies straight to the slots."""
        self.harvest_copy_times(wait=False)
        with torch.cuda.stream(stream):
            self._wait_for_readers([slot for _, slot in loads], stream)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            self.demand_fill.now(layer_pos, loads, self.non_blocking)
            end.record(stream)
        self._copy_events.append((c, start, end, len(loads)))
        return CudaTicket(end)

    def _bounced(self, layer_pos: int, loads: list[tuple[int, int]], c: LayerCounters, demand: bool) -> Ticket:
        """Through a bounce ring: a demand load fills each buffer in this thread (the copy thread's GIL-free
        loop, run here) and queues its copy to the device before filling the next, so the copies overlap the
        fills; a prefetch's buffers are filled by the copy thread."""
        if not demand:
            buffers = self.prefetch_ring.take(len(loads))
            fill = self.prefetch_fill.post(layer_pos, [(e, b) for (e, _), b in zip(loads, buffers)], c)
            return BounceTicket(self, [(slot, b) for (_, slot), b in zip(loads, buffers)], fill, c)
        event = None
        for e, slot in loads:
            buffer = self.demand_ring.take_waiting()
            start = time.perf_counter()
            try:
                self.demand_fill.now(layer_pos, [(e, buffer)])
            except BaseException:
                self.demand_ring.release_after([buffer], None)
                raise
            self._timed(c, time.perf_counter() - start)
            event = self._publish([(slot, buffer)], self.demand_stream, self.demand_ring, c)
        return DONE if event is None else CudaTicket(event)

    def _publish(self, pairs: list[tuple[int, int]], stream, ring: BounceRing, c: LayerCounters):
        """Copy filled buffers to their slots (CUDA: queued on `stream`; the event after them, which frees the
        buffers); on the CPU the copies are done on return."""
        if stream is None:
            for slot, buffer in pairs:
                for name, t in self.pool.items():
                    t[slot].copy_(ring.pool[name][buffer])
            ring.release_after([b for _, b in pairs], None)
            return None
        self.harvest_copy_times(wait=False)
        with torch.cuda.stream(stream):
            self._wait_for_readers([slot for slot, _ in pairs], stream)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            for slot, buffer in pairs:
                for name, t in self.pool.items():
                    t[slot].copy_(ring.pool[name][buffer], non_blocking=ring.pinned)
            end.record(stream)
        self._copy_events.append((c, start, end, len(pairs)))
        ring.release_after([b for _, b in pairs], end)
        return end

    def _wait_for_readers(self, slots: list[int], stream) -> None:
        for slot in slots:  # a reused slot may still be read by queued kernels
            if slot in self.last_use:
                stream.wait_event(self.last_use[slot])

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


def _settle(ticket: Ticket) -> None:
    """The host waits for a started load, whatever its kind; a failure stays on the ticket for the cache."""
    if isinstance(ticket, BounceTicket):
        ticket.settle()
    elif isinstance(ticket, CudaTicket):
        ticket.event.synchronize()
    else:
        try:
            ticket.wait()
        except Exception:
            pass
