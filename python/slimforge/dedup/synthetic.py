"""A near-duplicate corpus with known structure, for measuring deduplication.

Real documents (paragraphs of the Python standard library's sources and of the licences in
``/usr/share/common-licenses``, present on every Debian-like system) plus deterministic edited
copies of half of them (word deletions, insertions and substitutions at rates from 0.2 % to
12 %), shuffled. Ground truth comes from exact Jaccard on the result (e.g. ``exact_jaccard_pairs``),
so recall and precision of an engine can be measured without labelled data.
"""

from __future__ import annotations

import glob
import random
import re
import sysconfig
from pathlib import Path

__all__ = ["edit_words", "local_documents", "near_duplicate_corpus"]

_EDIT_RATES = (0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12)


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def local_documents(max_docs: int = 100_000) -> list[str]:
    """Real documents from this machine: paragraphs of the standard library sources and of the
    common licences, grouped into pieces of 80-400 words; ASCII only (so every tokeniser,
    Python or Rust, splits them alike). Deterministic for a given Python and OS."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(glob.glob(str(stdlib / "*.py"))) + sorted(
        glob.glob("/usr/share/common-licenses/*")
    )
    docs: list[str] = []
    for path in files:
        text = _read(path)
        if text is None or not text.isascii():
            continue
        piece: list[str] = []
        words = 0
        for para in re.split(r"\n\s*\n", text):
            piece.append(para)
            words += len(para.split())
            if words >= 80:
                if words <= 400:
                    docs.append("\n\n".join(piece))
                piece, words = [], 0
        if len(docs) >= max_docs:
            break
    return docs[:max_docs]


def edit_words(text: str, rate: float, rng: random.Random, vocab: list[str]) -> str:
    """``text`` with each word deleted, replaced or followed by an inserted word, each with
    probability ``rate / 3`` (words from ``vocab``, choices from ``rng``)."""
    out: list[str] = []
    for w in text.split():
        u = rng.random()
        if u < rate / 3:
            continue
        if u < 2 * rate / 3:
            out.append(rng.choice(vocab))
        elif u < rate:
            out.extend([w, rng.choice(vocab)])
        else:
            out.append(w)
    return " ".join(out)


def near_duplicate_corpus(n_base: int, seed: int) -> list[str]:
    """``n_base`` of :func:`local_documents` plus 1-3 edited copies of the first half of them,
    shuffled with ``seed``."""
    rng = random.Random(seed)
    base = local_documents()
    rng.shuffle(base)
    base = base[:n_base]
    vocab = sorted({w for d in base[:50] for w in d.split()})
    docs = list(base)
    for i, d in enumerate(base[: n_base // 2]):
        for _ in range(1 + i % 3):
            docs.append(edit_words(d, rng.choice(_EDIT_RATES), rng, vocab))
    rng.shuffle(docs)
    return docs
