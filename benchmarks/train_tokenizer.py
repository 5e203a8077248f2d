"""Train the byte-level BPE tokenizer of the bundled default model on the corpus of benchmarks/corpus.py.

Domains are balanced: every domain contributes the same number of characters (its whole training text if it
has less), taken from its documents in a seeded shuffled order. The result is saved with
``PreTrainedTokenizerFast.save_pretrained`` so ``transformers.AutoTokenizer.from_pretrained(dir)`` loads it
offline.

Usage::

    python benchmarks/corpus.py
    python benchmarks/train_tokenizer.py [--corpus .cache/corpus] [--out offload_engine/default_model]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import DEFAULT_OUT, DOMAINS, EOS_SEPARATOR, read_documents  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "offload_engine" / "default_model"
EOS = EOS_SEPARATOR
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD]  # ids 0 and 1


def balanced_sample(corpus: Path, chars_per_domain: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for d in DOMAINS:
        docs = read_documents(corpus / f"{d}.train.txt")
        rng.shuffle(docs)
        total = 0
        for doc in docs:
            if total >= chars_per_domain:
                break
            doc = doc[: chars_per_domain - total]
            texts.append(doc)
            total += len(doc)
    return texts


def train(corpus: Path, out: Path, vocab_size: int = 8192, chars_per_domain: int = 1_500_000,
          seed: int = 0, max_length: int = 1024) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=True,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(balanced_sample(corpus, chars_per_domain, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, model_max_length=max_length,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    # transformers 5 writes tokenizer_class "TokenizersBackend" and no special_tokens_map.json; name the
    # class every 4.x/5.x release knows and write the map, so older loaders read the same tokenizer.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text("utf-8"))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", "utf-8")
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": PAD}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", "utf-8")
    return fast


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--chars-per-domain", type=int, default=1_500_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    fast = train(args.corpus, args.out, args.vocab_size, args.chars_per_domain, args.seed)
    print(f"vocab {len(fast)}; eos {fast.eos_token!r}={fast.eos_token_id}, pad {fast.pad_token!r}="
          f"{fast.pad_token_id}; saved to {args.out}")


if __name__ == "__main__":
    main()
