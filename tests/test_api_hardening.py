"""The Python API under hostile use: wrong argument types, invalid text, corrupt weights, several threads.

Every bad input is an OffloadEngineError with a one-line message; threads sharing one engine get exactly the
answers they would get alone, and the engine stays usable afterwards.
"""

import threading

import numpy as np
import pytest
import torch

import tiny_models as tm
from offload_engine import GenerationInputError, OffloadEngine, OffloadEngineError
from offload_engine.cli.main import main

PROMPTS = [[5, 17, 33, 9], [70, 3, 44], [101, 8], [12, 13, 14, 15, 16]]


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    tm.save_checkpoint(tm.build_reference("mixtral"), path, "per_expert")
    return path


@pytest.fixture(scope="module")
def engine(mixtral_dir):
    return OffloadEngine.from_pretrained(mixtral_dir, device="cpu", expert_slots=3, progress=False)


@pytest.mark.parametrize("kwargs", [
    dict(prompt=None), dict(prompt=[1.0, 2.0]), dict(prompt=[True, 3]), dict(prompt=3),
    dict(prompt=np.array([1.5, 2.5])), dict(prompt=[[1, 2], None]), dict(prompt=[1, 2], temperature="0.5"),
    dict(prompt=[1, 2], top_p=None), dict(prompt=[1, 2], seed="abc"), dict(prompt=[1, 2], top_k=True),
    dict(prompt=[1, 2], seed=2**64), dict(prompt=[1, 2], seed=-1), dict(prompt=[1, 2], temperature=float("nan")),
    dict(prompt=[1, 2], temperature=float("inf")), dict(prompt=[1, 2], max_new_tokens=2.0),
    dict(prompt=[1, 2], chat="yes"), dict(prompt=[1, 2], record_trace=1), dict(prompt="\udcff abc"),
    dict(prompt=[1, 2], ignore_eos=None), dict(prompt=[10**30]),
])
def test_bad_generate_arguments_are_engine_errors(engine, kwargs):
    prompt, new = kwargs.pop("prompt"), kwargs.pop("max_new_tokens", 4)
    with pytest.raises(OffloadEngineError) as info:
        engine.generate(prompt, max_new_tokens=new, **kwargs)
    assert "\n" not in str(info.value)
    if "record_trace" not in kwargs:  # a generate-only argument
        with pytest.raises(OffloadEngineError):
            next(iter(engine.stream(prompt, max_new_tokens=new, **kwargs)))


def test_integer_arrays_and_tensors_are_prompts(engine):
    expected = engine.generate([5, 17, 33], max_new_tokens=4).token_ids
    assert engine.generate(np.array([5, 17, 33], dtype=np.int32), max_new_tokens=4).token_ids == expected
    assert engine.generate(torch.tensor([5, 17, 33]), max_new_tokens=4).token_ids == expected


@pytest.mark.parametrize("kwargs", [
    dict(name=None), dict(name=""), dict(name="~no_such_user_here/model"), dict(name=5),
    dict(policy=["lru"]), dict(policy="mru"), dict(predictor=3), dict(prefetch_depth=-1), dict(prefetch_depth=True),
    dict(progress="no"), dict(dtype=torch.int8), dict(dtype=3), dict(max_batch=True), dict(expert_slots=2.0),
    dict(memory_budget="1e400GiB"), dict(device="cuda:99"), dict(max_context=0),
])
def test_bad_from_pretrained_arguments_are_engine_errors(mixtral_dir, kwargs):
    name = kwargs.pop("name", mixtral_dir)
    with pytest.raises(OffloadEngineError) as info:
        OffloadEngine.from_pretrained(name, device=kwargs.pop("device", "cpu"), progress=kwargs.pop("progress", False),
                                      **kwargs)
    assert "\n" not in str(info.value)


def test_a_tiny_temperature_samples_the_argmax(engine):
    greedy = engine.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True).token_ids
    for t in (1e-30, 1e-12, 5e-324):
        assert engine.generate(PROMPTS[0], max_new_tokens=6, ignore_eos=True, temperature=t, seed=1).token_ids == greedy


def test_nan_weights_are_a_clear_error_not_garbage(tmp_path):
    model = tm.build_reference("mixtral")
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    tm.save_checkpoint(model, tmp_path, "per_expert")
    engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", expert_slots=3, progress=False)
    for temperature in (0.0, 0.7):
        with pytest.raises(GenerationInputError, match="non-finite scores"):
            engine.generate(PROMPTS[0], max_new_tokens=4, temperature=temperature, seed=0)


