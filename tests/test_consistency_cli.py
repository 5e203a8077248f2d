"""`moe-offload consistency`: the table, the --json schema, the plot, and bad flags as one line + exit 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from offload_engine.cli.main import main
from offload_engine.tracing.trace_file import save_trace

from consistency_traces import random_trace


@pytest.fixture(scope="module")
def trace_path(tmp_path_factory):
    trace = random_trace(np.random.default_rng(7), max_n=3, max_t=40, max_l=3, max_k=2, max_e=8)
    path = tmp_path_factory.mktemp("trace") / "t.npz"
    save_trace(path, trace)
    return path, trace


def test_table_lists_every_figure(trace_path, capsys):
    path, _ = trace_path
    assert main(["consistency", str(path), "--segment-lengths", "4,16", "--cache-ratios", "0.5,2"]) == 0
    out = capsys.readouterr().out
    for label in ("SRP", "rho_hat", "SCH hit rate m=4", "SCH hit rate m=16", "LRU hit rate", "LFU hit rate",
                  "Belady hit rate", "Load balance"):
        assert label in out
    assert "Layer 0" not in out


def test_json_schema_keys_as_written(trace_path, capsys):
    path, trace = trace_path
    assert main(["consistency", str(path), "--segment-lengths", "04,16", "--cache-ratios", "0.50,2",
                 "--per-layer", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"model", "layers", "load_balance", "domain_specialisation", "vocabulary_specialisation"}
    from offload_engine.tracing.consistency import load_balance

    assert doc["load_balance"] == {"m": 16, "std": pytest.approx(load_balance(trace, 16).std)}
    assert set(doc["layers"]) == {str(i) for i in range(trace.num_layers)}
    for group in [doc["model"], *doc["layers"].values()]:
        assert set(group) == {"srp", "rho_hat", "sch", "lru", "lfu", "belady"}
        assert set(group["srp"]) == set(group["rho_hat"]) == set(group["sch"]) == {"04", "16"}
        assert all(set(row) == {"0.50", "2"} for row in group["sch"].values())
        assert set(group["lru"]) == set(group["lfu"]) == set(group["belady"]) == {"0.50", "2"}
        assert all(0.0 <= x <= 1.0 for x in group["srp"].values())


def test_plot_is_written(trace_path, tmp_path, capsys):
    path, _ = trace_path
    out = tmp_path / "out.png"
    assert main(["consistency", str(path), "--segment-lengths", "2,8", "--per-layer", "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("flags", [["--segment-lengths", "0"], ["--segment-lengths", "4,x"],
                                   ["--segment-lengths", "4,4"], ["--cache-ratios=-1"], ["--cache-ratios", "0"],
                                   ["--cache-ratios", "two"], ["--cache-ratios", "nan"], ["--num-experts", "0"]])
def test_bad_flags_exit_2(trace_path, flags, capsys):
    path, _ = trace_path
    with pytest.raises(SystemExit) as exc:
        main(["consistency", str(path), *flags])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_bad_trace_is_one_line_exit_2(tmp_path, capsys):
    assert main(["consistency", str(tmp_path / "missing.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_no_traceback_from_the_installed_entry_point(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    res = subprocess.run([sys.executable, "-m", "offload_engine.cli.main", "consistency", str(bad)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and res.stderr.count("\n") == 1


def test_segment_longer_than_every_sequence_shows_na(tmp_path, capsys):
    """m > T: no windows, so the table says n/a rather than an SRP of 0."""
    import numpy as np

    from offload_engine.cli.main import main
    from offload_engine.tracing.trace_file import RoutingTrace, save_trace

    ids = np.random.default_rng(0).integers(0, 8, size=(2, 10, 2, 2)).astype(np.int16)
    ids[..., 1] = (ids[..., 0] + 1) % 8  # two distinct experts per token
    save_trace(tmp_path / "t.npz", RoutingTrace(expert_ids=ids, num_experts=8, moe_layers=np.arange(2)))
    assert main(["consistency", str(tmp_path / "t.npz"), "--segment-lengths", "4,64", "--cache-ratios", "1"]) == 0
    srp_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("SRP"))
    assert srp_line.split()[-1] == "n/a" and srp_line.split()[-2] != "n/a"
