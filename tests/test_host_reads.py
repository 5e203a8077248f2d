"""The engine reads the device once per MoE layer call and once per decode step, whatever the policy, the
predictor, the cold-expert mode or the cache size: no other `.tolist()`, `.cpu()`, `.item()`, `bool()` or
data-dependent shape (`torch.where(mask)`, `unique`, `nonzero`) in the engine's own code touches a tensor the
model computed. On CUDA each of those would be a wait for the device (tests/test_gpu.py checks the same
count there under torch.cuda.set_sync_debug_mode); here a TorchFunctionMode sees every such call and the
frame it came from.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_reads import counting_reads
from offload_engine import DEFAULT_MODEL, OffloadEngine
from tiny_models import build_reference, save_checkpoint
def _decode_reads(engine, prompts, tokens=5):
    with counting_reads() as mode:
        results = engine.generate(prompts, max_new_tokens=tokens, ignore_eos=True)
    return mode, (results[0] if isinstance(results, list) else results).stats


CONFIGS = [  # (slots, policy, predictor, cold experts)
    (None, "lru", "none", "stream"),
    (12, "lru", "none", "stream"),
    (12, "predictive", "next-gate", "stream"),
    (12, "predictive", "history", "stream"),
    (12, "predictive", "learned", "stream"),
    (12, "lru", "none", "cpu"),
    (12, "predictive", "next-gate", "auto"),
    (4, "predictive", "learned", "cpu"),
]


@pytest.mark.parametrize("slots,policy,predictor,cold", CONFIGS)
def test_one_read_per_layer_call_and_per_step(slots, policy, predictor, cold):
    tokens = 5
    with OffloadEngine.from_pretrained(DEFAULT_MODEL, expert_slots=slots, policy=policy, predictor=predictor,
                                       cold_experts=cold, prefetch_depth=None if predictor == "none" else 2,
                                       progress=False) as engine:
        mode, stats = _decode_reads(engine, "The history of", tokens)
        layers = engine.spec.num_moe_layers
    assert mode.stray == []
    # prefill and tokens - 1 decode forwards, each a read per MoE layer; one read per step for its tokens
    assert mode.reads == tokens * (layers + 1)
    assert stats.host_syncs == mode.reads
    assert sum(layer["host_syncs"] for layer in stats.per_layer) == tokens * layers


def test_split_calls_and_a_batch_read_once_per_layer(tmp_path):
    """More experts than slots (groups, each expert on its own tokens) and CPU experts, batch 2, eager
    experts (the reference's own loop, reduced expert by expert): still one read per call."""
    path = save_checkpoint(build_reference("mixtral"), tmp_path / "m", "per_expert")
    with OffloadEngine.from_pretrained(path, dtype="float32", expert_slots=2, max_batch=2, policy="predictive",
                                       predictor="history", cold_experts="auto", progress=False) as engine:
        mode, stats = _decode_reads(engine, [[3, 4, 5], [9, 8]], tokens=4)
        layers = engine.spec.num_moe_layers
    assert mode.stray == []
    assert mode.reads == stats.host_syncs == 4 * (layers + 1)


def test_the_check_sees_a_stray_read(monkeypatch):
    """The check itself: a `.tolist()` of the routing planted in the runtime's own file is caught, and the
    counts still add up (the planted read is not read_to_host's)."""
    from offload_engine.experts import runtime as runtime_module

    planted = {"original": runtime_module.Runtime.layer_call}
    source = ("def layer_call(self, binding, hidden_states, top_k_index, top_k_weights):\n"
              "    top_k_index.tolist()\n"
              "    return original(self, binding, hidden_states, top_k_index, top_k_weights)\n")
    exec(compile(source, runtime_module.__file__, "exec"), planted)  # its frames are the runtime's file
    monkeypatch.setattr(runtime_module.Runtime, "layer_call", planted["layer_call"])
    with OffloadEngine.from_pretrained(DEFAULT_MODEL, expert_slots=12, progress=False) as engine:
        mode, stats = _decode_reads(engine, "The", 2)
        layers = engine.spec.num_moe_layers
    assert len(mode.stray) == 2 * layers and all(s.startswith("tolist at runtime.py") for s in mode.stray)
    assert mode.reads == stats.host_syncs == 2 * (layers + 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8), st.integers(8, 64), st.integers(0, 2**32 - 1))
def test_positions_equal_torch_where(tokens, k, experts, seed):
    """CallRouting's per-expert (tokens, ranks), on both of its paths (a Python loop for a few routings, a
    stable sort for many), against torch.where on the same ids."""
    import numpy as np
    import torch

    from offload_engine.experts.host_read import CallRouting

    k = min(k, experts)
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(experts, k, replace=False) for _ in range(tokens)]).astype(np.int64)
    routing = CallRouting(ids)
    assert routing.experts == sorted(set(ids.reshape(-1).tolist()))
    for e in range(experts):
        token_idx, rank = routing.positions(e)
        want = torch.where(torch.from_numpy(ids) == e)
        assert np.array_equal(token_idx, want[0].numpy()) and np.array_equal(rank, want[1].numpy())
