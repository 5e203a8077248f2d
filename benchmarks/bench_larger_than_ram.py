"""A model at least 3x larger than the memory it may use, side by side with llama.cpp under the same limit.

    python benchmarks/bench_larger_than_ram.py [--shape qwen3-30b-a3b] [--layers 8] [--vocab N] [--limit 3GiB]
        [--tokens 32] [--rounds 2] [--configs llama.cpp,lru,predictive] [--formats bf16,fp8] [--residual steady]
        [--out runs/larger_than_ram.json]

Makes (once) a random-weight bf16 checkpoint of a real model's shape (benchmarks/make_checkpoint.py) and its
GGUF (benchmarks/llamacpp/convert.py), checks that the checkpoint is at least 3x the limit, then, round by
round, interleaved, each program a fresh process inside a cgroup v1 memory group with a hard limit (its page
cache counted; as root), after the page cache was emptied and the machine's load fell under 1:

- llama.cpp: `llama-completion`, the GGUF memory-mapped as llama.cpp always does, 2 threads, greedy;
  its own timer gives the decode rate and the prompt's time;
- this engine, `moe-offload generate --model DIR` with no memory flags (it finds the limit, plans for it
  and takes the direct tier), LRU and no prefetch;
- the same with the predictive cache, the next-gate predictor and prefetch (automatic depth).

With `--formats bf16,fp8` (or mxfp4 for gpt-oss-20b) the engine's configurations also run on the same shape
written in that format (make_checkpoint.py --format; named e.g. "lru-fp8"): the disk moves its stored bytes.

Per run: decode tokens/s, TTFT, bytes the process read from the disk per generated token (/proc/PID/io
read_bytes, less what a one-token run of the same program read: loading the program, its libraries and the
non-expert weights, and the prompt), hit rate (the engine's), the cgroup's peak memory and the kernel's OOM kills.
Prints a table and writes every figure (and the commands) as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offload_engine.atomic_write import atomic_output  # noqa: E402
from benchmarks.fresh_process import MemoryCgroup, drop_page_cache, run_watched, wait_until_quiet  # noqa: E402
from benchmarks.llamacpp.bench import llama_completion_command, llama_timer  # noqa: E402

PROMPT = "The history of the city begins with a small settlement on the river, where"
ENGINE_CONFIGS = {
    "lru": ["--policy", "lru", "--prefetch-depth", "0"],
    "predictive": ["--policy", "predictive", "--predictor", "next-gate"],
}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 3GiB)")
    unit = m.group(2).upper().rstrip("B").rstrip("I")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(unit or " "))


def checkpoint_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def make_checkpoint(shape: str, layers: int, out: Path, vocab: int | None = None, fmt: str = "bf16",
                    residual: str = "random") -> Path:
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_checkpoint.py"), "--shape", shape,
                        "--layers", str(layers), "--dtype", "bf16", "--out", str(out), "--format", fmt,
                        "--residual", residual, *(["--vocab", str(vocab)] if vocab else [])], check=True)
    return out


def engine_command(model: Path, config: str, tokens: int) -> list[str]:
    script = Path(sys.executable).with_name("moe-offload")
    return [str(script), "generate", "--model", str(model), "--prompt", PROMPT, "--max-new-tokens", str(tokens),
            "--ignore-eos", "--json", "--quiet", *ENGINE_CONFIGS[config.partition("-")[0]]]


def one_run(name: str, command: list[str], group: MemoryCgroup, tokens: int) -> dict:
    drop_page_cache()
    load = wait_until_quiet()
    run = run_watched(command, group=group)
    row = {"config": name, "returncode": run.returncode, "killed": run.killed, "oom_kills": run.oom_kills,
           "wall_s": run.wall_s, "read_bytes": run.read_bytes, "read_bytes_per_token": run.read_bytes / tokens,
           "peak_cgroup_bytes": run.peak_bytes, "peak_rss_bytes": run.peak_rss_bytes, "load_before": load}
    if run.returncode != 0:
        row["error"] = (run.stderr or run.stdout)[-1500:]
        return row
    if name == "llama.cpp":
        row.update(llama_timer(run.stderr))
    else:
        stats = json.loads(run.stdout)["stats"]
        row.update({k: stats[k] for k in ("decode_tokens_per_s", "ttft_s", "hit_rate", "hits", "misses",
                                           "prefetches", "prefetch_hits", "prefetches_dropped", "bytes_to_device",
                                           "stall_s", "generated_tokens")})
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--limit", type=parse_bytes, default=parse_bytes("3GiB"), help="the cgroup's memory limit")
    p.add_argument("--vocab", type=int, default=None,
                   help="a smaller vocabulary (default: the model's; the experts keep their real shape)")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp's threads (the engine takes its default)")
    p.add_argument("--configs", default="llama.cpp,lru,predictive")
    p.add_argument("--formats", default="bf16", help="the engine's configurations on each format's checkpoint")
    p.add_argument("--residual", choices=("random", "steady"), default="random",
                   help="make_checkpoint.py --residual: steady lets next-gate see ahead as in trained models")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="default: /tmp/ck/<shape>-<layers>[-v<vocab>][-steady]")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "larger_than_ram.json")
    args = p.parse_args()

    why = MemoryCgroup.available()
    if why is not None:
        print(f"bench_larger_than_ram: cannot limit memory here: {why}", file=sys.stderr)
        return 2
    default = Path(f"/tmp/ck/{args.shape}-{args.layers}" + (f"-v{args.vocab}" if args.vocab else "")
                   + ("-steady" if args.residual == "steady" else ""))
    model = make_checkpoint(args.shape, args.layers, args.checkpoint or default, args.vocab, residual=args.residual)
    models = {"bf16": model}
    for fmt in args.formats.split(","):
        if fmt != "bf16":
            models[fmt] = make_checkpoint(args.shape, args.layers, model.with_name(f"{model.name}-{fmt}"), args.vocab,
                                          fmt, args.residual)
    configs = [c for c in args.configs.split(",") if c == "llama.cpp"]
    configs += [c if fmt == "bf16" else f"{c}-{fmt}" for fmt in models for c in args.configs.split(",")
                if c != "llama.cpp"]
    size = checkpoint_bytes(model)
    if size < 3 * args.limit:
        print(f"bench_larger_than_ram: the checkpoint ({size / 2**30:.1f} GiB) is not 3x the limit "
              f"({args.limit / 2**30:.1f} GiB); raise --layers or lower --limit", file=sys.stderr)
        return 2
    gguf = None
    if "llama.cpp" in configs:
        from benchmarks.llamacpp.convert import convert

        gguf = convert(model).gguf
    def command(config: str, tokens: int) -> list[str]:
        fmt = config.partition("-")[2] or "bf16"
        return (llama_completion_command(gguf, PROMPT, tokens, args.threads) if config == "llama.cpp"
                else engine_command(models[fmt], config, tokens))

    commands = {c: command(c, args.tokens) for c in configs}
    rows = []
    with MemoryCgroup("moe_larger_than_ram", args.limit) as group:
        base = {}  # what a one-token run reads: the program, its libraries, the non-expert weights, the prompt
        for name in configs:
            base[name] = one_run(name, command(name, 1), group, 1)["read_bytes"]
            print(f"{name}: a one-token run read {base[name] / 1e6:.0f} MB", flush=True)
        for r in range(args.rounds):
            for name in (configs if r % 2 == 0 else configs[::-1]):  # interleaved, the order alternating
                row = one_run(name, commands[name], group, args.tokens)
                row["round"] = r
                row["read_bytes_per_token"] = (row["read_bytes"] - base[name]) / max(1, args.tokens - 1)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
                if "error" in row:
                    print(row["error"], file=sys.stderr)
    summary = {}
    for name in configs:
        mine = [r for r in rows if r["config"] == name and r["returncode"] == 0]
        if mine:
            summary[name] = {key: statistics.median(r[key] for r in mine) for key in
                             ("decode_tokens_per_s", "ttft_s", "read_bytes_per_token", "peak_cgroup_bytes")
                             if all(r.get(key) is not None for r in mine)}
            summary[name]["oom_kills"] = sum(r["oom_kills"] for r in rows if r["config"] == name)
            summary[name]["failed_runs"] = sum(r["returncode"] != 0 for r in rows if r["config"] == name)
            if name != "llama.cpp":
                summary[name]["hit_rate"] = statistics.median(r["hit_rate"] for r in mine)
    record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "machine": platform.node(), "cpu": _cpu(), "shape": args.shape, "layers": args.layers,
              "vocab": args.vocab, "residual": args.residual,
              "checkpoint_bytes": size, "limit_bytes": args.limit,
              "format_bytes": {fmt: checkpoint_bytes(m) for fmt, m in models.items()}, "tokens": args.tokens, "rounds": args.rounds,
              "commands": commands, "one_token_read_bytes": base, "runs": rows, "medians": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as f:
        f.write(json.dumps(record, indent=1, default=str).encode())
    print(f"\n{args.shape}, {args.layers} layers: {size / 2**30:.1f} GiB under a {args.limit / 2**30:.1f} GiB limit, "
          f"{args.tokens} tokens, medians of {args.rounds} interleaved rounds")
    print(f"{'config':<12}{'decode tok/s':>13}{'TTFT s':>9}{'MB read/token':>15}{'peak MiB':>10}{'hit rate':>9}"
          f"{'OOM kills':>10}")
    for name, s in summary.items():
        print(f"{name:<12}{s.get('decode_tokens_per_s', float('nan')):>13.2f}{s.get('ttft_s', float('nan')):>9.2f}"
              f"{s.get('read_bytes_per_token', 0) / 1e6:>15.1f}{s.get('peak_cgroup_bytes', 0) / 2**20:>10.0f}"
              f"{s.get('hit_rate', float('nan')):>9.3f}{s['oom_kills']:>10}")
    return 0


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    sys.exit(main())
