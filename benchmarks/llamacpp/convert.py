"""A Hugging Face checkpoint directory -> GGUF, in the dtype our engine runs it in, with llama.cpp's tokenizer
checked against transformers'.

    python -m benchmarks.llamacpp.convert MODEL_DIR [--outtype bf16|f32|f16] [--force]

1. Stage: a directory of links to the checkpoint's files (the checkpoint itself is never written to). A
   checkpoint without tokenizer.json gets a synthetic byte-level BPE of its vocab_size (synthetic_tokenizer.py).
2. Convert with the vendored converter in its own venv (hf_to_gguf.py: unknown GPT-2-style pre-tokenizer ->
   "gpt-2"). The dtype defaults to the engine's rule: config.json's dtype, else float32.
3. Check: llama-tokenize on the GGUF and transformers' AutoTokenizer (this interpreter's, i.e. the project's)
   must give the same ids for every sample text, with and without special tokens. A mismatch deletes the GGUF
   and raises TokenizerMismatch.

The GGUF lands in .cache/llamacpp/gguf/<dir name>-<outtype>-<fingerprint>.gguf, the fingerprint covering
config.json, the tokenizer files, every weight file's size and mtime and the llama-cpp-python version; a
GGUF already there with its .json record is reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .synthetic_tokenizer import write_for_config
from .toolchain import CACHE, Toolchain

HERE = Path(__file__).resolve().parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}

# What the check tokenizes: prose in the languages the default model was trained on, code, runs of spaces,
# tabs and newlines, digits, contractions, emoji, the EOS text, and the converter's own hash text.
SAMPLES = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void.",
    "El rápido zorro marrón salta sobre el perro perezoso. ¿Dónde está la biblioteca? Über Größe: 3,5 m.",
    "Le cœur a ses raisons que la raison ne connaît point. Straße, Mädchen, Brötchen. 東京は日本の首都です。",
    "def main(argv: list[str]) -> int:\n    for i in range(10):\n\t\tprint(f\"{i:>3d}\")  # comment\n    return 0\n",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "  leading spaces,   runs   of   spaces,\n\n\nnewlines\r\n and 1234567890 3.14159 1e-9 0x1F 🦙🚀✅ ",
    "first document<|endoftext|>second document</s><s> after",
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there",
)


class TokenizerMismatch(RuntimeError):
    pass


@dataclass(frozen=True)
class Conversion:
    gguf: Path
    source: Path
    outtype: str
    tokenizer: str          # "checkpoint's own" or what synthetic_tokenizer made
    convert_seconds: float
    check: dict             # texts, tokens compared, transformers version, passed

    def record(self) -> dict:
        return {**asdict(self), "gguf": str(self.gguf), "source": str(self.source)}


def engine_outtype(model_dir: Path) -> str:
    """The GGUF type of the dtype our engine computes in for this checkpoint (its rule, its code)."""
    from transformers import AutoConfig

    from offload_engine.checkpoint.model_spec import dtype_from_config

    dtype = dtype_from_config(AutoConfig.from_pretrained(model_dir))
    return OUTTYPES[str(dtype).removeprefix("torch.")]


def fingerprint(model_dir: Path, outtype: str, toolchain: Toolchain) -> str:
    digest = hashlib.sha256(f"{outtype} {toolchain.info['llama_cpp_python_version']}".encode())
    for path in sorted(model_dir.iterdir()):
        if path.name == "config.json" or path.name in TOKENIZER_FILES:
            digest.update(path.name.encode() + path.read_bytes())
        elif path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


def stage(model_dir: Path, staging: Path) -> str:
    """Link the checkpoint's files into staging; give it a tokenizer if it has none. Says which tokenizer."""
    staging.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if path.is_file() and (path.suffix in (".json", ".safetensors") or path.name in TOKENIZER_FILES):
            link = staging / path.name
            link.unlink(missing_ok=True)
            link.symlink_to(path.resolve())
    if (model_dir / "tokenizer.json").is_file():
        return "checkpoint's own"
    return write_for_config(staging, json.loads((model_dir / "config.json").read_text()))


