"""Reading experts from the checkpoint files: a fresh private memory map against positional reads.

Why the `files` host mode reads with preadv: each expert tensor of one MoE layer of bench_offload.py's
checkpoint is copied into a preallocated slot, (1) from a new memory map of the file (first touches fault
each page in) and (2) with one `preadv` per tensor, both with the file in the page cache; and, for scale,
(3) a plain memcpy between two warm buffers of the same size.

    python benchmarks/bench_offload.py   # once: makes the checkpoint in /tmp/moe-offload-bench/mixtral-200m
    python benchmarks/bench_reads.py [--dir /tmp/moe-offload-bench/mixtral-200m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import time
from pathlib import Path

import torch

from offload_engine.checkpoint.directory import CheckpointTensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-offload-bench/mixtral-200m"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tensors = CheckpointTensors(args.dir)
    keys = [k for k in tensors.keys() if ".experts." in k and ".layers.3." in k]
    infos = [tensors.infos[k] for k in keys]
    total = sum(i.nbytes for i in infos)
    slots = [torch.empty(i.shape, dtype=i.dtype) for i in infos]
    for s in slots:
        s.zero_()  # the destination pages exist before timing
    for info, slot in zip(infos, slots):  # the file into the page cache
        tensors.read_into(info.key, slot)

    def from_new_map() -> float:
        start = time.perf_counter()
        with open(infos[0].file, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            for info, slot in zip(infos, slots):
                src = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.begin)
                slot.view(torch.uint8).view(-1).copy_(src)
            elapsed = time.perf_counter() - start
            del src
            mapped.close()
        return elapsed

    def with_preadv() -> float:
        start = time.perf_counter()
        for info, slot in zip(infos, slots):
            tensors.read_into(info.key, slot)
        return time.perf_counter() - start

    src, dst = torch.ones(total, dtype=torch.uint8), torch.zeros(total, dtype=torch.uint8)

    def memcpy() -> float:
        start = time.perf_counter()
        dst.copy_(src)
        return time.perf_counter() - start

    print(f"{len(keys)} expert tensors of layer 3, {total / 1e6:.1f} MB, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    for name, fn in (("new memory map, first touch", from_new_map), ("preadv into the slot", with_preadv),
                     ("memcpy, warm buffers", memcpy)):
        times = [fn() for _ in range(args.repeats)]
        print(f"  {name:<28} {total / statistics.median(times) / 1e9:6.2f} GB/s")


if __name__ == "__main__":
    main()
