"""What a background copy costs the thread that computes: a Python thread pool against the GIL-free copy thread.

A stand-in for a decode step (small torch ops, `--layers` calls per token) runs while each call's expert-sized
copies (`--copies` x `--expert-kib` KiB, host memory to host memory) are done one of four ways:

    none     no copies (the floor)
    inline   torch copies in the computing thread (no overlap: what a demand load costs)
    pool     torch copies on a one-thread ThreadPoolExecutor (what the engine did before copy_worker.py)
    worker   copy_worker.CopyWorker: posted to a compiled thread that never takes the GIL

Each call posts its copies, computes, then waits for them. The modes run in short units (--unit tokens) in a
fresh random order each round, so the machine's drift falls on all of them alike; medians over the rounds.

    python benchmarks/bench_copy_thread.py [--threads 1] [--rounds 30]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from offload_engine.experts import copy_worker  # noqa: E402

MODES = ("none", "inline", "pool", "worker")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--unit", type=int, default=20, help="tokens per timed unit")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--copies", type=int, default=2, help="copies per layer call")
    parser.add_argument("--expert-kib", type=int, default=192)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    size = args.expert_kib * 1024
    src = torch.randint(0, 255, (64, size), dtype=torch.uint8)
    dst = torch.zeros((16, size), dtype=torch.uint8)
    x, w1, w2 = torch.randn(1, 256), torch.randn(256, 1024), torch.randn(1024, 256)
    pool = ThreadPoolExecutor(1)
    worker = copy_worker.CopyWorker(keepalive=(src, dst))

    def compute() -> None:
        for _ in range(12):
            y = torch.relu(x @ w1) @ w2
            y.mul_(0.5)

    def torch_copies(pairs) -> None:
        for d, s in pairs:
            dst[d].copy_(src[s])

    def unit(mode: str, start: int) -> float:
        t0 = time.perf_counter()
        for t in range(start, start + args.unit):
            for layer in range(args.layers):
                pairs = [((t + layer + q) % 16, (7 * t + layer + q) % 64) for q in range(args.copies)]
                handle = None
                if mode == "inline":
                    torch_copies(pairs)
                elif mode == "pool":
                    handle = pool.submit(torch_copies, pairs)
                elif mode == "worker":
                    rows = np.array([(dst[d].data_ptr(), src[s].data_ptr(), size, -1) for d, s in pairs], dtype=np.int64)
                    handle = worker.post(rows)
                compute()
                if handle is not None:
                    handle.result()
        return (time.perf_counter() - t0) / args.unit * 1e3

    rng = random.Random(0)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        order = list(MODES)
        rng.shuffle(order)
        for mode in order:
            times[mode].append(unit(mode, r * args.unit))
    worker.close()
    pool.shutdown()
    base = statistics.median(times["none"])
    print(f"{args.layers} calls a token, {args.copies} copies of {args.expert_kib} KiB each, torch threads "
          f"{args.threads}; medians of {args.rounds} shuffled rounds of {args.unit} tokens")
    for mode in MODES:
        m = statistics.median(times[mode])
        print(f"  {mode:<8}{m:8.3f} ms/token  {m - base:+7.3f} ms over none")


if __name__ == "__main__":
    main()
