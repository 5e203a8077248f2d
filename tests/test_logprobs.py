"""Logprobs (offload_engine/logprobs.py, serving/openai_logprobs.py): every value against log_softmax of
transformers' own model's logits in fp32, for the chosen token and the top K (ids and values); greedy and
seeded sampling; rows of a continuous batch against their values alone; the static-batch path (gpt-oss);
both endpoints, plain and streamed; the step's one read of the device; the 400s.

Tiny random checkpoints with a character-level tokenizer (a chat template included), on the CPU in fp32."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny_models as tm
from device_reads import counting_reads
from offload_engine import GenerationInputError, OffloadEngine
from offload_engine.logprobs import on_device
from offload_engine.serving import continuous
from offload_engine.serving.app import make_app
from offload_engine.serving.openai_api import ApiError, ChatRequest, CompletionRequest, parse, prepare
from test_serve import call, events
from tiny_tokenizer import save_char_tokenizer

TOL = 1e-5  # fp32: the engine's incremental decode against one full forward of transformers' model
PROMPTS = [[5, 17, 33, 9, 70, 3], [44, 101, 8], [12, 60, 61, 62, 7, 90, 33, 2, 14], [30, 31]]
NEVER = "\u2603"  # a character the tiny tokenizer cannot produce: a stop string that never completes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> (engine, transformers' model): fp32 on the CPU, three rows."""
    made, engines = {}, []

    def get(name):
        if name not in made:
            model = tm.build_reference(name)
            path = tmp_path_factory.mktemp(name)
            tm.save_checkpoint(model, path, "per_expert")
            save_char_tokenizer(path)
            engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", max_context=64, max_batch=3,
                                                   progress=False)
            engines.append(engine)
            made[name] = engine, model
        return made[name]

    yield get
    for engine in engines:
        engine.close()


