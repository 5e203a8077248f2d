"""The engine's threads: `threads=` / `--threads` on every device, the default from the usable cores, and
`cpu_threads` / `--cpu-threads` as the former name of the same setting."""

import pytest
import torch

from offload_engine import DEFAULT_MODEL, OffloadEngine
from offload_engine import run_config as rc
from offload_engine.cli.main import main
from offload_engine.errors import ConfigError
from offload_engine.run_config import RunConfig


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("affinity,logical,physical,expected", [
    (2, 2, 2, 1),     # this machine: two cores, one compute thread and one for the loader
    (1, 1, 1, 1),     # never fewer than one
    (16, 16, 16, 15),
    (16, 32, 16, 7),  # hyperthreads: 16 logical CPUs are 8 cores' worth
    (4, 64, 32, 1),   # a container given 4 hyperthreads of a big machine
])
def test_default_threads_follow_the_usable_cores(monkeypatch, affinity, logical, physical, expected):
    monkeypatch.setattr(rc.os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(rc.psutil, "cpu_count", lambda logical=True: logical_count if logical else physical)
    logical_count = logical
    assert rc.default_threads() == expected
    assert RunConfig.build(device="cpu").threads == expected


def test_threads_and_their_former_name():
    assert RunConfig.build(device="cpu", threads=3).threads == 3
    assert RunConfig.build(device="cpu", cpu_threads=3).threads == 3
    assert RunConfig.build(device="cpu", threads=3, cpu_threads=3).threads == 3
    with pytest.raises(ConfigError, match="disagree"):
        RunConfig.build(device="cpu", threads=2, cpu_threads=3)
    for bad in (0, -1, 4097, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="threads must be a whole number"):
            RunConfig.build(device="cpu", threads=bad)


def test_the_engine_sets_its_threads(restore_threads):
    torch.set_num_threads(2)
    with OffloadEngine.from_pretrained(DEFAULT_MODEL, expert_slots=16, threads=1, progress=False) as engine:
        assert engine.run.threads == 1 and torch.get_num_threads() == 1
        assert engine.generate("The", max_new_tokens=2).token_ids


def test_threads_flag_and_profile_key(tmp_path, capsys, restore_threads):
    assert main(["generate", "--expert-slots", "16", "--max-new-tokens", "2", "--threads", "1", "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    torch.set_num_threads(2)
    assert main(["generate", "--expert-slots", "16", "--max-new-tokens", "2", "--cpu-threads", "1", "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    profile = tmp_path / "p.toml"
    profile.write_text("cpu_threads = 1\nexpert_slots = 16\nmax_new_tokens = 2\n")
    torch.set_num_threads(2)
    assert main(["generate", "--profile", str(profile), "--quiet"]) == 0
    assert torch.get_num_threads() == 1
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:  # argparse's one-line error
        main(["generate", "--threads", "0", "--quiet"])
    assert exit.value.code == 2 and "--threads" in capsys.readouterr().err


@pytest.mark.parametrize("expert_mib,settings,expected", [
    (9, dict(device="cpu"), 4),                    # megabyte experts: every usable core, as llama.cpp takes them
    (0.2, dict(device="cpu"), 3),                  # the bundled model's: one core left, as before
    (9, dict(device="cpu", threads=2), 2),         # asked for: as asked
    (9, dict(device="cpu", cpu_threads=1), 1),
])
def test_the_default_takes_every_core_where_experts_are_large(monkeypatch, expert_mib, settings, expected):
    from types import SimpleNamespace

    from offload_engine import loading

    monkeypatch.setattr(rc.os, "sched_getaffinity", lambda pid: set(range(4)))
    monkeypatch.setattr(rc.psutil, "cpu_count", lambda logical=True: 4)
    monkeypatch.setattr(loading, "usable_cores", lambda: 4)
    inspected = SimpleNamespace(format=SimpleNamespace(expert_nbytes=lambda: int(expert_mib * 2**20)))
    run = RunConfig.build(**settings)
    assert loading.settle_threads(inspected, run).threads == expected


def test_a_gpu_run_keeps_a_core_for_its_other_threads(monkeypatch):
    from dataclasses import replace
    from types import SimpleNamespace

    from offload_engine import loading

    monkeypatch.setattr(loading, "usable_cores", lambda: 4)
    inspected = SimpleNamespace(format=SimpleNamespace(expert_nbytes=lambda: 64 << 20))
    run = replace(RunConfig.build(device="cpu"), device=torch.device("cuda"), threads=3, threads_asked=False)
    assert loading.settle_threads(inspected, run).threads == 3


def test_plan_shows_the_threads(capsys):
    import json

    assert main(["plan", "--threads", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == 1
    assert main(["plan", "--threads", "2"]) == 0
    assert "2 compute threads" in capsys.readouterr().out
