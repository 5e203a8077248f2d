"""The first run on a GPU: build real-shape checkpoints there, run the GPU tests, decode at three budgets.

    python benchmarks/gpu_check.py --out runs/gpu              # on a GPU machine, from the repository root
    python benchmarks/gpu_check.py --dry-run --out runs/dry    # on the CPU: tiny copies, as far as CPU allows

One command, at most ~8 minutes on one H100 or H200 (`--deadline`): it
1. measures the host-to-device link (pinned and pageable copies of 1 GiB, CUDA events);
2. writes Mixtral-8x7B's shape with 2 decoder layers and Qwen3-30B-A3B's with 4 to the machine's own disk
   (random weights drawn on the GPU, benchmarks/make_checkpoint.py; nothing large travels there);
3. runs tests/test_gpu.py (exactness on CUDA, the host-sync count, the budget as a hard cap);
4. decodes with each checkpoint at three memory budgets (the plan's minimum, and a third and two thirds of
   the experts above it), with LRU and with prediction and prefetch (predictive + next-gate), from pinned
   memory and from the files, recording per run: hit rate, decode ms per token against (1 - h) * B / BW
   (B: one token's experts' bytes, BW: the measured pinned link), host syncs per token, copy/compute overlap
   (1 - stall / copy time), peak reserved device memory against the budget, and TTFT.
Results: `gpu_check.json` and `gpu_check.md` (a table) in `--out`. `--dry-run` does all of it on the CPU
with the same expert counts and top-k at a tiny width (tests/test_gpu_check.py runs it).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from make_checkpoint import config_of, write_random  # noqa: E402

CHECKPOINTS = {"mixtral-8x7b": 2, "qwen3-30b-a3b": 4}  # shape -> decoder layers
TINY = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)  # the dry run's width; expert counts and top-k stay real
CONFIGS = {"lru": dict(policy="lru"),
           "predictive+next-gate": dict(policy="predictive", predictor="next-gate", prefetch_depth=None)}
HOSTS = ("pinned", "files")


def link_bandwidth(device: torch.device, nbytes: int) -> dict:
    """Host-to-device GB/s from pinned and from pageable memory (the CPU: a memcpy)."""
    src = torch.empty(nbytes, dtype=torch.uint8)
    if device.type != "cuda":
        dst = torch.empty_like(src)
        start = time.perf_counter()
        dst.copy_(src)
        return {"pageable_gbps": nbytes / (time.perf_counter() - start) / 1e9, "pinned_gbps": None}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = {}
    for name, host in (("pinned", src.pin_memory()), ("pageable", src)):
        dst.copy_(host, non_blocking=True)  # warm
        torch.cuda.synchronize(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(3):
            dst.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        out[f"{name}_gbps"] = 3 * nbytes / (begin.elapsed_time(end) / 1000) / 1e9
    return out


def build(out: Path, dry_run: bool, device: torch.device) -> dict[str, Path]:
    paths = {}
    for shape, layers in CHECKPOINTS.items():
        path = out / "checkpoints" / shape
        if not (path / "config.json").is_file():
            overrides = TINY if dry_run else {}
            config = config_of(shape, layers, vocab=256 if dry_run else None, **overrides)
            write_random(config, path, torch.bfloat16, progress=False, device=device.type)
        paths[shape] = path
    return paths


def gpu_tests(deadline_s: float) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=max(30, deadline_s))
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    return {"exit_code": proc.returncode, "summary": tail[-1] if tail else "", "seconds": time.perf_counter() - start,
            "failures": [line for line in tail if line.startswith(("FAILED", "ERROR"))]}


def budgets(path: Path, device: torch.device) -> list[int]:
    """The plan's minimum, then a third and two thirds of the experts above it (bytes)."""
    from offload_engine.loading import inspect_checkpoint, make_plan
    from offload_engine.run_config import RunConfig

    run = RunConfig.build(device=device, max_context=256, progress=False)
    plan = make_plan(inspect_checkpoint(path, run), run)
    extra = plan.total_experts - plan.min_slots
    return [plan.minimum_bytes + (extra * i // 3) * plan.expert_bytes for i in range(3)]


def decode(path: Path, device: torch.device, budget: int, config: dict, host: str, tokens: int,
           link_gbps: float | None) -> dict:
    from offload_engine import OffloadEngine

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_reserved(device)
    host_memory = host if cuda else ("ram" if host == "pinned" else host)
    with OffloadEngine.from_pretrained(path, device=device, memory_budget=budget, max_context=256,
                                       host_memory=host_memory, progress=False, **config) as engine:
        prompt = list(range(10, 26))
        engine.generate(prompt, max_new_tokens=2, ignore_eos=True)  # warm: kernels, first copies
        stats = engine.generate(prompt, max_new_tokens=tokens, ignore_eos=True).stats
        spec, plan = engine.spec, engine.plan
        peak = torch.cuda.max_memory_reserved(device) - base if cuda else None
    token_bytes = spec.top_k * spec.num_moe_layers * plan.expert_bytes
    bound_ms = None if not link_gbps else 1e3 * (1 - stats.hit_rate) * token_bytes / (link_gbps * 1e9)
    per_token = 1e3 / stats.decode_tokens_per_s if stats.decode_tokens_per_s else None
    return {
        "budget_bytes": budget, "expert_slots": plan.expert_slots, "total_experts": plan.total_experts,
        "hit_rate": stats.hit_rate, "decode_ms_per_token": per_token, "bound_ms_per_token": bound_ms,
        "host_syncs_per_token": stats.host_syncs / max(stats.generated_tokens, 1),
        "copy_s": stats.copy_s, "stall_s": stats.stall_s,
        "overlap": None if stats.copy_s <= 0 else max(0.0, 1 - stats.stall_s / stats.copy_s),
        "peak_reserved_bytes": peak, "within_budget": None if peak is None else peak <= budget,
        "ttft_s": stats.ttft_s, "prefetches": stats.prefetches, "prefetch_hits": stats.prefetch_hits,
    }


def markdown(result: dict) -> str:
    lines = [f"# gpu_check: {result['device']} ({result['date']})", "",
             f"link: {json.dumps(result['link'])}", f"GPU tests: {result['gpu_tests'].get('summary', '')}", "",
             "| model | budget MiB | slots | config | host | hit rate | ms/token | bound ms | syncs/token | overlap "
             "| peak reserved MiB | within budget | TTFT s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    for r in result["runs"]:
        if "skipped" in r:
            lines.append(f"| {r['model']} | | | {r['config']} | {r['host']} | skipped: {r['skipped']} |||||||| |")
            continue
        lines.append(
            f"| {r['model']} | {r['budget_bytes'] / 2**20:.0f} | {r['expert_slots']}/{r['total_experts']} "
            f"| {r['config']} | {r['host']} | {f(r['hit_rate'])} | {f(r['decode_ms_per_token'], '.2f')} "
            f"| {f(r['bound_ms_per_token'], '.2f')} | {f(r['host_syncs_per_token'], '.1f')} | {f(r['overlap'], '.2f')} "
            f"| {f(None if r['peak_reserved_bytes'] is None else r['peak_reserved_bytes'] / 2**20, '.0f')} "
            f"| {r['within_budget']} | {f(r['ttft_s'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny widths")
    parser.add_argument("--deadline", type=float, default=480, help="seconds; later runs are skipped")
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --dry-run on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
              "dry_run": args.dry_run, "runs": []}
    result["link"] = link_bandwidth(device, (64 if args.dry_run else 1024) << 20)
    print(f"link {result['link']}", flush=True)
    paths = build(args.out, args.dry_run, device)
    print(f"checkpoints built at {time.perf_counter() - start:.0f} s", flush=True)
    result["gpu_tests"] = gpu_tests(min(240.0, args.deadline / 2))
    print(f"GPU tests: {result['gpu_tests']['summary']}", flush=True)
    link = result["link"]["pinned_gbps"] or result["link"]["pageable_gbps"]
    tokens = 4 if args.dry_run else args.tokens
    for model, path in paths.items():
        for budget in budgets(path, device):
            for name, config in CONFIGS.items():
                for host in HOSTS:
                    row = {"model": model, "config": name, "host": host}
                    if time.perf_counter() - start > args.deadline:
                        result["runs"].append({**row, "skipped": "deadline"})
                        continue
                    try:
                        row.update(decode(path, device, budget, config, host, tokens, link))
                    except Exception as e:  # one failed setting must not lose the others' figures
                        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                    result["runs"].append(row)
                    print(json.dumps(row), flush=True)
    result["seconds"] = time.perf_counter() - start
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
