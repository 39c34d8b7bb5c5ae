"""Streaming readers and atomic writers for JSONL (plain or gzip) and Parquet document files.

Readers yield `Record`s in file order with their line (or row) number and never load a whole
file; malformed lines are reported with their location and either raise or are handed back as
rejects, so nothing is lost silently. Writers write to a temporary file beside the target and
rename it into place only when everything was written.
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

__all__ = [
    "InputError",
    "Record",
    "Reject",
    "atomic_path",
    "detect_format",
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


def _open_lines(path: Path) -> IO[bytes]:
    if detect_format(path) == "jsonl.gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def iter_records(
    path: str | os.PathLike[str], field: str = "text", on_error: str = "fail"
) -> Iterator[Record | Reject]:
    """Yield each document of `path` in order.

    `on_error="fail"` raises `InputError` at the first malformed line (invalid JSON, invalid
    UTF-8, not an object, missing or non-string `field`); `on_error="skip"` yields a `Reject`
    for it instead and goes on.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input file not found: {p}")
    fmt = detect_format(p)
    if fmt == "parquet":
        yield from _iter_parquet(p, field, on_error)
        return
    with _open_lines(p) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            reason = None
            text = None
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                reason = f"invalid UTF-8 at byte {e.start}"
            except json.JSONDecodeError as e:
                reason = f"invalid JSON ({e.msg} at column {e.colno})"
            else:
                if not isinstance(obj, dict):
                    reason = f"expected a JSON object, got {type(obj).__name__}"
                elif field not in obj:
                    reason = f"missing field {field!r}"
                elif not isinstance(obj[field], str):
                    reason = f"field {field!r} is {type(obj[field]).__name__}, expected a string"
                else:
                    text = obj[field]
            if reason is not None:
                if on_error == "fail":
                    raise InputError(p, lineno, reason)
                yield Reject(p, lineno, reason, raw)
                continue
            assert text is not None
            yield Record(p, lineno, text, raw)


def _iter_parquet(p: Path, field: str, on_error: str) -> Iterator[Record | Reject]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading Parquet needs pyarrow: pip install 'slimforge[parquet]'") from e
    pf = pq.ParquetFile(p)
    if field not in pf.schema_arrow.names:
        raise InputError(p, 0, f"missing column {field!r} (columns: {pf.schema_arrow.names})")
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
