"""Self-check of the tiny-checkpoint fixtures (not of the engine): each architecture builds deterministically,
its three on-disk layouts reload to identical logits, and its routers have clear top-k margins."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny_models as tm

PROMPTS = torch.randint(5, tm.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def _is_interface_experts(module):
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate")  # set by @use_experts_implementation


@pytest.fixture(scope="module", params=list(tm.ARCHITECTURES))
def arch(request):
    return request.param, tm.build_reference(request.param)


def test_required_architectures_present():
    assert set(tm.REQUIRED) <= set(tm.ARCHITECTURES)


def test_builds_deterministically(arch):
    name, model = arch
    again = tm.build_reference(name)
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    other = tm.build_reference(name, seed=1)
    assert not torch.equal(next(iter(other.state_dict().values())), next(iter(model.state_dict().values())))


def test_every_moe_layer_has_a_scaled_router_and_interface_experts(arch):
    name, model = arch
    experts = [n for n, m in model.named_modules() if _is_interface_experts(m)]
    routers = tm.router_weights(model)
    assert experts and len(routers) == len(experts), (experts, list(routers))
    for pname, weight in routers.items():
        assert weight.abs().mean() > 0.1, pname  # N(0, 0.02) init is ~0.016
    for pname, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if pname.endswith("e_score_correction_bias"):
            assert tensor.abs().sum() > 0, pname


# mlp_only_layers / decoder_sparse_step / first_k_dense_replace / moe_layer_start_index in the tiny configs
WITH_DENSE_LAYERS = ("qwen2_moe", "qwen3_moe", "qwen3_next", "deepseek_v2", "deepseek_v3", "glm4_moe", "ernie4_5_moe", "dots1")


@pytest.mark.parametrize("name", WITH_DENSE_LAYERS)
def test_dense_layers_exercised_where_the_architecture_has_them(name):
    model = tm.build_reference(name)
    moe_layers = [any(_is_interface_experts(m) for m in layer.modules()) for layer in model.model.layers]
    assert any(moe_layers) and not all(moe_layers), moe_layers


def test_router_margins(arch):
    _, model = arch
    prompts = torch.randint(5, tm.VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    gaps = tm.router_margins(model, prompts)
    assert gaps.numel() > 0
    assert (gaps < 1e-3).float().mean() < 0.03


def test_layouts_save_and_reload_identically(arch, tmp_path):
    name, model = arch
    with torch.no_grad():
        expected = model(PROMPTS).logits
    for layout in tm.LAYOUTS:
        path = tm.save_checkpoint(model, tmp_path / layout, layout)
        keys = tm.safetensors_keys(path)
        per_expert = [k for k in keys if ".experts.0." in k]
        fused = [k for k in keys if k.endswith("experts.gate_up_proj")]
        if layout == "fused":
            assert fused and not per_expert, sorted(keys)
        elif name in tm.ORIGINAL_LAYOUT_IS_FUSED:
            assert not per_expert
        else:
            assert per_expert and not fused, sorted(keys)
        if layout == "sharded":
            index = json.loads((path / "model.safetensors.index.json").read_text())
            assert len(set(index["weight_map"].values())) > 1
        reloaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            assert torch.equal(reloaded(PROMPTS).logits, expected), layout


def test_original_key_names_for_mixtral_and_qwen(tmp_path):
    mixtral = tm.safetensors_keys(tm.save_checkpoint(tm.build_reference("mixtral"), tmp_path / "m", "per_expert"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in mixtral
    assert "model.layers.0.block_sparse_moe.gate.weight" in mixtral
    qwen = tm.safetensors_keys(tm.save_checkpoint(tm.build_reference("qwen3_moe"), tmp_path / "q", "per_expert"))
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in qwen
    granite = tm.safetensors_keys(tm.save_checkpoint(tm.build_reference("granitemoe"), tmp_path / "g", "per_expert"))
    assert "model.layers.0.block_sparse_moe.input_linear.weight" in granite


def test_reference_greedy_shapes():
    model = tm.build_reference("mixtral")
    tokens, logits = tm.reference_greedy(model, PROMPTS[:1, :8], 24)
    assert tokens.shape == (1, 24) and logits.shape == (24, 1, tm.VOCAB)
    assert torch.equal(logits.argmax(-1).T, tokens)


def test_dense_and_unsupported_examples():
    dense = tm.build_reference(tm.DENSE)
    assert not any(_is_interface_experts(m) for m in dense.modules())
    unsupported = tm.build_reference(tm.UNSUPPORTED)
    assert unsupported.config.model_type == tm.UNSUPPORTED
    assert not any(_is_interface_experts(m) for m in unsupported.modules())
    assert any("experts" in n or "router" in n for n, _ in unsupported.named_parameters())
