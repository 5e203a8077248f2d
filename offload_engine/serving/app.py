"""The HTTP server of `moe-offload serve`: FastAPI routes in OpenAI's wire format over a Scheduler.

`make_app()` builds the app with no engine: /health answers 503 and the other routes 503 too, until
`app.state.serving.attach(engine)` (the CLI loads the model in a thread while the server already listens).
Each request is checked (openai_api.py), submitted to the scheduler's queue (full: 429 with Retry-After),
and answered as one JSON object or as server-sent events. A client that disconnects cancels its handle
(its row leaves the batch as scheduler.py describes); one that stays connected but stops reading a stream is
cancelled by the engine thread once pieces wait and it has taken none for `stall_timeout` seconds (finish
"stalled").
Counters go to a prometheus_client registry of the app's own, served at /metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..errors import OffloadEngineError, one_line
from .handle import Handle
from .openai_api import (ApiError, ChatRequest, CompletionRequest, chunk, new_id, parse, prepare, response, sse,
                         usage)
from .openai_logprobs import LogprobsWriter, TokenBytes
from .scheduler import DEFAULT_MAX_QUEUE, DEFAULT_PREFILL_CHUNK, QueueFullError, Scheduler, SchedulerClosedError

POLL_S = 0.25  # how often a waiting request checks that its client is still there
RETRY_AFTER_S = 1


class ServerState:
    """The engine (None while it loads), its scheduler, the counters and the request log."""

    def __init__(self, api_key: str | None, max_queue: int, max_batch: int | None, model_name: str | None,
                 log: Callable[[str], None] | None, schedule: str = "fifo", max_skips: int | None = None,
                 stall_timeout: float | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        self.api_key, self.max_queue, self.max_batch = api_key, max_queue, max_batch
        self.stall_timeout = stall_timeout
        self.schedule, self.max_skips, self.prefill_chunk = schedule, max_skips, prefill_chunk
        self.model_name, self.log = model_name, log or (lambda line: None)
        self.engine = self.scheduler = None
        self.failed: str | None = None
        self.created = int(time.time())
        self.registry = CollectorRegistry()
        self.requests = Counter("moe_offload_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("moe_offload_prompt_tokens", "prompt tokens of the requests served",
                                     registry=self.registry)
        self.completion_tokens = Counter("moe_offload_completion_tokens", "tokens returned to clients",
                                         registry=self.registry)
        self.ttft = Histogram("moe_offload_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                              registry=self.registry)
        self.registry.register(_EngineCollector(self))

    def attach(self, engine) -> None:
        """The model is loaded: start serving it."""
        self.scheduler = Scheduler(engine, max_queue=self.max_queue, max_batch=self.max_batch,
                                   schedule=self.schedule, max_skips=self.max_skips, prefill_chunk=self.prefill_chunk)
        self.token_bytes = TokenBytes(engine.tokenizer)  # its vocabulary read once, for every logprobs response
        self.model_name = self.model_name or engine.directory.name
        spec_limit = engine.spec.max_position_embeddings or engine.plan.max_context
        self.context = min(engine.plan.max_context, spec_limit)
        self.engine = engine

    def ready(self) -> "ServerState":
        """This state, once the model is loaded; a 503 before."""
        if self.engine is None:
            raise ApiError(503, self.failed or "the model is still loading; try again shortly", type="server_error",
                           code="model_not_ready", headers={"Retry-After": str(RETRY_AFTER_S)})
        return self

    def fail(self, message: str) -> None:
        """The model could not be loaded: /health says so."""
        self.failed = message

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()


class _EngineCollector:
    """The scheduler's totals, read when /metrics is scraped."""

    def __init__(self, state: ServerState):
        self.state = state

    def collect(self):
        scheduler = self.state.scheduler
        t = scheduler.totals if scheduler is not None else None
        for name, doc, field in (("generated_tokens", "tokens the engine generated (cancelled rows included)",
                                  "generated_tokens"),
                                 ("batches", "batches the engine ran", "batches"),
                                 ("steps", "forward passes the engine ran: each prefill (each chunk of one, with "
                                  "--prefill-chunk), then one per decode step", "steps"),
                                 ("decode_steps", "decode steps the engine ran (every row of the batch one token)",
                                  "decode_steps"),
                                 ("decode_expert_lookups", "experts the decode steps' layer calls needed (distinct "
                                  "per layer call, summed): over decode_steps, the distinct experts per step",
                                  "decode_lookups"),
                                 ("expert_cache_hits", "needed experts already resident", "hits"),
                                 ("expert_cache_misses", "expert loads a layer call had to wait for", "misses"),
                                 ("experts_on_cpu", "needed experts computed where they lie on the CPU (neither "
                                  "a hit nor a miss)", "cpu_experts"),
                                 ("expert_bytes_to_device", "bytes of experts copied to the device",
                                  "bytes_to_device"),
                                 ("schedule_skips", "admissions of a request other than the oldest waiting "
                                  "(--schedule routing)", "schedule_skips"),
                                 ("stalled_requests", "requests cancelled because their client took no token for "
                                  "--stall-timeout seconds", "stalled")):
            yield CounterMetricFamily(f"moe_offload_{name}", doc, value=getattr(t, field) if t else 0)
        yield GaugeMetricFamily("moe_offload_model_loaded", "1 once the model is loaded",
                                value=int(self.state.engine is not None))
        yield GaugeMetricFamily("moe_offload_queue_waiting", "requests waiting for a batch",
                                value=scheduler.waiting if scheduler else 0)
        yield GaugeMetricFamily("moe_offload_batch_rows", "rows of the batch running now",
                                value=scheduler.running if scheduler else 0)


