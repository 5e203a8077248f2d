"""What --expert-dtype int8|int4 costs on the bundled default model: loss, greedy agreement, bytes per expert.

Experts quantized at load (int8 per output channel; int4 in groups of 128 with a scale and a zero per group),
computed on the CPU by torch's packed weight-only kernels, so the output is no longer transformers' own. Measured against the same engine with
the experts as stored (bf16), every expert resident (the figures are the format's numerics, nothing else):

(a) loss: mean next-token cross-entropy (nats) over --windows windows of --seq-len scored tokens per domain
    of the held-out text (benchmarks/heldout.py), teacher-forced, one full-sequence forward per window;
(b) greedy agreement: --prompts prompts of --prompt-len tokens per domain, --new-tokens tokens generated
    greedily (EOS ignored) by each format; the share of generated positions equal to bf16's, and the mean
    number of tokens before the first disagreement;
(c) bytes per expert as held (what a slot holds and a miss moves, scales included) and the ratio to bf16.
"bf16-by-expert" is the bf16 experts computed one at a time and then summed, as the int kernels are: its
agreement with bf16 is what a different order of the same sums alone does to greedy text on this small model.

    python benchmarks/heldout.py --max-chars 20000      # .cache/heldout/<domain>.txt
    python benchmarks/bench_quantized.py [--heldout .cache/heldout] [--json runs/quantized.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: see train_model.py

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from offload_engine import DEFAULT_MODEL, OffloadEngine  # noqa: E402

EOS_SEPARATOR = "<|endoftext|>"  # between documents, as benchmarks/corpus.py writes them
# "auto": as stored (bf16 for the default model); "bf16-by-expert": the same bf16 experts computed one at a time
# with unit weights and then reduced, as the int8/int4 kernels are: the agreement that order of sums alone gives
FORMATS = {"auto": {}, "bf16-by-expert": {"cold_experts": "cpu", "cpu_moe_layers": 1 << 16},
           "int8": {"expert_dtype": "int8"}, "int4": {"expert_dtype": "int4"}}
GOALS = {"int8": {"loss_delta": 0.01, "bytes_ratio": 0.53}, "int4": {"loss_delta": 0.05, "bytes_ratio": 0.28}}


@dataclass(frozen=True)
class Agreement:
    share: float  # generated positions equal to the reference's, over all positions
    prefix: float  # mean tokens before the first disagreement (the whole length where none)


def agreement(reference: list[list[int]], other: list[list[int]]) -> Agreement:
    """Position-by-position agreement of greedy continuations with the reference's.

    >>> agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]])
    Agreement(share=0.75, prefix=2.0)
    """
    same = total = 0
    prefixes = []
    for ref, got in zip(reference, other, strict=True):
        n = min(len(ref), len(got))
        eq = [a == b for a, b in zip(ref[:n], got[:n])]
        same += sum(eq)
        total += max(len(ref), len(got))
        prefixes.append(eq.index(False) if False in eq else n)
    return Agreement(same / total if total else 1.0, float(np.mean(prefixes)) if prefixes else 0.0)


def spread(length: int, span: int, count: int) -> list[int]:
    """`count` start offsets of spans of `span` tokens spread evenly over `length` tokens (fewer if short)."""
    if length < span:
        return []
    return sorted({int(s) for s in np.linspace(0, length - span, count)})


def domain_tokens(heldout: Path, tokenizer) -> dict[str, np.ndarray]:
    """Each domain's documents tokenized, each one after an EOS (as the model was trained)."""
    out = {}
    for f in sorted(heldout.glob("*.txt")):
        ids: list[int] = []
        for doc in f.read_text("utf-8").split(f"\n{EOS_SEPARATOR}\n"):
            ids += [tokenizer.eos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
        out[f.stem] = np.asarray(ids, dtype=np.int64)
    return out


@torch.no_grad()
def window_nll(engine: OffloadEngine, ids: np.ndarray, starts: list[int], seq_len: int) -> np.ndarray:
    """Per-token NLL (nats) of each window's last seq_len tokens given the ones before, one forward each."""
    # W = windows, T = seq_len, V = vocabulary
    out = []
    for s in starts:
        w = torch.from_numpy(ids[s : s + seq_len + 1])[None]  # [1, T+1]
        logits = engine.forward(engine.request(1), input_ids=w[:, :-1], use_cache=False).logits.float()  # [1, T, V]
        out.append(torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="none").numpy())
    return np.concatenate(out)  # [W*T]


