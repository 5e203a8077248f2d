"""A reader that stops reading but stays connected: the engine thread cancels its request ("stalled") once its
oldest produced piece has waited `stall_timeout` seconds, freeing its row, while the other rows go on with
their exact tokens. In process (a handle nobody reads; continuous and static batches) and through the ASGI
app (a receiver whose `send` stops returning, the connection open).

The tiny models are fast, so each forward is slowed to STEP_S: a request then outlives the timeout by far.
Every wait is bounded."""

import asyncio
import json
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from offload_engine import GenerationInputError
from offload_engine.serving.app import make_app
from offload_engine.serving.scheduler import Scheduler
from test_logprobs import tiny  # noqa: F401 (the tiny checkpoints with a tokenizer, as engines)
from test_serve import call

STEP_S = 0.02  # each forward's added time
TIMEOUT = 0.5
PROMPTS = [[5, 17, 33, 9, 70, 3], [44, 101, 8], [12, 60, 61, 62, 7]]


@pytest.fixture
def slow(monkeypatch):
    def slow_down(engine):
        real = engine.forward

        def forward(*args, **kwargs):
            time.sleep(STEP_S)
            return real(*args, **kwargs)

        monkeypatch.setattr(engine, "forward", forward)
        return engine

    return slow_down


def test_a_handle_nobody_reads_frees_its_row_and_the_others_keep_their_tokens(tiny, slow):
    engine = tiny("mixtral")[0]
    alone = engine.generate(PROMPTS[1], max_new_tokens=50, ignore_eos=True).token_ids
    third_alone = engine.generate(PROMPTS[2], max_new_tokens=4, ignore_eos=True).token_ids
    slow(engine)
    scheduler = Scheduler(engine, max_batch=2)
    try:
        ignored = scheduler.submit(PROMPTS[0], max_new_tokens=50, ignore_eos=True, stall_timeout=TIMEOUT)
        reader = scheduler.submit(PROMPTS[1], max_new_tokens=50, ignore_eos=True, stall_timeout=5.0)
        third = scheduler.submit(PROMPTS[2], max_new_tokens=4, ignore_eos=True)  # waits for a free row
        got = []
        for piece in reader:  # read as they come, while the other's pile up
            got.append(piece)
            if third.done() and ignored.done():
                break
        stopped = time.perf_counter()
        done = ignored.result(timeout=30)
        assert done.finish_reason == "stalled" and ignored.finish_reason == "stalled"
        first_piece = ignored.submitted + done.ttft_s
        assert TIMEOUT <= stopped - first_piece < TIMEOUT + 1.0  # freed a step or so after the timeout
        assert ignored.generated_tokens < 50 and third.result(timeout=30).token_ids == third_alone
        assert not reader.done()  # the freed row served the third while the reader ran on
        got += list(reader)
        assert [p.token_id for p in got] == alone and reader.finish_reason == "length"
        assert scheduler.totals.stalled == 1
        left = [ignored.next_piece(timeout=0) for _ in range(ignored.generated_tokens + 1)]
        assert left[-1] is None and all(p is not None for p in left[:-1])  # what was produced stays readable
    finally:
        scheduler.close()


def test_a_static_batch_drops_a_stalled_row(tiny, slow):
    engine = slow(tiny("gpt_oss")[0])
    assert not engine.continuous_batching
    scheduler = Scheduler(engine)
    try:
        ignored = scheduler.submit(PROMPTS[0], max_new_tokens=50, ignore_eos=True, stall_timeout=TIMEOUT)
        wait_until(ignored.done)  # not result(): a caller waiting there is reading the completion whole
        assert ignored.result(timeout=0).finish_reason == "stalled" and ignored.generated_tokens < 50
        assert scheduler.totals.stalled == 1
        read = scheduler.submit(PROMPTS[1], max_new_tokens=30, ignore_eos=True, stall_timeout=TIMEOUT)
        assert len(list(read)) == 30 and read.finish_reason == "length"
    finally:
        scheduler.close()


def test_a_slow_reader_that_keeps_reading_is_not_stalled(tiny, slow):
    """Pieces pile up behind a reader slower than the steps (a piece every 3 steps), so the oldest untaken
    piece grows old; but the reader never pauses for the timeout, so it is not cancelled."""
    engine = slow(tiny("mixtral")[0])
    handle = engine.submit(PROMPTS[0], max_new_tokens=50, ignore_eos=True, stall_timeout=TIMEOUT)
    pieces = []
    for piece in handle:
        pieces.append(piece)
        time.sleep(3 * STEP_S)
    assert handle.finish_reason == "length" and len(pieces) == 50


