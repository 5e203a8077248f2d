"""Build the multi-domain training corpus for the bundled default model.

Sources are Debian packages (fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x``; nothing
is installed) and the Python standard library of the running interpreter. Each source is cleaned of markup,
cut into documents with stable ids, and split train / validation by a hash of the document id, so the split
does not depend on file order or on which other sources are present.

Output (default ``.cache/corpus``, gitignored; never commit it)::

    debs/*.deb, x/<package>/...          downloaded and unpacked packages
    <domain>.train.txt, <domain>.val.txt documents joined by a line holding only EOS_SEPARATOR
    manifest.json                        sources, licenses, document / character counts per domain and split

Usage::

    python benchmarks/corpus.py [--out .cache/corpus] [--val-percent 5]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import shutil
import struct
import subprocess
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / ".cache" / "corpus"
EOS_SEPARATOR = "<|endoftext|>"  # the tokenizer's EOS; written between documents
DOMAINS = ("en", "es", "de", "fr", "ja", "py")

Doc = tuple[str, str]  # (document id, text)


@dataclass(frozen=True)
class Source:
    name: str  # Debian package name, or "python-stdlib"
    domain: str
    reader: Callable[[Path], Iterator[Doc]]  # unpacked package root -> documents


# ---------------------------------------------------------------- cleaning helpers


def _paragraph_chunks(text: str, prefix: str, target_chars: int = 1500) -> Iterator[Doc]:
    """Greedy chunks of whole paragraphs of about target_chars each, numbered in order."""
    buf: list[str] = []
    size = 0
    n = 0
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        buf.append(para)
        size += len(para)
        if size >= target_chars:
            yield f"{prefix}:{n}", "\n\n".join(buf)
            buf, size, n = [], 0, n + 1
    if buf:
        yield f"{prefix}:{n}", "\n\n".join(buf)


def _clean_plain_manual(text: str) -> str:
    """Debian Reference .txt: drop ASCII-art table rules and rows, rule lines; strip indentation."""
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("|", "+-")) or re.fullmatch(r"[-=_*]{4,}", s):
            continue
        out.append(s)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out))


# ---------------------------------------------------------------- readers


def _read_sword_ztext(root: Path) -> Iterator[Doc]:
    """SWORD zText module: .bzs = (offset, size, usize) u32 triples into .bzz zlib blocks (one per book).

    OSIS markup is stripped; footnotes and titles dropped; one document per chapter (id = OSIS chapter id).
    """
    (mod_dir,) = [p for p in (root / "usr/share/sword/modules/texts/ztext").iterdir() if p.is_dir()]
    for testament in ("ot", "nt"):
        bzs = (mod_dir / f"{testament}.bzs").read_bytes()
        bzz = (mod_dir / f"{testament}.bzz").read_bytes()
        for i in range(len(bzs) // 12):
            off, size, _usize = struct.unpack_from("<III", bzs, i * 12)
            osis = zlib.decompress(bzz[off : off + size]).decode("utf-8")
            # A note between two words is their only separator: replace it by a space, not by nothing.
            osis = re.sub(r"<note\b.*?</note>", " ", osis, flags=re.S)
            osis = re.sub(r"<title\b.*?</title>", "", osis, flags=re.S)
            parts = re.split(r'<chapter\b[^>]*?osisID="([^"]+)"[^>]*?sID=[^>]*>', osis)
            # parts = [preamble, id1, body1, id2, body2, ...]
            for cid, body in zip(parts[1::2], parts[2::2]):
                body = re.sub(r'<div\b[^>]*type="x-p"[^>]*/>', "\n", body)  # paragraph breaks
                body = re.sub(r"<l\b[^>]*eID=[^>]*/>|<lb\b[^>]*/>", "\n", body)  # ends of poetry lines
                body = re.sub(r"<[^>]+>", "", body)
                body = re.sub(r"[ \t]+", " ", body)
                body = re.sub(r" ([,.;:!?])", r"\1", body)
                body = re.sub(r" *\n[ \n]*", "\n", body).strip()
                if body:
                    yield f"{root.name}:{cid}", body


def _read_debian_reference(root: Path) -> Iterator[Doc]:
    (txt,) = (root / "usr/share/debian-reference").glob("debian-reference.*.txt.gz")
    text = gzip.decompress(txt.read_bytes()).decode("utf-8")
    yield from _paragraph_chunks(_clean_plain_manual(text), root.name)


def _read_dictd(root: Path) -> Iterator[Doc]:
    """dictd .dict.dz is gzip; drop the 00-database-* header entries and {cross-reference} braces."""
    for dz in sorted((root / "usr/share/dictd").glob("*.dict.dz")):
        text = gzip.decompress(dz.read_bytes()).decode("utf-8", errors="replace")
        text = re.sub(r"[{}]", "", text)
        text = "\n".join(ln.strip() for ln in text.splitlines() if not ln.startswith("00-database"))
        yield from _paragraph_chunks(text, f"{root.name}:{dz.stem}")


def _read_fortunes(root: Path) -> Iterator[Doc]:
    base = root / "usr/share/games/fortunes"
    for f in sorted(p for p in base.rglob("*") if p.is_file() and p.suffix not in (".dat", ".u8")):
        if f.is_symlink():
            continue
        text = f.read_text("utf-8", errors="replace")
        for i, item in enumerate(re.split(r"^%\s*$", text, flags=re.M)):
            item = item.strip("\n")
            if item.strip():
                yield f"{root.name}:{f.relative_to(base)}:{i}", item.expandtabs(4)


def python_stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_python_stdlib(root: Path) -> Iterator[Doc]:
    """Every .py under the stdlib except site-packages; files over 200 kB (generated tables) skipped."""
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if "site-packages" in rel.parts or f.stat().st_size > 200_000:
            continue
        try:
            text = f.read_text("utf-8")
        except UnicodeDecodeError:
            continue
        text = text.replace(EOS_SEPARATOR, "")
        if text.strip():
            yield f"python-stdlib:{rel}", text


SOURCES = (
    Source("sword-text-web", "en", _read_sword_ztext),
    Source("dict-devil", "en", _read_dictd),
    Source("dict-jargon", "en", _read_dictd),
    Source("debian-reference-en", "en", _read_debian_reference),
    Source("sword-text-sparv", "es", _read_sword_ztext),
    Source("debian-reference-es", "es", _read_debian_reference),
    Source("debian-reference-de", "de", _read_debian_reference),
    Source("fortunes-de", "de", _read_fortunes),
    Source("debian-reference-fr", "fr", _read_debian_reference),
    Source("debian-reference-ja", "ja", _read_debian_reference),
    Source("python-stdlib", "py", _read_python_stdlib),
)


# ---------------------------------------------------------------- fetching, licenses, split


def fetch_package(name: str, out: Path) -> Path:
    """apt-get download + dpkg-deb -x into out/x/<name>; cached."""
    root = out / "x" / name
    if root.exists():
        return root
    debs = out / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{name}_*.deb")):
        r = subprocess.run(["apt-get", "download", name], cwd=debs, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download {name} failed (run apt-get update?):\n{r.stderr}")
    (deb,) = debs.glob(f"{name}_*.deb")
    tmp = root.with_suffix(".tmp")  # unpack, then rename: an interrupted run leaves no half package
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
    tmp.rename(root)
    return root


def package_license(root: Path, name: str) -> str:
    """License of the 'Files: *' stanza of a DEP-5 debian/copyright file."""
    text = (root / "usr/share/doc" / name / "copyright").read_text("utf-8", errors="replace")
    m = re.search(r"^Files:\s*\*\s*$.*?^License:[ \t]*(\S[^\n]*)$", text, flags=re.M | re.S)
    if m:
        return m.group(1).strip()
    # Older free-form copyright files (dict-devil): accept only an explicit public-domain statement.
    if re.search(r"is in the public domain", text, flags=re.I):
        return "public-domain"
    raise RuntimeError(f"cannot read the license from the copyright file of {name}")


def python_license(root: Path) -> str:
    lic = root / "LICENSE.txt"
    if lic.exists() and "PYTHON SOFTWARE FOUNDATION LICENSE" in lic.read_text("utf-8", errors="replace"):
        return "PSF-2.0"
    return "PSF-2.0 (LICENSE.txt not found next to the stdlib)"


def is_validation(doc_id: str, val_percent: float) -> bool:
    h = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big")
    return (h % 10_000) < val_percent * 100


def build(out: Path = DEFAULT_OUT, val_percent: float = 5.0) -> dict:
    """Fetch, clean and split every source; write per-domain files and manifest.json; return the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    docs: dict[tuple[str, str], list[str]] = {(d, s): [] for d in DOMAINS for s in ("train", "val")}
    sources = []
    for src in tqdm(SOURCES, desc="sources", unit="src"):
        if src.name == "python-stdlib":
            root = python_stdlib_dir()
            lic = python_license(root)
            origin = str(root)
        else:
            root = fetch_package(src.name, out)
            lic = package_license(root, src.name)
            debs = sorted((out / "debs").glob(f"{src.name}_*.deb"))
            origin = debs[0].name if debs else src.name
        counts = {"train": [0, 0], "val": [0, 0]}
        for doc_id, text in src.reader(root):
            split = "val" if is_validation(doc_id, val_percent) else "train"
            docs[(src.domain, split)].append(text)
            counts[split][0] += 1
            counts[split][1] += len(text)
        sources.append({
            "name": src.name, "domain": src.domain, "license": lic, "origin": origin,
            **{f"{s}_{k}": counts[s][i] for s in counts for i, k in enumerate(("docs", "chars"))},
        })
    domains = {}
    for d in DOMAINS:
        domains[d] = {}
        for s in ("train", "val"):
            path = out / f"{d}.{s}.txt"
            path.write_text(f"\n{EOS_SEPARATOR}\n".join(docs[(d, s)]), "utf-8")
            domains[d][s] = {"file": path.name, "docs": len(docs[(d, s)]),
                             "chars": sum(len(t) for t in docs[(d, s)])}
    manifest = {"eos_separator": EOS_SEPARATOR, "val_percent": val_percent, "split": "sha256(doc_id)",
                "sources": sources, "domains": domains}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False), "utf-8")
    return manifest


def read_documents(path: Path) -> list[str]:
    """Documents of one <domain>.<split>.txt file."""
    return path.read_text("utf-8").split(f"\n{EOS_SEPARATOR}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--val-percent", type=float, default=5.0)
    args = ap.parse_args()
    m = build(args.out, args.val_percent)
    for s in m["sources"]:
        print(f"{s['name']:22s} {s['domain']}  {s['license']:15s} train {s['train_chars']:>10,} chars"
              f" / {s['train_docs']:>6,} docs   val {s['val_chars']:>9,} chars / {s['val_docs']:>5,} docs")


if __name__ == "__main__":
    main()
