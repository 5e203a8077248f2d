"""Offloading changes speed, never results: the engine against transformers' own model, in fp32.

For every architecture, on-disk layout and cache size (all experts resident, about a quarter, the smallest
the plan allows): 24 greedy tokens equal `generate`'s token for token, and every step's logits match
within 1e-5 relative to their scale.
"""

import warnings

import pytest
import torch

import tiny_models as tm
from offload_engine import OffloadEngine
from offload_engine.generation import SamplingConfig, decode_stream
from offload_engine.loading import inspect_checkpoint, make_plan
from offload_engine.run_config import RunConfig

NEW_TOKENS = 24
PROMPT = [5, 17, 33, 9, 70, 3, 44, 101]
REL_TOL = 1e-5

warnings.filterwarnings("ignore", category=FutureWarning)


def reference_no_eos(model, input_ids, attention_mask=None, max_new_tokens=NEW_TOKENS):
    """transformers' greedy generate, not stopping at EOS (the engine is run with ignore_eos to match)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=attention_mask, do_sample=False, max_new_tokens=max_new_tokens,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=model.config.pad_token_id)
    return out.sequences[:, input_ids.shape[1]:], torch.stack(out.logits, dim=1)  # [B, new], [B, new, V]


def engine_steps(engine, prompt_ids):
    ids = torch.tensor([prompt_ids])
    cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    steps = list(decode_stream(engine.model, ids, torch.ones_like(ids), cfg, engine.eos_ids(), engine.pad_id()))
    return torch.stack([s.tokens for s in steps], dim=1), torch.stack([s.logits for s in steps], dim=1)


def max_rel_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(name, layout) -> (directory, reference tokens, reference logits), built once per module."""
    made = {}

    def get(name, layout="per_expert"):
        if (name, layout) not in made:
            model = tm.build_reference(name)
            path = tmp_path_factory.mktemp(f"{name}-{layout}")
            tm.save_checkpoint(model, path, layout)
            tokens, logits = reference_no_eos(model, torch.tensor([PROMPT]))
            made[name, layout] = (path, tokens, logits)
        return made[name, layout]

    return get


def cache_sizes(path):
    """Slots for: every expert resident, about a quarter, and the plan's minimum (reached through a budget)."""
    run = RunConfig.build(device="cpu", expert_slots=1 << 20, progress=False)
    inspected = inspect_checkpoint(path, run)
    plan = make_plan(inspected, run)
    total = inspected.spec.total_experts
    return {
        "all": dict(expert_slots=total),
        "quarter": dict(expert_slots=max(inspected.spec.top_k, total // 4)),
        "minimum": dict(memory_budget=plan.minimum_bytes),
    }, inspected.spec


@pytest.mark.parametrize("layout", tm.LAYOUTS)
@pytest.mark.parametrize("name", list(tm.ARCHITECTURES))
def test_greedy_tokens_and_logits_match_transformers(checkpoints, name, layout):
    path, ref_tokens, ref_logits = checkpoints(name, layout)
    sizes, spec = cache_sizes(path)
    for label, size in sizes.items():
        engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", progress=False, **size)
        if label == "minimum":
            assert engine.plan.expert_slots == spec.top_k
        tokens, logits = engine_steps(engine, PROMPT)
        assert tokens.tolist() == ref_tokens.tolist(), f"{name}/{layout}/{label}: tokens differ"
        assert max_rel_error(logits, ref_logits) < REL_TOL, f"{name}/{layout}/{label}: logits differ"
        result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
        assert result.token_ids == ref_tokens[0].tolist()
        assert result.stats.hits + result.stats.misses > 0
        if label != "all":
            assert result.stats.misses > 0 and result.stats.bytes_to_device > 0
        assert engine.cache.num_slots == engine.plan.expert_slots


@pytest.mark.parametrize("name", tm.REQUIRED)
def test_padded_batch_matches_transformers(checkpoints, name):
    path, _, _ = checkpoints(name, "per_expert")
    prompts = [PROMPT, PROMPT[2:6], [7, 8, 9]]
    longest = max(map(len, prompts))
    ids = torch.tensor([[0] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    model = tm.build_reference(name)
    ref_tokens, _ = reference_no_eos(model, ids, mask, max_new_tokens=12)
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=4, max_batch=3, progress=False)
    results = engine.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert [r.token_ids for r in results] == ref_tokens.tolist()


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "qwen2_moe"])
def test_model_generate_agrees_with_engine_generate(checkpoints, name):
    path, ref_tokens, _ = checkpoints(name, "per_expert")
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=3, progress=False)
    engine.model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = engine.model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                    pad_token_id=0)
    assert out[0, len(PROMPT):].tolist() == ref_tokens[0].tolist()
    assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == ref_tokens[0].tolist()


