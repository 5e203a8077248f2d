"""One engine thread that owns generation; any thread submits prompts to it and reads their handles.

`submit` checks the prompt and its settings in the caller's thread (a bad one raises there, at once), then
puts the request on a bounded FIFO queue (full: QueueFullError) and returns its Handle.

Continuous batching (continuous.py), for models whose every layer is a full-attention layer with
transformers' standard KV cache (row_cache.fits: Qwen3-MoE, Mixtral, OLMoE, Qwen2-MoE, DeepSeek, ...),
decided once at load (engine.continuous_batching): between decode steps the engine thread admits the oldest
waiting requests into the batch's free rows (up to max_batch; any settings), each prefilled alone, at most
`prefill_chunk` prompt tokens between two decode steps (a longer prompt in chunks over several steps, its row
held meanwhile; 0: whole prompts), then runs one decode step for every row; a row leaves the step it ends,
and a cancelled one at the next step, so its place is free for a waiting request. Each row's tokens are the
ones it gets alone (`engine.generate`; a chunked prompt's logits round differently, continuous.py says what
holds). While
any row runs, the batch holds all max_batch rows in the runtime's admission (its KV cache is allocated whole).
Which waiting requests join is the `schedule`'s choice: "fifo" (the default; `engine.submit`'s scheduler
always) admits the oldest; "routing" (schedule.py) admits, when more wait than rows are free, those whose
routing signatures add the fewest experts to the running rows', with an ageing bound: a request that
`max_skips` younger requests were admitted ahead of goes next (default DEFAULT_SKIPS_PER_ROW x max_batch).

Static batches, for the others (sliding-window or linear-attention layers, or a cache of the model's own:
gpt-oss, Qwen3-Next, MiniMax): the engine thread takes the oldest waiting request and, behind it, the
following ones with the same SamplingConfig (max_new_tokens, temperature, top_p, top_k, seed, ignore_eos; up
to max_batch; the first with other settings waits for the next batch, so the order stays first in, first
out), and runs them as ONE padded batch through the engine's own batched stream (engine._stream, with a
Request whose counters it reads between steps): each row's tokens are exactly those of
`engine.generate(list_of_prompts)` for that batch; a batch of one gives exactly `generate` alone. A request
joins no batch already running. A row that finishes (its end-of-sequence token, its own stop strings, its
max_new_tokens) ends its handle at once while the batch runs on for the others; a cancelled handle stops
receiving at the next step, but its row keeps its place in the batch (and in the memory plan's max_batch)
until the batch ends, unless every row of the batch is finished or cancelled: then the batch is abandoned at
the next step. Static batches stay first in, first out under either schedule (a batch's rows must share their
settings, and the queue's order decides which do).

Between steps, in either kind of batch, a request submitted with a `stall_timeout` whose pieces wait while its
reader has taken none for that long is cancelled as "stalled" (Handle._stalled_since; Totals.stalled counts them).
"""

from __future__ import annotations

import atexit
import itertools
import math
import numbers
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import GenerationInputError, OffloadEngineError
from ..experts.counters import CacheStats
from ..generation import SamplingConfig
from ..logprobs import check_ask
from .continuous import RunningBatch
from .handle import Handle
from .schedule import SCHEDULES, WINDOW_PER_ROW, RouterSignature, choose

DEFAULT_MAX_QUEUE = 64
DEFAULT_SKIPS_PER_ROW = 1.5  # schedule="routing": max_skips defaults to this x max_batch, rounded down. Measured
# (bench_serve.py, 16 clients, 4 rows, medians of 4): bytes per token -25% against fifo, the first token's p99 1.48x;
# 2 x: -27%, 1.66x; 1 x: -20 to -23%, 1.15 to 1.17x
DEFAULT_PREFILL_CHUNK = 0  # whole prompts. Measured (bench_serve.py, 4 clients, 64-token prompts, demo budget, medians
# of 4 interleaved runs): chunks of 16 cut the per-token p99 90 -> 48 ms but the aggregate 194 -> 147 tok/s (bytes moved
# per token +38%); chunks of 32: p99 60 -> 37 ms, 271 -> 226 tok/s (+15%). A chunk's forward costs most of a whole
# prompt's on this CPU (experts fetched and called per forward), so chunks trade throughput for the tail
IDLE_POLL_S = 0.05  # how often an idle engine thread looks again for rows another thread's generate holds


