"""The memory this process may use, cgroup limits counted (v1 and v2), and what the engine chooses from it:
the direct tier and a budget that fits when the model does not fit in memory."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offload_engine.planning.host_memory import NO_LIMIT, cgroup_limit, host_memory

GiB = 1024**3


def _v1(root: Path, path: str, levels: dict[str, tuple[int, int, int]]):
    """A v1 memory hierarchy: relative cgroup path -> (limit, usage, inactive file bytes)."""
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/cgroup").write_text(f"5:devices:/\n4:memory:{path}\n0::/\n")
    for rel, (limit, usage, inactive) in levels.items():
        d = root / "sys/fs/cgroup/memory" / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"cache 1\ntotal_inactive_file {inactive}\nrss 2\n")


def _v2(root: Path, path: str, levels: dict[str, tuple[str, int, int]]):
    (root / "proc/self").mkdir(parents=True, exist_ok=True)
    (root / "proc/self/cgroup").write_text(f"0::{path}\n")
    for rel, (limit, usage, inactive) in levels.items():
        d = root / "sys/fs/cgroup" / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.max").write_text(f"{limit}\n")
        (d / "memory.current").write_text(f"{usage}\n")
        (d / "memory.stat").write_text(f"anon 5\ninactive_file {inactive}\nfile 9\n")


def test_a_v1_limit_counts_droppable_cache_as_available(tmp_path):
    _v1(tmp_path, "/bench", {"": (9223372036854771712, 10 * GiB, 0), "bench": (4 * GiB, 3 * GiB, 1 * GiB)})
    assert cgroup_limit(tmp_path) == (4 * GiB, 2 * GiB)
    memory = host_memory(tmp_path, machine_available=20 * GiB)
    assert (memory.available_bytes, memory.limit_bytes, memory.limited_by_cgroup) == (2 * GiB, 4 * GiB, True)


def test_a_v2_limit_on_an_ancestor_applies(tmp_path):
    _v2(tmp_path, "/user.slice/job", {"": ("max", 0, 0), "user.slice": (str(3 * GiB), GiB, 0),
                                      "user.slice/job": ("max", GiB, 0)})
    assert cgroup_limit(tmp_path) == (3 * GiB, GiB)
    assert host_memory(tmp_path, machine_available=GiB // 2).available_bytes == GiB // 2  # the machine is tighter


def test_no_limit_no_cgroup_and_a_container_root(tmp_path):
    _v1(tmp_path / "a", "/x", {"": (9223372036854771712, GiB, 0), "x": (9223372036854771712, GiB, 0)})
    assert cgroup_limit(tmp_path / "a") is None
    assert cgroup_limit(tmp_path / "nothing") is None
    # inside a container the host's path is named, the container's own cgroup sits at the mount's root
    _v1(tmp_path / "c", "/docker/abc", {"": (2 * GiB, GiB // 2, 0)})
    assert cgroup_limit(tmp_path / "c") == (2 * GiB, GiB // 2)


@settings(max_examples=50, deadline=None)
@given(levels=st.lists(st.tuples(st.one_of(st.none(), st.integers(1, 64 * GiB)), st.integers(0, 64 * GiB),
                                 st.integers(0, 8 * GiB)), min_size=1, max_size=4),
       version=st.sampled_from([1, 2]), junk=st.text(max_size=20))
def test_the_tightest_limit_above_the_process_wins(tmp_path_factory, levels, version, junk):
    root = tmp_path_factory.mktemp("cg")
    names = [""] + ["/".join(f"l{j}" for j in range(1, i + 1)) for i in range(1, len(levels))]
    if version == 1:
        _v1(root, "/" + names[-1], {n: (NO_LIMIT + 4096 if lim is None else lim, use, ina)
                                    for n, (lim, use, ina) in zip(names, levels)})
    else:
        _v2(root, "/" + names[-1], {n: ("max" if lim is None else str(lim), use, ina)
                                    for n, (lim, use, ina) in zip(names, levels)})
    with open(root / "proc/self/cgroup", "a") as f:
        f.write(junk.replace("\n", " ") + "\n")  # a malformed line is skipped, never an error
    room = [lim - max(0, use - ina) for lim, use, ina in levels if lim is not None]
    got = cgroup_limit(root)
    if not room:
        assert got is None
    else:
        assert got is not None and got[0] - got[1] == min(room)


def test_a_model_that_does_not_fit_takes_the_direct_tier_and_a_budget_that_fits():
    from offload_engine import DEFAULT_MODEL
    from offload_engine.loading import DIRECT_BUDGET_SHARE, PROCESS_RESERVE, automatic_budget, host_mode, inspect_checkpoint, make_plan
    from offload_engine.planning.host_memory import HostMemory
    from offload_engine.run_config import RunConfig

    run = RunConfig.build(device="cpu", progress=False)
    plan = make_plan(inspect_checkpoint(DEFAULT_MODEL, run), run)
    experts = plan.total_experts * plan.expert_bytes
    roomy = HostMemory(100 * experts, 100 * experts, None)
    tight = HostMemory(experts, 100 * experts, experts + 1)
    assert host_mode(run, plan, roomy) == "mmap" and host_mode(run, plan, tight) == "direct"
    asked = RunConfig.build(device="cpu", host_memory="files", progress=False)
    assert host_mode(asked, plan, tight) == "files"  # as asked, always
    assert automatic_budget(run.device, experts, roomy) == 50 * experts  # half: the page cache holds the files
    # a 100 GiB model under a 4 GiB limit: all but the process's reserve, with a margin, for the plan's parts
    limited = HostMemory(4 * GiB, 20 * GiB, 4 * GiB)
    budget = automatic_budget(run.device, 100 * GiB, limited)
    assert budget == int((4 * GiB - PROCESS_RESERVE) * DIRECT_BUDGET_SHARE) and budget + PROCESS_RESERVE < 4 * GiB


def _can_make_cgroups() -> bool:
    return os.geteuid() == 0 and os.access("/sys/fs/cgroup/memory", os.W_OK)


@pytest.mark.skipif(not _can_make_cgroups(), reason="needs root and the cgroup v1 memory controller")
def test_plan_under_a_real_cgroup_limit_reports_it():
    name = Path(f"/sys/fs/cgroup/memory/moe_offload_test_{os.getpid()}")
    name.mkdir()
    try:
        (name / "memory.limit_in_bytes").write_text(str(2 * GiB))
        script = (f"import os, sys; open('{name}/cgroup.procs', 'w').write(str(os.getpid())); "
                  "from cli.main import main; sys.exit(main(['plan', '--json']))")
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).resolve().parents[1])
        assert out.returncode == 0, out.stderr
        plan = json.loads(out.stdout)
        assert plan["memory_limit_bytes"] == 2 * GiB and plan["host_available_bytes"] < 2 * GiB
        assert plan["host_memory"] == "mmap" and plan["experts_fit_in_memory"]  # 36 MiB of experts fit in 2 GiB
    finally:
        for _ in range(50):
            try:
                name.rmdir()
                break
            except OSError:
                import time
                time.sleep(0.1)


def test_a_tight_automatic_budget_lowers_the_default_context_until_one_tokens_experts_fit(monkeypatch):
    from offload_engine import DEFAULT_MODEL, loading
    from offload_engine.errors import MemoryBudgetError
    from offload_engine.run_config import RunConfig

    run = RunConfig.build(device="cpu", progress=False)
    inspected = loading.inspect_checkpoint(DEFAULT_MODEL, run)
    roomy = loading.make_plan(inspected, run)
    assert roomy.max_context == 1024 and not roomy.context_fitted  # the model's own limit, under 4096
    wanted = inspected.spec.top_k * len(inspected.spec.moe_layers)  # one token's experts, every layer
    at_512 = loading.make_plan(inspected, RunConfig.build(device="cpu", max_context=512, progress=False))
    budget = at_512.fixed_bytes + wanted * at_512.expert_bytes  # fits them at 512 tokens, not at 1024
    monkeypatch.setattr(loading, "automatic_budget", lambda *a, **k: budget)
    plan = loading.make_plan(inspected, run)
    assert plan.context_fitted and plan.max_context == 512 and plan.expert_slots >= wanted
    assert "lowered to fit" in plan.describe()
    # asked for, the context is kept and a budget that cannot hold it is refused
    with pytest.raises(MemoryBudgetError):
        loading.make_plan(inspected, RunConfig.build(device="cpu", max_context=1024, memory_budget=budget,
                                                     progress=False))
    # too small at every context: the refusal names the minimum, as before
    monkeypatch.setattr(loading, "automatic_budget", lambda *a, **k: at_512.non_expert_bytes)
    with pytest.raises(MemoryBudgetError, match="too small"):
        loading.make_plan(inspected, run)


def test_an_untied_input_embedding_stays_in_the_memory_map_on_the_cpu(tmp_path):
    """On the CPU the input embedding of an untied model is a view of the file, outside the budget; a tied
    one (the LM head reads it whole every token) is loaded as before. Tokens are the reference's either way."""
    import tiny_models as tm
    import torch
    from safetensors import safe_open

    from offload_engine import DEFAULT_MODEL, OffloadEngine, loading
    from offload_engine.run_config import RunConfig

    model = tm.build_reference("qwen3_moe")
    tm.save_checkpoint(model, tmp_path, "per_expert")
    run = RunConfig.build(device="cpu", expert_slots=4, progress=False)
    inspected = loading.inspect_checkpoint(tmp_path, run)
    plan = loading.make_plan(inspected, run)
    weight = model.get_input_embeddings().weight
    assert plan.mapped_bytes == weight.numel() * weight.element_size() > 0
    everything = sum(t.numel() * t.element_size() for t in loading.non_expert_tensors(inspected).values())
    assert plan.non_expert_bytes == everything - plan.mapped_bytes
    assert "memory-mapped" in plan.describe()

    engine = OffloadEngine.from_pretrained(tmp_path, expert_slots=4, progress=False)
    loaded = engine.model.get_input_embeddings().weight
    key = inspected.layout.find("model.embed_tokens.weight")
    mapped = inspected.tensors.view(key)  # a second view of the same mapping of the same file
    assert torch.equal(loaded, mapped)
    file = inspected.tensors.infos[key].file
    with safe_open(str(file), "pt") as f:
        assert torch.equal(loaded, f.get_tensor(key))
    assert not loaded.untyped_storage().resizable()  # a view over a buffer, not memory of its own
    prompt = torch.tensor([[3, 17, 5, 9]])
    expected = tm.reference_greedy(model, prompt, 6)[0][0].tolist()
    assert engine.generate(prompt[0].tolist(), max_new_tokens=6, ignore_eos=True).token_ids == expected
    engine.close()

    tied = loading.inspect_checkpoint(DEFAULT_MODEL, run)
    assert loading.mapped_embedding(tied, torch.device("cpu")) is None
    assert loading.make_plan(tied, run).mapped_bytes == 0
    assert loading.mapped_embedding(inspected, torch.device("meta")) is None  # only the CPU reads the map
