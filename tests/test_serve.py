"""`engine.submit` and `moe-offload serve`: the engine thread's batches, the OpenAI wire format in process
(httpx over ASGI), and the real server driven by the official `openai` client.

Greedy decoding throughout, so every answer can be compared token for token (text for text over HTTP) with
`engine.generate` alone. Every wait is bounded."""

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from offload_engine import DEFAULT_MODEL, GenerationInputError, OffloadEngine
from offload_engine.serving.app import make_app
from offload_engine.serving.scheduler import QueueFullError, Scheduler

PROMPTS = ["The history of the", "import os\n", "In the beginning", "Der Hund"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
CONTEXT = 96


@pytest.fixture(scope="module")
def engine():
    with OffloadEngine.from_pretrained(DEFAULT_MODEL, max_context=CONTEXT, progress=False) as e:
        yield e


@pytest.fixture(scope="module")
def engine2():
    """Room for batches of two."""
    with OffloadEngine.from_pretrained(DEFAULT_MODEL, max_context=CONTEXT, max_batch=2, progress=False) as e:
        yield e


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """The bundled model with a chat template (it has none of its own)."""
    path = tmp_path_factory.mktemp("chat") / "chat_model"
    shutil.copytree(DEFAULT_MODEL, path, ignore=shutil.ignore_patterns("predictor", "*.png"))
    config = json.loads((path / "tokenizer_config.json").read_text("utf-8"))
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}), "utf-8")
    return path


@pytest.fixture(scope="module")
def log():
    return []


@pytest.fixture(scope="module")
def app(engine, log):
    app = make_app(engine, log=log.append)
    yield app
    app.state.serving.close()


def call(app, method, path, **kwargs):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
            return await client.request(method, path, **kwargs)
    return asyncio.run(go())


