"""The expert cache and store: misses, hits, LRU victims, slot contents, and the memory plan's arithmetic."""

import pytest
import torch
from safetensors import safe_open

import tiny_models as tm
from offload_engine import OffloadEngine
from offload_engine.errors import MemoryBudgetError
from offload_engine.experts.cache import ExpertCache
from offload_engine.experts.policies import LRUPolicy
from offload_engine.experts.store import ExpertStore
from offload_engine.loading import inspect_checkpoint, make_plan
from offload_engine.planning.memory_plan import kv_bytes_per_token, parse_bytes
from offload_engine.run_config import RunConfig


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mixtral")
    tm.save_checkpoint(tm.build_reference("mixtral"), path, "per_expert")
    return path


def make_cache(path, slots, mode="mmap", **loader):
    """`loader`: the loader's prefetch_window and bounce (experts/cache.py)."""
    run = RunConfig.build(device="cpu", expert_slots=slots, progress=False)
    inspected = inspect_checkpoint(path, run)
    store = ExpertStore(inspected.tensors, inspected.layout, inspected.spec, torch.float32, mode, progress=False)
    return ExpertCache(store, slots, "cpu", LRUPolicy(), **loader)


def expert_from_disk(path, layer, e):
    """Mixtral expert e of layer `layer`, assembled by hand from the per-expert w1/w3/w2 tensors."""
    with safe_open(path / "model.safetensors", "pt") as f:
        get = lambda n: f.get_tensor(f"model.layers.{layer}.block_sparse_moe.experts.{e}.{n}.weight")
        return torch.cat([get("w1"), get("w3")]), get("w2")


def test_cold_miss_then_warm_hit(mixtral_dir):
    cache = make_cache(mixtral_dir, 3)
    cache.fetch(0, [5])
    assert (cache.counters[0].hits, cache.counters[0].misses) == (0, 1)
    cache.fetch(0, [5])
    assert (cache.counters[0].hits, cache.counters[0].misses) == (1, 1)
    assert cache.counters[0].bytes_to_device == cache.store.expert_nbytes()
    cache.fetch(1, [5])  # same expert id, another layer: a different expert
    assert cache.counters[1].misses == 1


def test_lru_victim_is_least_recently_used(mixtral_dir):
    cache = make_cache(mixtral_dir, 3)
    for e in (0, 1, 2):
        cache.fetch(0, [e])
    cache.fetch(0, [0])  # 1 is now the oldest
    cache.fetch(0, [7])
    assert (0, 1) not in cache.slot_of
    assert {(0, 0), (0, 2), (0, 7)} == set(cache.slot_of)
    assert cache.counters[0].evictions == 1


def test_reused_slot_holds_the_new_experts_exact_bytes(mixtral_dir):
    cache = make_cache(mixtral_dir, 2)
    cache.fetch(1, [3, 4])
    slot_of_3 = cache.slot_of[(1, 3)]
    cache.fetch(1, [6])  # evicts 3 (older than 4)
    assert cache.slot_of[(1, 6)] == slot_of_3
    gate_up, down = expert_from_disk(mixtral_dir, 1, 6)
    assert torch.equal(cache.pool["gate_up_proj"][slot_of_3], gate_up)
    assert torch.equal(cache.pool["down_proj"][slot_of_3], down)


def test_a_layer_call_never_evicts_its_own_experts(mixtral_dir):
    cache = make_cache(mixtral_dir, 2)
    cache.fetch(0, [0, 1])
    slots = cache.fetch(0, [1, 2])  # must evict 0, not 1
    assert set(cache.slot_of) == {(0, 1), (0, 2)} and len(set(slots)) == 2
    with pytest.raises(ValueError):
        cache.fetch(0, [1, 2, 3])


