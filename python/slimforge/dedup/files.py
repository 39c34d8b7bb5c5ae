"""Streaming deduplication of document files (JSONL, gzip JSONL, Parquet).

The job runs as the stages of `slimforge.dedup.stages`, one shard per input file, with memory
per unit bounded by the shard, the batch size and `memory_mb`, not by the corpus (two single
units hold a few tens of bytes per document):

1. each shard is read in batches; Rust computes MinHash signatures, band hashes and exact-text
   hashes, written to the run folder (band hashes grouped by band key);
2. exact duplicates are grouped by hash; each band-key partition's buckets are built and their
   candidate pairs verified (estimated Jaccard from the signatures, or exact Jaccard of
   shingle sets);
3. the exact and verified pairs are clustered with union-find;
4. each shard is read again and its kept documents written, with its clusters rows; the
   shards' outputs are joined into temporary files that are renamed into place at the end.
   Inputs are never modified.

The local engine runs the stages in this process, the Ray engine as tasks on a cluster, with
the same outputs (`slimforge.dedup.engines`, docs/scale-out.md).

JSONL is read, parsed and (stage 4) copied byte for byte in Rust, and Parquet is filtered with
pyarrow, so Python only handles batches. Documents may also be checked against `LSHIndex` files
of earlier shards (`against`), and the kept documents' signatures saved as one (`save_index`).

Safety: every file the job writes (output, clusters TSV, rejects file, saved index) must differ
from every input and `against` index and from each other (compared after resolving symlinks
and ``..``, and by device and inode when both exist), or nothing is written. The work directory
(``.slimforge-dedup-HOST-PID-XXXXXXXX``) and temporary files (``.NAME.slimforge-tmp-HOST-PID-
XXXXXXXX.tmp``) name the process that made them; a run first deletes those in its work and
output directories whose process is gone (same host, no such PID), which a killed run leaves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from slimforge import _native
from slimforge import dedup as _dd
from slimforge._optional import require
from slimforge.dedup import stages as _stages
from slimforge.dedup.engines import make_engine
from slimforge.io import (
    DEFAULT_MAX_LINE_BYTES,
    MAX_BATCH_SIZE,
    MAX_LINE_BYTES_LIMIT,
    Record,
    atomic_path,
    detect_format,
    iter_records,
    open_writer,
    owner_is_dead,
    owner_tag,
    remove_stale_temps,
)

__all__ = ["FileDedupReport", "dedup_files", "escape_tsv_field", "unescape_tsv_field"]

log = logging.getLogger(__name__)

#: Most signature values one batch may hold (``batch_size * num_perm``; 1 GiB of uint32).
MAX_BATCH_VALUES = 1 << 28
#: Range of `memory_mb` (the candidate stage's budget).
MIN_MEMORY_MB, MAX_MEMORY_MB = 16, 1 << 24

_WORK_PREFIX = ".slimforge-dedup-"
_WORK_NAME = re.compile(r"\.slimforge-dedup-([A-Za-z0-9_]+)-([0-9]+)-[A-Za-z0-9_]+")

# --- the clusters TSV's file column -------------------------------------------------------

_TSV_SPECIAL = re.compile(r"[\\\x00-\x1f\x7f\x85\u2028\u2029\ud800-\udfff]")
_TSV_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_TSV_ESCAPE = re.compile(r"\\(?:(\\)|([tnr])|x([0-9a-f]{2})|u([0-9a-f]{4}))")


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _TSV_NAMED:
        return _TSV_NAMED[ch]
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    return f"\\x{o:02x}" if o < 0x80 else f"\\u{o:04x}"


def escape_tsv_field(value: str) -> str:
    """`value` as the clusters TSV writes it: backslash, tab, newline and carriage return as
    ``\\\\``, ``\\t``, ``\\n``, ``\\r``; other ASCII control characters as ``\\xNN``; U+0085,
    U+2028, U+2029 and lone surrogates as ``\\uXXXX``; bytes of a file name that are not UTF-8
    (``os.fsdecode``'s U+DC80..U+DCFF) as ``\\xNN`` with NN >= 80. So a row is one line with
    five tab-separated fields whatever the file names hold. `unescape_tsv_field` undoes it."""
    return _TSV_SPECIAL.sub(_escape_char, value)


def _unescape_match(m: re.Match[str]) -> str:
    if m.group(1):
        return "\\"
    if m.group(2):
        return {"t": "\t", "n": "\n", "r": "\r"}[m.group(2)]
    if m.group(3):
        o = int(m.group(3), 16)
        return chr(o) if o < 0x80 else chr(0xDC00 + o)
    return chr(int(m.group(4), 16))


def unescape_tsv_field(value: str) -> str:
    """The file name a clusters-TSV field stands for (``os.fsencode`` gives its bytes)."""
    return _TSV_ESCAPE.sub(_unescape_match, value)


@dataclass
class FileDedupReport:
    """What `dedup_files` did. Counts are documents unless named otherwise."""

    documents: int
    kept: int
    exact_duplicates: int
    near_duplicates: int
    external_duplicates: int
    clusters: int
    rejected: int
    empty: int
    input_bytes: int
    bands: int
    rows: int
    seconds: float
    output: str
    clusters_path: str
    rejects_path: str | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        mb = self.input_bytes / 1e6
        rate = mb / self.seconds if self.seconds > 0 else float("inf")
        lines = [
            f"documents       {self.documents:>10,}",
            f"kept            {self.kept:>10,}",
            f"exact dups      {self.exact_duplicates:>10,}",
            f"near dups       {self.near_duplicates:>10,}",
            f"external dups   {self.external_duplicates:>10,}",
            f"dup clusters    {self.clusters:>10,}",
            f"empty docs      {self.empty:>10,}",
            f"rejected lines  {self.rejected:>10,}",
            f"LSH             {self.bands} bands x {self.rows} rows",
            f"time            {self.seconds:>10.2f} s  ({mb:.1f} MB of text, {rate:.1f} MB/s)",
            f"output          {self.output}",
            f"clusters        {self.clusters_path}",
        ]
        if self.rejects_path:
            lines.append(f"rejects         {self.rejects_path}")
        return "\n".join(lines)


def _sidecar(output: Path, suffix: str) -> Path:
    name = output.name
    for ext in (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".pq"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
            break
    return output.with_name(name + suffix)


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file: equal once symlinks and ``..`` are resolved, or the
    same device and inode (hard links, bind mounts, case-insensitive names) when both exist."""
    try:
        if a.resolve() == b.resolve():
            return True
    except (OSError, RuntimeError):  # a symlink loop: fall back to stat
        pass
    try:
        sa, sb = os.stat(a), os.stat(b)
    except (OSError, ValueError):
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _check_distinct(reads: Sequence[tuple[str, Path]], writes: Sequence[tuple[str, Path]]) -> None:
    """Every written path differs from every read one and from the other written ones."""
    for j, (wrole, w) in enumerate(writes):
        for rrole, r in reads:
            if _same_file(w, r):
                raise ValueError(
                    f"the {wrole} {w} is also {rrole} ({r}): refusing to overwrite an input"
                )
        for wrole2, w2 in writes[:j]:
            if _same_file(w, w2):
                raise ValueError(
                    f"the {wrole} {w} is the same file as the {wrole2} ({w2}): each output "
                    "needs its own path"
                )


def _remove_stale(dirs: Sequence[Path], index_names: Sequence[tuple[Path, str]]) -> None:
    """Delete what killed runs left in `dirs`: work directories and temporary files whose
    owning process is gone (see `slimforge.io.owner_is_dead`), and the temporary siblings
    ``.NAME.tmp-PID-N`` that `LSHIndex.save` makes, for each (directory, NAME) of
    `index_names`, whose PID is gone."""
    seen: set[Path] = set()
    for d in dirs:
        try:
            key = d.resolve()
        except (OSError, RuntimeError):
            continue
        if key in seen or not d.is_dir():
            continue
        seen.add(key)
        for removed in remove_stale_temps(d):
            log.info("removed %s, left by a process that is gone", removed)
        with contextlib.suppress(OSError):  # unreadable directory, or a race with a cleaner
            for entry in list(os.scandir(d)):
                m = _WORK_NAME.fullmatch(entry.name)
                if m is None or not entry.is_dir(follow_symlinks=False):
                    continue
                if owner_is_dead(m.group(1), int(m.group(2))):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    log.info("removed work directory %s of a process that is gone", entry.path)
    host = owner_tag().rsplit("-", 1)[0]
    for d, name in index_names:
        pattern = re.compile(re.escape(f".{name}.tmp-") + r"([0-9]+)-[0-9]+")
        with contextlib.suppress(OSError):
            for entry in list(os.scandir(d)):
                m = pattern.fullmatch(entry.name)
                if m and entry.is_file(follow_symlinks=False):
                    if owner_is_dead(host, int(m.group(1))):
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)


