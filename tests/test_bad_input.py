"""Bad input: one clear line, exit code 2, no traceback, an engine exception in Python, files untouched."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as tm
from offload_engine import (
    CheckpointError,
    ConfigError,
    GenerationInputError,
    MemoryBudgetError,
    OffloadEngine,
    OffloadEngineError,
    UnsupportedModelError,
)
from offload_engine.cli.main import main


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    tm.save_checkpoint(tm.build_reference("mixtral"), path, "per_expert")
    return path


def copy_of(good_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(good_dir, dst)
    return dst


def fingerprint(path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def run_cli(capsys, *argv):
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own exit on a malformed flag
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err if line.strip() and "%|" not in line]  # progress bars are not errors
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in "\n".join(err)
    for needle in needles:
        assert needle in lines[0], lines[0]


def cli_exits_2(capsys, needle, *argv):
    assert_one_line_error(*run_cli(capsys, *argv, "--quiet"), needle)


def test_missing_path(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no such model directory"):
        OffloadEngine.from_pretrained(tmp_path / "nope", device="cpu")
    assert_one_line_error(*run_cli(capsys, "generate", "--model", str(tmp_path / "nope")), "no such model directory")


def test_directory_without_config(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no config.json"):
        OffloadEngine.from_pretrained(tmp_path, device="cpu")
    assert_one_line_error(*run_cli(capsys, "plan", "--model", str(tmp_path)), "no config.json")


def test_dense_model_is_refused(tmp_path, capsys):
    tm.save_checkpoint(tm.build_reference(tm.DENSE), tmp_path, "per_expert")
    with pytest.raises(UnsupportedModelError, match="no MoE layers"):
        OffloadEngine.from_pretrained(tmp_path, device="cpu")
    assert_one_line_error(*run_cli(capsys, "plan", "--model", str(tmp_path)), "llama")


def test_moe_without_experts_interface_is_refused(tmp_path):
    tm.save_checkpoint(tm.build_reference(tm.UNSUPPORTED), tmp_path, "per_expert")
    with pytest.raises(UnsupportedModelError, match="jetmoe"):
        OffloadEngine.from_pretrained(tmp_path, device="cpu")


def test_unknown_architecture(good_dir, tmp_path, capsys):
    path = copy_of(good_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["model_type"] = "hypothetical_moe"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="hypothetical_moe"):
        OffloadEngine.from_pretrained(path, device="cpu")
    assert_one_line_error(*run_cli(capsys, "plan", "--model", str(path)), "hypothetical_moe")


def test_fp8_config_over_unquantized_weights_is_refused(good_dir, tmp_path):
    """A config that says FP8 over weights that are not: one line naming the tensor and the dtypes."""
    path = copy_of(good_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="is float32, where .* needs float8_e4m3fn"):
        OffloadEngine.from_pretrained(path, device="cpu")


def test_quantized_expert_tensors_are_refused(tmp_path):
    """gpt-oss as published: experts as MXFP4 blocks and scales instead of gate_up_proj/down_proj."""
    tm.save_checkpoint(tm.build_reference("gpt_oss"), tmp_path, "per_expert")
    tensors = load_file(tmp_path / "model.safetensors")
    for key in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        tensors[key + "_blocks"] = torch.zeros(4, 8, dtype=torch.uint8)
        tensors[key + "_scales"] = torch.zeros(4, dtype=torch.uint8)
        del tensors[key]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="MXFP4"):
        OffloadEngine.from_pretrained(tmp_path, device="cpu")


def test_truncated_safetensors(good_dir, tmp_path, capsys):
    path = copy_of(good_dir, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    before = fingerprint(path)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        OffloadEngine.from_pretrained(path, device="cpu")
    assert_one_line_error(*run_cli(capsys, "generate", "--model", str(path)), "truncated")
    assert fingerprint(path) == before


def test_corrupted_header(good_dir, tmp_path):
    path = copy_of(good_dir, tmp_path)
    data = bytearray((path / "model.safetensors").read_bytes())
    data[8:40] = b"\x00garbage-not-json-at-all-\xff\xfe\x00\x01\x02\x03"
    (path / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        OffloadEngine.from_pretrained(path, device="cpu")


def test_missing_expert_tensor(good_dir, tmp_path, capsys):
    path = copy_of(good_dir, tmp_path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.5.w3.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj|experts\.5\.w3|expert tensor"):
        OffloadEngine.from_pretrained(path, device="cpu")
    assert_one_line_error(*run_cli(capsys, "plan", "--model", str(path)), "missing")


def test_missing_shard(tmp_path):
    tm.save_checkpoint(tm.build_reference("mixtral"), tmp_path, "sharded")
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match="missing"):
        OffloadEngine.from_pretrained(tmp_path, device="cpu")


def test_budget_too_small(good_dir, capsys):
    with pytest.raises(MemoryBudgetError, match="at least"):
        OffloadEngine.from_pretrained(good_dir, device="cpu", memory_budget="1MiB")
    assert_one_line_error(*run_cli(capsys, "generate", "--model", str(good_dir), "--memory-budget", "1MiB"),
                          "too small", "at least")


def test_unparseable_budget(good_dir, capsys):
    with pytest.raises(MemoryBudgetError, match="cannot read"):
        OffloadEngine.from_pretrained(good_dir, device="cpu", memory_budget="lots")
    assert_one_line_error(*run_cli(capsys, "plan", "--model", str(good_dir), "--memory-budget", "6 gigs"), "6 gigs")


def test_too_few_slots(good_dir):
    with pytest.raises(MemoryBudgetError, match="one token's 2 active experts"):
        OffloadEngine.from_pretrained(good_dir, device="cpu", expert_slots=1)


def test_prompt_longer_than_context(good_dir):
    engine = OffloadEngine.from_pretrained(good_dir, device="cpu", expert_slots=2, progress=False)
    limit = engine.spec.max_position_embeddings
    with pytest.raises(GenerationInputError, match="exceeds the model's context"):
        engine.generate([3] * (limit - 5), max_new_tokens=10)
    small = OffloadEngine.from_pretrained(good_dir, device="cpu", expert_slots=2, max_context=32, progress=False)
    with pytest.raises(GenerationInputError, match="--max-context"):
        small.generate([3] * 30, max_new_tokens=10)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_invalid_sampling_values(good_dir, kwargs, needle):
    engine = OffloadEngine.from_pretrained(good_dir, device="cpu", expert_slots=2, progress=False)
    with pytest.raises(GenerationInputError, match=needle):
        engine.generate([3, 4, 5], **kwargs)


def test_invalid_sampling_flags_in_cli(good_dir, capsys):
    assert_one_line_error(*run_cli(capsys, "generate", "--model", str(good_dir), "--temperature", "-1"),
                          "temperature")
    assert_one_line_error(*run_cli(capsys, "generate", "--model", str(good_dir), "--top-p", "2"), "top_p")
    assert_one_line_error(*run_cli(capsys, "generate", "--top-p", "much"), "--top-p")
    assert_one_line_error(*run_cli(capsys, "generate", "--device", "tpu"), "device")


def test_text_prompt_without_tokenizer(good_dir, capsys):
    engine = OffloadEngine.from_pretrained(good_dir, device="cpu", expert_slots=2, progress=False)
    with pytest.raises(GenerationInputError, match="no tokenizer"):
        engine.generate("hello")
    assert_one_line_error(*run_cli(capsys, "generate", "--model", str(good_dir), "--prompt", "hi", "--quiet"),
                          "no tokenizer")


def test_token_ids_outside_vocabulary(good_dir):
    engine = OffloadEngine.from_pretrained(good_dir, device="cpu", expert_slots=2, progress=False)
    with pytest.raises(GenerationInputError, match="outside the vocabulary"):
        engine.generate([1, 2, 10_000])


def test_bad_run_settings():
    with pytest.raises(ConfigError):
        OffloadEngine.from_pretrained("unused", device="cpu", host_memory="pinned")
    with pytest.raises(ConfigError):
        OffloadEngine.from_pretrained("unused", device="cpu", dtype="int3")


def test_engine_errors_share_one_base():
    for error in (CheckpointError, ConfigError, GenerationInputError, MemoryBudgetError, UnsupportedModelError):
        assert issubclass(error, OffloadEngineError)


def test_real_entry_point_prints_no_traceback(tmp_path):
    """The installed console script, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "offload_engine.cli.main", "plan", "--model", str(tmp_path / "x")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "Traceback" not in proc.stderr


