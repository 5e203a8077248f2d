"""Does a model route like real MoE models? Issue 7's targets, measured on held-out text per domain and pooled.

Traces the model over benchmarks/heldout.py's text (one plain forward pass per sequence, as `moe-offload
trace` does) and prints, model level, for each domain and for all of them pooled:

    load balance (std of act_r over all experts, m = 16)      target <= 0.06
    SRP, m = 16                                               target 0.40 .. 0.60
    SCH, m = 16, rho = 2                                      target 0.65 .. 0.85
    Belady - LRU, rho = 1                                     target >= 0.10

    python benchmarks/heldout.py                              # once: the held-out text (.cache/heldout)
    python benchmarks/routing_targets.py [--model DIR] [--trace-out runs/targets.npz] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / ".cache" / "heldout"
DEFAULT_MODEL = ROOT / "offload_engine" / "default_model"
TARGETS = {  # figure -> (low, high); None = unbounded
    "load_balance": (None, 0.06),
    "srp16": (0.40, 0.60),
    "sch16_rho2": (0.65, 0.85),
    "belady_minus_lru_rho1": (0.10, None),
}


def subset(trace, rows: np.ndarray):
    """The sequences `rows` (bool [N]) of a trace, as a trace of their own."""
    from offload_engine.tracing.trace_file import RoutingTrace

    pick = lambda a: None if a is None else a[rows]  # noqa: E731
    domains = None if trace.domains is None else tuple(d for d, r in zip(trace.domains, rows) if r)
    return RoutingTrace(expert_ids=trace.expert_ids[rows], num_experts=trace.num_experts,
                        moe_layers=trace.moe_layers, scores=pick(trace.scores), token_ids=pick(trace.token_ids),
                        domains=domains, model=trace.model)


def target_figures(trace) -> dict[str, float]:
    from offload_engine.tracing.consistency import belady, capacity_for_ratio, load_balance, lru, sch, srp

    lru1 = lru(trace, capacity_for_ratio(trace, "1")).hit_rate
    belady1 = belady(trace, capacity_for_ratio(trace, "1")).hit_rate
    return {
        "load_balance": load_balance(trace, 16).std,
        "srp16": srp(trace, 16).srp,
        "sch16_rho2": sch(trace, 16, capacity_for_ratio(trace, "2")).hit_rate,
        "lru_rho1": lru1,
        "belady_rho1": belady1,
        "belady_minus_lru_rho1": belady1 - lru1,
    }


def per_domain(trace) -> dict[str, dict[str, float]]:
    """Figures of each domain's sequences, then of all of them ("pooled")."""
    out = {}
    for domain in dict.fromkeys(trace.domains or ()):
        out[domain] = target_figures(subset(trace, np.array([d == domain for d in trace.domains])))
    out["pooled"] = target_figures(trace)
    return out


def meets(name: str, value: float) -> bool:
    low, high = TARGETS[name]
    return (low is None or value >= low) and (high is None or value <= high)


def format_targets(figures: dict[str, dict[str, float]]) -> str:
    names = ["load_balance", "srp16", "sch16_rho2", "lru_rho1", "belady_rho1", "belady_minus_lru_rho1"]
    heads = ["load balance", "SRP m=16", "SCH m=16 rho=2", "LRU rho=1", "Belady rho=1", "Belady-LRU rho=1"]
    lines = ["| text | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for domain, f in figures.items():
        cells = [f"{f[n]:.3f}" + ("" if n not in TARGETS else " ok" if meets(n, f[n]) else " MISS") for n in names]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trace_heldout(model_dir: Path, heldout: Path, seq_len: int, max_seqs: int, domains: list[str] | None = None):
    from offload_engine import OffloadEngine
    from offload_engine.tracing.recording import CorpusInput, trace_corpus

    files = sorted(heldout.glob("*.txt"))
    if not files:
        sys.exit(f"error: no held-out text in {heldout}; run python benchmarks/heldout.py first")
    inputs = [CorpusInput(f.stem, f) for f in files if domains is None or f.stem in domains]
    engine = OffloadEngine.from_pretrained(model_dir, device="cpu", dtype="float32", expert_slots=1 << 20,
                                           max_batch=8, max_context=seq_len, progress=False)
    return trace_corpus(engine, inputs, seq_len, max_seqs, batch_size=8, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--heldout", type=Path, default=HELDOUT)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-seqs", type=int, default=32, help="sequences per domain")
    parser.add_argument("--trace-out", type=Path, help="also write the trace here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    trace = trace_heldout(args.model, args.heldout, args.seq_len, args.max_seqs)
    if args.trace_out:
        from offload_engine.tracing.trace_file import save_trace

        save_trace(args.trace_out, trace)
    figures = per_domain(trace)
    print(json.dumps(figures, indent=1) if args.json else format_targets(figures))


if __name__ == "__main__":
    main()
