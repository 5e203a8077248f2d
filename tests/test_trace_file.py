"""The trace file: round trip, the FLAME file as it is, and one clear line for every malformation."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from offload_engine.errors import TraceFormatError
from offload_engine.tracing.trace_file import RoutingTrace, _convert_main, load_trace, save_trace

from consistency_traces import FLAME


def _arrays(**overrides):
    ids = np.array([[[[0, 1]], [[1, 2]], [[-1, -1]]], [[[2, 3]], [[-1, 0]], [[3, 1]]]], dtype=np.int16)
    arrays = {"expert_ids": ids, "num_experts": np.int64(4), "moe_layers": np.array([5])}
    arrays.update(overrides)
    return {k: v for k, v in arrays.items() if v is not None}


def _write(tmp_path, **overrides) -> Path:
    path = tmp_path / "t.npz"
    np.savez(path, **_arrays(**overrides))
    return path


def test_round_trip_keeps_every_field(tmp_path):
    a = _arrays()
    trace = RoutingTrace(expert_ids=a["expert_ids"], num_experts=4, moe_layers=a["moe_layers"],
                         scores=np.random.default_rng(0).random(a["expert_ids"].shape).astype(np.float32),
                         token_ids=np.array([[5, 6, -1], [7, 8, 9]], np.int32), domains=("code", "prose"),
                         model="tiny")
    save_trace(tmp_path / "out.npz", trace)
    back = load_trace(tmp_path / "out.npz")
    assert np.array_equal(back.expert_ids, trace.expert_ids) and back.expert_ids.dtype == np.int16
    assert back.num_experts == 4 and back.moe_layers.tolist() == [5]
    assert np.array_equal(back.scores, trace.scores) and np.array_equal(back.token_ids, trace.token_ids)
    assert back.domains == ("code", "prose") and back.model == "tiny"
    assert back.lengths().tolist() == [2, 3]  # sequence 0 is padded after token 1; -1 at (1, 1) is missing


@pytest.mark.parametrize("overrides, expected", [
    ({"expert_ids": None}, "no 'expert_ids'"),
    ({"moe_layers": None}, "no 'moe_layers'"),
    ({"num_experts": None}, "--num-experts"),
    ({"expert_ids": np.zeros((2, 3, 2), np.int16)}, "4 dims"),
    ({"expert_ids": np.zeros((1, 2, 1, 2), np.float32)}, "integer"),
    ({"expert_ids": np.full((1, 2, 1, 1), 4, np.int16)}, "num_experts is 4"),
    ({"expert_ids": np.full((1, 2, 1, 1), -2, np.int16)}, "holds -2"),
    ({"expert_ids": np.zeros((1, 2, 1, 2), np.int16)}, "repeats an expert"),
    ({"expert_ids": np.zeros((0, 2, 1, 1), np.int16)}, "empty axis"),
    ({"moe_layers": np.array([1, 2])}, "moe_layers must"),
    ({"num_experts": np.array([4, 4])}, "integer scalar"),
    ({"scores": np.zeros((2, 3, 1, 1), np.float32)}, "scores must"),
    ({"token_ids": np.zeros((2, 2), np.int32)}, "token_ids must"),
    ({"domains": np.array(["a"])}, "domains must"),
])
def test_malformed_files_fail_with_one_clear_line(tmp_path, overrides, expected):
    with pytest.raises(TraceFormatError) as err:
        load_trace(_write(tmp_path, **overrides))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_missing_file_and_not_an_npz(tmp_path):
    with pytest.raises(TraceFormatError, match="does not exist"):
        load_trace(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(TraceFormatError, match="not an .npz file") as caught:
        load_trace(tmp_path / "bad.npz")
    assert "pickle" not in str(caught.value)


def test_num_experts_given_and_stored_must_agree(tmp_path):
    path = _write(tmp_path)
    assert load_trace(path, num_experts=4).num_experts == 4
    with pytest.raises(TraceFormatError, match="num_experts=4 but 8"):
        load_trace(path, num_experts=8)


def test_wider_integer_ids_are_stored_as_int16(tmp_path):
    trace = load_trace(_write(tmp_path, expert_ids=_arrays()["expert_ids"].astype(np.int64)))
    assert trace.expert_ids.dtype == np.int16


def test_flame_trace_reads_as_is_and_converts(tmp_path):
    trace = load_trace(FLAME, num_experts=64)  # alias keys router_scores / moe_layer_ids
    assert trace.expert_ids.shape == (8, 256, 8, 6) and trace.moe_layers.tolist() == list(range(2, 10))
    assert trace.scores is not None and trace.token_ids is not None
    out = tmp_path / "flame.npz"
    assert _convert_main(["convert", str(FLAME), str(out), "--num-experts", "64"]) == 0
    again = load_trace(out)
    assert again.num_experts == 64 and np.array_equal(again.expert_ids, trace.expert_ids)


def test_convert_command_reports_errors_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "offload_engine.tracing.trace_file", "convert", str(tmp_path / "x.npz"),
                          str(tmp_path / "y.npz")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "does not exist" in res.stderr
