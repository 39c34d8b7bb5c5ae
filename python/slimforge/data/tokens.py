"""Token files: a corpus as one flat array of token ids on disk, memory-mapped for training.

A token file is ``NAME.bin`` (the ids, little-endian ``uint8``, ``uint16`` or ``uint32``, the
smallest that holds the vocabulary) and ``NAME.json`` beside it::

    {"format": "slimforge-tokens", "version": 1, "dtype": "uint16", "count": 123456,
     "vocab_size": 49152, "tokenizer": "smollm2", "documents": 321}

(nanoGPT's ``prepare.py`` layout plus the sidecar). Corpora larger than memory train from it:
:class:`TokenFile` maps the file and :func:`slimforge.data.windows.random_windows` reads only
the windows it draws. Files are written atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TOKEN_DTYPES", "TokenFile", "TokenWriter", "token_dtype"]

FORMAT = "slimforge-tokens"
VERSION = 1
#: Storage types by name, smallest first.
TOKEN_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32}


def _stored(name: str) -> np.dtype:
    """The on-disk (little-endian) dtype of a storage type name."""
    return np.dtype(TOKEN_DTYPES[name]).newbyteorder("<")


def token_dtype(vocab_size: int) -> str:
    """The smallest storage type that holds ids ``0 .. vocab_size - 1``."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size must be in 1..2**32, got {vocab_size}")
    for name, dt in TOKEN_DTYPES.items():
        if vocab_size - 1 <= np.iinfo(dt).max:
            return name
    raise AssertionError("unreachable")


def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    stem = p.with_suffix("") if p.suffix in (".bin", ".json") else p
    return stem.with_suffix(".bin"), stem.with_suffix(".json")


class TokenWriter:
    """Appends token ids to a new token file; ``close()`` (or the ``with`` block) renames it into
    place, a failure leaves nothing behind. Memory use is the chunk being written.

        with TokenWriter("data/train", vocab_size=256, tokenizer="byte") as w:
            for doc in docs:
                w.write(np.frombuffer(doc.encode(), np.uint8))
    """

    def __init__(self, path: str | os.PathLike[str], vocab_size: int, **meta: Any) -> None:
        self.bin_path, self.json_path = _paths(path)
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = int(vocab_size)
        self.meta = dict(meta)
        self.count = 0
        self.documents = 0
        self._tmp = self.bin_path.with_name(f".{self.bin_path.name}.{os.getpid()}.tmp")
        self._f = open(self._tmp, "wb")  # noqa: SIM115 (closed in close/abort)

    def write(self, ids: np.ndarray | Iterable[int]) -> None:
        """Appends one document's ids (checked against the vocabulary)."""
        a = np.asarray(ids)
        if a.ndim != 1:
            raise ValueError(f"ids must be 1-D, got shape {a.shape}")
        if a.size:
            if not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"ids must be integers, got {a.dtype}")
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"ids must lie in [0, {self.vocab_size}), got [{lo}, {hi}]")
            self._f.write(a.astype(_stored(self.dtype)).tobytes())
            self.count += a.size
        self.documents += 1

    def close(self) -> None:
        """Flushes the ids and the sidecar, then renames both into place."""
        from slimforge.io import atomic_path

        if self._f.closed:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": self.dtype,
            "count": self.count,
            "vocab_size": self.vocab_size,
            "documents": self.documents,
            **self.meta,
        }
        os.replace(self._tmp, self.bin_path)
        with atomic_path(self.json_path) as tmp:
            tmp.write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")

    def abort(self) -> None:
        """Drops what was written."""
        if not self._f.closed:
            self._f.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> TokenWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class TokenFile:
    """A token file, memory-mapped read-only. ``tokens`` is the NumPy memmap (1-D);
    ``len(f)`` its length; ``meta`` the sidecar."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.bin_path, self.json_path = _paths(path)
        if not self.json_path.is_file() or not self.bin_path.is_file():
            raise FileNotFoundError(f"{self.bin_path} / {self.json_path}: not a token file")
        try:
            meta = json.loads(self.json_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.json_path}: not valid JSON ({e})") from e
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise ValueError(f"{self.json_path} is not a {FORMAT} sidecar")
        if meta.get("version") != VERSION:
            raise ValueError(
                f"{self.json_path}: version {meta.get('version')!r}, expected {VERSION}"
            )
        dtype = TOKEN_DTYPES.get(meta.get("dtype", ""))
        count = meta.get("count")
        if dtype is None or not isinstance(count, int) or count < 0:
            raise ValueError(f"{self.json_path}: bad dtype or count")
        size = self.bin_path.stat().st_size
        if size != count * np.dtype(dtype).itemsize:
            raise ValueError(
                f"{self.bin_path} holds {size} bytes, the sidecar says {count} x {dtype.__name__}"
            )
        self.meta = meta
        self.vocab_size = int(meta.get("vocab_size", np.iinfo(dtype).max + 1))
        self.tokens = (
            np.memmap(self.bin_path, dtype=_stored(meta["dtype"]), mode="r")
            if count
            else np.zeros(0, dtype)
        )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return f"TokenFile({str(self.bin_path)!r}, {len(self):,} tokens, {self.meta['dtype']})"
