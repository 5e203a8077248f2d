"""The static KV cache the engine hands a CUDA generation is allocated before the first token, layer for
layer the same tensors transformers' StaticCache allocates inside the first forward, and the memory plan
counts exactly its bytes."""

import pytest
import torch
from transformers import StaticCache

import tiny_models as tm
from offload_engine.engine import static_kv_cache
from offload_engine.planning.memory_plan import kv_bytes_per_token

STATIC = [name for name in tm.ARCHITECTURES if getattr(tm.build_reference(name), "_can_compile_fullgraph", False)]


def test_most_architectures_take_a_static_cache():
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"} <= set(STATIC)


@pytest.mark.parametrize("name", STATIC)
def test_early_allocation_matches_transformers_lazy_one(name):
    model = tm.build_reference(name)
    rows, context = 2, 40
    early = static_kv_cache(model.config, rows, context, torch.float32, torch.device("cpu"))
    allocated = [(layer.keys.shape, layer.values.shape) for layer in early.layers if _initialized(layer)]
    assert allocated, "nothing was allocated before the first token"
    lazy = StaticCache(config=model.config, max_cache_len=context)
    ids = torch.tensor([[5, 17, 33, 9, 70], [3, 44, 101, 7, 8]])
    with torch.no_grad():
        reference = model(input_ids=ids, cache=lazy, use_cache=True).logits
        again = model(input_ids=ids, cache=early, use_cache=True).logits
    assert [(layer.keys.shape, layer.values.shape) for layer in lazy.layers if _initialized(layer)] == allocated
    torch.testing.assert_close(again, reference, rtol=0, atol=0)
    # the plan's count is an upper bound that is exact without sliding windows
    held = sum(layer.keys.numel() + layer.values.numel() for layer in early.layers if _initialized(layer)) * 4
    assert held <= kv_bytes_per_token(model.config, torch.float32) * context * rows
    if all(_initialized(layer) and not layer.is_sliding for layer in early.layers):
        assert held == kv_bytes_per_token(model.config, torch.float32) * context * rows


def _initialized(layer) -> bool:
    """An attention layer's keys and values exist (linear-attention layers keep small states of their own)."""
    return getattr(layer, "is_initialized", False)


GROWING = [name for name in tm.ARCHITECTURES if name not in STATIC]


@pytest.mark.parametrize("name", GROWING)
def test_the_plan_bounds_a_cache_that_grows(name):
    """A model without a static cache (MiniMax's own cache) grows its cache by concatenation up to the planned
    context: the plan counts what it holds then, plus one layer's keys and values for the moment a layer's old
    and new tensors both exist; and no more than that."""
    from offload_engine.planning.memory_plan import growing_kv_bytes

    model = tm.build_reference(name)
    rows, context = 2, 24
    ids = torch.randint(3, 100, (rows, context))
    with torch.no_grad():
        out = model(input_ids=ids[:, :8], use_cache=True)
        cache = out.past_key_values
        for t in range(8, context):  # decode to the planned context, a token at a time
            cache = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).past_key_values
    keys_values = [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if _initialized(layer)]
    states = [s.nbytes for s in getattr(cache, "linear_cache", []) if isinstance(s, torch.Tensor)]
    assert keys_values, "no attention layer cached anything"
    held = sum(keys_values) + sum(states)
    plan = growing_kv_bytes(model.config, torch.float32, context, rows)
    assert plan == held + max(keys_values)  # the end state, and one layer's copy while it grows: exactly