def make_app(engine=None, *, api_key: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
             max_batch: int | None = None, model_name: str | None = None,
             log: Callable[[str], None] | None = None, schedule: str = "fifo",
             max_skips: int | None = None, stall_timeout: float | None = None,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> FastAPI:
    """The server's app; with `engine` it serves at once, without it /health is 503 until `attach`. The engine
    stays the caller's to close; the app's shutdown stops its scheduler. `log`: receives one line per request.
    `schedule`, `max_skips`, `prefill_chunk`: the Scheduler's (which waiting requests join the batch, and how
    much of their prompts between two decode steps; scheduler.py). `stall_timeout`: seconds, or None for never:
    a request whose client has not taken a produced token for that long is cancelled (submit's `stall_timeout`)."""
    state = ServerState(api_key, max_queue, max_batch, model_name, log, schedule, max_skips, stall_timeout,
                        prefill_chunk)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.close()

    app = FastAPI(title="moe-offload", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.serving = state
    if engine is not None:
        state.attach(engine)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        state.requests.labels(request.url.path, str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, error: Exception) -> JSONResponse:  # uvicorn logs the traceback too
        state.requests.labels(request.url.path, "500").inc()
        return JSONResponse(ApiError(500, f"internal error: {one_line(str(error) or type(error).__name__)}",
                                     type="server_error").body(), status_code=500)

    def authorized(request: Request) -> None:
        if state.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           param=None, code="invalid_api_key")

    @app.get("/health")
    def health() -> JSONResponse:
        if state.engine is None:
            status = "failed" if state.failed else "loading"
            return JSONResponse({"status": status, "message": state.failed}, status_code=503)
        return JSONResponse({"status": "ok", "model": state.model_name})

    @app.get("/metrics", dependencies=[Depends(authorized)])
    def metrics() -> Response:
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    def models() -> dict:
        state.ready()
        state.requests.labels("/v1/models", "200").inc()
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "moe-offload"}]}

    @app.post("/v1/completions", dependencies=[Depends(authorized)])
    async def completions(request: Request):
        return await _generate(state, request, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request):
        return await _generate(state, request, chat=True)

    return app


