"""Train the bundled default model: a small Qwen3-MoE on the multi-domain corpus of benchmarks/corpus.py.

MoE in every layer, no shared experts, fine-grained experts (32 per layer, top-4, renormalised weights),
trained with a load-balancing loss at a chosen scope (benchmarks/balance_loss.py; default: each layer on its
own, its expert loads counted over the last 8 batches, coefficient 0.01). Seeded and deterministic for a given step count: batch ``s`` is drawn from a generator
seeded with ``(seed, s)``, so a resumed run sees the same batches as an uninterrupted one.

Usage::

    python benchmarks/corpus.py && python benchmarks/train_tokenizer.py
    python benchmarks/train_model.py --bench 5            # seconds/step per experts implementation
    python benchmarks/train_model.py --steps 2000         # train; writes offload_engine/default_model/

Writes ``runs/default_model/`` (log.jsonl, state.pt for --resume, latest/ = bf16 export of the last
checkpoint) and, at the end, the bf16 checkpoint + loss_curve.png into ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# With other processes on the two cores, spinning OpenMP workers wait on descheduled peers: a step took
# 11.7 s with the default wait policy and 1.7 s with PASSIVE. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from balance_loss import balance_loss  # noqa: E402
from corpus import DEFAULT_OUT, DOMAINS, read_documents  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "offload_engine" / "default_model"
RUN_DIR = REPO / "runs" / "default_model"
# Share of training sequences per domain: English prose and Python code carry the demo, so they get most.
DOMAIN_WEIGHTS = {"en": 0.34, "py": 0.30, "es": 0.09, "de": 0.09, "fr": 0.09, "ja": 0.09}


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_interval: int = 100
    eval_seqs: int = 4  # per domain, for the periodic validation loss
    ckpt_interval: int = 100
    experts_implementation: str = "grouped_mm"  # fastest here (--bench): see the model card
    autocast_bf16: bool = True
    threads: int = 2
    # the expert layout and the balance loss (balance_loss.py)
    num_experts: int = 32
    top_k: int = 4
    moe_intermediate_size: int = 128
    balance_scope: str = "global"
    balance_coef: float = 0.01
    balance_window: int = 8  # batches f_e is counted over with scope "global"


def model_config(tokenizer, cfg: TrainConfig) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        moe_intermediate_size=cfg.moe_intermediate_size, num_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        output_router_logits=True, router_aux_loss_coef=cfg.balance_coef,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def parameter_counts(config: Qwen3MoeConfig) -> dict[str, int]:
    """Total parameters and parameters active per token (k of E experts), from the config alone."""
    h, L, E, k = config.hidden_size, config.num_hidden_layers, config.num_experts, config.num_experts_per_tok
    expert = 3 * h * config.moe_intermediate_size
    attn = h * config.head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    attn += 2 * config.head_dim  # q_norm, k_norm
    per_layer_shared = attn + h * E + 2 * h  # + router + two RMSNorms
    embed = config.vocab_size * h
    total = embed + L * (per_layer_shared + E * expert) + h
    active = embed + L * (per_layer_shared + k * expert) + h
    return {"total": total, "active_per_token": active, "experts": L * E * expert}


# ---------------------------------------------------------------- data


def encode_domain(tokenizer, path: Path) -> np.ndarray:
    """All documents of one file, each followed by EOS, as one uint16 stream."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    docs = read_documents(path)
    for i in range(0, len(docs), 256):
        for doc_ids in tokenizer(docs[i : i + 256], add_special_tokens=False)["input_ids"]:
            ids.extend(doc_ids)
            ids.append(eos)
    return np.asarray(ids, dtype=np.uint16)


def load_tokens(corpus: Path, tokenizer, tokenizer_file: Path) -> dict[tuple[str, str], np.ndarray]:
    """Token streams per (domain, split), cached next to the corpus, keyed by the tokenizer's hash."""
    key = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()[:12]
    out = {}
    for d in DOMAINS:
        for split in ("train", "val"):
            cache = corpus / "tokens" / f"{d}.{split}.{key}.npy"
            if not cache.exists():
                cache.parent.mkdir(exist_ok=True)
                np.save(cache, encode_domain(tokenizer, corpus / f"{d}.{split}.txt"))
            out[(d, split)] = np.load(cache)
    return out


