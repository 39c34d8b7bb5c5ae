"""File deduplication as four stages over sharded inputs, run by an engine (local or Ray).

Each input file is one shard. The stages, in order:

1. ``hash`` (one unit per shard): MinHash signatures, exact-text hashes and matches against
   ``against`` indexes of the shard's documents; the band hashes are written grouped by band
   key (``hash % partitions``) with an index of the groups (the map side of the shuffle).
2. ``exact`` (one unit) groups exact duplicates (8 bytes per document); then ``buckets`` (one
   unit per partition) gathers one band-key partition from every shard, builds the LSH buckets
   (documents sharing a band hash in one band; a bucket never spans partitions) and verifies
   their candidates as ``deduplicate`` does, writing the accepted pairs.
3. ``components`` (one unit): union-find over the exact and accepted pairs; cluster ids (the
   smallest index of each cluster), the keep mask and the counts.
4. ``filter`` (one unit per shard): the shard's kept documents and its clusters-TSV rows.

Every unit writes its files atomically (`slimforge.io.atomic_path`) and then its manifest
entry (``<stage>/<unit>.done.json``); a unit whose entry exists is skipped, so a re-run of an
interrupted job (same run folder, same plan) redoes only unfinished units, and a retried unit
rewrites the same bytes. Units read and write only files under the run folder and the inputs,
so the run folder must be on storage every worker sees. The results do not depend on the
engine, the number of partitions or the order units run in.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm.auto import tqdm

from slimforge import _native
from slimforge import dedup as _dd
from slimforge.io import atomic_path, detect_format, iter_batches

__all__ = [
    "STAGES",
    "DedupPlan",
    "bucket_partition",
    "components",
    "exact_groups",
    "filter_shard",
    "hash_shard",
    "merge_outputs",
    "open_run",
    "run_stages",
    "save_kept_index",
]

PLAN_FILE = "plan.json"
#: Largest number of band-key partitions.
MAX_PARTITIONS = 4096
#: Input bytes per band-key partition when the number is not given (`default_partitions`).
BYTES_PER_PARTITION = 1 << 30
#: Pairs whose signatures are gathered at once for estimated verification (at most twice as
#: many signature rows are held).
_ESTIMATE_CHUNK = 65536
#: Pairs per call of exact verification: at most twice as many shingle sets are held at once.
_EXACT_CHUNK = 16384
#: Bytes the bucket stage holds per row and band of a chunk of bands: the block of band
#: hashes (8) and, in `_native.CandidateBuckets`, bucket rows and offsets (at most 8).
_BYTES_PER_ROW_BAND = 16
#: Bytes per unit of work of a piece (a pair of a small bucket, a row of a large one) while it
#: is verified: packed and int64 pairs in Rust (24), the similarities (8), verdicts and the
#: accepted pairs (17), and the leader rounds' per-row arrays (about as much).
_BYTES_PER_UNIT = 64


@dataclass(frozen=True)
class DedupPlan:
    """Everything that decides a job's results, stored as ``plan.json`` in its run folder; a
    run folder is only resumed by the same plan (inputs with the same size and mtime), except
    for `TUNABLE` settings, which a resumed run may change."""

    inputs: tuple[str, ...]
    input_stamps: tuple[tuple[int, int], ...]
    in_formats: tuple[str, ...]
    out_format: str
    field: str
    threshold: float
    num_perm: int
    ngram: int
    tokenizer: str
    seed: int
    bands: int
    rows: int
    verify: str
    on_error: str
    batch_size: int
    memory_mb: int
    max_line_bytes: int
    partitions: int
    against: tuple[str, ...]

    @property
    def shards(self) -> int:
        return len(self.inputs)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DedupPlan:
        raw = json.loads(text)
        names = {f.name for f in fields(cls)}
        if set(raw) != names:
            raise ValueError("plan.json does not describe a dedup job of this version")
        for key in ("inputs", "in_formats", "against"):
            raw[key] = tuple(raw[key])
        raw["input_stamps"] = tuple(tuple(s) for s in raw["input_stamps"])
        return cls(**raw)


#: Plan settings that bound memory or batch sizes but never change a result.
TUNABLE = ("batch_size", "memory_mb")


def make_plan(
    inputs: Sequence[Path], out_format: str, against: Sequence[Path], **settings: Any
) -> DedupPlan:
    """The plan of a job over `inputs` (absolute paths, so workers elsewhere find them)."""
    stamps = []
    for p in inputs:
        st = os.stat(p)
        stamps.append((st.st_size, st.st_mtime_ns))
    return DedupPlan(
        inputs=tuple(str(Path(p).absolute()) for p in inputs),
        input_stamps=tuple(stamps),
        in_formats=tuple(detect_format(p) for p in inputs),
        out_format=out_format,
        against=tuple(str(Path(a).absolute()) for a in against),
        **settings,
    )


def default_partitions(input_bytes: int, workers: int = 1) -> int:
    """Partitions when none are given: one per GiB of input, and at least one per worker."""
    by_size = -(-input_bytes // BYTES_PER_PARTITION)
    return int(min(MAX_PARTITIONS, max(1, workers, by_size)))


def open_run(run_dir: Path, plan: DedupPlan) -> None:
    """Start the run folder `run_dir` for `plan`, or check that it was started for the same
    plan (``ValueError`` otherwise, so finished units of another job are never reused); a
    resumed run's `TUNABLE` settings replace the stored ones."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / PLAN_FILE
    if path.exists():
        try:
            old = DedupPlan.from_json(path.read_text(encoding="utf-8"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"run folder {run_dir} holds an unreadable {PLAN_FILE}: {e}") from e
        diff = [f.name for f in fields(DedupPlan) if getattr(old, f.name) != getattr(plan, f.name)]
        if not diff:
            return
        if set(diff) - set(TUNABLE):
            raise ValueError(
                f"run folder {run_dir} belongs to another job (differs in {', '.join(diff)}); "
                "use a new run folder or delete it"
            )
    with atomic_path(path) as tmp:
        _write(tmp, plan.to_json().encode("utf-8"))


def load_plan(run_dir: str | os.PathLike[str]) -> DedupPlan:
    return DedupPlan.from_json((Path(run_dir) / PLAN_FILE).read_text(encoding="utf-8"))


# --- manifest ----------------------------------------------------------------------------------


def _fill(tmp: Path) -> BinaryIO:
    """Open the empty temporary file of `atomic_path` for writing without truncating it: on
    ext4 a truncate-then-write file is flushed to disk when closed (``auto_da_alloc``), which
    a temporary run folder does not need."""
    return tmp.open("r+b")


def _write(tmp: Path, data: bytes | np.ndarray) -> None:
    with _fill(tmp) as f:
        f.write(data.tobytes() if isinstance(data, np.ndarray) else data)


def _entry(run: Path, stage: str, unit: int) -> Path:
    return run / stage / f"{unit:05d}.done.json"


def finished(run_dir: str | os.PathLike[str], stage: str, unit: int) -> dict[str, Any] | None:
    """The manifest entry of a finished unit, or None."""
    try:
        return dict(json.loads(_entry(Path(run_dir), stage, unit).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def _finish(run: Path, stage: str, unit: int, entry: dict[str, Any]) -> dict[str, Any]:
    with atomic_path(_entry(run, stage, unit)) as tmp:
        _write(tmp, json.dumps(entry, sort_keys=True).encode("utf-8"))
    return entry


def _shard_path(run: Path, stage: str, shard: int, suffix: str) -> Path:
    return run / stage / f"shard-{shard:05d}{suffix}"


def _shard_counts(run: Path, plan: DedupPlan) -> np.ndarray:
    counts = []
    for s in range(plan.shards):
        entry = finished(run, "hash", s)
        if entry is None:
            raise RuntimeError(f"stage 'hash' of shard {s} has not finished in {run}")
        counts.append(int(entry["documents"]))
    return np.asarray(counts, dtype=np.int64)


def _offsets(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


# --- stage 1: hashes and signatures per shard ----------------------------------------------------


def hash_shard(
    run_dir: str | os.PathLike[str], shard: int, progress: bool = False
) -> dict[str, Any]:
    """Stage 1 for input `shard`: signatures ``(n_s, num_perm)`` uint32, exact hashes
    ``(n_s,)`` uint64, the `against` matches ``(n_s,)`` uint8, the rejected lines, and the
    nonzero band hashes (``.key.u64``) with ``row * bands + band`` (``.code.i64``), each batch
    grouped by partition ``hash % partitions`` (rows ascending within a group) and its group
    bounds in ``.idx.i64`` (``partitions + 1`` per batch). Memory: one batch."""
    run = Path(run_dir)
    if (done := finished(run, "hash", shard)) is not None:
        return done
    plan = load_plan(run)
    path = Path(plan.inputs[shard])
    hasher = _dd.MinHasher(
        num_perm=plan.num_perm, ngram=plan.ngram, tokenizer=plan.tokenizer, seed=plan.seed
    )
    indexes = [_dd.LSHIndex.load(a) for a in plan.against]
    nb, parts = plan.bands, plan.partitions
    n = rejected = empty = input_bytes = 0
    first_reject = None
    with contextlib.ExitStack() as stack:

        def create(suffix: str) -> BinaryIO:
            tmp = stack.enter_context(atomic_path(_shard_path(run, "hash", shard, suffix)))
            return stack.enter_context(_fill(tmp))

        sig_f, exact_f, ext_f = create(".sig.u32"), create(".exact.u64"), create(".external.u8")
        rej_f, key_f = create(".rejects.jsonl"), create(".key.u64")
        code_f, idx_f = create(".code.i64"), create(".idx.i64")
        written = 0
        bar = stack.enter_context(
            tqdm(desc=f"dedup: hashing {path.name}", unit="doc", disable=not progress)
        )
        for b in iter_batches(
            path, plan.field, plan.on_error, plan.batch_size, max_line_bytes=plan.max_line_bytes
        ):
            if b.rejects:
                if first_reject is None:
                    r0 = b.rejects[0]
                    first_reject = f"{r0.path}:{r0.line}: {r0.reason}"
                rejected += len(b.rejects)
                rej_f.write(
                    b"".join(r.raw if r.raw.endswith(b"\n") else r.raw + b"\n" for r in b.rejects)
                )
            if not b.texts:
                continue
            m = len(b.texts)
            sigs = hasher.signatures(b.texts)
            sig_f.write(sigs.tobytes())
            exact_f.write(_dd.exact_hashes(b.texts).tobytes())
            external = np.zeros(m, dtype=np.uint8)
            for ix in indexes:
                pairs, _ = ix.query_pairs(sigs)
                external[pairs[:, 0]] = 1
            ext_f.write(external.tobytes())
            bh = _dd.band_hashes(sigs, nb, plan.rows).ravel()
            code = np.arange(n * nb, (n + m) * nb, dtype=np.int64)
            live = np.flatnonzero(bh != 0)  # the empty signature's bands are never paired
            part = (bh[live] % np.uint64(parts)).astype(np.int64)
            if parts == 1:
                sel, bounds = live, np.array([0, len(live)])
            else:
                sel = live[np.argsort(part, kind="stable")]
                bounds = np.searchsorted(np.sort(part), np.arange(parts + 1))
            key_f.write(bh[sel].tobytes())
            code_f.write(code[sel].tobytes())
            idx_f.write((bounds + written).astype(np.int64).tobytes())
            written += len(sel)
            n += m
            input_bytes += b.text_bytes
            empty += b.empty
            bar.update(m)
    return _finish(
        run,
        "hash",
        shard,
        {
            "documents": n,
            "rejected": rejected,
            "empty": empty,
            "input_bytes": input_bytes,
            "first_reject": first_reject,
        },
    )


# --- stage 2: exact groups, then band buckets by band key --------------------------------------


def exact_groups(
    run_dir: str | os.PathLike[str], unit: int = 0, progress: bool = False
) -> dict[str, Any]:
    """Stage 2a: for every document, the first document with the same exact hash
    (``rep.i64``, ``(n,)`` int64). Memory: 24 bytes per document of the corpus."""
    run = Path(run_dir)
    if (done := finished(run, "exact", unit)) is not None:
        return done
    plan = load_plan(run)
    counts = _shard_counts(run, plan)
    hashes = np.concatenate(
        [
            np.fromfile(_shard_path(run, "hash", s, ".exact.u64"), dtype=np.uint64)
            for s in range(plan.shards)
        ]
    )
    rep = _dd._exact_representatives(hashes)
    del hashes
    with atomic_path(run / "exact" / "rep.i64") as tmp:
        _write(tmp, rep)
    return _finish(run, "exact", unit, {"documents": int(counts.sum())})


class _SignatureGather:
    """Signature rows by global document index, read from the shards' signature files."""

    def __init__(self, run: Path, plan: DedupPlan, offsets: np.ndarray) -> None:
        self.offsets = offsets
        self.num_perm = plan.num_perm
        self.maps = [
            np.memmap(
                _shard_path(run, "hash", s, ".sig.u32"),
                dtype=np.uint32,
                mode="r",
                shape=(int(offsets[s + 1] - offsets[s]), plan.num_perm),
            )
            if offsets[s + 1] > offsets[s]
            else None
            for s in range(plan.shards)
        ]

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """Signatures ``(len(rows), num_perm)`` of sorted global `rows`."""
        out = np.empty((len(rows), self.num_perm), dtype=np.uint32)
        bounds = np.searchsorted(rows, self.offsets).tolist()
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if a < b:
                m = self.maps[s]
                assert m is not None
                out[a:b] = m[rows[a:b] - self.offsets[s]]
        return out


def _collect_texts(plan: DedupPlan, offsets: np.ndarray, wanted: np.ndarray) -> list[Any]:
    """Texts of the documents whose global indices are in sorted `wanted`, reading only the
    shards that hold some."""
    out: list[Any] = []
    for s, path in enumerate(plan.inputs):
        lo, hi = np.searchsorted(wanted, [offsets[s], offsets[s + 1]])
        if lo == hi:
            continue
        i = int(offsets[s])
        for b in iter_batches(
            Path(path), plan.field, on_error="skip", max_line_bytes=plan.max_line_bytes
        ):
            m = len(b.texts)
            a, z = np.searchsorted(wanted, [i, i + m])
            out.extend(b.texts[j] for j in (wanted[a:z] - i).tolist())
            i += m
    return out


def bucket_partition(
    run_dir: str | os.PathLike[str], part: int, progress: bool = False
) -> dict[str, Any]:
    """Stage 2b for band-key partition `part`: its band hashes from every shard, exact
    duplicates left out (as ``deduplicate`` does), bucketed per band by
    `_native.CandidateBuckets` and verified piece by piece (every pair of a small bucket,
    leaders in a large one); writes the accepted pairs ``(m, 2)`` int64 of global indices.
    Memory: the partition's band hashes (16 bytes each) plus ``memory_mb / 2`` for a piece."""
    run = Path(run_dir)
    if (done := finished(run, "buckets", part)) is not None:
        return done
    plan = load_plan(run)
    counts = _shard_counts(run, plan)
    offsets = _offsets(counts)
    n, nb = int(offsets[-1]), plan.bands
    keys, rows, band = [], [], []
    for s in range(plan.shards):
        idx = np.fromfile(_shard_path(run, "hash", s, ".idx.i64"), dtype=np.int64)
        spans = idx.reshape(-1, plan.partitions + 1)[:, part : part + 2]
        if not len(idx) or idx[-1] == 0:  # no band hashes in this shard
            continue
        k_mm = np.memmap(_shard_path(run, "hash", s, ".key.u64"), dtype=np.uint64, mode="r")
        c_mm = np.memmap(_shard_path(run, "hash", s, ".code.i64"), dtype=np.int64, mode="r")
        c = np.concatenate([c_mm[a:b] for a, b in spans.tolist()])
        keys.append(np.concatenate([k_mm[a:b] for a, b in spans.tolist()]))
        rows.append(c // nb + offsets[s])
        band.append(c % nb)
        del k_mm, c_mm
    keys.append(np.zeros(0, np.uint64))
    rows.append(np.zeros(0, np.int64))
    band.append(np.zeros(0, np.int64))
    key = np.concatenate(keys)
    row = np.concatenate(rows)
    bnd = np.concatenate(band)
    del keys, rows, band
    if n:
        rep = np.memmap(run / "exact" / "rep.i64", dtype=np.int64, mode="r", shape=(n,))
        unique = np.asarray(rep[row]) == row
        key, row, bnd = key[unique], row[unique], bnd[unique]
        del rep
    # The partition's rows, ascending: bucket members come out in input order, as in
    # `deduplicate`. Bands are bucketed a chunk at a time from a block of these rows, 0
    # (never paired) where a band hash belongs to another partition.
    present = np.zeros(n, dtype=bool)
    present[row] = True
    urows = np.flatnonzero(present)
    loc = (np.cumsum(present) - 1)[row]
    del row, present
    half = (plan.memory_mb << 20) // 2
    per_chunk = max(1, min(nb, half // max(1, len(urows) * _BYTES_PER_ROW_BAND)))
    max_units = max(1, half // _BYTES_PER_UNIT)
    chunks = [j0 for j0 in range(0, nb, per_chunk) if len(urows) >= 2]

    def buckets_of(j0: int) -> _native.CandidateBuckets:
        j1 = min(nb, j0 + per_chunk)
        block = np.zeros((len(urows), j1 - j0), dtype=np.uint64)
        sel = slice(None) if j1 - j0 == nb else (bnd >= j0) & (bnd < j1)
        block[loc[sel], bnd[sel] - j0] = key[sel]
        return _native.CandidateBuckets(block, _dd.MAX_BUCKET)

    if plan.verify == "exact":
        need = np.zeros(0, dtype=np.int64)
        for j0 in chunks:
            need = np.union1d(need, urows[buckets_of(j0).rows()])
        texts = _collect_texts(plan, offsets, need) if len(need) else []

        def accept(p: np.ndarray) -> np.ndarray:
            ok = np.empty(len(p), dtype=bool)
            for s0 in range(0, len(p), _EXACT_CHUNK):
                local = np.searchsorted(need, p[s0 : s0 + _EXACT_CHUNK]).astype(np.int64)
                sim = _dd.exact_jaccard_pairs(texts, local, plan.ngram, plan.tokenizer)
                ok[s0 : s0 + _EXACT_CHUNK] = sim >= plan.threshold
            return ok

    else:
        gather = _SignatureGather(run, plan, offsets)
        cut = _dd.verification_threshold(plan.threshold, plan.num_perm)

        def accept(p: np.ndarray) -> np.ndarray:
            ok = np.empty(len(p), dtype=bool)
            for s0 in range(0, len(p), _ESTIMATE_CHUNK):
                chunk = p[s0 : s0 + _ESTIMATE_CHUNK]
                uniq, inverse = np.unique(chunk, return_inverse=True)
                local = inverse.reshape(chunk.shape).astype(np.int64)
                ok[s0 : s0 + len(chunk)] = _dd.estimate_jaccard_pairs(gather(uniq), local) >= cut
            return ok

    # Pieces are verified in block rows, ascending like the global rows they stand for.
    def by_global_rows(p: np.ndarray) -> np.ndarray:
        return accept(urows[p])

    def by_slots(sigs: np.ndarray, slot: np.ndarray) -> _dd.Accept:
        return lambda p: np.asarray(_dd.estimate_jaccard_pairs(sigs, slot[p]) >= cut)

    found: list[np.ndarray] = []
    for j0 in tqdm(chunks, desc=f"dedup: buckets {part}", disable=not progress, leave=False):
        buckets = buckets_of(j0)
        check = by_global_rows
        if plan.verify != "exact":
            # The bucketed rows' signatures, read once when they fit in half the budget.
            bucketed = buckets.rows()
            if len(bucketed) * plan.num_perm * 4 <= half:
                slot = np.zeros(len(urows), dtype=np.int64)
                slot[bucketed] = np.arange(len(bucketed))
                check = by_slots(gather(urows[bucketed]), slot)
        while (piece := buckets.next_piece(max_units)) is not None:
            near, _ = _dd._verify_piece(*piece, check, _dd.BUCKET_LEADERS)
            if len(near):
                found.append(urows[near])
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    with atomic_path(run / "buckets" / f"part-{part:04d}.pairs.i64") as tmp:
        _write(tmp, np.ascontiguousarray(pairs, dtype=np.int64))
    return _finish(run, "buckets", part, {"pairs": len(pairs)})


# --- stage 3: connected components -------------------------------------------------------------


def components(
    run_dir: str | os.PathLike[str], unit: int = 0, progress: bool = False
) -> dict[str, Any]:
    """Stage 3: cluster ids ``cluster.i64`` (the smallest index of each cluster; -1 for a
    document matching an `against` index) and the keep mask ``keep.u8`` of every document,
    from the exact pairs and every partition's accepted pairs, folded in one partition at a
    time. Memory: about 40 bytes per document plus one partition's pairs."""
    run = Path(run_dir)
    if (done := finished(run, "components", unit)) is not None:
        return done
    plan = load_plan(run)
    counts = _shard_counts(run, plan)
    n = int(counts.sum())
    rep = np.fromfile(run / "exact" / "rep.i64", dtype=np.int64)
    idx = np.arange(n, dtype=np.int64)
    dup = rep != idx
    cluster = _dd.connected_components(n, np.stack([rep[dup], idx[dup]], axis=1))
    for p in tqdm(range(plan.partitions), desc="dedup: components", disable=not progress):
        near = np.fromfile(run / "buckets" / f"part-{p:04d}.pairs.i64", dtype=np.int64)
        if len(near):
            linked = np.flatnonzero(cluster != idx)
            forest = np.stack([cluster[linked], linked], axis=1)
            cluster = _dd.connected_components(n, np.concatenate([forest, near.reshape(-1, 2)]))
    external = np.concatenate(
        [
            np.fromfile(_shard_path(run, "hash", s, ".external.u8"), dtype=np.uint8)
            for s in range(plan.shards)
        ]
    ).astype(bool)
    keep = (cluster == idx) & ~external
    exact_dups = int((dup & ~external).sum())
    removed = int(n - keep.sum())
    dup_clusters = int((np.bincount(cluster, minlength=n) > 1).sum())
    cluster[external] = -1
    with atomic_path(run / "components" / "cluster.i64") as tmp:
        _write(tmp, cluster)
    with atomic_path(run / "components" / "keep.u8") as tmp:
        _write(tmp, keep.astype(np.uint8))
    return _finish(
        run,
        "components",
        unit,
        {
            "documents": n,
            "kept": int(keep.sum()),
            "exact_duplicates": exact_dups,
            "near_duplicates": removed - exact_dups - int(external.sum()),
            "external_duplicates": int(external.sum()),
            "clusters": dup_clusters,
        },
    )


# --- stage 4: filter shards --------------------------------------------------------------------

_OUT_EXT = {"jsonl": ".out.jsonl", "jsonl.gz": ".out.jsonl.gz", "parquet": ".out.parquet"}


def filter_shard(
    run_dir: str | os.PathLike[str], shard: int, progress: bool = False
) -> dict[str, Any]:
    """Stage 4 for input `shard`: its kept documents (raw JSONL lines copied byte for byte, or
    Parquet rows) and its clusters-TSV rows (numbered from 0 within the shard; the merge
    renumbers them). Memory: one batch plus 9 bytes per document of the shard."""
    from slimforge.dedup import files as _files

    run = Path(run_dir)
    if (done := finished(run, "filter", shard)) is not None:
        return done
    plan = load_plan(run)
    counts = _shard_counts(run, plan)
    offsets = _offsets(counts)
    n, lo, hi = int(offsets[-1]), int(offsets[shard]), int(offsets[shard + 1])
    cluster_mm = np.memmap(run / "components" / "cluster.i64", dtype=np.int64, mode="r", shape=(n,))
    keep_mm = np.memmap(run / "components" / "keep.u8", dtype=np.uint8, mode="r", shape=(n,))
    cluster = np.array(cluster_mm[lo:hi], dtype=np.int64)
    keep = np.array(keep_mm[lo:hi], dtype=bool)
    del cluster_mm, keep_mm
    paths = [Path(plan.inputs[shard])]
    in_fmts = set(plan.in_formats)
    out_fmt = plan.out_format
    with (
        atomic_path(_shard_path(run, "filter", shard, _OUT_EXT[out_fmt])) as tmp_out,
        atomic_path(_shard_path(run, "filter", shard, ".clusters.tsv")) as tmp_tsv,
        tqdm(total=hi - lo, desc="dedup: writing", unit="doc", disable=not progress) as bar,
    ):
        if out_fmt != "parquet" and "parquet" not in in_fmts:
            written = _files._write_jsonl(
                paths,
                plan.field,
                keep,
                cluster,
                tmp_out,
                out_fmt == "jsonl.gz",
                tmp_tsv,
                bar,
                plan.max_line_bytes,
            )
        elif out_fmt == "parquet" and in_fmts == {"parquet"}:
            written = _files._write_parquet(
                paths, plan.field, keep, cluster, tmp_out, tmp_tsv, plan.batch_size, bar
            )
        else:
            written = _files._write_mixed(
                paths,
                plan.field,
                out_fmt,
                keep,
                cluster,
                tmp_out,
                tmp_tsv,
                bar,
                plan.max_line_bytes,
            )
        if written != hi - lo:
            raise RuntimeError(
                f"inputs changed while deduplicating: read {hi - lo} then {written} documents "
                f"in {paths[0]}"
            )
    return _finish(run, "filter", shard, {"documents": int(written), "kept": int(keep.sum())})


# --- driver ------------------------------------------------------------------------------------

#: The stages in order: (name, function name, units per job: "shards", "partitions" or "one").
STAGES: tuple[tuple[str, str, str], ...] = (
    ("hash", "hash_shard", "shards"),
    ("exact", "exact_groups", "one"),
    ("buckets", "bucket_partition", "partitions"),
    ("components", "components", "one"),
    ("filter", "filter_shard", "shards"),
)


def run_stages(
    run_dir: Path,
    plan: DedupPlan,
    engine: Any,
    progress: bool = True,
    stages: Sequence[tuple[str, str, str]] = STAGES,
) -> dict[str, Any]:
    """Run every unfinished unit of `stages` (default: all, in order) with `engine`
    (``engine.map(name, fn, run_dir, units, progress)``); return the components entry (the
    job's counts, once stage 3 has run) plus the stage 1 totals."""
    for name, fn_name, per in stages:
        fn = globals()[fn_name]  # looked up at run time, so a stage can be wrapped
        units = {"shards": plan.shards, "partitions": plan.partitions, "one": 1}[per]
        todo = [u for u in range(units) if finished(run_dir, name, u) is None]
        if todo:
            engine.map(name, fn, str(run_dir), todo, progress)
        if name == "hash":
            entries = [finished(run_dir, "hash", s) or {} for s in range(plan.shards)]
            if sum(int(e["documents"]) for e in entries) == 0:
                rejected = sum(int(e["rejected"]) for e in entries)
                first = next((e["first_reject"] for e in entries if e["first_reject"]), None)
                why = f" ({rejected} lines rejected, the first {first})" if rejected else ""
                raise ValueError(f"no documents found in {', '.join(plan.inputs)}{why}")
    summary = dict(finished(run_dir, "components", 0) or {})
    entries = [finished(run_dir, "hash", s) or {} for s in range(plan.shards)]
    for key in ("rejected", "empty", "input_bytes"):
        summary[key] = sum(int(e[key]) for e in entries)
    return summary


def _copy_tsv_rows(src: Path, dst: BinaryIO, offset: int) -> None:
    """Append the rows of a shard's clusters TSV to `dst`, header dropped, indices shifted."""
    with src.open("rb") as f:
        f.readline()
        if offset == 0:
            shutil.copyfileobj(f, dst, 1 << 20)
            return
        while lines := f.readlines(1 << 20):
            dst.write(
                b"".join(
                    b"%d%s" % (int(line[: (t := line.index(b"\t"))]) + offset, line[t:])
                    for line in lines
                )
            )


def merge_outputs(
    run_dir: Path,
    plan: DedupPlan,
    out: Path,
    clusters: Path,
    rejects: Path | None,
    move: bool = False,
) -> None:
    """Join the shards' outputs into `out` and `clusters` (and their rejected lines into
    `rejects`), in input order: byte concatenation for JSONL (gzip members for .gz), row groups
    for Parquet. `move`: the run folder is temporary, so a single shard's files are renamed."""
    counts = _shard_counts(run_dir, plan)
    offsets = _offsets(counts)
    ext = _OUT_EXT[plan.out_format]
    parts = [_shard_path(run_dir, "filter", s, ext) for s in range(plan.shards)]
    tsvs = [_shard_path(run_dir, "filter", s, ".clusters.tsv") for s in range(plan.shards)]
    with_docs = [s for s in range(plan.shards) if counts[s] > 0]
    if move and len(with_docs) == 1 and plan.shards == 1:
        os.replace(parts[0], out)
        os.replace(tsvs[0], clusters)
    else:
        if plan.out_format == "parquet":
            _merge_parquet([parts[s] for s in with_docs] or parts[:1], out)
        else:
            with _fill(out) as dst:
                for s in range(plan.shards):
                    with parts[s].open("rb") as src:
                        shutil.copyfileobj(src, dst, 1 << 20)
        with _fill(clusters) as dst:
            dst.write(b"index\tfile\tline\tcluster\tkept\n")
            for s in range(plan.shards):
                _copy_tsv_rows(tsvs[s], dst, int(offsets[s]))
    if rejects is not None:
        with _fill(rejects) as dst:
            for s in range(plan.shards):
                with _shard_path(run_dir, "hash", s, ".rejects.jsonl").open("rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 20)


def _merge_parquet(parts: Sequence[Path], out: Path) -> None:
    import pyarrow.parquet as pq

    if len(parts) == 1:
        shutil.copyfile(parts[0], out)
        return
    writer: Any = None
    try:
        for p in parts:
            f = pq.ParquetFile(p)
            if writer is None:
                writer = pq.ParquetWriter(out, f.schema_arrow)
            for g in range(f.num_row_groups):
                writer.write_table(f.read_row_group(g).cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()


def save_kept_index(run_dir: Path, plan: DedupPlan, path: Path) -> None:
    """An `LSHIndex` of the kept documents' signatures, keyed by global document index."""
    counts = _shard_counts(run_dir, plan)
    offsets = _offsets(counts)
    n = int(offsets[-1])
    keep = np.fromfile(run_dir / "components" / "keep.u8", dtype=np.uint8).astype(bool)
    gather = _SignatureGather(run_dir, plan, offsets)
    kept = np.flatnonzero(keep[:n]).astype(np.int64)
    index = _dd.LSHIndex(plan.threshold, plan.num_perm, plan.bands, plan.rows)
    index.insert(gather(kept), kept)
    path.parent.mkdir(parents=True, exist_ok=True)
    index.save(path)
