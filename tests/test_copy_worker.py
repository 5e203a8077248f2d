"""The compiled copier and its GIL-free thread, against plain numpy copies and file reads."""

import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_engine import CheckpointError
from offload_engine.experts import copy_worker as cw
from test_expert_cache import expert_from_disk, make_cache, mixtral_dir  # noqa: F401 (mixtral_dir: a fixture)

pytestmark = pytest.mark.skipif(not cw.available(), reason="compiled copies run on x86-64 only")


def memory_task(dst: np.ndarray, dst_at: int, src: np.ndarray, src_at: int, n: int) -> list[int]:
    return [dst.ctypes.data + dst_at, src.ctypes.data + src_at, n, -1, cw.CACHED]


def file_task(dst: np.ndarray, dst_at: int, fd: int, offset: int, n: int, how: int = cw.CACHED) -> list[int]:
    return [dst.ctypes.data + dst_at, offset, n, fd, how]


@pytest.fixture
def data_file(tmp_path):
    payload = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    path = tmp_path / "bytes.bin"
    path.write_bytes(payload.tobytes())
    fd = os.open(path, os.O_RDONLY)
    yield payload, fd, path
    os.close(fd)


spans = st.lists(st.tuples(st.integers(0, 1 << 15), st.integers(0, 1 << 15), st.integers(0, 1 << 14)),
                 min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(spans=spans, from_file=st.booleans())
def test_copy_now_equals_plain_copies(spans, from_file):
    payload = np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8)
    got = np.zeros(1 << 16, dtype=np.uint8)
    want = got.copy()
    path = f"/tmp/copy_worker_{os.getpid()}_{threading.get_ident()}.bin"
    with open(path, "wb") as f:
        f.write(payload.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        rows = []
        for dst_at, src_at, n in spans:
            want[dst_at:dst_at + n] = payload[src_at:src_at + n]  # in order: a later span overwrites an earlier one
            rows.append(file_task(got, dst_at, fd, src_at, n) if from_file else memory_task(got, dst_at, payload, src_at, n))
        assert cw.copy_now(np.array(rows, dtype=np.int64))
    finally:
        os.close(fd)
        os.unlink(path)
    assert np.array_equal(got, want)


def test_the_thread_copies_every_batch_across_ring_wraps_and_restarts(data_file, monkeypatch):
    payload, fd, _ = data_file
    monkeypatch.setattr(cw, "SPIN_POLLS", 20)  # the thread exits between batches: each post must restart it
    monkeypatch.setattr(cw, "IDLE_NAPS", 5)
    worker = cw.CopyWorker(capacity=8)
    out = np.zeros((40, 1024), dtype=np.uint8)
    tickets = []
    for b in range(10):  # 40 tasks through a ring of 8
        rows = [(memory_task(out[i], 0, payload, i * 1024, 1024) if i % 2 else file_task(out[i], 0, fd, i * 1024, 1024))
                for i in range(b * 4, b * 4 + 4)]
        tickets.append(worker.post(np.array(rows, dtype=np.int64)))
        if b % 3 == 0 and worker._thread is not None:
            worker._thread.join()  # idle: it has gone
    for ticket in tickets:
        ticket.result()
        assert ticket.done() and ticket.exception() is None
    assert np.array_equal(out.reshape(-1), payload[:40 * 1024])
    worker.close()
    assert worker._thread is None


def test_a_short_read_fails_its_batch_and_every_later_one_not_the_earlier(data_file):
    payload, fd, _ = data_file
    worker = cw.CopyWorker()
    out = np.zeros(3 * 4096, dtype=np.uint8)
    good = worker.post(np.array([file_task(out, 0, fd, 0, 4096)], dtype=np.int64))
    good.result()
    short = worker.post(np.array([file_task(out, 4096, fd, len(payload) - 100, 4096)], dtype=np.int64))  # past the end
    with pytest.raises(CheckpointError, match="reload the model"):
        short.result()
    later = worker.post(np.array([file_task(out, 8192, fd, 0, 4096)], dtype=np.int64))
    with pytest.raises(CheckpointError):  # the file is damaged: nothing read after it is trusted
        later.result()
    assert good.exception() is None
    assert np.array_equal(out[:4096], payload[:4096])
    assert not cw.copy_now(np.array([file_task(out, 0, fd, len(payload), 1)], dtype=np.int64))
    worker.close()


def test_the_cache_fills_cpu_slots_with_compiled_copies(mixtral_dir):  # noqa: F811
    for mode in ("mmap", "files", "ram"):
        cache = make_cache(mixtral_dir, 4, mode)
        assert cache.loader.compiled_copies
        slots = cache.fetch(1, [2, 5])
        cache.prefetch([(1, 6), (0, 3)], protected={(1, 2), (1, 5)})
        cache.drain()
        assert cache.loader.prefetch_fill.worker_started  # the prefetches went through the copy thread
        for (layer, e), slot in [((1, 2), slots[0]), ((1, 5), slots[1]), ((1, 6), cache.slot_of[1, 6]),
                                 ((0, 3), cache.slot_of[0, 3])]:
            gate_up, down = expert_from_disk(mixtral_dir, layer, e)
            tensors = cache.slot_tensors(slot)
            assert torch.equal(tensors["gate_up_proj"], gate_up) and torch.equal(tensors["down_proj"], down)
        cache.close()


def test_a_batch_task_rows_equal_each_experts_rows_placed_one_at_a_time(mixtral_dir):  # noqa: F811
    """SlotFill's task rows for a batch against the plain loop: each expert's spans from the store, its
    destination the pool's base of each tensor plus the slot times the tensor's stride, in the batch's order."""
    rng = np.random.default_rng(0)
    for mode in ("mmap", "files", "ram"):
        cache = make_cache(mixtral_dir, 4, mode)
        fill = cache.loader.prefetch_fill
        pool = list(cache.pool.values())
        for _ in range(20):
            layer = int(rng.integers(2))
            experts = rng.choice(8, int(rng.integers(1, 5)), replace=False).tolist()
            loads = [(e, int(rng.integers(4))) for e in experts]
            want = []
            for e, slot in loads:
                rows, _ = cache.store.copy_spans(layer, e)
                for param, offset, *rest in rows.tolist():
                    t = pool[param]
                    want.append([t.data_ptr() + slot * t[0].numel() * t.element_size() + offset, *rest])
            assert fill._copy_tasks(layer, loads).tolist() == want, (mode, layer, loads)
        cache.close()


def test_a_dtype_to_convert_keeps_torch_copies(mixtral_dir):  # noqa: F811
    from offload_engine.experts.cache import ExpertCache
    from offload_engine.experts.policies import LRUPolicy
    from offload_engine.experts.store import ExpertStore
    from offload_engine.loading import inspect_checkpoint
    from offload_engine.run_config import RunConfig

    inspected = inspect_checkpoint(mixtral_dir, RunConfig.build(device="cpu", expert_slots=2, progress=False))
    store = ExpertStore(inspected.tensors, inspected.layout, inspected.spec, torch.bfloat16, "mmap", progress=False)
    cache = ExpertCache(store, 2, "cpu", LRUPolicy())
    slot, = cache.fetch(0, [1])
    assert not cache.loader.compiled_copies
    gate_up, _ = expert_from_disk(mixtral_dir, 0, 1)
    assert torch.equal(cache.slot_tensors(slot)["gate_up_proj"], gate_up.bfloat16())


def test_a_file_cut_short_under_the_compiled_copies_is_an_error(mixtral_dir, tmp_path, monkeypatch):  # noqa: F811
    """Past the identity check (as if the file shrank between the check and the read): a short read, never a
    SIGBUS, and a one-line engine error."""
    import shutil

    path = tmp_path / "model"
    shutil.copytree(mixtral_dir, path)
    cache = make_cache(path, 2, "mmap")
    cache.fetch(0, [0])
    monkeypatch.setattr(type(cache.store), "check_sources", staticmethod(lambda files: None))
    os.truncate(path / "model.safetensors", 1024)
    with pytest.raises(CheckpointError, match="reload the model"):
        cache.fetch(1, [7])


# -- reads that bypass the page cache (the direct tier) -----------------------------------------------------
def _resident_pages(path) -> int:
    """Pages of `path` in the page cache: mincore over a fresh shared map of it (mapping reads nothing)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        try:
            assert libc.mincore(address, size, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(address, size)
        return sum(v & 1 for v in vec)
    finally:
        os.close(fd)


def _uncached_file(tmp_path, n=1 << 18, seed=3):
    payload = np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)
    path = tmp_path / "direct.bin"
    path.write_bytes(payload.tobytes())
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return payload, path, fd


@settings(max_examples=60, deadline=None)
@given(spans=st.lists(st.tuples(st.integers(0, (1 << 18) - 1), st.integers(0, 40_000)), min_size=1, max_size=8),
       scratch_pages=st.integers(1, 5))
def test_direct_reads_equal_plain_reads(tmp_path_factory, spans, scratch_pages):
    """Unaligned offsets and lengths, spans longer than the scratch buffer, and spans reaching the end of a
    file whose size is not a multiple of the block: the bytes equal a plain read's."""
    tmp = tmp_path_factory.mktemp("direct")
    payload, path, fd = _uncached_file(tmp, n=(1 << 18) - 777)
    direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
    scratch = cw.scratch_buffer(scratch_pages * cw.ALIGN)
    try:
        for offset, n in spans:
            offset %= len(payload)
            n = min(n, len(payload) - offset)
            got = np.zeros(n + 1, dtype=np.uint8)
            assert cw.copy_now(np.array([file_task(got, 0, direct, offset, n, cw.DIRECT)], dtype=np.int64), scratch)
            assert np.array_equal(got[:n], payload[offset:offset + n]) and got[n] == 0  # nothing past the span
        past_end = np.zeros(16, dtype=np.uint8)
        assert not cw.copy_now(np.array([file_task(past_end, 0, direct, len(payload) - 8, 16, cw.DIRECT)],
                                        dtype=np.int64), scratch)
    finally:
        os.close(direct)
        os.close(fd)


def test_direct_and_dropped_reads_leave_the_page_cache_empty(tmp_path):
    payload, path, fd = _uncached_file(tmp_path)
    direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        assert _resident_pages(path) == 0
        out = np.zeros(len(payload), dtype=np.uint8)
        rows = [file_task(out, i, direct, i, 10_000, cw.DIRECT) for i in range(5, len(payload) - 10_000, 30_011)]
        worker = cw.CopyWorker()
        worker.post(np.array(rows, dtype=np.int64)).result()  # the copy thread's own scratch
        worker.close()
        for offset, *_ in [(r[1],) for r in rows]:
            assert np.array_equal(out[offset:offset + 10_000], payload[offset:offset + 10_000])
        assert _resident_pages(path) == 0  # O_DIRECT: nothing went through the page cache
        dropped = np.zeros(100_000, dtype=np.uint8)
        assert cw.copy_now(np.array([file_task(dropped, 0, fd, 4096, 100_000, cw.DROP)], dtype=np.int64))
        assert np.array_equal(dropped, payload[4096:104_096])
        assert _resident_pages(path) <= 1  # read through the cache, then dropped
        cached = np.zeros(100_000, dtype=np.uint8)
        assert cw.copy_now(np.array([file_task(cached, 0, fd, 4096, 100_000)], dtype=np.int64))
        assert _resident_pages(path) >= 24  # the detector sees a cached read
    finally:
        os.close(direct)
        os.close(fd)
