"""`moe-offload export-plan`: a trace's counts equal a plain count and load as SGLang's recorder file; our
budget becomes llama-server, vLLM and kTransformers flags with the numbers worked by hand; bad input is one
line and exit code 2, and nothing the command reads is written over."""

import contextlib
import io
import json
import re

import numpy as np
import pytest
import torch

import tiny_models as tm
from consistency_traces import random_trace
from offload_engine import DEFAULT_MODEL, RoutingTrace, save_trace
from offload_engine.cli.main import main
from offload_engine.export_plan import (
    SGLANG_KEYS,
    PlanFigures,
    activation_counts,
    launch_lines,
    most_activated,
    translate,
)
from test_bad_input import assert_one_line_error, copy_of, fingerprint, run_cli

DEMO = DEFAULT_MODEL.parents[1] / "profiles" / "demo.toml"
# `moe-offload plan --profile profiles/demo.toml --json` on the CPU: the bundled model at 66.7 MiB
DEMO_FIGURES = PlanFigures(
    model="m", device="cpu", dtype="bfloat16", budget_bytes=69940019,
    fixed_bytes=10854400 + 1572864 + 44892160,  # non-expert weights + KV cache + working memory
    mapped_bytes=0, expert_bytes=196608, expert_slots=64, experts_per_layer=32, top_k=4,
    moe_layers=tuple(range(6)), num_layers=6)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tm.save_checkpoint(tm.build_reference("mixtral"), path, "per_expert")
    return path


def plain_counts(trace: RoutingTrace) -> np.ndarray:
    counts = np.zeros((trace.num_layers, trace.num_experts), dtype=np.int64)
    for seq in trace.expert_ids:
        for token in seq:
            for layer, experts in enumerate(token):
                for expert in experts:
                    if expert >= 0:
                        counts[layer, expert] += 1
    return counts


def trace_of_bundled_model(seed=0, model="default_model") -> RoutingTrace:
    rng = np.random.default_rng(seed)
    ids = np.array([[[rng.permutation(32)[:4] for _ in range(6)] for _ in range(10)] for _ in range(2)], np.int16)
    return RoutingTrace(expert_ids=ids, num_experts=32, moe_layers=np.arange(6), model=model)


def export(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["export-plan", *map(str, argv)])
    return code, out.getvalue()


def test_counts_equal_a_plain_loop():
    rng = np.random.default_rng(7)
    for _ in range(50):
        trace = random_trace(rng)  # padding and missing cells included
        assert np.array_equal(activation_counts(trace.expert_ids, trace.num_experts), plain_counts(trace))


