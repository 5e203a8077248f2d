"""How realistic is the default model's routing? The new default model beside the first one (issue 4's, from
git history), an untrained twin of the new one, the shared FLAME-MoE-290M trace and published figures.

Routing is traced with the engine's own tracer (`moe-offload trace`'s trace_corpus) on held-out text the
training corpus does not contain (benchmarks/heldout.py), 32 sequences x 256 tokens per domain, one plain
forward pass each. Reported per model, model level and per layer: SRP at m = 4, 16, 64; SCH (m = 16), LRU,
LFU and Belady at rho = 0.5, 1, 2; load balance; domain and vocabulary specialisation; issue 7's targets per
domain and pooled; and the validation loss per domain (the corpus' validation split, fp32).

    python benchmarks/corpus.py && python benchmarks/heldout.py        # once: the corpus and held-out text
    python benchmarks/realism.py [--first-commit 4b070d1] [--max-seqs 32] [--out-dir runs/realism]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from routing_targets import HELDOUT, format_targets, per_domain, trace_heldout  # noqa: E402

DEFAULT_MODEL = ROOT / "offload_engine" / "default_model"
FLAME = ROOT / "data" / "flame-moe-290m" / "flame_moe_290m_routing.npz"
CORPUS = ROOT / ".cache" / "corpus"
DOMAINS = ("en", "es", "de", "fr", "ja", "py")
MS = (4, 16, 64)
RATIOS = ("0.5", "1", "2")
# model-level figures published by Liang et al. (docs/routing-consistency.md); None where not published
PUBLISHED = {
    "Mixtral-8x7B": {"srp16": 0.4936, "srp4": 0.6255, "sch16_rho2": 0.742, "load_balance": 0.058},
    "OLMoE": {"srp16": 0.5091, "srp4": 0.6469, "sch16_rho2": 0.741},
    "Qwen3-30B-A3B": {"srp16": 0.5414, "sch16_rho2": 0.770},
    "Qwen1.5-MoE": {"srp16": 0.3071, "sch16_rho2": 0.461},
}


def first_model(commit: str, out: Path) -> Path:
    """The first default model, as committed at `commit` (git archive: no checkout needed)."""
    if (out / "config.json").is_file():
        return out
    data = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "offload_engine/default_model"],
                          capture_output=True, check=True).stdout
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(fileobj=BytesIO(data)) as tar:
        tar.extractall(tmp, filter="data")
    (tmp / "offload_engine" / "default_model").rename(out)
    shutil.rmtree(tmp)
    return out


def untrained_copy(model_dir: Path, out: Path) -> Path:
    """Same config and tokenizer, random weights (transformers' own init, seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32).save_pretrained(out)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def validation_loss(model_dir: Path, seq_len: int = 256, max_tokens: int = 16384) -> dict[str, float]:
    """Mean token cross-entropy (nats, fp32) per domain on the corpus' validation split, in windows of seq_len."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not all((CORPUS / f"{d}.val.txt").is_file() for d in DOMAINS):
        return {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = {}
    for d in DOMAINS:
        ids = tokenizer((CORPUS / f"{d}.val.txt").read_text(encoding="utf-8")[: max_tokens * 8],
                        add_special_tokens=False)["input_ids"][:max_tokens]
        n = len(ids) // seq_len * seq_len
        batch = torch.tensor(ids[:n]).view(-1, seq_len)
        with torch.inference_mode():
            losses = [float(model(input_ids=b[None], labels=b[None], output_router_logits=False).loss) for b in batch]
        out[d] = float(np.mean(losses))
    return out


def figures(trace) -> dict:
    from offload_engine.tracing.consistency import (belady, capacity_for_ratio, domain_specialisation, lfu,
                                                    load_balance, lru, sch, srp, vocabulary_specialisation)

    def group(layer=None) -> dict:
        caps = {r: capacity_for_ratio(trace, r, layer=layer) for r in RATIOS}
        return {**{f"srp{m}": srp(trace, m, layer=layer).srp for m in MS},
                **{f"sch16_rho{r}": sch(trace, 16, caps[r], layer=layer).hit_rate for r in RATIOS},
                **{f"{p.__name__}_rho{r}": p(trace, caps[r], layer=layer).hit_rate
                   for p in (lru, lfu, belady) for r in RATIOS}}

    domain = domain_specialisation(trace, 16)
    vocab = vocabulary_specialisation(trace, 20)
    return {"model": group(), "layers": [group(i) for i in range(trace.num_layers)],
            "load_balance": load_balance(trace, 16).std,
            "domain_specialisation": None if domain is None else domain.score,
            "vocabulary_specialisation": None if vocab is None else vocab.score}


COLUMNS = [f"srp{m}" for m in MS] + [f"{p}_rho{r}" for p in ("sch16", "lru", "lfu", "belady") for r in RATIOS]


def header() -> str:
    names = [c.replace("srp", "SRP m=").replace("sch16_rho", "SCH16 rho=").replace("lru_rho", "LRU rho=")
             .replace("lfu_rho", "LFU rho=").replace("belady_rho", "Belady rho=") for c in COLUMNS]
    return "| | " + " | ".join(names) + " |\n|---|" + "---|" * len(names)


def row(label: str, f: dict) -> str:
    return f"| {label} | " + " | ".join("" if f.get(c) is None else f"{f[c]:.3f}" for c in COLUMNS) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--first-commit", default="4b070d1", help="a commit holding the first default model")
    parser.add_argument("--max-seqs", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "realism")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from transformers.utils import logging

    from offload_engine.tracing.trace_file import load_trace, save_trace

    logging.set_verbosity_error()  # "sequence longer than the maximum": whole documents are tokenized, then cut

    args.out_dir.mkdir(parents=True, exist_ok=True)
    results, losses, targets = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"new default": args.model,
                  "first default": first_model(args.first_commit, args.out_dir / "first_model"),
                  "untrained twin": untrained_copy(args.model, Path(tmp) / "untrained")}
        for name, path in models.items():
            trace = trace_heldout(path, HELDOUT, args.seq_len, args.max_seqs)
            save_trace(args.out_dir / f"{name.replace(' ', '_')}.npz", trace)
            results[name], targets[name] = figures(trace), per_domain(trace)
            losses[name] = validation_loss(path)
    if FLAME.is_file():
        results["FLAME-MoE-290M"] = figures(load_trace(FLAME, num_experts=64))
    domains = sorted(d for d in targets["new default"] if d != "pooled")
    print(f"Held-out text: {args.max_seqs} x {args.seq_len} tokens per domain ({', '.join(domains)}); "
          "model level unless said otherwise\n")
    print(header())
    for name, f in results.items():
        print(row(name, f["model"]))
    for name, f in PUBLISHED.items():
        print(row(f"{name} (published)", f))
    print("\n| | load balance (std act_r, m=16) | domain specialisation | vocabulary specialisation |\n|---|---|---|---|")
    for name, f in results.items():
        fmt = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"| {name} | {f['load_balance']:.4f} | {fmt(f['domain_specialisation'])} | "
              f"{fmt(f['vocabulary_specialisation'])} |")
    for name in ("new default", "first default"):
        print(f"\nIssue 7 targets, {name} (held-out text, per domain and pooled):\n{format_targets(targets[name])}")
    for name, f in results.items():
        print(f"\nPer layer, {name}:\n{header()}")
        for i, layer in enumerate(f["layers"]):
            print(row(str(i), layer))
    if any(losses.values()):
        print("\nValidation loss per domain (nats/token, fp32, corpus validation split):")
        print("| | " + " | ".join(DOMAINS) + " |\n|---|" + "---|" * len(DOMAINS))
        for name, v in losses.items():
            if v:
                print(f"| {name} | " + " | ".join(f"{v[d]:.3f}" for d in DOMAINS) + " |")
    (args.out_dir / "realism.json").write_text(json.dumps(
        {"figures": results, "targets": targets, "validation_loss": losses}, indent=1, default=float))
    print(f"\ntraces and realism.json in {args.out_dir}")


if __name__ == "__main__":
    main()
