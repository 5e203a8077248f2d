"""On a CUDA GPU: exact output with pinned, asynchronous copies, and the memory budget as a hard cap."""

import pytest
import torch

import tiny_models as tm
from offload_engine import OffloadEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")

PROMPT = [5, 17, 33, 9, 70, 3, 44, 101]


def cuda_reference(name: str, path) -> list[int]:
    """Save a tiny `name` checkpoint to `path`; transformers' own greedy tokens for PROMPT on CUDA."""
    model = tm.build_reference(name)
    tm.save_checkpoint(model, path, "per_expert")
    model = model.to("cuda")
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return model.generate(torch.tensor([PROMPT], device="cuda"), do_sample=False, max_new_tokens=24,
                              pad_token_id=0)[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v3", "qwen2_moe", "gpt_oss"])
def test_cuda_greedy_matches_transformers_on_cuda(tmp_path, name):
    ref = cuda_reference(name, tmp_path)
    for slots in (2, 5, 1 << 20):
        engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype="float32", expert_slots=slots,
                                               progress=False)
        assert engine.store.mode == "pinned" and engine.cache.loader.non_blocking
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
    # the hard cap: what the caching allocator really holds (the KV cache is static, allocated up front)
    assert torch.cuda.max_memory_reserved() - base <= budget


@pytest.mark.parametrize("settings", [dict(policy="predictive", predictor="next-gate", prefetch_depth=2),
                                      dict(policy="predictive", predictor="history", prefetch_depth=1)])
def test_cuda_prefetch_never_changes_tokens(tmp_path, settings):
    ref = cuda_reference("mixtral", tmp_path)
    engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype="float32", expert_slots=4,
                                           progress=False, **settings)
    stats = engine.generate(PROMPT, max_new_tokens=24, ignore_eos=True).stats
    assert engine.generate(PROMPT, max_new_tokens=24, ignore_eos=True).token_ids == ref
    assert stats.prefetches > 0
    assert engine.cache.stats(None).copy_s >= 0
    engine.close()


def test_cuda_copy_times_reach_the_automatic_prefetch_depth(tmp_path):
    """CUDA copies are asynchronous: their events' times (read once done) feed the depth's load time."""
    model = tm.build_reference("mixtral")
    tm.save_checkpoint(model, tmp_path, "per_expert")
    engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype="float32", expert_slots=4,
                                           policy="predictive", predictor="next-gate", progress=False)
    stats = engine.generate(PROMPT, max_new_tokens=24, ignore_eos=True).stats
    assert stats.misses > 0 and stats.copy_s > 0
    assert engine.cache.copy_time > 0 and engine.runtime.load_time == engine.cache.copy_time
    assert 1 <= engine.runtime.depth() <= 3
    engine.close()


def test_a_prefetch_never_overwrites_a_slot_still_being_read(tmp_path):
    """A kernel queued on the compute stream reads slot s; a prefetch then claims s for another expert. The
    copy must wait for the kernel (the slot's last-use event): the kernel sees the old expert's bytes."""
    tm.save_checkpoint(tm.build_reference("mixtral"), tmp_path, "per_expert")
    engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype="float32", expert_slots=2,
                                           progress=False)
    cache = engine.cache
    slots = cache.fetch(0, [0, 1])
    torch.cuda.synchronize()
    old = cache.pool["gate_up_proj"][slots[0]].clone()
    stream = torch.cuda.current_stream()
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the read below starts
    seen = cache.pool["gate_up_proj"][slots[0]] * 1  # queued behind the sleep
    cache.used(slots)
    started = cache.prefetch([(1, 5)], protected={(0, 1)})  # evicts (0, 0): its slot is still being read
    assert started == 1 and cache.slot_of[(1, 5)] == slots[0]
    stream.synchronize()
    cache.drain()
    assert torch.equal(seen, old)
    assert not torch.equal(cache.pool["gate_up_proj"][slots[0]], old)  # and the prefetch did land afterwards


def test_pinned_store_is_one_registered_allocation(tmp_path):
    tm.save_checkpoint(tm.build_reference("mixtral"), tmp_path, "per_expert")
    engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype="float32", expert_slots=2,
                                           host_memory="pinned", progress=False)
    assert engine.store.pinned and engine.cache.loader.non_blocking
    first = engine.store.host[0]["gate_up_proj"]
    assert first.is_pinned()
    engine.close()
    assert not engine.store.pinned