def test_the_counts_file_is_sglangs_recorder_dump(tmp_path, capsys):
    """A trace without a model name: counts only, in SGLang's layout (rows by model layer, dense ones zero)."""
    trace = random_trace(np.random.default_rng(3), max_l=4, max_e=9)  # moe_layers 1..L: layer 0 is dense
    save_trace(tmp_path / "t.npz", trace)
    code, out = export(tmp_path / "t.npz", "--out", tmp_path / "out")
    assert code == 0
    assert "pass --model DIR for the launch lines" in capsys.readouterr().err
    record = torch.load(tmp_path / "out" / "expert_distribution.pt", weights_only=True)
    assert tuple(record) == SGLANG_KEYS and record["rank"] == 0
    assert record["average_utilization_rate_over_window"] is None
    logical = record["logical_count"]
    assert logical.dtype == torch.int32 and logical.shape == (1, trace.num_layers + 1, trace.num_experts)
    assert not logical[0, 0].any()
    assert np.array_equal(logical[0, 1:].numpy(), plain_counts(trace))
    rows = (tmp_path / "out" / "counts.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["layer", "expert_0"]
    assert np.array_equal(np.array([r.split(",") for r in rows[1:]], dtype=np.int64)[:, 1:], plain_counts(trace))
    assert rows == out.splitlines()[1:]  # printed as written
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["counts.csv", "expert_distribution.pt"]


def test_the_demo_budget_by_hand():
    """66.7 MiB = 69940019 B; fixed 57319424 B; 12620595 B left hold 2 layers of 32 x 196608 B = 6291456 B; the
    weights need 57319424 + 192 x 196608 - 69940019 = 25128141 B more = 0.0234 GiB -> 0.03; 64 slots / 6 = 10."""
    t = translate(DEMO_FIGURES)
    assert (t.gpu_moe_layers, t.cpu_blocks, t.n_cpu_moe, t.ngl) == (2, (0, 1, 2, 3), 4, 99)
    assert (t.offload_bytes, t.cpu_offload_gib, t.kt_gpu_experts_per_layer) == (25128141, "0.03", 10)
    assert t.override_tensor == r"blk\.(0|1|2|3)\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU"
    rule = re.compile(t.override_tensor.split("=")[0])  # llama.cpp matches it with regex_search
    assert rule.search("blk.3.ffn_gate_exps.weight") and rule.search("blk.0.ffn_gate_up_exps.weight")
    assert not any(rule.search(name) for name in ("blk.4.ffn_up_exps.weight", "blk.13.ffn_up_exps.weight",
                                                    "blk.2.ffn_up_shexp.weight", "blk.1.attn_q.weight"))


def test_leading_dense_layers_count_as_blocks():
    """llama.cpp's --n-cpu-moe counts blocks, dense ones included: MoE layers 3..8 with 4 left on the CPU are
    blocks 0..6."""
    fig = PlanFigures(**{**DEMO_FIGURES.__dict__, "moe_layers": tuple(range(3, 9)), "num_layers": 9})
    t = translate(fig)
    assert t.cpu_blocks == (3, 4, 5, 6) and t.n_cpu_moe == 7


def test_a_budget_that_holds_everything_offloads_nothing():
    fig = PlanFigures(**{**DEMO_FIGURES.__dict__, "budget_bytes": 10**9, "expert_slots": 192})
    t = translate(fig)
    assert (t.n_cpu_moe, t.override_tensor, t.offload_bytes, t.kt_gpu_experts_per_layer) == (0, None, 0, 32)
    commands = [line.command for line in launch_lines(fig, t, None)]
    assert not any("--n-cpu-moe" in c or "--cpu-offload-gb" in c or " -ot " in c for c in commands)


def test_most_activated():
    assert most_activated(np.array([[0, 3, 1, 3], [5, 0, 0, 1]]), 2) == [[1, 3], [0, 3]]


def test_launch_lines_of_the_demo(tmp_path, capsys):
    """The bundled model's trace at the demo budget: the figures are `plan --json`'s and the lines carry the
    numbers worked by hand above."""
    save_trace(tmp_path / "t.npz", trace_of_bundled_model())
    code, _ = export(tmp_path / "t.npz", "--profile", DEMO, "--out", tmp_path / "out")
    assert code == 0
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert main(["plan", "--profile", str(DEMO), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert plan["budget_bytes"] == ours["budget_bytes"] == DEMO_FIGURES.budget_bytes
    assert plan["fixed_bytes"] == ours["non_expert_bytes"] + ours["kv_cache_bytes"] + ours["working_bytes"]
    assert (plan["expert_slots"], plan["total_experts"]) == (ours["expert_slots"], ours["total_experts"])
    expected = translate(PlanFigures(**{**DEMO_FIGURES.__dict__, "fixed_bytes": plan["fixed_bytes"]}))
    launch = (tmp_path / "out" / "launch.md").read_text()
    pt = tmp_path / "out" / "expert_distribution.pt"
    for flag in (f"-ngl 99 --n-cpu-moe {expected.n_cpu_moe}", f"-ot '{expected.override_tensor}'",
                 f"--cpu-offload-gb {expected.cpu_offload_gib} --cpu-offload-params experts",
                 f"--kt-num-gpu-experts {expected.kt_gpu_experts_per_layer}",
                 f"--kt-expert-placement-strategy frequency --init-expert-location {pt}",
                 f"--model-path {DEFAULT_MODEL}"):
        assert flag in launch, flag
    assert "--n-cpu-moe 4" in launch and "--kt-num-gpu-experts 10" in launch  # the demo as worked by hand
    logical = torch.load(pt, weights_only=True)["logical_count"]
    assert logical.shape == (1, 6, 32)
    assert plan["ktransformers"]["most_activated_by_layer"] == most_activated(logical[0].numpy(), 10)


def test_a_model_directory_gives_launch_lines_and_no_counts(good_dir, tmp_path):
    code, out = export(good_dir, "--expert-slots", "4", "--out", tmp_path / "out")
    assert code == 0 and "--kt-num-gpu-experts" in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["launch.md", "plan.json"]


@pytest.mark.parametrize("case", ["missing", "not a trace", "out is a file", "two models", "wrong model"])
def test_bad_input_is_one_line(case, good_dir, tmp_path, capsys):
    trace = tmp_path / "t.npz"
    save_trace(trace, trace_of_bundled_model(model="elsewhere"))
    text = tmp_path / "notes.txt"
    text.write_text("not a trace")
    argv, needle = {
        "missing": ([tmp_path / "nope.npz", "--out", tmp_path / "o"], "does not exist"),
        "not a trace": ([text, "--out", tmp_path / "o"], "not an .npz file"),
        "out is a file": ([trace, "--out", text], "is a file"),
        "two models": ([good_dir, "--model", good_dir, "--out", tmp_path / "o"], "give the model once"),
        "wrong model": ([trace, "--model", good_dir, "--out", tmp_path / "o"], "was not recorded from"),
    }[case]
    code, err = run_cli(capsys, "export-plan", *map(str, argv))
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists() and text.read_text() == "not a trace"


def test_nothing_read_is_written_over(good_dir, tmp_path, capsys):
    model = copy_of(good_dir, tmp_path)
    trace = tmp_path / "t.npz"
    save_trace(trace, trace_of_bundled_model())
    before, trace_bytes = fingerprint(model), trace.read_bytes()
    for argv in ([model, "--out", model], [model, "--out", model / "export"], [trace, "--out", trace],
                 [model, "--trace", trace, "--out", trace], [trace, "--model", model, "--out", model / "x"]):
        code, err = run_cli(capsys, "export-plan", *map(str, argv))
        assert_one_line_error(code, err, "which this command reads")
    (tmp_path / "link").symlink_to(model)
    code, err = run_cli(capsys, "export-plan", str(trace), "--model", str(model), "--out", str(tmp_path / "link" / "x"))
    assert_one_line_error(code, err, "which this command reads")  # through a link into the model
    assert fingerprint(model) == before and trace.read_bytes() == trace_bytes
    assert not (model / "export").exists() and not (model / "x").exists()
