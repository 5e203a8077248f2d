"""Random-weight checkpoints at the shapes of real MoE models, written one decoder layer at a time.

    python benchmarks/make_checkpoint.py --shape qwen3-30b-a3b --layers 4 [--dtype bf16] [--vocab N]
        [--format bf16|fp8|mxfp4] [--residual random|steady] [--report] --out DIR

Each shape is the model's real configuration (hidden size, experts, top-k, expert and shared-expert sizes,
attention, vocabulary) with as many decoder layers as asked (default: all). Weights are N(0, 0.02) (norms
one), drawn tensor by tensor and written as one safetensors shard per decoder layer plus one for the
embeddings and head, so no more than one layer is ever in memory. Router weights are scaled (`--router-scale`)
so that a token's top-k has clear margins instead of near-ties; the load balance this gives is printed by
`--report` (routing statistics of a short random prompt, through transformers' own model). `--residual steady`
makes the residual stream change little from layer to layer, as a trained model's does (STEADY_RESIDUAL), which
is what the next-gate predictor relies on; `--report` gives its recall one layer ahead.

`--vocab` shrinks the embedding and head for benchmarks whose subject is the MoE layers (Python time per
layer call, copies): the experts keep their real shape. `--layout hub` (the default) writes the tensor names
and per-expert split the published checkpoints use (transformers' own reverse conversion, as save_pretrained
does), which llama.cpp's converter also reads; `--layout fused` writes transformers' in-memory layout
([E, ...] expert tensors). Both the engine and `from_pretrained` read either. A tokenizer padded to the
vocabulary is written beside the weights (benchmarks/llamacpp/synthetic_tokenizer.py: byte-level BPE, the
model's pad/BOS/EOS ids), so `moe-offload generate --model DIR --prompt ...` and the GGUF conversion work.

`--format` writes the checkpoint as the pre-quantized releases ship (benchmarks/checkpoint_formats.py), still
shard by shard, the rest of the weights in bf16 and the quantization_config in config.json: `fp8` as
Qwen3-30B-A3B-FP8 / DeepSeek-V3 (every linear weight but the routers as float8_e4m3fn in 128x128 blocks with
fp32 `weight_scale_inv`; hub layout only; shapes whose weights a block neither divides nor covers are refused,
as transformers cannot read them: deepseek-v2-lite's), `mxfp4` as gpt-oss-20b (experts as MXFP4 blocks and
scales; gpt-oss-20b only). The random numbers are the same as the unquantized checkpoint's, before rounding.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: benchmarks.llamacpp is importable from the project root
    sys.path.insert(0, str(ROOT))

ROUTER_SCALE = 8.0  # router weights at 8 x 0.02: logit gaps of ~0.5 between neighbouring experts at H ~ 2048
INIT_STD = 0.02
# The residual stream of a trained model changes little from one layer to the next (that is what lets the next
# layer's router, applied early, predict it: 80-90% recall one layer ahead is reported for Mixtral). With every
# weight at N(0, 0.02) the first layer's output is ~20x the embeddings and each layer rewrites the stream
# (consecutive-layer cosine ~0.6, next-gate recall@8 0.35 at the Qwen3-30B-A3B shape). STEADY_RESIDUAL's
# embeddings at N(0, 1) and output projections at a quarter give cosine ~0.99 and recall@8 ~0.9 there.
STEADY_RESIDUAL = dict(embed_std=1.0, output_scale=0.25)
OUTPUT_PROJECTIONS = ("o_proj", "down_proj")  # what a layer adds to the residual stream through
RESIDUALS = {"random": dict(embed_std=INIT_STD, output_scale=1.0), "steady": STEADY_RESIDUAL}

# The published configurations (config.json of each model on the hub), less what only training reads.
SHAPES: dict[str, tuple[str, dict]] = {
    "mixtral-8x7b": ("mixtral", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645)),
    "olmoe-1b-7b": ("olmoe", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
        norm_topk_prob=False, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        clip_qkv=None, tie_word_embeddings=False, pad_token_id=1, eos_token_id=50279)),
    "deepseek-v2-lite": ("deepseek_v2", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512,
        q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_group=1, topk_group=1,
        topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=163840,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=100000,
        eos_token_id=100001)),
    "gpt-oss-20b": ("gpt_oss", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
        num_experts_per_tok=4, sliding_window=128, max_position_embeddings=131072, rope_theta=150000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=200002, pad_token_id=199999)),
}
LAYOUTS = ("hub", "fused")
FORMATS = ("bf16", "fp8", "mxfp4")  # bf16: unquantized, in --dtype
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class FormatRefused(ValueError):
    """A --format the shape or layout cannot be written in (one line, raised before anything is written)."""


def config_of(shape: str, layers: int | None = None, vocab: int | None = None, dtype: str = "bf16", **overrides):
    """The transformers config of `shape`, with `layers` decoder layers and, optionally, a smaller vocabulary
    (`overrides`: any other field, e.g. a shrunken copy for a dry run)."""
    from transformers import AutoConfig

    model_type, fields = SHAPES[shape]
    fields = {**fields, **overrides}
    if layers is not None:
        if not 1 <= layers <= fields["num_hidden_layers"]:
            raise SystemExit(f"--layers must be 1..{fields['num_hidden_layers']} for {shape}")
        fields["num_hidden_layers"] = layers
        if model_type == "gpt_oss":  # alternating sliding and full attention, as the real model
            fields["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if vocab is not None:
        fields["vocab_size"] = vocab
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if fields.get(key) is not None and fields[key] >= vocab:
                fields[key] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}[key]
    return AutoConfig.for_model(model_type, dtype={"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype],
                                **fields)


def write_random(config, out: Path, dtype: torch.dtype, seed: int = 0, router_scale: float = ROUTER_SCALE,
                 progress: bool = True, device: str = "cpu", layout: str = "hub", fmt: str = "bf16",
                 embed_std: float = INIT_STD, output_scale: float = 1.0) -> Path:
    """Write random weights for `config` to `out`, one shard per decoder layer (never the whole model in
    memory), with config.json, model.safetensors.index.json and a tokenizer. `device`: where the numbers are
    drawn (a GPU draws a Mixtral layer in milliseconds; the CPU takes seconds). `layout`: see LAYOUTS. `fmt`:
    see FORMATS (fp8 and mxfp4 store the unquantized rest in bf16, whatever `dtype`); a format the shape
    cannot take raises FormatRefused, before anything is written. `embed_std`, `output_scale`: the input
    embeddings' standard deviation and a factor on the output projections (see STEADY_RESIDUAL)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from tqdm.auto import tqdm

    from benchmarks import checkpoint_formats as cf
    from benchmarks.llamacpp.synthetic_tokenizer import write_for_config

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shapes = {name: (tuple(t.shape), t.dtype) for name, t in model.state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        m = LAYER.match(name)
        groups.setdefault(f"layer-{int(m.group(1)):03d}" if m else "embeddings", []).append(name)
    _check_format(model, shapes, groups, fmt, layout)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    names = sorted(groups)
    for i, group in enumerate(tqdm(names, desc="shards", unit="shard", disable=None if progress else True)):
        file = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        tensors = {}
        for name in groups[group]:
            shape, tdtype = shapes[name]
            tensors[name] = _random(name, shape, tdtype, generator, router_scale, device, embed_std,
                                    output_scale).cpu()
        if fmt == "mxfp4":  # gpt-oss publishes its runtime names, the experts fused
            tensors = cf.quantize_mxfp4_shard(tensors)
        elif layout == "hub":  # the published names and split; the same numbers
            tensors = {k: t.contiguous() for k, t in revert_weight_conversion(model, tensors).items()}
        if fmt == "fp8":
            tensors = cf.quantize_fp8_shard(tensors)
        for name, t in tensors.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        del tensors
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.architectures = [type(model).__name__]  # as published; llama.cpp's converter goes by it
    config.save_pretrained(out)
    if fmt != "bf16":
        raw = json.loads((out / "config.json").read_text())
        routers = sorted({n.removesuffix(".weight") for n, (shape, _) in shapes.items() if _is_router(n, shape)},
                         key=lambda n: (len(n), n))
        raw.update(dtype="bfloat16", quantization_config=cf.mxfp4_config() if fmt == "mxfp4" else
                   cf.fp8_config(["lm_head", "model.embed_tokens"] + routers))
        (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    try:
        write_for_config(out, config.to_dict())
    except ValueError as e:  # a vocabulary cut below the 256 byte symbols: benchmarks that feed ids only
        print(f"no tokenizer written: {e}", file=sys.stderr)
    return out


def _check_format(model, shapes: dict, groups: dict, fmt: str, layout: str) -> None:
    """Refuse, in one line, a format this shape or layout cannot be written in (nothing is written yet)."""
    from transformers.core_model_loading import revert_weight_conversion

    from benchmarks import checkpoint_formats as cf

    model_type = model.config.model_type
    if fmt == "mxfp4" and model_type != "gpt_oss":
        raise FormatRefused(f"--format mxfp4 is gpt-oss's format (gpt-oss-20b); {model_type} ships no MXFP4 checkpoint")
    if fmt != "fp8":
        return
    if layout != "hub":
        raise FormatRefused("--format fp8 writes the hub's per-expert layout, as the FP8 releases do; "
                         "drop --layout fused")
    for names in groups.values():  # the on-disk shapes, from meta tensors: nothing drawn
        meta = {n: torch.empty(shapes[n][0], dtype=shapes[n][1], device="meta") for n in names}
        for key, t in revert_weight_conversion(model, meta).items():
            if cf.is_fp8_target(key, t.shape) and cf.fp8_block_misfit(t.shape):
                raise FormatRefused(f"--format fp8: {key} {list(t.shape)} is neither divided nor covered by "
                                 f"{list(cf.FP8_BLOCK)} blocks, which transformers cannot read; {model_type} "
                                 "at this width cannot be written in block FP8")


def _random(name: str, shape: tuple, dtype: torch.dtype, generator: torch.Generator, router_scale: float,
            device: str = "cpu", embed_std: float = INIT_STD, output_scale: float = 1.0):
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name and leaf == "weight" and len(shape) == 1:
        return torch.ones(shape, dtype=dtype)
    if leaf.endswith("bias") or "bias" in leaf or leaf == "sinks":
        return (torch.randn(shape, generator=generator, device=device) * INIT_STD).to(dtype)
    t = torch.empty(shape, dtype=dtype, device=device)
    t.normal_(0.0, embed_std if "embed_tokens" in name else INIT_STD, generator=generator)
    if _is_router(name, shape):
        t.mul_(router_scale)
    elif any(f".{p}" in name for p in OUTPUT_PROJECTIONS):
        t.mul_(output_scale)
    return t


def _is_router(name: str, shape: tuple) -> bool:
    return len(shape) == 2 and (".mlp.gate.weight" in name or ".mlp.router.weight" in name)


def report(out: Path, tokens: int = 64, seed: int = 0, m: int = 16) -> dict:
    """Routing statistics of a random prompt through transformers' own model: per MoE layer, the share of
    routings the busiest expert takes (1/E is perfectly balanced, 1 collapsed), how many experts were used, and
    SRP at segment length m (docs/routing-consistency.md); and the next-gate predictor's recall@k one layer ahead
    (layer l+1's norm and router on the residual entering layer l's MoE block; None where not every layer is one). Random tokens carry no text's locality: what SRP
    remains is what the random weights' routing gives by itself."""
    import numpy as np

    from offload_engine.tracing.consistency import srp
    from offload_engine.tracing.trace_file import RoutingTrace

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    picks, residuals = [], []
    routers = {name: m for name, m in model.named_modules() if _is_router(name + ".weight", (1, 1))}
    hooks = [m.register_forward_hook(lambda mod, args, outputs: picks.append(outputs[2].flatten()))
             for m in routers.values()]
    layers = [layer for layer in model.model.layers if hasattr(layer, "post_attention_layernorm")]
    hooks += [layer.post_attention_layernorm.register_forward_hook(  # the residual entering the MoE block
        lambda mod, args, outputs: residuals.append(args[0].reshape(-1, args[0].shape[-1]))) for layer in layers]
    with torch.inference_mode():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    next_gate = None
    if len(routers) == len(layers) == len(residuals) > 1:  # every layer a MoE layer: next-gate as the engine reads it
        found = total = 0
        with torch.inference_mode():
            for layer, router in enumerate(list(routers.values())[1:]):
                predicted = router(layers[layer + 1].post_attention_layernorm(residuals[layer]))[2]
                chosen = picks[layer + 1].view(tokens, -1)
                found += int((predicted.unsqueeze(-1) == chosen.unsqueeze(-2)).any(-1).sum())
                total += chosen.numel()
        next_gate = round(found / total, 3)
    E = next(getattr(model.config, key) for key in ("num_experts", "num_local_experts", "n_routed_experts")
             if getattr(model.config, key, None))
    routed = torch.stack([p.view(tokens, -1) for p in picks], dim=1)  # [T, L, k]
    trace = RoutingTrace(expert_ids=routed[None].numpy().astype(np.int16), num_experts=E,
                         moe_layers=np.arange(len(picks)))
    rows = []
    for layer, p in enumerate(picks):
        counts = torch.bincount(p, minlength=E).float()
        rows.append({"layer": layer, "busiest_share": round(float(counts.max() / counts.sum()), 3),
                     "experts_used": int((counts > 0).sum()), "experts": E,
                     f"srp_m{m}": round(srp(trace, m, layer).srp, 3)})
    return {"tokens": tokens, "experts": E, "top_k": routed.shape[-1], f"srp_m{m}": round(srp(trace, m).srp, 3),
            "next_gate_recall_1_ahead": next_gate, "layers": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--shape", required=True, choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: all of the model's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (default: the model's)")
    parser.add_argument("--layout", choices=LAYOUTS, default="hub",
                        help="hub: the published tensor names (per-expert); fused: transformers' in-memory layout")
    parser.add_argument("--format", choices=FORMATS, default="bf16", dest="fmt",
                        help="bf16: unquantized, in --dtype; fp8: every linear weight but the routers as "
                             "float8_e4m3fn in 128x128 blocks, as Qwen3-30B-A3B-FP8 / DeepSeek-V3 (hub layout; "
                             "shapes whose dims 128 neither divides nor covers are refused); mxfp4: the experts "
                             "as MXFP4, as gpt-oss-20b (gpt-oss-20b only). Quantized formats keep the rest in bf16")
    parser.add_argument("--router-scale", type=float, default=ROUTER_SCALE)
    parser.add_argument("--residual", choices=RESIDUALS, default="random",
                        help="random: every weight N(0, 0.02), each layer rewrites the residual stream; steady: "
                             "embeddings N(0, 1) and output projections x0.25, so it changes little from layer to "
                             "layer, as in trained models (next-gate recall@8 ~0.9 at the Qwen3-30B-A3B shape)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="print the routing balance of a random prompt")
    parser.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda: much faster)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"{args.out} is not empty; give a new folder")
    if args.fmt != "bf16" and args.dtype != "bf16":
        raise SystemExit(f"--format {args.fmt} keeps the unquantized weights in bf16, as the releases do; drop --dtype")
    config = config_of(args.shape, args.layers, args.vocab, args.dtype)
    try:
        write_random(config, args.out, DTYPES[args.dtype], args.seed, args.router_scale, device=args.device,
                     layout=args.layout, fmt=args.fmt, **RESIDUALS[args.residual])
    except FormatRefused as e:
        raise SystemExit(str(e)) from None
    size = sum(f.stat().st_size for f in args.out.glob("*.safetensors"))
    print(f"{args.shape}: {config.num_hidden_layers} layers, {size / 2**30:.2f} GiB in {args.out}", file=sys.stderr)
    if args.report:
        print(json.dumps(report(args.out), indent=1))


if __name__ == "__main__":
    main()
