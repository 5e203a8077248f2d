"""A deterministic byte-level BPE tokenizer of any vocabulary size, for checkpoints that ship none.

llama.cpp's converter cannot write a GGUF without a tokenizer (a Llama/Mixtral checkpoint falls through
sentencepiece, Llama-HF BPE and GPT-2 BPE, and AutoTokenizer fails on the last). Decode speed does not depend
on the vocabulary's content, only on its size (the embedding and output shapes), so the tokenizer is made in
closed form, no corpus and no training: the checkpoint's special tokens at their config ids, the 256
byte-level symbols, then merges of two symbols (both frequent-first, by the sum of their ranks) and, past the
65,536 pairs (Qwen3's and gpt-oss's vocabularies), of a pair with a third symbol, until the vocabulary is full.
Same input, same bytes out.

>>> vocab, merges = byte_level_bpe(300, {0: "<pad>", 1: "<s>", 2: "</s>"})
>>> len(vocab), len(merges), vocab["<s>"], merges[0]
(300, 41, 1, ('Ġ', 'Ġ'))
"""

from __future__ import annotations

import json
from pathlib import Path

# Frequent-first order of the bytes: letters as in English text, space, capitals, digits, punctuation, the rest.
_FIRST = b" etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,'\"-:;!?()\n\t"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (the alphabet of every byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_level_bpe(vocab_size: int, specials: dict[int, str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) with the specials at their ids and vocab_size entries in all."""
    alphabet = bytes_to_unicode()
    order = list(dict.fromkeys(list(_FIRST) + list(range(256))))
    symbols = [alphabet[b] for b in order]
    n_merges = vocab_size - len(specials) - len(symbols)
    n = len(symbols)
    if n_merges < 0 or n_merges > n ** 2 + n ** 3:
        raise ValueError(f"vocab_size {vocab_size} cannot hold {len(specials)} specials and 256 byte symbols")
    pairs = sorted(((i, j) for i in range(n) for j in range(n)), key=lambda p: (p[0] + p[1], p[0]))
    merges = [(symbols[i], symbols[j]) for i, j in pairs[:n_merges]]
    # a pair's token joined with one more symbol: the pair's merge ranks before it, as BPE needs
    triples = ((symbols[i] + symbols[j], symbols[k]) for i, j in pairs for k in range(n))
    merges += [next(triples) for _ in range(max(0, n_merges - n ** 2))]
    free = iter(i for i in range(vocab_size) if i not in specials)
    vocab = {name: i for i, name in specials.items()}
    for token in symbols + [a + b for a, b in merges]:
        vocab[token] = next(free)
    return vocab, merges


def write_tokenizer(directory: Path, vocab_size: int, specials: dict[int, str], bos: str, eos: str, pad: str) -> None:
    """tokenizer.json (GPT-2 style: byte-level pre-tokenizer with its regex, no normalizer, no BOS added),
    tokenizer_config.json and special_tokens_map.json, as transformers' PreTrainedTokenizerFast reads them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = byte_level_bpe(vocab_size, specials)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)])
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    special_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 4096, **special_map}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")


def write_for_config(directory: Path, config: dict) -> str:
    """The synthetic tokenizer of a model config (config.json's fields): its vocab_size, with pad, BOS and EOS
    at their configured ids. Says what it wrote."""
    names = {}
    for key, name in (("pad_token_id", "<pad>"), ("bos_token_id", "<s>"), ("eos_token_id", "</s>")):
        if isinstance(config.get(key), int):
            names.setdefault(config[key], name)
    by_key = {key: names.get(config.get(key + "_id")) for key in ("bos_token", "eos_token", "pad_token")}
    write_tokenizer(directory, config["vocab_size"], names, by_key["bos_token"], by_key["eos_token"],
                    by_key["pad_token"])
    return (f"synthetic byte-level BPE, GPT-2 splitting, vocab {config['vocab_size']} "
            f"(256 byte symbols, pair merges, specials {names}), made by synthetic_tokenizer.py")
