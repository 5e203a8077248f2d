"""benchmarks/make_checkpoint.py: a two-layer copy of each real shape, written as the hub writes it (per-expert
names, a tokenizer padded to the vocabulary), gives transformers' tokens through the engine, with a third of
the experts in the cache and from the disk (the direct tier).

The default suite keeps each model's structure (experts, top-k, shared experts, attention kind and head
counts, dense first layers, routing options) at small widths; MOE_OFFLOAD_REAL_SHAPES=1 runs the real widths
in bf16 (minutes and several GB per shape)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from offload_engine import OffloadEngine

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import make_checkpoint as mc  # noqa: E402

REAL = os.environ.get("MOE_OFFLOAD_REAL_SHAPES") == "1"
PROMPT = [5, 17, 33, 9, 70, 3, 44, 101, 12, 250]
NEW_TOKENS = 12
# Small widths, the rest of each configuration as published.
SMALL = {
    "mixtral-8x7b": dict(hidden_size=128, intermediate_size=64),
    "qwen3-30b-a3b": dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=32, head_dim=16),
    "olmoe-1b-7b": dict(hidden_size=128, intermediate_size=32),
    "deepseek-v2-lite": dict(hidden_size=128, intermediate_size=128, moe_intermediate_size=32, kv_lora_rank=32,
                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
    "gpt-oss-20b": dict(hidden_size=128, intermediate_size=64, head_dim=16),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    made = {}

    def make(shape, layout):
        if (shape, layout) not in made:
            dtype = "bf16" if REAL else "fp32"
            config = mc.config_of(shape, layers=2, vocab=4096 if REAL else 512, dtype=dtype,
                                  **({} if REAL else SMALL[shape]))
            out = tmp_path_factory.mktemp(f"{shape}-{layout}")
            mc.write_random(config, out, mc.DTYPES[dtype], seed=1, progress=False, layout=layout)
            made[shape, layout] = out
        return made[shape, layout]

    return make


def _reference(path: Path, dtype: torch.dtype) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("shape", sorted(mc.SHAPES))
def test_hub_layout_two_layers_match_transformers(written, shape):
    path = written(shape, "hub")
    keys = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".experts.0." in k for k in keys) or shape == "gpt-oss-20b", "hub layout stores experts one by one"
    assert (path / "tokenizer.json").is_file()
    assert json.loads((path / "config.json").read_text())["architectures"][0].endswith("ForCausalLM")
    dtype = torch.bfloat16 if REAL else torch.float32
    reference = _reference(path, dtype)
    experts = mc.config_of(shape)  # the real model's count
    n = next(getattr(experts, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
             if getattr(experts, k, None))
    for settings in (dict(expert_slots=max(1, n // 3)),
                     dict(expert_slots=max(1, n // 3), host_memory="direct", policy="predictive",
                          predictor="next-gate")):
        engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="bfloat16" if REAL else "float32",
                                               progress=False, **settings)
        try:
            result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            assert result.token_ids == reference, f"{shape} {settings}"
        finally:
            engine.close()


def test_fused_layout_holds_the_same_numbers(written):
    """--layout fused writes the same weights under transformers' in-memory names."""
    from safetensors import safe_open

    def tensors(path):
        out = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                out.update({k: st.get_tensor(k) for k in st.keys()})
        return out

    hub, fused = tensors(written("mixtral-8x7b", "hub")), tensors(written("mixtral-8x7b", "fused"))
    gate_up = fused["model.layers.1.mlp.experts.gate_up_proj"]  # [E, 2I, H], gate rows first
    inter = gate_up.shape[1] // 2
    assert torch.equal(gate_up[3, :inter], hub["model.layers.1.block_sparse_moe.experts.3.w1.weight"])
    assert torch.equal(gate_up[3, inter:], hub["model.layers.1.block_sparse_moe.experts.3.w3.weight"])
    assert torch.equal(fused["model.layers.1.mlp.experts.down_proj"][3],
                       hub["model.layers.1.block_sparse_moe.experts.3.w2.weight"])


def test_tokenizer_is_padded_to_the_vocabulary(written):
    from transformers import AutoTokenizer

    path = written("qwen3-30b-a3b", "hub")
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    assert len(tokenizer) == config["vocab_size"]
    text = "The history of the city begins"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_report_gives_balance_and_srp(written):
    report = mc.report(written("olmoe-1b-7b", "hub"), tokens=32)
    assert report["experts"] == 64 and report["top_k"] == 8 and len(report["layers"]) == 2
    for row in report["layers"]:
        assert 1 / 64 <= row["busiest_share"] <= 1 and 8 <= row["experts_used"] <= 64
        assert 0 < row["srp_m16"] <= 1


def test_tokenizer_fills_vocabularies_past_the_pairs(tmp_path):
    """gpt-oss's 201,088 entries: more than the 65,536 pair merges, so pairs take a third symbol."""
    from transformers import AutoTokenizer

    from benchmarks.llamacpp.synthetic_tokenizer import write_for_config

    config = mc.config_of("gpt-oss-20b").to_dict()
    write_for_config(tmp_path, config)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tokenizer) == config["vocab_size"]
    text = "Über Größe: the history of the city begins, 1234 ✅"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_a_steady_residual_lets_the_next_layers_router_see_ahead(tmp_path):
    """--residual steady: the residual stream changes little between layers, as in trained models, so layer
    l+1's router applied to layer l's residual (next-gate) finds most of l+1's choices; with every weight at
    N(0, 0.02) each layer rewrites the stream and next-gate sees far less."""
    recall = {}
    for residual in ("random", "steady"):
        config = mc.config_of("qwen3-30b-a3b", layers=3, vocab=512, dtype="fp32", **SMALL["qwen3-30b-a3b"])
        out = tmp_path / residual
        mc.write_random(config, out, mc.DTYPES["fp32"], seed=1, progress=False, **mc.RESIDUALS[residual])
        recall[residual] = mc.report(out, tokens=48)["next_gate_recall_1_ahead"]
    assert recall["steady"] >= 0.8 and recall["random"] <= recall["steady"] - 0.2, recall
