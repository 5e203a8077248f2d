"""Evaluate the bundled default model: validation loss per domain against a unigram baseline, greedy samples.

- Model loss: mean token cross-entropy (nats) of the fp32 model on each domain's validation token stream
  (benchmarks/corpus.py split; documents joined by EOS), in non-overlapping windows of --seq-len predicted
  tokens, each window conditioned only on itself (the first token of a window is context, not scored).
- Unigram baseline: cross-entropy of the add-one-smoothed unigram distribution of that domain's training
  tokens, on exactly the tokens the model is scored on.
- The committed validation sample (tests/data/val_sample/<domain>.txt) is scored by ``sample_loss``.

Usage::

    python benchmarks/eval_model.py [--model offload_engine/default_model] [--write-sample]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # shared cores: see train_model.py

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import DEFAULT_OUT, DOMAINS, EOS_SEPARATOR, read_documents  # noqa: E402
from train_model import MODEL_DIR, load_tokens  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO / "tests" / "data" / "val_sample"
PROMPTS = {
    "en": ["The history of the", "And God said to Moses,", "A hacker is a person who"],
    "py": ["import os\n\n\ndef ", "class Stack:\n    def __init__(self):\n", "    for i in range(len("],
}


@torch.no_grad()
def windowed_nll(model, ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Per-token negative log-likelihoods of ids[1:], in windows of seq_len + 1 tokens (stride seq_len)."""
    # N = scored tokens, W = windows, T = seq_len
    out = []
    for s in range(0, len(ids) - 1, seq_len):
        w = torch.from_numpy(ids[s : s + seq_len + 1].astype(np.int64))[None]  # [1, T+1]
        if w.shape[1] < 2:
            break
        logits = model(input_ids=w[:, :-1]).logits.float()  # [1, T, V]
        nll = torch.nn.functional.cross_entropy(logits[0], w[0, 1:], reduction="none")  # [T]
        out.append(nll.numpy())
    return np.concatenate(out)


def unigram_nll(train_ids: np.ndarray, targets: np.ndarray, vocab: int) -> np.ndarray:
    counts = np.bincount(train_ids.astype(np.int64), minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return -logp[targets.astype(np.int64)]


def sample_loss(model, tokenizer, sample_dir: Path = SAMPLE_DIR, seq_len: int = 256) -> dict[str, float]:
    """Loss on the committed validation sample: per domain, ids = [EOS] + tokenize(file text), scored by
    windowed_nll; "all" is the mean over every scored token of every domain."""
    per, alln = {}, []
    for f in sorted(sample_dir.glob("*.txt")):
        ids = [tokenizer.eos_token_id] + tokenizer(f.read_text("utf-8"), add_special_tokens=False)["input_ids"]
        nll = windowed_nll(model, np.asarray(ids), seq_len)
        per[f.stem] = float(nll.mean())
        alln.append(nll)
    per["all"] = float(np.concatenate(alln).mean())
    return per


def write_sample(corpus: Path, out: Path, chars: int = 4000) -> None:
    """The first validation documents of each domain, up to `chars` characters, cut at a line end (or at a
    space where the last line is long: Bible chapters are long lines)."""
    out.mkdir(parents=True, exist_ok=True)
    for d in DOMAINS:
        text = f"\n{EOS_SEPARATOR}\n".join(read_documents(corpus / f"{d}.val.txt")[:50])[:chars]
        cut = text.rfind("\n")
        if cut < 0.75 * len(text):
            cut = max(cut, text.rfind(" "))
        (out / f"{d}.txt").write_text(text[:cut].rstrip() + "\n", "utf-8")


@torch.no_grad()
def greedy_samples(model, tokenizer, max_new_tokens: int) -> dict[str, list[dict]]:
    res = {}
    for d, prompts in PROMPTS.items():
        res[d] = []
        for p in prompts:
            ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(p, add_special_tokens=False)["input_ids"]])
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            res[d].append({"prompt": p, "completion": tokenizer.decode(gen[0, ids.shape[1] :])})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=MODEL_DIR)
    ap.add_argument("--corpus", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=65536, help="cap on scored tokens per domain")
    ap.add_argument("--max-new-tokens", type=int, default=60)
    ap.add_argument("--write-sample", action="store_true", help="(re)write tests/data/val_sample/")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=REPO / "runs" / "default_model" / "eval.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokens = load_tokens(args.corpus, tokenizer, args.model / "tokenizer.json")
    domains = {}
    for d in DOMAINS:
        val = tokens[(d, "val")][: args.max_tokens + 1]
        nll = windowed_nll(model, val, args.seq_len)
        targets = np.concatenate([val[s + 1 : s + args.seq_len + 1] for s in range(0, len(val) - 1, args.seq_len)])
        uni = unigram_nll(tokens[(d, "train")], targets, len(tokenizer))
        domains[d] = {"model": float(nll.mean()), "unigram": float(uni.mean()), "tokens": int(len(nll))}
        print(f"{d}: model {nll.mean():.3f}  unigram {uni.mean():.3f}  nats/token over {len(nll):,} tokens",
              flush=True)
    if args.write_sample:
        write_sample(args.corpus, SAMPLE_DIR)
    sample = sample_loss(model, tokenizer, SAMPLE_DIR, args.seq_len) if SAMPLE_DIR.exists() else {}
    print("validation sample loss:", json.dumps({k: round(v, 3) for k, v in sample.items()}), flush=True)
    samples = greedy_samples(model, tokenizer, args.max_new_tokens)
    for d, items in samples.items():
        for it in items:
            print(f"--- [{d}] {it['prompt']!r}\n{it['prompt']}{it['completion']}\n", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"domains": domains, "val_sample": sample, "samples": samples,
                                     "seq_len": args.seq_len, "max_tokens": args.max_tokens}, indent=2,
                                    ensure_ascii=False))


if __name__ == "__main__":
    main()