def test_decode_waits_for_the_gpu_once_per_layer_call_and_step(tmp_path):
    """Under torch.cuda.set_sync_debug_mode every wait for the device warns, from the line that waited: the
    engine's are exactly its counted reads (host_read.py), in every mode; pinned copies never wait."""
    import warnings
    from pathlib import Path

    import offload_engine

    package = Path(offload_engine.__file__).resolve().parent
    tm.save_checkpoint(tm.build_reference("mixtral"), tmp_path, "per_expert")
    for settings in (dict(), dict(policy="predictive", predictor="next-gate", prefetch_depth=2),
                     dict(policy="predictive", predictor="history", cold_experts="auto"),
                     dict(cold_experts="cpu")):
        engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype="float32", expert_slots=3,
                                               host_memory="pinned", progress=False, **settings)
        engine.generate(PROMPT, max_new_tokens=3, ignore_eos=True)  # warm: first-use allocations
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                stats = engine.generate(PROMPT, max_new_tokens=6, ignore_eos=True).stats
        finally:
            torch.cuda.set_sync_debug_mode(0)
            engine.close()
        waits = [w for w in caught if "synchroniz" in str(w.message)]
        ours = [w for w in waits if package in Path(w.filename).resolve().parents]
        layers = engine.spec.num_moe_layers
        assert stats.host_syncs == 6 * (layers + 1), settings
        reads = [w for w in ours if Path(w.filename).name == "host_read.py"]
        others = [f"{Path(w.filename).name}:{w.lineno}" for w in ours if w not in reads]
        assert len(reads) == stats.host_syncs, settings
        # the one other wait: the copy times read once at the end for the stats (ExpertCache.stats)
        assert len(others) <= 1 and all(o.startswith("cache.py") for o in others), (settings, others)
        print(settings, "transformers' own waits:", sorted({f"{Path(w.filename).name}:{w.lineno}"
                                                            for w in waits if w not in ours}))