def _paths(values: Any, what: str) -> list[Path]:
    if isinstance(values, str | bytes | os.PathLike):
        values = [values]
    out = []
    for v in values:
        if not isinstance(v, str | os.PathLike):
            raise TypeError(f"{what} must be paths (str or os.PathLike), got {type(v).__name__}")
        out.append(Path(v))
    return out


def _check_int(name: str, value: Any, lo: int, hi: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got {value}{hint}")
    return int(value)


def dedup_files(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    field: str = "text",
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 5,
    tokenizer: str = "word",
    seed: int = 1,
    bands: int | None = None,
    rows: int | None = None,
    verify: str = "estimate",
    on_error: str = "fail",
    batch_size: int = 8192,
    memory_mb: int = 1024,
    work_dir: str | os.PathLike[str] | None = None,
    clusters_path: str | os.PathLike[str] | None = None,
    against: Sequence[str | os.PathLike[str]] = (),
    save_index: str | os.PathLike[str] | None = None,
    progress: bool = True,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
    engine: str | Any = "local",
    address: str | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    partitions: int | None = None,
) -> FileDedupReport:
    """Deduplicate the documents of `inputs` into `output`.

    Writes the kept documents to `output` (format from its name: .jsonl, .jsonl.gz or
    .parquet), a TSV clusters file (`index, file, line, cluster, kept` for every document;
    `cluster` is the index of the cluster's keeper, the first member in input order; `file` is
    escaped by `escape_tsv_field`), and, when `on_error="skip"` rejected malformed lines, a
    `.rejects.jsonl` file with them. All appear only when the run succeeds.

    `against`: `LSHIndex` files (`LSHIndex.save`) of documents already kept elsewhere (earlier
    shards); a document matching one is dropped, with cluster -1 in the clusters file, and
    counted in `external_duplicates` (the other members of its cluster in this run are dropped
    as its duplicates). `save_index`: write an `LSHIndex` of the kept documents' signatures,
    keyed by their global document index, for deduplicating the next shard against this one.
    The signatures must be made the same way (`num_perm`, `ngram`, `tokenizer`, `seed`).

    Limits (``ValueError`` outside them, before anything is read or written): `num_perm` <=
    8192 (`slimforge.dedup.MAX_NUM_PERM`), `ngram` <= 1024 (`MAX_NGRAM`), `bands * rows` <=
    `num_perm`, `batch_size` in [1, 2**20] and `batch_size * num_perm` <= 2**28,
    `memory_mb` in [16, 2**24], `max_line_bytes` in [1, 2**34] (a longer JSONL line stops the
    run with `InputError` at its line). Every written path must differ from every input,
    `against` index and other written path (see the module docstring).

    The job runs as the stages of `slimforge.dedup.stages`, one input file per shard and
    `partitions` band-key partitions (1 to 4096; more bound the candidate stage's memory per
    unit and let more workers share it, fewer verify a pair found in several bands fewer
    times; never the result; default one per GiB of input and at least one per worker), on
    `engine`: ``"local"`` (this process), ``"ray"`` (Ray tasks on the cluster
    at `address`, ``"auto"`` or ``"HOST:PORT"``, or on a local ``ray.init()`` without one;
    see `slimforge.dedup.engines.RayEngine`) or an engine object. Every engine gives the same
    outputs. `run_dir`: a run folder kept after the run; a job interrupted or killed with the
    same `run_dir` and the same inputs and settings resumes there, skipping finished shards.
    Without it the stages work in a temporary folder under `work_dir` that is removed at the
    end. With the Ray engine the run folder, inputs and outputs must be on storage that every
    node sees at the same paths.
    """
    t0 = time.perf_counter()
    in_paths = _paths(inputs, "inputs")
    if not in_paths:
        raise ValueError("no input files given")
    against_paths = _paths(against, "against")
    out = Path(output)
    out_fmt = detect_format(out)
    for p in in_paths:
        detect_format(p)
        if not p.exists():
            raise FileNotFoundError(f"input file not found: {p}")
    if not isinstance(field, str):
        raise TypeError(f"field must be a str, got {type(field).__name__}")
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    batch_size = _check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    memory_mb = _check_int("memory_mb", memory_mb, MIN_MEMORY_MB, MAX_MEMORY_MB)
    max_line_bytes = _check_int("max_line_bytes", max_line_bytes, 1, MAX_LINE_BYTES_LIMIT)
    threshold = _dd._check_threshold(threshold)
    _dd._check_choice("verify", verify, _dd._VERIFY)
    hasher = _dd.MinHasher(num_perm=num_perm, ngram=ngram, tokenizer=tokenizer, seed=seed)
    num_perm = hasher.num_perm
    if batch_size * num_perm > MAX_BATCH_VALUES:
        raise ValueError(
            f"batch_size * num_perm = {batch_size} * {num_perm} exceeds {MAX_BATCH_VALUES} "
            f"signature values per batch (1 GiB); use batch_size <= {MAX_BATCH_VALUES // num_perm}"
        )
    bands, rows = _dd._resolve_banding(threshold, num_perm, bands, rows)
    clusters_file = Path(clusters_path) if clusters_path else _sidecar(out, ".clusters.tsv")
    rejects_file = _sidecar(out, ".rejects.jsonl")
    index_file = Path(save_index) if save_index is not None else None

    reads = [("an input", p) for p in in_paths] + [("an --against index", a) for a in against_paths]
    writes = [("output", out), ("clusters file", clusters_file)]
    if on_error == "skip":
        writes.append(("rejects file", rejects_file))
    if index_file is not None:
        writes.append(("index to save", index_file))
    _check_distinct(reads, writes)
    tmp_root = Path(work_dir) if work_dir else out.parent
    for role, w in writes:
        if w.is_dir():
            raise ValueError(f"the {role} {w} is a directory")
    for role, f in [*reads, *writes]:
        if _same_file(tmp_root, f):
            raise ValueError(f"the work directory {tmp_root} is the file {f} ({role})")

    indexes = [_dd.LSHIndex.load(a) for a in against_paths]
    for a, ix in zip(against_paths, indexes, strict=True):
        if ix.num_perm != num_perm:
            raise ValueError(f"index {a} has num_perm={ix.num_perm}, but num_perm={num_perm}")

    tmp_root.mkdir(parents=True, exist_ok=True)
    _remove_stale(
        [tmp_root] + [w.parent for _, w in writes],
        [(index_file.parent, index_file.name)] if index_file is not None else [],
    )
    runner = make_engine(engine, address)
    if partitions is None:
        workers = runner.workers() if callable(getattr(runner, "workers", None)) else 1
        size = sum(os.stat(p).st_size for p in in_paths)
        partitions = _stages.default_partitions(size, workers)
    partitions = _check_int("partitions", partitions, 1, _stages.MAX_PARTITIONS)
    plan = _stages.make_plan(
        in_paths,
        out_fmt,
        against_paths,
        field=field,
        threshold=threshold,
        num_perm=num_perm,
        ngram=hasher.ngram,
        tokenizer=hasher.tokenizer,
        seed=hasher.seed,
        bands=bands,
        rows=rows,
        verify=verify,
        on_error=on_error,
        batch_size=batch_size,
        memory_mb=memory_mb,
        max_line_bytes=max_line_bytes,
        partitions=partitions,
    )
    keep_run = run_dir is not None
    if keep_run:
        work = Path(run_dir)  # type: ignore[arg-type]
        for role, f in [*reads, *writes]:
            if _same_file(work, f):
                raise ValueError(f"the run folder {work} is the file {f} ({role})")
        _remove_stale([work / name for name, _, _ in _stages.STAGES], [])
    else:
        work = Path(tempfile.mkdtemp(prefix=f"{_WORK_PREFIX}{owner_tag()}-", dir=tmp_root))
    try:
        _stages.open_run(work, plan)
        head, tail = _stages.STAGES[:-1], _stages.STAGES[-1:]
        summary = _stages.run_stages(work, plan, runner, progress, head)
        with (
            atomic_path(out) as tmp_out,
            atomic_path(clusters_file) as tmp_clusters,
            atomic_path(rejects_file)
            if summary["rejected"]
            else contextlib.nullcontext() as tmp_rejects,
        ):
            _stages.run_stages(work, plan, runner, progress, tail)
            _stages.merge_outputs(work, plan, tmp_out, tmp_clusters, tmp_rejects, move=not keep_run)
        # After the outputs are in place, so a failed run leaves no index behind.
        if index_file is not None:
            _stages.save_kept_index(work, plan, index_file)
    finally:
        if not keep_run:
            shutil.rmtree(work, ignore_errors=True)

    n = int(summary["documents"])
    return FileDedupReport(
        documents=n,
        kept=int(summary["kept"]),
        exact_duplicates=int(summary["exact_duplicates"]),
        near_duplicates=int(summary["near_duplicates"]),
        external_duplicates=int(summary["external_duplicates"]),
        clusters=int(summary["clusters"]),
        rejected=int(summary["rejected"]),
        empty=int(summary["empty"]),
        input_bytes=int(summary["input_bytes"]),
        bands=bands,
        rows=rows,
        seconds=time.perf_counter() - t0,
        output=str(out),
        clusters_path=str(clusters_file),
        rejects_path=str(rejects_file) if summary["rejected"] else None,
    )


def _write_jsonl(
    paths: Sequence[Path],
    field: str,
    keep: np.ndarray,
    cluster: np.ndarray,
    out: Path,
    gzip: bool,
    clusters: Path,
    bar: tqdm,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> int:
    """JSONL to JSONL: Rust copies the kept raw lines and writes the clusters rows."""
    writer = _native.JsonlKeptWriter(os.fspath(out), gzip, os.fspath(clusters))
    keep_b = np.ascontiguousarray(keep, dtype=bool)
    cluster_i = np.ascontiguousarray(cluster, dtype=np.int64)
    for p in paths:
        writer.open_input(os.fspath(p), field, escape_tsv_field(str(p)), max_line_bytes)
        while (seen := writer.step(keep_b, cluster_i, 65536)) is not None:
            bar.update(seen)
    return int(writer.finish())


def _clusters_rows(
    f: Any, start: int, path: Path, lines: np.ndarray, cluster: np.ndarray, keep: np.ndarray
) -> None:
    """Append clusters-TSV rows for documents `start..start+len(lines)` (written by pyarrow)."""
    require("pyarrow", "Parquet and CSV files")
    import pyarrow as pa
    import pyarrow.csv as pcsv

    m = len(lines)
    # pyarrow refuses a quote in an unquoted value: write a placeholder for the file column (the
    # same in every row) and put the escaped name in its place.
    table = pa.table(
        {
            "index": np.arange(start, start + m, dtype=np.int64),
            "file": pa.array(["F"] * m, type=pa.string()),
            "line": lines.astype(np.int64),
            "cluster": cluster[start : start + m],
            "kept": keep[start : start + m].astype(np.int8),
        }
    )
    opts = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    buf = pa.BufferOutputStream()
    pcsv.write_csv(table, buf, write_options=opts)
    name = escape_tsv_field(str(path)).encode("utf-8")
    f.write(buf.getvalue().to_pybytes().replace(b"\tF\t", b"\t" + name + b"\t"))


def _write_parquet(
    paths: Sequence[Path],
    field: str,
    keep: np.ndarray,
    cluster: np.ndarray,
    out: Path,
    clusters: Path,
    batch_size: int,
    bar: tqdm,
) -> int:
    """Parquet to Parquet: kept rows selected with pyarrow filters, batch by batch."""
    require("pyarrow", "Parquet and CSV files")
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer: Any = None
    i = 0
    with clusters.open("wb") as cf:
        cf.write(b"index\tfile\tline\tcluster\tkept\n")
        try:
            for p in paths:
                row = 0
                for batch in pq.ParquetFile(p).iter_batches(batch_size=batch_size):
                    col = batch.column(field)
                    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                        local = np.flatnonzero(col.is_valid().to_numpy(zero_copy_only=False))
                    else:
                        local = np.zeros(0, dtype=np.int64)
                    lines = local + row
                    row += batch.num_rows
                    m = len(lines)
                    if i + m > len(keep):
                        raise RuntimeError("inputs changed while deduplicating")
                    mask = np.zeros(batch.num_rows, dtype=bool)
                    mask[local] = keep[i : i + m]
                    table = pa.Table.from_batches([batch.filter(pa.array(mask))])
                    if writer is None:
                        writer = pq.ParquetWriter(out, table.schema)
                    writer.write_table(table.cast(writer.schema))
                    _clusters_rows(cf, i, p, lines, cluster, keep)
                    i += m
                    bar.update(m)
        finally:
            if writer is not None:
                writer.close()
    if writer is None:
        schema = pa.schema([(field, pa.string())])
        pq.write_table(pa.Table.from_pylist([], schema=schema), out)
    return i


def _write_mixed(
    paths: Sequence[Path],
    field: str,
    out_fmt: str,
    keep: np.ndarray,
    cluster: np.ndarray,
    out: Path,
    clusters: Path,
    bar: tqdm,
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES,
) -> int:
    """Other format combinations (JSONL <-> Parquet): converted document by document."""
    writer = open_writer(out, out_fmt, field)
    i = 0
    try:
        with clusters.open("w", encoding="utf-8") as cf:
            cf.write("index\tfile\tline\tcluster\tkept\n")
            for p in paths:
                name = escape_tsv_field(str(p))
                records = iter_records(
                    p, field=field, on_error="skip", max_line_bytes=max_line_bytes
                )
                for item in records:
                    if not isinstance(item, Record):
                        continue
                    if i >= len(keep):
                        raise RuntimeError("inputs changed while deduplicating")
                    if keep[i]:
                        writer.write(item)
                    cf.write(f"{i}\t{name}\t{item.line}\t{cluster[i]}\t{int(keep[i])}\n")
                    i += 1
                    bar.update(1)
    finally:
        writer.close()
    return i