def events(response) -> list:
    """The `data:` payloads of a server-sent event stream, the last one ("[DONE]") as a string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in response.text.split("\n\n") if line]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]] + ["[DONE]"]


def alone(engine, prompt, n, **kwargs):
    return engine.generate(prompt, max_new_tokens=n, **kwargs)


# -- submit ---------------------------------------------------------------------------------------------------
def test_submit_from_threads_gives_each_its_own_answer(engine):
    expected = [alone(engine, p, 12).token_ids for p in PROMPTS]
    got = [None] * len(PROMPTS)

    def work(i):
        handle = engine.submit(PROMPTS[i], max_new_tokens=12)
        pieces = list(handle)
        got[i] = ([p.token_id for p in pieces], "".join(p.text for p in pieces), handle.result(timeout=60))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for (ids, text, result), want, prompt in zip(got, expected, PROMPTS):
        assert ids == result.token_ids == want
        assert text == result.text == engine.generate(prompt, max_new_tokens=12).text
        assert result.batch_rows == 1 and result.finish_reason in ("length", "stop")


def test_submitted_prompts_share_the_batch_and_each_gets_its_tokens_alone(engine2):
    """Continuous batching (the bundled model's layers all take a row cache): rows of other settings share the
    batch, and each row's tokens are its own alone (static batches gave each row its padded batch's tokens;
    tests/test_continuous.py holds the fp32 and bf16 comparisons)."""
    assert engine2.continuous_batching
    scheduler = Scheduler(engine2)
    try:
        first = scheduler.submit(PROMPTS[0], max_new_tokens=20)
        pair = [scheduler.submit(p, max_new_tokens=10) for p in PROMPTS[1:3]]
        results = [h.result(timeout=60) for h in pair]
        assert max(r.batch_rows for r in results) == 2
        assert [r.token_ids for r in results] == [alone(engine2, p, 10).token_ids for p in PROMPTS[1:3]]
        assert first.result(timeout=60).token_ids == alone(engine2, PROMPTS[0], 20).token_ids
        assert first.result().batch_rows == 2
    finally:
        scheduler.close()


def test_stop_strings_cancel_and_queue_limits(engine):
    full = alone(engine, PROMPTS[0], 20).text
    stop = full[8:14]
    scheduler = Scheduler(engine, max_queue=1)
    try:
        handle = scheduler.submit(PROMPTS[0], max_new_tokens=20, stop=[stop])
        streamed = "".join(p.text for p in handle)
        result = handle.result(timeout=60)
        assert streamed == result.text == full[:full.index(stop)] and result.finish_reason == "stop"

        running = scheduler.submit(PROMPTS[0], max_new_tokens=CONTEXT - 10)
        assert running.next_piece(timeout=60) is not None
        waiting = scheduler.submit(PROMPTS[1], max_new_tokens=5)
        with pytest.raises(QueueFullError):
            scheduler.submit(PROMPTS[2], max_new_tokens=5)
        waiting.cancel()
        running.cancel()  # its batch (of one) is abandoned at the next step
        assert running.result(timeout=60).finish_reason == "cancelled"
        assert running.generated_tokens < CONTEXT - 10
        assert waiting.result(timeout=60).finish_reason == "cancelled" and waiting.generated_tokens == 0
        with pytest.raises(GenerationInputError, match="one prompt"):
            scheduler.submit(PROMPTS[:2])
    finally:
        scheduler.close()


# -- the HTTP API in process -------------------------------------------------------------------------------
def test_health_and_models_wait_for_the_engine(engine):
    app = make_app()
    try:
        assert call(app, "GET", "/health").status_code == 503
        r = call(app, "GET", "/v1/models")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        app.state.serving.attach(engine)
        assert call(app, "GET", "/health").json()["status"] == "ok"
        models = call(app, "GET", "/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["default_model"]
    finally:
        app.state.serving.close()


def test_completion_streamed_plain_and_generate_agree(app, engine, log):
    want = alone(engine, PROMPTS[0], 20)
    body = {"model": "default_model", "prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0}
    plain = call(app, "POST", "/v1/completions", json=body).json()
    assert plain["choices"][0]["text"] == want.text
    assert plain["choices"][0]["finish_reason"] == ("stop" if len(want.token_ids) < 20 else "length")
    prompt_tokens = len(engine.tokenizer(PROMPTS[0])["input_ids"])
    assert plain["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": len(want.token_ids),
                              "total_tokens": prompt_tokens + len(want.token_ids)}
    streamed = events(call(app, "POST", "/v1/completions",
                           json={**body, "stream": True, "stream_options": {"include_usage": True}}))
    chunks, usage_chunk = streamed[:-2], streamed[-2]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want.text
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
    without = events(call(app, "POST", "/v1/completions", json={**body, "stream": True}))
    assert all(c["usage"] is None for c in without[:-1])
    # the default engine holds every expert packed on a CPU that packs them (no slot, no hit rate)
    assert any(re.search(r"tokens in, 20 out, TTFT .* tok/s, (hit rate|no expert slot looked up)", line)
               for line in log)


def test_stop_and_unknown_fields(app, engine):
    full = alone(engine, PROMPTS[0], 20).text
    stop = full[8:14]
    body = {"prompt": PROMPTS[0], "max_tokens": 20, "temperature": 0, "stop": stop, "frobnicate": [1, 2],
            "user": "someone", "presence_penalty": 0}
    plain = call(app, "POST", "/v1/completions", json=body).json()
    assert plain["choices"][0] == {"index": 0, "text": full[:full.index(stop)], "logprobs": None,
                                   "finish_reason": "stop"}
    streamed = events(call(app, "POST", "/v1/completions", json={**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in streamed[:-1]) == full[:full.index(stop)]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "stop": 3}, "stop"),
    ({"prompt": 7}, "prompt"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": "x", "max_tokens": CONTEXT}, "max_tokens"),
    ({"prompt": "the " * CONTEXT}, "prompt"),
])
def test_bad_requests_are_400_in_openais_shape(app, body, param):
    r = call(app, "POST", "/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]
    if param == "prompt" and isinstance(body.get("prompt"), str):
        assert error["code"] == "context_length_exceeded" and "context" in error["message"]


def test_bad_json_and_chat_without_a_template(app):
    r = call(app, "POST", "/v1/completions", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = call(app, "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_missing"
    assert "chat template" in r.json()["error"]["message"]
    r = call(app, "POST", "/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_chat_streamed_plain_and_generate_agree(chat_model):
    with OffloadEngine.from_pretrained(chat_model, max_context=CONTEXT, progress=False) as chat_engine:
        app = make_app(chat_engine)
        try:
            want = chat_engine.generate("Hello there", max_new_tokens=12, chat=True)
            body = {"model": "m", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 12,
                    "temperature": 0}
            plain = call(app, "POST", "/v1/chat/completions", json=body).json()
            assert plain["object"] == "chat.completion"
            assert plain["choices"][0]["message"] == {"role": "assistant", "content": want.text}
            assert plain["usage"]["completion_tokens"] == len(want.token_ids)
            streamed = events(call(app, "POST", "/v1/chat/completions", json={**body, "stream": True}))
            assert streamed[0]["choices"][0]["delta"]["role"] == "assistant"
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in streamed[:-1]) == want.text
            assert streamed[-2]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        finally:
            app.state.serving.close()


def test_a_full_queue_is_429_and_an_engine_fault_500_that_leaves_the_server_serving(engine, monkeypatch):
    app = make_app(engine, max_queue=1)
    scheduler = app.state.serving.scheduler
    release, real = threading.Event(), engine.forward

    def blocked(*args, **kwargs):
        release.wait(60)
        return real(*args, **kwargs)

    try:
        monkeypatch.setattr(engine, "forward", blocked)
        running = scheduler.submit(PROMPTS[0], max_new_tokens=3)
        deadline = time.monotonic() + 30
        while scheduler.running == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = scheduler.submit(PROMPTS[1], max_new_tokens=3)
        r = call(app, "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 3})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        release.set()
        assert len(running.result(timeout=60).token_ids) == 3 and len(waiting.result(timeout=60).token_ids) == 3

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(engine, "forward", broken)
        for stream in (False, True):
            r = call(app, "POST", "/v1/completions", json={"prompt": "x", "max_tokens": 3, "stream": stream})
            assert r.status_code == 500 and r.json()["error"]["type"] == "server_error" and "boom" in r.text
        monkeypatch.setattr(engine, "forward", real)
        r = call(app, "POST", "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == alone(engine, PROMPTS[0], 5).text
    finally:
        release.set()
        app.state.serving.close()


def test_api_key_and_metrics(engine):
    app = make_app(engine, api_key="s3cret")
    try:
        assert call(app, "GET", "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
            for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
                r = call(app, method, path, headers=headers, json={"prompt": "x"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer s3cret"}
        assert call(app, "GET", "/v1/models", headers=key).status_code == 200
        r = call(app, "POST", "/v1/completions", headers=key, json={"prompt": PROMPTS[0], "max_tokens": 4,
                                                                          "temperature": 0})
        assert r.status_code == 200  # greedy: OpenAI's default temperature (1) could end early at an EOS, 1 in 300
        text = call(app, "GET", "/metrics", headers=key).text
        families = list(text_string_to_metric_families(text))
        samples = {s.name: s.value for family in families for s in family.samples if not s.labels}
        assert samples["moe_offload_generated_tokens_total"] >= 4
        assert samples["moe_offload_steps_total"] == 4  # one request alone: its prefill, then 3 decode steps
        assert samples["moe_offload_decode_steps_total"] == 3
        top_k_calls = engine.spec.top_k * len(engine.spec.moe_layers)  # one row: top-k distinct experts a call
        assert samples["moe_offload_decode_expert_lookups_total"] == 3 * top_k_calls
        # every needed expert is a hit, a miss or computed on the CPU (all of them, where the CPU packs them)
        assert (samples["moe_offload_expert_cache_hits_total"] + samples["moe_offload_expert_cache_misses_total"]
                + samples["moe_offload_experts_on_cpu_total"]) >= 4 * top_k_calls
        assert samples["moe_offload_model_loaded"] == 1
        requests = {(s.labels["route"], s.labels["status"]): s.value for family in families for s in family.samples
                    if s.name == "moe_offload_requests_total"}
        assert requests[("/v1/completions", "200")] == 1 and requests[("/v1/models", "401")] == 3
        assert samples["moe_offload_time_to_first_token_seconds_count"] == 1
    finally:
        app.state.serving.close()


# -- the real server ----------------------------------------------------------------------------------------
@contextmanager
def running_server(model, *flags):
    """`moe-offload serve --model MODEL FLAGS` on a free port, once healthy: (base url, its stderr lines, the
    process); killed at the end if still running."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "offload_engine.cli.main", "serve", "--model", str(model),
                             "--port", "0", *flags, "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        health = []
        while time.monotonic() < deadline and proc.poll() is None:
            found = [m for line in list(lines) if (m := re.search(r"listening on (http://\S+)", line))]
            if found:
                url = found[0].group(1)
                health.append(httpx.get(f"{url}/health").status_code)
                if health[-1] == 200:
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"the server did not become healthy: {''.join(lines)}")
        assert health[0] == 503, health  # it listens while the model loads (seconds; the first look is at once)
        yield url, lines, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def server(chat_model):
    """`moe-offload serve` on a free port, with a key; yields (base url, its stderr lines, the process)."""
    with running_server(chat_model, "--max-context", str(CONTEXT), "--api-key", "k") as running:
        yield running


