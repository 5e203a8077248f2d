"""What quantized experts buy on the bundled model: at the demo budget and two more, for the experts as stored
(bf16), int8 and int4 (`--expert-dtype`): the experts that fit, hit rate, bytes moved per token, decode tokens/s.

Every configuration decodes the same held-out prompts (benchmarks/heldout.py, one per domain) greedily; the
configurations run interleaved, round after round, each round in a fresh engine, and the medians are printed.
`--host-memory direct` runs the same from the disk tier (int8/int4 are then read in bf16 and quantized on
every miss: there is no quantized file to read them from).

    python benchmarks/bench_formats.py [--budgets 60MiB,66.7MiB,80MiB] [--rounds 3] [--tokens 48]
                                       [--host-memory direct] [--json runs/formats.json]

At a real shape, checkpoints written by benchmarks/make_checkpoint.py in each format, side by side:

    python benchmarks/bench_formats.py --models bf16=DIR,fp8=DIR_FP8 --budgets 1.5GiB,2GiB --max-context 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: see train_model.py

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from offload_engine import DEFAULT_MODEL, OffloadEngine  # noqa: E402

FORMATS = ("auto", "int8", "int4")
EOS_SEPARATOR = "<|endoftext|>"


def prompts(heldout: Path, tokenizer, length: int) -> list[list[int]]:
    """The first `length` tokens of each domain's held-out text."""
    out = []
    for f in sorted(heldout.glob("*.txt")):
        text = f.read_text(encoding="utf-8").split(EOS_SEPARATOR)[0]
        out.append(tokenizer(text)["input_ids"][:length])
    if not out:
        raise SystemExit(f"no held-out text in {heldout}; run: python benchmarks/heldout.py --max-chars 20000")
    return out


def run_once(model, budget: str, fmt: str, host: str | None, ids: list[list[int]], tokens: int, args):
    engine = OffloadEngine.from_pretrained(model, memory_budget=budget, max_context=args.max_context,
                                           expert_dtype=fmt, host_memory=host, threads=args.threads, progress=False)
    try:
        rates, hits, lookups, moved, made = [], 0, 0, 0, 0
        for prompt in ids:
            r = engine.generate(prompt, max_new_tokens=tokens, ignore_eos=True)
            rates.append(r.stats.decode_tokens_per_s)
            hits, lookups = hits + r.stats.hits, lookups + r.stats.hits + r.stats.misses
            moved, made = moved + r.stats.bytes_to_device, made + r.stats.generated_tokens
        return {"slots": engine.plan.expert_slots, "total": engine.plan.total_experts,
                "expert_bytes": engine.plan.expert_bytes, "host": engine.store.mode,
                "hit_rate": hits / lookups, "bytes_per_token": moved / made,
                "decode_tok_s": statistics.median(rates)}
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="60MiB,66.7MiB,80MiB", help="memory budgets, comma-separated")
    p.add_argument("--formats", default=",".join(FORMATS), help="--expert-dtype values for the bundled model")
    p.add_argument("--models", default=None, metavar="LABEL=DIR,...",
                   help="checkpoints to compare instead (each as stored), e.g. bf16=DIR,fp8=DIR_FP8")
    p.add_argument("--max-context", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--host-memory", default=None, help="host memory mode (default: the engine's choice)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--heldout", type=Path, default=REPO / ".cache" / "heldout")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    if args.models:  # label -> (checkpoint, --expert-dtype)
        models = {label: (Path(path), "auto") for label, _, path in (m.partition("=") for m in args.models.split(","))}
    else:
        models = {"bf16" if f == "auto" else f: (DEFAULT_MODEL, f) for f in args.formats.split(",")}
    ids = {label: prompts(args.heldout, AutoTokenizer.from_pretrained(path), args.prompt_tokens)
           for label, (path, _) in models.items()}
    configs = [(b, label) for b in args.budgets.split(",") for label in models]
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):  # interleaved: every configuration once a round
        for budget, label in configs:
            path, fmt = models[label]
            runs[budget, label].append(run_once(path, budget, fmt, args.host_memory, ids[label], args.tokens, args))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    table = {}
    print(f"{'budget':>9} {'experts':>7} {'slots':>11} {'expert KiB':>10} {'host':>6} {'hit rate':>8} "
          f"{'KB/token':>9} {'decode tok/s':>12}")
    for (budget, label), rs in runs.items():
        row = {k: rs[0][k] for k in ("slots", "total", "expert_bytes", "host")}
        row.update({k: statistics.median(x[k] for x in rs) for k in ("hit_rate", "bytes_per_token", "decode_tok_s")})
        row["decode_tok_s_all"] = [x["decode_tok_s"] for x in rs]
        table[f"{budget} {label}"] = row
        print(f"{budget:>9} {label:>7} {row['slots']:>5} of {row['total']:<3} {row['expert_bytes'] / 1024:>10.1f} "
              f"{row['host']:>6} {row['hit_rate']:>8.3f} {row['bytes_per_token'] / 1e3:>9.1f} "
              f"{row['decode_tok_s']:>12.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
