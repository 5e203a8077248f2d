"""Tiny random checkpoints for every architecture the engine must serve, and transformers' reference output.

Each builder returns an fp32 config small enough to build, save and generate with on a laptop CPU in well
under a second. `build_reference` makes the transformers model with seeded random weights and routers
scaled up so top-k has clear margins (random routers have near-ties that flip under rounding);
`save_checkpoint` writes it in the on-disk layouts the engine must read.

>>> model = build_reference("mixtral")
>>> model.config.model_type, model.training
('mixtral', False)
"""

import json
from collections import OrderedDict
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM
from transformers import (
    DeepseekV2Config,
    DeepseekV3Config,
    Dots1Config,
    Ernie4_5_MoeConfig,
    FlexOlmoConfig,
    Glm4MoeConfig,
    GptOssConfig,
    GraniteMoeConfig,
    GraniteMoeSharedConfig,
    HunYuanMoEV1Config,
    JetMoeConfig,
    LlamaConfig,
    MiniMaxConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    Qwen3NextConfig,
)

LAYOUTS = ("per_expert", "fused", "sharded")
ROUTER_SCALE = 20.0  # x20 on N(0, 0.02) router weights: logit gaps of ~1 instead of ~0.05
VOCAB = 128

# Shared by every tiny config; architectures override what they name differently.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
    dtype="float32",
)


def _tiny(config_class, **overrides):
    return config_class(**{**_COMMON, **overrides})


def mixtral():
    return _tiny(MixtralConfig, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)


def qwen2_moe():
    # Layer 1 is dense (mlp_only_layers), layer 0 and 2 are sparse with the gated shared expert.
    return _tiny(
        Qwen2MoeConfig, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1],
    )


def qwen3_moe():
    # decoder_sparse_step=2: layers 1 and 3 are sparse, 0 and 2 dense.
    return _tiny(
        Qwen3MoeConfig, num_hidden_layers=4, head_dim=8, intermediate_size=64, moe_intermediate_size=24,
        num_experts=8, num_experts_per_tok=2, decoder_sparse_step=2, norm_topk_prob=True,
    )


def olmoe():
    return _tiny(OlmoeConfig, intermediate_size=24, num_experts=8, num_experts_per_tok=2)


_MLA = dict(
    num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=24,
    qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
)


def deepseek_v2():
    return _tiny(
        DeepseekV2Config, **_MLA, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        topk_method="greedy", routed_scaling_factor=1.0,
    )


def deepseek_v3():
    # Sigmoid scores + e_score_correction_bias, 4 groups of 2, top-2 groups, scaled weights, dense layer 0.
    return _tiny(
        DeepseekV3Config, **_MLA, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, first_k_dense_replace=1, norm_topk_prob=True,
    )


def phimoe():
    return _tiny(PhimoeConfig, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)


def granitemoe():
    return _tiny(
        GraniteMoeConfig, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
        embedding_multiplier=2.0, logits_scaling=2.0, residual_multiplier=0.5, attention_multiplier=0.25,
    )


def gpt_oss():
    # Unquantised; alternating sliding/full attention; experts transposed with biases.
    return _tiny(
        GptOssConfig, head_dim=8, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 150000.0},  # YaRN defaults assume a 4k context
    )


def glm4_moe():
    return _tiny(
        Glm4MoeConfig, num_hidden_layers=3, head_dim=8, intermediate_size=64, moe_intermediate_size=24,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=1.5, first_k_dense_replace=1, norm_topk_prob=True,
    )


def ernie4_5_moe():
    # moe_layer_start_index=1: layer 0 dense.
    return _tiny(
        Ernie4_5_MoeConfig, num_hidden_layers=3, intermediate_size=64, moe_intermediate_size=24,
        moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1,
    )


def minimax():
    # One lightning (linear) attention layer, one full attention layer.
    return _tiny(
        MiniMaxConfig, head_dim=8, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
        layer_types=["linear_attention", "full_attention"], block_size=16,
    )


def hunyuan_v1_moe():
    return _tiny(
        HunYuanMoEV1Config, head_dim=8, intermediate_size=24, num_experts=8, moe_topk=2,
        eod_token_id=3, sep_token_id=4,
    )


def dots1():
    return _tiny(
        Dots1Config, num_hidden_layers=3, num_key_value_heads=4, head_dim=8, intermediate_size=64,
        moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2,
        topk_group=1, first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=True,
    )


def flex_olmo():
    return _tiny(FlexOlmoConfig, intermediate_size=24, num_experts=8, num_experts_per_tok=2)


def qwen3_next():
    # Gated DeltaNet (linear attention) layer + full attention layer, gated shared expert, layer 2 dense.
    return _tiny(
        Qwen3NextConfig, num_hidden_layers=3, head_dim=8, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[2],
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4,
    )


def granitemoeshared():
    return _tiny(
        GraniteMoeSharedConfig, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
        shared_intermediate_size=40, embedding_multiplier=2.0, logits_scaling=2.0,
    )


ARCHITECTURES = OrderedDict(
    (fn.__name__, fn)
    for fn in (
        mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, phimoe, granitemoe,
        gpt_oss, glm4_moe, ernie4_5_moe, minimax, hunyuan_v1_moe, dots1, flex_olmo, qwen3_next,
        granitemoeshared,
    )
)
# Architectures whose original (default save_pretrained) layout already stores experts as 3-D tensors.
ORIGINAL_LAYOUT_IS_FUSED = frozenset({"granitemoe", "granitemoeshared", "gpt_oss"})
REQUIRED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "granitemoe")