def run_format(model: Path, fmt: str, tokens: dict[str, np.ndarray], args) -> dict:
    """Loss per token and greedy continuations per domain for one expert format."""
    t0 = time.perf_counter()
    engine = OffloadEngine.from_pretrained(model, device="cpu", max_batch=args.prompts, threads=args.threads,
                                           progress=False, **FORMATS[fmt])
    try:
        experts = engine.spec.num_experts * engine.spec.num_moe_layers
        assert engine.plan.expert_slots >= experts, "every expert must be resident: the format's numerics only"
        res = {"expert_bytes": engine.store.expert_nbytes(), "nll": {}, "greedy": {}}
        for d, ids in tokens.items():
            res["nll"][d] = window_nll(engine, ids, spread(len(ids), args.seq_len + 1, args.windows), args.seq_len)
            prompts = [ids[s : s + args.prompt_len].tolist()
                       for s in spread(len(ids), args.prompt_len, args.prompts)]
            gens = engine.generate(prompts, max_new_tokens=args.new_tokens, ignore_eos=True) if prompts else []
            res["greedy"][d] = [g.token_ids for g in gens]
    finally:
        engine.close()
    res["seconds"] = time.perf_counter() - t0
    return res


def summarize(runs: dict[str, dict]) -> dict:
    """Per domain and over all: each format's loss, its difference from bf16's, greedy agreement with bf16."""
    base = runs["auto"]
    domains = list(base["nll"])
    table = {}
    for fmt, r in runs.items():
        rows = {}
        for d in [*domains, "all"]:
            if d == "all":
                nll, ref = np.concatenate(list(r["nll"].values())), np.concatenate(list(base["nll"].values()))
                agr = agreement(sum(base["greedy"].values(), []), sum(r["greedy"].values(), []))
            else:
                nll, ref = r["nll"][d], base["nll"][d]
                agr = agreement(base["greedy"][d], r["greedy"][d])
            rows[d] = {"loss": float(nll.mean()), "delta": float(nll.mean() - ref.mean()), "scored_tokens": len(nll),
                       **asdict(agr)}
        table[fmt] = {"expert_bytes": r["expert_bytes"], "bytes_ratio": r["expert_bytes"] / base["expert_bytes"],
                      "seconds": round(r["seconds"], 1), "domains": rows}
    return table


def report(table: dict, args) -> str:
    lines = [f"loss: {args.windows} windows x {args.seq_len} tokens per domain; greedy: {args.prompts} prompts x "
             f"{args.prompt_len} tokens, {args.new_tokens} new tokens; every expert resident, CPU, bf16 compute",
             f"{'format':14} {'domain':6} {'loss':>7} {'Δ bf16':>8} {'agree':>6} {'prefix':>6}"]
    for fmt, t in table.items():
        name = "bf16" if fmt == "auto" else fmt
        for d, row in t["domains"].items():
            lines.append(f"{name:14} {d:6} {row['loss']:7.4f} {row['delta']:+8.4f} {row['share']:6.1%} "
                         f"{row['prefix']:6.1f}")
    lines.append(f"{'format':14} {'bytes/expert':>12} {'ratio':>6}  goals")
    for fmt, t in table.items():
        goal = GOALS.get(fmt)
        note = ""
        if goal:
            delta = t["domains"]["all"]["delta"]
            note = (f"loss Δ {delta:+.4f} <= +{goal['loss_delta']} {'met' if delta <= goal['loss_delta'] else 'MISSED'}; "
                    f"bytes {t['bytes_ratio']:.3f}x ~ {goal['bytes_ratio']}x")
        lines.append(f"{'bf16' if fmt == 'auto' else fmt:14} {t['expert_bytes']:12,} {t['bytes_ratio']:5.3f}x  {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--heldout", type=Path, default=REPO / ".cache" / "heldout", help="<domain>.txt files")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    if not list(args.heldout.glob("*.txt")):
        ap.error(f"no <domain>.txt in {args.heldout}: run benchmarks/heldout.py first")
    torch.set_num_threads(args.threads)
    from offload_engine.engine import load_tokenizer

    tokens = domain_tokens(args.heldout, load_tokenizer(args.model))
    runs = {fmt: run_format(args.model, fmt, tokens, args) for fmt in FORMATS}
    table = summarize(runs)
    print(report(table, args), flush=True)
    result = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "token_counts": {d: len(ids) for d, ids in tokens.items()}, "formats": table, "goals": GOALS}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
