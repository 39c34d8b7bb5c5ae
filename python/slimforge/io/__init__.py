"""Streaming readers and atomic writers for JSONL (plain or gzip) and Parquet document files.

`iter_batches` yields `DocBatch`es (texts, line or row numbers, rejects) read and parsed in
Rust for JSONL and by pyarrow for Parquet, so no Python code runs per document; `iter_records`
is the per-document convenience view of the same. Malformed lines are reported with their
location and either raise or are handed back as rejects, so nothing is lost silently. Writers
write to a temporary file beside the target and rename it into place only when everything was
written.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from slimforge import _native

__all__ = [
    "DocBatch",
    "InputError",
    "Record",
    "Reject",
    "atomic_path",
    "detect_format",
    "iter_batches",
    "iter_records",
    "open_writer",
]

FORMATS = ("jsonl", "jsonl.gz", "parquet")


class InputError(ValueError):
    """A malformed input record, with the file and line (or row) where it was found."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@dataclass(frozen=True)
class Record:
    """One input document: its source, 1-based line (JSONL) or 0-based row (Parquet), text and
    the raw line bytes (JSONL only, so that output reproduces the input exactly)."""

    path: Path
    line: int
    text: str
    raw: bytes | None
    row: dict[str, Any] | None = None


@dataclass(frozen=True)
class Reject:
    """A line that could not be read as a document, and why."""

    path: Path
    line: int
    reason: str
    raw: bytes


@dataclass
class DocBatch:
    """Consecutive documents of one file.

    ``texts``: list of the documents' texts (UTF-8 ``bytes`` for JSONL, ``str`` for Parquet),
    ``lines``: ``(len(texts),)`` int64, 1-based line (JSONL) or 0-based row (Parquet) numbers;
    ``rejects``: the malformed lines met in this stretch; ``text_bytes``: total UTF-8 bytes of
    the texts; ``empty``: texts that are empty or whitespace; ``raws``: each document's raw line
    (JSONL read with ``with_raw=True``) else None.
    """

    path: Path
    texts: list[Any]
    lines: NDArray[np.int64]
    rejects: list[Reject]
    text_bytes: int
    empty: int
    raws: list[bytes] | None = None


def detect_format(path: str | os.PathLike[str]) -> str:
    """`jsonl`, `jsonl.gz` or `parquet`, from the file name."""
    name = Path(path).name.lower()
    if name.endswith((".jsonl.gz", ".json.gz", ".ndjson.gz")):
        return "jsonl.gz"
    if name.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    raise ValueError(f"{path}: unknown format; expected a .jsonl, .jsonl.gz or .parquet file name")


