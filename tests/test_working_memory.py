"""The memory plan's working memory covers what a full-context prefill really holds, top-2 to top-8: the
peak bytes of the tensors the forward creates (tests/live_bytes.py), less the KV cache the plan counts
apart, against the estimate less its fixed slack. The grouped experts function holds every routed
(token, expert) pair's hidden state, intermediate and output at once, so top-8 models need k x (3H + 3I)
per token where the estimate had k x 3I; fp32 and bf16 (whose weighted outputs are fp32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralConfig, OlmoeConfig, Qwen3MoeConfig

from live_bytes import LiveBytes
from offload_engine import OffloadEngine
from offload_engine.planning.memory_plan import WORKING_SLACK, kv_bytes_per_token

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0,
              tie_word_embeddings=False)
CONFIGS = {
    "top-8 (Qwen3-30B-A3B's ratios)": lambda: Qwen3MoeConfig(
        **COMMON, head_dim=16, intermediate_size=192, moe_intermediate_size=24, num_experts=16,
        num_experts_per_tok=8, norm_topk_prob=True),
    "top-8 (OLMoE's ratios)": lambda: OlmoeConfig(
        **COMMON, intermediate_size=32, num_experts=16, num_experts_per_tok=8),
    "top-16, 64 experts": lambda: Qwen3MoeConfig(
        **COMMON, head_dim=16, intermediate_size=192, moe_intermediate_size=16, num_experts=64,
        num_experts_per_tok=16, norm_topk_prob=True),
    "top-2 (Mixtral's ratios)": lambda: MixtralConfig(
        **COMMON, intermediate_size=224, num_local_experts=8, num_experts_per_tok=2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_working_memory_estimate_covers_a_full_context_prefill(tmp_path, name, dtype):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS[name](), dtype=dtype).save_pretrained(tmp_path)
    context = 768
    with OffloadEngine.from_pretrained(tmp_path, max_context=context, progress=False) as engine:
        assert engine.plan.expert_slots == engine.plan.total_experts  # the slot pool is allocated at load
        ids = torch.randint(3, 256, (1, context), generator=torch.Generator().manual_seed(1))
        tracker = LiveBytes()
        with torch.inference_mode(), tracker:
            engine.forward(engine.request(1), input_ids=ids, use_cache=True, logits_to_keep=1)
        kv = kv_bytes_per_token(engine.config, dtype) * context
        estimate = engine.plan.working_bytes - WORKING_SLACK
    held = tracker.peak - kv
    assert held <= estimate, f"{name}: a prefill held {held} bytes beyond the KV cache; the plan has {estimate}"
    assert held >= estimate / 4  # the measurement sees the forward's tensors (not a tracker that saw nothing)
