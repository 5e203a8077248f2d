"""llama.cpp's decode tokens/s (llama-bench, decode only) on our checkpoints, converted in the engine's dtype.

    python -m benchmarks.llamacpp.bench [MODEL_DIR ...] [--threads 2] [--tokens 64] [--repetitions 5]
                                              [--depth 0] [--out F.json]

Without MODEL_DIR: the bundled default model and the 213M Mixtral-shaped model of benchmarks/bench_offload.py
(made here with its make_checkpoint, fp32, in .cache/llamacpp/models/). Prints tokens/s per model and writes
a JSON record (llama.cpp version and commit, build flags, CPU, date, conversions, llama-bench's own output).

For interleaving with our engine, import and call:

    from benchmarks.llamacpp.bench import llama_bench
    from benchmarks.llamacpp.convert import convert
    llama_bench(convert(model_dir).gguf, threads=2, n_tokens=64, repetitions=5)["decode_tokens_per_s"]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import re
import subprocess
from pathlib import Path

from .convert import convert
from .synthetic_tokenizer import write_for_config
from .toolchain import CACHE, ROOT, Toolchain

DEFAULT_MODEL = ROOT / "offload_engine" / "default_model"
MIXTRAL_213M = CACHE / "models" / "mixtral-213m"


def llama_bench(gguf_path: Path, threads: int = 2, n_tokens: int = 64, repetitions: int = 5, depth: int = 0,
                toolchain: Toolchain | None = None) -> dict:
    """One llama-bench run: decode n_tokens after `depth` tokens of context (no prompt timed), repetitions
    times after llama-bench's warm-up run. Returns decode_tokens_per_s (the median repetition: one stalled
    repetition on a shared machine moves llama-bench's own mean a lot), mean and stddev, every repetition's
    rate and llama-bench's JSON record."""
    cmd = llama_bench_command(gguf_path, threads, n_tokens, repetitions, depth, toolchain)
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    (record,) = json.loads(out.stdout)
    samples = record["samples_ts"]
    return {"decode_tokens_per_s": statistics.median(samples), "mean_tokens_per_s": record["avg_ts"],
            "stddev_tokens_per_s": record["stddev_ts"], "samples_tokens_per_s": samples, "threads": threads,
            "n_tokens": n_tokens, "depth": depth, "repetitions": repetitions, "command": cmd, "llama_bench": record}


def llama_bench_command(gguf_path: Path, threads: int = 2, n_tokens: int = 64, repetitions: int = 5, depth: int = 0,
                        toolchain: Toolchain | None = None) -> list[str]:
    """llama-bench timing decode only: n_tokens after `depth` tokens of context, no prompt, JSON out."""
    binary = (toolchain or Toolchain.load()).binary("llama-bench")
    return [str(binary), "-m", str(gguf_path), "-t", str(threads), "-p", "0", "-n", str(n_tokens), "-d", str(depth),
            "-r", str(repetitions), "-o", "json"]


def llama_completion_command(gguf_path: Path, prompt: str, n_tokens: int, threads: int = 2,
                             toolchain: Toolchain | None = None) -> list[str]:
    """llama-completion, greedy, one prompt, no chat template, no warm-up: a new user's one-shot run."""
    binary = (toolchain or Toolchain.load()).binary("llama-completion")
    return [str(binary), "-m", str(gguf_path), "-p", prompt, "-n", str(n_tokens), "--temp", "0", "--ignore-eos",
            "-no-cnv", "--no-display-prompt", "-t", str(threads), "-s", "0", "--no-warmup"]


def llama_timer(stderr: str) -> dict:
    """llama.cpp's own timer (llama_perf_context_print on stderr): prompt and decode times, decode tokens/s
    and the time to the first token."""
    out = {}
    for key, name in (("prompt eval time", "prompt"), ("eval time", "decode")):
        m = re.search(rf"(?<!prompt ){key}\s*=\s*([\d.]+) ms /\s*(\d+) (?:tokens|runs)", stderr)
        if m:
            out[f"{name}_ms"], out[f"{name}_n"] = float(m.group(1)), int(m.group(2))
    if out.get("decode_n") and out.get("decode_ms"):
        out["decode_tokens_per_s"] = out["decode_n"] / (out["decode_ms"] / 1000)
    if "prompt_ms" in out:
        out["ttft_s"] = out["prompt_ms"] / 1000
    return out


def ensure_mixtral_213m(path: Path = MIXTRAL_213M) -> Path:
    """bench_offload.py's checkpoint (its make_checkpoint: seed 0, fp32) with a synthetic tokenizer, made once."""
    spec = importlib.util.spec_from_file_location("bench_offload", ROOT / "benchmarks" / "bench_offload.py")
    bench_offload = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_offload)
    import torch

    bench_offload.make_checkpoint(path, torch.float32)
    if not (path / "tokenizer.json").is_file():  # so the engine's CLI and llama-completion take the same text
        write_for_config(path, json.loads((path / "config.json").read_text()))
    return path


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    return {"cpu_model": cpu_model(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "platform": platform.platform(), "nice": os.nice(0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dirs", nargs="*", type=Path, help="default: the bundled model and the 213M model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--depth", type=int, default=0, help="context tokens before the timed decode (llama-bench -d)")
    parser.add_argument("--out", type=Path, help="default: .cache/llamacpp/results/llamacpp-<time>.json")
    args = parser.parse_args()
    toolchain = Toolchain.load()
    model_dirs = args.model_dirs or [DEFAULT_MODEL, ensure_mixtral_213m()]
    now = datetime.datetime.now(datetime.timezone.utc)
    info = toolchain.info
    print(f"llama.cpp {info['llama_cpp_commit']} (llama-cpp-python {info['llama_cpp_python_version']}), "
          f"{cpu_model()}, {args.threads} threads, load average {os.getloadavg()[0]:.2f}")
    results = []
    for model_dir in model_dirs:
        conversion = convert(model_dir, toolchain=toolchain)
        bench = llama_bench(conversion.gguf, args.threads, args.tokens, args.repetitions, args.depth, toolchain)
        record = bench["llama_bench"]
        print(f"{model_dir.name:>16} {conversion.outtype:>4} {record['model_n_params'] / 1e6:6.1f}M params  "
              f"decode {bench['decode_tokens_per_s']:8.2f} tok/s median (mean {bench['mean_tokens_per_s']:.2f} "
              f"± {bench['stddev_tokens_per_s']:.2f})  tokenizer check: {conversion.check['tokens_compared']} "
              f"tokens equal")
        results.append({"model_dir": str(model_dir), "conversion": conversion.record(), **bench})
    out = args.out or CACHE / "results" / f"llamacpp-{now:%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": now.isoformat(timespec="seconds"), "machine": machine(), "build": info,
                               "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
