"""Held-out text the training corpus does not contain: where the default model's routing is measured.

The corpus (benchmarks/corpus.py) has the Bible, dictionaries, fortunes-de, Debian Reference and the Python
standard library. The routing figures of a model trained on it should come from text of the same languages
that it never saw, not from its validation split (same sources, same style):

- en: English legal prose, the license texts of Debian's base-files (/usr/share/common-licenses);
- py: Python code outside the standard library (setuptools without its vendored stdlib copies, docutils);
- es: Spanish fortunes (fortunes-es);
- de, fr: German and French manual pages (manpages-de, manpages-fr), rendered to plain text with groff.

Output (default ``.cache/heldout``, never committed): ``<domain>.txt``, documents joined by a line holding
only the EOS text, as corpus.py writes them (`moe-offload trace` splits on it), and ``manifest.json``.

    python benchmarks/heldout.py [--out .cache/heldout] [--max-chars 400000]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import EOS_SEPARATOR, REPO, fetch_package, package_license  # noqa: E402

DEFAULT_OUT = REPO / ".cache" / "heldout"


def _licenses(root: Path) -> Iterator[str]:
    seen = set()
    for f in sorted((root / "usr/share/common-licenses").iterdir()):
        text = f.read_text("utf-8", errors="replace")
        if f.is_symlink() or text in seen:  # GPL -> GPL-3 and friends
            continue
        seen.add(text)
        yield text


def _python_files(root: Path, top: str, skip: tuple[str, ...] = ()) -> Iterator[str]:
    for f in sorted((root / "usr/lib/python3/dist-packages" / top).rglob("*.py")):
        if any(part in skip for part in f.parts) or f.stat().st_size > 200_000:
            continue
        text = f.read_text("utf-8", errors="replace").replace(EOS_SEPARATOR, "")
        if text.strip():
            yield text


def _fortunes(root: Path) -> Iterator[str]:
    base = root / "usr/share/games/fortunes"
    for f in sorted(p for p in base.rglob("*") if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8")):
        for item in re.split(r"^%\s*$", f.read_text("utf-8", errors="replace"), flags=re.M):
            if item.strip():
                yield item.strip("\n").expandtabs(4)


def _manpages(root: Path, lang: str) -> Iterator[str]:
    """Every man page of sections 1 and 8, rendered by groff as a terminal would show it (no formatting)."""
    for f in sorted((root / "usr/share/man" / lang).glob("man[18]/*.gz")):
        source = gzip.decompress(f.read_bytes())
        if source.startswith(b".so "):  # a link to another page
            continue
        r = subprocess.run(["groff", "-k", "-Tutf8", "-mandoc", "-P-cbou", "-rLL=100n", "-rHY=0"], input=source,
                           capture_output=True, check=False)
        text = r.stdout.decode("utf-8", errors="replace")
        # undo justification (runs of spaces between words), keep the indentation
        lines = (re.sub(r"(?<=\S) {2,}(?=\S)", " ", line.rstrip()) for line in text.splitlines())
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        if r.returncode == 0 and text:
            yield text


SOURCES = {
    "en": [("base-files", _licenses)],
    "py": [("python3-setuptools", lambda r: _python_files(r, "setuptools", skip=("_distutils", "_vendor"))),
           ("python3-docutils", lambda r: _python_files(r, "docutils"))],
    "es": [("fortunes-es", _fortunes)],
    "de": [("manpages-de", lambda r: _manpages(r, "de"))],
    "fr": [("manpages-fr", lambda r: _manpages(r, "fr"))],
}


# free-form copyright files: base-files (the license texts carry their own terms, verbatim copies allowed) and
# python3-setuptools (MIT since 19.5, as its copyright file says)
LICENSES = {"base-files": "verbatim copies of the license texts", "python3-setuptools": "MIT"}


def build(out: Path, max_chars: int) -> dict:
    cache = REPO / ".cache" / "corpus"  # downloaded packages are shared with corpus.py
    manifest = {}
    out.mkdir(parents=True, exist_ok=True)
    for domain, sources in SOURCES.items():
        docs, info = [], []
        for package, reader in sources:
            root = fetch_package(package, cache)
            found = list(reader(root))
            info.append({"package": package, "license": LICENSES.get(package) or package_license(root, package),
                         "documents": len(found)})
            docs += found
        text, size = [], 0
        for doc in docs:  # whole documents, interleaving sources would mix styles within a sequence
            if size >= max_chars:
                break
            text.append(doc)
            size += len(doc)
        tmp = out / f"{domain}.txt.tmp"
        tmp.write_text(f"\n{EOS_SEPARATOR}\n".join(text) + "\n", encoding="utf-8")
        tmp.replace(out / f"{domain}.txt")
        manifest[domain] = {"sources": info, "documents": len(text), "characters": size}
        print(f"{domain}: {len(text)} documents, {size:,} characters from "
              + ", ".join(f"{s['package']} ({s['license']})" for s in info))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--max-chars", type=int, default=400_000, help="characters per domain at most")
    args = parser.parse_args()
    build(args.out, args.max_chars)


if __name__ == "__main__":
    main()
