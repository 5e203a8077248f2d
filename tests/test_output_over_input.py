"""No command writes over what it reads: the model's files, a profile, a predictor, a trace or a corpus file
given as the output path are refused with one line and exit code 2, and stay byte for byte as they were."""

import hashlib
import os

import pytest

from test_bad_input import assert_one_line_error, copy_of, fingerprint, good_dir, run_cli  # noqa: F401 (a fixture)
from test_hardening_cli import small_trace
from offload_engine.tracing.trace_file import save_trace
from tiny_tokenizer import save_char_tokenizer


@pytest.fixture
def model(good_dir, tmp_path):
    path = copy_of(good_dir, tmp_path)
    save_char_tokenizer(path)
    return path


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refused(capsys, path, *argv, needle="which this command reads"):
    """The command exits 2 with one line naming the path, and `path` (a file or a folder) is unchanged."""
    before = fingerprint(path) if path.is_dir() else digest(path)
    code, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, needle, str(path))
    assert (fingerprint(path) if path.is_dir() else digest(path)) == before


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_generate_does_not_write_its_trace_over_a_file_of_the_model(model, capsys, name):
    refused(capsys, model, "generate", "--model", str(model), "--max-new-tokens", "2", "--quiet",
            "--trace-out", str(model / name))


def test_a_link_to_the_checkpoint_is_the_checkpoint(model, tmp_path, capsys):
    link = tmp_path / "trace.npz"
    link.symlink_to(model / "model.safetensors")
    refused(capsys, model, "generate", "--model", str(model), "--quiet", "--trace-out", str(link))
    hard = tmp_path / "hard.npz"
    os.link(model / "model.safetensors", hard)
    refused(capsys, model, "generate", "--model", str(model), "--quiet", "--trace-out", str(hard))


def test_generate_does_not_write_over_its_profile(model, tmp_path, capsys):
    profile = tmp_path / "p.toml"
    profile.write_text("max_new_tokens = 2\n")
    refused(capsys, profile, "generate", "--model", str(model), "--profile", str(profile), "--quiet",
            "--trace-out", str(profile))


def test_generate_does_not_write_over_the_predictor_it_runs(model, tmp_path, capsys):
    from offload_engine.foresight.predictors.learned import TrainSettings, train_learned
    from test_learned_predictor import synthetic

    ids, hidden, experts = synthetic(N=2, T=8, L=2, E=8, H=32)
    train_learned(ids, hidden, experts, TrainSettings(max_depth=1, epochs=1), progress=False).save(tmp_path / "p")
    refused(capsys, tmp_path / "p", "generate", "--model", str(model), "--predictor", str(tmp_path / "p"),
            "--quiet", "--trace-out", str(tmp_path / "p" / "predictor.safetensors"))


def test_trace_does_not_write_over_the_model_or_its_corpus(model, tmp_path, capsys):
    corpus = tmp_path / "a.txt"
    corpus.write_text("some text to trace " * 20)
    common = ["trace", "--model", str(model), "--input", str(corpus), "--seq-len", "8", "--quiet"]
    refused(capsys, model, *common, "--out", str(model / "config.json"))
    refused(capsys, corpus, *common, "--out", str(corpus))


def test_consistency_and_simulate_do_not_plot_over_their_trace(tmp_path, capsys):
    trace = tmp_path / "t.png"  # a trace named like an image, so that --plot takes the name
    save_trace(trace, small_trace())
    refused(capsys, trace, "consistency", str(trace), "--plot", str(trace))
    refused(capsys, trace, "simulate", str(trace), "--slots", "2", "--plot", str(trace))


def test_predictor_train_does_not_write_over_its_trace(tmp_path, capsys):
    folder = tmp_path / "out"
    folder.mkdir()
    save_trace(folder / "predictor.json", small_trace())
    refused(capsys, folder / "predictor.json", "predictor", "train", "--trace", str(folder / "predictor.json"),
            "--out", str(folder), "--quiet")


def test_calibrate_does_not_write_its_profile_over_the_model(model, capsys):
    refused(capsys, model, "calibrate", "--device", "cpu", "--model", str(model), "--quiet",
            "--out", str(model / "config.json"))


def test_an_output_beside_the_inputs_is_written(model, tmp_path, capsys):
    """The check refuses what is read, not its neighbours: a trace next to the model's folder is written."""
    out = tmp_path / "trace.npz"
    assert run_cli(capsys, "generate", "--model", str(model), "--max-new-tokens", "2", "--quiet",
                   "--trace-out", str(out))[0] == 0
    assert out.stat().st_size > 0
