"""Python's own time per MoE layer call: the call's wall time minus its expert kernels, copies and CPU experts.

Every experts module's layer call is timed whole, and inside it transformers' experts function (the kernels,
with their own thin wrapper), the predictor's device work (next-gate's routers: `stage`, or `ranking` before
it existed) and the engine's stall and CPU-expert timers (a stall: a demand load's copies, or the wait for a
prefetch still being copied; subtracting only the copies, as this script did before, left the waits for the
copy thread in "Python"); what is left is the engine's bookkeeping: routing,
the cache, the predictor's host work, the policy, prefetch decisions. Decode calls only (one
token per row), batch 1, greedy, after a warm-up generation. On the CPU the kernels run in the calling
thread, so the subtraction is exact up to the timers' own cost (~0.1 us each).

    python benchmarks/bench_layer_call.py [--model DIR] [--slots 64,all] [--configs lru,predictive:next-gate]
    python benchmarks/make_checkpoint.py --shape qwen3-30b-a3b --layers 4 --vocab 4096 --out /tmp/q3
    python benchmarks/bench_layer_call.py --model /tmp/q3 --slots 128,all --tokens 16

`--configs` names policy:predictor pairs. Prints one row per (slots, config): the replayed Python time per
layer call (the figure to read: `replayed`, below), the same by subtraction inside the timed decode (noisier:
it subtracts kernel times that vary more than the Python does), the median call and kernel times, and the
host syncs per decode step if the engine counts them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def serve_calls(engine, call) -> None:
    """Make `call` serve the engine's layer calls: as the runtime's layer_call (what this script calls itself)
    and in every experts module's binding (what transformers' forward calls: the binding was given the
    runtime's layer_call when the model was loaded, so replacing the runtime's alone would not reach it)."""
    engine.runtime.layer_call = call
    for module in engine.model.modules():
        binding = getattr(module, "_offload", None)
        if binding is not None:
            binding.layer_call = call


class CallTimer:
    """Wraps one engine's layer calls and kernels with timers; decode calls' figures in `rows`."""

    def __init__(self, engine):
        self.engine, self.runtime = engine, engine.runtime
        self.rows: list[tuple[float, float, float]] = []  # (call s, kernels s, copies + CPU experts s)
        self.kernel_s = 0.0
        self.recording = False
        original_call = self.runtime.layer_call

        def timed_call(binding, hidden_states, top_k_index, top_k_weights):
            request = self.runtime.current()
            c = request.counters[binding.layer_pos]
            before_io = c.stall_s + c.cpu_s
            kernel_before = self.kernel_s
            start = time.perf_counter()
            out = original_call(binding, hidden_states, top_k_index, top_k_weights)
            elapsed = time.perf_counter() - start
            if self.recording and top_k_index.shape[0] == max(request.rows, 1):
                self.rows.append((elapsed, self.kernel_s - kernel_before, c.stall_s + c.cpu_s - before_io))
            return out

        serve_calls(engine, timed_call)
        for module in engine.model.modules():
            binding = getattr(module, "_offload", None)
            if binding is not None:
                binding.compute = self._timed_kernel(binding.compute)
        # the predictor's device work (next-gate's routers) is kernels too: its stage() now, its ranking() before
        predictor = self.runtime.predictor
        own = type(predictor).__dict__ if predictor is not None else {}
        name = "stage" if "stage" in own else "ranking" if "ranking" in own else None
        if name is not None:
            setattr(predictor, name, self._timed_kernel(getattr(predictor, name)))

    def _timed_kernel(self, compute):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = compute(*args, **kwargs)
            self.kernel_s += time.perf_counter() - start
            return out
        return timed


def replayed(engine, prompt: list[int], tokens: int, repeats: int = 5) -> list[float]:
    """Python's own time of each decode layer call with the kernels taken out: a real generation's calls
    (hidden states, routing, captured residuals) recorded, then replayed `repeats` times through the engine's
    layer call with transformers' experts function replaced by one that returns its input and loads that move
    no bytes (their bookkeeping still runs); CPU experts, the predictor's device work and stalls are still
    done, and subtracted as measured."""
    runtime = engine.runtime
    calls = []
    original = runtime.layer_call

    def record(binding, hidden_states, top_k_index, top_k_weights):
        request = runtime.current()
        if top_k_index.shape[0] == max(request.rows, 1):
            residual = request.residuals.get(binding.layer_pos)
            calls.append((binding, hidden_states.clone(), top_k_index.clone(), top_k_weights.clone(),
                          None if residual is None else residual.clone()))
        return original(binding, hidden_states, top_k_index, top_k_weights)

    serve_calls(engine, record)
    engine.generate(prompt, max_new_tokens=tokens, ignore_eos=True)
    serve_calls(engine, original)
    kernels = {}
    for module in engine.model.modules():
        binding = getattr(module, "_offload", None)
        if binding is not None:
            kernels[id(binding)] = binding.compute
            binding.compute = lambda experts, hidden_states, index, weights: hidden_states
    # The replay's outputs are never read, so its loads need not move bytes: each fill's task rows keep their
    # bookkeeping (tickets, the copy thread's posts and waits) with zero bytes. With the bytes moved, the copy
    # thread's memcpy of the prefetches shares the two cores (and the memory bus) with the timed thread,
    # which no GPU's DMA does, and inflated the figure 3-5x at 128 slots.
    loader = engine.cache.loader
    fills = list({id(f): f for f in (loader.demand_fill, loader.prefetch_fill)}.values())
    for fill in fills:
        fill._copy_tasks = _no_bytes(fill._copy_tasks)
    predictor_s = [0.0]
    predictor = runtime.predictor
    own = type(predictor).__dict__ if predictor is not None else {}
    name = "stage" if "stage" in own else "ranking" if "ranking" in own else None
    if name is not None:
        inner = getattr(predictor, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = inner(*args, **kwargs)
            predictor_s[0] += time.perf_counter() - start
            return out
        setattr(predictor, name, timed)
    out = []
    with torch.inference_mode():
        for _ in range(repeats):
            request = engine.request(1)
            with runtime.serving(request):
                for binding, hidden_states, top_k_index, top_k_weights, residual in calls:
                    c = request.counters[binding.layer_pos]
                    if residual is not None:
                        request.residuals[binding.layer_pos] = residual
                    io, pred = c.stall_s + c.cpu_s, predictor_s[0]
                    start = time.perf_counter()
                    runtime.layer_call(binding, hidden_states, top_k_index, top_k_weights)
                    elapsed = time.perf_counter() - start
                    out.append(elapsed - (c.stall_s + c.cpu_s - io) - (predictor_s[0] - pred))
    for module in engine.model.modules():
        binding = getattr(module, "_offload", None)
        if binding is not None:
            binding.compute = kernels[id(binding)]
    for fill in fills:
        del fill._copy_tasks  # the class's method again
    return out


def _no_bytes(copy_tasks):
    from offload_engine.experts.copy_worker import NBYTES

    def tasks_moving_nothing(layer_pos, loads):
        tasks = copy_tasks(layer_pos, loads)
        if tasks is not None:
            tasks = tasks.copy()
            tasks[:, NBYTES] = 0
        return tasks
    return tasks_moving_nothing


def measure(model: Path, slots: int | None, policy: str, predictor: str, tokens: int, threads: int) -> dict:
    from offload_engine import OffloadEngine

    kwargs = {"expert_slots": slots} if slots else {}
    engine_args = dict(policy=policy, predictor=predictor, progress=False, **kwargs)
    try:
        engine = OffloadEngine.from_pretrained(model, threads=threads, **engine_args)
    except TypeError:  # before the engine took threads=
        torch.set_num_threads(threads)
        engine = OffloadEngine.from_pretrained(model, **engine_args)
    timer = CallTimer(engine)
    prompt = [5, 17, 301, 42, 7, 99, 1000, 12]
    engine.generate(prompt, max_new_tokens=4, ignore_eos=True)  # warm-up: compiled kernels, first copies
    timer.recording = True
    result = engine.generate(prompt, max_new_tokens=tokens, ignore_eos=True)
    timer.recording = False  # the replay's calls are not the decode's
    replay = replayed(engine, prompt, tokens)
    engine.close()
    python = [call - kernels - io for call, kernels, io in timer.rows]
    stats = result.stats
    syncs = getattr(stats, "host_syncs", None)
    decode_steps = max(stats.generated_tokens - 1, 1)
    return {
        "calls": len(timer.rows),
        "replayed_python_us_median": 1e6 * statistics.median(replay),
        "replayed_python_us_mean": 1e6 * statistics.fmean(replay),
        "python_us_median": 1e6 * statistics.median(python),
        "python_us_mean": 1e6 * statistics.fmean(python),
        "call_us_median": 1e6 * statistics.median(r[0] for r in timer.rows),
        "kernel_us_median": 1e6 * statistics.median(r[1] for r in timer.rows),
        "hit_rate": stats.hit_rate,
        "host_syncs_per_step": None if syncs is None else syncs / (decode_steps + 1),
    }


def main(argv=None) -> None:
    from offload_engine import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL))
    parser.add_argument("--slots", default="64,all", help="comma-separated slot counts; 'all' = every expert")
    parser.add_argument("--configs", default="lru:none,predictive:next-gate,predictive:history,predictive:learned")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    for slots in args.slots.split(","):
        for config in args.configs.split(","):
            policy, _, predictor = config.partition(":")
            try:
                r = measure(args.model, None if slots == "all" else int(slots), policy, predictor or "none",
                            args.tokens, args.threads)
            except Exception as e:  # a predictor the model has none of (learned on a random checkpoint)
                print(f"{slots:>5} {config:<24} skipped: {str(e).splitlines()[0]}", flush=True)
                continue
            rows.append({"slots": slots, "config": config, **r})
            syncs = "-" if r["host_syncs_per_step"] is None else f"{r['host_syncs_per_step']:.1f}"
            print(f"{slots:>5} {config:<24} replayed python/call {r['replayed_python_us_median']:7.1f} us median "
                  f"{r['replayed_python_us_mean']:7.1f} mean | in decode: {r['python_us_median']:7.1f} us median "
                  f"{r['python_us_mean']:7.1f} mean | call {r['call_us_median']:8.1f} kernels "
                  f"{r['kernel_us_median']:8.1f} us | hit {r['hit_rate']:.3f} | syncs/step {syncs}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
