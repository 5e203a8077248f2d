"""Quantized experts: pre-quantized checkpoints (MXFP4, FP8 blocks) against transformers' dequantized reference,
the formats' kernels against plain-loop twins, --expert-dtype int8/int4, and the bad input each format can meet.

The references are transformers' own models of the same tiny checkpoints, loaded with its dequantizing path on
the CPU (tests/quantized_checkpoints.py). Their experts are expanded by the same formulas, so the engine's
logits are bit for bit the reference's with every expert resident, and its tokens equal at every cache size,
cold-expert mode and host memory mode.
"""

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tiny_models as tm
from offload_engine import DEFAULT_MODEL, OffloadEngine
from offload_engine.checkpoint.quantization import read_quantization
from offload_engine.cli.main import main
from offload_engine.errors import CheckpointError, OffloadEngineError, UnsupportedModelError
from offload_engine.experts.formats import fp8_block, int_weight, mxfp4
from offload_engine.generation import SamplingConfig, decode_stream
from benchmarks.checkpoint_formats import quantize_fp8_block
from tests import quantized_checkpoints as qc

PROMPT = [5, 17, 33, 9, 70, 3, 44, 101]
NEW_TOKENS = 12
CASES = ("mxfp4-gpt_oss", "fp8-qwen3_moe", "fp8-deepseek_v3")

warnings.filterwarnings("ignore", category=FutureWarning)


def steps(engine, prompt=PROMPT, new=NEW_TOKENS):
    ids = torch.tensor([prompt])
    cfg = SamplingConfig(max_new_tokens=new, ignore_eos=True)
    out = list(decode_stream(engine.model, ids, torch.ones_like(ids), cfg, engine.eos_ids(), engine.pad_id()))
    return torch.stack([s.tokens for s in out], dim=1), torch.stack([s.logits for s in out], dim=1)


def write(case, path):
    fmt, name = case.split("-", 1)
    if fmt == "mxfp4":
        qc.save_mxfp4_checkpoint(qc.build_mxfp4_reference(), path)
    else:
        qc.save_fp8_checkpoint(tm.build_reference(name), path)
    return path


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """case -> (directory, reference tokens [1, new], reference logits [1, new, V])."""
    made = {}

    def get(case):
        if case not in made:
            path = write(case, tmp_path_factory.mktemp(case))
            ref = qc.load_dequantized_reference(path)
            ref.generation_config.eos_token_id = None
            ids = torch.tensor([PROMPT])
            with torch.no_grad():
                out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True,
                                   pad_token_id=ref.config.pad_token_id)
            made[case] = (path, out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1))
        return made[case]

    return get


@pytest.mark.parametrize("case", CASES)
def test_every_expert_resident_is_bit_for_bit_the_dequantized_reference(quantized, case):
    path, want, logits = quantized(case)
    engine = OffloadEngine.from_pretrained(path, expert_slots=10**6, progress=False)
    assert engine.store.format.name == case.split("-")[0]
    tokens, got = steps(engine)
    assert torch.equal(tokens, want)
    assert torch.equal(got, logits.to(got.dtype))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cold, host", [("stream", None), ("cpu", None), ("auto", None), ("stream", "files"),
                                        ("stream", "ram"), ("stream", "direct"), ("cpu", "files")])
def test_tokens_equal_the_reference_at_the_smallest_cache_in_every_mode(quantized, case, cold, host):
    path, want, _ = quantized(case)
    engine = OffloadEngine.from_pretrained(path, expert_slots=2, cold_experts=cold, host_memory=host, progress=False)
    tokens, _ = steps(engine)
    assert torch.equal(tokens, want)
    stats = engine.cache.stats(engine.runtime.standing.counters)  # forwards outside the API count there
    assert stats.misses > 0 or cold == "cpu"
    # a miss moves the stored bytes: values and scales, never the expanded expert
    assert stats.bytes_to_device == (stats.misses + stats.prefetches) * engine.store.format.expert_nbytes()
    engine.close()


