"""The JSON files transformers reads beside config.json (generation config, tokenizer files), checked for the
shapes its readers assume before they read them.

transformers and the tokenizers library fail on a malformed file with whatever exception the first bad access
raises (KeyError, AttributeError, a bare Exception from Rust), or accept it and fail later, mid-generation
(an `eos_token_id` of "x"). Each check here names the file and the field instead.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

from ..errors import CheckpointError, short_repr
from .files import read_json

Check = Callable[[object], bool]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _token_id(v) -> bool:
    """One id or several (generate stops at any of them), or none."""
    return v is None or (_is_int(v) and v >= 0) or (isinstance(v, list) and all(_is_int(x) and x >= 0 for x in v))


def _number(v) -> bool:
    return v is None or ((_is_int(v) or isinstance(v, float)) and math.isfinite(v))


def _count(v) -> bool:
    return v is None or (_is_int(v) and v >= 0)


def _text(v) -> bool:
    return v is None or isinstance(v, str)


def _object(v) -> bool:
    return v is None or isinstance(v, dict)


def _special_token(v) -> bool:
    """A token as transformers saves it: its text, or an AddedToken's fields."""
    return v is None or isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("content"), str))


def _special_tokens(v) -> bool:
    return v is None or (isinstance(v, list) and all(_special_token(x) and x is not None for x in v))


def _added_tokens_decoder(v) -> bool:
    return v is None or (isinstance(v, dict) and all(k.isascii() and k.isdecimal() and isinstance(t, dict)
                                                     and isinstance(t.get("content"), str) for k, t in v.items()))


def _chat_template(v) -> bool:
    """A template, or named templates [{"name": ..., "template": ...}]."""
    return v is None or isinstance(v, str) or (isinstance(v, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in v))


def _added_tokens(v) -> bool:
    return isinstance(v, list) and all(
        isinstance(t, dict) and _is_int(t.get("id")) and isinstance(t.get("content"), str) for t in v)


def _required_object(v) -> bool:
    return isinstance(v, dict)


SPECIAL_TOKENS = {name: _special_token for name in
                  ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")}
TOKEN_IDS = {name: _token_id for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")}

# file -> (field -> check); a field that is absent is fine unless the check is marked required below.
SHAPES: dict[str, dict[str, Check]] = {
    "generation_config.json": {
        **TOKEN_IDS, "max_length": _count, "max_new_tokens": _count, "min_length": _count, "top_k": _count,
        "temperature": _number, "top_p": _number, "repetition_penalty": _number, "do_sample": lambda v: v is None
        or isinstance(v, bool), "watermarking_config": _object, "compile_config": _object, "cache_config": _object,
    },
    "tokenizer_config.json": {
        **SPECIAL_TOKENS, "tokenizer_class": _text, "model_max_length": _number, "added_tokens_decoder":
        _added_tokens_decoder, "additional_special_tokens": _special_tokens, "chat_template": _chat_template,
        "extra_special_tokens": lambda v: v is None or isinstance(v, (dict, list)),
    },
    "special_tokens_map.json": {**SPECIAL_TOKENS, "additional_special_tokens": _special_tokens},
    "tokenizer.json": {"model": _required_object, "added_tokens": _added_tokens, "normalizer": _object,
                       "pre_tokenizer": _object, "post_processor": _object, "decoder": _object},
    "added_tokens.json": {},
    "chat_template.json": {"chat_template": _chat_template},
}
REQUIRED = {"tokenizer.json": ("model", "added_tokens")}
NAMES_TO_IDS = ("added_tokens.json",)  # token text -> id


def check_metadata_file(path: Path, root: Path) -> None:
    """CheckpointError (one line, naming the file and field) unless `path` has the shape its reader assumes."""
    value = read_json(path, root)
    name = path.name
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object; restore the file from the original checkpoint")
    for field in REQUIRED.get(name, ()):
        if field not in value:
            raise CheckpointError(f"{path} has no {field!r}; restore the file from the original checkpoint")
    for field, check in SHAPES[name].items():
        if field in value and not check(value[field]):
            raise CheckpointError(f"{path}: {field} = {short_repr(value[field])} has the wrong type or range; "
                                  "restore the file from the original checkpoint")
    if name in NAMES_TO_IDS and not all(_is_int(v) and v >= 0 for v in value.values()):
        raise CheckpointError(f"{path} must map token texts to ids; restore the file from the original checkpoint")


def check_metadata_files(directory: Path, root: Path, names: set[str]) -> None:
    """Check every file of SHAPES that the directory listing `names` holds."""
    for name in SHAPES:
        if name in names:
            check_metadata_file(directory / name, root)
