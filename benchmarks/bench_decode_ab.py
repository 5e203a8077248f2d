"""The demo's decode rate, this checkout against an earlier one, interleaved, each run a fresh process.

    git worktree add ../base <commit>
    python benchmarks/bench_decode_ab.py --base ../base [--rounds 6] [--tokens 96] [--threads 1]

Both run the demo profile's settings (the bundled model, 64 expert slots as at the demo budget, sampled with seed 1) through the
Python API of their own checkout (PYTHONPATH), with the same threads (`--threads`: torch.set_num_threads in
the old one, `threads=` in this one; `default`: each checkout's own default). Prints the median decode
tokens/s and CPU milliseconds per token of each, and the ratios. Each process times its second generation (the first warms numba's caches,
the allocator and the first copies) unless `--cold`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = """
import sys, torch
from offload_engine import DEFAULT_MODEL, OffloadEngine
threads = sys.argv[1]
kwargs = dict(expert_slots=64, max_context=512, progress=False)
if threads != "default":
    try:
        engine = OffloadEngine.from_pretrained(DEFAULT_MODEL, threads=int(threads), **kwargs)
    except TypeError:  # a checkout from before threads=
        torch.set_num_threads(int(threads))
        engine = OffloadEngine.from_pretrained(DEFAULT_MODEL, **kwargs)
else:
    engine = OffloadEngine.from_pretrained(DEFAULT_MODEL, **kwargs)
def run(tokens):
    return engine.generate("In the beginning", max_new_tokens=tokens, temperature=0.7, top_p=0.9, seed=1,
                           ignore_eos=True)
import time
if sys.argv[3] == "warm":
    run(int(sys.argv[2]))  # the process's first generation: numba's caches, the allocator, first copies
cpu = time.process_time()
result = run(int(sys.argv[2]))
cpu = time.process_time() - cpu
print(result.stats.decode_tokens_per_s, torch.get_num_threads(), 1e3 * cpu / result.stats.generated_tokens)
"""


def run(tree: Path, threads: str, tokens: int, warm: bool) -> tuple[float, int, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", RUN, threads, str(tokens), "warm" if warm else "cold"], cwd="/tmp",
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{tree}: {out.stderr.strip().splitlines()[-1]}")
    rate, used, cpu_ms = out.stdout.split()
    return float(rate), int(used), float(cpu_ms)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--threads", default="1")
    parser.add_argument("--cold", action="store_true", help="time the process's first generation (as the CLI demo "
                                                            "runs); default: a second one, after a warm-up")
    args = parser.parse_args(argv)
    trees = {"base": args.base.resolve(), "this": ROOT}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    cpu: dict[str, list[float]] = {name: [] for name in trees}
    used = {}
    print(f"load {os.getloadavg()[0]:.2f}", flush=True)
    for r in range(args.rounds):
        for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
            rate, used[name], cpu_ms = run(trees[name], args.threads, args.tokens, not args.cold)
            rates[name].append(rate)
            cpu[name].append(cpu_ms)
    for name, values in rates.items():
        print(f"{name:<5} {statistics.median(values):7.1f} tok/s median ({used[name]} threads)   "
              + " ".join(f"{v:.1f}" for v in values))
    for name, values in cpu.items():
        print(f"{name:<5} {statistics.median(values):7.2f} CPU ms per token median (the process's CPU time over the "
              "generation, prefill included: what a busy host's steal time does not inflate)")
    print(f"this / base: {statistics.median(rates['this']) / statistics.median(rates['base']):.3f} (tok/s); "
          f"CPU time per token {statistics.median(cpu['this']) / statistics.median(cpu['base']):.3f}")


if __name__ == "__main__":
    main()
