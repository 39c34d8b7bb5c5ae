"""Streaming deduplication of document files (JSONL, gzip JSONL, Parquet).

Three passes, with memory bounded by the batch size and `memory_mb`, not by the corpus:

1. read documents in batches; Rust computes MinHash signatures, band hashes and exact-text
   hashes; signatures and band hashes spill to files in a work directory;
2. exact duplicates are grouped by hash; the remaining documents' band hashes are read a few
   bands at a time, candidate pairs are verified (estimated Jaccard from the spilled
   signatures, or exact Jaccard of shingle sets) and clustered with union-find;
3. the inputs are read again and the kept documents written, with a clusters file, to
   temporary files that are renamed into place at the end. Inputs are never modified.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from slimforge import dedup as _dd
from slimforge.io import Record, Reject, atomic_path, detect_format, iter_records, open_writer

__all__ = ["FileDedupReport", "dedup_files"]


@dataclass
class FileDedupReport:
    """What `dedup_files` did. Counts are documents unless named otherwise."""

    documents: int
    kept: int
    exact_duplicates: int
    near_duplicates: int
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
    progress: bool = True,
) -> FileDedupReport:
    """Deduplicate the documents of `inputs` into `output`.

    Writes the kept documents to `output` (format from its name: .jsonl, .jsonl.gz or
    .parquet), a TSV clusters file (`index, file, line, cluster, kept` for every document;
    `cluster` is the index of the cluster's keeper, the first member in input order), and,
    when `on_error="skip"` rejected malformed lines, a `.rejects.jsonl` file with them.
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
            batch: list[str] = []

            def flush() -> None:
                if not batch:
                    return
                sigs = hasher.signatures(batch)
                sig_f.write(sigs.tobytes())
                band_f.write(_dd.band_hashes(sigs, bands, rows).tobytes())
                exact_parts.append(_dd.exact_hashes(batch))
                batch.clear()

            bar = tqdm(desc="dedup: hashing", unit="doc", disable=not progress)
            try:
                for p in in_paths:
                    for item in iter_records(p, field=field, on_error=on_error):
                        if isinstance(item, Reject):
                            rejected += 1
                            if rejects_out is None:
                                rejects_out = rejects_file.open("wb")
                            rejects_out.write(
                                item.raw if item.raw.endswith(b"\n") else item.raw + b"\n"
                            )
                            continue
                        batch.append(item.text)
                        input_bytes += len(item.text.encode("utf-8"))
                        empty += not item.text.strip()
                        n += 1
                        if len(batch) >= batch_size:
                            flush()
                            bar.update(batch_size)
                rest = len(batch)
                flush()
                bar.update(rest)
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
        keep = cluster == idx
        exact_dups = int((rep != idx).sum())
        removed = int(n - keep.sum())
        sizes = np.bincount(cluster, minlength=n)
        dup_clusters = int((sizes > 1).sum())

        # ---- pass 3: write kept documents and the clusters file -------------------------
        with atomic_path(out) as tmp_out, atomic_path(clusters_file) as tmp_clusters:
            writer = open_writer(tmp_out, out_fmt, field)
            i = 0
            bar = tqdm(total=n, desc="dedup: writing", unit="doc", disable=not progress)
            try:
                with tmp_clusters.open("w", encoding="utf-8") as cf:
                    cf.write("index\tfile\tline\tcluster\tkept\n")
                    for p in in_paths:
                        for item in iter_records(p, field=field, on_error="skip"):
                            if not isinstance(item, Record):
                                continue
                            if keep[i]:
                                writer.write(item)
                            cf.write(f"{i}\t{p}\t{item.line}\t{cluster[i]}\t{int(keep[i])}\n")
                            i += 1
                            if i % 4096 == 0:
                                bar.update(4096)
                    bar.update(i % 4096)
            finally:
                writer.close()
                bar.close()
            if i != n:
                raise RuntimeError(
                    f"inputs changed while deduplicating: read {i} then {n} documents"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return FileDedupReport(
        documents=n,
        kept=int(keep.sum()),
        exact_duplicates=exact_dups,
        near_duplicates=removed - exact_dups,
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


def _collect_texts(paths: Sequence[Path], field: str, wanted: np.ndarray) -> list[str]:
    """Texts of the documents whose global indices are in sorted `wanted`."""
    out: list[str] = []
    j = i = 0
    for p in paths:
        for item in iter_records(p, field=field, on_error="skip"):
            if not isinstance(item, Record):
                continue
            if j < len(wanted) and wanted[j] == i:
                out.append(item.text)
                j += 1
            i += 1
    return out