def iter_batches(
    path: str | os.PathLike[str],
    field: str = "text",
    on_error: str = "fail",
    batch_size: int = 8192,
    with_raw: bool = False,
) -> Iterator[DocBatch]:
    """Yield the documents of `path` in `DocBatch`es of up to `batch_size` lines (rows).

    `on_error="fail"` raises `InputError` (``path:line: reason``) at the first malformed line
    (invalid UTF-8, invalid JSON, not an object, missing or non-string `field`); `"skip"`
    hands such lines back in ``DocBatch.rejects``. Blank JSONL lines are skipped. JSONL is read
    and parsed in Rust (in parallel, without the GIL).
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input file not found: {p}")
    if detect_format(p) == "parquet":
        yield from _parquet_batches(p, field, on_error, batch_size)
        return
    reader = _native.JsonlBatchReader(
        os.fspath(p), field, batch_size, stop_at_reject=on_error == "fail", with_raw=with_raw
    )
    while (b := reader.next_batch()) is not None:
        texts, lines, rejects, text_bytes, empty, raws = b
        if rejects and on_error == "fail":
            # The reader stopped at the first reject: hand back the documents before it.
            if texts:
                yield DocBatch(p, texts, lines, [], text_bytes, empty, raws)
            line, reason, _ = rejects[0]
            raise InputError(p, line, reason)
        yield DocBatch(
            p,
            texts,
            lines,
            [Reject(p, line, reason, raw) for line, reason, raw in rejects],
            text_bytes,
            empty,
            raws,
        )


def iter_records(
    path: str | os.PathLike[str], field: str = "text", on_error: str = "fail"
) -> Iterator[Record | Reject]:
    """Yield each document of `path` in order (a per-document view of `iter_batches`).

    `on_error="fail"` raises `InputError` at the first malformed line (invalid JSON, invalid
    UTF-8, not an object, missing or non-string `field`); `on_error="skip"` yields a `Reject`
    for it instead and goes on.
    """
    p = Path(path)
    if p.exists() and detect_format(p) == "parquet":
        if on_error not in ("fail", "skip"):
            raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
        yield from _iter_parquet(p, field, on_error)
        return
    for batch in iter_batches(p, field, on_error, with_raw=True):
        assert batch.raws is not None
        docs = zip(batch.lines.tolist(), batch.texts, batch.raws, strict=True)
        rejects = iter(batch.rejects)
        nxt = next(rejects, None)
        for line, text, raw in docs:
            while nxt is not None and nxt.line < line:
                yield nxt
                nxt = next(rejects, None)
            yield Record(p, line, text.decode("utf-8"), raw)
        if nxt is not None:
            yield nxt
        yield from rejects


def _parquet_batches(p: Path, field: str, on_error: str, batch_size: int) -> Iterator[DocBatch]:
    import pyarrow as pa
    import pyarrow.compute as pc

    pf = _parquet_file(p, field)
    row = 0
    for batch in pf.iter_batches(batch_size=batch_size):
        col = batch.column(field)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            valid = col.is_valid().to_numpy(zero_copy_only=False)
            good = col.filter(col.is_valid())
        else:
            valid = np.zeros(len(batch), dtype=bool)
            good = pa.array([], type=pa.string())
        bad = np.flatnonzero(~valid)
        rejects = []
        for j in bad.tolist():  # only malformed rows reach Python one by one
            rec = batch.slice(j, 1).to_pylist()[0]
            reason = f"column {field!r} is {type(rec.get(field)).__name__}, expected a string"
            if on_error == "fail":
                raise InputError(p, row + j, reason)
            rejects.append(Reject(p, row + j, reason, json.dumps(rec, default=str).encode()))
        lines = np.flatnonzero(valid).astype(np.int64) + row
        text_bytes = int(pc.sum(pc.binary_length(good)).as_py() or 0)
        empty = int(pc.sum(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(good)), 0)).as_py() or 0)
        yield DocBatch(p, good.to_pylist(), lines, rejects, text_bytes, empty)
        row += len(batch)


def _parquet_file(p: Path, field: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading Parquet needs pyarrow: pip install 'slimforge[parquet]'") from e
    pf = pq.ParquetFile(p)
    if field not in pf.schema_arrow.names:
        raise InputError(p, 0, f"missing column {field!r} (columns: {pf.schema_arrow.names})")
    return pf


def _iter_parquet(p: Path, field: str, on_error: str) -> Iterator[Record | Reject]:
    pf = _parquet_file(p, field)
    row = 0
    for batch in pf.iter_batches(batch_size=8192):
        for rec in batch.to_pylist():
            text = rec.get(field)
            if not isinstance(text, str):
                reason = f"column {field!r} is {type(text).__name__}, expected a string"
                if on_error == "fail":
                    raise InputError(p, row, reason)
                yield Reject(p, row, reason, json.dumps(rec, default=str).encode())
            else:
                yield Record(p, row, text, None, rec)
            row += 1


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `target`, renamed onto it only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


class _JsonlWriter:
    def __init__(self, path: Path, gz: bool) -> None:
        self._f: IO[bytes] = gzip.open(path, "wb") if gz else path.open("wb")

    def write(self, rec: Record) -> None:
        raw = rec.raw if rec.raw is not None else json.dumps(rec.row, default=str).encode()
        self._f.write(raw if raw.endswith(b"\n") else raw + b"\n")

    def close(self) -> None:
        self._f.close()


class _ParquetWriter:
    def __init__(self, path: Path, field: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa, self._pq = pa, pq
        self._path, self._field = path, field
        self._rows: list[dict[str, Any]] = []
        self._writer: Any = None

    def write(self, rec: Record) -> None:
        row = rec.row if rec.row is not None else json.loads(rec.raw or b"{}")
        self._rows.append(row)
        if len(self._rows) >= 8192:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        table = self._pa.Table.from_pylist(self._rows)
        if self._writer is None:
            self._writer = self._pq.ParquetWriter(self._path, table.schema)
        self._writer.write_table(table.cast(self._writer.schema))
        self._rows = []

    def close(self) -> None:
        self._flush()
        if self._writer is None:
            schema = self._pa.schema([(self._field, self._pa.string())])
            self._pq.write_table(self._pa.Table.from_pylist([], schema=schema), self._path)
        else:
            self._writer.close()


def open_writer(path: Path, fmt: str, field: str = "text") -> _JsonlWriter | _ParquetWriter:
    """A writer of `Record`s to `path` in format `fmt` (see `detect_format`)."""
    if fmt == "parquet":
        return _ParquetWriter(path, field)
    return _JsonlWriter(path, gz=fmt == "jsonl.gz")
