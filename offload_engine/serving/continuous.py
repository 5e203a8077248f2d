"""Continuous batching: the running batch, whose rows join between decode steps and leave when they finish.

scheduler.py's engine thread drives it: `admit(handle)` queues a request to join; `prefill()` prefills the
joining requests' prompts alone (batch 1, as `engine.generate` alone does: the same inputs, the same cache
type), at most `prefill_chunk` prompt tokens per call (0: whole prompts, every joining one), and a request
whose last chunk ran samples its first token from that chunk's logits and joins as a row; `step()` runs one
decode step for every row at once, over a RowCache (row_cache.py) in which each row
keeps its own positions. Each row samples with its own SamplingConfig and generator from its own [1, V]
logits, as it would alone. A row that ends (its EOS unless ignore_eos, a stop string, max_new_tokens) or was
cancelled leaves at once: the last row moves into its place (KV columns, length, routing paths), so the rows
stay 0..n-1.

The batch's Request (request.py) is one for the batch's life: its counters gather every forward's (the
scheduler's totals read them), its `rows` is the step's row count, and its paths keep a row per running
request: a joining request brings the paths of its prefill's last token, a leaving one takes its row along.

Chunked prefill (prefill_chunk=N), while rows decode (with none, nothing waits: the rest of a prompt is one
forward, so a request alone is prefilled as alone): a prompt's chunks are its tokens [0, N), [N, 2N), ...,
each one forward into the request's own cache (a DynamicCache growing from chunk to chunk; on
CUDA a StaticCache over a free row of the batch's cache), so no decode step waits for more than N prompt
tokens. `prefill()` runs the oldest joining request's next chunk, then, in what is left of the N, the whole
prompts of the requests behind it that fit: only the oldest is ever part-way through its prompt. A
chunk's logits are not the whole prompt's bit for bit (matrix products of other row counts round
differently: fp32 differs by ~1e-6), so with chunks a row's tokens are those it gets alone where such
differences change no token (asserted in fp32, greedy and seeded, on the tests' prompts); prefill_chunk=0,
or a prompt of at most N tokens, is the whole prompt's forward, as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..detokenizer import IncrementalDetokenizer
from ..errors import GenerationInputError
from ..experts.counters import CacheStats
from ..experts.host_read import read_to_host
from ..generation import cache_keyword, pick, sampling_generator
from ..logprobs import on_device, per_row
from ..request import Request
from .handle import Handle
from .row_cache import RowCache


@dataclass
class Row:
    handle: Handle
    generator: torch.Generator | None
    detokenizer: IncrementalDetokenizer
    token: int  # the newest token: the next step's input
    base: object  # the batch's cache counters (CacheStats) when the row joined
    count: int = 0  # tokens generated


@dataclass
class Joining:
    """A request whose prompt is being prefilled: its own cache until the last chunk."""

    handle: Handle
    generator: torch.Generator | None
    base: object  # the batch's cache counters when its prefill started (None: not started)
    cache: object = None  # the cache its chunks fill (None before the first chunk on the CPU)
    row: int | None = None  # CUDA: the row of the batch's cache the StaticCache `cache` writes
    done: int = 0  # prompt tokens prefilled


class RunningBatch:
    """Rows 0..n-1 of `cache` are `rows`; `count(stats, counted, tokens, steps, decode)` adds each forward to
    the scheduler's totals."""

    def __init__(self, engine, max_rows: int, count: Callable, prefill_chunk: int = 0):
        self.engine, self.max_rows, self.count = engine, max_rows, count
        self.prefill_chunk = prefill_chunk  # prompt tokens between two decode steps at most; 0: whole prompts
        self.request = Request(0, engine.spec.num_moe_layers, engine.spec.top_k)
        self.rows: list[Row] = []
        self.joining: deque[Joining] = deque()  # admitted, prefilling: each holds a row of max_rows
        self.cache: RowCache | None = None
        self.counted = CacheStats.of(self.request.counters)
        self.cuda = engine.run.device.type == "cuda"
        self.eos = engine.eos_ids()
        self.cache_arg = cache_keyword(engine.model)

    def open(self) -> None:
        """Allocate the KV cache of max_rows rows (the caller holds them in the runtime's admission)."""
        engine = self.engine
        self.cache = RowCache(engine.model.config, self.max_rows, engine.plan.max_context, engine.store.dtype,
                              engine.run.device, full_width=self.cuda)

    def close(self) -> None:
        """Free the KV cache (no row runs)."""
        self.cache = None

    def handles(self) -> list[Handle]:
        """The rows' handles, then the joining requests'."""
        return [row.handle for row in self.rows] + [j.handle for j in self.joining]

    @property
    def free(self) -> int:
        """Rows neither running nor held by a joining request."""
        return self.max_rows - len(self.rows) - len(self.joining)

    @property
    def idle(self) -> bool:
        return not self.rows and not self.joining

    # -- joining ------------------------------------------------------------------------------------------
    def admit(self, handle: Handle) -> None:
        """Queue `handle` to join: `prefill()` runs its prompt, into a row held for it from now on."""
        if self.free < 1:
            raise RuntimeError("no free row to admit a request into")
        self.joining.append(Joining(handle, sampling_generator(handle.cfg, self.engine.run.device), None))

    def prefill(self) -> None:
        """Cancelled joining requests leave; then the oldest's next chunk and, in what is left of
        prefill_chunk tokens, the whole prompts of those behind it that fit (all of them, whole, when
        prefill_chunk is 0; and while no row decodes, the rest of the oldest's prompt at once, as nothing
        waits for it). A request whose prompt is done gets its first token and joins as a row; one that ends
        with that token (or fails) leaves at once."""
        for j in [j for j in self.joining if j.handle.cancelled]:
            self.joining.remove(j)
            j.handle._abandon()
        # None: no limit (whole prompts, or no row decoding that a prompt could stall)
        budget = self.prefill_chunk if self.prefill_chunk and self.rows else None
        if self.joining:  # the oldest: its next chunk
            j = self.joining[0]
            size = len(j.handle.prompt_ids) - j.done
            if budget is not None:
                size = min(size, budget)
                budget -= size
            if not self._chunk(j, size):
                return  # part-way: its chunk took the whole budget
        while self.joining:  # then the whole prompts behind it, while they fit
            if budget is None and self.prefill_chunk and self.rows:  # a row joined: its next step waits
                budget = self.prefill_chunk
            size = len(self.joining[0].handle.prompt_ids)
            if budget is not None:
                if size > budget:
                    return
                budget -= size
            self._chunk(self.joining[0], size)

    def _chunk(self, j: Joining, size: int) -> bool:
        """Prefill `size` more prompt tokens of j (the oldest joining); True when it has left `joining`
        (joined, ended or failed)."""
        engine, handle = self.engine, j.handle
        device, ids = engine.run.device, handle.prompt_ids
        if j.base is None:
            # every forward of the batch is counted as it ends: these are the counters now
            j.base = self.counted
            handle._start(len(self.rows) + 1)
            if self.cuda:  # the prefill writes a free row in place (a StaticCache over it, as generate alone uses)
                j.row = len(self.rows)
                j.cache = self.cache.row_static_cache(j.row, engine.model.config)
        start, end = j.done, j.done + size
        # a Request of its own per forward, sharing the batch's counters: the paths it brings are its last token's
        prefill = Request(1, self.request.num_layers, self.request.top_k, counters=self.request.counters)
        input_ids = torch.tensor([ids[start:end]], dtype=torch.long, device=device)
        try:
            with torch.inference_mode():
                # on the CPU generate alone grows a DynamicCache: the first chunk's forward makes it, as alone
                out = engine.forward(prefill, input_ids=input_ids,
                                     attention_mask=torch.ones((1, end), dtype=torch.long, device=device),
                                     position_ids=torch.arange(start, end, device=device)[None], use_cache=True,
                                     logits_to_keep=1, **({self.cache_arg: j.cache} if j.cache is not None else {}))
                j.cache, j.done = getattr(out, self.cache_arg), end
                if end < len(ids):
                    self._count(0, decode=False)
                    return False
                r = len(self.rows)  # rows only left while it prefilled: every row from r up is free
                if self.cuda:
                    self.cache.lengths[j.row] = end
                    if j.row != r:
                        self.cache.move(j.row, r)
                else:
                    self.cache.put(r, j.cache)
                logits = out.logits[:, -1, :]
                token, finite = pick(logits, handle.cfg, j.generator)
                asks = [handle.logprobs]
                host, *logprobs = read_to_host([torch.cat([token, finite.long()]),
                                                *(on_device(logits, token, asks) or (None, None))])
        except Exception as error:  # this request's fault (or the engine's): the running rows go on
            self.joining.popleft()
            self._count(0, decode=False)
            handle._fail(error)
            return True
        self.joining.popleft()
        self._count(1, decode=False)
        row = Row(handle, j.generator, IncrementalDetokenizer(engine.tokenizer), int(host[0]), j.base)
        self.rows.append(row)
        self.request.rows = len(self.rows)
        paths = self.request.paths
        paths.current = np.concatenate([paths.current, prefill.paths.current])
        paths.previous = np.concatenate([paths.previous, prefill.paths.previous])
        if self._emit(r, row, bool(host[1]), len(self.rows), per_row(*logprobs, asks)[0]):
            self._leave(r)
        return True

    # -- one decode step ----------------------------------------------------------------------------------
    def step(self) -> None:
        """Cancelled rows leave; then one decode step for every row, each row's token to its handle, and the
        rows that ended leave. An engine fault here fails every row (the cache's state is lost with it)."""
        for r in reversed(range(len(self.rows))):
            if self.rows[r].handle.cancelled:
                self.rows[r].handle._abandon()
                self._leave(r)
        n = len(self.rows)
        if not n:
            return
        device = self.engine.run.device
        try:
            with torch.inference_mode():
                position_ids, mask = self.cache.begin(n)
                input_ids = torch.tensor([[row.token] for row in self.rows], dtype=torch.long, device=device)
                self.request.rows = n
                out = self.engine.forward(self.request, input_ids=input_ids, attention_mask=mask,
                                          position_ids=position_ids, use_cache=True, **{self.cache_arg: self.cache})
                self.cache.advance()
                logits = out.logits[:, -1, :]  # [n, V]
                # each row from its own [1, V] scores, with its own settings and generator, as alone
                picks = [pick(logits[r:r + 1], row.handle.cfg, row.generator) for r, row in enumerate(self.rows)]
                tokens = torch.cat([t for t, _ in picks])
                finite = torch.cat([f for _, f in picks]).long()
                asks = [row.handle.logprobs for row in self.rows]  # the asking rows' logprobs come along
                host, *logprobs = read_to_host([torch.cat([tokens, finite]),  # the step's one read of the device
                                                *(on_device(logits, tokens, asks) or (None, None))])
        except Exception as error:
            self._count(0, decode=True)
            self.fail(error)
            return
        self._count(n, decode=True)
        ended, logprobs = [], per_row(*logprobs, asks)
        for r, row in enumerate(self.rows):
            row.token = int(host[r])
            if self._emit(r, row, bool(host[n + r]), n, logprobs[r]):
                ended.append(r)
        for r in reversed(ended):
            self._leave(r)

    def fail(self, error: BaseException) -> None:
        """End every row and joining request with `error`."""
        while self.joining:
            handle = self.joining.popleft().handle
            if handle.finish_reason is None:
                handle._fail(error)
        for r in reversed(range(len(self.rows))):
            self.rows[r].handle._fail(error)
            self._leave(r)

    def abandon(self) -> None:
        """End every row and joining request as cancelled (the scheduler is closing)."""
        while self.joining:
            self.joining.popleft().handle._abandon()
        for r in reversed(range(len(self.rows))):
            self.rows[r].handle._abandon()
            self._leave(r)

    # -- rows -----------------------------------------------------------------------------------------------
    def _emit(self, r: int, row: Row, finite: bool, rows: int, logprobs) -> bool:
        """Hand row r's newest token (and its logprobs, if asked) to its handle; True when the row has ended."""
        handle, token = row.handle, row.token
        stats = self.counted
        handle._set_counters(stats.hits - row.base.hits, stats.misses - row.base.misses,
                             stats.bytes_to_device - row.base.bytes_to_device)
        handle._ran_beside(rows)
        if not finite:  # NaN weights: no token can be read off these scores
            handle._fail(GenerationInputError(
                f"the model produced non-finite scores (NaN or inf) at step {row.count}; its weights are corrupt "
                "or overflow in this dtype: check the checkpoint, or try --dtype float32"))
            return True
        row.count += 1
        cfg = handle.cfg
        eos = not cfg.ignore_eos and token in self.eos
        last = row.count == cfg.max_new_tokens
        return handle._token(token, row.detokenizer.push(token, last=last or eos), eos, last, logprobs)

    def _leave(self, r: int) -> None:
        """Row r leaves; the last row takes its place."""
        last = len(self.rows) - 1
        self.cache.move(last, r)
        self.rows[r] = self.rows[last]
        self.rows.pop()
        paths = self.request.paths
        for ids in (paths.current, paths.previous):
            ids[r] = ids[last]
        paths.current, paths.previous = paths.current[:last], paths.previous[:last]
        self.request.rows = last

    def _count(self, tokens: int, decode: bool) -> None:
        # the counters as they stand (not engine.cache.stats, which on CUDA waits for every copy in flight to
        # time it: a wait per step that would stall the prefetches this step overlaps)
        stats = CacheStats.of(self.request.counters)
        self.count(stats, self.counted, tokens, steps=1, decode=decode)
        self.counted = stats
