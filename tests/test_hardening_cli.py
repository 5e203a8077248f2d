"""Hardening of the command line and of the files it reads and writes: light start-up, flags pointing to the
subcommand's help, one-line messages whatever the path holds, Ctrl-C, trace files, atomic outputs."""

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from consistency_traces import FLAME
from offload_engine import TraceFormatError
from offload_engine.atomic_write import atomic_output
from offload_engine.cli import consistency_cmd
from offload_engine.cli.main import main
from offload_engine.tracing.trace_file import RoutingTrace, _convert_main, load_trace, save_trace
from test_bad_input import assert_one_line_error, copy_of, good_dir, run_cli  # noqa: F401 (good_dir: a fixture)
from tiny_tokenizer import save_char_tokenizer

HEAVY = ("torch", "transformers", "numba", "matplotlib.pyplot")


def small_trace(num_experts=8, k=2) -> RoutingTrace:
    ids = np.stack([np.arange(k) + t % (num_experts - k + 1) for t in range(12)]).astype(np.int16)  # [T, k]
    return RoutingTrace(expert_ids=np.broadcast_to(ids[None, :, None, :], (2, 12, 2, k)).copy(),
                        num_experts=num_experts, moe_layers=np.arange(2))


@pytest.fixture
def trace_path(tmp_path):
    path = tmp_path / "t.npz"
    save_trace(path, small_trace())
    return path


def modules_loaded_by(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout.split()
    return {m for m in HEAVY if m in out}


# -- start-up ---------------------------------------------------------------------------------------------

def test_the_cli_module_and_the_consistency_parser_load_no_heavy_library():
    assert modules_loaded_by("import argparse, offload_engine.cli.main, offload_engine.cli.consistency_cmd as c\n"
                             "c.add_parser(argparse.ArgumentParser().add_subparsers(), 'consistency')") == set()


def test_building_the_whole_parser_loads_no_heavy_library():
    assert modules_loaded_by("from offload_engine.cli.main import build_parser\nbuild_parser()") == set()


# -- flags ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["consistency", "t.npz"], ["plan"], ["generate"]])
def test_an_unknown_flag_points_to_the_subcommands_help(capsys, command):
    code, err = run_cli(capsys, *command, "--no-such-flag", "3")
    assert_one_line_error(code, err, "--no-such-flag", f"see moe-offload {command[0]} --help")


@pytest.mark.parametrize("plot, needle", [(".", "is a directory"), ("out.xyz", "image format"),
                                          ("out", "image format"), ("no/such/dir/p.png", "does not exist"),
                                          ("p.pgf", "image format")])
def test_a_plot_that_cannot_be_written_is_refused_before_the_trace_is_read(tmp_path, capsys, plot, needle):
    os.chdir(tmp_path)
    code, err = run_cli(capsys, "consistency", "missing.npz", "--plot", plot)
    assert_one_line_error(code, err, needle, "--plot")  # not "missing.npz does not exist": nothing was read


@pytest.mark.parametrize("flags, needle", [
    (["--segment-lengths", "1" + "0" * 30], "segment length"),
    (["--segment-lengths", "²"], "segment length"),
    (["--cache-ratios", "1e400"], "out of range"),
    (["--cache-ratios", "1e99999999999"], "out of range"),
    (["--cache-ratios", "1/0"], "not a number"),
    (["--num-experts", "1" + "0" * 30], "--num-experts"),
    (["--num-experts", "٣"], "--num-experts"),
])
def test_numbers_at_the_edge_are_one_line(trace_path, capsys, flags, needle):
    assert_one_line_error(*run_cli(capsys, "consistency", str(trace_path), *flags), needle)


def test_a_cache_larger_than_the_group_is_refused_with_the_largest_ratio(trace_path, capsys):
    assert_one_line_error(*run_cli(capsys, "consistency", str(trace_path), "--cache-ratios", "1,100"),
                          "cache ratio 100", "at most E / k = 8/2")
    assert main(["consistency", str(trace_path), "--cache-ratios", "4", "--json"]) == 0  # E / k: every expert
    assert json.loads(capsys.readouterr().out)["model"]["lru"]["4"] > 0


def test_a_segment_longer_than_any_sequence_is_cheap_and_shown_as_na(trace_path, capsys):
    start = time.perf_counter()
    assert main(["consistency", str(trace_path), "--segment-lengths", "4,999999999999999999"]) == 0
    assert time.perf_counter() - start < 60
    srp = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("SRP"))
    assert srp.split()[-1] == "n/a"