def train_batch(tokens, step: int, cfg: TrainConfig) -> torch.Tensor:
    """Batch `step`: each row a random window of seq_len tokens from a domain drawn by DOMAIN_WEIGHTS."""
    rng = np.random.default_rng([cfg.seed, step])
    names = list(DOMAIN_WEIGHTS)
    p = np.array([DOMAIN_WEIGHTS[d] for d in names])
    rows = []
    for d in rng.choice(len(names), size=cfg.batch_size, p=p / p.sum()):
        stream = tokens[(names[d], "train")]
        start = rng.integers(0, len(stream) - cfg.seq_len)
        rows.append(stream[start : start + cfg.seq_len].astype(np.int64))
    return torch.from_numpy(np.stack(rows))  # [B, T]


def val_batches(tokens, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """The first eval_seqs non-overlapping windows of each domain's validation stream."""
    out = {}
    for d in DOMAINS:
        s = tokens[(d, "val")]
        n = min(cfg.eval_seqs, len(s) // cfg.seq_len)
        out[d] = torch.from_numpy(s[: n * cfg.seq_len].astype(np.int64).reshape(n, cfg.seq_len))
    return out


# ---------------------------------------------------------------- training


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def lm_and_aux_loss(model, ids: torch.Tensor, cfg: TrainConfig, past_counts: torch.Tensor | None = None):
    """(loss to minimise, LM loss, balance loss, this batch's routed counts [L, E])."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast_bf16):
        out = model(input_ids=ids, labels=ids)  # out.loss: LM only (the model's own aux coefficient is 0)
    aux, counts = balance_loss(out.router_logits, cfg.top_k, ids.shape[0], cfg.balance_scope, past_counts)
    return out.loss + cfg.balance_coef * aux, out.loss.detach(), aux.detach(), counts


@torch.no_grad()
def evaluate(model, batches: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, float]:
    model.eval()
    res = {d: float(lm_and_aux_loss(model, b, cfg)[1]) for d, b in batches.items() if len(b)}
    model.train()
    return res


def build_model(tokenizer, cfg: TrainConfig) -> Qwen3MoeForCausalLM:
    torch.manual_seed(cfg.seed)
    config = model_config(tokenizer, cfg)
    config._experts_implementation = cfg.experts_implementation
    model = Qwen3MoeForCausalLM(config)
    model.router_aux_loss_coef = 0.0  # the balance loss is ours (balance_loss.py), not transformers' pooled one
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export_bf16(model, tokenizer_dir: Path, out: Path) -> None:
    """save_pretrained in bfloat16 (default per-expert layout) plus the tokenizer files of tokenizer_dir.

    The tokenizer files are copied, not re-saved: train_tokenizer.py's tokenizer_config.json is kept as is.
    """
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.config._experts_implementation = None  # a run setting, not part of the checkpoint
    # the router aux loss is a training setting: left on, every inference step computes it, and transformers'
    # own generate on a padded batch fails inside load_balancing_loss_func
    m.config.output_router_logits = False
    m.generation_config.do_sample = False
    m.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).resolve() != (out / name).resolve():
            shutil.copyfile(tokenizer_dir / name, out / name)


def plot_curve(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [r for r in log if "train_loss" in r]
    ev = [r for r in log if "val" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    ax.plot([r["step"] for r in tr], [r["train_loss"] for r in tr], lw=0.8, alpha=0.6, label="train (LM)")
    for d in DOMAINS:
        ax.plot([r["step"] for r in ev], [r["val"][d] for r in ev], marker=".", lw=1, label=f"val {d}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(cfg: TrainConfig, corpus: Path, out: Path, run_dir: Path, resume: bool) -> None:
    torch.set_num_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokens = load_tokens(corpus, tokenizer, out / "tokenizer.json")
    vb = val_batches(tokens, cfg)
    model = build_model(tokenizer, cfg)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    run_dir.mkdir(parents=True, exist_ok=True)
    log: list[dict] = []
    recent: list[torch.Tensor] = []  # routed counts [L, E] of the last balance_window - 1 batches ("global")
    start, elapsed0 = 0, 0.0
    if resume and (run_dir / "state.pt").exists():
        st = torch.load(run_dir / "state.pt", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, log, elapsed0 = st["step"], st["log"], st["elapsed_s"]
        recent = list(st.get("recent_counts", []))
        print(f"resumed at step {start}", flush=True)
    counts = parameter_counts(model.config)
    print(f"params {counts}; {json.dumps(asdict(cfg))}", flush=True)
    t0 = time.perf_counter() - elapsed0
    tok_per_step = cfg.batch_size * cfg.seq_len
    for step in range(start, cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        past = torch.stack(recent).sum(0) if recent and cfg.balance_scope == "global" else None
        loss, lm, aux, routed = lm_and_aux_loss(model, train_batch(tokens, step, cfg), cfg, past)
        recent = (recent + [routed])[-(cfg.balance_window - 1):] if cfg.balance_window > 1 else []
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        done = step + 1
        # the busiest expert's share of its layer's tokens (1.0 = on for every token): always-on experts show here
        top_share = float((routed / routed.sum(-1, keepdim=True) * cfg.top_k).max())
        rec = {"step": done, "train_loss": float(lm), "aux_loss": float(aux), "grad_norm": float(gnorm),
               "lr": lr_at(step, cfg), "top_share": top_share}
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            rec["val"] = evaluate(model, vb, cfg)
        log.append(rec)
        el = time.perf_counter() - t0
        if done % 10 == 0 or "val" in rec or done == start + 1:
            rate = (done - start) * tok_per_step / max(1e-9, el - elapsed0)
            eta = (cfg.steps - done) * tok_per_step / rate
            val = " val " + " ".join(f"{d}={v:.3f}" for d, v in rec["val"].items()) if "val" in rec else ""
            print(f"step {done}/{cfg.steps} loss {float(lm):.4f} aux {float(aux):.3f} top {top_share:.2f}"
                  f" gnorm {float(gnorm):.2f}"
                  f" lr {rec['lr']:.2e} | {rate:.0f} tok/s elapsed {el / 60:.1f} min eta {eta / 60:.1f} min{val}",
                  flush=True)
        if done % cfg.ckpt_interval == 0 or done == cfg.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done, "log": log,
                        "elapsed_s": el, "recent_counts": recent}, run_dir / "state.pt.tmp")
            (run_dir / "state.pt.tmp").replace(run_dir / "state.pt")
            export_bf16(model, out, run_dir / "latest")
            (run_dir / "log.json").write_text(json.dumps(log))
            plot_curve(log, run_dir / "loss_curve.png")
    el = time.perf_counter() - t0
    export_bf16(model, out, out)
    plot_curve(log, out / "loss_curve.png")
    summary = {"train_config": asdict(cfg), "params": counts, "steps": cfg.steps,
               "train_tokens": cfg.steps * tok_per_step, "wall_time_s": round(el, 1),
               "final_val": log[-1].get("val"), "domain_weights": DOMAIN_WEIGHTS,
               "torch": torch.__version__, "threads": cfg.threads}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: {json.dumps(summary)}", flush=True)


def bench(cfg: TrainConfig, corpus: Path, out: Path, n: int, impls: list[str], autocast: list[bool]) -> None:
    """Seconds per training step for each experts implementation (and autocast on/off), n steps each."""
    torch.set_num_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokens = load_tokens(corpus, tokenizer, out / "tokenizer.json")
    for impl in impls:
        for ac in autocast:
            c = TrainConfig(**{**asdict(cfg), "experts_implementation": impl, "autocast_bf16": ac})
            try:
                model = build_model(tokenizer, c)
                opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
                times = []
                for s in range(n + 1):
                    t = time.perf_counter()
                    loss = lm_and_aux_loss(model, train_batch(tokens, s, c), c)[0]
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    times.append(time.perf_counter() - t)
                print(f"{impl:11s} autocast_bf16={ac!s:5s} {np.median(times[1:]):.3f} s/step "
                      f"loss {float(loss):.3f}", flush=True)
            except Exception as e:  # an implementation unsupported on this backend is reported, not fatal
                print(f"{impl:11s} autocast_bf16={ac!s:5s} failed: {type(e).__name__}: {e}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=MODEL_DIR, help="tokenizer in, checkpoint out")
    ap.add_argument("--run-dir", type=Path, default=RUN_DIR)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--bench", type=int, default=0, metavar="N", help="time N steps per implementation")
    ap.add_argument("--bench-impls", default="eager,grouped_mm,batched_mm", help="implementations --bench times")
    ap.add_argument("--bench-autocast", default="true,false", help="autocast settings --bench times")
    for f, v in asdict(TrainConfig()).items():
        flag = "--" + f.replace("_", "-")
        if isinstance(v, bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=v)
        else:
            ap.add_argument(flag, type=type(v), default=v)
    a = vars(ap.parse_args())
    cfg = TrainConfig(**{f: a[f] for f in asdict(TrainConfig())})
    if a["bench"]:
        bench(cfg, a["corpus"], a["out"], a["bench"], a["bench_impls"].split(","),
              [x == "true" for x in a["bench_autocast"].split(",")])
    else:
        train(cfg, a["corpus"], a["out"], a["run_dir"], a["resume"])


if __name__ == "__main__":
    main()
