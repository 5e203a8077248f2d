"""llama.cpp's vendored convert_hf_to_gguf.py, plus one thing: a GPT-2-style byte-level BPE tokenizer that the
converter's table of pre-tokenizer hashes does not know is written as pre-tokenizer "gpt-2".

The converter names the pre-tokenizer by hashing the ids of a fixed text, and a tokenizer trained by us has
a hash of its own. When the converter gives up, and only when tokenizer.json says BPE, no normalizer and a
ByteLevel pre-tokenizer with GPT-2's regex and no prefix space, this says "gpt-2" (llama.cpp's
LLAMA_VOCAB_PRE_TYPE_GPT2 is that regex). convert.py then checks that llama.cpp tokenizes like transformers.

Runs inside the converter venv (setup.sh), not the project's:

    .cache/llamacpp/venv-*/bin/python benchmarks/llamacpp/hf_to_gguf.py LLAMA_CPP_DIR MODEL_DIR \
        --outfile X.gguf --outtype bf16 [any other convert_hf_to_gguf.py flag]
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


def is_gpt2_style(model_dir: Path) -> bool:
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return False
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    pre = tokenizer.get("pre_tokenizer") or {}
    return (tokenizer["model"]["type"] == "BPE" and tokenizer.get("normalizer") is None
            and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False))


def install_gpt2_fallback(text_model_class) -> None:
    """Wrap TextModel.get_vocab_base_pre: the converter's answer when it has one, else "gpt-2" if it fits."""
    original = text_model_class.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if not is_gpt2_style(Path(self.dir_model)):
                raise
            logging.getLogger("hf-to-gguf").warning(
                "pre-tokenizer hash unknown; tokenizer.json is byte-level BPE with GPT-2 splitting: writing 'gpt-2'")
            return "gpt-2"

    text_model_class.get_vocab_base_pre = get_vocab_base_pre


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    llama_dir = Path(sys.argv[1]).resolve()
    sys.argv = [str(llama_dir / "convert_hf_to_gguf.py")] + sys.argv[2:]
    sys.path.insert(0, str(llama_dir))
    import convert_hf_to_gguf  # puts the vendored gguf-py first on sys.path
    from conversion.base import TextModel

    install_gpt2_fallback(TextModel)
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main()
