"""On a CUDA GPU: exact output with pinned, asynchronous copies, and the memory budget as a hard cap."""

import pytest
import torch

import tiny_models as tm
from offload_engine import OffloadEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

PROMPT = [5, 17, 33, 9, 70, 3, 44, 101]


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "qwen2_moe", "gpt_oss"])
def test_cuda_greedy_matches_transformers_on_cuda(tmp_path, name):
    model = tm.build_reference(name)
    tm.save_checkpoint(model, tmp_path, "per_expert")
    model = model.to("cuda")
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = model.generate(torch.tensor([PROMPT], device="cuda"), do_sample=False, max_new_tokens=24,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    for slots in (2, 5, 1 << 20):
        engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype="float32", expert_slots=slots,
                                               progress=False)
        assert engine.store.mode == "pinned" and engine.cache.non_blocking
        assert engine.generate(PROMPT, max_new_tokens=24, ignore_eos=True).token_ids == ref


def test_peak_device_memory_stays_within_budget(tmp_path):
    from transformers import MixtralConfig

    config = MixtralConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    budget = 96 * 1024**2
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", memory_budget=budget, max_context=1024,
                                           progress=False)
    assert engine.plan.expert_slots < engine.plan.total_experts  # the budget forces offloading
    result = engine.generate(list(range(10, 500)), max_new_tokens=64, ignore_eos=True)
    assert result.stats.misses > 0
    assert torch.cuda.max_memory_allocated() - base <= budget
