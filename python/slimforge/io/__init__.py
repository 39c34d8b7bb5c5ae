"""Streaming readers and atomic writers for JSONL (plain or gzip) and Parquet document files.

`iter_batches` yields `DocBatch`es (texts, line or row numbers, rejects) read and parsed in
Rust for JSONL and by pyarrow for Parquet, so no Python code runs per document; `iter_records`
is the per-document convenience view of the same. Malformed lines are reported with their
location and either raise or are handed back as rejects, so nothing is lost silently. Writers
write to a temporary file beside the target and rename it into place only when everything was
written.

What the readers guarantee, on any input bytes: documents, or a Python exception, never a
crash or a hang, with memory bounded by the parameters:

* a malformed JSONL line is an `InputError` (a `ValueError`, ``path:line: reason``) or, with
  ``on_error="skip"``, a `Reject`;
* a JSONL line longer than `max_line_bytes` (default `DEFAULT_MAX_LINE_BYTES`, 64 MiB, not
  counting its newline; at most `MAX_LINE_BYTES_LIMIT`) is an `InputError` at that line in
  either mode; it is detected while the line is read, so no more than `max_line_bytes` of it
  is ever held in memory;
* unreadable, truncated or corrupt gzip is an `OSError` (``path: reason (while reading line
  N)``); an empty ``.gz`` file is an empty file and zero bytes after the last gzip member
  (padding, as `gzip -t` accepts) are ignored;
* a file that is not Parquet, or corrupt Parquet, is an `InputError` (or an `OSError` where
  pyarrow reports an I/O error); Parquet values are not size-capped (pyarrow reads whole
  column chunks);
* bad arguments are `ValueError` (out of range) or `TypeError` (wrong type).

Temporary files carry the owner's host and process id (``.NAME.slimforge-tmp-HOST-PID-XXXX.tmp``)
so that `remove_stale_temps` can delete those a killed process left behind.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from slimforge import _native
from slimforge._optional import require

__all__ = [
    "DEFAULT_MAX_LINE_BYTES",
    "MAX_BATCH_SIZE",
    "MAX_LINE_BYTES_LIMIT",
    "DocBatch",
    "InputError",
    "Record",
    "Reject",
    "atomic_path",
    "detect_format",
    "iter_batches",
    "iter_records",
    "open_writer",
    "owner_is_dead",
    "owner_tag",
    "remove_stale_temps",
]

FORMATS = ("jsonl", "jsonl.gz", "parquet")

#: Longest JSONL line read by default, in bytes without the newline (``--max-line-mb 64``).
#: The Rust reader's default is the same (``rust/dedup/jsonl.rs``, ``DEFAULT_MAX_LINE_BYTES``).
DEFAULT_MAX_LINE_BYTES = 64 << 20
#: Largest `max_line_bytes` accepted (16 GiB): a line must fit in memory, as bytes, twice.
MAX_LINE_BYTES_LIMIT = 1 << 34
#: Largest `batch_size` (lines or rows per batch).
MAX_BATCH_SIZE = 1 << 20


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}")
    return int(value)


def _check_on_error(on_error: str) -> str:
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    return on_error


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
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[DocBatch]:
    """Yield the documents of `path` in `DocBatch`es of up to `batch_size` lines (rows).

    `on_error="fail"` raises `InputError` (``path:line: reason``) at the first malformed line
    (invalid UTF-8, invalid JSON, not an object, missing or non-string `field`); `"skip"`
    hands such lines back in ``DocBatch.rejects``. Blank JSONL lines are skipped. JSONL is read
    and parsed in Rust (in parallel, without the GIL). A JSONL line of more than
    `max_line_bytes` bytes (newline not counted) raises `InputError` at that line whatever
    `on_error` says, after the documents before it; at most that much of it is read into
    memory. `batch_size` lies in [1, `MAX_BATCH_SIZE`], `max_line_bytes` in
    [1, `MAX_LINE_BYTES_LIMIT`]. See the module docstring for what each failure raises.
    """
    _check_on_error(on_error)
    batch_size = _check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    max_line_bytes = _check_int("max_line_bytes", max_line_bytes, 1, MAX_LINE_BYTES_LIMIT)
    if not isinstance(field, str):
        raise TypeError(f"field must be a str, got {type(field).__name__}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input file not found: {p}")
    if detect_format(p) == "parquet":
        yield from _parquet_batches(p, field, on_error, batch_size)
        return
    reader = _native.JsonlBatchReader(
        os.fspath(p),
        field,
        batch_size,
        stop_at_reject=on_error == "fail",
        with_raw=with_raw,
        max_line_bytes=max_line_bytes,
    )
    while (b := reader.next_batch()) is not None:
        texts, lines, rejects, text_bytes, empty, raws, stopped = b
        if rejects and on_error == "fail":
            # The reader stopped at the first reject: hand back the documents before it.
            if texts:
                yield DocBatch(p, texts, lines, [], text_bytes, empty, raws)
            line, reason, _ = rejects[0]
            raise InputError(p, line, reason)
        if texts or rejects:
            yield DocBatch(
                p,
                texts,
                lines,
                [Reject(p, line, reason, raw) for line, reason, raw in rejects],
                text_bytes,
                empty,
                raws,
            )
        if stopped is not None:
            raise InputError(p, stopped[0], stopped[1])


def iter_records(
    path: str | os.PathLike[str],
    field: str = "text",
    on_error: str = "fail",
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> Iterator[Record | Reject]:
    """Yield each document of `path` in order (a per-document view of `iter_batches`).

    `on_error="fail"` raises `InputError` at the first malformed line (invalid JSON, invalid
    UTF-8, not an object, missing or non-string `field`); `on_error="skip"` yields a `Reject`
    for it instead and goes on. A JSONL line over `max_line_bytes` raises `InputError`.
    """
    p = Path(path)
    if p.exists() and detect_format(p) == "parquet":
        _check_on_error(on_error)
        yield from _iter_parquet(p, field, on_error)
        return
    for batch in iter_batches(p, field, on_error, with_raw=True, max_line_bytes=max_line_bytes):
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


@contextlib.contextmanager
def _parquet_errors(p: Path, where: list[int]) -> Iterator[None]:
    """pyarrow's errors on a bad Parquet file as `InputError` at row ``where[0]`` (its I/O
    errors stay `OSError`, memory errors `MemoryError`)."""
    require("pyarrow", "Parquet files")
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, UnicodeDecodeError) as e:
        if isinstance(e, OSError | MemoryError):
            raise
        raise InputError(p, where[0], f"invalid Parquet data ({type(e).__name__}: {e})") from e


def _parquet_batches(p: Path, field: str, on_error: str, batch_size: int) -> Iterator[DocBatch]:
    pf = _parquet_file(p, field)
    row = 0
    where = [0]
    batches = pf.iter_batches(batch_size=batch_size)
    while True:
        where[0] = row
        with _parquet_errors(p, where):
            batch = next(batches, None)
            if batch is None:
                return
            doc_batch = _parquet_doc_batch(p, field, on_error, batch, row)
        yield doc_batch
        row += batch.num_rows


def _parquet_doc_batch(p: Path, field: str, on_error: str, batch: Any, row: int) -> DocBatch:
    require("pyarrow", "Parquet files")
    import pyarrow as pa
    import pyarrow.compute as pc

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
    return DocBatch(p, good.to_pylist(), lines, rejects, text_bytes, empty)


def _parquet_file(p: Path, field: str) -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading Parquet needs pyarrow: pip install 'slimforge[parquet]'") from e
    with _parquet_errors(p, [0]):
        pf = pq.ParquetFile(p)
        names = pf.schema_arrow.names
    if field not in names:
        raise InputError(p, 0, f"missing column {field!r} (columns: {names})")
    return pf


def _iter_parquet(p: Path, field: str, on_error: str) -> Iterator[Record | Reject]:
    pf = _parquet_file(p, field)
    row = 0
    where = [0]
    batches = pf.iter_batches(batch_size=8192)
    while True:
        where[0] = row
        with _parquet_errors(p, where):
            batch = next(batches, None)
            recs = batch.to_pylist() if batch is not None else None
        if recs is None:
            return
        for rec in recs:
            text = rec.get(field)
            if not isinstance(text, str):
                reason = f"column {field!r} is {type(text).__name__}, expected a string"
                if on_error == "fail":
                    raise InputError(p, row, reason)
                yield Reject(p, row, reason, json.dumps(rec, default=str).encode())
            else:
                yield Record(p, row, text, None, rec)
            row += 1


#: This host's name as it appears in temporary names (only ``[A-Za-z0-9_]``).
_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"
_TEMP_TAG = ".slimforge-tmp-"
_TEMP_NAME = re.compile(r"\..*\.slimforge-tmp-([A-Za-z0-9_]+)-([0-9]+)-[A-Za-z0-9_]+\.tmp", re.S)


def owner_tag() -> str:
    """``HOST-PID`` of this process, as temporary and work names carry it."""
    return f"{_HOST}-{os.getpid()}"


def owner_is_dead(host: str, pid: int) -> bool:
    """Whether the process that made a ``HOST-PID``-tagged name is certainly gone: it ran on
    this host (by name) and no process `pid` exists. Unknown means alive."""
    if host != _HOST or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # PermissionError: alive, someone else's
        return False
    return False


def remove_stale_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of `atomic_path` in `directory` whose owner is dead (see
    `owner_is_dead`); returns them. Other files, and temporaries of live or other-host
    processes, are left alone; errors (a race with another cleaner) are ignored."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.fullmatch(entry.name)
        if m is None or not owner_is_dead(m.group(1), int(m.group(2))):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
    return removed


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside `target`, renamed onto it only if the block succeeds.

    The temporary file is ``.NAME.slimforge-tmp-HOST-PID-XXXXXXXX.tmp`` (see
    `remove_stale_temps`); before the rename it gets the mode a new file would get
    (``0o666 & ~umask``), not `tempfile`'s private 0600.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}{_TEMP_TAG}{owner_tag()}-", suffix=".tmp", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
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
    """Rows to Parquet, 8,192 at a time. The first rows fix the schema; a later row whose field
    has another type (or a field the schema lacks) raises `InputError` at that row's source
    ``file:line`` naming the field."""

    def __init__(self, path: Path, field: str) -> None:
        require("pyarrow", "Parquet files")
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa, self._pq = pa, pq
        self._path, self._field = path, field
        self._rows: list[dict[str, Any]] = []
        self._where: list[tuple[Path, int]] = []
        self._writer: Any = None

    def write(self, rec: Record) -> None:
        row = rec.row if rec.row is not None else json.loads(rec.raw or b"{}")
        self._rows.append(row)
        self._where.append((rec.path, rec.line))
        if len(self._rows) >= 8192:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        pa = self._pa
        try:
            # Every field of every row, in order of first appearance (`from_pylist` would take
            # the first row's fields and silently drop the others).
            names = dict.fromkeys(k for r in self._rows for k in r)
            table = pa.Table.from_pydict({k: [r.get(k) for r in self._rows] for k in names})
            if self._writer is not None:
                schema = self._writer.schema
                if not set(table.column_names) <= set(schema.names):
                    raise ValueError("a field is not in the schema")
                # Same columns in the schema's order; a field no row of this batch has is null.
                cols = [
                    table.column(n) if n in table.column_names else pa.nulls(table.num_rows)
                    for n in schema.names
                ]
                table = pa.Table.from_arrays(cols, names=schema.names).cast(schema)
        except (pa.ArrowException, ValueError, TypeError) as e:
            if isinstance(e, OSError | MemoryError):
                raise
            raise self._locate(e) from e
        try:
            if self._writer is None:
                self._writer = self._pq.ParquetWriter(self._path, table.schema)
            self._writer.write_table(table)
        except pa.ArrowException as e:  # a type Parquet cannot store, e.g. an empty struct
            if isinstance(e, OSError | MemoryError):
                raise
            path, line = self._where[0]
            raise InputError(
                path, line, f"these rows cannot be written as Parquet ({type(e).__name__}: {e})"
            ) from e
        self._rows, self._where = [], []

    def _locate(self, e: Exception) -> Exception:
        """The first buffered row that cannot join its column, as an `InputError`."""
        pa = self._pa
        schema = self._writer.schema if self._writer is not None else None
        names: dict[str, int] = {}  # field -> first row with it
        for i, r in enumerate(self._rows):
            for k in r if isinstance(r, dict) else ():
                names.setdefault(k, i)
        if schema is not None:
            for k, i in names.items():
                if k not in schema.names:
                    path, line = self._where[i]
                    return InputError(
                        path,
                        line,
                        f"field {k!r} is not in the Parquet schema set by the first rows "
                        f"({', '.join(schema.names)}); every row needs the same fields",
                    )
        for k in names:
            values = [r.get(k) if isinstance(r, dict) else None for r in self._rows]
            want = schema.field(k).type if schema is not None and k in schema.names else None

            def fails(m: int, values: list[Any] = values, want: Any = want) -> bool:
                try:
                    pa.array(values[:m], type=want)
                except (pa.ArrowException, ValueError, TypeError, OverflowError):
                    return True
                return False

            if not fails(len(values)):
                continue
            lo, hi = 1, len(values)  # the shortest failing prefix ends at the bad row
            while lo < hi:
                mid = (lo + hi) // 2
                if fails(mid):
                    hi = mid
                else:
                    lo = mid + 1
            i = lo - 1
            path, line = self._where[i]
            if want is None and i == 0:
                return InputError(
                    path, line, f"field {k!r} ({values[i]!r:.40}) cannot be stored in Parquet ({e})"
                )
            before = str(want) if want is not None else str(pa.array(values[:i]).type)
            return InputError(
                path,
                line,
                f"field {k!r} is {type(values[i]).__name__} ({values[i]!r:.40}) here but "
                f"{before} in earlier rows: a Parquet column holds one type ({e})",
            )
        return ValueError(f"{self._path}: cannot write the rows as Parquet: {e}")

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