async def _generate(state: ServerState, request: Request, chat: bool):
    state.ready()
    arrived = time.perf_counter()
    rid, route = new_id(chat), request.url.path
    try:
        raw = await request.body()
    except ClientDisconnect:  # gone before its request was whole: nothing to answer, not the server's fault
        state.requests.labels(route, "499").inc()
        state.log(f"{rid}: the client left before its request was read")
        return Response(status_code=499)
    # parsing and tokenizing a large prompt takes seconds: off the event loop, which meanwhile keeps handing
    # the other streams their tokens (a stream it starves would look stalled)
    prepared = await run_in_threadpool(lambda: prepare(parse(ChatRequest if chat else CompletionRequest, raw),
                                                       state.engine.tokenizer, state.context))
    handle = _submit(state, prepared)
    wake = _waker(handle)
    asked = prepared.sampling["logprobs"] is not None
    writer = LogprobsWriter(chat, state.engine.tokenizer, state.token_bytes) if asked else None
    try:
        first = await _next(request, handle, wake)
    except ApiError as error:
        _log(state, rid, handle, arrived, error.status, route)
        raise
    except BaseException:
        handle.cancel()
        raise
    if first is None:  # the client left, or the server is closing
        handle.cancel()
        _log(state, rid, handle, arrived, 499, route)
        return Response(status_code=499)
    if not prepared.stream:
        pieces = [first]
        try:
            while pieces[-1] is not None and pieces[-1].finish_reason is None:
                pieces.append(await _next(request, handle, wake))
        except ApiError as error:
            _log(state, rid, handle, arrived, error.status, route)
            raise
        finally:
            handle.cancel()  # a no-op once finished; frees the row if the client left
        if pieces[-1] is None:
            _log(state, rid, handle, arrived, 499, route)
            return Response(status_code=499)
        text = "".join(p.text for p in pieces)
        _log(state, rid, handle, arrived, 200, route)
        logprobs = writer.shape(pieces) if writer is not None else None
        return response(chat, rid, state.model_name, text, pieces[-1].finish_reason,
                        usage(handle.prompt_tokens, len(pieces)), logprobs)
    return StreamingResponse(_events(state, request, handle, wake, first, chat, rid, prepared.include_usage,
                                     arrived, writer), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(state, request, handle: Handle, wake, first, chat, rid, include_usage, arrived,
                  writer: LogprobsWriter | None):
    """The stream's chunks: the role first (chat), a chunk per released piece, the finish, usage, [DONE]. With
    `writer` (logprobs asked), a chunk per piece, with its logprobs, also where it released no text (as vLLM)."""
    status, count, piece, model = 200, 0, first, state.model_name
    try:
        if chat:
            yield sse(chunk(chat, rid, model, "", first=True))
        while piece is not None:
            count += 1
            if piece.text or piece.finish_reason or writer is not None:
                logprobs = writer.shape([piece]) if writer is not None else None
                yield sse(chunk(chat, rid, model, piece.text, piece.finish_reason, logprobs=logprobs))
            if piece.finish_reason is not None:
                break
            try:
                piece = await _next(request, handle, wake)
            except ApiError as error:  # the engine failed mid-stream: the status line is long gone
                status = error.status
                yield sse(error.body())
                break
        if piece is None:
            status = 499
            if handle.finish_reason == "stalled":  # a client that reads again learns why its stream ends here
                yield sse(ApiError(499, f"the stream was cancelled: its client took nothing for "
                                        f"{state.stall_timeout:g} s (the server's --stall-timeout)",
                                   type="timeout", code="stalled").body())
            return
        if include_usage:
            yield sse(chunk(chat, rid, model, None, use=usage(handle.prompt_tokens, count)))
        yield sse("[DONE]")
    finally:  # also when the client went away and the server closed this generator
        if handle.finish_reason in (None, "cancelled", "stalled") and status == 200:
            status = 499  # the client left first
        handle.cancel()
        _log(state, rid, handle, arrived, status, request.url.path)


def _submit(state: ServerState, prepared) -> Handle:
    try:
        return state.scheduler.submit(prepared.prompt_ids, **prepared.sampling, stall_timeout=state.stall_timeout)
    except QueueFullError as e:
        raise ApiError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    except SchedulerClosedError as e:
        raise ApiError(503, str(e), type="server_error", code="shutting_down") from None
    except OffloadEngineError as e:
        raise ApiError(400, one_line(str(e)), param="prompt") from None


def _waker(handle: Handle) -> asyncio.Event:
    """An event the engine thread sets whenever `handle` receives something."""
    wake, loop = asyncio.Event(), asyncio.get_running_loop()

    def wake_up() -> None:
        try:
            loop.call_soon_threadsafe(wake.set)
        except RuntimeError:  # the loop has closed (the server stopped): nobody is waiting any more
            pass

    handle.on_item(wake_up)
    return wake


async def _next(request: Request, handle: Handle, wake: asyncio.Event):
    """The handle's next piece; None when the client disconnected or the request was cancelled. An engine
    fault is an ApiError 500 (the scheduler's thread goes on with the next batch)."""
    while True:
        wake.clear()
        try:
            piece = handle.next_piece(timeout=0)
            if piece is None and handle.done():
                piece = handle.next_piece(timeout=0)  # what arrived between the two looks
                if piece is None:
                    return None
        except Exception as e:
            raise ApiError(500, f"the engine failed on this request: {one_line(str(e) or type(e).__name__)}",
                           type="server_error", code="engine_error") from None
        if piece is not None:
            return piece
        try:
            await asyncio.wait_for(wake.wait(), POLL_S)
        except TimeoutError:
            if await request.is_disconnected():
                handle.cancel()
                return None


def _log(state: ServerState, rid: str, handle: Handle, arrived: float, status: int, route: str) -> None:
    state.requests.labels(route, str(status)).inc()
    state.prompt_tokens.inc(handle.prompt_tokens)
    tokens = handle.generated_tokens
    state.completion_tokens.inc(tokens)
    if handle.finish_reason not in (None, "error"):
        done = handle.result(timeout=5)  # set the moment its last piece was queued
        ttft = f"{done.ttft_s:.3f} s" if tokens else "-"
        if tokens:
            state.ttft.observe(done.ttft_s)
        # every expert computed where it lies (a CPU device's packed experts): no slot looked up, no hit rate
        lookups = f"hit rate {100 * done.hit_rate:.1f}%" if done.hits + done.misses else "no expert slot looked up"
        state.log(f"{rid} {status} {route}: {handle.prompt_tokens} tokens in, {tokens} out, TTFT {ttft}, "
                  f"{done.decode_tokens_per_s:.1f} tok/s, {lookups} (batch of {done.batch_rows}), "
                  f"{done.finish_reason}, {time.perf_counter() - arrived:.3f} s")
    else:
        state.log(f"{rid} {status} {route}: {handle.prompt_tokens} tokens in, {tokens} out, "
                  f"{'cancelled while running' if handle.finish_reason is None else 'failed'}, "
                  f"{time.perf_counter() - arrived:.3f} s")