def test_config_that_is_not_an_object(good_dir, tmp_path, capsys):
    path = copy_of(good_dir, tmp_path)
    (path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        OffloadEngine.from_pretrained(path, device="cpu")
    cli_exits_2(capsys, "not a JSON object", "plan", "--model", str(path))


def test_config_with_a_mistyped_field(good_dir, tmp_path, capsys):
    path = copy_of(good_dir, tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["num_local_experts"] = "eight"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OffloadEngineError):
        OffloadEngine.from_pretrained(path, device="cpu")
    cli_exits_2(capsys, "config", "plan", "--model", str(path))


def test_architecture_transformers_cannot_build(tmp_path, capsys):
    """DBRX's config lacks what its own modelling code reads (AttributeError inside transformers)."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "dbrx", "d_model": 32, "n_heads": 4,
                                                      "n_layers": 2, "vocab_size": 64}))
    save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    cli_exits_2(capsys, "dbrx", "plan", "--model", str(tmp_path))


@pytest.mark.parametrize("header", [b"[1, 2]", b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}'])
def test_malformed_safetensors_header(good_dir, tmp_path, capsys, header):
    path = copy_of(good_dir, tmp_path)
    import struct

    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(CheckpointError):
        OffloadEngine.from_pretrained(path, device="cpu")
    cli_exits_2(capsys, "model.safetensors", "plan", "--model", str(path))


def test_cli_exit_2_for_each_refusal(good_dir, tmp_path, capsys):
    quantized = copy_of(good_dir, tmp_path / "q")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq"}
    (quantized / "config.json").write_text(json.dumps(config))
    cli_exits_2(capsys, "gptq", "generate", "--model", str(quantized))
    cli_exits_2(capsys, "one token's 2 active experts", "generate", "--model", str(good_dir), "--expert-slots", "1")
    cli_exits_2(capsys, "exceeds the model's context", "plan", "--model", str(good_dir), "--max-context", "100000")
    sharded = tmp_path / "s"
    tm.save_checkpoint(tm.build_reference("mixtral"), sharded, "sharded")
    sorted(sharded.glob("*.safetensors"))[-1].unlink()
    cli_exits_2(capsys, "missing", "plan", "--model", str(sharded))


def test_prompt_too_long_in_cli(good_dir, tmp_path, capsys):
    from tiny_tokenizer import save_char_tokenizer

    path = copy_of(good_dir, tmp_path)
    save_char_tokenizer(path)
    cli_exits_2(capsys, "exceeds the model's context", "generate", "--model", str(path), "--prompt", "x" * 300,
                "--expert-slots", "2")


def test_unwritable_trace_output_is_refused_before_generating(good_dir, tmp_path, capsys):
    missing_dir = tmp_path / "no" / "such" / "dir" / "t.npz"
    cli_exits_2(capsys, "does not exist", "generate", "--model", str(good_dir), "--trace-out", str(missing_dir))
    assert not missing_dir.parent.exists()


def test_hub_id_without_network_is_one_clear_line():
    """A hub id goes to huggingface_hub; offline (as on CI) that is one line saying what to do."""
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "offload_engine.cli.main", "plan", "--model",
                           "mistralai/Mixtral-8x7B-v0.1"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: could not fetch 'mistralai/Mixtral-8x7B-v0.1'")
    assert "local directory" in proc.stderr and proc.stderr.count("\n") == 1


def test_profile_values_are_checked_like_flags(tmp_path, capsys):
    profile = tmp_path / "p.toml"
    profile.write_text('max_new_tokens = "many"\n')
    cli_exits_2(capsys, "max_new_tokens", "generate", "--profile", str(profile))
    profile.write_text("quiet = 3\n")
    cli_exits_2(capsys, "true or false", "generate", "--profile", str(profile))


def test_nothing_reaches_stdout_before_the_prompt_is_accepted(good_dir, tmp_path, capsys):
    from tiny_tokenizer import save_char_tokenizer

    path = copy_of(good_dir, tmp_path)
    save_char_tokenizer(path)
    code = main(["generate", "--model", str(path), "--prompt", "x" * 300, "--expert-slots", "2", "--quiet"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""


def test_an_output_folder_that_does_not_exist_is_one_line(capsys):
    from consistency_traces import FLAME

    code, err = run_cli(capsys, "consistency", str(FLAME), "--num-experts", "64", "--plot", "/no/such/dir/p.png")
    assert_one_line_error(code, err, "/no/such/dir/p.png")


def test_a_config_key_with_a_newline_is_named_on_one_line():
    """Hypothesis found it: a non-finite number under a key holding a newline gave a two-line error."""
    from pathlib import Path

    from offload_engine.checkpoint.model_spec import check_config

    with pytest.raises(CheckpointError) as error:
        check_config({"architectures": {"\n": float("inf")}}, Path("config.json"))
    assert "\n" not in str(error.value) and "architectures.'\\n'" in str(error.value)
