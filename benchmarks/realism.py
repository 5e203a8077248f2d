"""How realistic is the bundled model's routing? Issue 4, part 4.

Traces the trained model and an untrained model of the same shape (same config, random weights, seed 0)
with the engine's own tracer on each domain's validation text, then reports for each (and for the shared
FLAME-MoE-290M trace): validation loss per domain, expert usage per domain and domain specialisation,
SRP at m = 4, 16, 64, and SCH, LRU and Belady at rho = 1, 2 (model level and per layer). A random-routing
trace of the same shape (each token's k experts drawn uniformly, independently) is the floor.

    python benchmarks/corpus.py                      # once: the corpus (cached in .cache/corpus)
    python benchmarks/realism.py [--max-seqs 32] [--seq-len 256] [--out-dir runs/realism]

The traces are written to --out-dir (not committed); `moe-offload consistency` reads them as well, e.g.
    moe-offload trace --input en=.cache/corpus/en.val.txt ... --seq-len 256 --max-seqs 32 --out trained.npz
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "offload_engine" / "default_model"
FLAME = ROOT.parent / "shared" / "data" / "flame-moe-290m-traces" / "flame_moe_290m_routing.npz"
DOMAINS = ("en", "es", "de", "fr", "ja", "py")
MS = (4, 16, 64)
RATIOS = ("1", "2")


def untrained_copy(model_dir: Path, out: Path) -> Path:
    """Same config and tokenizer, random weights (transformers' own init, seed 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=torch.float32)
    model.save_pretrained(out)
    for f in model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def random_routing_like(trace, seed: int = 0):
    """The same shape with each token's k experts drawn uniformly at random, independently: random routing."""
    from offload_engine.trace_file import RoutingTrace

    rng = np.random.default_rng(seed)
    n, t, layers, k = trace.expert_ids.shape
    keys = rng.random((n, t, layers, trace.num_experts))
    ids = np.argsort(keys, axis=-1)[..., :k].astype(np.int16)
    return RoutingTrace(expert_ids=ids, num_experts=trace.num_experts, moe_layers=trace.moe_layers,
                        domains=trace.domains)


def trace_and_loss(model_dir: Path, inputs, seq_len: int, max_seqs: int):
    from offload_engine import OffloadEngine
    from offload_engine.tracing import trace_corpus

    engine = OffloadEngine.from_pretrained(model_dir, device="cpu", dtype="float32", expert_slots=1 << 20,
                                           max_batch=8, max_context=seq_len, progress=False)
    trace = trace_corpus(engine, inputs, seq_len, max_seqs, batch_size=8)
    losses = {}
    for domain in dict.fromkeys(trace.domains):
        rows = [i for i, d in enumerate(trace.domains) if d == domain]
        ids = torch.tensor(trace.token_ids[rows], dtype=torch.long)
        with torch.inference_mode():
            # no router aux loss in the figure: the config keeps output_router_logits from training
            out = engine.model(input_ids=ids, labels=ids, use_cache=False, output_router_logits=False)
            losses[domain] = float(out.loss)
    return trace, losses


def figures(trace) -> dict:
    from offload_engine.consistency import belady, capacity_for_ratio, domain_specialisation, load_balance, lru, sch, srp

    out = {"srp": {m: srp(trace, m).srp for m in MS}, "rho_hat": {m: srp(trace, m).rho_hat for m in MS}}
    for name, fn in (("sch", lambda c: sch(trace, 16, c)), ("lru", lambda c: lru(trace, c)),
                     ("belady", lambda c: belady(trace, c))):
        out[name] = {r: fn(capacity_for_ratio(trace, r)).hit_rate for r in RATIOS}
    out["layers"] = [
        {**{f"srp{m}": srp(trace, m, layer=i).srp for m in MS},
         **{f"sch16_{r}": sch(trace, 16, capacity_for_ratio(trace, r, layer=i), layer=i).hit_rate for r in RATIOS},
         **{f"lru_{r}": lru(trace, capacity_for_ratio(trace, r, layer=i), layer=i).hit_rate for r in RATIOS},
         **{f"belady_{r}": belady(trace, capacity_for_ratio(trace, r, layer=i), layer=i).hit_rate for r in RATIOS}}
        for i in range(trace.num_layers)
    ]
    out["load_balance"] = load_balance(trace).std
    spec = domain_specialisation(trace)
    out["domain_specialisation"] = spec.score if spec is not None else None
    return out


def usage_by_domain(trace) -> dict[str, np.ndarray]:
    """Share of each domain's routed slots that go to each expert: [L, E] per domain."""
    out = {}
    for domain in dict.fromkeys(trace.domains):
        rows = np.array([d == domain for d in trace.domains])
        ids = trace.expert_ids[rows]  # [n, T, L, k]
        counts = np.zeros((trace.num_layers, trace.num_experts))
        for layer in range(trace.num_layers):
            cell = ids[:, :, layer, :].ravel()
            counts[layer] = np.bincount(cell[cell >= 0], minlength=trace.num_experts)
        out[domain] = counts / counts.sum(axis=1, keepdims=True)
    return out


def residual_stream(model_dir: Path, text_path: Path, tokens: int = 256) -> dict:
    """Why a model routes stickily or not: per layer, the RMS of the attention output (against the
    embeddings') and the mean cosine similarity of consecutive tokens' hidden states after the layer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text_path.read_text()[: tokens * 8], return_tensors="pt")["input_ids"][:, :tokens]
    attn = {}
    hooks = [layer.self_attn.register_forward_hook(lambda m, i, o, n=n: attn.__setitem__(n, o[0]))
             for n, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_router_logits=False)
    for h in hooks:
        h.remove()
    rms = lambda t: t.pow(2).mean().sqrt().item()  # noqa: E731
    cos = []
    for hidden in out.hidden_states[1:]:
        unit = torch.nn.functional.normalize(hidden[0], dim=-1)
        cos.append((unit[1:] * unit[:-1]).sum(-1).mean().item())
    return {"embedding_rms": rms(out.hidden_states[0]), "attention_rms": [rms(attn[n]) for n in sorted(attn)],
            "consecutive_cos": cos}


def print_figures(name: str, f: dict) -> None:
    print(f"\n{name}")
    print("  SRP      " + "  ".join(f"m={m}: {f['srp'][m]:.3f} (rho_hat {f['rho_hat'][m]:.2f})" for m in MS))
    for key in ("sch", "lru", "belady"):
        label = "SCH m=16" if key == "sch" else key.upper() if key == "lru" else "Belady"
        print(f"  {label:<9}" + "  ".join(f"rho={r}: {f[key][r]:.3f}" for r in RATIOS))
    print(f"  load balance (std of act_r, m=16) {f['load_balance']:.4f}; domain specialisation "
          f"{'n/a' if f['domain_specialisation'] is None else format(f['domain_specialisation'], '.3f')}")
    keys = [f"srp{m}" for m in MS] + [f"{p}_{r}" for p in ("sch16", "lru", "belady") for r in RATIOS]
    print("  | layer | " + " | ".join(k.replace("_", " rho=").replace("sch16", "SCH m=16").replace("srp", "SRP m=")
                                      .replace("lru", "LRU").replace("belady", "Belady") for k in keys) + " |")
    print("  |---|" + "---|" * len(keys))
    for i, x in enumerate(f["layers"]):
        print(f"  | {i} | " + " | ".join(f"{x[k]:.3f}" for k in keys) + " |")


def plot_usage(usages: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(usages), figsize=(6 * len(usages), 4), squeeze=False)
    for ax, (name, usage) in zip(axes[0], usages.items()):
        domains = list(usage)
        grid = np.stack([usage[d].ravel() for d in domains])  # [domains, L*E]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=max(0.3, grid.max()))
        ax.set_yticks(range(len(domains)), domains)
        ax.set_xlabel("expert (layer-major: layer * E + e)")
        ax.set_title(f"{name}: share of routed slots per domain")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--corpus", type=Path, default=ROOT / ".cache" / "corpus")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-seqs", type=int, default=32)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "realism")
    args = parser.parse_args()
    torch.set_num_threads(2)
    from offload_engine.trace_file import load_trace, save_trace
    from offload_engine.tracing import CorpusInput

    missing = [d for d in DOMAINS if not (args.corpus / f"{d}.val.txt").is_file()]
    if missing:
        sys.exit(f"error: no validation text for {missing} in {args.corpus}; run python benchmarks/corpus.py first")
    inputs = [CorpusInput(d, args.corpus / f"{d}.val.txt") for d in DOMAINS]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results, usages = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"trained": args.model, "untrained": untrained_copy(args.model, Path(tmp) / "untrained")}
        streams = {name: residual_stream(path, args.corpus / "en.val.txt") for name, path in models.items()}
        for name, path in models.items():
            trace, losses = trace_and_loss(path, inputs, args.seq_len, args.max_seqs)
            save_trace(args.out_dir / f"{name}.npz", trace)
            print(f"{name}: validation loss per domain (nats/token) " +
                  "  ".join(f"{d} {v:.3f}" for d, v in losses.items()))
            results[name], usages[name] = figures(trace), usage_by_domain(trace)
    results["random routing"] = figures(random_routing_like(load_trace(args.out_dir / "trained.npz")))
    print(f"\ntraces: {args.seq_len}-token sequences, {args.max_seqs} per domain, written to {args.out_dir}")
    for name, f in results.items():
        print_figures(name if name == "random routing" else f"{name} model", f)
    if FLAME.is_file():
        print_figures("FLAME-MoE-290M (shared trace, 8 x 256 tokens)", figures(load_trace(FLAME, num_experts=64)))
    t = results["trained"]
    for other in ("untrained", "random routing"):
        u = results[other]
        print(f"\ntrained / {other}: " + "  ".join(
            [f"SRP m={m} x{t['srp'][m] / u['srp'][m]:.2f}" for m in MS] +
            [f"SCH@{r} x{t['sch'][r] / u['sch'][r]:.2f}" for r in RATIOS] +
            [f"LRU@{r} x{t['lru'][r] / u['lru'][r]:.2f}" for r in RATIOS]))
    print("\nresidual stream on 256 tokens of en validation text (per layer 0..L-1)")
    for name, r in streams.items():
        print(f"  {name}: embedding RMS {r['embedding_rms']:.3f}; attention output RMS "
              + " ".join(f"{x:.3f}" for x in r["attention_rms"]) + "; cos(h_t, h_t+1) "
              + " ".join(f"{x:.2f}" for x in r["consecutive_cos"]))
    plot_usage(usages, args.out_dir / "expert_usage.png")
    print(f"expert usage heat map: {args.out_dir / 'expert_usage.png'}")
    for name, usage in usages.items():
        print(f"\n{name}: top expert share per domain and layer (max over experts of the share of routed slots)")
        for d, grid in usage.items():
            print(f"  {d}: " + " ".join(f"{x:.2f}" for x in grid.max(axis=1)))


if __name__ == "__main__":
    main()
