"""What quantized experts buy on the bundled model: at the demo budget and two more, for the experts as stored
(bf16), int8 and int4 (`--expert-dtype`): the experts that fit, hit rate, bytes moved per token, decode tokens/s.

Every configuration decodes the same held-out prompts (benchmarks/heldout.py, one per domain) greedily; the
configurations run interleaved, round after round, each round in a fresh engine, and the medians are printed.
`--host-memory direct` runs the same from the disk tier (int8/int4 are then read in bf16 and quantized on
every miss: there is no quantized file to read them from).

    python benchmarks/bench_formats.py [--budgets 60MiB,66.7MiB,80MiB] [--rounds 3] [--tokens 48]
                                       [--host-memory direct] [--json runs/formats.json]
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


def run_once(budget: str, fmt: str, host: str | None, ids: list[list[int]], tokens: int, threads: int | None):
    engine = OffloadEngine.from_pretrained(DEFAULT_MODEL, memory_budget=budget, max_context=512, expert_dtype=fmt,
                                           host_memory=host, threads=threads, progress=False)
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
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--host-memory", default=None, help="host memory mode (default: the engine's choice)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--heldout", type=Path, default=REPO / ".cache" / "heldout")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    ids = prompts(args.heldout, AutoTokenizer.from_pretrained(DEFAULT_MODEL), args.prompt_tokens)
    configs = [(b, f) for b in args.budgets.split(",") for f in args.formats.split(",")]
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in configs}
    for r in range(args.rounds):  # interleaved: every configuration once a round
        for budget, fmt in configs:
            runs[budget, fmt].append(run_once(budget, fmt, args.host_memory, ids, args.tokens, args.threads))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    table = {}
    print(f"{'budget':>9} {'experts':>7} {'slots':>11} {'expert KiB':>10} {'host':>6} {'hit rate':>8} "
          f"{'KB/token':>9} {'decode tok/s':>12}")
    for (budget, fmt), rs in runs.items():
        row = {k: rs[0][k] for k in ("slots", "total", "expert_bytes", "host")}
        row.update({k: statistics.median(x[k] for x in rs) for k in ("hit_rate", "bytes_per_token", "decode_tok_s")})
        row["decode_tok_s_all"] = [x["decode_tok_s"] for x in rs]
        table[f"{budget} {fmt}"] = row
        name = "bf16" if fmt == "auto" else fmt
        print(f"{budget:>9} {name:>7} {row['slots']:>5} of {row['total']:<3} {row['expert_bytes'] / 1024:>10.1f} "
              f"{row['host']:>6} {row['hit_rate']:>8.3f} {row['bytes_per_token'] / 1e3:>9.1f} "
              f"{row['decode_tok_s']:>12.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=1))
    return table


if __name__ == "__main__":
    main()