def test_messages_stay_one_line_whatever_the_path_holds(tmp_path, capsys):
    weird = tmp_path / "a\nb\x1b[2J\u2028c.npz"
    code, err = run_cli(capsys, "consistency", str(weird))
    assert_one_line_error(code, err, "a\\nb\\x1b[2J\\u2028c.npz")
    code, err = run_cli(capsys, "plan", "--model", str(tmp_path / "x\ny"))
    assert_one_line_error(code, err, "x\\ny")
    code, err = run_cli(capsys, "consistency", "t.npz", "--bogus\nflag")
    assert_one_line_error(code, err, "--bogus\\nflag")


# -- outputs: the file is named, and written whole or not at all -------------------------------------------

def test_a_full_device_is_named(tmp_path, capsys):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    assert _convert_main(["convert", str(FLAME), "/dev/full", "--num-experts", "64"]) == 2
    assert capsys.readouterr().err == "error: No space left on device: /dev/full\n"


def test_generate_names_the_trace_output_it_cannot_write(good_dir, tmp_path, capsys):  # noqa: F811
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    path = copy_of(good_dir, tmp_path)
    save_char_tokenizer(path)
    code, err = run_cli(capsys, "generate", "--model", str(path), "--expert-slots", "2", "--max-new-tokens", "2",
                        "--trace-out", "/dev/full", "--quiet")
    assert_one_line_error(code, err, "No space left on device: /dev/full")


def test_a_failed_trace_write_keeps_the_earlier_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    out = tmp_path / "trace.npz"
    save_trace(out, small_trace())
    before = out.read_bytes()

    def savez_then_fail(f, **arrays):
        f.write(b"PK\x03\x04 half an archive")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", savez_then_fail)
    with pytest.raises(OSError) as err:
        save_trace(out, small_trace(num_experts=16))
    assert err.value.filename == str(out) and err.value.errno == errno.ENOSPC
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["trace.npz"]


