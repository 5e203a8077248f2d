"""Issue 8's goals, measured: the predictive cache and prefetch against LRU and Belady, and their cost.

1. Counters (--part counters): the default model decodes held-out text token by token through the engine
   (teacher forcing: each step feeds the text's next token, batch 1, from the memory map), at the demo
   budget and at rho = 0.5, 1, 2 (slots = rho x k x L). For each configuration, the engine's own counters
   (hits, demand loads, prefetches, bytes moved, stall time, prediction time); LRU and Belady replayed on the
   recorded trace of the same tokens (the replay reproduces the engine's LRU counters exactly, a test checks
   it) give the gap the predictive cache should close.
2. Speed (--part speed): decode tokens/s on prompts of the held-out text, every configuration against LRU
   without prediction, interleaved one generation at a time in shuffled order, same budget, from the memory
   map; medians.

    python benchmarks/heldout.py                       # once: the held-out text
    python benchmarks/bench_foresight.py [--part counters|speed|both] [--seqs 10] [--tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / ".cache" / "heldout"
CONFIGS = {  # name -> engine settings
    "lru": dict(policy="lru"),
    "predictive": dict(policy="predictive"),
    "predictive+history": dict(policy="predictive", predictor="history", prefetch_depth=0),
    "predictive+next-gate": dict(policy="predictive", predictor="next-gate", prefetch_depth=0),
    "predictive+learned": dict(policy="predictive", predictor="learned", prefetch_depth=0),
    "predictive+history+prefetch": dict(policy="predictive", predictor="history"),
    "predictive+next-gate+prefetch": dict(policy="predictive", predictor="next-gate"),
    "predictive+learned+prefetch": dict(policy="predictive", predictor="learned"),
    "lru+next-gate+prefetch": dict(policy="lru", predictor="next-gate"),
    "lru+learned+prefetch": dict(policy="lru", predictor="learned"),
}
# the same engine with the CPU slots filled by torch's copies (demand loads in Python, prefetches on a thread pool)
# instead of the compiled copier: what copy_worker.py changed
TORCH_COPIES = {f"{name}/torch-copies": name for name in CONFIGS}


def make_engine(model: Path, slots: int, name: str):
    from offload_engine import OffloadEngine

    engine = OffloadEngine.from_pretrained(model, expert_slots=slots, progress=False, **CONFIGS[TORCH_COPIES.get(name, name)])
    if name in TORCH_COPIES:
        engine.cache.loader.compiled_copies = False
    return engine


def heldout_sequences(tokenizer, seqs: int, tokens: int) -> list[list[int]]:
    """`seqs` sequences of `tokens` tokens, spread over the held-out domains (documents joined with EOS)."""
    from offload_engine.tracing.recording import corpus_chunks

    files = sorted(HELDOUT.glob("*.txt"))
    if not files:
        sys.exit(f"error: no held-out text in {HELDOUT}; run python benchmarks/heldout.py first")
    per = max(1, -(-seqs // len(files)))
    out = []
    for f in files:
        out += corpus_chunks(tokenizer, f.read_text(encoding="utf-8"), tokenizer.eos_token_id, tokens, per)
    order = np.random.default_rng(0).permutation(len(out))[:seqs]  # mixed domains, as a server would see
    return [out[i] for i in sorted(order)]


def teacher_forced(engine, sequences: list[list[int]]):
    """Every token of every sequence one decode step (batch 1) through the engine; returns the request's
    counters and the recorded trace."""
    from transformers import DynamicCache

    from offload_engine.request import RoutingRecorder
    from offload_engine.tracing.recording import calls_to_arrays
    from offload_engine.tracing.trace_file import RoutingTrace

    spec = engine.spec
    request = engine.request(1, RoutingRecorder())
    per_sequence = []
    with torch.inference_mode():
        for seq in sequences:
            request.paths = type(request.paths).empty(1, spec.num_moe_layers, spec.top_k)  # a new sequence
            request.recorder.calls.clear()
            cache = DynamicCache(config=engine.model.config)
            for t, token in enumerate(seq):
                engine.forward(request, input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[t]]),
                               past_key_values=cache, use_cache=True, logits_to_keep=1)
            ids, _ = calls_to_arrays(request.recorder, spec.num_moe_layers, 1)
            per_sequence.append(ids[0])
    engine.cache.drain()
    trace = RoutingTrace(expert_ids=np.stack(per_sequence).astype(np.int16), num_experts=spec.num_experts,
                         moe_layers=np.asarray(spec.moe_layers))
    return engine.cache.stats(request.counters), trace


def counters_part(model: Path, sequences, sizes: dict[str, int], configs: list[str]) -> dict:
    from offload_engine.tracing.replay import replay

    results = {}
    for size_name, slots in sizes.items():
        row = {}
        trace = None
        for name in configs:
            engine = make_engine(model, slots, name)
            stats, run_trace = teacher_forced(engine, sequences)
            trace = trace if trace is not None else run_trace
            assert np.array_equal(trace.expert_ids, run_trace.expert_ids)  # the same routing whatever the cache
            tokens = sum(len(s) for s in sequences)
            row[name] = {"hits": stats.hits, "misses": stats.misses, "prefetches": stats.prefetches,
                         "prefetch_hits": stats.prefetch_hits, "loads": stats.misses + stats.prefetches,
                         "bytes": stats.bytes_to_device, "stall_ms_per_token": 1e3 * stats.stall_s / tokens,
                         "predict_us_per_token": 1e6 * stats.predict_s / tokens, "hit_rate": stats.hit_rate}
            engine.close()
        expert_bytes = engine.store.expert_nbytes()
        for policy in ("lru", "belady"):
            r = replay(trace, slots, policy)
            row[f"replayed {policy}"] = {"hits": r.hits, "misses": r.misses, "loads": r.misses,
                                         "bytes": r.misses * expert_bytes, "hit_rate": r.hit_rate}
        lru, best = row["replayed lru"]["bytes"], row["replayed belady"]["bytes"]
        for name in configs:
            gap = lru - best
            row[name]["gap_closed"] = (lru - row[name]["bytes"]) / gap if gap else float("nan")
        results[f"{size_name} ({slots} slots)"] = row
    return results


def speed_part(model: Path, prompts: list[list[int]], slots: int, configs: list[str], tokens: int,
               repeats: int) -> dict:
    engines = {name: make_engine(model, slots, name) for name in configs}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    predict: dict[str, list[float]] = {name: [] for name in configs}
    stall: dict[str, list[float]] = {name: [] for name in configs}
    for name, engine in engines.items():  # warm: page cache, first-call costs
        engine.generate(prompts[0], max_new_tokens=8, ignore_eos=True)
    rng = np.random.default_rng(0)
    for r in range(repeats):
        for prompt in prompts:  # one generation per configuration in turn, in a fresh order each time: this VM's
            for i in rng.permutation(len(configs)):  # speed drifts by 10-20% within seconds
                name = configs[i]
                stats = engines[name].generate(prompt, max_new_tokens=tokens, ignore_eos=True).stats
                rates[name].append(stats.decode_tokens_per_s)
                predict[name].append(1e6 * stats.predict_s / max(1, stats.generated_tokens))
                stall[name].append(1e6 * stats.stall_s / max(1, stats.generated_tokens))
    for engine in engines.values():
        engine.close()
    base = statistics.median(rates[configs[0]])
    return {name: {"decode_tokens_per_s": statistics.median(v), "ratio_to_" + configs[0]: statistics.median(v) / base,
                   "predict_us_per_token": statistics.median(predict[name]),
                   "stall_us_per_token": statistics.median(stall[name])} for name, v in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "offload_engine" / "default_model")
    parser.add_argument("--part", choices=("counters", "speed", "both"), default="both")
    parser.add_argument("--seqs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated; NAME/torch-copies: the same with torch's copies into the CPU slots")
    parser.add_argument("--speed-sizes", default="demo budget",
                        help="comma-separated cache sizes for --part speed: 'demo budget', 'rho 0.5', 'rho 1', 'rho 2'")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_foresight.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from offload_engine.loading import inspect_checkpoint
    from offload_engine.run_config import RunConfig

    configs = args.configs.split(",")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sequences = heldout_sequences(tokenizer, args.seqs, args.tokens)
    spec = inspect_checkpoint(args.model, RunConfig.build(device="cpu", expert_slots=1, progress=False)).spec
    active = spec.top_k * spec.num_moe_layers
    demo = demo_slots(args.model)
    sizes = {"rho 0.5": active // 2, "rho 1": active, "rho 2": 2 * active, "demo budget": demo}
    out = {"model": str(args.model), "sequences": len(sequences), "tokens_per_sequence": args.tokens,
           "threads": args.threads, "machine": os.uname().nodename,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.part in ("counters", "both"):
        out["counters"] = counters_part(args.model, sequences, sizes, configs)
        for size, row in out["counters"].items():
            print(f"\n{size}: {len(sequences)} x {args.tokens} tokens")
            print(f"  {'configuration':<32}{'hit rate':>9}{'demand':>8}{'prefetch':>9}{'loads':>7}"
                  f"{'gap closed':>11}{'stall ms/tok':>13}{'predict us/tok':>15}")
            for name, v in row.items():
                print(f"  {name:<32}{v['hit_rate']:>9.3f}{v['misses']:>8}{v.get('prefetches', 0):>9}{v['loads']:>7}"
                      f"{v.get('gap_closed', float('nan')):>11.2f}{v.get('stall_ms_per_token', float('nan')):>13.3f}"
                      f"{v.get('predict_us_per_token', float('nan')):>15.1f}")
    if args.part in ("speed", "both"):
        prompts = [s[:16] for s in sequences[:3]]
        out["speed"] = {}
        for size in args.speed_sizes.split(","):
            if size not in sizes:
                sys.exit(f"error: unknown cache size {size!r}; choose from {', '.join(sizes)}")
            out["speed"][size] = speed_part(args.model, prompts, sizes[size], configs, args.tokens, args.repeats)
            print(f"\ndecode tokens/s at {size} ({sizes[size]} slots), threads {args.threads}, medians of "
                  f"{args.repeats} x {len(prompts)} interleaved runs of {args.tokens} tokens")
            for name, v in out["speed"][size].items():
                print(f"  {name:<40}{v['decode_tokens_per_s']:>8.1f} tok/s  x{list(v.values())[1]:.3f}  "
                      f"stall {v['stall_us_per_token']:.0f} us/token  prediction {v['predict_us_per_token']:.0f} us/token")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"\nwritten to {args.out}")


def demo_slots(model: Path) -> int:
    """The expert slots the demo profile's budget and context give this model."""
    import tomllib

    from offload_engine.loading import inspect_checkpoint, make_plan
    from offload_engine.run_config import RunConfig

    demo = tomllib.loads((ROOT / "profiles" / "demo.toml").read_text())
    run = RunConfig.build(device="cpu", memory_budget=demo["memory_budget"], max_context=demo["max_context"],
                          progress=False)
    return make_plan(inspect_checkpoint(model, run), run).expert_slots


if __name__ == "__main__":
    main()