def test_stops_at_eos_like_generate(tmp_path):
    """EOS ids from generation_config.json (as Qwen3 and Llama-3 ship them) end generation exactly where
    transformers' generate ends it, for a single prompt and for one row of a padded batch."""
    from transformers import AutoModelForCausalLM

    model = tm.build_reference("qwen2_moe")
    free, _ = reference_no_eos(model, torch.tensor([PROMPT]), max_new_tokens=40)
    free = free[0].tolist()
    stop = next(t for i, t in enumerate(free) if i >= 5 and t not in free[:i])  # first emitted at step >= 5
    model.generation_config.eos_token_id = [2, stop]
    model.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = [PROMPT, [7, 8, 9]]
    ids = torch.tensor([PROMPT, [0] * 5 + [7, 8, 9]])
    mask = (torch.arange(8) >= torch.tensor([[0], [5]])).long()
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40, pad_token_id=0)
    engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", expert_slots=2, max_batch=2, progress=False)
    assert stop in engine.eos_ids()
    single = engine.generate(PROMPT, max_new_tokens=40).token_ids
    assert single == free[:free.index(stop) + 1]  # stopped on the EOS, which is kept
    results = engine.generate(prompts, max_new_tokens=40)
    for row, result in enumerate(results):
        expected = out[row, 8:].tolist()
        if stop in expected:
            expected = expected[:expected.index(stop) + 1]
        assert result.token_ids == expected
    assert results[0].token_ids == single


def test_seeded_sampling_is_reproducible(checkpoints):
    path, _, _ = checkpoints("mixtral", "per_expert")
    engine = OffloadEngine.from_pretrained(path, device="cpu", expert_slots=4, progress=False)
    kwargs = dict(max_new_tokens=20, temperature=1.3, top_p=0.9, top_k=40, ignore_eos=True)
    a = engine.generate(PROMPT, seed=7, **kwargs).token_ids
    b = engine.generate(PROMPT, seed=7, **kwargs).token_ids
    c = engine.generate(PROMPT, seed=8, **kwargs).token_ids
    assert a == b
    assert a != c  # 20 tokens at temperature 1.3 over a 128-token vocabulary: equal by chance is negligible


def test_bf16_checkpoint_runs_in_fp32_exactly(tmp_path):
    """A bf16 checkpoint upcast by the engine equals transformers loading the same file in fp32."""
    from transformers import AutoModelForCausalLM

    model = tm.build_reference("mixtral").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ref_tokens, ref_logits = reference_no_eos(ref, torch.tensor([PROMPT]))
    engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", dtype="float32", expert_slots=3, progress=False)
    tokens, logits = engine_steps(engine, PROMPT)
    assert tokens.tolist() == ref_tokens.tolist()
    assert max_rel_error(logits, ref_logits) < REL_TOL


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_bf16_is_bit_identical_to_transformers_default(tmp_path, name):
    """In bf16, with a layer's experts able to fit at once, logits equal transformers' (its default experts
    implementation, dtype="auto") bit for bit; with fewer slots the tokens still match."""
    from transformers import AutoModelForCausalLM

    tm.build_reference(name).to(torch.bfloat16).save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.dtype == torch.bfloat16
    ref_tokens, ref_logits = reference_no_eos(ref, torch.tensor([PROMPT]))
    spec = inspect_checkpoint(tmp_path, RunConfig.build(device="cpu", expert_slots=1, progress=False)).spec
    # one layer's worth of slots: every call fits at once, and with several MoE layers it still offloads
    engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", expert_slots=spec.num_experts, progress=False)
    assert engine.plan.expert_slots < engine.plan.total_experts
    assert engine.store.dtype == torch.bfloat16
    tokens, logits = engine_steps(engine, PROMPT)
    assert tokens.tolist() == ref_tokens.tolist()
    assert torch.equal(logits, ref_logits)
    small = OffloadEngine.from_pretrained(tmp_path, device="cpu", expert_slots=engine.spec.top_k, progress=False)
    assert small.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == ref_tokens[0].tolist()


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_tied_embeddings(tmp_path, name):
    """tie_word_embeddings: lm_head is not on disk and must be the embedding itself."""
    config = tm.ARCHITECTURES[name]()
    config.tie_word_embeddings = True
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ref_tokens, ref_logits = reference_no_eos(ref, torch.tensor([PROMPT]))
    engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", expert_slots=3, progress=False)
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    tokens, logits = engine_steps(engine, PROMPT)
    assert tokens.tolist() == ref_tokens.tolist()
    assert max_rel_error(logits, ref_logits) < REL_TOL


@pytest.mark.parametrize("name", list(tm.ARCHITECTURES))
def test_a_static_kv_cache_gives_the_same_tokens_and_logits(checkpoints, name):
    """On CUDA the engine preallocates the KV cache to the planned context (StaticCache); the same decode path
    is checked here on the CPU. Models with a cache of their own keep it (MiniMax)."""
    from transformers import StaticCache

    path, ref_tokens, ref_logits = checkpoints(name, "per_expert")
    engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", expert_slots=3, max_context=64,
                                           progress=False)
    cache = engine._kv_cache(1)
    if not engine.model._can_compile_fullgraph:
        assert cache is None
        return
    assert isinstance(cache, StaticCache)
    ids = torch.tensor([PROMPT])
    cfg = SamplingConfig(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    steps = list(decode_stream(engine.model, ids, torch.ones_like(ids), cfg, set(), 0, cache=cache))
    tokens, logits = torch.stack([s.tokens for s in steps], 1), torch.stack([s.logits for s in steps], 1)
    assert tokens.tolist() == ref_tokens.tolist()
    assert max_rel_error(logits, ref_logits) < REL_TOL
