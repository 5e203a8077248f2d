"""benchmarks/make_checkpoint.py --format fp8|mxfp4: the pre-quantized releases' on-disk formats, written shard
by shard, give transformers' dequantized model's tokens through the engine (all experts resident, and a few
slots), and `plan` counts one expert as its stored bytes (values and scales).

At the real structure (experts, top-k, attention kinds) with small widths, as tests/test_real_shapes.py: qwen3's
expert weights are [128, 256] (two FP8 blocks a row of blocks), gpt-oss keeps its 32 experts."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from offload_engine import OffloadEngine
from offload_engine.cli.main import main
from tests.quantized_checkpoints import load_dequantized_reference

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import make_checkpoint as mc  # noqa: E402

PROMPT = [5, 17, 33, 9, 70, 3, 44, 101]
NEW_TOKENS = 8
CASES = {  # format: (shape, layers, seed, widths); seeds whose greedy tokens are not one token repeated
    "fp8": ("qwen3-30b-a3b", 2, 1, dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128,
                                        head_dim=32)),
    "mxfp4": ("gpt-oss-20b", 2, 2, dict(hidden_size=128, intermediate_size=64, head_dim=16)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def written(request, tmp_path_factory):
    fmt = request.param
    shape, layers, seed, widths = CASES[fmt]
    out = tmp_path_factory.mktemp(f"{shape}-{fmt}")
    config = mc.config_of(shape, layers=layers, vocab=512, **widths)
    mc.write_random(config, out, torch.bfloat16, seed=seed, progress=False, fmt=fmt)
    return fmt, out


def _tensors(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def test_files_hold_the_format(written):
    fmt, path = written
    config = json.loads((path / "config.json").read_text())
    tensors = _tensors(path)
    assert config["dtype"] == "bfloat16" and config["quantization_config"]["quant_method"] == fmt
    assert len(list(path.glob("*.safetensors"))) == config["num_hidden_layers"] + 1, "a shard per layer"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    if fmt == "fp8":
        assert config["quantization_config"]["weight_block_size"] == [128, 128]
        assert "model.layers.1.mlp.gate" in config["quantization_config"]["modules_to_not_convert"]
        w = tensors["model.layers.1.mlp.experts.5.gate_proj.weight"]
        assert w.dtype == torch.float8_e4m3fn and tuple(w.shape) == (128, 256)
        s = tensors["model.layers.1.mlp.experts.5.gate_proj.weight_scale_inv"]
        assert s.dtype == torch.float32 and tuple(s.shape) == (1, 2)
        assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
        assert tensors["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    else:
        assert config["quantization_config"]["modules_to_not_convert"] == [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
        assert tuple(tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape) == (32, 128, 4, 16)
        assert tuple(tensors["model.layers.0.mlp.experts.down_proj_scales"].shape) == (32, 128, 2)
        assert "model.layers.0.mlp.experts.gate_up_proj" not in tensors
        assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


def test_engine_matches_the_dequantized_reference(written):
    fmt, path = written
    model = load_dequantized_reference(path)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None)
    reference = out[0, len(PROMPT):].tolist()
    assert len(set(reference)) > 2, "a reference that repeats one token would hide a wrong engine"
    experts = json.loads((path / "config.json").read_text())
    n = experts.get("num_experts") or experts["num_local_experts"]
    for slots in (n, max(1, n // 8)):  # all resident; a few
        engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=slots, progress=False)
        try:
            assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == reference, \
                f"{fmt}, {slots} slots"
        finally:
            engine.close()


def test_plan_counts_an_expert_as_stored(written, capsys):
    fmt, path = written
    assert main(["plan", "--model", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    tensors = _tensors(path)
    if fmt == "fp8":  # expert 0 of the first MoE layer: its three weights and their scales
        stored = sum(t.numel() * t.element_size() for k, t in tensors.items() if ".mlp.experts.0." in k
                     and k.startswith("model.layers.0."))
    else:  # one expert's slice of each fused tensor
        stored = sum(t[0].numel() * t.element_size() for k, t in tensors.items()
                     if k.startswith("model.layers.0.mlp.experts."))
    assert plan["expert_format"] == fmt and plan["expert_bytes"] == stored


@pytest.mark.parametrize("argv, needle", [
    (["--shape", "deepseek-v2-lite", "--format", "fp8"], "neither divided nor covered"),
    (["--shape", "qwen3-30b-a3b", "--format", "mxfp4"], "gpt-oss"),
    (["--shape", "qwen3-30b-a3b", "--format", "fp8", "--layout", "fused"], "per-expert layout"),
])
def test_refused_in_one_line_before_writing(tmp_path, argv, needle):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        mc.main([*argv, "--layers", "2", "--vocab", "512", "--out", str(out)])
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()
