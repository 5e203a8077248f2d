"""Streamed text: the incremental detokenizer gives the full decode's text, decoding a window, not every id."""

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tiny_models as tm
from offload_engine import DEFAULT_MODEL, OffloadEngine
from offload_engine.detokenizer import REPLACEMENT, IncrementalDetokenizer
from offload_engine.engine import load_tokenizer

TOKENIZER = load_tokenizer(DEFAULT_MODEL)  # the bundled model's byte-level BPE, trained on Japanese too
TEXT = st.text(alphabet=st.sampled_from("abc XYZ.\n日本語のテキストこんにちは。ーカタ漢字🙂é€"), max_size=40)
IDS = st.lists(st.one_of(
    st.integers(0, len(TOKENIZER) - 1).map(lambda i: [i]),  # any token, special ones and stray bytes included
    TEXT.map(lambda s: TOKENIZER(s, add_special_tokens=False)["input_ids"]),  # real text, Japanese included
), max_size=12).map(lambda parts: [i for p in parts for i in p])


def decode(ids):
    return TOKENIZER.decode(ids, skip_special_tokens=True)


@settings(max_examples=300, deadline=None)
@given(IDS)
def test_the_streamed_text_is_the_full_decode(ids):
    """After every token, the text so far is a prefix of the decode of the ids so far, and all of it unless
    that decode ends in an unfinished character; after the last token it is the decode of all ids."""
    d = IncrementalDetokenizer(TOKENIZER)
    emitted = ""
    for n, token in enumerate(ids, start=1):
        emitted += d.push(token, last=n == len(ids))
        so_far = decode(ids[:n])
        assert so_far.startswith(emitted)
        if not so_far.endswith(REPLACEMENT):
            assert emitted == so_far
    assert emitted == decode(ids)


def test_japanese_text_comes_out_whole_characters_at_a_time():
    ids = TOKENIZER("日本語のテキスト。こんにちは", add_special_tokens=False)["input_ids"]
    assert decode(ids[:1]).endswith(REPLACEMENT)  # the first token is part of a character
    d = IncrementalDetokenizer(TOKENIZER)
    pieces = [d.push(t, last=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(pieces) == "日本語のテキスト。こんにちは" and REPLACEMENT not in "".join(pieces)
    assert pieces[0] == ""


class CountingTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def test_each_token_decodes_a_window_not_the_whole_sequence():
    """The work per token does not grow with the length: 400 tokens decode a few ids each, not n^2 / 2."""
    ids = TOKENIZER("The quick brown fox jumps over the lazy dog. " * 60, add_special_tokens=False)["input_ids"][:400]
    counting = CountingTokenizer(TOKENIZER)
    d = IncrementalDetokenizer(counting)
    assert "".join(d.push(t) for t in ids) == decode(ids)
    assert counting.decoded <= 4 * len(ids)  # the full decode each token: 80,200


def save_byte_tokenizer(path):
    """A byte-level tokenizer for the tiny models' 128 ids, most of them UTF-8 continuation bytes: random
    routing makes text that stops in the middle of a character."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    to_char = bytes_to_unicode()
    chars = [to_char[b] for b in [*(string.ascii_letters + " .,!?-'").encode(), 0xE3, *range(0x80, 0xC0)]]
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + chars)}
    assert len(vocab) == tm.VOCAB
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="module")
def byte_engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("bytes")
    tm.save_checkpoint(tm.build_reference("mixtral"), path, "per_expert")
    save_byte_tokenizer(path)
    return OffloadEngine.from_pretrained(path, device="cpu", dtype="float32", progress=False)


@pytest.mark.parametrize("new_tokens", range(1, 25))
def test_the_stream_ends_with_the_text_of_its_last_token(byte_engine, new_tokens):
    """Whatever token a stream stops at (mid-character included), its texts add up to the result's text."""
    events = list(byte_engine.stream([5, 17, 33, 9], max_new_tokens=new_tokens, ignore_eos=True))
    tokens = [e.token_id for e in events]
    assert "".join(e.text for e in events) == byte_engine.tokenizer.decode(tokens, skip_special_tokens=True)
