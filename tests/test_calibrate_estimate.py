"""calibrate writes a profile the engine and estimate read; estimate's model behaves as its formula says."""

import json
from pathlib import Path

import pytest

import tiny_models as tm
from offload_engine import ConfigError, OffloadEngine
from offload_engine.cli.main import main
from offload_engine.planning.estimate import strategies
from offload_engine.planning.hardware_profile import check_hardware, hardware_of, read_profile_hardware

PROFILES = sorted(Path(__file__).resolve().parents[1].glob("profiles/hw/*.toml"))


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    tm.save_checkpoint(tm.build_reference("mixtral"), path, "per_expert")
    return path


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_shipped_hardware_profiles_are_valid_and_marked_as_specifications(profile):
    table = read_profile_hardware(profile)
    assert table["source"] == "spec" and "spec-derived" in table["description"]
    hw = hardware_of(table, parallel=False)
    assert hw.parallel and hw.link_bytes_per_s < hw.device_read_bytes_per_s


def test_calibrate_writes_a_measured_profile_that_runs_and_estimates(mixtral_dir, tmp_path, capsys):
    out = tmp_path / "machine.toml"
    assert main(["calibrate", "--model", str(mixtral_dir), "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    table = read_profile_hardware(out)
    assert table["source"] == "measured" and table["device"] == "cpu" and table["date"]
    for key in ("link_bytes_per_s", "cpu_read_bytes_per_s", "cpu_flops", "device_flops", "layer_call_s"):
        assert table[key] > 0
    assert set(table["cpu_expert_s"]) == {"1", "4", "16", "64"} and table["model"]["resident_decode_s"] > 0
    capsys.readouterr()
    assert main(["estimate", "--model", str(mixtral_dir), "--device", "cpu", "--profile", str(out),
                 "--expert-slots", "4", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["decode_tokens_per_s"] > 0 and result["ttft_s"] > 0
    assert set(result["strategies"]) == {"stream-lru", "stream-predictive", "cpu", "auto"}
    engine = OffloadEngine.from_pretrained(mixtral_dir, device="cpu", expert_slots=4, cold_experts="auto",
                                           hardware=table, progress=False)
    assert engine.runtime.hardware.cpu_flops == pytest.approx(table["cpu_flops"])
    assert len(engine.generate([5, 6, 7], max_new_tokens=4).token_ids) == 4


def test_a_run_profile_may_carry_the_hardware_table(mixtral_dir, tmp_path, capsys):
    profile = tmp_path / "p.toml"
    profile.write_text('expert_slots = 4\ncold_experts = "auto"\n\n[hardware]\nlink_bytes_per_s = 1e9\n'
                       'cpu_read_bytes_per_s = 1e12\ncpu_flops = 1e15\ncpu_call_s = 1e-9\n')
    assert main(["plan", "--model", str(mixtral_dir), "--device", "cpu", "--profile", str(profile), "--json",
                 "--quiet"]) == 0  # flag defaults and the [hardware] table side by side
    assert json.loads(capsys.readouterr().out)["expert_slots"] == 4
    bad = tmp_path / "bad.toml"
    bad.write_text("[hardware]\nlink_bytes_per_s = -3\n")
    assert main(["plan", "--model", str(mixtral_dir), "--profile", str(bad), "--quiet"]) == 2
    assert "hardware.link_bytes_per_s must be a positive number" in capsys.readouterr().err


def test_estimate_without_a_machine_profile_is_one_line(mixtral_dir, capsys):
    assert main(["estimate", "--model", str(mixtral_dir), "--device", "cpu", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("error: estimate needs a machine")


def test_estimate_model_follows_its_formula():
    hw = check_hardware(dict(link_bytes_per_s=1e9, cpu_read_bytes_per_s=4e9, cpu_call_s=1e-6, parallel=False,
                             layer_call_s=1e-5, device_expert_s={"1": 2e-4}, cpu_expert_s={"1": 3e-4},
                             model={"name": "m", "expert_bytes": 10**6, "moe_layers": 4, "top_k": 2,
                                    "resident_decode_s": 0.01}), "test")
    common = dict(non_expert_bytes=10**7, expert_bytes=10**6, layers=4, top_k=2, model_name="m")
    low = {s.name: s for s in strategies(hw, {"lru": 0.5, "predictive": 0.6}, **common)}
    high = {s.name: s for s in strategies(hw, {"lru": 0.9, "predictive": 0.9}, **common)}
    # stream: 8 (1 - h) misses a token, each a 1 ms copy on top of the 10 ms resident step
    assert low["stream-lru"].step_s == pytest.approx(0.01 + 8 * 0.5 * 1e-3)
    # CPU experts without a GPU: nothing is copied, so every expert is a miss, costing the CPU's time less the
    # device's it replaces
    assert low["cpu"].step_s == pytest.approx(0.01 + 8 * (3e-4 - 2e-4))
    assert low["auto"].step_s <= min(low["cpu"].step_s, low["stream-predictive"].step_s) + 1e-12
    for name in low:
        assert high[name].decode_tokens_per_s >= low[name].decode_tokens_per_s  # more hits, never slower
        assert low[name].bound_tokens_per_s >= low[name].decode_tokens_per_s
    assert high["cpu"].decode_tokens_per_s == low["cpu"].decode_tokens_per_s  # no slots used: hit rate moot


@pytest.mark.parametrize("model, message", [
    ({"name": "m", "miss_s": "fast", "cpu_miss_s": 1e-4}, "hardware.model.miss_s must be a number"),
    ({"name": "m", "miss_s": -1e-4, "cpu_miss_s": 1e-4}, "hardware.model.miss_s must be a number"),
    ({"name": "m", "miss_s": 1e-4}, "miss_s and cpu_miss_s together"),
    ({"name": 3}, "hardware.model.name"),
    ("m", r"\[hardware.model\] must be a table"),
])
def test_a_damaged_model_table_is_a_config_error(model, message):
    with pytest.raises(ConfigError, match=message):
        check_hardware(dict(link_bytes_per_s=1e9, model=model), "test")


def test_calibrated_miss_costs_replace_the_formulas_for_their_model():
    """calibrate measures what a demand load and a CPU expert add to the engine's own layer call; the
    estimate uses them for that model (not for another)."""
    table = dict(link_bytes_per_s=1e9, cpu_read_bytes_per_s=4e9, cpu_call_s=1e-6, parallel=False, layer_call_s=1e-5,
                 device_expert_s={"1": 2e-4}, cpu_expert_s={"1": 3e-4},
                 model={"name": "m", "expert_bytes": 10**6, "moe_layers": 4, "top_k": 2, "resident_decode_s": 0.01,
                        "miss_s": 2e-3, "cpu_miss_s": 5e-4})
    hw = check_hardware(table, "test")
    common = dict(non_expert_bytes=10**7, expert_bytes=10**6, layers=4, top_k=2)
    got = {s.name: s for s in strategies(hw, {"lru": 0.5}, model_name="m", **common)}
    assert got["stream-lru"].step_s == pytest.approx(0.01 + 8 * 0.5 * 2e-3)
    assert got["cpu"].step_s == pytest.approx(0.01 + 8 * 5e-4)
    other = {s.name: s for s in strategies(hw, {"lru": 0.5}, model_name="another", **common)}
    assert other["stream-lru"].step_s != got["stream-lru"].step_s  # another model: the formulas
    bigger = {s.name: s for s in strategies(hw, {"lru": 0.5}, model_name="m", **{**common, "expert_bytes": 2 * 10**6})}
    assert bigger["stream-lru"].step_s != got["stream-lru"].step_s  # the same name, other experts: the formulas


def test_calibrate_measures_miss_costs_through_the_layer_call(mixtral_dir):
    from offload_engine.planning.calibration import _miss_costs

    engine = OffloadEngine.from_pretrained(mixtral_dir, device="cpu", expert_slots=4, progress=False)
    miss_s, cpu_miss_s = _miss_costs(engine)
    assert miss_s >= 0 and cpu_miss_s >= 0
    assert engine.runtime.cold_experts == "stream"  # restored
    fresh = OffloadEngine.from_pretrained(mixtral_dir, device="cpu", expert_slots=4, progress=False)
    assert engine.generate([5, 6, 7], max_new_tokens=6).token_ids == fresh.generate([5, 6, 7], max_new_tokens=6).token_ids


def test_calibrate_measures_the_direct_tiers_reads(mixtral_dir, tmp_path):
    """With --host-memory direct, calibrate times the tier's own O_DIRECT reads of a layer's experts, and that
    is the link a miss costs in the profile (what estimate and the cost model read)."""
    out = tmp_path / "direct.toml"
    assert main(["calibrate", "--model", str(mixtral_dir), "--device", "cpu", "--host-memory", "direct",
                 "--out", str(out), "--quiet"]) == 0
    table = read_profile_hardware(out)
    assert table["host_memory"] == "direct" and table["link"]["direct"] > 0
    assert table["link_bytes_per_s"] == pytest.approx(table["link"]["direct"], rel=1e-4)
