"""Streaming deduplication of document files (JSONL, gzip JSONL, Parquet).

Three passes, with memory bounded by the batch size and `memory_mb`, not by the corpus:

1. read documents in batches; Rust computes MinHash signatures, band hashes and exact-text
   hashes; signatures and band hashes spill to files in a work directory;
2. exact duplicates are grouped by hash; the remaining documents' band hashes are read a few
   bands at a time, candidate pairs are verified (estimated Jaccard from the spilled
   signatures, or exact Jaccard of shingle sets) and clustered with union-find;
3. the inputs are read again and the kept documents written, with a clusters file, to
   temporary files that are renamed into place at the end. Inputs are never modified.

JSONL is read, parsed and (pass 3) copied byte for byte in Rust, and Parquet is filtered with
pyarrow, so Python only handles batches. Documents may also be checked against `LSHIndex` files
of earlier shards (`against`), and the kept documents' signatures saved as one (`save_index`).
"""

from __future__ import annotations

import os
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
from slimforge.io import (
    Record,
    atomic_path,
    detect_format,
    iter_batches,
    iter_records,
    open_writer,
)

__all__ = ["FileDedupReport", "dedup_files"]


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
) -> FileDedupReport:
    """Deduplicate the documents of `inputs` into `output`.

    Writes the kept documents to `output` (format from its name: .jsonl, .jsonl.gz or
    .parquet), a TSV clusters file (`index, file, line, cluster, kept` for every document;
    `cluster` is the index of the cluster's keeper, the first member in input order), and,
    when `on_error="skip"` rejected malformed lines, a `.rejects.jsonl` file with them.

    `against`: `LSHIndex` files (`LSHIndex.save`) of documents already kept elsewhere (earlier
    shards); a document matching one is dropped, with cluster -1 in the clusters file, and
    counted in `external_duplicates` (the other members of its cluster in this run are dropped
    as its duplicates). `save_index`: write an `LSHIndex` of the kept documents' signatures,
    keyed by their global document index, for deduplicating the next shard against this one.
    The signatures must be made the same way (`num_perm`, `ngram`, `tokenizer`, `seed`).
    """
    t0 = time.perf_counter()
    in_paths = [Path(p) for p in inputs]
    if not in_paths:
        raise ValueError("no input files given")
    out = Path(output)
    out_fmt = detect_format(out)
    for p in in_paths:
        detect_format(p)
        if not p.exists():
            raise FileNotFoundError(f"input file not found: {p}")
        if p.resolve() == out.resolve():
            raise ValueError(f"output {out} is also an input: refusing to overwrite an input")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if memory_mb < 16:
        raise ValueError(f"memory_mb must be >= 16, got {memory_mb}")
    threshold = _dd._check_threshold(threshold)
    _dd._check_choice("verify", verify, _dd._VERIFY)
    hasher = _dd.MinHasher(num_perm=num_perm, ngram=ngram, tokenizer=tokenizer, seed=seed)
    bands, rows = _dd._resolve_banding(threshold, num_perm, bands, rows)
    indexes = [_dd.LSHIndex.load(a) for a in against]
    for a, ix in zip(against, indexes, strict=True):
        if ix.num_perm != num_perm:
            raise ValueError(f"index {a} has num_perm={ix.num_perm}, but num_perm={num_perm}")
    clusters_file = Path(clusters_path) if clusters_path else _sidecar(out, ".clusters.tsv")
    rejects_file = _sidecar(out, ".rejects.jsonl")

    tmp_root = Path(work_dir) if work_dir else out.parent
    tmp_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".slimforge-dedup-", dir=tmp_root))
    try:
        # ---- pass 1: signatures, band hashes, exact hashes -------------------------------
        sig_path, band_path = work / "signatures.u32", work / "bands.u64"
        exact_parts: list[np.ndarray] = []
        n = rejected = empty = 0
        input_bytes = 0
        with sig_path.open("wb") as sig_f, band_path.open("wb") as band_f:
            rejects_out = None
            bar = tqdm(desc="dedup: hashing", unit="doc", disable=not progress)
            try:
                for p in in_paths:
                    for b in iter_batches(p, field, on_error, batch_size):
                        if b.rejects:
                            rejected += len(b.rejects)
                            if rejects_out is None:
                                rejects_out = rejects_file.open("wb")
                            rejects_out.write(
                                b"".join(
                                    r.raw if r.raw.endswith(b"\n") else r.raw + b"\n"
                                    for r in b.rejects
                                )
                            )
                        if not b.texts:
                            continue
                        sigs = hasher.signatures(b.texts)
                        sig_f.write(sigs.tobytes())
                        band_f.write(_dd.band_hashes(sigs, bands, rows).tobytes())
                        exact_parts.append(_dd.exact_hashes(b.texts))
                        n += len(b.texts)
                        input_bytes += b.text_bytes
                        empty += b.empty
                        bar.update(len(b.texts))
            finally:
                bar.close()
                if rejects_out is not None:
                    rejects_out.close()

        if n == 0:
            raise ValueError(f"no documents found in {', '.join(map(str, in_paths))}")

        # ---- pass 2: exact groups, then verified near-duplicate pairs --------------------
        rep = _dd._exact_representatives(np.concatenate(exact_parts))
        idx = np.arange(n, dtype=np.int64)
        exact_pairs = np.stack([rep[rep != idx], idx[rep != idx]], axis=1).astype(np.int64)
        reps = np.flatnonzero(rep == idx).astype(np.int64)

        sigs_mm = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, num_perm))
        bands_mm = np.memmap(band_path, dtype=np.uint64, mode="r", shape=(n, bands))
        per_chunk = max(1, min(bands, (memory_mb << 20) // max(1, len(reps) * 8 * 4)))
        found: list[np.ndarray] = []
        for b0 in tqdm(range(0, bands, per_chunk), desc="dedup: candidates", disable=not progress):
            block = np.ascontiguousarray(bands_mm[reps, b0 : b0 + per_chunk])
            local = _dd.candidate_pairs(block)
            if len(local):
                found.append(reps[local])
        cand = np.unique(np.concatenate(found), axis=0) if found else np.zeros((0, 2), np.int64)
        if verify == "exact" and len(cand):
            need = np.unique(cand)
            texts = _collect_texts(in_paths, field, need)
            local_pairs = np.searchsorted(need, cand).astype(np.int64)
            sim = _dd.exact_jaccard_pairs(texts, local_pairs, ngram, tokenizer)
            near = cand[sim >= threshold]
        elif len(cand):
            sim = _dd.estimate_jaccard_pairs(sigs_mm, cand)
            near = cand[sim >= _dd.verification_threshold(threshold, num_perm)]
        else:
            near = cand
        del sigs_mm, bands_mm
        pairs = np.ascontiguousarray(np.concatenate([exact_pairs, near]).astype(np.int64))
        cluster = _dd.connected_components(n, pairs)
        external = _match_external(sig_path, n, num_perm, indexes, progress)
        keep = (cluster == idx) & ~external
        exact_dups = int(((rep != idx) & ~external).sum())
        removed = int(n - keep.sum())
        sizes = np.bincount(cluster, minlength=n)
        dup_clusters = int((sizes > 1).sum())
        cluster[external] = -1

        # ---- pass 3: write kept documents and the clusters file -------------------------
        in_fmts = {detect_format(p) for p in in_paths}
        with atomic_path(out) as tmp_out, atomic_path(clusters_file) as tmp_clusters:
            bar = tqdm(total=n, desc="dedup: writing", unit="doc", disable=not progress)
            try:
                if out_fmt != "parquet" and "parquet" not in in_fmts:
                    written = _write_jsonl(
                        in_paths,
                        field,
                        keep,
                        cluster,
                        tmp_out,
                        out_fmt == "jsonl.gz",
                        tmp_clusters,
                        bar,
                    )
                elif out_fmt == "parquet" and in_fmts == {"parquet"}:
                    written = _write_parquet(
                        in_paths, field, keep, cluster, tmp_out, tmp_clusters, batch_size, bar
                    )
                else:
                    written = _write_mixed(
                        in_paths, field, out_fmt, keep, cluster, tmp_out, tmp_clusters, bar
                    )
            finally:
                bar.close()
            if written != n:
                raise RuntimeError(
                    f"inputs changed while deduplicating: read {n} then {written} documents"
                )
        # After pass 3 succeeded, so a failed run leaves no index behind.
        if save_index is not None:
            _save_kept_index(save_index, sig_path, n, num_perm, keep, threshold, bands, rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return FileDedupReport(
        documents=n,
        kept=int(keep.sum()),
        exact_duplicates=exact_dups,
        near_duplicates=removed - exact_dups - int(external.sum()),
        external_duplicates=int(external.sum()),
        clusters=dup_clusters,
        rejected=rejected,
        empty=int(empty),
        input_bytes=input_bytes,
        bands=bands,
        rows=rows,
        seconds=time.perf_counter() - t0,
        output=str(out),
        clusters_path=str(clusters_file),
        rejects_path=str(rejects_file) if rejected else None,
    )


def _match_external(
    sig_path: Path, n: int, num_perm: int, indexes: Sequence[_dd.LSHIndex], progress: bool
) -> np.ndarray:
    """Which documents match an entry of one of `indexes` (queried a chunk at a time)."""
    external = np.zeros(n, dtype=bool)
    if not indexes:
        return external
    sigs_mm = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, num_perm))
    chunk = 65536
    for ix in indexes:
        for s0 in tqdm(range(0, n, chunk), desc="dedup: external", disable=not progress):
            pairs, _ = ix.query_pairs(np.ascontiguousarray(sigs_mm[s0 : s0 + chunk]))
            external[s0 + pairs[:, 0]] = True
    del sigs_mm
    return external


def _save_kept_index(
    path: str | os.PathLike[str],
    sig_path: Path,
    n: int,
    num_perm: int,
    keep: np.ndarray,
    threshold: float,
    bands: int,
    rows: int,
) -> None:
    """An `LSHIndex` of the kept documents' signatures, keyed by global document index."""
    sigs_mm = np.memmap(sig_path, dtype=np.uint32, mode="r", shape=(n, num_perm))
    kept = np.flatnonzero(keep).astype(np.int64)
    index = _dd.LSHIndex(threshold, num_perm, bands, rows)
    index.insert(np.ascontiguousarray(sigs_mm[kept]), kept)
    del sigs_mm
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    index.save(path)


def _write_jsonl(
    paths: Sequence[Path],
    field: str,
    keep: np.ndarray,
    cluster: np.ndarray,
    out: Path,
    gzip: bool,
    clusters: Path,
    bar: tqdm,
) -> int:
    """JSONL to JSONL: Rust copies the kept raw lines and writes the clusters rows."""
    writer = _native.JsonlKeptWriter(os.fspath(out), gzip, os.fspath(clusters))
    keep_b = np.ascontiguousarray(keep, dtype=bool)
    cluster_i = np.ascontiguousarray(cluster, dtype=np.int64)
    for p in paths:
        writer.open_input(os.fspath(p), field, str(p))
        while (seen := writer.step(keep_b, cluster_i, 65536)) is not None:
            bar.update(seen)
    return int(writer.finish())


def _clusters_rows(
    f: Any, start: int, path: Path, lines: np.ndarray, cluster: np.ndarray, keep: np.ndarray
) -> None:
    """Append clusters-TSV rows for documents `start..start+len(lines)` (written by pyarrow)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    m = len(lines)
    table = pa.table(
        {
            "index": np.arange(start, start + m, dtype=np.int64),
            "file": pa.array([str(path)] * m, type=pa.string()) if m else pa.array([], pa.string()),
            "line": lines.astype(np.int64),
            "cluster": cluster[start : start + m],
            "kept": keep[start : start + m].astype(np.int8),
        }
    )
    opts = pcsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    pcsv.write_csv(table, f, write_options=opts)


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
) -> int:
    """Other format combinations (JSONL <-> Parquet): converted document by document."""
    writer = open_writer(out, out_fmt, field)
    i = 0
    try:
        with clusters.open("w", encoding="utf-8") as cf:
            cf.write("index\tfile\tline\tcluster\tkept\n")
            for p in paths:
                for item in iter_records(p, field=field, on_error="skip"):
                    if not isinstance(item, Record):
                        continue
                    if i >= len(keep):
                        raise RuntimeError("inputs changed while deduplicating")
                    if keep[i]:
                        writer.write(item)
                    cf.write(f"{i}\t{p}\t{item.line}\t{cluster[i]}\t{int(keep[i])}\n")
                    i += 1
                    bar.update(1)
    finally:
        writer.close()
    return i


def _collect_texts(paths: Sequence[Path], field: str, wanted: np.ndarray) -> list[Any]:
    """Texts of the documents whose global indices are in sorted `wanted`."""
    out: list[Any] = []
    i = 0
    for p in paths:
        for b in iter_batches(p, field, on_error="skip"):
            m = len(b.texts)
            lo, hi = np.searchsorted(wanted, [i, i + m])
            out.extend(b.texts[j] for j in (wanted[lo:hi] - i).tolist())
            i += m
    return out