def test_a_caller_waiting_for_the_result_is_not_stalled(tiny, slow):
    """result() takes the completion whole at the end: its pieces wait untaken by design."""
    engine = slow(tiny("mixtral")[0])
    handle = engine.submit(PROMPTS[0], max_new_tokens=50, ignore_eos=True, stall_timeout=TIMEOUT)
    done = handle.result(timeout=60)  # 50 steps of STEP_S: longer than the timeout
    assert done.finish_reason == "length" and len(done.token_ids) == 50


def wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_stall_timeout_is_checked(tiny):
    engine = tiny("mixtral")[0]
    for bad in (0, -1.0, float("inf"), float("nan"), True, "5"):
        with pytest.raises(GenerationInputError, match="stall_timeout"):
            engine.submit([1, 2], stall_timeout=bad)


# -- through the ASGI app -------------------------------------------------------------------------------------
async def stop_reading(app, body: dict, chunks: int, stalled):
    """POST `body` to /v1/completions; after `chunks` body messages, `send` stops returning (the client is
    still connected: `receive` never says otherwise) until `stalled()` holds; then read to the end. Returns
    (the messages sent, seconds from the stop to `stalled()`)."""
    data = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 1234), "server": ("test", 80)}
    sent, resume, stop = [], asyncio.Event(), []
    received = False

    async def receive():
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": data, "more_body": False}
        await asyncio.Event().wait()  # connected, silent

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body" and len(sent) == 1 + chunks:
            stop.append(time.perf_counter())
            await resume.wait()

    task = asyncio.create_task(app(scope, receive, send))
    deadline = time.monotonic() + 30
    while not (stop and stalled()):
        assert time.monotonic() < deadline and not task.done(), "timed out"
        await asyncio.sleep(0.005)
    waited = time.perf_counter() - stop[0]
    resume.set()
    await asyncio.wait_for(task, 30)
    return sent, waited


def test_a_stream_whose_client_stops_reading_is_cancelled_and_logged(tiny, slow):
    engine = tiny("mixtral")[0]
    body = {"prompt": "The cat", "max_tokens": 50, "temperature": 0}
    log: list[str] = []
    app = make_app(engine, log=log.append, stall_timeout=TIMEOUT)
    try:
        want = call(app, "POST", "/v1/completions", json=body).json()["choices"][0]
        assert want["finish_reason"] == "length"  # it runs far past the timeout unless cancelled
        slow(engine)
        scheduler = app.state.serving.scheduler
        sent, waited = asyncio.run(stop_reading(app, {**body, "stream": True}, chunks=2,
                                                stalled=lambda: scheduler.totals.stalled == 1 and not scheduler.running))
        # the oldest untaken piece may have come a little before `send` stopped returning
        assert TIMEOUT - 0.2 <= waited < TIMEOUT + 1.0
        data = b"".join(m.get("body", b"") for m in sent[1:]).decode().split("\n\n")
        chunks = [json.loads(d[len("data: "):]) for d in data if d]
        text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
        assert text == want["text"][:len(text)] and len(text) < len(want["text"])  # its pieces, then the end
        assert chunks[-1]["error"]["code"] == "stalled" and "--stall-timeout" in chunks[-1]["error"]["message"]
        assert "[DONE]" not in data
        assert any(" 499 " in line and "stalled" in line for line in log), log
        metrics = {s.name: s.value for f in text_string_to_metric_families(call(app, "GET", "/metrics").text)
                   for s in f.samples}
        assert metrics["moe_offload_stalled_requests_total"] == 1
        again = call(app, "POST", "/v1/completions", json={**body, "max_tokens": 10}).json()["choices"][0]
        assert again["text"] == want["text"][:len(again["text"])] and again["finish_reason"] == "length"
    finally:
        app.state.serving.close()


def test_a_bad_stall_timeout_flag_is_one_line_and_exit_2(capsys):
    from offload_engine.cli.main import main

    for bad in ("-1", "soon", "inf"):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", "--stall-timeout", bad])
        assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("--stall-timeout" in line for line in err)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--stall-timeout SECONDS" in capsys.readouterr().out
