"""Decode speed beside llama.cpp with every model resident, each program a fresh process with nothing of ours alive.

    python benchmarks/bench_vs_llamacpp.py [MODEL_DIR ...] [--tokens 128] [--rounds 4] [--threads 2]
        [--out runs/vs_llamacpp.json]

Without MODEL_DIR: the bundled model (bf16) and the 213M Mixtral-shaped model (fp32) of bench_offload.py. Per
model, round by round (the order rotating), each a fresh process started once the load average fell under 1:

- llama-bench (`-p 0 -n TOKENS -r 1`: decode only, after its warm-up run),
- llama-completion, greedy, its own timer (llama_perf_context_print's eval time),
- this engine's CLI with no memory flag, `--json`'s decode_tokens_per_s: every expert resident (the run stops
  if the plan does not hold them all), on a CPU device packed for oneDNN in place of a slot pool,
- the same with top-k slots and every cold expert computed on the CPU from the memory map (`--cold-experts cpu`),
- transformers' generate (this file run as a child: per-token times from a streamer, decode = tokens after
  the first over the time after the first),
- by name only: `engine-slots`, every expert in a slot pool (`--expert-slots` = all: the engine before
  stop 27), and `engine-stored` and `engine-cpu-experts-stored`, the slot pool and the CPU experts with
  `--cpu-weights stored` (no weight packed for oneDNN: the engine before packed_weights.py),

GGUFs converted in the engine's dtype (benchmarks/llamacpp/convert.py, tokenizer checked), the same prompt
text and thread count for all. Prints medians and each round's ratio to llama-bench, cross-checks llama-bench
against llama-completion's own timer, and writes every figure with its command as JSON.

Why fresh processes: an earlier harness ran llama-bench while two engines stayed alive in the benchmark's own
process; their threads (torch's OpenMP pool spinning after each parallel region, the copy thread polling)
shared the two cores with llama.cpp and cut its rate by up to 15x (BENCHMARKS.md, issue 17).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from offload_engine.atomic_write import atomic_output  # noqa: E402
from benchmarks.fresh_process import load_average, run_watched, wait_until_quiet  # noqa: E402

PROMPT = "The history of the city begins with a small settlement on the river, where"
PROGRAMS = ("llama-bench", "llama-completion", "engine", "engine-cpu-experts", "transformers")
RESIDENT = ("engine", "engine-slots", "engine-stored")  # every expert resident: no expert is ever loaded


def commands(model: Path, gguf: Path, tokens: int, threads: int) -> dict[str, list[str]]:
    from benchmarks.llamacpp.bench import llama_bench_command, llama_completion_command
    from offload_engine.loading import inspect_checkpoint
    from offload_engine.run_config import RunConfig

    spec = inspect_checkpoint(model, RunConfig.build(device="cpu", expert_slots=1, progress=False)).spec
    engine = [str(Path(sys.executable).with_name("moe-offload")), "generate", "--model", str(model), "--prompt",
              PROMPT, "--max-new-tokens", str(tokens), "--ignore-eos", "--json", "--quiet", "--threads", str(threads)]
    return {
        "llama-bench": llama_bench_command(gguf, threads, tokens, repetitions=1),
        "llama-completion": llama_completion_command(gguf, PROMPT, tokens, threads),
        # every expert resident as the plan holds them with no memory flag: on a CPU device packed for oneDNN and
        # computed where they lie (loading.packs_resident_experts); engine-slots keeps them in a slot pool
        "engine": engine,
        "engine-slots": [*engine, "--expert-slots", str(spec.total_experts)],
        "engine-cpu-experts": [*engine, "--expert-slots", str(spec.top_k), "--cold-experts", "cpu"],
        # the same with weights as stored (before packed_weights.py): by name in --programs, not by default
        "engine-stored": [*engine, "--expert-slots", str(spec.total_experts), "--cpu-weights", "stored"],
        "engine-cpu-experts-stored": [*engine, "--expert-slots", str(spec.top_k), "--cold-experts", "cpu",
                                      "--cpu-weights", "stored"],
        "transformers": [sys.executable, str(Path(__file__).resolve()), "--child-transformers", str(model),
                         "--tokens", str(tokens), "--threads", str(threads)],
    }


def rate_of(program: str, stdout: str, stderr: str) -> float:
    from benchmarks.llamacpp.bench import llama_timer

    if program == "llama-bench":
        (record,) = json.loads(stdout)
        return statistics.median(record["samples_ts"])
    if program == "llama-completion":
        return llama_timer(stderr)["decode_tokens_per_s"]
    if program.startswith("engine"):
        stats = json.loads(stdout)["stats"]
        if program in RESIDENT and stats["misses"]:
            raise SystemExit(f"{program} loaded {stats['misses']} experts: not every expert was resident")
        return stats["decode_tokens_per_s"]
    return json.loads(stdout.strip().splitlines()[-1])["decode_tokens_per_s"]


def transformers_child(model: Path, tokens: int, threads: int) -> None:
    """transformers' own generate, greedy, in the checkpoint's dtype as transformers loads it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(threads)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype="auto").eval()
    lm.generation_config.eos_token_id = None
    ids = tokenizer(PROMPT, return_tensors="pt")
    clock = Clock()
    with torch.inference_mode():
        out = lm.generate(**ids, max_new_tokens=tokens, do_sample=False, streamer=clock)
    times = clock.times[1:]  # the streamer's first put is the prompt
    new = out.shape[1] - ids["input_ids"].shape[1]
    print(json.dumps({"decode_tokens_per_s": (new - 1) / (times[-1] - times[0]), "generated_tokens": new}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="*", type=Path)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--programs", default=",".join(PROGRAMS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "vs_llamacpp.json")
    p.add_argument("--child-transformers", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_transformers:
        transformers_child(args.child_transformers, args.tokens, args.threads)
        return 0
    from benchmarks.llamacpp.bench import DEFAULT_MODEL, ensure_mixtral_213m
    from benchmarks.llamacpp.convert import convert

    programs = args.programs.split(",")
    models = args.models or [DEFAULT_MODEL, ensure_mixtral_213m()]
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": os.uname().nodename, "threads": args.threads, "tokens": args.tokens,
              "rounds": args.rounds, "models": {}}
    for model in models:
        gguf = convert(model).gguf
        cmds = commands(model, gguf, args.tokens, args.threads)
        runs = {name: [] for name in programs}
        for r in range(args.rounds):
            order = programs[r % len(programs):] + programs[:r % len(programs)]  # each program first once
            for name in order:
                load = wait_until_quiet()
                run = run_watched(cmds[name])
                if run.returncode != 0:
                    print(f"{name} failed (exit {run.returncode}):\n{(run.stderr or run.stdout)[-1500:]}",
                          file=sys.stderr)
                    return 1
                rate = rate_of(name, run.stdout, run.stderr)
                runs[name].append({"round": r, "decode_tokens_per_s": rate, "load_before": load,
                                   "wall_s": run.wall_s})
                print(f"{model.name} round {r} {name}: {rate:.2f} tok/s (load before {load:.2f})", flush=True)
        medians = {name: statistics.median(x["decode_tokens_per_s"] for x in rows) for name, rows in runs.items()}
        base = "llama-bench" if "llama-bench" in runs else programs[0]
        per_round = {name: [round(x["decode_tokens_per_s"] / b["decode_tokens_per_s"], 4)
                            for x, b in zip(rows, runs[base])] for name, rows in runs.items()}
        record["models"][model.name] = {"gguf": str(gguf), "commands": cmds, "runs": runs, "medians": medians,
                                        "ratio_to_" + base: {k: statistics.median(v) for k, v in per_round.items()},
                                        "ratio_per_round": per_round}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as f:
        f.write(json.dumps(record, indent=1, default=str).encode())
    print(f"\ndecode tok/s, medians of {args.rounds} interleaved rounds, {args.tokens} tokens, {args.threads} threads, "
          f"load average now {load_average():.2f}")
    print(f"{'model':<22}" + "".join(f"{name:>20}" for name in programs) + f"{'engine / llama-bench':>22}")
    for name, m in record["models"].items():
        ratio = m.get("ratio_to_llama-bench", {}).get("engine", float("nan"))
        print(f"{name:<22}" + "".join(f"{m['medians'][p]:>20.2f}" for p in programs) + f"{ratio:>22.3f}")
        if {"llama-bench", "llama-completion"} <= set(programs):
            cross = m["medians"]["llama-completion"] / m["medians"]["llama-bench"]
            print(f"  cross-check: llama-completion's own timer / llama-bench = {cross:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
