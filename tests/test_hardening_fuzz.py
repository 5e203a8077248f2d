"""Random bytes where the engine reads files, random values where the CLI reads flags: the only outcomes are
success, or exit code 2 with exactly one `error:` line (CLI) and an engine exception (Python); nothing but the
named output file ever changes."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tiny_models as tm
from offload_engine import OffloadEngine, OffloadEngineError
from offload_engine.cli.main import main
from offload_engine.tracing.trace_file import load_trace, save_trace
from test_bad_input import fingerprint  # name -> sha256 of the files of one folder
from test_hardening_cli import small_trace

ROOT = Path(__file__).resolve().parents[1]
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A per-expert and a sharded tiny checkpoint, and a trace; each example edits copies of them."""
    root = tmp_path_factory.mktemp("fuzz")
    model = tm.build_reference("mixtral")
    tm.save_checkpoint(model, root / "single", "per_expert")
    tm.save_checkpoint(model, root / "sharded", "sharded")
    save_trace(root / "trace.npz", small_trace())
    return root


def fresh_copy(workspace, name):
    dst = workspace / f"{name}-copy"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(workspace / name, dst)
    return dst


def tree_fingerprint(path) -> dict[str, str]:
    """Relative path -> content hash of every file below `path`."""
    return {str((d / name).relative_to(path)): digest for d in [path, *path.rglob("*")] if d.is_dir()
            for name, digest in fingerprint(d).items()}


def cli(capsys, *argv) -> int:
    """Run the CLI in-process; assert its outcome is success or one `error:` line and exit code 2."""
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code in (0, 2), (code, err)
    if code == 2:
        lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return code


def python_api(call):
    """Success or an engine exception with a one-line message; any other exception fails the test."""
    try:
        call()
    except OffloadEngineError as e:
        assert "\n" not in str(e), e


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                         max_size=4), max_leaves=20)


def load_with(workspace, capsys, checkpoint: str, name: str, data: bytes) -> None:
    """`data` as file `name` of a fresh copy of a checkpoint, loaded in Python and planned by the CLI: each
    succeeds or refuses it cleanly, and neither changes a file."""
    path = fresh_copy(workspace, checkpoint)
    (path / name).write_bytes(data)
    before = tree_fingerprint(path)
    python_api(lambda: OffloadEngine.from_pretrained(path, device="cpu", expert_slots=2, progress=False))
    cli(capsys, "plan", "--model", str(path), "--quiet")
    assert tree_fingerprint(path) == before


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_random_config_json(workspace, capsys, data):
    load_with(workspace, capsys, "single", "config.json", data)


@FUZZ
@given(data=st.data())
def test_random_config_fields(workspace, capsys, data):
    """A real config.json with one field set to any JSON value: deeper than random bytes get."""
    config = json.loads((workspace / "single" / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(config) + ["num_experts_per_tok", "head_dim", "text_config"]))
    config[key] = data.draw(json_values)
    load_with(workspace, capsys, "single", "config.json", json.dumps(config).encode())


@FUZZ
@given(header=st.binary(max_size=200) | st.text(max_size=200).map(str.encode), data_len=st.integers(0, 64),
       declared=st.none() | st.integers(0, 2**64 - 1))
def test_random_safetensors_header(workspace, capsys, header, data_len, declared):
    length = len(header) if declared is None else declared
    load_with(workspace, capsys, "single", "model.safetensors",
              struct.pack("<Q", length) + header + bytes(data_len))


@FUZZ
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps({"weight_map": v}).encode()))
def test_random_index(workspace, capsys, data):
    load_with(workspace, capsys, "sharded", "model.safetensors.index.json", data)


@FUZZ
@given(cut=st.integers(0, 5000), noise=st.binary(max_size=64), at=st.integers(0, 5000))
def test_random_trace_files(workspace, capsys, cut, noise, at):
    """Random bytes, and a real trace truncated or overwritten at random places."""
    original = (workspace / "trace.npz").read_bytes()
    data = bytearray(original[:cut] if cut < len(original) else original)
    data[at:at + len(noise)] = noise
    path = workspace / "fuzzed.npz"
    path.write_bytes(bytes(data))
    before = tree_fingerprint(workspace)
    try:
        load_trace(path)
    except OffloadEngineError as e:
        assert "\n" not in str(e)
    cli(capsys, "consistency", str(path), "--segment-lengths", "2,4", "--cache-ratios", "1")
    assert tree_fingerprint(workspace) == before


@FUZZ
@given(text=st.text(max_size=120))
def test_random_profiles(workspace, capsys, text):
    profile = workspace / "profile.toml"
    profile.write_text(text)
    before = tree_fingerprint(workspace / "single")
    cli(capsys, "plan", "--model", str(workspace / "single"), "--profile", str(profile), "--quiet")
    assert tree_fingerprint(workspace / "single") == before


flag_values = st.text(max_size=30) | st.from_regex(r"-?[0-9]{0,40}(\.[0-9]{0,5})?([eE]-?[0-9]{1,4})?[a-zA-Z]{0,3}",
                                                   fullmatch=True)


@FUZZ
@given(flag=st.sampled_from(["--memory-budget", "--expert-slots", "--max-context", "--max-batch", "--device",
                             "--dtype", "--host-memory", "--policy", "--predictor", "--prefetch-depth",
                             "--cold-experts", "--cpu-moe-layers", "--cpu-threads"]), value=flag_values)
def test_random_plan_flags(workspace, capsys, flag, value):
    before = tree_fingerprint(workspace / "single")
    cli(capsys, "plan", "--model", str(workspace / "single"), "--quiet", f"{flag}={value}")
    assert tree_fingerprint(workspace / "single") == before


@FUZZ
@given(flag=st.sampled_from(["--prompt-tokens", "--expert-slots", "--cold-experts", "--trace"]), value=flag_values)
def test_random_estimate_flags(workspace, capsys, flag, value):
    profile = ROOT / "profiles" / "hw" / "rtx3060-pcie4-ddr4x2.toml"
    before = tree_fingerprint(workspace / "single")
    cli(capsys, "estimate", "--model", str(workspace / "single"), "--profile", str(profile), "--quiet",
        f"{flag}={value}")
    assert tree_fingerprint(workspace / "single") == before


@FUZZ
@given(flag=st.sampled_from(["--slots", "--policies", "--predictor", "--num-experts"]), value=flag_values)
def test_random_simulate_flags(workspace, capsys, flag, value):
    before = tree_fingerprint(workspace)
    cli(capsys, "simulate", str(workspace / "trace.npz"), f"{flag}={value}")
    assert tree_fingerprint(workspace) == before


@FUZZ
@given(flag=st.sampled_from(["--segment-lengths", "--cache-ratios", "--num-experts", "--plot"]), value=flag_values)
def test_random_consistency_flags(workspace, capsys, monkeypatch, flag, value):
    out = workspace / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    monkeypatch.chdir(out)  # where a relative --plot lands
    before = tree_fingerprint(workspace)
    cli(capsys, "consistency", str(workspace / "trace.npz"), f"{flag}={value}")
    after = tree_fingerprint(workspace)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    named = flag == "--plot" and "\x00" not in value  # a NUL cannot be in a file name
    allowed = {os.path.relpath(os.path.realpath(out / value), workspace)} if named else set()
    assert changed <= allowed, changed
