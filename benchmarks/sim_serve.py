"""bench_serve.py's load without HTTP, for tuning the routing schedule quickly: the server's engine (the demo
budget, `--max-batch` rows of 128 tokens), a Scheduler in process and closed-loop client threads sending the same
held-out prompts (bench_serve.prompts, the same draw per --prompt-seed) one after another. Prints per run the MB of
experts moved per generated token, distinct experts per decode step and TTFT p50 / p99; then mean and median.

A fresh engine per run (a cold expert cache, as a fresh server). One run is a deterministic trajectory, but a
small change in arrival order changes every later choice, so `--jitter` (each client waits up to this many
seconds between requests, from a seeded generator per run) gives `--reps` different trajectories of one draw;
tune on their mean, never on one run. Bytes agree with bench_serve.py's range; its latencies do not (no HTTP).

    python benchmarks/sim_serve.py --schedule routing --prompt-seeds 0,1 --reps 8 [--schedule-max-skips N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serve import percentile, prompts  # noqa: E402


def engine_of(max_batch: int, profile: Path):
    """The engine `moe-offload serve --profile P --max-batch N --max-context 128` loads."""
    from offload_engine.cli import serve_cmd
    from offload_engine.cli.main import main
    from offload_engine.cli.model_inputs import model_path
    from offload_engine.cli.run_options import run_config
    from offload_engine.engine import OffloadEngine

    parsed, run = {}, serve_cmd.run
    serve_cmd.run = lambda args: parsed.setdefault("args", args) and 0  # the CLI's parsing, not its server
    try:
        main(["serve", "--profile", str(profile), "--max-batch", str(max_batch), "--max-context", "128"])
    finally:
        serve_cmd.run = run
    args = parsed["args"]
    return OffloadEngine.from_run_config(model_path(args), run_config(args))


def one(args, schedule: str, seed: int, rep: int) -> dict:
    from offload_engine.serving.scheduler import Scheduler

    engine = engine_of(args.max_batch, args.profile)
    scheduler = Scheduler(engine, max_queue=1024, max_batch=args.max_batch, schedule=schedule,
                          max_skips=args.schedule_max_skips)
    queue = [engine.tokenizer(p)["input_ids"]
             for p in prompts(max(args.requests, 3 * args.clients), 64, seed=args.clients + 1000 * seed)]
    lock, done = threading.Lock(), []

    def client(c: int) -> None:
        rng = random.Random(1000 * rep + c)
        while True:
            with lock:
                if not queue:
                    return
                ids = queue.pop()
            done.append(scheduler.submit(ids, max_new_tokens=args.max_tokens).result(600))
            if args.jitter:
                time.sleep(rng.uniform(0, args.jitter))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t = scheduler.totals
    scheduler.close()
    engine.close()
    ttft = [r.ttft_s for r in done]
    return {"mb": t.bytes_to_device / t.generated_tokens / 1e6, "experts": t.decode_lookups / t.decode_steps,
            "skips": t.schedule_skips, "ttft_p50": percentile(ttft, 0.5), "ttft_p99": percentile(ttft, 0.99)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", default="routing", help="fifo, routing or fifo,routing")
    p.add_argument("--schedule-max-skips", type=int, default=None)
    p.add_argument("--prompt-seeds", default="0,1")
    p.add_argument("--reps", type=int, default=8)
    p.add_argument("--jitter", type=float, default=0.3)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--profile", type=Path, default=ROOT / "profiles" / "demo.toml")
    args = p.parse_args()
    for seed in (int(s) for s in args.prompt_seeds.split(",")):
        for schedule in args.schedule.split(","):
            runs = [one(args, schedule, seed, rep) for rep in range(args.reps)]
            for r in runs:
                print(f"{schedule:>8} seed {seed}: {r['mb']:.3f} MB moved/token, {r['experts']:.1f} distinct experts/"
                      f"step, {r['skips']} skips, TTFT p50 {r['ttft_p50']:.2f} s p99 {r['ttft_p99']:.2f} s", flush=True)
            mb = [r["mb"] for r in runs]
            print(f"{schedule:>8} seed {seed}: MB moved/token mean {statistics.mean(mb):.3f} median "
                  f"{statistics.median(mb):.3f} of {len(runs)} runs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
