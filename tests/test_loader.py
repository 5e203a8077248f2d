"""The loader's order and lifetime on the CPU: a demand load never waits behind queued prefetches, a call
waits only for the prefetches it needs, and close() returns with every copy finished."""

import torch

from offload_engine import copy_worker
from test_copy_worker import expert_from_disk, make_cache, mixtral_dir  # noqa: F401


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
    assert cache.loader._worker is None and not cache.ready and not cache.map.arriving
    assert all(_holds(cache, mixtral_dir, layer, e) for layer, e in keys)
