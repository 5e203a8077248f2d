"""The demo's decode rate by thread setting, on an idle machine and beside another busy process.

Each run is a fresh `moe-offload generate --profile profiles/demo.toml --json` process (thread pools are set
up once per process); settings run interleaved, in a shuffled order each round, and the busy process (a
Python loop, as another user's job would be) runs only during the "busy" rounds. Prints the median decode
tokens/s per setting and condition, and each setting's share of the condition's best.

    python benchmarks/bench_threads.py [--rounds 5] [--tokens 96] [--settings default,1,2,omp1]

Settings: `default` (no flag: the engine's choice), `N` (--threads N), `omp1` (OMP_NUM_THREADS=1 in the
environment, no flag), `omp1+N`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# another user's job: spins until this benchmark ends (its parent gone: it never outlives a killed benchmark)
BUSY = "import os, time\nparent = os.getppid()\nend = time.time() + 3600\nwhile time.time() < end and os.getppid() == parent:\n    pass\n"


def run(setting: str, tokens: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cmd = [str(Path(sys.executable).parent / "moe-offload"), "generate", "--profile", "profiles/demo.toml",
           "--json", "--quiet", "--max-new-tokens", str(tokens)]
    threads = setting
    if setting.startswith("omp1"):
        env["OMP_NUM_THREADS"] = "1"
        threads = setting.partition("+")[2] or "default"
    if threads != "default":
        cmd += ["--threads", threads]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout)["stats"]["decode_tokens_per_s"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--settings", default="default,1,2,omp1")
    parser.add_argument("--conditions", default="idle,busy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    settings = args.settings.split(",")
    conditions = args.conditions.split(",")
    rng = random.Random(args.seed)
    rates: dict[tuple[str, str], list[float]] = {(c, s): [] for c in conditions for s in settings}
    print(f"{os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))}, load {os.getloadavg()[0]:.2f}",
          flush=True)
    for r in range(args.rounds):
        for condition in conditions:
            busy = subprocess.Popen([sys.executable, "-c", BUSY]) if condition == "busy" else None
            try:
                for setting in rng.sample(settings, len(settings)):
                    rates[condition, setting].append(run(setting, args.tokens))
            finally:
                if busy is not None:
                    busy.kill()
                    busy.wait()
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    print(f"{'condition':<6} {'setting':<10} {'median tok/s':>12} {'of best':>8}   runs")
    for condition in conditions:
        medians = {s: statistics.median(rates[condition, s]) for s in settings}
        best = max(medians.values())
        for s in settings:
            runs = " ".join(f"{x:.1f}" for x in rates[condition, s])
            print(f"{condition:<6} {s:<10} {medians[s]:12.1f} {medians[s] / best:8.2f}   {runs}")


if __name__ == "__main__":
    main()