class QueueFullError(OffloadEngineError):
    """max_queue requests are already waiting; try again once one has started."""


class SchedulerClosedError(OffloadEngineError):
    """The scheduler (or its engine) was closed before the request finished."""


@dataclass
class Totals:
    """What the engine thread has done since it started (the server's counters read these)."""

    batches: int = 0  # continuous: the times a batch started from no rows
    rows: int = 0
    steps: int = 0  # forward passes: each prefill (continuous: each prefill chunk), each decode step
    decode_steps: int = 0
    decode_lookups: int = 0  # experts the decode steps' layer calls needed: distinct per call, summed
    generated_tokens: int = 0
    hits: int = 0
    misses: int = 0
    cpu_experts: int = 0  # needed experts computed where they lie on the CPU (neither hit nor miss)
    bytes_to_device: int = 0
    schedule_skips: int = 0  # admissions (schedule="routing") of a request other than the oldest waiting
    stalled: int = 0  # requests cancelled because their reader took no piece for their stall_timeout


class Scheduler:
    def __init__(self, engine, max_queue: int = DEFAULT_MAX_QUEUE, max_batch: int | None = None,
                 schedule: str = "fifo", max_skips: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        max_batch = engine.run.max_batch if max_batch is None else max_batch
        if not _whole(max_batch) or not 1 <= max_batch <= engine.run.max_batch:
            raise GenerationInputError(f"max_batch must be from 1 to the memory plan's {engine.run.max_batch}, "
                                       f"not {max_batch!r}")
        if not _whole(max_queue) or max_queue < 1:
            raise GenerationInputError(f"max_queue must be a whole number >= 1, not {max_queue!r}")
        if schedule not in SCHEDULES:
            raise GenerationInputError(f"schedule must be one of {', '.join(SCHEDULES)}, not {schedule!r}")
        max_skips = int(DEFAULT_SKIPS_PER_ROW * max_batch) if max_skips is None else max_skips
        if not _whole(max_skips) or max_skips < 0:
            raise GenerationInputError(f"max_skips must be a whole number >= 0, not {max_skips!r}")
        if not _whole(prefill_chunk) or prefill_chunk < 0:
            raise GenerationInputError(f"prefill_chunk must be a whole number of tokens >= 0 (0: whole prompts), "
                                       f"not {prefill_chunk!r}")
        self.engine, self.max_queue, self.max_batch = engine, max_queue, max_batch
        self.prefill_chunk = prefill_chunk
        self.schedule, self.max_skips = schedule, max_skips
        routing = schedule == "routing" and engine.continuous_batching
        self._signer = RouterSignature(engine) if routing else None
        self.totals = Totals()
        self._waiting: deque[Handle] = deque()
        self._running: list[Handle] = []
        self._cond = threading.Condition()
        self._closed = False
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="offload-engine-scheduler", daemon=True)
        self._thread.start()
        # A script that ends while a request runs must not end in an abort: the interpreter stops a daemon
        # thread inside torch's C++ code at finalization, and the forced unwind terminates the process (exit
        # 134). So the thread is stopped (its rows cancelled) first, at exit, unless close() did it already.
        self._close_at_exit = _close_at_exit(weakref.ref(self))
        atexit.register(self._close_at_exit)

    def submit(self, prompt, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, seed: int | None = None, chat: bool = False, ignore_eos: bool = False,
               stop: Sequence[str] = (), logprobs: int | None = None, stall_timeout: float | None = None) -> Handle:
        """Queue one prompt (text or token ids); the arguments are generate's, plus `stop` strings, `logprobs`
        and `stall_timeout` (engine.submit's)."""
        cfg = SamplingConfig(max_new_tokens, temperature, top_p, top_k, seed, ignore_eos)
        stop = _stop_strings(stop)
        check_ask(logprobs)
        if stall_timeout is not None and (not isinstance(stall_timeout, numbers.Real) or isinstance(stall_timeout, bool)
                                          or not 0 < stall_timeout < math.inf):
            raise GenerationInputError(f"stall_timeout must be None or a number of seconds > 0, not {stall_timeout!r}")
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (str, list, tuple)):
            raise GenerationInputError("submit takes one prompt; submit each prompt of a batch on its own")
        (ids,) = self.engine._prompts(prompt, chat, max_new_tokens)  # checked against the model and the plan
        with self._cond:
            if self._closed:
                raise SchedulerClosedError("the engine's scheduler is closed; submit to a new engine")
            # rows free now take requests at the next step: they wait on top of max_queue, not in it
            if len(self._waiting) >= self.max_queue + max(0, self.max_batch - len(self._running)):
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (max_queue); try again once one "
                                     "has started")
            handle = Handle(f"{next(self._ids)}", ids, cfg, stop, logprobs, stall_timeout)
            self._waiting.append(handle)
            self._cond.notify_all()
        return handle

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def close(self, timeout: float | None = 30.0) -> None:
        """Refuse new requests, fail the waiting ones, cancel the running batch and stop the thread."""
        atexit.unregister(self._close_at_exit)
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            for handle in self._running:
                handle.cancel()
            self._cond.notify_all()
        for handle in waiting:
            handle._fail(SchedulerClosedError("the engine's scheduler was closed before this request started"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.engine.continuous_batching:
            self._continuous()
            return
        while True:
            with self._cond:
                while not self._waiting and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._take()
                self._running = batch
            try:
                if batch:
                    self._run(batch)
            except Exception as error:  # a bug past the engine's stream: end the batch, keep the thread
                for handle in batch:
                    if handle.finish_reason is None:
                        handle._fail(error)
            finally:
                with self._cond:
                    self._running = []

    def _continuous(self) -> None:
        """Between decode steps, admit waiting requests into free rows and prefill up to prefill_chunk of their
        prompt tokens; then one step for every row. The KV
        cache holds max_batch rows, so the runtime's admission holds max_batch rows of the plan while any
        request runs (another thread's generate waits for them), and gives them back when the batch empties."""
        batch = RunningBatch(self.engine, self.max_batch, self._count, self.prefill_chunk)
        runtime, held = self.engine.runtime, False
        try:
            while True:
                self._sign_window()
                with self._cond:
                    while not self._waiting and batch.idle and not self._closed:
                        if held:  # idle: the KV cache and its rows go back to the plan
                            batch.close()
                            runtime.release(self.max_batch)
                            held = False
                        self._cond.wait()
                    if self._closed:
                        return
                    if not held:
                        held = runtime.reserve(self.max_batch)
                        if not held:  # another thread's generate holds rows of the plan: look again soon
                            self._cond.wait(IDLE_POLL_S)
                            continue
                        batch.open()
                        self.totals.batches += 1
                    joining = self._take_free(batch.free, batch.handles())
                    self.totals.rows += len(joining)
                    self._running = batch.handles() + joining
                try:
                    self._sign(joining)
                    for handle in joining:
                        batch.admit(handle)
                    self._drop_stalled(batch.handles())
                    batch.prefill()
                    batch.step()
                except Exception as error:  # a bug past the engine's forwards: end the batch, keep the thread
                    for handle in joining:
                        if handle.finish_reason is None:
                            handle._fail(error)
                    batch.fail(error)
                with self._cond:
                    self._running = batch.handles()
        finally:
            batch.abandon()
            if held:
                batch.close()
                runtime.release(self.max_batch)
            with self._cond:
                self._running = []

    def _take_free(self, free: int, running: list[Handle]) -> list[Handle]:
        """Up to `free` waiting requests, whatever their settings (under the lock): the oldest, or under
        schedule="routing" the ones schedule.choose picks (their signatures computed here, once each)."""
        if self._signer is None or len(self._waiting) <= free:
            joining: list[Handle] = []
            while self._waiting and len(joining) < free:
                handle = self._waiting.popleft()
                if handle.cancelled:
                    handle._abandon()
                else:
                    joining.append(handle)
            return joining
        for handle in [h for h in self._waiting if h.cancelled]:
            self._waiting.remove(handle)
            handle._abandon()
        waiting = list(self._waiting)
        self._sign(waiting[:WINDOW_PER_ROW * self.max_batch])
        chosen, skips = choose(waiting, free, [h.signature for h in running if h.signature is not None],
                               self.engine.spec.top_k, WINDOW_PER_ROW * self.max_batch, self.max_skips)
        self.totals.schedule_skips += skips
        joining, taken = [waiting[i] for i in chosen], set(chosen)
        self._waiting = deque(h for i, h in enumerate(waiting) if i not in taken)
        return joining

    def _sign_window(self) -> None:
        """schedule="routing": sign the requests the next choice looks at, outside the lock, so that a submit
        never waits for the routers (one arriving in between is signed under the lock, in _take_free)."""
        if self._signer is not None:
            with self._cond:
                window = list(self._waiting)[:WINDOW_PER_ROW * self.max_batch]
            self._sign(window)

    def _sign(self, handles: list[Handle]) -> None:
        """schedule="routing": give each handle without one its prompt's routing signature (engine thread)."""
        if self._signer is not None:
            for handle in handles:
                if handle.signature is None:
                    handle.signature = self._signer.prompt(handle.prompt_ids)

    def _take(self) -> list[Handle]:
        """The oldest waiting request and the ones right behind it with the same settings (under the lock)."""
        batch: list[Handle] = []
        while self._waiting and len(batch) < self.max_batch:
            handle = self._waiting[0]
            if handle.cancelled:
                self._waiting.popleft()._abandon()
                continue
            if batch and handle.cfg != batch[0].cfg:
                break
            batch.append(self._waiting.popleft())
        return batch

    def _run(self, batch: list[Handle]) -> None:
        engine, cfg = self.engine, batch[0].cfg
        request = engine.request(len(batch))
        for handle in batch:
            handle._start(len(batch))
        open_rows = list(range(len(batch)))
        with self._cond:
            self.totals.batches += 1
            self.totals.rows += len(batch)
        counted = CacheStats.of(request.counters)
        asks = [h.logprobs for h in batch]
        steps = engine._stream([h.prompt_ids for h in batch], cfg, request=request,
                               logprobs=asks if any(k is not None for k in asks) else None)
        try:
            for event in steps:
                self._drop_stalled([batch[row] for row in open_rows])
                last_step = event.index + 1 == cfg.max_new_tokens
                # the batch's so far, each row's own while it runs; the counters as they stand (engine.cache.stats
                # would wait for every CUDA copy in flight, once a step)
                stats = CacheStats.of(request.counters)
                # before the rows' handles can end
                self._count(stats, counted, len(open_rows), steps=1, decode=event.index > 0)
                counted = stats
                for row in list(open_rows):
                    handle = batch[row]
                    handle._set_counters(stats.hits, stats.misses, stats.bytes_to_device)
                    if handle.cancelled:
                        open_rows.remove(row)
                        handle._abandon()
                    elif handle._token(event.token_ids[row], event.texts[row], event.finished[row], last_step,
                                       event.logprobs[row] if event.logprobs is not None else None):
                        open_rows.remove(row)
                if not open_rows:
                    break
        except Exception as error:  # an engine fault ends this batch's requests, never the thread
            for row in open_rows:
                batch[row]._fail(error)
            open_rows = []
        finally:
            steps.close()
            for row in open_rows:  # the engine stopped early (only a cancelled row can be left)
                batch[row]._abandon()
            self._count(CacheStats.of(request.counters), counted, 0)

    def _drop_stalled(self, handles: list[Handle]) -> None:
        """Cancel, as stalled, the running requests whose reader took none of their waiting pieces for longer
        than their stall_timeout (between steps; each then leaves as a cancelled one does)."""
        now = time.monotonic()
        for handle in handles:
            if not handle.cancelled and handle._stalled_since(now):
                handle._stall()
                with self._cond:
                    self.totals.stalled += 1

    def _count(self, stats, counted, tokens: int, steps: int = 0, decode: bool = False) -> None:
        """Add a step's tokens and the cache counters since `counted` to the totals."""
        with self._cond:
            t = self.totals
            t.steps += steps
            if decode:
                t.decode_steps += steps
                t.decode_lookups += (stats.hits + stats.misses + stats.cpu_experts
                                     - counted.hits - counted.misses - counted.cpu_experts)
            t.generated_tokens += tokens
            t.hits += stats.hits - counted.hits
            t.misses += stats.misses - counted.misses
            t.cpu_experts += stats.cpu_experts - counted.cpu_experts
            t.bytes_to_device += stats.bytes_to_device - counted.bytes_to_device


def _close_at_exit(scheduler: weakref.ref):
    """An exit hook of its own for one scheduler, holding it only weakly (a dropped engine is not kept alive)."""
    def close() -> None:
        live = scheduler()
        if live is not None:
            live.close()
    return close


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _stop_strings(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise GenerationInputError(f"stop must be a string or a list of strings, not {stop!r}"[:200])
    return tuple(stop)