def test_the_official_client_reads_logprobs(server, chat_model):
    """Logprobs through the official client, both endpoints, plain and streamed: the server's values are
    submit's for the same model and settings here (tests/test_logprobs.py checks those against transformers)."""
    import openai
    from openai import OpenAI

    url = server[0]
    with OffloadEngine.from_pretrained(chat_model, max_context=CONTEXT, progress=False) as local:
        want = list(local.submit(PROMPTS[0], max_new_tokens=8, logprobs=2))
        want_chat = list(local.submit("Hello there", max_new_tokens=8, chat=True, logprobs=3))
        decode = {t: local.tokenizer.decode([t]) for p in want + want_chat for t in [p.token_id, *p.top_logprobs]}
    client = OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
    ask = dict(model="chat_model", prompt=PROMPTS[0], max_tokens=8, temperature=0, logprobs=2)
    lp = client.completions.create(**ask).choices[0].logprobs
    assert lp.tokens == [decode[p.token_id] for p in want]
    assert lp.token_logprobs == pytest.approx([p.logprob for p in want], abs=1e-6)
    assert [list(top) for top in lp.top_logprobs] == [[decode[t] for t in {**p.top_logprobs, p.token_id: 0}]
                                                      for p in want]
    streamed = [c.choices[0].logprobs for c in client.completions.create(**ask, stream=True) if c.choices]
    assert [v for chunk_lp in streamed for v in chunk_lp.token_logprobs] == lp.token_logprobs

    chat = dict(model="chat_model", messages=[{"role": "user", "content": "Hello there"}], max_tokens=8, temperature=0,
                logprobs=True, top_logprobs=3)
    content = client.chat.completions.create(**chat).choices[0].logprobs.content
    assert [c.token for c in content] == [decode[p.token_id] for p in want_chat]
    assert [c.logprob for c in content] == pytest.approx([p.logprob for p in want_chat], abs=1e-6)
    assert [[t.token for t in c.top_logprobs] for c in content] == [[decode[t] for t in p.top_logprobs]
                                                                    for p in want_chat]
    assert all(c.bytes == list(c.token.encode()) for c in content)
    streamed = [c.choices[0].logprobs for c in client.chat.completions.create(**chat, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [e.logprob for chunk_lp in streamed for e in chunk_lp.content] == [c.logprob for c in content]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**{**chat, "logprobs": False})
    assert refused.value.param == "top_logprobs"


def test_the_official_client_against_the_real_server(server, chat_model):
    from openai import OpenAI

    url, lines, proc = server
    with OffloadEngine.from_pretrained(chat_model, max_context=CONTEXT, progress=False) as local:
        want = {p: alone(local, p, 16).text for p in PROMPTS}
        want_chat = alone(local, "Hello there", 12, chat=True).text
    client = OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60)
    r = client.completions.create(model="chat_model", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert r.choices[0].text == want[PROMPTS[0]] and r.usage.completion_tokens > 0
    stream = client.chat.completions.create(model="chat_model", messages=[{"role": "user", "content": "Hello there"}],
                                            max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want_chat

    got = {}

    def one(prompt):
        got[prompt] = OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0, timeout=60).completions.create(
            model="chat_model", prompt=prompt, max_tokens=16, temperature=0).choices[0].text

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want

    # a client that stops reading: the server cancels its request and goes on serving
    early = client.completions.create(model="chat_model", prompt=PROMPTS[1], max_tokens=CONTEXT - 10,
                                      temperature=0, stream=True)
    next(iter(early))
    early.close()
    r = client.completions.create(model="chat_model", prompt=PROMPTS[0], max_tokens=16, temperature=0)
    assert r.choices[0].text == want[PROMPTS[0]]
    deadline = time.monotonic() + 30
    while not any(" 499 " in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(" 499 " in line for line in lines), "".join(lines)

    with pytest.raises(Exception, match="401"):
        OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "stopped" in "".join(lines[-3:])


def test_the_stop_string_examples_run():
    import doctest

    from offload_engine.serving import handle

    assert doctest.testmod(handle).failed == 0


def test_close_stops_the_engine_thread_and_submit_starts_a_new_one(engine):
    engine.submit(PROMPTS[0], max_new_tokens=3).result(timeout=60)
    thread = engine._scheduler._thread
    engine.close()
    assert not thread.is_alive()
    assert engine.submit(PROMPTS[0], max_new_tokens=3).result(timeout=60).token_ids == alone(engine, PROMPTS[0], 3).token_ids


def test_bad_flags_and_a_port_in_use_are_one_line_and_exit_2(capsys):
    import socket

    from offload_engine.cli.main import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--port", "70000"])
    assert exit_.value.code == 2
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1]), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--port" in err[0] and "cannot listen on 127.0.0.1" in err[1]


