"""The loader's order and lifetime on the CPU: a demand load never waits behind queued prefetches, a call
waits only for the prefetches it needs, and close() returns with every copy finished."""

import pytest
import torch

from offload_engine.experts import copy_worker
from test_copy_worker import expert_from_disk, make_cache, mixtral_dir  # noqa: F401
from test_exactness import checkpoints  # noqa: F401 (the shared fixture of tiny checkpoints)


def _hold_the_copy_thread(monkeypatch):
    """Prefetches stay queued: the copy thread is not started until released."""
    held = {"on": True}
    start = copy_worker.CopyWorker._ensure_running
    monkeypatch.setattr(copy_worker.CopyWorker, "_ensure_running",
                        lambda self: None if held["on"] else start(self))
    return held


def _holds(cache, mixtral_dir, layer, e):  # noqa: F811
    gate_up, down = expert_from_disk(mixtral_dir, layer, e)
    tensors = cache.slot_tensors(cache.slot_of[layer, e])
    return torch.equal(tensors["gate_up_proj"], gate_up) and torch.equal(tensors["down_proj"], down)


def test_a_demand_load_goes_before_queued_prefetches(mixtral_dir, monkeypatch):  # noqa: F811
    cache = make_cache(mixtral_dir, 6, "files")
    held = _hold_the_copy_thread(monkeypatch)
    assert cache.prefetch([(1, 6), (1, 7), (0, 3)], protected=set()) == 3
    queued = [cache.ready[cache.slot_of[key]] for key in ((1, 6), (1, 7), (0, 3))]
    assert not any(t.done() for t in queued)
    # a call needing other experts is served now, in this thread, while the prefetches wait
    slots = cache.fetch(0, [1, 2])
    assert all(_holds(cache, mixtral_dir, 0, e) for e in (1, 2))
    assert not any(t.done() for t in queued)
    held["on"] = False
    # a call needing a prefetched expert waits for it, and finds its bytes
    cache.fetch(1, [6])
    assert _holds(cache, mixtral_dir, 1, 6)
    cache.close()
    assert slots and all(t.done() for t in queued)


def test_close_waits_for_copies_in_flight(mixtral_dir):  # noqa: F811
    cache = make_cache(mixtral_dir, 16, "files")
    keys = [(layer, e) for layer in range(2) for e in range(8)]
    assert cache.prefetch(keys, protected=set()) == 16
    cache.close()  # the copy thread may be mid-copy: close returns once every copy has finished
    assert not cache.loader.prefetch_fill.worker_started and not cache.ready and not cache.map.arriving
    assert all(_holds(cache, mixtral_dir, layer, e) for layer, e in keys)


# -- the prefetch queue: at most `window` prefetched experts in flight ---------------------------------------
def test_a_queued_prefetch_the_routing_proved_wrong_is_dropped(mixtral_dir, monkeypatch):  # noqa: F811
    cache = make_cache(mixtral_dir, 6, "files", prefetch_window=1)
    held = _hold_the_copy_thread(monkeypatch)
    assert cache.prefetch([(1, 6), (1, 7), (0, 3)], protected=set()) == 3
    assert [t.layer_pos for t in cache.loader.queue] == [1, 0]  # (1, 6) started, the rest wait for room
    c0, c1 = cache.counters[0], cache.counters[1]
    assert (c0.prefetches, c1.prefetches) == (1, 2)
    # layer 0 routes to 1 and 2: its queued prefetch of expert 3 never starts, its slot serves a miss
    free_before = len(cache.map.free)
    cache.fetch(0, [1, 2])
    assert (0, 3) not in cache.slot_of and c0.prefetches_dropped == 1 and c0.prefetches == 0
    assert c0.bytes_to_device == 2 * cache.map.expert_bytes  # the two misses; the dropped prefetch moved nothing
    assert len(cache.map.free) == free_before - 1  # two misses took the freed slot and one free slot
    assert all(_holds(cache, mixtral_dir, 0, e) for e in (1, 2))
    assert cache.slot_table[0, 3] == -1
    # layer 1 routes to 7, still queued: it starts at once as a demand load, in this thread (the copy
    # thread is still held, and the started prefetch of 6 is not waited for)
    cache.fetch(1, [7])
    assert _holds(cache, mixtral_dir, 1, 7) and c1.prefetches_dropped == 0
    held["on"] = False
    cache.fetch(1, [6])
    assert _holds(cache, mixtral_dir, 1, 6) and c1.prefetch_hits == 2
    cache.close()
    assert not cache.loader.queue and not cache.ready and not cache.map.arriving


def test_queued_prefetches_start_as_the_window_frees(mixtral_dir, monkeypatch):  # noqa: F811
    cache = make_cache(mixtral_dir, 16, "files", prefetch_window=3)
    held = _hold_the_copy_thread(monkeypatch)
    keys = [(layer, e) for layer in range(2) for e in range(8)]
    assert cache.prefetch(keys, protected=set()) == 16
    assert sum(len(b.loads) for b in cache.loader.queue) == 13  # three started, and the copy thread is held
    cache._sweep()
    assert sum(len(b.loads) for b in cache.loader.queue) == 13  # nothing finished: no room
    held["on"] = False
    cache.drain()  # starts what waits, as room comes, and waits for all of it
    assert not cache.loader.queue and not cache.map.arriving
    assert all(_holds(cache, mixtral_dir, layer, e) for layer, e in keys)
    assert sum(c.prefetches for c in cache.counters) == 16 and not any(c.prefetches_dropped for c in cache.counters)
    cache.close()


