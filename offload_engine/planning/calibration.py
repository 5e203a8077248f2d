"""Measure this machine for the cost model and the estimate, in well under a minute.

What is measured (each figure the median of timed repetitions after a warm-up; the copies and expert times in
rounds spread over the run, so that a machine busy for part of it shows as disagreeing repetitions):
- host -> device copy bandwidth of one layer's experts: from pinned and pageable host memory (CUDA), and
  from the memory map of the checkpoint, warm (pages cached) and cold (pages dropped from the page cache
  with posix_fadvise first: the disk's rate); with --host-memory direct, the direct tier's own O_DIRECT
  reads (`direct`: the disk tier's bandwidth, which then bounds a miss);
- the CPU computing one expert of the model, from host memory, at 1, 4, 16 and 64 tokens: its fixed cost,
  the rate it streams the weights and its FLOP/s (fitted: a + max(S / BW, n F / F));
- the device computing one resident expert at the same token counts (a_g + n F / F_dev);
- the engine's fixed cost per MoE layer call (cache lookup, slot mapping: a decode step with every expert
  resident, less its expert compute), and that decode step itself (the model's resident decode time).

Beside each such figure the profile records its spread, (upper quartile - lower quartile) / median of its
repetitions (`link_spread`, `cpu_expert_spread`, `device_expert_spread`, `model.miss_spread`...). On an idle
machine it stays within a few tens of percent; `busy_figures` names those above BUSY_SPREAD, whose medians
may be a busy machine's (three runs back to back once gave a device expert 205 us, 15,974 us and 16,239 us).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import torch

from .hardware_profile import model_name

TOKEN_COUNTS = (1, 4, 16, 64)
REPEATS = 5  # timed calls per measurement, after one warm-up call
ROUNDS = 3  # the copies and expert times are measured this many times over the run
BUSY_SPREAD = 0.5  # a spread above this: the repetitions disagree by half their median, the machine was busy

Clock = Callable[[], float]  # seconds; time.perf_counter, or a test's


@dataclass(frozen=True)
class Timing:
    """The readings of one measurement, in seconds."""

    readings: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.readings)

    @property
    def spread(self) -> float:
        """(upper quartile - lower quartile) / median: how much the repetitions disagree, a few outliers (one
        interrupt, one collection) ignored.

        >>> Timing((2.0, 2.0, 2.0, 2.0, 40.0)).spread  # one interrupted reading
        0.0
        >>> round(Timing((0.2, 16.0, 0.2, 16.2, 15.9)).spread, 2)  # 205 us, when the machine lets it run
        0.99
        """
        ordered, median = sorted(self.readings), self.median
        cut = len(ordered) // 4
        return (ordered[-cut - 1] - ordered[cut]) / median if median > 0 else 0.0

    def __add__(self, other: "Timing") -> "Timing":
        return Timing(self.readings + other.readings)


def busy_note(table: dict) -> str:
    """One line on the figures of a calibrated table that a busy machine may have slowed ("" if none).

    >>> busy_note({"device_expert_spread": {"1": 0.04, "4": 1.7}, "model": {"miss_spread": 0.6}})
    'the machine was busy: the repetitions of device_expert_spread.4 (and 1 more) disagree by 170% of their median (over 50%)'
    """
    busy = busy_figures(table)
    if not busy:
        return ""
    (key, spread), more = busy[0], f" (and {len(busy) - 1} more)" if len(busy) > 1 else ""
    return (f"the machine was busy: the repetitions of {key}{more} disagree by {spread:.0%} of their median "
            f"(over {BUSY_SPREAD:.0%})")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, clock: Clock, repeats: int = REPEATS) -> Timing:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        _sync(device)
        times.append(clock() - start)
    return Timing(tuple(times))


def busy_figures(table: dict) -> list[tuple[str, float]]:
    """(key in the profile, spread) of each figure of a calibrated [hardware] table whose repetitions disagreed
    by more than BUSY_SPREAD, worst first: the machine was busy while it was measured.

    >>> busy_figures({"device_expert_spread": {"1": 0.04, "4": 1.7}, "model": {"miss_spread": 0.6}})
    [('device_expert_spread.4', 1.7), ('model.miss_spread', 0.6)]
    """
    spreads = {f"{name}.{key}": value for name, values in table.items()
               if name.endswith("_spread") and isinstance(values, dict) for key, value in values.items()}
    spreads |= {f"model.{name}": value for name, value in table.get("model", {}).items() if name.endswith("_spread")}
    return sorted(((k, v) for k, v in spreads.items() if v > BUSY_SPREAD), key=lambda kv: -kv[1])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate(engine, progress: bool = True, clock: Clock = time.perf_counter) -> dict:
    """Measure with a loaded engine (its model gives the expert shape and dtype); returns a [hardware] table."""
    from tqdm.auto import tqdm

    from ..experts.offloaded_experts import one_expert, packed_expert, packs
    from ..packed_weights import packable

    from ..errors import ConfigError

    if engine.cache.num_slots == 0:
        raise ConfigError("calibrate times expert loads into slots, and this engine holds every expert packed on "
                          "the CPU with no slot pool; load it with expert_slots=N (the CLI's calibrate does)")
    device, store, spec = engine.run.device, engine.store, engine.spec
    binding = engine.model.get_submodule(spec.experts_paths[0])._offload
    expert_bytes = store.expert_nbytes()
    flops = 2.0 * spec.expert_numel()
    steps = tqdm(total=ROUNDS + 2, desc="calibrating", disable=not progress, unit="step")
    # -- copies: one layer's experts, from each kind of host memory -----------------------------------------
    layer_bytes = spec.num_experts * expert_bytes
    dst = {t.name: torch.empty((spec.num_experts, *t.shape), dtype=t.dtype, device=device)
           for t in store.format.stored}  # as held: a quantized format's stored bytes
    host = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in dst.items()}
    for e in range(spec.num_experts):
        store.copy_into(0, e, {name: t[e] for name, t in host.items()})
    pinned = {n: t.pin_memory() for n, t in host.items()} if device.type == "cuda" else None
    copies = {"pageable": lambda: [dst[n].copy_(host[n]) for n in dst],
              "mmap_warm": lambda: [store.copy_into(0, e, {n: dst[n][e] for n in dst})
                                    for e in range(spec.num_experts)]}
    if pinned is not None:
        copies["pinned"] = lambda: [dst[n].copy_(pinned[n], non_blocking=True) for n in dst]
    # -- one expert on the CPU and on the device, by token count ----------------------------------------------
    # a quantized format's expert is timed as the engine computes it: expanded, or by its kernels
    fmt, pool = store.format, engine.cache.pool
    cpu_expert = store.host_view(0, 0) if store.mode != "mmap" else {n: t[:1] for n, t in host.items()}
    # as the engine computes its CPU experts: from packed weights where it packs them (up to PACKED_MAX_ROWS)
    packed = engine.runtime.packed.weights(0, 0) if packs(engine.runtime.packed, binding.module) else None
    slot = engine.cache.fetch(0, [0])[0]
    dev_expert = {n: t[slot:slot + 1] for n, t in pool.items()}
    on_cpu, on_device = {}, {}
    for n in TOKEN_COUNTS:
        x = torch.randn(n, spec.hidden_size, dtype=store.dtype)
        xd = x.to(device)
        on_cpu[n] = (lambda x=x: one_expert(binding, fmt, cpu_expert, x)) if packed is None or not packable(x) \
            else (lambda x=x: packed_expert(binding.module, packed, x))
        on_device[n] = lambda x=xd: one_expert(binding, fmt, dev_expert, x)
    copy_t = {k: Timing(()) for k in copies}
    cpu_t = {n: Timing(()) for n in TOKEN_COUNTS}
    device_t = {n: Timing(()) for n in TOKEN_COUNTS}
    for _ in range(ROUNDS):  # the same measurements again, seconds apart: a busy spell shows as spread
        for k, fn in copies.items():
            copy_t[k] += _timed(fn, device, clock)
        for n in TOKEN_COUNTS:
            cpu_t[n] += _timed(on_cpu[n], torch.device("cpu"), clock)
            device_t[n] += _timed(on_device[n], device, clock)
        steps.update()
    link = {k: layer_bytes / t.median for k, t in copy_t.items()}
    if store.mode == "mmap":  # once: the pages are cached after it
        link["mmap_cold"] = layer_bytes / _cold_read(engine, dst, device, clock)
    if store.mode == "direct":  # the direct tier's own reads (O_DIRECT: from the disk every time)
        link["direct"] = layer_bytes / min(_direct_read(engine, host, clock) for _ in range(ROUNDS))
    cpu_times = {n: t.median for n, t in cpu_t.items()}
    device_times = {n: t.median for n, t in device_t.items()}
    cpu_fit = _fit(cpu_times, expert_bytes, flops)
    device_fit = _fit(device_times, expert_bytes, flops)
    steps.update()
    # -- the engine: a decode step with this model, and its fixed cost per layer call ------------------------
    resident_decode, layer_call, prefill = _decode_costs(engine, clock)
    miss = _miss_timings(engine, clock)
    miss_s, cpu_miss_s = _per_miss(miss, engine)
    steps.update()
    steps.close()
    cuda = device.type == "cuda"
    mode_link = link.get("pinned" if cuda and store.pinned else "mmap_warm" if store.mode == "mmap"
                         else "direct" if store.mode == "direct" else "pageable")
    if store.mode == "direct" and cuda:  # the disk, then the link: the slower bounds a miss
        mode_link = min(link["direct"], link["pageable"])
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
                  "moe_layers": spec.num_moe_layers, "top_k": spec.top_k,
                  "miss_spread": _rounded(miss["stream"].spread), "cpu_miss_spread": _rounded(miss["cpu"].spread)},
        "link": {k: round(v) for k, v in link.items()},
        "link_spread": {k: _rounded(t.spread) for k, t in copy_t.items()},
        "cpu_expert_s": {str(n): t for n, t in cpu_times.items()},
        "cpu_expert_spread": {str(n): _rounded(t.spread) for n, t in cpu_t.items()},
        "device_expert_s": {str(n): t for n, t in device_times.items()},
        "device_expert_spread": {str(n): _rounded(t.spread) for n, t in device_t.items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_weights": "packed" if packed is not None else "stored",
    }


def _rounded(spread: float) -> float:
    return round(spread, 3)


def _cold_read(engine, dst: dict, device: torch.device, clock: Clock) -> float:
    """Reading one layer's experts after dropping the checkpoint's pages from the page cache (posix_fadvise:
    no root needed; the next reads of those pages come from the disk)."""
    store, spec = engine.store, engine.spec
    for path in {info.file for info in store.tensors.infos.values()}:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    start = clock()
    for e in range(spec.num_experts):
        store.copy_into(1 % spec.num_moe_layers, e, {n: dst[n][e] for n in dst})
    _sync(device)
    return clock() - start


def _direct_read(engine, host: dict, clock: Clock) -> float:
    """Reading one layer's experts the way the direct tier does (experts/slot_fill.py: compiled O_DIRECT reads) into
    host memory."""
    import threading

    from ..experts.slot_fill import SlotFill

    spec = engine.spec
    fill = SlotFill(engine.store, host, threading.Lock())
    start = clock()
    fill.now(1 % spec.num_moe_layers, [(e, e) for e in range(spec.num_experts)])
    return clock() - start


def _fit(times: dict[int, float], expert_bytes: int, flops: float) -> dict:
    """The cost model's a + max(S / BW, n F / F) from the timings: at one token an expert is bound by reading
    its weights, so BW = S / t(1) (the fixed cost folded in, a ~ 0); at the largest count it is bound by its
    arithmetic, F = n F_e / t(n). Robust to noise: neither figure needs a difference of timings."""
    small, large = min(times), max(times)
    return {"bytes_per_s": expert_bytes / times[small], "flops": large * flops / times[large], "call_s": 1e-6}


def _decode_costs(engine, clock: Clock) -> tuple[float, float, float]:
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
    start = clock()
    for _ in range(200):
        engine.cache.fetch(0, list(range(k)))
    return step, max((clock() - start) / 200, 1e-7), prefill


def _miss_costs(engine, clock: Clock = time.perf_counter) -> tuple[float, float]:
    """(what one demand load adds to a decode layer call, what one expert computed on the CPU adds), per expert,
    through the engine's own layer call at one token: the same call with its experts resident, then copied in
    on demand, then computed where they lie on the CPU. These include the engine's bookkeeping and the host
    memory's real read path (page faults of the memory map), which a bare copy does not."""
    return _per_miss(_miss_timings(engine, clock), engine)


def _per_miss(timings: dict[str, Timing], engine) -> tuple[float, float]:
    k = min(engine.spec.top_k, engine.cache.num_slots)
    base = timings["resident"].median
    return max(timings["stream"].median - base, 0.0) / k, max(timings["cpu"].median - base, 0.0) / k


def _miss_timings(engine, clock: Clock) -> dict[str, Timing]:
    """The layer call of _miss_costs with its experts resident, copied in on demand, computed on the CPU."""
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

    repeats = REPEATS * ROUNDS  # a difference of medians: more readings for the same confidence
    with torch.inference_mode():
        resident()
        base = _timed(resident, device, clock, repeats)
        stream = _timed(cold, device, clock, repeats)
        mode = runtime.cold_experts
        runtime.cold_experts = "cpu"
        try:
            cpu = _timed(cold, device, clock, repeats)
        finally:
            runtime.cold_experts = mode
        resident()
    return {"resident": base, "stream": stream, "cpu": cpu}
