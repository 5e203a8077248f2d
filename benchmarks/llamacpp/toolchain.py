"""Where setup.sh put llama.cpp: its binaries, its vendored sources and the converter's venv."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "llamacpp"


class ToolchainMissing(RuntimeError):
    pass


@dataclass(frozen=True)
class Toolchain:
    bin: Path                 # llama-bench, llama-tokenize, llama-completion
    llama_dir: Path           # the vendored llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/)
    converter_python: Path    # the converter venv's interpreter
    info: dict                # build-info.json: versions, commit, cmake flags, compiler

    @classmethod
    def load(cls, cache: Path = CACHE) -> Toolchain:
        info_path = cache / "build-info.json"
        if not info_path.is_file():
            raise ToolchainMissing(f"{info_path} missing: run `nice -n 19 bash benchmarks/llamacpp/setup.sh` first")
        info = json.loads(info_path.read_text())
        chain = cls(Path(info["bin"]), Path(info["source"]), Path(info["converter_python"]), info)
        for path in (chain.binary("llama-bench"), chain.binary("llama-tokenize"), chain.converter_python):
            if not path.exists():
                raise ToolchainMissing(f"{path} missing: run `bash benchmarks/llamacpp/setup.sh` again")
        return chain

    def binary(self, name: str) -> Path:
        return self.bin / name
