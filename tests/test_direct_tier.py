"""The direct tier (--host-memory direct, for models larger than RAM): experts read from the files without the
page cache give the reference's tokens at every cache size, in every layout and cold-expert mode, with
prediction and prefetch, and leave nothing of the experts in the page cache."""

import os

import pytest

import tiny_models as tm
from offload_engine import OffloadEngine
from offload_engine.experts import copy_worker
from test_copy_worker import _resident_pages
from test_exactness import NEW_TOKENS, PROMPT, REL_TOL, cache_sizes, checkpoints, engine_steps, max_rel_error  # noqa: F401

pytestmark = pytest.mark.skipif(not copy_worker.available(), reason="compiled copies run on x86-64 only")

SETTINGS = {
    "lru": {},
    "next-gate, predictive, prefetch 2": dict(policy="predictive", predictor="next-gate", prefetch_depth=2),
    "cold experts on the cpu": dict(cold_experts="cpu"),
}


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_direct_reads_never_change_tokens(checkpoints, name, layout):  # noqa: F811
    path, ref_tokens, ref_logits = checkpoints(name, layout)
    sizes, spec = cache_sizes(path)
    for size, size_args in sizes.items():
        for label, settings in SETTINGS.items():
            engine = OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", host_memory="direct",
                                                   progress=False, **size_args, **settings)
            tokens, logits = engine_steps(engine, PROMPT)
            where = f"{name}/{layout}/{size}/{label}"
            assert tokens.tolist() == ref_tokens.tolist(), where
            assert max_rel_error(logits, ref_logits) < REL_TOL, where
            engine.close()


def test_experts_are_read_unaligned_and_leave_the_page_cache_empty(tmp_path):
    tm.save_checkpoint(tm.build_reference("mixtral"), tmp_path, "per_expert")
    shard = tmp_path / "model.safetensors"
    engine = OffloadEngine.from_pretrained(tmp_path, device="cpu", dtype="float32", host_memory="direct",
                                           expert_slots=4, progress=False)
    rows, _ = engine.store.copy_spans(0, 1)
    how = set(rows[:, 5].tolist())
    assert how <= {copy_worker.DIRECT, copy_worker.DROP}
    assert engine.cache.loader.window == 2 * engine.spec.top_k  # from the disk, stale prefetches are dropped
    assert any(offset % copy_worker.ALIGN for offset in rows[:, 2]), "no expert starts off a block boundary"
    fd = os.open(shard, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # as after a drop of the page cache
    os.close(fd)
    before = _resident_pages(shard)
    stats = engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).stats
    assert stats.misses > 8
    grown = _resident_pages(shard) - before
    assert grown <= 2, f"{grown} pages of the checkpoint entered the page cache"  # the drop's edge pages at most
    # the same decode through the page cache fills it: the detector sees what direct reads avoid
    files = OffloadEngine.from_pretrained(tmp_path, device="cpu", dtype="float32", host_memory="files",
                                          expert_slots=4, progress=False)
    fd = os.open(shard, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    before = _resident_pages(shard)
    files.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert _resident_pages(shard) - before > 8
    assert engine.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids == \
        files.generate(PROMPT, max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
