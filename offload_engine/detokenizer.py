"""Streaming text: each new token's text, decoding a short window instead of the whole sequence every token.

Decoding all ids on every token costs O(n) per token, O(n^2) for the stream. As transformers' TextStreamer
and vLLM's incremental detokenizer do, only the ids from `prefix_offset` on are decoded: the text of
ids[prefix_offset:read_offset] was emitted already, what the window decodes to beyond it is new. The window
starts one emitted stretch back, not at read_offset, because some decoders change a token's text when it
comes first (SentencePiece drops the leading space of "▁word").

A token that ends in the middle of a multi-byte character decodes to U+FFFD; its text is held back until a
later token completes the character (or the stream ends: `push(..., last=True)` emits what is left). The
offsets only move to a point where the text decoded so far does not end in U+FFFD, so the decoder is at a
character boundary there and the window's text continues the full decode exactly.

What holds (tests/test_detokenizer.py checks it on the bundled tokenizer): after every push, the text emitted
so far is a prefix of `tokenizer.decode(ids_so_far, skip_special_tokens=True)`, equal to it whenever that
does not end in U+FFFD; after the last push it equals it.

>>> class Chars:  # a tokenizer whose token i is chr(i)
...     def decode(self, ids, skip_special_tokens=True):
...         return "".join(map(chr, ids))
>>> d = IncrementalDetokenizer(Chars())
>>> [d.push(t) for t in b"hi!"]
['h', 'i', '!']
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window starts here
        self.read_offset = 0  # the text of ids[:read_offset] has been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int, last: bool = False) -> str:
        """The text `token_id` completes (often "", mid-character); with last=True, all text not yet emitted."""
        if self.tokenizer is None:
            return ""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        text = self._decode(self.ids[self.prefix_offset:])
        if not last and (text.endswith(REPLACEMENT) or not text.startswith(prefix_text)):
            return ""  # an incomplete character (or a decoder that rewrote earlier text): wait for more tokens
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text[len(prefix_text):]
