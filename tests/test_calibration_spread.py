"""calibrate repeats each measurement, records how much the repetitions disagree, and says so when a busy
machine made them disagree: checked with injected clocks (no real timing is asserted)."""

import random

import pytest

import tiny_models as tm
from offload_engine import OffloadEngine
from offload_engine.cli.main import main
from offload_engine.planning import calibration
from offload_engine.planning.calibration import BUSY_SPREAD, REPEATS, ROUNDS, Timing, busy_figures, calibrate
from offload_engine.planning.hardware_profile import read_profile_hardware

SPREADS = ("link_spread", "cpu_expert_spread", "device_expert_spread")


class Clock:
    """A clock whose every reading is `step()` seconds after the previous one."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step()
        return self.now


def quiet():
    return Clock(lambda: 2e-4)


def busy(seed=0):
    """Readings of 0.1 ms to 20 ms, as three runs of one machine gave 205 us, 15,974 us and 16,239 us."""
    rng = random.Random(seed)
    return Clock(lambda: 10 ** rng.uniform(-4, -1.7))


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    tm.save_checkpoint(tm.build_reference("mixtral"), path, "per_expert")
    return OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", expert_slots=16, progress=False)


def test_spread_ignores_an_outlier_and_sees_a_busy_spell():
    assert Timing((1.0,) * 14 + (50.0,)).spread == 0  # one interrupted reading of fifteen
    assert Timing((1e-4,) * 10 + (1.6e-2,) * 5).spread > BUSY_SPREAD  # a third of them slowed down


def test_a_quiet_clock_gives_no_spread_and_keeps_every_figure(engine):
    table = calibrate(engine, progress=False, clock=quiet())
    assert busy_figures(table) == [] and calibration.busy_note(table) == ""
    for name in SPREADS:
        assert table[name] and all(v == 0 for v in table[name].values())
    assert set(table["cpu_expert_spread"]) == set(table["cpu_expert_s"]) == {"1", "4", "16", "64"}
    assert set(table["link_spread"]) <= set(table["link"])
    assert table["model"]["miss_spread"] == table["model"]["cpu_miss_spread"] == 0
    # each figure is the median of its readings: 2e-4 s per clock reading, so every call took 2e-4 s
    assert table["cpu_expert_s"]["1"] == pytest.approx(2e-4) and table["device_expert_s"]["64"] == pytest.approx(2e-4)


def test_each_figure_is_timed_in_rounds(engine, monkeypatch):
    calls = []
    real = calibration._timed
    monkeypatch.setattr(calibration, "_timed", lambda fn, device, clock, repeats=REPEATS:
                        calls.append((fn, repeats)) or real(fn, device, clock, repeats))
    calibrate(engine, progress=False, clock=quiet())
    in_rounds = [fn for fn, repeats in calls if repeats == REPEATS]  # copies, and experts at each token count
    assert len(set(in_rounds)) >= 2 + 2 * 4 and all(in_rounds.count(fn) == ROUNDS for fn in in_rounds)
    assert [repeats for _, repeats in calls if repeats != REPEATS] == [REPEATS * ROUNDS] * 3  # the miss costs


def test_noisy_readings_are_recorded_and_named(engine):
    table = calibrate(engine, progress=False, clock=busy())
    found = dict(busy_figures(table))
    assert "device_expert_spread.1" in found and "cpu_expert_spread.1" in found and "model.miss_spread" in found
    assert all(v > BUSY_SPREAD for v in found.values())
    assert "the machine was busy" in calibration.busy_note(table)


def _calibrate_cli(monkeypatch, capsys, tmp_path, model_dir, clock):
    real = calibration.calibrate
    monkeypatch.setattr(calibration, "calibrate", lambda engine, progress=True: real(engine, progress, clock=clock))
    out = tmp_path / "machine.toml"
    code = main(["calibrate", "--model", str(model_dir), "--device", "cpu", "--out", str(out), "--quiet"])
    return code, capsys.readouterr().err.strip().splitlines(), out


def test_calibrate_warns_in_one_line_when_the_machine_was_busy(engine, monkeypatch, capsys, tmp_path):
    code, err, out = _calibrate_cli(monkeypatch, capsys, tmp_path, engine.directory, busy(1))
    assert code == 0 and len(err) == 1 and err[0].startswith("warning: the machine was busy")
    assert "rerun calibrate" in err[0]
    table = read_profile_hardware(out)  # written all the same, with its spreads, and the engine reads it
    assert busy_figures(table) and table["cpu_expert_s"]["1"] > 0
    assert "# Caution: the machine was busy" in out.read_text()


def test_calibrate_on_a_quiet_machine_says_nothing_more(engine, monkeypatch, capsys, tmp_path):
    code, err, out = _calibrate_cli(monkeypatch, capsys, tmp_path, engine.directory, quiet())
    assert code == 0 and err == []
    assert "Caution" not in out.read_text() and read_profile_hardware(out)["device_expert_spread"]["1"] == 0