def llama_tokenize(toolchain: Toolchain, gguf: Path, text: str, add_special: bool) -> list[int]:
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt") as f:
        f.write(text)
        f.flush()
        cmd = [toolchain.binary("llama-tokenize"), "-m", gguf, "-f", f.name, "--ids", "--no-escape", "--log-disable"]
        out = subprocess.run([str(c) for c in cmd] + ([] if add_special else ["--no-bos"]),
                             capture_output=True, text=True, check=True)
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("[")][-1])


def check_tokenizer(toolchain: Toolchain, gguf: Path, tokenizer_dir: Path) -> dict:
    """Same ids from llama.cpp and transformers for every sample, with and without special tokens, or raise."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    compared = 0
    for text in SAMPLES:
        for add_special in (True, False):
            ours = tokenizer(text, add_special_tokens=add_special)["input_ids"]
            theirs = llama_tokenize(toolchain, gguf, text, add_special)
            if ours != theirs:
                first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                raise TokenizerMismatch(
                    f"llama.cpp and transformers tokenize differently (special tokens {add_special}) {text[:60]!r}: "
                    f"first difference at token {first}: transformers {ours[first:first + 8]}, "
                    f"llama.cpp {theirs[first:first + 8]} ({len(ours)} vs {len(theirs)} tokens)")
            compared += len(ours)
    return {"texts": len(SAMPLES), "tokens_compared": compared, "passed": True,
            "transformers": transformers.__version__, "with_and_without_special_tokens": True}


def convert(model_dir: Path, outtype: str | None = None, force: bool = False, toolchain: Toolchain | None = None,
            out_dir: Path = CACHE / "gguf") -> Conversion:
    """The GGUF of model_dir (made now, or reused when its fingerprint matches), tokenizer checked."""
    toolchain = toolchain or Toolchain.load()
    model_dir = Path(model_dir).resolve()
    outtype = outtype or engine_outtype(model_dir)
    name = f"{model_dir.name}-{outtype}-{fingerprint(model_dir, outtype, toolchain)}"
    gguf, record = out_dir / f"{name}.gguf", out_dir / f"{name}.json"
    if gguf.is_file() and record.is_file() and not force:
        saved = json.loads(record.read_text())
        return Conversion(**{**saved, "gguf": Path(saved["gguf"]), "source": Path(saved["source"])})

    staging = CACHE / "staging" / name
    tokenizer = stage(model_dir, staging)
    out_dir.mkdir(parents=True, exist_ok=True)
    part, log = gguf.with_suffix(".gguf.part"), out_dir / f"{name}.log"
    start = time.perf_counter()
    cmd = [toolchain.converter_python, HERE / "hf_to_gguf.py", toolchain.llama_dir, staging,
           "--outfile", part, "--outtype", outtype, "--model-name", model_dir.name]
    with open(log, "w") as f:
        done = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"conversion of {model_dir} failed (exit {done.returncode}), log {log}:\n{tail}")
    seconds = time.perf_counter() - start
    try:
        check = check_tokenizer(toolchain, part, staging)
    except TokenizerMismatch:
        part.unlink()
        raise
    part.rename(gguf)
    conversion = Conversion(gguf, model_dir, outtype, tokenizer, round(seconds, 1), check)
    record.write_text(json.dumps(conversion.record(), indent=2) + "\n")
    return conversion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--outtype", choices=sorted(set(OUTTYPES.values())), help="default: the engine's dtype")
    parser.add_argument("--force", action="store_true", help="convert again even if the GGUF is there")
    args = parser.parse_args()
    conversion = convert(args.model_dir, args.outtype, args.force)
    print(json.dumps(conversion.record(), indent=2))


if __name__ == "__main__":
    main()
