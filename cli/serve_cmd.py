"""`moe-offload serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) for one model.

The socket is bound first (a port in use is a one-line error, exit 2), then the model loads in a thread
while the server already answers: /health is 503 until it is loaded. Ctrl-C stops it like every command
(130); SIGTERM is a requested stop: in-flight requests get a few seconds, then exit 0.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import sys
import threading
import time

from offload_engine.errors import ConfigError, one_line

from .run_options import add_model_options, bounded_int, model_path, positive_int, run_config

API_KEY_ENV = "MOE_OFFLOAD_API_KEY"
GRACE_S = 5  # how long a stop waits for requests in flight
SCHEDULES = ("fifo", "routing")  # offload_engine.serving.schedule.SCHEDULES, without importing torch for --help
STALL_TIMEOUT_S = 30.0  # --stall-timeout's default


def add_parser(subparsers, name: str):
    p = subparsers.add_parser(name, help="serve the model over HTTP in OpenAI's wire format (/v1/completions, "
                                         "/v1/chat/completions, /v1/models; /health, /metrics)")
    add_model_options(p)  # --max-batch among them: the plan's KV cache holds that many rows, the batch's limit
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=bounded_int(0, 65535), default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--max-queue", type=positive_int, default=64,  # scheduler.DEFAULT_MAX_QUEUE (a test holds them equal)
                   help="requests that may wait for a batch; one more is answered 429 with Retry-After")
    p.add_argument("--schedule", choices=SCHEDULES, default="fifo",
                   help="which waiting requests join the batch's free rows: fifo (the oldest), or routing (those "
                        "whose predicted experts overlap the running rows' most; continuous-batching models only, "
                        "static batches stay fifo)")
    p.add_argument("--schedule-max-skips", type=bounded_int(0, 2**31 - 1), default=None, metavar="N",
                   help="--schedule routing: a request that N younger requests were admitted ahead of is admitted "
                        "next (default: 1.5 x --max-batch, rounded down; 0: fifo)")
    p.add_argument("--stall-timeout", type=_seconds, default=STALL_TIMEOUT_S, metavar="SECONDS",
                   help="cancel a streamed request whose client, still connected, has not read a produced token "
                        f"for this long, freeing its row (default {STALL_TIMEOUT_S:g}; 0: never)")
    p.add_argument("--prefill-chunk", type=bounded_int(0, 2**31 - 1), default=0, metavar="N",
                   # scheduler.DEFAULT_PREFILL_CHUNK (a test holds them equal)
                   help="continuous batching: at most N prompt tokens are prefilled between two decode steps of the "
                        "running rows (a longer prompt in chunks; 0: whole prompts; default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV} "
                        "if set, else no key)")
    return p


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from offload_engine.engine import OffloadEngine
    from offload_engine.serving.app import make_app

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise ConfigError("--api-key is empty; pass a key, or leave it out to serve without one")
    run_cfg, path = run_config(args), model_path(args)
    sock = _bind(args.host, args.port)
    host, port = sock.getsockname()[:2]

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    app = make_app(api_key=api_key, max_queue=args.max_queue, log=log, schedule=args.schedule,
                   max_skips=args.schedule_max_skips, stall_timeout=args.stall_timeout or None,
                   prefill_chunk=args.prefill_chunk)
    state = app.state.serving
    server = _server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACE_S))
    failures: list[BaseException] = []
    engines: list = []

    def load() -> None:
        start = time.perf_counter()
        try:
            engines.append(OffloadEngine.from_run_config(path, run_cfg))
        except BaseException as e:  # reported by the main thread once the server has stopped
            failures.append(e)
            state.fail(f"the model failed to load: {one_line(str(e))}")
            server.should_exit = True
            return
        state.attach(engines[0])
        schedule = args.schedule if engines[0].continuous_batching else "fifo (static batches)"
        log(f"loaded {state.model_name} in {time.perf_counter() - start:.1f} s (max batch {run_cfg.max_batch}, "
            f"context {state.context} tokens, schedule {schedule}, prefill chunk {args.prefill_chunk or 'whole'}); ready")

    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    log(f"listening on {url} (OpenAI API at {url}/v1); loading {path} ...")
    threading.Thread(target=load, name="model-loader", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        for engine in engines:
            engine.close()
        sock.close()
    if failures:
        raise failures[0]
    log("stopped")
    return 0


def _seconds(text: str) -> float:
    """A number of seconds >= 0, checked by argparse with a one-line error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:24]!r} is not a number of seconds") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"{text[:24]!r} must be a number of seconds >= 0 (0: never)")
    return value


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} is not an address this machine can listen on ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    return sock


def _server(config):
    """A uvicorn server whose SIGTERM ends with 0: uvicorn re-raises the stop signal once it has shut down, so
    Ctrl-C still ends the CLI as everywhere (130), but SIGTERM is how a service is normally stopped."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            super().handle_exit(sig, frame)
            captured = getattr(self, "_captured_signals", None)
            if sig == signal.SIGTERM and captured and captured[-1] == sig:
                captured.pop()

    return Server(config)