def test_a_client_gone_before_its_request_was_read_is_499_not_500(engine):
    """The body never arrives whole (the client hung up): counted as the client's leaving, no error of ours."""
    from prometheus_client.parser import text_string_to_metric_families

    log: list[str] = []
    app = make_app(engine, log=log.append)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 1234), "server": ("test", 80)}
    sent = []

    async def receive():
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    try:
        asyncio.run(app(scope, receive, send))
        assert sent[0]["status"] == 499 and any("left before its request was read" in line for line in log)
        metrics = text_string_to_metric_families(call(app, "GET", "/metrics").text)
        requests = {s.labels["status"]: s.value for f in metrics for s in f.samples
                    if s.name == "moe_offload_requests_total"}
        assert requests == {"499": 1.0}
    finally:
        app.state.serving.close()


def test_best_of_other_than_one_is_refused_and_prompts_are_prepared_off_the_event_loop(engine, monkeypatch):
    """best_of > 1 would need several samples (as n does): a 400 naming it. And a prompt is parsed and
    tokenized in a worker thread: a large one must not stop the event loop handing the other streams their
    tokens (a stream starved that way would even look stalled)."""
    import offload_engine.serving.app as app_module

    threads, real = [], app_module.prepare

    def recording(*args, **kwargs):
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "prepare", recording)
    app = make_app(engine)
    try:
        r = call(app, "POST", "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2, "best_of": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
        r = call(app, "POST", "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 2, "best_of": 1,
                                                       "temperature": 0})
        assert r.status_code == 200
        assert threads and all(t is not threading.main_thread() for t in threads)
    finally:
        app.state.serving.close()
