"""Routing-aware admission (serving/schedule.py, `Scheduler(schedule="routing")`): the signature against a
plain-loop twin, the choice, the ageing bound, FIFO unchanged, each request's tokens its own alone, the CLI
flags. The bundled model in fp32; every wait is bounded."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from offload_engine import DEFAULT_MODEL, OffloadEngine
from offload_engine.serving import schedule
from offload_engine.serving.schedule import RouterSignature, choose, likely
from offload_engine.serving.scheduler import Scheduler
from test_continuous import wait_for  # the tests folder is on sys.path, as for the shared fixtures

CONTEXT = 128
LONG = CONTEXT - 40
PYTHON = "import os\nimport sys\n\ndef main(argv):\n    for name in sorted(os.listdir(argv[1])):\n        print(name)\n"
PYTHON2 = "class Config:\n    def __init__(self, path):\n        self.path = path\n        self.items = {}\n"
SPANISH = "La ciudad de Buenos Aires es la capital de la República Argentina y una de las más pobladas de"
PROMPTS = ["The history of the", "import os\n", "Der Hund", "Le chat", PYTHON, SPANISH, "def main():\n    ",
           "Once upon a time"]


@pytest.fixture(scope="module")
def engine():
    with OffloadEngine.from_pretrained(DEFAULT_MODEL, max_context=CONTEXT, max_batch=2, dtype="float32",
                                       progress=False) as e:
        yield e


# -- the signature ------------------------------------------------------------------------------------------
def test_the_signature_is_a_plain_loops_router_counts_over_the_prompts_embeddings(engine):
    model, spec = engine.model, engine.spec
    ids = engine.tokenizer(PYTHON)["input_ids"]
    twin = np.zeros((spec.num_moe_layers, spec.num_experts))
    embedding = model.get_input_embeddings().weight
    for token in ids:
        x = embedding[token].double()
        for layer, path in enumerate(spec.experts_paths):
            block = model.get_submodule(path.rpartition(".")[0])
            norm = model.get_submodule(path.rpartition(".")[0].rpartition(".")[0]).post_attention_layernorm
            h = norm.weight.double() * x / torch.sqrt(x.pow(2).mean() + norm.variance_epsilon)
            scores = block.gate.weight.double() @ h  # [E]
            for e in scores.topk(spec.top_k).indices.tolist():
                twin[layer, e] += 1
    assert np.array_equal(RouterSignature(engine).prompt(ids), (twin / len(ids)).astype(np.float32))


# -- the choice ---------------------------------------------------------------------------------------------
def waiting_of(*signatures):
    return [SimpleNamespace(signature=np.asarray(s, dtype=np.float32), passed_over=0) for s in signatures]


def test_the_request_adding_fewest_experts_goes_first_and_the_oldest_seeds_an_empty_batch():
    a, b = [[1, 1, 0, 0]], [[0, 0, 1, 1]]  # one layer, 4 experts, k=2
    waiting = waiting_of(b, b, a)
    assert choose(waiting, 1, [np.asarray(a, dtype=np.float32)], 2, 8, 4) == ([2], 1)
    assert [w.passed_over for w in waiting] == [1, 1, 0]
    assert choose(waiting_of(b, a, b), 2, [], 2, 8, 4) == ([0, 2], 1)  # b seeds; then the other b
    assert choose(waiting_of(b, a, a), 2, [], 2, 8, 4) == ([0, 1], 0)  # ties: the older
    assert choose(waiting_of(b, a), 2, [np.asarray(a)], 2, 8, 4) == ([0, 1], 0)  # all fit: in order
    assert choose(waiting_of(b, b, b, a), 1, [np.asarray(a)], 2, 3, 4) == ([0], 0)  # a is past the window


def test_ageing_bound_a_request_that_is_always_worst_waits_at_most_max_skips_admissions():
    good, bad = [[1, 1, 1, 1, 0, 0, 0, 0]], [[0, 0, 0, 0, 1, 1, 1, 1]]  # k=4: bad adds 4, more than its urgency
    for max_skips in (0, 1, 3):
        waiting = waiting_of(bad, good, good)
        worst = waiting[0]
        admitted_ahead = 0
        while any(w is worst for w in waiting):
            (pick,), _ = choose(waiting, 1, [np.asarray(good, dtype=np.float32)], 4, 8, max_skips)
            if waiting.pop(pick) is not worst:
                admitted_ahead += 1
            waiting += waiting_of(good)  # always a better one behind it
        assert admitted_ahead == max_skips


def test_a_request_passed_over_takes_a_row_while_it_fits_nearly_as_well():
    a, c = [[1, 1, 0, 0]], [[1, 0, 1, 0]]  # c adds one expert to a running a; another a adds none
    waiting = waiting_of(c, a)
    assert choose(waiting, 1, [np.asarray(a, dtype=np.float32)], 2, 8, 4) == ([1], 1)  # fresh: the best fit
    waiting = waiting_of(c, a)
    waiting[0].passed_over = schedule.URGENCY  # once passed over: 1 - 1 ties 0, to the older
    assert choose(waiting, 1, [np.asarray(a, dtype=np.float32)], 2, 8, 4) == ([0], 0)


def test_likely_is_each_layers_top_k_scored_above_zero():
    assert likely(np.array([[1.0, 1.0, 3.0]]), 2).tolist() == [[True, False, True]]  # ties: the lower id
    assert likely(np.array([[0.0, 0.0, 3.0]]), 2).tolist() == [[False, False, True]]  # never an unscored one


# -- the scheduler ------------------------------------------------------------------------------------------
def admission_order(engine, scheduler, prompts):
    """Two long rows run; `prompts` wait; the second row is cancelled: the order the waiting ones start in."""
    first = scheduler.submit(PYTHON, max_new_tokens=LONG, ignore_eos=True)
    second = scheduler.submit(PYTHON2, max_new_tokens=LONG, ignore_eos=True)
    wait_for(lambda: first.generated_tokens and second.generated_tokens)
    waiting = [scheduler.submit(p, max_new_tokens=2, ignore_eos=True) for p in prompts]
    second.cancel()
    for h in waiting:
        h.result(timeout=120)
    first.cancel()
    return [waiting.index(h) for h in sorted(waiting, key=lambda h: h._started)]


def test_routing_admits_the_request_closest_to_the_running_row_first(engine):
    signer = RouterSignature(engine)
    k = engine.spec.top_k
    running = likely(signer.prompt(engine.tokenizer(PYTHON)["input_ids"]), k)
    added = [int((likely(signer.prompt(engine.tokenizer(p)["input_ids"]), k) & ~running).sum())
             for p in (SPANISH, PYTHON2)]
    assert added[0] > added[1]  # the Python prompt shares more of the running Python row's experts
    scheduler = Scheduler(engine, schedule="routing")
    try:
        assert admission_order(engine, scheduler, [SPANISH, PYTHON2])[0] == 1
        assert scheduler.totals.schedule_skips >= 1
    finally:
        scheduler.close()


def test_fifo_admits_in_order(engine):
    scheduler = Scheduler(engine, schedule="fifo")
    try:
        assert admission_order(engine, scheduler, [SPANISH, PYTHON2, "Le chat"]) == [0, 1, 2]
        assert scheduler.totals.schedule_skips == 0
    finally:
        scheduler.close()


def test_under_routing_each_request_gets_its_tokens_alone(engine):
    alone = [engine.generate(p, max_new_tokens=12, ignore_eos=True).token_ids for p in PROMPTS]
    scheduler = Scheduler(engine, schedule="routing", max_skips=1)
    try:
        handles = [scheduler.submit(p, max_new_tokens=12, ignore_eos=True) for p in PROMPTS]
        assert [h.result(timeout=300).token_ids for h in handles] == alone
        signer = RouterSignature(engine)  # each kept its prompt's through its decode steps (schedule.py says why)
        assert all(np.array_equal(h.signature, signer.prompt(h.prompt_ids)) for h in handles)
    finally:
        scheduler.close()


def test_bad_schedules_are_refused(engine):
    from offload_engine import GenerationInputError
    with pytest.raises(GenerationInputError, match="schedule must be"):
        Scheduler(engine, schedule="sjf")
    with pytest.raises(GenerationInputError, match="max_skips"):
        Scheduler(engine, schedule="routing", max_skips=-1)


def test_the_cli_flags_parse_and_a_bad_value_exits_2(capsys):
    import argparse

    from offload_engine.cli.main import main
    from offload_engine.cli.serve_cmd import SCHEDULES, add_parser

    assert SCHEDULES == schedule.SCHEDULES
    parser = argparse.ArgumentParser()
    serve = add_parser(parser.add_subparsers(), "serve")
    args = serve.parse_args(["--schedule", "routing", "--schedule-max-skips", "3"])
    assert (args.schedule, args.schedule_max_skips) == ("routing", 3)
    assert serve.parse_args([]).schedule == "fifo"
    from offload_engine.serving.scheduler import DEFAULT_MAX_QUEUE  # the CLI repeats it to keep --help light
    assert serve.parse_args([]).max_queue == DEFAULT_MAX_QUEUE
    for bad in (["--schedule", "lifo"], ["--schedule-max-skips", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            main(["serve", *bad])
        assert exit_.value.code == 2
        assert "--schedule" in capsys.readouterr().err
