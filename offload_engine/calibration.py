"""Measure this machine for the cost model and the estimate, in well under a minute.

What is measured (each figure the median of a few timed repetitions, after a warm-up):
- host -> device copy bandwidth of one layer's experts: from pinned and pageable host memory (CUDA), and
  from the memory map of the checkpoint, warm (pages cached) and cold (pages dropped from the page cache
  with posix_fadvise first: the disk's rate);
- the CPU computing one expert of the model, from host memory, at 1, 4, 16 and 64 tokens: its fixed cost,
  the rate it streams the weights and its FLOP/s (fitted: a + max(S / BW, n F / F));
- the device computing one resident expert at the same token counts (a_g + n F / F_dev);
- the engine's fixed cost per MoE layer call (cache lookup, slot mapping: a decode step with every expert
  resident, less its expert compute), and that decode step itself (the model's resident decode time).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch

from .hardware_profile import model_name

TOKEN_COUNTS = (1, 4, 16, 64)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int = 5) -> float:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate(engine, progress: bool = True) -> dict:
    """Measure with a loaded engine (its model gives the expert shape and dtype); returns a [hardware] table."""
    from tqdm.auto import tqdm

    from .offloaded_experts import SlotExperts

    device, store, spec = engine.run.device, engine.store, engine.spec
    binding = engine.model.get_submodule(spec.experts_paths[0])._offload
    expert_bytes = store.expert_nbytes()
    flops = 2.0 * spec.expert_numel()
    steps = tqdm(total=6, desc="calibrating", disable=not progress, unit="step")
    # -- copies: one layer's experts, from each kind of host memory -----------------------------------------
    layer_bytes = spec.num_experts * expert_bytes
    dst = {p.name: torch.empty((spec.num_experts, *p.shape), dtype=store.dtype, device=device)
           for p in spec.expert_params}
    host = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in dst.items()}
    for e in range(spec.num_experts):
        store.copy_into(0, e, {name: t[e] for name, t in host.items()})
    copies = {"pageable": _timed(lambda: [dst[n].copy_(host[n]) for n in dst], device)}
    if device.type == "cuda":
        pinned = {n: t.pin_memory() for n, t in host.items()}
        copies["pinned"] = _timed(lambda: [dst[n].copy_(pinned[n], non_blocking=True) for n in dst], device)
    steps.update()
    mapped = {"mmap": _timed(lambda: [store.copy_into(0, e, {n: dst[n][e] for n in dst})
                                      for e in range(spec.num_experts)], device)}
    if store.mode == "mmap":
        mapped["mmap_cold"] = _cold_read(engine, dst, device)
    steps.update()
    link = {k: layer_bytes / v for k, v in {**copies, **{("mmap_warm" if k == "mmap" else k): v
                                                        for k, v in mapped.items()}}.items()}
    # -- one expert on the CPU and on the device, by token count ----------------------------------------------
    hidden = spec.hidden_size
    cpu_view = SlotExperts(binding.module, store.host_view(0, 0) if store.mode != "mmap"
                           else {n: t[:1] for n, t in host.items()})
    cpu_times, device_times = {}, {}
    slots = engine.cache.fetch(0, [0])
    dev_view = binding.span(engine.cache, slots[0], slots[0] + 1)
    for n in TOKEN_COUNTS:
        x = torch.randn(n, hidden, dtype=store.dtype)
        index = torch.zeros((n, 1), dtype=torch.long)
        ones = torch.ones((n, 1), dtype=store.dtype)
        cpu_times[n] = _timed(lambda: binding.compute(cpu_view, x, index, ones), torch.device("cpu"))
        xd, idd, od = x.to(device), index.to(device), ones.to(device)
        device_times[n] = _timed(lambda: binding.compute(dev_view, xd, idd, od), device)
    steps.update()
    cpu_fit = _fit(cpu_times, expert_bytes, flops)
    device_fit = _fit(device_times, expert_bytes, flops)
    steps.update()
    # -- the engine: a decode step with this model, and its fixed cost per layer call ------------------------
    resident_decode, layer_call, prefill = _decode_costs(engine)
    miss_s, cpu_miss_s = _miss_costs(engine)
    steps.update()
    steps.close()
    cuda = device.type == "cuda"
    mode_link = link.get("pinned" if cuda and store.pinned else "mmap_warm" if store.mode == "mmap" else "pageable")
    return {
        "source": "measured",
        "description": f"{'CUDA ' + torch.cuda.get_device_name(device) if cuda else 'CPU only'} / {_cpu_name()}",
        "measured_on": platform.node(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "cpu": _cpu_name(),
        "dtype": str(store.dtype).removeprefix("torch."),
        "host_memory": store.mode,
        "parallel": cuda,
        "link_bytes_per_s": mode_link,
        "cpu_read_bytes_per_s": cpu_fit["bytes_per_s"],
        "cpu_flops": cpu_fit["flops"],
        "cpu_call_s": cpu_fit["call_s"],
        "device_flops": device_fit["flops"],
        "device_read_bytes_per_s": device_fit["bytes_per_s"],
        "device_call_s": device_fit["call_s"],
        "layer_call_s": layer_call,
        "model": {"name": model_name(engine.directory), "expert_bytes": expert_bytes, "flops_per_token": flops,
                  "resident_decode_s": resident_decode, "prefill_s_per_token": prefill,
                  "miss_s": miss_s, "cpu_miss_s": cpu_miss_s,
                  "moe_layers": spec.num_moe_layers, "top_k": spec.top_k},
        "link": {k: round(v) for k, v in link.items()},
        "cpu_expert_s": {str(n): t for n, t in cpu_times.items()},
        "device_expert_s": {str(n): t for n, t in device_times.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _cold_read(engine, dst: dict, device: torch.device) -> float:
    """Reading one layer's experts after dropping the checkpoint's pages from the page cache (posix_fadvise:
    no root needed; the next reads of those pages come from the disk)."""
    store, spec = engine.store, engine.spec
    for path in {info.file for info in store.tensors.infos.values()}:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    start = time.perf_counter()
    for e in range(spec.num_experts):
        store.copy_into(1 % spec.num_moe_layers, e, {n: dst[n][e] for n in dst})
    _sync(device)
    return time.perf_counter() - start


def _fit(times: dict[int, float], expert_bytes: int, flops: float) -> dict:
    """The cost model's a + max(S / BW, n F / F) from the timings: at one token an expert is bound by reading
    its weights, so BW = S / t(1) (the fixed cost folded in, a ~ 0); at the largest count it is bound by its
    arithmetic, F = n F_e / t(n). Robust to noise: neither figure needs a difference of timings."""
    small, large = min(times), max(times)
    return {"bytes_per_s": expert_bytes / times[small], "flops": large * flops / times[large], "call_s": 1e-6}


def _decode_costs(engine) -> tuple[float, float, float]:
    """(seconds per decode step of this model with the engine's cache as loaded, the engine's bookkeeping per
    MoE layer call: a lookup of k resident experts), from the engine's own decode loop at one token a step."""
    prompt = [int(engine.pad_id())]
    engine.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm: the step's experts become resident
    stats = engine.generate(prompt, max_new_tokens=24, ignore_eos=True).stats
    step = 1 / stats.decode_tokens_per_s if stats.decode_tokens_per_s else 0.0
    long_prompt = [int(engine.pad_id())] * min(64, engine.plan.max_context - 2)
    engine.generate(long_prompt, max_new_tokens=1, ignore_eos=True)
    prefill = engine.generate(long_prompt, max_new_tokens=1, ignore_eos=True).stats.ttft_s / len(long_prompt)
    k = min(engine.spec.top_k, engine.cache.num_slots)
    engine.cache.fetch(0, list(range(k)))
    start = time.perf_counter()
    for _ in range(200):
        engine.cache.fetch(0, list(range(k)))
    return step, max((time.perf_counter() - start) / 200, 1e-7), prefill