@pytest.mark.parametrize("share", [0, 1, 2])
def test_reserved_memory_stays_within_the_budget_at_the_planned_context(tmp_path, share):
    """The budget is a hard cap on what the caching allocator reserves: at the plan's minimum budget and a
    third and two thirds of the experts above it, with a prompt that fills the planned context."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from offload_engine.loading import inspect_checkpoint, make_plan
    from offload_engine.run_config import RunConfig

    config = Qwen3MoeConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                            num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                            num_experts=32, num_experts_per_tok=8, max_position_embeddings=2048,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp_path)
    run = RunConfig.build(device="cuda", max_context=1024, progress=False)
    plan = make_plan(inspect_checkpoint(tmp_path, run), run)
    budget = plan.minimum_bytes + (plan.total_experts - plan.min_slots) * share // 3 * plan.expert_bytes
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_reserved()
    engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", memory_budget=budget, max_context=1024,
                                           policy="predictive", predictor="next-gate", progress=False)
    result = engine.generate(list(range(10, 10 + 1024 - 32)), max_new_tokens=32, ignore_eos=True)
    engine.close()
    assert result.stats.misses > 0 or share == 2
    assert torch.cuda.max_memory_reserved() - base <= budget


def test_cuda_greedy_matches_transformers_with_the_same_static_cache(tmp_path):
    """The engine decodes into a StaticCache on CUDA; the reference here decodes into one too, so both take
    the same attention kernels: equal tokens in fp32 and in bf16."""
    from transformers import StaticCache

    model = tm.build_reference("qwen3_moe")
    tm.save_checkpoint(model, tmp_path, "per_expert")
    for dtype in (torch.float32, torch.bfloat16):
        ref_model = model.to("cuda", dtype)
        ref_model.generation_config.eos_token_id = None
        cache = StaticCache(config=ref_model.config, max_cache_len=64)
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([PROMPT], device="cuda"), do_sample=False, max_new_tokens=24,
                                     pad_token_id=0, past_key_values=cache)[0, len(PROMPT):].tolist()
        for slots in (2, 1 << 20):
            engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype=dtype, expert_slots=slots,
                                                   max_context=64, progress=False)
            assert engine.generate(PROMPT, max_new_tokens=24, ignore_eos=True).token_ids == ref, (dtype, slots)
            engine.close()


def test_a_failed_pin_leaves_no_cuda_error_behind():
    """cudaHostRegister of memory already registered fails; the engine warns, goes on with pageable memory,
    and the failure is not reported later by an unrelated kernel launch."""
    from offload_engine.experts.store import ExpertStore

    arena = torch.empty(1 << 20)
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(arena.data_ptr(), arena.numel() * 4, 0)) == 0
    try:
        store = object.__new__(ExpertStore)  # only the pinning step is exercised
        with pytest.warns(UserWarning, match="pinning"):
            assert not store._register(arena)
        torch.ones(4, device="cuda").add_(1)  # launch checks read the last error
        torch.cuda.synchronize()
    finally:
        cudart.cudaHostUnregister(arena.data_ptr())


@pytest.mark.parametrize("host", ["mmap", "files", "ram"])
def test_pageable_sources_go_through_pinned_bounce_buffers(tmp_path, host):
    """From the memory map, the files or pageable RAM every copy goes through the pinned bounce rings (the
    forward thread never blocks on the link), with the default prefetch window, and tokens are the
    reference's; the host waits only for its counted reads and for bounce buffers to come free."""
    import warnings
    from pathlib import Path

    import offload_engine

    package = Path(offload_engine.__file__).resolve().parent
    ref = cuda_reference("mixtral", tmp_path)
    for slots, settings in ((3, {}), (4, dict(policy="predictive", predictor="next-gate", prefetch_depth=2)),
                            (4, dict(policy="lru", predictor="history", prefetch_depth=2))):
        engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype="float32", expert_slots=slots,
                                               host_memory=host, progress=False, **settings)
        loader = engine.cache.loader
        assert loader.demand_ring is not None and loader.demand_ring.pinned and loader.non_blocking
        assert loader.window == loader.prefetch_ring.size
        engine.generate(PROMPT, max_new_tokens=3, ignore_eos=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                result = engine.generate(PROMPT, max_new_tokens=24, ignore_eos=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert result.token_ids == ref, (host, slots, settings)
        ours = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
                and package in Path(w.filename).resolve().parents]
        assert all(o.split(":")[0] in ("host_read.py", "loader.py", "cache.py") for o in ours), ours
        engine.close()
        assert loader.demand_ring.available() == loader.demand_ring.size
        assert loader.prefetch_ring.available() == loader.prefetch_ring.size


@pytest.mark.parametrize("case", ["mxfp4", "fp8"])
def test_cuda_quantized_checkpoints_match_their_dequantized_reference(tmp_path, case):
    """Slots on the GPU hold the stored bytes, expanded in the call by torch's ops: transformers' dequantized
    model on CUDA (fp32, so that the grouping of experts cannot round differently) gives the same tokens."""
    from tests import quantized_checkpoints as qc

    if case == "mxfp4":
        qc.save_mxfp4_checkpoint(qc.build_mxfp4_reference(), tmp_path)
    else:
        qc.save_fp8_checkpoint(tm.build_reference("qwen3_moe"), tmp_path)
    ref = qc.load_dequantized_reference(tmp_path, dtype=torch.float32).to("cuda")
    ref.generation_config.eos_token_id = None
    with torch.no_grad():
        want = ref.generate(torch.tensor([PROMPT], device="cuda"), do_sample=False, max_new_tokens=16,
                            pad_token_id=0)[0, len(PROMPT):].tolist()
    for slots in (2, 1 << 20):
        engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype="float32", expert_slots=slots,
                                               progress=False)
        assert engine.store.format.name == case and engine.cache.pool[engine.store.format.stored[0].name].is_cuda
        assert engine.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids == want


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_cuda_int_experts_expand_in_the_call_and_give_one_result_for_every_cache(tmp_path, kind):
    tm.save_checkpoint(tm.build_reference("mixtral"), tmp_path, "per_expert")
    runs = []
    for slots in (2, 1 << 20):
        engine = OffloadEngine.from_pretrained(tmp_path, device="cuda", dtype="float32", expert_slots=slots,
                                               expert_dtype=kind, progress=False)
        assert engine.store.format.expands and not engine.store.format.kernel
        runs.append(engine.generate(PROMPT, max_new_tokens=16, ignore_eos=True).token_ids)
    assert runs[0] == runs[1]