@pytest.mark.parametrize("case", CASES)
def test_slots_and_the_plan_hold_the_stored_bytes(quantized, case, capsys):
    path, _, _ = quantized(case)
    engine = OffloadEngine.from_pretrained(path, expert_slots=3, progress=False)
    fmt = engine.store.format
    stored = {t.name: (t.dtype, t.shape) for t in fmt.stored}
    assert {n: (t.dtype, tuple(t.shape[1:])) for n, t in engine.cache.pool.items()} == stored
    kinds = {dtype for dtype, _ in stored.values()}
    assert (torch.uint8 in kinds) if fmt.name == "mxfp4" else (torch.float8_e4m3fn in kinds)
    assert engine.plan.expert_bytes == sum(t.nbytes for t in fmt.stored) < fmt.runtime_nbytes()
    assert main(["plan", "--model", str(path), "--expert-slots", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["expert_bytes"] == engine.plan.expert_bytes and report["expert_format"] == fmt.name
    assert report["non_experts_expanded"] == (fmt.name == "fp8")  # FP8 attention, expanded at load
    assert main(["plan", "--model", str(path), "--expert-slots", "3"]) == 0
    text = capsys.readouterr().out
    assert "experts held as" in text and ("expanded from FP8 at load" in text) == (fmt.name == "fp8")


# -- the formats' arithmetic against plain loops -----------------------------------------------------------


def test_mxfp4_expansion_is_its_loop_twin_and_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 6, 2, 16), dtype=torch.uint8, generator=g)
    scales = torch.randint(120, 134, (2, 6, 2), dtype=torch.uint8, generator=g)
    got = mxfp4.dequantize(blocks, scales, torch.bfloat16)
    assert got.shape == (2, 64, 6)
    for e in range(2):
        assert torch.equal(got[e], mxfp4.dequantize_loop(blocks[e], scales[e], torch.bfloat16))
    assert torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16))


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
def test_fp8_expansion_is_its_loop_twin_and_transformers(scale_dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    g = torch.Generator().manual_seed(1)
    values = (torch.randn(2, 8, 12, generator=g) * 100).to(torch.float8_e4m3fn)
    scales = (torch.rand(2, 2, 3, generator=g) + 0.01).to(scale_dtype)
    got = fp8_block.dequantize(values, scales, torch.bfloat16)
    for e in range(2):
        assert torch.equal(got[e], fp8_block.dequantize_loop(values[e], scales[e], torch.bfloat16))
        assert torch.equal(got[e], Fp8Dequantize(None)._dequantize_one(values[e], scales[e], torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_cpu_expansions_are_torchs_bit_for_bit(dtype):
    """cpu_expand.py's loops against the formats' torch ops (what CUDA runs), at a size with several tiles and
    blocks, every FP8 byte and MXFP4 code and a wide range of scales."""
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 256, (2, 256, 384), dtype=torch.uint8, generator=g)
    codes[codes & 0x7F == 0x7F] = 0  # e4m3fn's NaN bytes: a damaged file's, not compared
    values = codes.view(torch.float8_e4m3fn)
    scales = torch.exp(torch.randn(2, 2, 3, generator=g) * 8)
    assert torch.equal(fp8_block.dequantize(values, scales, dtype), fp8_block.dequantize_torch(values, scales, dtype))
    blocks = torch.randint(0, 256, (2, 300, 3, 16), dtype=torch.uint8, generator=g)
    exps = torch.randint(100, 160, (2, 300, 3), dtype=torch.uint8, generator=g)
    assert torch.equal(mxfp4.dequantize(blocks, exps, dtype), mxfp4.dequantize_torch(blocks, exps, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_and_int4_round_trips_are_their_loop_twins(dtype):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(2)) * 0.02
    q, scale = int_weight.quantize_int8(w, dtype)
    close(int_weight.dequantize_int8(q, scale, torch.float32), int_weight.int8_loop(w, dtype), scale.float())
    codes, sz = int_weight.quantize_int4(w, 32, dtype)
    assert sz.shape == (2, 6, 2) and int(codes.max()) <= 15
    assert torch.equal(int_weight.unpack_int4(int_weight.pack_int4(codes)), codes)
    loop = int_weight.int4_loop(w, 32, dtype)
    close(int_weight.dequantize_int4(codes, sz, torch.float32), loop, sz[..., 0].transpose(0, 1).float())


def close(got, want, step):
    """Equal but for a rare code chosen one step apart: a rounding tie computed in fp32 here, float64 there."""
    diff = (got - want).abs()
    per_row = step.reshape(step.shape[0], -1).amax(dim=-1, keepdim=True) * 1.01
    assert bool((diff <= per_row).all()) and (diff > 1e-6).float().mean() < 0.02


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_cpu_kernels_compute_the_expanded_weights(kind, dtype):
    """torch's weight-only kernels read the stored form as the expansion formula says (the CUDA path expands)."""
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(4)).to(dtype)
    spec = type("Spec", (), {"expert_params": (type("P", (), {"name": "down_proj", "shape": (48, 128)})(),),
                             "top_k": 1})()
    on_cpu = int_weight.IntWeight(spec, dtype, kind, on_cpu=True)
    expanded = int_weight.IntWeight(spec, dtype, kind, on_cpu=False)
    assert on_cpu.kernel and not expanded.kernel and expanded.expands
    stored = {}
    for fmt in (on_cpu, expanded):
        out = {t.name: torch.empty(t.shape, dtype=t.dtype) for t in fmt.stored}
        fmt.encode({"down_proj": w}, out)
        stored[fmt.kernel] = out
    kernel = on_cpu.linear(x, stored[True], "down_proj").float()
    weight = expanded.expand({n: t[None] for n, t in stored[False].items()})["down_proj"][0]
    reference = x.float() @ weight.float().T
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (kernel - reference).abs().max() <= tol * reference.abs().max()


# -- int8 / int4 at load --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundled_bf16():
    return steps(OffloadEngine.from_pretrained(DEFAULT_MODEL, expert_slots=192, progress=False),
                 prompt=list(range(300, 340)), new=16)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_int_experts_give_the_same_tokens_whatever_the_cache_and_the_mode(kind, bundled_bf16):
    """Computed expert by expert with the packed kernels wherever they run: one result for every budget."""
    runs = []
    for slots, cold, host, cpu_layers in [
            (192, "stream", None, 0), (4, "stream", None, 0), (24, "cpu", None, 0), (24, "auto", None, 0),
            (24, "stream", "mmap", 0), (24, "cpu", "mmap", 0), (24, "auto", "mmap", 0), (24, "stream", "direct", 0),
            (24, "stream", "mmap", 3)]:
        engine = OffloadEngine.from_pretrained(DEFAULT_MODEL, expert_dtype=kind, expert_slots=slots,
                                               cold_experts=cold, host_memory=host, cpu_moe_layers=cpu_layers,
                                               progress=False)
        assert engine.store.mode == (host or "ram") and engine.store.format.kernel
        runs.append(steps(engine, prompt=list(range(300, 340)), new=16))
        engine.close()
    for tokens, logits in runs[1:]:
        assert torch.equal(tokens, runs[0][0]) and torch.equal(logits, runs[0][1])
    ref_logits = bundled_bf16[1].float()
    rel = ((runs[0][1].float() - ref_logits).abs().max() / ref_logits.abs().max()).item()
    assert 0 < rel < (0.05 if kind == "int8" else 0.25)


def test_int_bytes_per_expert_are_about_half_and_a_quarter_of_bf16():
    sizes = {kind: OffloadEngine.from_pretrained(DEFAULT_MODEL, expert_dtype=kind, expert_slots=8,
                                                 progress=False).plan.expert_bytes
             for kind in ("auto", "int8", "int4")}
    assert 0.50 <= sizes["int8"] / sizes["auto"] <= 0.53
    assert 0.25 <= sizes["int4"] / sizes["auto"] <= 0.29


def test_int8_where_the_kernel_would_crash_expands_instead(tmp_path):
    """torch 2.13's int8 kernel crashes the process in bf16 where an input size is not a multiple of 16 (the
    tiny model's experts take 24): such a model expands its int8 experts instead, and runs."""
    tm.save_checkpoint(tm.build_reference("qwen3_moe").to(torch.bfloat16), tmp_path, "per_expert")
    engine = OffloadEngine.from_pretrained(tmp_path, expert_dtype="int8", expert_slots=3, progress=False)
    assert engine.store.dtype == torch.bfloat16 and not engine.store.format.kernel
    assert len(engine.generate(PROMPT, max_new_tokens=6, ignore_eos=True).token_ids) == 6


@pytest.mark.parametrize("name", ["fp8", "mxfp4", "int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_plan_holds_what_expanding_a_decode_steps_experts_holds(name, dtype):
    """The working memory the plan adds for a format covers the bytes expanding top_k experts really holds
    (every tensor created, measured by tests/live_bytes.py), at Qwen3-30B-A3B's expert shape."""
    from live_bytes import LiveBytes

    from offload_engine.experts.formats import expert_format

    class Spec:
        model_type, top_k = "gpt_oss", 8
        expert_params = tuple(type("P", (), {"name": n, "shape": s})() for n, s in
                              (("gate_up_proj", (1536, 2048)), ("down_proj", (2048, 768))))

    quantization = {"fp8": {"quant_method": "fp8", "weight_block_size": [128, 128]},
                    "mxfp4": {"quant_method": "mxfp4"}}.get(name)
    fmt = expert_format(Spec, dtype, quantization, None if quantization else name, on_cpu=False,
                        transposed=name == "mxfp4")
    pool = {t.name: torch.zeros((Spec.top_k + 2, *t.shape), dtype=t.dtype) for t in fmt.stored}
    with LiveBytes() as held:
        fmt.expand(pool, list(range(1, Spec.top_k + 1)))  # as a layer call expands its slots
    assert held.peak <= fmt.expand_bytes(1) <= 2 * held.peak


def test_int_experts_of_a_tiny_model_match_their_own_expansion_in_fp32(tmp_path):
    """A model whose sizes the int4 kernels cannot take (inputs of 24) expands instead; fp32 so that the two
    paths' rounding cannot differ: the kernel path and the expanded path give the same tokens."""
    tm.save_checkpoint(tm.build_reference("qwen3_moe"), tmp_path, "per_expert")
    engine = OffloadEngine.from_pretrained(tmp_path, expert_dtype="int4", expert_slots=3, progress=False)
    assert not engine.store.format.kernel and engine.store.format.expands
    int8 = OffloadEngine.from_pretrained(tmp_path, expert_dtype="int8", expert_slots=3, progress=False)
    assert not int8.store.format.kernel  # 24 inputs: not a multiple of 16 (see the test above)
    assert steps(engine)[0].shape == steps(int8)[0].shape == (1, NEW_TOKENS)


# -- bad input -------------------------------------------------------------------------------------------------


def damage(path, match, change):
    tensors = load_file(path / "model.safetensors")
    for key in [k for k in tensors if match(k)][:1]:
        change(tensors, key)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("where", ["experts", "attention"])
def test_a_nan_fp8_scale_is_refused_at_load(tmp_path, where):
    path = write("fp8-qwen3_moe", tmp_path)
    needle = ".mlp.experts." if where == "experts" else ".self_attn.q_proj."

    def nan(tensors, key):
        tensors[key][0, 0] = float("nan")

    damage(path, lambda k: needle in k and k.endswith("weight_scale_inv"), nan)
    with pytest.raises(CheckpointError, match="NaN, infinite or negative"):
        OffloadEngine.from_pretrained(path, expert_slots=2, progress=False)


def test_a_nan_mxfp4_scale_is_refused_at_load(tmp_path):
    path = write("mxfp4-gpt_oss", tmp_path)
    damage(path, lambda k: k.endswith("_scales"), lambda t, k: t[k].view(-1)[0].fill_(255))
    with pytest.raises(CheckpointError, match="NaN scale"):
        OffloadEngine.from_pretrained(path, expert_slots=2, progress=False)


def test_scales_of_the_wrong_shape_or_dtype_are_refused(tmp_path):
    shape = write("fp8-qwen3_moe", tmp_path / "shape")
    damage(shape, lambda k: ".experts.3.up_proj.weight_scale_inv" in k, lambda t, k: t.update({k: t[k][:2]}))
    with pytest.raises(CheckpointError, match="do not make|block scales"):
        OffloadEngine.from_pretrained(shape, expert_slots=2, progress=False)
    dtype = write("mxfp4-gpt_oss", tmp_path / "dtype")
    damage(dtype, lambda k: k.endswith("_scales"), lambda t, k: t.update({k: t[k].view(torch.int8)}))
    with pytest.raises(CheckpointError, match="is int8, where .* needs uint8"):
        OffloadEngine.from_pretrained(dtype, expert_slots=2, progress=False)


def test_blocks_that_do_not_divide_the_weight_are_refused(tmp_path):
    path = write("fp8-qwen3_moe", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [16, 16]  # the experts' 24 rows: not a whole number
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not divided by the checkpoint's blocks"):
        OffloadEngine.from_pretrained(path, expert_slots=2, progress=False)


def test_fp8_tensors_under_a_config_without_quantization_are_refused(tmp_path):
    """A config.json that lost its quantization_config (or holds an empty one) would cast FP8 values without
    their scales: refused, naming the tensor."""
    path = write("fp8-qwen3_moe", tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="float8_e4m3fn, a quantized tensor, but config.json has no"):
        OffloadEngine.from_pretrained(path, expert_slots=2, progress=False)


def test_a_non_expert_scale_grid_that_does_not_tile_its_weight_is_refused(tmp_path):
    path = write("fp8-qwen3_moe", tmp_path)
    damage(path, lambda k: k.endswith("self_attn.q_proj.weight_scale_inv"), lambda t, k: t.update({k: t[k][:3]}))
    with pytest.raises(CheckpointError, match="not one scale a block"):
        OffloadEngine.from_pretrained(path, expert_slots=2, progress=False)


def test_a_partial_last_fp8_block_outside_the_experts_is_read_block_by_block(tmp_path):
    """DeepSeek-V3's kv_a_proj_with_mqa has 576 rows in blocks of 128: a partial last block, which
    transformers' CPU dequantization cannot read (it takes rows // grid rows as the block). The engine reads
    it block by block, as the GPU kernels do: the reference is transformers on those weights dequantized here
    (20 rows in blocks of 8 in this tiny model)."""
    from benchmarks.checkpoint_formats import is_fp8_target

    from transformers import DeepseekV3Config

    fields = {k: v for k, v in tm._config("deepseek_v3").to_dict().items() if k not in ("qk_head_dim", "head_dim")}
    config = DeepseekV3Config(**{**fields, "qk_rope_head_dim": 4})  # kv_a_proj_with_mqa: 16 + 4 = 20 rows
    model = tm.build_reference("deepseek_v3", config=config).to(torch.bfloat16)
    fp8, plain = tmp_path / "fp8", tmp_path / "plain"
    model.save_pretrained(fp8)
    model.save_pretrained(plain)
    tensors = load_file(fp8 / "model.safetensors")
    dequantized = dict(tensors)
    for key, w in list(tensors.items()):
        if not is_fp8_target(key, w.shape):
            continue
        rows = w.shape[0]
        q, scale = quantize_fp8_block(torch.nn.functional.pad(w.float(), (0, 0, 0, -rows % 8)), (8, 8))
        tensors[key], tensors[key + "_scale_inv"] = q[:rows], scale
        full = scale.repeat_interleave(8, 0).repeat_interleave(8, 1)[:, :w.shape[1]]
        dequantized[key] = (q.float() * full)[:rows].to(torch.bfloat16)
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (3, 4)
    save_file(tensors, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    save_file(dequantized, str(plain / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((fp8 / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [8, 8]}
    (fp8 / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16).eval()
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
    engine = OffloadEngine.from_pretrained(fp8, expert_slots=10**6, progress=False)
    assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == want


def test_a_missing_expert_scale_is_named(tmp_path):
    path = write("fp8-qwen3_moe", tmp_path)
    damage(path, lambda k: k.endswith("experts.0.up_proj.weight_scale_inv"), lambda t, k: t.pop(k))
    with pytest.raises(CheckpointError, match=r"experts\.0\.up_proj\.weight_scale_inv is missing"):
        OffloadEngine.from_pretrained(path, expert_slots=2, progress=False)


def test_mxfp4_outside_gpt_oss_and_fused_fp8_experts_are_refused(tmp_path):
    """Checkpoints transformers itself cannot read as quantized: no reference to match, so no tokens."""
    path = write("fp8-qwen3_moe", tmp_path / "mx")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="MXFP4 for gpt-oss only"):
        OffloadEngine.from_pretrained(path, progress=False)
    fused = tmp_path / "fused"
    tm.save_checkpoint(tm.build_reference("qwen3_moe"), fused, "fused")
    tensors = load_file(fused / "model.safetensors")
    for key in [k for k in list(tensors) if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        values, scales = zip(*[quantize_fp8_block(w.to(torch.bfloat16), (8, 8)) for w in tensors[key]])
        tensors[key], tensors[key + "_scale_inv"] = torch.stack(values), torch.stack(scales)
    save_file(tensors, str(fused / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fused / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [8, 8]}
    (fused / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="fused into one"):
        OffloadEngine.from_pretrained(fused, progress=False)


@pytest.mark.parametrize("quantization, needle", [
    ({"quant_method": "gptq", "bits": 4}, "GPTQ"), ({"quant_method": "awq"}, "AWQ"),
    ({"load_in_4bit": True}, "bitsandbytes"), ({"quant_method": "bitsandbytes"}, "bitsandbytes"),
    ({"quant_method": "gguf"}, "GGUF"), ({"quant_method": "compressed-tensors"}, "compressed-tensors"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "e5m2"),
    ({"quant_method": "fp8"}, "without weight_block_size"),
])
def test_formats_we_do_not_read_are_named_in_one_line(tmp_path, capsys, quantization, needle):
    tm.save_checkpoint(tm.build_reference("mixtral"), tmp_path, "per_expert")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = quantization
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=needle):
        OffloadEngine.from_pretrained(tmp_path, progress=False)
    code = main(["plan", "--model", str(tmp_path), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and "%|" not in line]
    assert code == 2 and len(err) == 1 and needle in err[0] and "the engine reads" in err[0]


def test_expert_dtype_on_a_quantized_checkpoint_is_refused(quantized):
    path, _, _ = quantized("fp8-qwen3_moe")
    with pytest.raises(UnsupportedModelError, match="quantized already"):
        OffloadEngine.from_pretrained(path, expert_dtype="int4", progress=False)
    with pytest.raises(OffloadEngineError, match="unknown expert dtype"):
        OffloadEngine.from_pretrained(path, expert_dtype="int3", progress=False)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["quant_method", "fmt", "weight_block_size", "load_in_4bit", "bits"]),
                       json_values | st.sampled_from(["fp8", "mxfp4", "gptq", "e4m3", [128, 128]]), max_size=4),
       st.booleans())
def test_any_quantization_config_is_read_or_refused_in_one_line(quantization, wrap):
    """Whatever config.json holds: the config back (a format the engine reads, fields checked), or one of the
    engine's errors in one line; never another exception."""
    raw = {"model_type": "mixtral", "quantization_config": quantization if wrap else [quantization]}
    try:
        got = read_quantization(raw, "config.json")
    except OffloadEngineError as e:
        assert "\n" not in str(e)
        return
    if got is not None:
        assert got["quant_method"] in ("mxfp4", "fp8")
        if got["quant_method"] == "fp8":
            block = got["weight_block_size"]
            assert len(block) == 2 and all(type(b) is int and b >= 1 for b in block)
            assert math.prod(block) >= 1


def test_simulate_turns_budgets_into_the_slots_of_each_format(tmp_path, capsys):
    trace = tmp_path / "t.npz"
    prose = Path(__file__).resolve().parent / "data" / "val_sample" / "en.txt"
    assert main(["trace", "--input", f"prose={prose}", "--seq-len", "32", "--max-seqs", "2",
                 "--out", str(trace), "--quiet"]) == 0
    capsys.readouterr()
    slots = {}
    for kind in ("auto", "int8", "int4"):
        assert main(["simulate", str(trace), "--memory-budget", "60MiB", "--max-context", "512", "--expert-dtype",
                     kind, "--policies", "lru", "--json", "--quiet"]) == 0
        report = json.loads(capsys.readouterr().out)
        slots[kind] = report["budgets"]["60MiB"]["slots"]
        engine = OffloadEngine.from_pretrained(DEFAULT_MODEL, memory_budget="60MiB", max_context=512,
                                               expert_dtype=kind, progress=False)
        assert slots[kind] == engine.plan.expert_slots and str(slots[kind]) in report
    assert slots["auto"] < slots["int8"] < slots["int4"]


def test_calibrate_measures_experts_in_the_format_they_run_in(tmp_path):
    """A profile of int4 experts: their stored bytes, and the time of the packed kernel the engine uses."""
    import tomllib

    out = tmp_path / "int4.toml"
    assert main(["calibrate", "--device", "cpu", "--expert-dtype", "int4", "--out", str(out), "--quiet"]) == 0
    table = tomllib.loads(out.read_text())["hardware"]
    int4 = OffloadEngine.from_pretrained(DEFAULT_MODEL, expert_dtype="int4", expert_slots=8, progress=False)
    assert table["model"]["expert_bytes"] == int4.plan.expert_bytes
    assert all(t > 0 for t in table["cpu_expert_s"].values())


@pytest.mark.parametrize("case", ["mxfp4-gpt_oss", "fp8-qwen3_moe"])
def test_the_torch_expansion_cuda_runs_matches_the_reference_in_fp16(tmp_path, case):
    """fp16 has no compiled CPU loop: the experts expand through the formats' torch ops, the path CUDA takes,
    and the tokens are transformers' dequantized model's in fp16 at every cache size."""
    path = write(case, tmp_path)
    ref = qc.load_dequantized_reference(path, dtype=torch.float16)
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
    for slots in (2, 10**6):
        engine = OffloadEngine.from_pretrained(path, dtype="float16", expert_slots=slots, progress=False)
        assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == want