def dense_config():
    """A tiny Llama: a real causal LM with no experts, for the "dense model is refused" test."""
    return _tiny(LlamaConfig, intermediate_size=64)


def unsupported_config():
    """A tiny JetMoE: MoE (in the MLP and in attention), but its experts are not behind transformers' experts
    interface. (DBRX would do too, but in transformers 5.24 it does not build: DbrxAttentionConfig has no
    rope_theta.)"""
    return _tiny(
        JetMoeConfig, kv_channels=8, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
    )


UNSUPPORTED = "jetmoe"
DENSE = "dense"  # build_reference(DENSE) / build_reference(UNSUPPORTED) work like the MoE names


def _config(name):
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]()
    if name == DENSE:
        return dense_config()
    if name == UNSUPPORTED:
        return unsupported_config()
    raise KeyError(f"no tiny config named {name!r}")


def router_weights(model):
    """Name -> [E, H] router weight for every MoE layer (gate / router / wg, never a shared-expert gate)."""
    n_experts = _num_experts(model.config)
    out = {}
    for name, param in model.named_parameters():
        last = name.rsplit(".", 2)
        is_router = name.endswith("weight") and any(p in ("gate", "router", "wg", "layer") for p in last[-2:-1])
        if is_router and param.ndim == 2 and param.shape[0] == n_experts and "experts" not in name:
            out[name] = param
    return out


def _num_experts(config):
    for key in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 1:
            return value
    return None


def build_reference(name, seed=0, config=None):
    """The transformers CausalLM for `name` in fp32 eval mode; same seed, same weights.

    `config` replaces the tiny config of `name` (a variant with other sizes); `name` still picks the
    architecture-specific weight tweaks below.

    Router weights are scaled by ROUTER_SCALE and `e_score_correction_bias` drawn from N(0, 0.1), so that
    top-k choices are not near-ties.
    """
    config = _config(name) if config is None else config
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in router_weights(model).values():
            param.mul_(ROUTER_SCALE)
        for pname, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if pname.endswith("e_score_correction_bias"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif name == "gpt_oss" and pname.endswith("_bias") and "experts" in pname:
                # gpt-oss initialises expert biases to zero: make them matter.
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.02)
    return model.eval()


def save_checkpoint(model, path, layout):
    """Write `model` to `path` as "per_expert" (original), "fused" (3-D experts) or "sharded" (per-expert,
    several files + model.safetensors.index.json). Returns the path."""
    path = Path(path)
    if layout == "per_expert":
        model.save_pretrained(path)
    elif layout == "fused":
        model.save_pretrained(path, save_original_format=False)
    elif layout == "sharded":
        total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        model.save_pretrained(path, max_shard_size=max(total // 3, 1))
        if not (path / "model.safetensors.index.json").exists():
            raise RuntimeError(f"sharded save of {model.config.model_type} wrote a single file")
    else:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return path


def safetensors_keys(path):
    """Tensor name -> file name for a saved checkpoint directory (reads headers only)."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def reference_greedy(model, input_ids, max_new_tokens):
    """Greedy tokens and per-step logits from transformers' own generate.

    Returns (token_ids [B, new], logits [new, B, V]); min_new_tokens stops an early eos from shortening it.
    """
    with torch.no_grad():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens, output_logits=True, return_dict_in_generate=True,
            pad_token_id=model.config.pad_token_id,
        )
    new_tokens = out.sequences[:, input_ids.shape[1]:]
    return new_tokens, torch.stack(out.logits)


def _correction_bias(model, router_weight_name):
    """The e_score_correction_bias belonging to a router weight (DeepSeek-V3: gate.e_score_correction_bias;
    Ernie: gate.moe_statics.e_score_correction_bias), or None."""
    prefix = router_weight_name.rsplit(".", 1)[0] + "."
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    return next((t for n, t in tensors.items() if n.startswith(prefix) and n.endswith("e_score_correction_bias")), None)


def router_margins(model, input_ids):
    """Per MoE layer and token, the gap between the k-th and (k+1)-th selection score.

    The selection score is the router logit (softmax routers), or sigmoid(logit) + e_score_correction_bias
    where the router has one. Captured with a pre-hook on each router's input.
    """
    k = model.config.num_experts_per_tok
    routers = router_weights(model)
    modules = dict(model.named_modules())
    gaps, handles = [], []
    for pname, weight in routers.items():
        owner = modules[pname.rsplit(".", 1)[0]]
        bias = _correction_bias(model, pname)
        softmax_then_bias = model.config.model_type == "ernie4_5_moe"

        def hook(_module, args, weight=weight, owner=owner, bias=bias, softmax_then_bias=softmax_then_bias):
            x = args[0].reshape(-1, weight.shape[1]).float()
            scores = x @ weight.float().T
            if getattr(owner, "bias", None) is not None and owner.bias.shape == scores.shape[-1:]:
                scores = scores + owner.bias
            if bias is not None:
                scores = (scores.softmax(-1) if softmax_then_bias else scores.sigmoid()) + bias.reshape(-1)
            top = scores.topk(k + 1, dim=-1).values
            gaps.append(top[:, k - 1] - top[:, k])

        handles.append(owner.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return torch.cat(gaps)
