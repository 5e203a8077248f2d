"""benchmarks/gpu_check.py's dry run on the CPU: every step it takes on a GPU, as far as the CPU allows."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check  # noqa: E402


def test_gpu_check_dry_run(tmp_path):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (tmp_path / "gpu_check.md").read_text().count("\n| ") == 1 + len(result["runs"])
    assert result["gpu_tests"]["exit_code"] == 0 and "skipped" in result["gpu_tests"]["summary"]
    layers = {"mixtral-8x7b": 2, "qwen3-30b-a3b": 4}
    # 2 models x 3 budgets x 2 configs x 2 host modes, none lost
    assert len(result["runs"]) == 24 and not [r for r in result["runs"] if "skipped" in r]
    for run in result["runs"]:
        assert run["host_syncs_per_token"] == layers[run["model"]] + 1  # a read per layer call and per step
        assert run["budget_bytes"] > 0 and 0 <= run["hit_rate"] <= 1
    slots = sorted({(r["model"], r["expert_slots"]) for r in result["runs"]})
    assert [s for m, s in slots if m == "qwen3-30b-a3b"][0] == 8  # the minimum: one token's top-8
