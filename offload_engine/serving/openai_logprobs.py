"""Logprobs in OpenAI's wire format, as vLLM's OpenAI server shapes them, from the handle's pieces
(handle.Piece: `logprob`, and `top_logprobs` {token id: logprob}, most likely first).

/v1/completions (`logprobs`: K, 0..5): {"tokens", "token_logprobs", "top_logprobs", "text_offset"}, one entry a
token; each top_logprobs entry holds the K most likely tokens and the chosen one (so up to K + 1, as OpenAI
documents). /v1/chat/completions (`logprobs: true`, `top_logprobs`: K, 0..20): {"content": [{"token",
"logprob", "bytes", "top_logprobs": [K x {"token", "logprob", "bytes"}]}]}.

Every generated token has its entry, those whose text is held back or cut (a stop string, an end-of-sequence
token) included, as vLLM's: the lists have usage's completion_tokens entries. A token's text is the tokenizer's
decoding of it alone, special tokens included ("token_id:N" without a tokenizer); `text_offset` counts those
texts from the completion's start. A stream sends a chunk per token, with its entry, also where the token
released no text (as vLLM's server does); its offsets count on across chunks, so the chunks' lists, joined, are
the plain response's (vLLM's streamed offsets count the text released before the chunk instead, which differs
from its plain response's where text was held back).
"""

from __future__ import annotations

from collections.abc import Iterable

FLOOR = -9999.0  # JSON has no -inf: OpenAI's and vLLM's floor for a logprob


class LogprobsWriter:
    """Shapes one response's pieces, a chunk's worth at a time (it keeps the running text_offset)."""

    def __init__(self, chat: bool, tokenizer):
        self.chat, self.tokenizer = chat, tokenizer
        self.offset = 0

    def shape(self, pieces: Iterable) -> dict:
        pieces = list(pieces)
        if self.chat:
            return {"content": [{**self._entry(p.token_id, p.logprob),
                                 "top_logprobs": [self._entry(t, lp) for t, lp in p.top_logprobs.items()]}
                                for p in pieces]}
        tokens = [self._text(p.token_id) for p in pieces]
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            self.offset += len(token)
        return {"tokens": tokens, "token_logprobs": [max(p.logprob, FLOOR) for p in pieces],
                "top_logprobs": [{self._text(t): max(lp, FLOOR)
                                  for t, lp in {**p.top_logprobs, p.token_id: p.logprob}.items()} for p in pieces],
                "text_offset": offsets}

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self._text(token_id)
        return {"token": text, "logprob": max(logprob, FLOOR), "bytes": list(text.encode("utf-8"))}

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])