def reference(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of transformers' logits at each generated position: [len(tokens), V] in fp32."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(dim=-1)


def check(pieces, want: torch.Tensor, k: int) -> None:
    """The pieces' logprobs and top K (ids, order and values) against the reference's [n, V]."""
    tokens = torch.tensor([p.token_id for p in pieces])
    got = torch.tensor([p.logprob for p in pieces])
    torch.testing.assert_close(got, want.gather(-1, tokens[:, None])[:, 0], rtol=0, atol=TOL)
    top = want.topk(k, dim=-1)
    assert [list(p.top_logprobs) for p in pieces] == top.indices.tolist()
    if k:
        torch.testing.assert_close(torch.tensor([list(p.top_logprobs.values()) for p in pieces]), top.values,
                                   rtol=0, atol=TOL)



# -- the Python API against transformers ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])  # continuous batches; static batches
@pytest.mark.parametrize("settings_", [dict(), dict(temperature=0.9, seed=3), dict(temperature=0.7, top_p=0.8, seed=5)])
def test_submit_logprobs_are_transformers_log_softmax(tiny, name, settings_):
    engine, model = tiny(name)
    assert engine.continuous_batching == (name == "mixtral")
    pieces = list(engine.submit(PROMPTS[0], max_new_tokens=10, ignore_eos=True, logprobs=4, **settings_))
    assert [p.token_id for p in pieces] == engine.generate(PROMPTS[0], max_new_tokens=10, ignore_eos=True,
                                                           **settings_).token_ids
    check(pieces, reference(model, PROMPTS[0], [p.token_id for p in pieces]), 4)
    if not settings_:  # greedy: the chosen token is the most likely one
        assert all(p.token_id == next(iter(p.top_logprobs)) for p in pieces)
    zero = list(engine.submit(PROMPTS[0], max_new_tokens=3, ignore_eos=True, logprobs=0, **settings_))
    assert all(p.top_logprobs == {} and p.logprob is not None for p in zero)
    plain = list(engine.submit(PROMPTS[0], max_new_tokens=3, ignore_eos=True, **settings_))
    assert all(p.logprob is None and p.top_logprobs is None for p in plain)


def test_rows_of_a_continuous_batch_get_their_values_alone(tiny):
    """Rows of other settings and other K (one asking nothing) join mid-decode: each row's tokens and logprobs
    are its own alone, and transformers'."""
    engine, model = tiny("mixtral")
    asks = [dict(logprobs=3), dict(logprobs=None, temperature=0.8, seed=1), dict(logprobs=0, temperature=1.0, seed=2),
            dict(logprobs=5)]
    alone = [list(engine.submit(p, max_new_tokens=12, ignore_eos=True, **a)) for p, a in zip(PROMPTS, asks)]
    handles, taken = [], []
    for i, (prompt, ask) in enumerate(zip(PROMPTS, asks)):
        handles.append(engine.submit(prompt, max_new_tokens=12, ignore_eos=True, **ask))
        taken.append([handles[-1].next_piece(timeout=60)] if i % 2 == 0 else [])  # the next one joins mid-decode
    got = [first + list(handle) for first, handle in zip(taken, handles)]
    assert max(h.result(timeout=120).batch_rows for h in handles) > 1
    for prompt, ask, mine, want in zip(PROMPTS, asks, got, alone):
        assert [p.token_id for p in mine] == [p.token_id for p in want]
        if ask["logprobs"] is None:
            assert all(p.logprob is None and p.top_logprobs is None for p in mine)
            continue
        check(mine, reference(model, prompt, [p.token_id for p in mine]), ask["logprobs"])
        for g, w in zip(mine, want):
            assert list(g.top_logprobs) == list(w.top_logprobs)
            assert g.logprob == pytest.approx(w.logprob, abs=TOL)


def test_a_static_batchs_rows_each_get_their_own_k(tiny):
    """gpt-oss's path (engine._stream, as scheduler._run drives it): one padded batch, rows asking for
    different K or nothing, each row's values transformers' for its own sequence."""
    from offload_engine.generation import SamplingConfig

    engine, model = tiny("gpt_oss")
    asks = [2, None, 0]
    events_ = list(engine._stream(PROMPTS[:3], SamplingConfig(max_new_tokens=6, ignore_eos=True), logprobs=asks))
    for row, (prompt, k) in enumerate(zip(PROMPTS, asks)):
        tokens = [e.token_ids[row] for e in events_]
        if k is None:
            assert all(e.logprobs[row] is None for e in events_)
            continue
        want = reference(model, prompt, tokens)
        chosen = torch.tensor([e.logprobs[row][0] for e in events_])
        torch.testing.assert_close(chosen, want.gather(-1, torch.tensor(tokens)[:, None])[:, 0], rtol=0, atol=TOL)
        assert [list(e.logprobs[row][1]) for e in events_] == want.topk(k).indices.tolist()
    assert all(e.logprobs is None for e in engine._stream(PROMPTS[:2], SamplingConfig(max_new_tokens=2)))


def test_nothing_is_computed_when_no_row_asks():
    logits = torch.randn(3, 16)
    assert on_device(logits, logits.argmax(-1), [None, None, None]) is None
    values, ids = on_device(logits, logits.argmax(-1), [None, 2, 0])  # only the asking rows, to the largest K
    assert values.shape == (2, 3) and ids.shape == (2, 2)


# -- the step's one read of the device --------------------------------------------------------------------
def _continuous_reads(engine, logprobs, steps=5):
    """A RunningBatch of two rows driven on this thread (so the read detector sees every call): the reads of
    the device, the stray ones, and the pieces."""
    from offload_engine.generation import SamplingConfig
    from offload_engine.serving.handle import Handle

    handles = [Handle(str(i), p, SamplingConfig(max_new_tokens=steps, ignore_eos=True), (), logprobs[i])
               for i, p in enumerate(PROMPTS[:2])]
    batch = continuous.RunningBatch(engine, 2, lambda *args, **kwargs: None)
    batch.open()
    with counting_reads() as mode:
        original = continuous.read_to_host
        continuous.read_to_host = mode.wrap(original)  # counting_reads counts generation's and host_read's
        try:
            for handle in handles:
                batch.admit(handle)
            batch.prefill()  # whole prompts: no row decodes yet
            while batch.rows:
                batch.step()
        finally:
            continuous.read_to_host = original
    batch.close()
    return mode, [list(h) for h in handles]


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_logprobs_ride_in_the_steps_one_read(tiny, name):
    """With logprobs asked, a step still reads the device once (and the layer calls once each): the same
    count as without, and no stray read."""
    from offload_engine.generation import SamplingConfig

    engine, _ = tiny(name)
    layers = engine.spec.num_moe_layers
    if engine.continuous_batching:
        without, plain = _continuous_reads(engine, [None, None])
        asked, pieces = _continuous_reads(engine, [3, 0])
        assert [[p.token_id for p in row] for row in pieces] == [[p.token_id for p in row] for row in plain]
        assert all(p.logprob is not None for row in pieces for p in row)
        assert asked.reads == 6 * (layers + 1)  # two prefills and four decode steps: a read per layer call and step
        some, mixed = _continuous_reads(engine, [None, 2])  # only some rows ask: their rows picked by slices
        assert [[p.token_id for p in row] for row in mixed] == [[p.token_id for p in row] for row in plain]
        assert all(p.logprob is None for p in mixed[0]) and all(len(p.top_logprobs) == 2 for p in mixed[1])
        assert some.reads == asked.reads and some.stray == []
    else:
        cfg = SamplingConfig(max_new_tokens=5, ignore_eos=True)
        with counting_reads() as without:
            plain = list(engine._stream(PROMPTS[:2], cfg))
        with counting_reads() as asked:
            events_ = list(engine._stream(PROMPTS[:2], cfg, logprobs=[3, 0]))
        assert events_[-1].stats.host_syncs == plain[-1].stats.host_syncs == 5 * (layers + 1)
        assert all(row is not None for e in events_ for row in e.logprobs)
    assert asked.stray == without.stray == []
    assert asked.reads == without.reads


# -- the server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app(tiny):
    apps = {}

    def get(name):
        if name not in apps:
            apps[name] = make_app(tiny(name)[0])
        return apps[name]

    yield get
    for a in apps.values():
        a.state.serving.close()


def joined(chunks: list, chat: bool):
    """The chunks' text and logprobs, joined in order (chat: the content entries; completions: each list)."""
    text = "".join((c["choices"][0]["delta"].get("content") or "") if chat else c["choices"][0]["text"]
                   for c in chunks)
    carried = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"] is not None]
    if chat:
        return text, {"content": [entry for lp in carried for entry in lp["content"]]}
    return text, {key: [v for lp in carried for v in lp[key]] for key in ("tokens", "token_logprobs", "top_logprobs",
                                                                          "text_offset")}


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_completions_logprobs_plain_and_streamed(tiny, app, name):
    """/v1/completions: one entry per generated token (held back or cut by a stop string included), the values
    submit's (themselves transformers'), the top K and the chosen; a stream's chunks join to the plain lists."""
    engine, model = tiny(name)
    tok = engine.tokenizer
    prompt = "The cat"
    ids = tok(prompt)["input_ids"]
    want = list(engine.submit(ids, max_new_tokens=14, logprobs=3))
    check(want, reference(model, ids, [p.token_id for p in want]), 3)
    text = "".join(p.text for p in want)
    # a stop string that holds a character back wherever it appears and never completes, then one that cuts
    for stop in [text[2] + NEVER, text[5:7]]:
        body = {"prompt": prompt, "max_tokens": 14, "temperature": 0, "logprobs": 3, "stop": [stop]}
        plain = call(app(name), "POST", "/v1/completions", json=body).json()
        choice = plain["choices"][0]
        lp = choice["logprobs"]
        n = plain["usage"]["completion_tokens"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
        got = want[:n]
        assert lp["tokens"] == [tok.decode([p.token_id]) for p in got]
        assert lp["token_logprobs"] == [p.logprob for p in got]
        assert lp["top_logprobs"] == [{tok.decode([t]): v for t, v in {**p.top_logprobs, p.token_id: p.logprob}.items()}
                                      for p in got]
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(n)]
        chunks = events(call(app(name), "POST", "/v1/completions", json={**body, "stream": True}))[:-1]
        assert joined(chunks, chat=False) == (choice["text"], lp)
        assert [len(c["choices"][0]["logprobs"]["tokens"]) for c in chunks] == [1] * n  # a chunk per token
        if NEVER in stop:
            assert choice["text"] == text[:len(choice["text"])] and n == len(want)
            assert any(c["choices"][0]["text"] == "" for c in chunks)  # a held-back token has its chunk
        else:
            assert choice["finish_reason"] == "stop" and stop not in choice["text"]
    without = call(app(name), "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 3}).json()
    assert without["choices"][0]["logprobs"] is None


def test_chat_logprobs_plain_and_streamed(tiny, app):
    engine, model = tiny("mixtral")
    tok = engine.tokenizer
    want = list(engine.submit("Hi there", chat=True, max_new_tokens=10, logprobs=2))
    prompt_ids = engine._prompts("Hi there", True, 10)[0]
    check(want, reference(model, prompt_ids, [p.token_id for p in want]), 2)
    body = {"messages": [{"role": "user", "content": "Hi there"}], "max_tokens": 10, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}

    def entry(token_id, logprob):
        text = tok.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    plain = call(app("mixtral"), "POST", "/v1/chat/completions", json=body).json()
    content = plain["choices"][0]["logprobs"]["content"]
    assert content == [{**entry(p.token_id, p.logprob), "top_logprobs": [entry(t, v) for t, v in p.top_logprobs.items()]}
                       for p in want]
    chunks = events(call(app("mixtral"), "POST", "/v1/chat/completions", json={**body, "stream": True}))[:-1]
    assert chunks[0]["choices"][0]["logprobs"] is None  # the role's chunk, then one a token
    assert [len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:]] == [1] * len(want)
    assert joined(chunks, chat=True) == (plain["choices"][0]["message"]["content"], {"content": content})
    only = call(app("mixtral"), "POST", "/v1/chat/completions", json={**body, "top_logprobs": None}).json()
    assert [e["top_logprobs"] for e in only["choices"][0]["logprobs"]["content"]] == [[]] * len(want)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "a", "logprobs": 6}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": "2"}, "logprobs"),
    ("/v1/completions", {"prompt": "a", "logprobs": True}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 1.5}, "top_logprobs"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
])
def test_bad_logprobs_are_400_in_openais_shape(app, path, body, param):
    if "chat" in path:
        body = {"messages": [{"role": "user", "content": "a"}], **body}
    r = call(app("mixtral"), "POST", path, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


JSON = st.none() | st.booleans() | st.integers(-3, 30) | st.floats(allow_nan=False) | st.text(max_size=3)


@settings(max_examples=200, deadline=None)
@given(JSON, JSON, JSON)
def test_logprobs_fields_are_checked_as_openai_does(completion_k, chat_logprobs, chat_top):
    """Any JSON value: accepted exactly when OpenAI accepts it, and then asking for what it says."""
    def prepared(model, body):
        try:
            return prepare(parse(model, json.dumps(body).encode()), None, 64).sampling["logprobs"]
        except ApiError as error:
            return error.param

    ok = completion_k is None or (type(completion_k) is int and 0 <= completion_k <= 5)
    assert prepared(CompletionRequest, {"prompt": [1, 2], "logprobs": completion_k}) == (completion_k if ok else "logprobs")
    chat = {"messages": [{"role": "user", "content": "a"}], "logprobs": chat_logprobs, "top_logprobs": chat_top}
    if not (chat_logprobs is None or type(chat_logprobs) is bool):
        want = "logprobs"
    elif not (chat_top is None or (type(chat_top) is int and 0 <= chat_top <= 20)):
        want = "top_logprobs"
    elif chat_top is not None and not chat_logprobs:
        want = "top_logprobs"
    else:
        want = "messages"  # valid: it goes on to the prompt (no tokenizer here, so the messages are refused)
    assert prepared(ChatRequest, chat) == want


def test_submit_refuses_a_bad_k(tiny):
    engine, _ = tiny("mixtral")
    for bad in (-1, 21, 2.0, True, "3"):
        with pytest.raises(GenerationInputError, match="logprobs"):
            engine.submit([1, 2], logprobs=bad)


def test_the_module_example_runs():
    import doctest

    from offload_engine import logprobs

    assert doctest.testmod(logprobs).attempted > 0 and doctest.testmod(logprobs).failed == 0


def test_a_character_split_over_tokens_keeps_its_bytes_and_offsets():
    """Byte-level BPE splits a character over tokens whose texts alone decode to "\ufffd": each entry's
    `bytes` are the token's own (they join to the text's UTF-8), and text_offset counts characters, a token
    that ends a split character starting where the character does."""
    from transformers import AutoTokenizer

    from offload_engine import DEFAULT_MODEL
    from offload_engine.serving.handle import Piece
    from offload_engine.serving.openai_logprobs import LogprobsWriter, TokenBytes

    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    text = "Größe 東京 ✅ ok"
    ids = tokenizer(text)["input_ids"]
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the case this test is about
    token_bytes = TokenBytes(tokenizer)
    pieces = [Piece(i, "", None, -1.0, {i: -1.0}) for i in ids]
    chat = LogprobsWriter(True, tokenizer, token_bytes).shape(pieces)["content"]
    assert bytes(b for entry in chat for b in entry["bytes"]) == text.encode("utf-8")
    assert all(entry["top_logprobs"][0]["bytes"] == entry["bytes"] for entry in chat)
    offsets = LogprobsWriter(False, tokenizer, token_bytes).shape(pieces)["text_offset"]
    # a plain-loop twin: the characters of the bytes before each token that decode whole
    twin = [len(b"".join(token_bytes(i) for i in ids[:n]).decode("utf-8", errors="ignore")) for n in range(len(ids))]
    assert offsets == twin and offsets[-1] < len(text) and offsets == sorted(offsets)
