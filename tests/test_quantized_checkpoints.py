"""tests/quantized_checkpoints.py writes tiny MXFP4 (gpt-oss) and block-FP8 (qwen3_moe, deepseek_v3)
checkpoints in the real on-disk formats; transformers loads them dequantized, close to the fp32 originals."""

import json

import pytest
import torch
from safetensors import safe_open

from tests import quantized_checkpoints as qc
from tests import tiny_models as tm

PROMPTS = torch.randint(5, tm.VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
FORMATS = {"gpt_oss": "mxfp4", "qwen3_moe": "fp8", "deepseek_v3": "fp8"}
MAX_RELATIVE_ERROR = {"mxfp4": 0.15, "fp8": 0.07}


def _on_disk(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module", params=list(FORMATS))
def checkpoint(request, tmp_path_factory):
    """(name, fp32 original, checkpoint path, dequantized transformers reference)."""
    name = request.param
    path = tmp_path_factory.mktemp(name)
    if FORMATS[name] == "mxfp4":
        original = qc.build_mxfp4_reference()
        qc.save_mxfp4_checkpoint(original, path)
    else:
        original = tm.build_reference(name)
        qc.save_fp8_checkpoint(original, path)
    return name, original, path, qc.load_dequantized_reference(path)


def test_config_declares_the_format(checkpoint):
    name, _, path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == FORMATS[name]
    if FORMATS[name] == "fp8":
        assert qconfig["fmt"] == "e4m3" and qconfig["activation_scheme"] == "dynamic"
        assert qconfig["weight_block_size"] == list(qc.FP8_BLOCK)
        assert "lm_head" in qconfig["modules_to_not_convert"]
    else:
        assert "model.layers.*.mlp.router" in qconfig["modules_to_not_convert"]


def test_mxfp4_tensors_on_disk(checkpoint):
    name, original, path, _ = checkpoint
    if FORMATS[name] != "mxfp4":
        pytest.skip("MXFP4 only")
    tensors = _on_disk(path)
    cfg = original.config
    e, h, i = cfg.num_local_experts, cfg.hidden_size, cfg.intermediate_size
    for layer in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{layer}.mlp.experts."
        expected = {
            "gate_up_proj_blocks": (torch.uint8, (e, 2 * i, h // 32, 16)),
            "gate_up_proj_scales": (torch.uint8, (e, 2 * i, h // 32)),
            "down_proj_blocks": (torch.uint8, (e, h, i // 32, 16)),
            "down_proj_scales": (torch.uint8, (e, h, i // 32)),
            "gate_up_proj_bias": (torch.bfloat16, (e, 2 * i)),
            "down_proj_bias": (torch.bfloat16, (e, h)),
        }
        for suffix, (dtype, shape) in expected.items():
            tensor = tensors[prefix + suffix]
            assert (tensor.dtype, tuple(tensor.shape)) == (dtype, shape), prefix + suffix
        assert prefix + "gate_up_proj" not in tensors and prefix + "down_proj" not in tensors
    others = [k for k in tensors if "_blocks" not in k and "_scales" not in k]
    assert {tensors[k].dtype for k in others} == {torch.bfloat16}
    assert "model.layers.0.mlp.router.weight" in others


def test_fp8_tensors_on_disk(checkpoint):
    name, original, path, _ = checkpoint
    if FORMATS[name] != "fp8":
        pytest.skip("FP8 only")
    tensors = _on_disk(path)
    b0, b1 = qc.FP8_BLOCK
    quantized = [k for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn]
    assert quantized and all(k.endswith("_proj.weight") or k.endswith("_proj_with_mqa.weight") for k in quantized)
    for key in quantized:
        rows, cols = tensors[key].shape
        scale = tensors[key + "_scale_inv"]
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (rows // b0, cols // b1), key
    # every expert of every MoE layer, per expert, quantized
    n_experts = tm._num_experts(original.config)
    moe_layers = sorted({k.split(".")[2] for k in tensors if ".mlp.experts." in k})
    assert moe_layers
    for layer in moe_layers:
        for e in range(n_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in quantized
        assert tensors[f"model.layers.{layer}.mlp.gate.weight"].dtype == torch.bfloat16
    # attention is quantized too; embeddings, lm_head, norms are not
    assert any(".self_attn." in k for k in quantized)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert tensors[key].dtype == torch.bfloat16
    bias = [k for k in tensors if k.endswith("e_score_correction_bias")]
    assert bool(bias) == (name == "deepseek_v3")
    assert all(tensors[k].dtype == torch.float32 for k in bias)


def test_transformers_loads_the_experts_as_the_files_say(checkpoint):
    _, _, path, reference = checkpoint
    state = reference.state_dict()
    expected = qc.expected_dequantized_experts(path)
    assert expected
    for key, tensor in expected.items():
        assert state[key].dtype == torch.bfloat16, key
        assert torch.equal(state[key], tensor), key


def test_dequantized_weights_are_close_to_the_original(checkpoint):
    name, original, path, reference = checkpoint
    state, exact = reference.state_dict(), original.state_dict()
    limit = MAX_RELATIVE_ERROR[FORMATS[name]]
    for key in qc.expected_dequantized_experts(path):
        err = qc.relative_error(state[key], exact[key])
        assert 0 < err < limit, (key, err)
    if FORMATS[name] == "fp8":  # attention went through FP8 too
        attention = [k for k in state if ".self_attn." in k and k.endswith("o_proj.weight")]
        assert attention and all(qc.relative_error(state[k], exact[k]) < limit for k in attention)
    for key, weight in tm.router_weights(reference).items():  # routers stay unquantized (bf16 rounding only)
        assert qc.relative_error(weight, exact[key]) < 0.01, key


def test_reference_is_bf16_eval_and_generates(checkpoint):
    name, _, _, reference = checkpoint
    assert not reference.training
    fp32 = {k for k, t in reference.state_dict().items() if t.dtype != torch.bfloat16}
    # DeepSeek-V3 keeps its router weight and correction bias in fp32 (_keep_in_fp32_modules_strict)
    assert all(t.dtype == torch.float32 for k, t in reference.state_dict().items() if k in fp32)
    assert all(k.endswith(("mlp.gate.weight", "e_score_correction_bias")) for k in fp32) and (
        bool(fp32) == (name == "deepseek_v3")), sorted(fp32)
    assert getattr(reference.config, "quantization_config", None) is None  # dropped once dequantized
    tokens, logits = tm.reference_greedy(reference, PROMPTS[:, :8], 4)
    assert tokens.shape == (2, 4) and logits.shape == (4, 2, tm.VOCAB)
    assert torch.isfinite(logits).all()


def test_routing_is_not_near_tied_after_quantization(checkpoint):
    _, _, _, reference = checkpoint
    prompts = torch.randint(5, tm.VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    gaps = tm.router_margins(reference, prompts)
    assert gaps.numel() > 0
    assert (gaps < 1e-3).float().mean() < 0.03


def test_mxfp4_round_trip_is_exact_on_representable_values():
    codes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] * 4) * torch.tensor([1.0, -1.0]).repeat(16)
    weight = torch.stack([codes * 2.0 ** -3, codes * 2.0 ** 5])  # [2, 32]: one block each
    blocks, scales = qc.quantize_mxfp4(weight)
    assert blocks.shape == (2, 1, 16) and scales.tolist() == [[124], [132]]
    assert torch.equal(qc.dequantize_mxfp4(blocks, scales), weight)
    # low nibble first: values 0.0 (code 0) and -0.5 (code 9) pack to 0x90
    assert blocks[0, 0, 0].item() == 0x90


def test_fp8_refuses_a_block_that_does_not_divide(tmp_path):
    with pytest.raises(ValueError, match="does not divide"):
        qc.save_fp8_checkpoint(tm.build_reference("qwen3_moe"), tmp_path, block=(16, 16))


def test_fp8_real_block_size_is_one_block_per_tiny_matrix(tmp_path):
    """[128, 128] (the real checkpoints' block) exceeds every tiny dim: one scale per matrix, still loads."""
    original = tm.build_reference("qwen3_moe")
    path = qc.save_fp8_checkpoint(original, tmp_path, block=(128, 128))
    tensors = _on_disk(path)
    scales = [t for k, t in tensors.items() if k.endswith("_scale_inv")]
    assert scales and all(tuple(t.shape) == (1, 1) for t in scales)
    reference = qc.load_dequantized_reference(path)
    state = reference.state_dict()
    for key, tensor in qc.expected_dequantized_experts(path).items():
        assert torch.equal(state[key], tensor), key
        assert qc.relative_error(tensor, original.state_dict()[key]) < MAX_RELATIVE_ERROR["fp8"]


def test_transformers_derives_the_fp8_block_from_the_scale_grid():
    """Why a non-dividing block is refused: transformers reads rows // grid_rows as the block."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    q = torch.ones(24, 16).to(torch.float8_e4m3fn)
    scales = torch.tensor([[1.0], [2.0]])  # what a [16, 16] block would write for 24 rows: ceil(24/16) = 2
    out = Fp8Dequantize(None)._dequantize_one(q, scales, torch.float32)
    assert out[:12].eq(1).all() and out[12:].eq(2).all()  # blocks of 12 rows, not 16
    with pytest.raises(ValueError, match="not divisible"):
        Fp8Dequantize(None)._dequantize_one(torch.ones(25, 16).to(torch.float8_e4m3fn), scales, torch.float32)
