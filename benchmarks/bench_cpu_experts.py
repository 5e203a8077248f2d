"""Issue 10's measurements on this machine: CPU experts against copies, and the estimate against reality.

1. modes: decode tokens/s of the default model with --cold-experts stream, cpu and auto at three budgets
   (a sixth, a third and two thirds of its experts in slots), interleaved (stream, cpu, auto, stream, ...,
   alternating order), from the memory map; medians.
2. estimate: calibrate this machine (the same code as `moe-offload calibrate`), record the routing of the same
   generations, and compare `moe-offload estimate`'s decode tokens/s with the measured ones above (stream and
   cpu, three budgets): the goal is within 25%.

Side by side with llama.cpp: benchmarks/bench_vs_llamacpp.py (each program a fresh process; the llama.cpp part
that lived here ran llama-bench beside two live engines, which cut llama.cpp's rate up to 15x).

    python benchmarks/bench_cpu_experts.py [--part modes|estimate|all] [--repeats 3] [--tokens 64]
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

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / "offload_engine" / "default_model"
MODES = ("stream", "cpu", "auto")
PROMPT = "In the beginning God created the heaven and the earth. And the earth was without form"


def engines_for(model: Path, slots: int, hardware: dict | None):
    from offload_engine import OffloadEngine

    return {mode: OffloadEngine.from_pretrained(model, expert_slots=slots, cold_experts=mode, hardware=hardware,
                                                max_context=256, progress=False) for mode in MODES}


def interleaved(runs: dict, repeats: int) -> dict[str, list]:
    """runs: name -> callable returning a stats object; called round-robin, the order alternating."""
    out = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            out[name].append(runs[name]())
    return out


def modes_part(model: Path, budgets: dict[str, int], repeats: int, tokens: int, hardware: dict | None) -> dict:
    results = {}
    for label, slots in budgets.items():
        engines = engines_for(model, slots, hardware)
        for engine in engines.values():
            engine.generate(PROMPT, max_new_tokens=8, ignore_eos=True)  # warm
        runs = {mode: (lambda e=e: e.generate(PROMPT, max_new_tokens=tokens, ignore_eos=True,
                                              record_trace=True)) for mode, e in engines.items()}
        got = interleaved(runs, repeats)
        results[label] = {"slots": slots, **{mode: {
            "decode_tokens_per_s": statistics.median(r.stats.decode_tokens_per_s for r in rs),
            "runs": [round(r.stats.decode_tokens_per_s, 2) for r in rs],
            "hit_rate": rs[-1].stats.hit_rate, "cpu_experts_per_token": rs[-1].stats.cpu_experts / tokens,
            "misses_per_token": rs[-1].stats.misses / tokens} for mode, rs in got.items()}}
        results[label]["trace"] = got["stream"][-1].trace
        for engine in engines.values():
            engine.close()
    return results


def estimate_part(model: Path, modes: dict, hardware: dict) -> dict:
    from offload_engine.loading import inspect_checkpoint, make_plan
    from offload_engine.planning.estimate import strategies
    from offload_engine.run_config import RunConfig
    from offload_engine.tracing.replay import replay

    out = {}
    for label, row in modes.items():
        run = RunConfig.build(device="cpu", expert_slots=row["slots"], max_context=256, progress=False)
        inspected = inspect_checkpoint(model, run)
        plan = make_plan(inspected, run)
        trace = row["trace"]
        hits = {"lru": replay(trace, row["slots"], "lru").hit_rate}
        hits["predictive"] = hits["lru"]
        table = {s.name: s for s in strategies(hardware, hits, non_expert_bytes=plan.non_expert_bytes,
                                               expert_bytes=plan.expert_bytes, layers=inspected.spec.num_moe_layers,
                                               top_k=inspected.spec.top_k, model_name=model.name)}
        out[label] = {}
        for mode, strategy in (("stream", "stream-lru"), ("cpu", "cpu")):
            measured = row[mode]["decode_tokens_per_s"]
            estimated = table[strategy].decode_tokens_per_s
            out[label][mode] = {"measured": measured, "estimated": estimated, "ratio": estimated / measured,
                                "replayed_hit_rate": hits["lru"], "measured_hit_rate": row[mode]["hit_rate"]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("modes", "estimate", "all"), default="all")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_cpu_experts.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from offload_engine import OffloadEngine
    from offload_engine.loading import inspect_checkpoint
    from offload_engine.planning.calibration import calibrate
    from offload_engine.run_config import RunConfig

    out = {"machine": os.uname().nodename, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "threads": args.threads, "load_before": os.getloadavg()}
    spec = inspect_checkpoint(args.model, RunConfig.build(device="cpu", expert_slots=1, progress=False)).spec
    total = spec.total_experts
    budgets = {"a sixth": total // 6, "a third": total // 3, "two thirds": 2 * total // 3}
    hardware = None
    if args.part in ("estimate", "all"):
        probe = OffloadEngine.from_pretrained(args.model, expert_slots=total, max_context=128, progress=False)
        hardware = calibrate(probe, progress=False)
        out["calibration"] = hardware
        probe.close()
    if args.part in ("modes", "estimate", "all"):
        modes = modes_part(args.model, budgets, args.repeats, args.tokens, hardware)
        print(f"decode tokens/s, {args.model.name}, medians of {args.repeats} interleaved runs of {args.tokens} tokens")
        print(f"  {'experts in slots':<24}" + "".join(f"{m:>16}" for m in MODES))
        for label, row in modes.items():
            print(f"  {label + ' (' + str(row['slots']) + ')':<24}" +
                  "".join(f"{row[m]['decode_tokens_per_s']:>16.1f}" for m in MODES))
        if args.part != "modes":
            out["estimate"] = estimate_part(args.model, modes, hardware)
            print("\nestimate against measured decode tokens/s (goal: within 25%)")
            for label, row in out["estimate"].items():
                for mode, v in row.items():
                    print(f"  {label:<12} {mode:<7} measured {v['measured']:7.1f}  estimated {v['estimated']:7.1f}  "
                          f"ratio {v['ratio']:.2f}  (hit rate measured {v['measured_hit_rate']:.3f}, replayed "
                          f"{v['replayed_hit_rate']:.3f})")
        for row in modes.values():
            row.pop("trace")
        out["modes"] = modes
    out["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