def _miss_costs(engine) -> tuple[float, float]:
    """(what one demand load adds to a decode layer call, what one expert computed on the CPU adds), per expert,
    through the engine's own layer call at one token: the same call with its experts resident, then copied in
    on demand, then computed where they lie on the CPU. These include the engine's bookkeeping and the host
    memory's real read path (page faults of the memory map), which a bare copy does not."""
    runtime, cache, spec, device = engine.runtime, engine.cache, engine.spec, engine.run.device
    binding = engine.model.get_submodule(spec.experts_paths[0])._offload
    k = min(spec.top_k, cache.num_slots)
    dtype = next(engine.model.parameters()).dtype
    hidden = torch.randn(1, spec.hidden_size, dtype=dtype, device=device)
    index = torch.arange(k, device=device)[None]
    weights = torch.full((1, k), 1.0 / k, dtype=dtype, device=device)

    def resident():
        runtime.layer_call(binding, hidden, index, weights)

    def cold():  # the call's experts dropped from their slots first: a lookup of a few keys
        cache.drain()
        cache._forget([cache.slot_of[(0, e)] for e in range(k) if (0, e) in cache.slot_of])
        runtime.layer_call(binding, hidden, index, weights)

    with torch.inference_mode():
        resident()
        base = _timed(resident, device)
        stream = _timed(cold, device)
        mode = runtime.cold_experts
        runtime.cold_experts = "cpu"
        try:
            cpu = _timed(cold, device)
        finally:
            runtime.cold_experts = mode
        resident()
    return max(stream - base, 0.0) / k, max(cpu - base, 0.0) / k