# -- bounce buffers: the path CUDA takes from pageable memory, exercised with CPU buffers ---------------------
def test_bounce_buffers_carry_every_load_and_come_free_again(mixtral_dir):  # noqa: F811
    for mode in ("mmap", "files", "ram"):
        cache = make_cache(mixtral_dir, 8, mode, bounce=2)
        loader = cache.loader
        assert loader.window == 2 and loader.demand_ring.size == 2
        slots = cache.fetch(0, [0, 1, 2, 3, 4])  # five demand loads through two buffers
        assert all(_holds(cache, mixtral_dir, 0, e) for e in range(5)) and slots
        keys = [(1, e) for e in range(3)]
        cache.prefetch(keys, protected=set(), )
        cache.fetch(1, [0, 1, 2])  # waits for the started prefetches, promotes the queued one
        assert all(_holds(cache, mixtral_dir, 1, e) for e in range(3)), mode
        cache.close()
        assert loader.demand_ring.available() == 2 and loader.prefetch_ring.available() == 2


def test_a_failed_fill_of_a_bounce_buffer_is_an_error_and_frees_the_buffer(mixtral_dir, tmp_path, monkeypatch):  # noqa: F811
    import os
    import shutil

    import pytest

    from offload_engine import CheckpointError

    path = tmp_path / "model"
    shutil.copytree(mixtral_dir, path)
    cache = make_cache(path, 4, "files", bounce=2)
    cache.fetch(0, [0])
    monkeypatch.setattr(type(cache.store), "check_sources", staticmethod(lambda files: None))
    os.truncate(path / "model.safetensors", 1024)
    with pytest.raises(CheckpointError, match="reload the model"):
        cache.fetch(1, [7])
    assert (1, 7) not in cache.slot_of and cache.loader.demand_ring.available() == 2
    cache.prefetch([(1, 5)], protected=set())
    with pytest.raises(CheckpointError, match="reload the model"):
        cache.fetch(1, [5])  # the prefetch failed in the copy thread: the call that needs it says so
    assert (1, 5) not in cache.slot_of and cache.loader.prefetch_ring.available() == 2
    cache.close()


@pytest.mark.parametrize("loader", [dict(prefetch_window=1), dict(bounce=2), dict(prefetch_window=1, bounce=1)])
def test_a_window_and_bounce_buffers_never_change_tokens(checkpoints, loader, monkeypatch):  # noqa: F811
    """With every prefetch queued behind a one-expert window (most of them dropped or promoted) and every copy
    through bounce buffers, greedy tokens and logits are the reference's."""
    import functools

    from offload_engine import OffloadEngine, loading
    from offload_engine.experts.cache import ExpertCache
    from test_exactness import NEW_TOKENS, PROMPT, REL_TOL, engine_steps, max_rel_error

    monkeypatch.setattr(loading, "ExpertCache", functools.partial(ExpertCache, **loader))
    if loader.get("prefetch_window") == 1:  # no prefetch ever gets room: each is dropped or promoted at its call
        from offload_engine.experts.loader import Loader
        monkeypatch.setattr(Loader, "_room", lambda self: 0)
    dropped = 0
    for name in ("mixtral", "qwen3_moe"):
        path, ref_tokens, ref_logits = checkpoints(name)
        for slots, policy, predictor in ((4, "lru", "history"), (8, "predictive", "next-gate")):
            engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", expert_slots=slots,
                                                   progress=False, policy=policy, predictor=predictor,
                                                   prefetch_depth=2)
            where = f"{name}, {slots} slots, {policy}, {predictor}, {loader}"
            tokens, logits = engine_steps(engine, PROMPT)
            assert tokens.tolist() == ref_tokens.tolist(), where
            assert max_rel_error(logits, ref_logits) < REL_TOL, where
            result = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
            assert result.token_ids == ref_tokens[0].tolist(), where
            stats = result.stats
            assert stats.bytes_to_device == (stats.misses + stats.prefetches) * engine.store.expert_nbytes()
            dropped += stats.prefetches_dropped
            engine.cache.drain()
            assert {k: int(engine.cache.slot_table[k]) for k in engine.cache.slot_of} == engine.cache.slot_of
    if loader.get("prefetch_window") == 1:
        assert dropped > 0  # the history predictor's misses were dropped before they moved a byte


def test_the_summary_line_names_dropped_prefetches():
    from types import SimpleNamespace

    from cli.generate_cmd import stats_line

    base = dict(ttft_s=0.1, decode_tokens_per_s=10.0, hit_rate=0.5, hits=1, misses=1, bytes_to_device=10,
                cpu_experts=0, cpu_s=0.0, peak_device_bytes=0, prefetches=3)
    assert "3 prefetched, 2 dropped" in stats_line(SimpleNamespace(**base, prefetches_dropped=2))
    assert "dropped" not in stats_line(SimpleNamespace(**base, prefetches_dropped=0))
    on_cpu = {**base, "cpu_experts": 5, "cpu_s": 0.01}
    assert "5 experts on CPU (0.010 s, 2 packed for oneDNN)" in stats_line(
        SimpleNamespace(**on_cpu, prefetches_dropped=0, cpu_packed=2))
    assert "packed" not in stats_line(SimpleNamespace(**on_cpu, prefetches_dropped=0, cpu_packed=0))
    # every expert on the CPU: no lookup, which says nothing of whether there are slots (--cold-experts cpu has)
    none_looked_up = {**on_cpu, "hits": 0, "misses": 0, "hit_rate": 0.0, "prefetches": 0}
    line = stats_line(SimpleNamespace(**none_looked_up, prefetches_dropped=0, cpu_packed=0))
    assert "no expert slot looked up" in line and "hit rate" not in line
