"""A submitted request's handle: what the engine thread produces for one prompt, read from any thread.

The engine thread (scheduler.py) calls the underscored methods; the caller iterates the handle, waits for
`result()` or calls `cancel()`. Stop strings are applied here, per request, so a row of a shared batch stops
on its own strings: text that could be the start of a stop string is held back until it is known not to be
one, so the streamed pieces always add up to the final text.

>>> cut = StopText(["\\n\\n"])
>>> cut.push("a\\n"), cut.push("b\\n"), cut.push("\\nc")
(('a', False), ('\\nb', False), ('', True))
>>> cut.text
'a\\nb'
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Piece:
    """One token of a completion and the text it released (possibly "": a character or a stop string may
    still be incomplete). The last piece has a finish_reason: "stop" (an end-of-sequence token or a stop
    string) or "length" (max_new_tokens). With submit's `logprobs=K`: the token's log-probability under the
    model's raw distribution (log_softmax of its logits, before temperature and top-p) and the K most likely
    tokens' ({token id: logprob}, most likely first); None without."""

    token_id: int
    text: str
    finish_reason: str | None = None
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None


@dataclass(frozen=True)
class Completion:
    text: str  # cut before the first stop string
    token_ids: list[int]  # every token generated (the one that completed a stop string or was an EOS included)
    finish_reason: str  # "stop", "length", "cancelled", or "stalled" (its reader took no piece for stall_timeout s)
    prompt_tokens: int
    queued_s: float  # from submit to the start of its batch
    ttft_s: float  # from submit to the first token (queueing included: what the caller waited)
    decode_tokens_per_s: float  # tokens after the first, per second
    batch_rows: int  # the most rows its batch held while it ran (static batches: the prompts of its batch)
    hits: int  # the batch's expert-cache counters while this row ran (its own when it ran alone)
    misses: int
    bytes_to_device: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class StopText:
    """Cuts the text at the first occurrence of any stop string; holds back a tail that may begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.text = ""  # what was pushed, cut at a stop string once one is found
        self.sent = 0  # text[:sent] was released

    def push(self, piece: str) -> tuple[str, bool]:
        """(the text this piece releases, whether a stop string ended the text)."""
        self.text += piece
        # nothing released can begin a stop string (it was held back), so a match starts at `sent` or later
        found = [i for s in self.stops if (i := self.text.find(s, self.sent)) >= 0]
        if found:
            self.text = self.text[:min(found)]
            return self.flush(), True
        pending = len(self.text) - self.sent
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, pending), 0, -1)
                    if self.text.endswith(s[:k])), default=0)
        released = self.text[self.sent:len(self.text) - hold]
        self.sent += len(released)
        return released, False

    def flush(self) -> str:
        released, self.sent = self.text[self.sent:], len(self.text)
        return released


_END = object()  # the queue's last item for a cancelled request


class Handle:
    """One submitted prompt. Iterate it for its Pieces (the last one has a finish_reason; a cancelled handle's
    iteration just ends; an engine error is raised), or call result() for the whole Completion.

    `logprobs`: None, or K: each piece carries its logprob and the top K's. `stall_timeout`: None, or seconds:
    the engine thread cancels the request ("stalled") when pieces wait and its reader has taken none for that
    long (a slow reader that keeps taking pieces is not stalled; a caller waiting in result() never is)."""

    def __init__(self, request_id: str, prompt_ids: list[int], cfg, stop: tuple[str, ...],
                 logprobs: int | None = None, stall_timeout: float | None = None):
        self.id, self.prompt_ids, self.cfg = request_id, prompt_ids, cfg
        self.logprobs, self.stall_timeout = logprobs, stall_timeout
        # when each queued, untaken piece was produced (monotonic): the engine thread appends before it queues
        # a piece, the reader pops as it takes one, so [0] is the oldest untaken piece's
        self._untaken: deque[float] = deque()
        self._last_take: float | None = None  # when the reader last took a piece (monotonic)
        self._awaited = False  # a caller waits in result(): it takes the completion whole, at the end
        self._stalled = False
        self.submitted = time.perf_counter()
        self._stop = StopText(stop)
        self._items: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._tokens: list[int] = []
        self._error: BaseException | None = None
        self._finish: str | None = None
        self._started = self._first = self._ended = None
        self._rows = 0
        self._counters = (0, 0, 0)
        self._listener = None
        # the engine thread's, under schedule="routing" (schedule.py): the routing signature, once computed,
        # and how many younger requests were admitted ahead of this one
        self.signature = None
        self.passed_over = 0

    def on_item(self, listener) -> None:
        """Call `listener()` (from the engine thread) whenever a piece, the end or an error arrives; called
        once now, for what arrived before."""
        self._listener = listener
        listener()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def generated_tokens(self) -> int:
        return len(self._tokens)

    @property
    def finish_reason(self) -> str | None:
        """None while running; then "stop", "length", "cancelled", "stalled" or "error"."""
        return self._finish

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop receiving: a waiting request never runs; a running one leaves its batch at the next step (the
        batch itself runs on while another row still wants tokens)."""
        self._cancelled.set()

    def next_piece(self, timeout: float | None = None) -> Piece | None:
        """The next Piece; None when `timeout` passed first, or when the handle was cancelled and nothing is
        left. Raises the error that ended the request."""
        try:
            item = self._items.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            self._items.put(item)  # every later read raises it too
            raise item
        if item is _END:
            self._items.put(item)
            return None
        self._untaken.popleft()
        self._last_take = time.monotonic()
        return item

    def __iter__(self):
        while True:
            piece = self.next_piece()
            if piece is None:
                return
            yield piece
            if piece.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the whole completion (TimeoutError after `timeout` seconds); raises the request's error."""
        self._awaited = True
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        first = self._first if self._first is not None else self._ended
        decode_s = self._ended - first
        return Completion(
            text=self._stop.text[:self._stop.sent] if self._finish in ("cancelled", "stalled") else self._stop.text,
            token_ids=list(self._tokens), finish_reason=self._finish, prompt_tokens=self.prompt_tokens,
            queued_s=(self._started or self._ended) - self.submitted, ttft_s=first - self.submitted,
            decode_tokens_per_s=(len(self._tokens) - 1) / decode_s if decode_s > 0 else 0.0,
            batch_rows=self._rows, hits=self._counters[0], misses=self._counters[1],
            bytes_to_device=self._counters[2])

    # -- the engine thread's side ---------------------------------------------------------------------------
    def _start(self, rows: int) -> None:
        self._started, self._rows = time.perf_counter(), rows

    def _ran_beside(self, rows: int) -> None:
        """The running batch held `rows` rows (this one included) at a step of this request."""
        self._rows = max(self._rows, rows)

    def _token(self, token_id: int, text: str, eos: bool, last_step: bool, logprobs=None) -> bool:
        """Record one token (`logprobs`: its logprobs.TokenLogprobs, when the request asked); True when it
        ended the request."""
        self._first = self._first if self._first is not None else time.perf_counter()
        self._tokens.append(token_id)
        released, stopped = self._stop.push(text)
        finish = "stop" if stopped or eos else "length" if last_step else None
        if finish is not None and not stopped:
            released += self._stop.flush()
        logprob, top = logprobs if logprobs is not None else (None, None)
        self._end(finish, Piece(token_id, released, finish, logprob, top))
        return finish is not None

    def _set_counters(self, hits: int, misses: int, bytes_to_device: int) -> None:
        self._counters = (hits, misses, bytes_to_device)

    def _stalled_since(self, now: float) -> bool:
        """Whether pieces wait and, for more than stall_timeout seconds before `now`, none was taken: both the
        oldest untaken piece and the reader's last take are older than that."""
        if self.stall_timeout is None or self._awaited:
            return False
        try:
            oldest = self._untaken[0]
        except IndexError:  # every piece taken (perhaps just now)
            return False
        last_take = self._last_take
        return now - (oldest if last_take is None else max(oldest, last_take)) > self.stall_timeout

    def _stall(self) -> None:
        """Cancel as stalled: the request leaves its batch as a cancelled one does, finishing "stalled"."""
        self._stalled = True
        self._cancelled.set()

    def _abandon(self) -> None:
        self._end("stalled" if self._stalled else "cancelled", _END)

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._end("error", error)

    def _end(self, finish: str | None, item) -> None:
        """Queue `item`; with a finish, the handle's outcome is set before the item is readable and done()
        after, so a reader that saw the last item reads the outcome, and one that sees done() finds every item."""
        if finish is not None:
            self._finish, self._ended = finish, time.perf_counter()
        if isinstance(item, Piece):
            self._untaken.append(time.monotonic())
        self._items.put(item)
        if finish is not None:
            self._done.set()
        if self._listener is not None:
            try:
                self._listener()
            except Exception:  # a failing listener is dropped: the items stay readable, the engine thread goes on
                self._listener = None