def test_slot_count_is_never_exceeded(mixtral_dir):
    cache = make_cache(mixtral_dir, 4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        layer = int(torch.randint(0, 2, (1,), generator=gen))
        experts = torch.randperm(8, generator=gen)[:2].tolist()
        slots = cache.fetch(layer, experts)
        assert len(cache.slot_of) <= 4 and all(0 <= s < 4 for s in slots)
        for e, s in zip(experts, slots):
            assert cache.key_in[s] == (layer, e)
        table = {(l, e): int(cache.slot_table[l, e]) for l in range(2) for e in range(8)}
        assert {k: v for k, v in table.items() if v >= 0} == cache.slot_of  # the gather table mirrors the map
    stats = cache.stats()
    assert stats.hits + stats.misses == 400
    assert stats.bytes_to_device == stats.misses * cache.store.expert_nbytes()


@pytest.mark.parametrize("mode", ["ram", "files", "mmap"])
def test_store_modes_serve_identical_experts(mixtral_dir, mode):
    cache = make_cache(mixtral_dir, 2, mode)
    cache.fetch(0, [2])
    gate_up, down = expert_from_disk(mixtral_dir, 0, 2)
    slot = cache.slot_of[(0, 2)]
    assert torch.equal(cache.pool["gate_up_proj"][slot], gate_up)
    assert torch.equal(cache.pool["down_proj"][slot], down)


def test_budget_sets_slots_and_is_never_exceeded(mixtral_dir):
    run = RunConfig.build(device="cpu", expert_slots=1, progress=False)
    inspected = inspect_checkpoint(mixtral_dir, run)
    minimum = make_plan(inspected, RunConfig.build(device="cpu", expert_slots=2, progress=False)).minimum_bytes
    expert = inspected.spec.expert_numel() * 4
    for extra in (0, 1, 3, 5, 100):
        budget = minimum + extra * expert + expert // 2
        plan = make_plan(inspected, RunConfig.build(device="cpu", memory_budget=budget, progress=False))
        assert plan.expert_slots == min(2 + extra, inspected.spec.total_experts)
        assert plan.total_bytes <= budget
    with pytest.raises(MemoryBudgetError, match="at least"):
        make_plan(inspected, RunConfig.build(device="cpu", memory_budget=minimum - 1, progress=False))
    engine = OffloadEngine.from_pretrained(mixtral_dir, device="cpu", memory_budget=minimum + expert, progress=False)
    assert engine.cache.num_slots == 3
    assert engine.plan.non_expert_bytes + engine.cache.nbytes <= minimum + expert


def test_parse_bytes():
    assert parse_bytes("6GiB") == 6 * 1024**3
    assert parse_bytes("6 GB") == 6 * 10**9
    assert parse_bytes("1.5g") == int(1.5 * 1024**3)
    assert parse_bytes("512MiB") == 512 * 1024**2
    for bad in ("", "six GiB", "5 parsecs", "-1GiB", "0"):
        with pytest.raises(MemoryBudgetError):
            parse_bytes(bad)


@pytest.mark.parametrize("name", list(tm.ARCHITECTURES))
def test_kv_formula_covers_the_real_cache(name):
    """The planned KV bytes per token are at least what transformers' cache really holds."""
    model = tm.build_reference(name)
    ids = torch.arange(3, 19)[None]
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.cache if hasattr(out, "cache") else out.past_key_values
    held = 0
    for layer in cache.layers:
        for attr in ("keys", "values"):
            t = getattr(layer, attr, None)
            if isinstance(t, torch.Tensor):
                held += t.numel() * t.element_size()
    assert held <= kv_bytes_per_token(model.config, torch.float32) * ids.shape[1]


@pytest.mark.parametrize("layout", ["fused", "sharded"])
def test_read_on_demand_modes_equal_host_memory(tmp_path, layout):
    """mmap and files read each expert of a fused or sharded checkpoint exactly as the RAM copy holds it."""
    tm.save_checkpoint(tm.build_reference("qwen3_moe"), tmp_path, layout)
    caches = {mode: make_cache(tmp_path, 4, mode) for mode in ("ram", "files", "mmap")}
    for cache in caches.values():
        cache.fetch(0, [0, 3, 7, 5])
    for name in caches["ram"].pool:
        assert torch.equal(caches["files"].pool[name], caches["ram"].pool[name])
        assert torch.equal(caches["mmap"].pool[name], caches["ram"].pool[name])


def test_a_prefetch_batch_that_fails_to_start_leaves_no_layer_looking_resident(mixtral_dir):
    """Prefetches start one loader task per layer; if starting one fails, the layers after it were never
    loaded: none of their keys may stay in the map or the gather table (a call would read unwritten slots)."""
    cache = make_cache(mixtral_dir, 4)

    def refuse(layer_pos, loads, c, demand):
        raise OSError("the loader could not start")

    cache._load = refuse
    with pytest.raises(OSError, match="could not start"):
        cache.prefetch([(0, 1), (1, 2), (1, 3)], set())
    assert (1, 2) not in cache.slot_of and (1, 3) not in cache.slot_of
    assert int(cache.slot_table[1, 2]) == int(cache.slot_table[1, 3]) == -1


def test_every_experts_module_forwards_to_the_layer_call_it_was_bound_with(mixtral_dir):
    """offloaded_experts.py never names the runtime: each binding is given the layer call it forwards to when
    the model is loaded (the runtime's), so the dependency runs one way, runtime -> offloaded_experts."""
    with OffloadEngine.from_pretrained(mixtral_dir, expert_slots=4, progress=False) as engine:
        bindings = [engine.model.get_submodule(path)._offload for path in engine.spec.experts_paths]
        assert all(b.layer_call == engine.runtime.layer_call for b in bindings)
        seen = []

        def counted(binding, *args, inner=engine.runtime.layer_call):
            seen.append(binding.layer_pos)
            return inner(binding, *args)

        for b in bindings:
            b.layer_call = counted
        engine.generate([5, 17, 33], max_new_tokens=1, ignore_eos=True)
    assert sorted(set(seen)) == list(range(len(bindings)))