@pytest.mark.parametrize("settings", [dict(), dict(policy="predictive", predictor="history", prefetch_depth=1)])
def test_threads_sharing_one_engine_get_their_single_threaded_answers(mixtral_dir, settings):
    alone = OffloadEngine.from_pretrained(mixtral_dir, device="cpu", expert_slots=3, progress=False, **settings)
    expected = [alone.generate(p, max_new_tokens=16, ignore_eos=True).token_ids for p in PROMPTS]
    shared = OffloadEngine.from_pretrained(mixtral_dir, device="cpu", expert_slots=3, progress=False, **settings)
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(3):
                results.setdefault(i, []).append(shared.generate(PROMPTS[i], max_new_tokens=16, ignore_eos=True))
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i, runs in results.items():
        assert all(r.token_ids == expected[i] for r in runs), i
        # each request counts only its own lookups: one per routed expert per layer call (16 steps, 2 layers)
        assert all(r.stats.hits + r.stats.misses >= 2 * 15 for r in runs)
    # the engine is still usable, and its cache bookkeeping is whole
    assert shared.generate(PROMPTS[0], max_new_tokens=16, ignore_eos=True).token_ids == expected[0]
    assert len(shared.cache.slot_of) <= shared.cache.num_slots


def test_threads_calling_the_transformers_model_directly_are_serialised(engine):
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        expected = engine.model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0)
    outs, errors = [], []

    def work():
        try:
            with torch.no_grad():
                outs.append(engine.model.generate(ids, do_sample=False, max_new_tokens=8, pad_token_id=0))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.equal(o, expected) for o in outs)


def cli(capsys, *argv):
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err.strip()


def test_expert_slots_beyond_the_profile_budget_name_the_real_cause(capsys):
    code, err = cli(capsys, "plan", "--profile", "profiles/demo.toml", "--expert-slots", "500")
    assert code == 2 and "expert slots do not fit in the memory budget" in err and "at most" in err
    code, err = cli(capsys, "plan", "--profile", "profiles/demo.toml", "--expert-slots", "4")
    assert code == 0  # fewer slots than the budget holds: the budget stays a cap, the slots are honoured


def test_an_empty_model_flag_is_refused(capsys):
    code, err = cli(capsys, "generate", "--model", "")
    assert code == 2 and err.startswith("error: --model is empty")


def test_trace_blames_seq_len_when_it_set_the_context(capsys, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello world " * 50)
    code, err = cli(capsys, "trace", "--input", str(text), "--seq-len", "4096", "--out", str(tmp_path / "t.npz"))
    assert code == 2 and "--seq-len 4096" in err and "--max-context" not in err
    assert not (tmp_path / "t.npz").exists()


def test_streams_in_flight_never_exceed_the_planned_batch(mixtral_dir):
    """The plan holds KV cache for max_batch sequences: a second stream in the same thread beyond it is an
    error (waiting would wait for itself); within it, interleaved streams give their own answers."""
    one = OffloadEngine.from_pretrained(mixtral_dir, device="cpu", expert_slots=3, progress=False)
    a = one.stream(PROMPTS[0], max_new_tokens=4, ignore_eos=True)
    next(a)
    with pytest.raises(GenerationInputError, match="already has 1 sequence"):
        next(one.stream(PROMPTS[1], max_new_tokens=4))
    a.close()
    assert len(one.generate(PROMPTS[1], max_new_tokens=4, ignore_eos=True).token_ids) == 4  # room again
    two = OffloadEngine.from_pretrained(mixtral_dir, device="cpu", expert_slots=3, max_batch=2, progress=False)
    expected = [two.generate(p, max_new_tokens=6, ignore_eos=True).token_ids for p in PROMPTS[:2]]
    streams = [two.stream(p, max_new_tokens=6, ignore_eos=True) for p in PROMPTS[:2]]
    got = [[], []]
    for _ in range(6):
        for i, s in enumerate(streams):
            got[i].append(next(s).token_id)
    assert got == expected


def test_a_suspended_or_abandoned_stream_leaves_the_callers_autograd_mode_alone(engine):
    stream = engine.stream(PROMPTS[0], max_new_tokens=8, ignore_eos=True)
    next(stream)
    assert not torch.is_inference_mode_enabled()  # the caller's code between tokens runs in its own mode
    del stream
    assert not torch.is_inference_mode_enabled()


def test_a_script_that_ends_while_a_submitted_request_runs_exits_cleanly(tmp_path):
    """The engine thread is stopped before the interpreter finalizes: it used to be stopped inside torch's
    C++ code, and the forced unwind aborted the process (exit 134, "terminate called without an active
    exception"), every time a script left with a request still decoding."""
    import subprocess
    import sys

    script = tmp_path / "leave.py"
    script.write_text(
        "from offload_engine import OffloadEngine, DEFAULT_MODEL\n"
        "engine = OffloadEngine.from_pretrained(DEFAULT_MODEL, max_context=128, max_batch=2, progress=False)\n"
        "handle = engine.submit('Hello there', max_new_tokens=120, ignore_eos=True)\n"
        "next(iter(handle))\n"
        "print('left mid-generation')\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert "left mid-generation" in done.stdout