def test_a_failed_plot_keeps_the_earlier_plot(trace_path, tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    out = tmp_path / "p.png"
    out.write_bytes(b"the earlier plot")

    def savefig_then_fail(self, f, **kwargs):
        f.write(b"\x89PNG half")
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(Figure, "savefig", savefig_then_fail)
    code, err = run_cli(capsys, "consistency", str(trace_path), "--plot", str(out))
    assert_one_line_error(code, err, f"Input/output error: {out}")
    assert out.read_bytes() == b"the earlier plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "t.npz"]


def test_an_output_through_a_link_replaces_the_file_and_keeps_the_link_and_its_mode(tmp_path):
    target = tmp_path / "real.npz"
    target.write_bytes(b"old")
    target.chmod(0o640)
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    save_trace(link, small_trace())
    assert link.is_symlink() and load_trace(link).num_experts == 8
    assert target.stat().st_mode & 0o777 == 0o640


def test_an_output_that_is_a_stream_is_written_directly():
    with atomic_output("/dev/null") as f:  # renaming over a device would replace the device
        f.write(b"x")
    assert os.path.exists("/dev/null") and not os.path.isfile("/dev/null")


# -- trace files --------------------------------------------------------------------------------------------

def npy_bytes(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def write_npz(path, members: dict[str, bytes], compression=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def good_members(**extra) -> dict[str, bytes]:
    ids = np.array([[[[0, 1]], [[1, 2]]]], dtype=np.int16)
    members = {"expert_ids.npy": npy_bytes(ids), "num_experts.npy": npy_bytes(np.int64(4)),
               "moe_layers.npy": npy_bytes(np.array([0]))}
    members.update(extra)
    return members


def forged_header(shape) -> bytes:
    """A valid .npy header declaring `shape` of int16, followed by 4 bytes of data."""
    header = {"descr": "<i2", "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + bytes(4)


@pytest.mark.parametrize("members, needle", [
    (good_members(**{"notes.txt": b"hello"}), "'notes.txt' is not a .npy array"),
    (good_members(**{"expert_ids.npy": forged_header((1 << 20, 1 << 20, 1 << 10, 2))}), "declares shape"),
    (good_members(**{"scores.npy": npy_bytes(np.array([{"a": 1}], dtype=object))}), "pickled Python objects"),
    (good_members(**{"moe_layers.npy": npy_bytes(np.array(["a"]))}), "moe_layers must be an integer array"),
    (good_members(**{"expert_ids.npy": npy_bytes(np.zeros((1, 2, 1, 2), np.float32))}), "integer array"),
    (good_members(**{"num_experts.npy": npy_bytes(np.array([4, 4]))}), "integer scalar"),
    (good_members(**{"router_scores.npy": npy_bytes(np.zeros((1, 2, 1, 2), np.float32)),
                     "scores.npy": npy_bytes(np.zeros((1, 2, 1, 2), np.float32))}), "twice"),
    (good_members(**{"expert_ids.npy": b"\x93NUMPY garbage"}), "version"),
    (good_members(**{"expert_ids.npy": b"no magic"}), "not a readable .npz trace"),
])
def test_malformed_trace_files_are_one_line(tmp_path, members, needle):
    with pytest.raises(TraceFormatError, match=needle) as err:
        load_trace(write_npz(tmp_path / "t.npz", members))
    assert "\n" not in str(err.value)


def test_corrupt_compressed_data_is_one_line(tmp_path):
    path = write_npz(tmp_path / "t.npz", good_members())
    data = bytearray(path.read_bytes())
    start = data.index(b"expert_ids.npy") + len("expert_ids.npy")
    data[start + 10: start + 40] = b"\xff" * 30  # inside the deflate stream
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="not a readable .npz trace"):
        load_trace(path)


def test_a_member_claiming_more_than_deflate_can_expand_to_is_refused_before_reading(tmp_path):
    path = write_npz(tmp_path / "t.npz", good_members())
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02", 0, data.rindex(b"expert_ids.npy") + 1)  # its central directory entry
    data[central + 24: central + 28] = (2**32 - 1).to_bytes(4, "little")  # uncompressed size: 4 GiB
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError, match="compressed"):
        load_trace(path)


def test_other_compressions_and_non_files_are_one_line(tmp_path):
    with pytest.raises(TraceFormatError, match="zip method"):
        load_trace(write_npz(tmp_path / "b.npz", good_members(), zipfile.ZIP_BZIP2))
    with pytest.raises(TraceFormatError, match="not a regular file"):
        load_trace(tmp_path)
    (tmp_path / "plain.npz").write_bytes(b"not a zip at all")
    with pytest.raises(TraceFormatError, match="not a zip archive"):
        load_trace(tmp_path / "plain.npz")


# -- profiles, interrupts -----------------------------------------------------------------------------------

def test_a_profile_that_is_not_utf8_is_one_line(tmp_path, capsys):
    profile = tmp_path / "p.toml"
    profile.write_bytes(b"device = \"\xff\"\n")
    assert_one_line_error(*run_cli(capsys, "plan", "--profile", str(profile)), "p.toml")


def test_an_interrupt_is_one_word_and_exit_130(trace_path, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(consistency_cmd, "run", interrupted)
    assert main(["consistency", str(trace_path)]) == 130
    assert capsys.readouterr().err == "interrupted\n"


@pytest.mark.parametrize("delay", [0.5, 1.5, 4.0])
def test_ctrl_c_at_any_point_is_one_word_and_exit_130(delay):
    """During the imports of torch and transformers (seconds), while loading, while generating."""
    proc = subprocess.Popen([sys.executable, "-m", "offload_engine.cli.main", "generate", "--quiet",
                             "--max-new-tokens", "1000", "--ignore-eos"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err == "interrupted\n", (proc.returncode, err[-2000:])
