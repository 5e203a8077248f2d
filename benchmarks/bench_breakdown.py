"""Where a decode step's time goes, per token: attention, the MoE layers (and inside them the expert compute,
copies and CPU experts), the LM head, and everything else (Python, norms, sampling, the decode loop); and
beside each part the bytes of weights it reads per token and the rate it reads them at, against this
machine's read bandwidth measured in the same process (a STREAM-like sum over 1 GiB, far past the caches,
at the same threads).

Timers are forward hooks on the model's modules (attention blocks, MoE blocks, LM head) around the engine's
own decode loop, batch 1, greedy; the engine's counters give copy and CPU-expert time. The hooks cost a few
microseconds each: the breakdown is read as shares, the undisturbed rate is printed beside it.

    python benchmarks/bench_breakdown.py [--model DIR | --mixtral-213m] [--expert-slots N] [--cold-experts cpu]
        [--cpu-weights packed|stored]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

# OpenMP's default wait policy, as the CLI runs: with OMP_WAIT_POLICY=PASSIVE (set here until stop 27) every small
# operation woke sleeping threads, and the Qwen3-30B-A3B shape decoded at 47 tok/s here against 62-67 in the CLI
import torch  # noqa: E402

from offload_engine.packed_weights import PackedLinear  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
MIXTRAL_213M = Path("/tmp/moe-offload-bench/mixtral-200m")  # where bench_offload.py makes it


def attach_timers(model, spec):
    """Forward hooks adding each module kind's time to `spent`; returns (spent, handles)."""
    spent: dict[str, float] = defaultdict(float)
    started: dict[int, float] = {}
    handles = []
    kinds = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("self_attn", "attention", "linear_attn"):
            kinds[name] = "attention"
        elif name.endswith("lm_head"):
            kinds[name] = "lm head"
    for path in spec.experts_paths:
        kinds[path.rpartition(".")[0]] = "MoE block (router, experts, shared)"
        kinds[path] = "experts (cache, copies, compute)"
    for name, kind in kinds.items():
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(lambda m, a: started.__setitem__(id(m), time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda m, a, o, kind=kind: spent.__setitem__(kind, spent[kind] + time.perf_counter() - started[id(m)])))
    return spent, handles


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second a sum over a `gib` GiB fp32 tensor reads at (the best of `repeats`): the most a
    memory-bound decode step can read weights at on this machine, with `threads` threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    data = torch.ones(int(gib * (1 << 30)) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    torch.set_num_threads(before)
    return data.numel() * 4 / best


def bytes_read(engine) -> dict[str, int]:
    """Weight bytes each part reads per decode token at batch 1: every attention and LM-head weight, the MoE
    blocks' own (router, shared experts)."""
    def nbytes(module) -> int:  # parameters, and the weights packed for oneDNN (packed_weights.PackedLinear)
        weights = [*module.parameters(), *(m.packed for m in module.modules() if isinstance(m, PackedLinear))]
        return sum(p.numel() * p.element_size() for p in weights)

    model, spec = engine.model, engine.spec
    attention = sum(nbytes(m) for name, m in model.named_modules()
                    if name.rsplit(".", 1)[-1] in ("self_attn", "attention", "linear_attn"))
    blocks = sum(nbytes(model.get_submodule(path.rpartition(".")[0])) - nbytes(model.get_submodule(path))
                 for path in spec.experts_paths)
    head = model.get_output_embeddings()
    return {"attention": attention, "router and shared experts": blocks,
            "lm head": nbytes(head) if head is not None else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "offload_engine" / "default_model")
    parser.add_argument("--mixtral-213m", action="store_true", help="the 213M Mixtral-shaped model of bench_offload")
    parser.add_argument("--expert-slots", type=int, default=None,
                        help="default: the plan's choice (every expert that fits; on a CPU device packed in place "
                             "of slots where they pack)")
    parser.add_argument("--cold-experts", default="stream")
    parser.add_argument("--cpu-weights", default="packed", choices=("packed", "stored"))
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from offload_engine import OffloadEngine

    model = args.model
    if args.mixtral_213m:
        from bench_offload import make_checkpoint

        model = MIXTRAL_213M
        make_checkpoint(model, torch.float32)
    # threads= as asked: loading sets the process's threads, so an earlier torch.set_num_threads would not hold
    engine = OffloadEngine.from_pretrained(model, expert_slots=args.expert_slots, cold_experts=args.cold_experts,
                                           progress=False, threads=args.threads,
                                           cpu_weights=args.cpu_weights)
    prompt = list(range(10, 42))
    engine.generate(prompt, max_new_tokens=8, ignore_eos=True)  # warm
    rates = [engine.generate(prompt, max_new_tokens=args.tokens, ignore_eos=True).stats.decode_tokens_per_s
             for _ in range(args.repeats)]
    spent, handles = attach_timers(engine.model, engine.spec)
    start = time.perf_counter()
    stats = engine.generate(prompt, max_new_tokens=args.tokens, ignore_eos=True).stats
    total = time.perf_counter() - start
    for h in handles:
        h.remove()
    steps = args.tokens
    per = {k: v / steps * 1e3 for k, v in spent.items()}
    moe = per.pop("MoE block (router, experts, shared)", 0.0)
    experts = per.get("experts (cache, copies, compute)", 0.0)
    rows = {"attention": per.get("attention", 0.0), "router and shared experts": moe - experts,
            "experts: copies": stats.copy_s / steps * 1e3, "experts: CPU experts": stats.cpu_s / steps * 1e3,
            "experts: the rest (cache, kernels)": experts - (stats.copy_s + stats.cpu_s) / steps * 1e3,
            "lm head": per.get("lm head", 0.0)}
    rows["everything else (Python, norms, sampling, loop)"] = total / steps * 1e3 - sum(rows.values())
    weights = bytes_read(engine)
    # the experts' bytes as the timed generation read them (its prefill included, as in the times): those the
    # CPU computed where they lie, and those the kernels read from slots (every distinct expert of each call)
    expert = engine.store.expert_nbytes()
    reads = {"attention": weights["attention"], "router and shared experts": weights["router and shared experts"],
             "experts: CPU experts": stats.cpu_experts * expert / steps,
             "experts: the rest (cache, kernels)": (stats.hits + stats.misses) * expert / steps,
             "lm head": weights["lm head"]}
    bandwidth = read_bandwidth(args.threads)
    held = " (packed in place of slots, computed on the CPU)" if engine.plan.experts_packed else ""
    print(f"{model.name}: {engine.plan.expert_slots} of {engine.plan.total_experts} experts resident{held}, cold experts "
          f"{args.cold_experts} ({args.cpu_weights}), {args.threads} threads; decode {statistics.median(rates):.1f} tok/s undisturbed "
          f"(median of {args.repeats}); with timers {steps / total:.1f} tok/s incl. prefill; this machine reads "
          f"{bandwidth / 1e9:.1f} GB/s (1 GiB sum, {args.threads} threads)")
    for name, ms in rows.items():
        line = f"  {name:<50}{ms:8.3f} ms/token  {100 * ms / (total / steps * 1e3):5.1f}%"
        if reads.get(name) and ms > 0:
            rate = reads[name] / (ms / 1e3)
            line += f"  {reads[name] / 1e6:8.1f} MB/token  {rate / 1e9:5.1f} GB/s ({100 * rate / bandwidth:3.0f}%)"
        print(line)


if __name__ == "__main__":
    main()
