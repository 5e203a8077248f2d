"""Logprobs in OpenAI's wire format, as vLLM's OpenAI server shapes them, from the handle's pieces
(handle.Piece: `logprob`, and `top_logprobs` {token id: logprob}, most likely first).

/v1/completions (`logprobs`: K, 0..5): {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one entry a
token; each top_logprobs entry holds the K most likely tokens and the chosen one (so up to K + 1, as OpenAI
documents). /v1/chat/completions (`logprobs: true`, `top_logprobs`: K, 0..20): {"content": [{"token",
"logprob", "bytes", "top_logprobs": [K x {"token", "logprob", "bytes"}]}]}.

Every generated token has its entry, those whose text is held back or cut (a stop string, an end-of-sequence
token) included, as vLLM's: the lists have usage's completion_tokens entries. A token's text is the tokenizer's
decoding of it alone, special tokens included ("token_id:N" without a tokenizer); its `bytes` are its own
(TokenBytes: a character split over several tokens has its bytes split too, where the decoded text of each part
is "\ufffd"); `text_offset` counts the characters of the tokens' bytes before it from the completion's start
(a token that ends a split character starts where that character does). A stream sends a chunk per token,
with its entry, also where the token released no text (as vLLM's server does); its offsets count on across
chunks, so the chunks' lists, joined, are the plain response's (vLLM's streamed offsets count the text
released before the chunk instead, which differs from its plain response's where text was held back).
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable

FLOOR = -9999.0  # JSON has no -inf: OpenAI's and vLLM's floor for a logprob


def _bytes_to_unicode() -> dict[int, str]:
    """Byte-level BPE's (GPT-2's) printable stand-in for each byte, which its vocabulary is written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte pieces


class TokenBytes:
    """A token's own bytes: a byte-level BPE vocabulary's symbols mapped back to their bytes, a byte-fallback
    piece's byte, otherwise (special tokens, other vocabularies) the UTF-8 of the token decoded alone."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.symbols = ({c: b for b, c in _bytes_to_unicode().items()} if "ByteLevel" in repr(decoder) else None)
        self.special = set(getattr(tokenizer, "all_special_ids", ()))

    def __call__(self, token_id: int) -> bytes:
        if self.tokenizer is None:
            return f"token_id:{token_id}".encode()
        if token_id not in self.special:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if isinstance(piece, str):
                if self.symbols is not None and all(c in self.symbols for c in piece):
                    return bytes(self.symbols[c] for c in piece)
                if match := BYTE_FALLBACK.fullmatch(piece):
                    return bytes([int(match.group(1), 16)])
        return self.tokenizer.decode([token_id]).encode("utf-8")


class LogprobsWriter:
    """Shapes one response's pieces, a chunk's worth at a time (it keeps the running text_offset)."""

    def __init__(self, chat: bool, tokenizer, token_bytes: TokenBytes | None = None):
        self.chat, self.tokenizer = chat, tokenizer
        self.token_bytes = token_bytes or TokenBytes(tokenizer)
        self.offset = 0
        self.characters = codecs.getincrementaldecoder("utf-8")(errors="replace")  # the tokens' bytes so far

    def shape(self, pieces: Iterable) -> dict:
        pieces = list(pieces)
        if self.chat:
            return {"content": [{**self._entry(p.token_id, p.logprob),
                                 "top_logprobs": [self._entry(t, lp) for t, lp in p.top_logprobs.items()]}
                                for p in pieces]}
        tokens = [self._text(p.token_id) for p in pieces]
        offsets = []
        for p in pieces:
            offsets.append(self.offset)
            self.offset += len(self.characters.decode(self.token_bytes(p.token_id)))
        return {"tokens": tokens, "token_logprobs": [max(p.logprob, FLOOR) for p in pieces],
                "top_logprobs": [{self._text(t): max(lp, FLOOR)
                                  for t, lp in {**p.top_logprobs, p.token_id: p.logprob}.items()} for p in pieces],
                "text_offset": offsets}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self._text(token_id)
        return {"token": text, "logprob": max(logprob, FLOOR), "bytes": list(self.token_bytes(token_id))}

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])
