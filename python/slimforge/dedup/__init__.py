"""Near-duplicate detection with MinHash signatures and LSH banding, in Rust.

The scheme (see ``docs/dedup.md`` for details):

* text is normalised (Unicode NFKC, then lowercased); ``tokenizer="word"`` splits it into words,
  maximal runs of alphanumeric characters (so ``snake_case`` is two words); ``tokenizer="char"``
  uses single characters with whitespace runs collapsed to one space;
* shingles are ``ngram`` consecutive tokens (a document with fewer tokens is one shingle of all of
  them; a document without tokens has no shingles and the *empty signature*, every value
  ``0xFFFFFFFF``, which is never similar to anything, itself included);
* each shingle gets a 64-bit hash (xxh3 of each token, seeded, combined and mixed) and
  ``num_perm`` affine permutations ``(a_k * x + b_k) mod 2**32`` of its low 32 bits, with
  ``(a_k, b_k)`` drawn from splitmix64 started at ``seed``; the signature keeps each minimum;
* LSH banding groups ``rows`` values into each of ``bands`` bands; documents sharing any band
  hash are candidates, and candidates are verified before anything is removed.

Staged primitives (``signatures``, ``band_hashes``, ``candidate_pairs`` ...) run without the GIL
on the library's thread pool; ``deduplicate`` composes them for one in-memory corpus, and
``LSHIndex`` keeps signatures to deduplicate new shards against earlier ones.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from slimforge import _native

__all__ = [
    "DedupResult",
    "DedupStats",
    "LSHIndex",
    "MinHasher",
    "band_hashes",
    "candidate_pairs",
    "candidate_probability",
    "connected_components",
    "deduplicate",
    "estimate_jaccard_pairs",
    "exact_hashes",
    "exact_jaccard_pairs",
    "optimal_bands",
    "signatures",
    "verification_threshold",
]

Texts = Sequence[str] | Sequence[bytes] | Sequence[str | bytes]

#: Default weights of :func:`optimal_bands`: a missed pair costs 19 times a spurious candidate.
FP_WEIGHT = 0.05
FN_WEIGHT = 0.95

#: Largest ``num_perm``: 32 KiB per signature, and the band search (:func:`optimal_bands`)
#: grows as ``num_perm * ln(num_perm)``. Set in ``rust/dedup/minhash.rs`` (``MAX_NUM_PERM``).
MAX_NUM_PERM = 8192
#: Largest ``ngram`` (tokens per shingle); each shingle costs ``ngram`` multiply-adds. Set in
#: ``rust/dedup/shingle.rs`` (``MAX_NGRAM``).
MAX_NGRAM = 1024

_TOKENIZERS = ("word", "char")
_VERIFY = ("estimate", "exact")
_KEEP = ("first", "last")
_ERRORS = ("strict", "replace")


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not (0.0 < t <= 1.0):
        raise ValueError(f"threshold must lie in (0, 1], got {threshold!r}")
    return t


def _check_positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return int(value)


def _check_at_most(name: str, value: int, limit: int) -> int:
    value = _check_positive(name, value)
    if value > limit:
        raise ValueError(f"{name} must be at most {limit}, got {value}")
    return value


def _check_num_perm(num_perm: int) -> int:
    return _check_at_most("num_perm", num_perm, MAX_NUM_PERM)


def _check_ngram(ngram: int) -> int:
    return _check_at_most("ngram", ngram, MAX_NGRAM)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must lie in [0, 2**64), got {seed}")
    return int(seed)


def _as_texts(texts: Texts) -> list[Any] | tuple[Any, ...]:
    if isinstance(texts, str | bytes):
        raise TypeError("texts must be a sequence of documents, not a single str or bytes")
    return texts if isinstance(texts, list | tuple) else list(texts)


def _check_signatures(sigs: Any, num_perm: int | None = None) -> NDArray[np.uint32]:
    if not isinstance(sigs, np.ndarray) or sigs.dtype != np.uint32 or sigs.ndim != 2:
        got = (
            f"dtype {sigs.dtype} and shape {sigs.shape}"
            if isinstance(sigs, np.ndarray)
            else type(sigs).__name__
        )
        raise TypeError(f"signatures must be a 2-D numpy array of uint32, got {got}")
    if num_perm is not None and sigs.shape[1] != num_perm:
        raise ValueError(
            f"signatures must have num_perm = {num_perm} columns, got shape {sigs.shape}"
        )
    return sigs


def _check_banding(bands: int, rows: int, num_perm: int) -> tuple[int, int]:
    bands = _check_positive("bands", bands)
    rows = _check_positive("rows", rows)
    if bands * rows > num_perm:
        raise ValueError(
            f"bands * rows = {bands} * {rows} = {bands * rows} exceeds num_perm = {num_perm}"
        )
    return bands, rows


def _resolve_banding(
    threshold: float, num_perm: int, bands: int | None, rows: int | None
) -> tuple[int, int]:
    if bands is None and rows is None:
        return optimal_bands(threshold, num_perm)
    if bands is None or rows is None:
        raise ValueError(f"give both bands and rows or neither, got bands={bands}, rows={rows}")
    return _check_banding(bands, rows, num_perm)


# --- staged primitives --------------------------------------------------------------------


def signatures(
    texts: Texts,
    num_perm: int = 128,
    ngram: int = 5,
    tokenizer: str = "word",
    seed: int = 1,
    errors: str = "strict",
) -> NDArray[np.uint32]:
    """MinHash signatures ``(n, num_perm)`` uint32 of ``n`` str/bytes documents.

    bytes must be UTF-8: invalid bytes raise ``ValueError`` naming the document, unless
    ``errors="replace"`` substitutes U+FFFD.
    """
    return _native.signatures(
        _as_texts(texts),
        _check_num_perm(num_perm),
        _check_ngram(ngram),
        _check_choice("tokenizer", tokenizer, _TOKENIZERS),
        _check_seed(seed),
        _check_choice("errors", errors, _ERRORS),
    )


def exact_hashes(texts: Texts, errors: str = "strict") -> NDArray[np.uint64]:
    """xxh3 hash ``(n,)`` uint64 of each document's normalised text (NFKC + lowercase)."""
    return _native.exact_hashes(_as_texts(texts), _check_choice("errors", errors, _ERRORS))


def band_hashes(sigs: NDArray[np.uint32], bands: int, rows: int) -> NDArray[np.uint64]:
    """Band hashes ``(n, bands)`` uint64 of signatures ``(n, num_perm)`` uint32.

    Band ``j`` hashes values ``j*rows .. (j+1)*rows``; every band of an empty signature is 0,
    a value :func:`candidate_pairs` never pairs.
    """
    sigs = _check_signatures(sigs)
    bands, rows = _check_banding(bands, rows, sigs.shape[1])
    return _native.band_hashes(sigs, bands, rows)


def candidate_pairs(bh: NDArray[np.uint64], max_bucket: int | None = None) -> NDArray[np.int64]:
    """Pairs ``(m, 2)`` int64 of rows sharing a band hash: ``i < j``, unique, sorted.

    ``bh``: band hashes ``(n, bands)`` uint64. A bucket of ``g`` rows with equal hash in one band
    yields ``g(g-1)/2`` pairs; with ``max_bucket`` set, a bucket larger than it yields only a
    star from its first row plus a chain through consecutive rows (``2(g-1)`` pairs, enough to
    connect it, though verification then sees fewer pairs). More than 2**31 pairs raise
    ``ValueError`` naming the largest bucket.
    """
    if max_bucket is not None:
        max_bucket = _check_positive("max_bucket", max_bucket)
    return _native.candidate_pairs(bh, max_bucket)


def estimate_jaccard_pairs(
    sigs: NDArray[np.uint32], pairs: NDArray[np.int64]
) -> NDArray[np.float64]:
    """Estimated Jaccard ``(m,)`` float64 (fraction of equal values) of each pair of rows.

    ``sigs`` may be any C-contiguous uint32 array, e.g. a read-only ``np.memmap``; it is not
    copied. A pair involving an empty signature estimates 0.0.
    """
    return _native.estimate_jaccard_pairs(_check_signatures(sigs), pairs)


def exact_jaccard_pairs(
    texts: Texts,
    pairs: NDArray[np.int64],
    ngram: int = 5,
    tokenizer: str = "word",
    errors: str = "strict",
) -> NDArray[np.float64]:
    """Exact Jaccard ``(m,)`` float64 of the shingle sets of each pair of documents.

    Shingle sets are the documents' 64-bit shingle hashes (collisions have probability about
    ``size**2 / 2**64``); only documents named by a pair are shingled. Two documents without
    shingles have Jaccard 0.0.
    """
    return _native.exact_jaccard_pairs(
        _as_texts(texts),
        pairs,
        _check_ngram(ngram),
        _check_choice("tokenizer", tokenizer, _TOKENIZERS),
        _check_choice("errors", errors, _ERRORS),
    )


def connected_components(n: int, pairs: NDArray[np.int64]) -> NDArray[np.int64]:
    """Cluster id ``(n,)`` int64 of each document: the smallest index in its component."""
    return _native.connected_components(int(n), pairs)


# --- candidates in linear work --------------------------------------------------------------

#: Buckets (documents sharing one band hash) of up to this many documents have every pair
#: verified; larger ones are verified through leaders (:func:`_leader_pairs`), in work linear in
#: their size. Read at call time by :func:`deduplicate` and ``dedup_files``; docs/dedup.md,
#: "Candidates", has the trade-off.
MAX_BUCKET = 64
#: Leaders per large bucket: each is checked against the bucket's other members.
BUCKET_LEADERS = 4
#: ``next_piece`` budget meaning "all at once".
_ALL_UNITS = 2**63 - 1

Accept = Callable[[NDArray[np.int64]], NDArray[np.bool_]]


def _check_distinct(
    pairs: NDArray[np.int64], accept: Accept
) -> tuple[NDArray[np.bool_], NDArray[np.int64], int]:
    """``accept`` run once per distinct row of ``pairs`` ``(m, 2)`` (``0 <= i < j < 2**32``):
    the verdict of every row, the accepted distinct rows and the number of distinct rows."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=bool), np.zeros((0, 2), dtype=np.int64), 0
    packed = (pairs[:, 0].astype(np.uint64) << np.uint64(32)) | pairs[:, 1].astype(np.uint64)
    uniq, inverse = np.unique(packed, return_inverse=True)
    distinct = np.empty((len(uniq), 2), dtype=np.int64)
    distinct[:, 0] = (uniq >> np.uint64(32)).astype(np.int64)
    distinct[:, 1] = (uniq & np.uint64(0xFFFFFFFF)).astype(np.int64)
    ok = np.asarray(accept(distinct), dtype=bool)
    return ok[inverse.reshape(-1)], distinct[ok], len(uniq)


def _leader_pairs(
    members: NDArray[np.int64], offsets: NDArray[np.int64], accept: Accept, leaders: int
) -> tuple[NDArray[np.int64], int]:
    """Accepted pairs of the large buckets ``members[offsets[b]:offsets[b + 1]]`` (rows
    ascending in each), found in work linear in their size, and the number of pairs checked.

    Up to ``leaders`` rounds: in every bucket that still has a member neither linked to a leader
    nor a leader, the first such member becomes a leader and is checked against every other
    member of its bucket that is not a leader (linked ones too, so a member similar to two
    leaders joins their groups, as all-pairs would). Members still unlinked after the last round
    are checked against the next unlinked member of their bucket (a chain). Checks are at most
    ``(leaders + 1) * g`` for a bucket of ``g`` (one per distinct pair across buckets: a cluster
    found in every band is checked once); a bucket of mutually similar documents costs ``g``.
    Accepted pairs are pairs of the bucket that verify, so this never joins more than checking
    every pair would; it can join less (two members similar to each other but to no leader
    and not adjacent among the unlinked ones).
    """
    empty = np.zeros((0, 2), dtype=np.int64)
    sizes = np.diff(offsets)
    nb = len(sizes)
    if nb == 0:
        return empty, 0
    bucket = np.repeat(np.arange(nb, dtype=np.int64), sizes)
    linked = np.zeros(len(members), dtype=bool)
    leader = np.zeros(len(members), dtype=bool)
    found: list[NDArray[np.int64]] = []
    checked = 0
    for _ in range(leaders):
        free = np.flatnonzero(~linked & ~leader)
        if len(free) == 0:
            break
        fb = bucket[free]
        new = free[np.r_[True, fb[1:] != fb[:-1]]]  # the first free member of each bucket
        leader[new] = True
        lead = np.full(nb, -1, dtype=np.int64)
        lead[bucket[new]] = new
        sel = np.flatnonzero((lead[bucket] >= 0) & ~leader)
        a, b = members[lead[bucket[sel]]], members[sel]
        ok, acc, k = _check_distinct(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1), accept)
        linked[sel[ok]] = True
        found.append(acc)
        checked += k
    rest = np.flatnonzero(~linked & ~leader)
    if len(rest) > 1:
        same = bucket[rest[1:]] == bucket[rest[:-1]]
        chain = np.stack([members[rest[:-1][same]], members[rest[1:][same]]], axis=1)
        _, acc, k = _check_distinct(chain, accept)
        found.append(acc)
        checked += k
    return (np.concatenate(found) if found else empty), checked


def _verify_piece(
    pairs: NDArray[np.int64],
    members: NDArray[np.int64],
    offsets: NDArray[np.int64],
    accept: Accept,
    leaders: int,
) -> tuple[NDArray[np.int64], int]:
    """Accepted pairs of one piece of ``_native.CandidateBuckets`` (every pair of its small
    buckets, leaders in its large ones) and the number of pairs checked."""
    small = pairs[np.asarray(accept(pairs), dtype=bool)] if len(pairs) else pairs
    large, checked = _leader_pairs(members, offsets, accept, leaders)
    return np.concatenate([small, large]), len(pairs) + checked


def optimal_bands(
    threshold: float,
    num_perm: int = 128,
    fp_weight: float = FP_WEIGHT,
    fn_weight: float = FN_WEIGHT,
) -> tuple[int, int]:
    """``(bands, rows)``, ``bands * rows <= num_perm``, minimising
    ``fp_weight * int_0^t P(s) ds + fn_weight * int_t^1 (1 - P(s)) ds`` with
    ``P(s) = 1 - (1 - s**rows)**bands``. At ``threshold=0.8, num_perm=128`` the defaults give
    16 x 8 (P(0.85) = 0.994); datasketch's equal weights give 9 x 13 (P(0.85) = 0.69).

    The search tries every pair (about ``num_perm * ln(num_perm)`` of them), so ``num_perm``
    is at most :data:`MAX_NUM_PERM` (8192: under a second); it runs without the GIL and
    stops with ``KeyboardInterrupt`` on Ctrl-C.
    """
    return _native.optimal_bands(
        _check_threshold(threshold),
        _check_num_perm(num_perm),
        float(fp_weight),
        float(fn_weight),
    )


def candidate_probability(jaccard: Any, bands: int, rows: int) -> Any:
    """The S-curve ``1 - (1 - J**rows)**bands``: probability that a pair becomes a candidate."""
    j = np.asarray(jaccard, dtype=np.float64)
    return 1.0 - (1.0 - j**rows) ** bands


def verification_threshold(threshold: float, num_perm: int, margin_sd: float = 0.0) -> float:
    """Estimated-Jaccard cut that accepts a candidate pair: ``t - margin_sd * sqrt(t(1-t)/k)``.

    :func:`deduplicate` and :class:`LSHIndex` use ``margin_sd=0``: accept when the estimate is
    at least the threshold. The estimate's standard deviation is ``sqrt(J(1-J)/k)`` (0.032 at
    J = 0.85, k = 128), so a pair at exactly J = t passes half the time, one at J = t + 0.05
    about 94 % of the time (before transitivity through other pairs of its cluster), and one
    at J = t - 0.1 about 0.7 %. Cutting lower (``margin_sd > 0``) buys recall just above ``t``
    with removals of documents below it; docs/dedup.md has the measured trade-off.
    """
    t = _check_threshold(threshold)
    k = _check_positive("num_perm", num_perm)
    if not margin_sd >= 0.0:
        raise ValueError(f"margin_sd must be >= 0, got {margin_sd}")
    return t - margin_sd * math.sqrt(t * (1.0 - t) / k)


# --- MinHasher ----------------------------------------------------------------------------


class MinHasher:
    """Signature maker: ``MinHasher(num_perm=128, ngram=5, tokenizer="word", seed=1)``.

    Equal parameters give bit-identical signatures on every platform and thread count.
    """

    def __init__(
        self,
        num_perm: int = 128,
        ngram: int = 5,
        tokenizer: str = "word",
        seed: int = 1,
        errors: str = "strict",
    ) -> None:
        self.num_perm = _check_num_perm(num_perm)
        self.ngram = _check_ngram(ngram)
        self.tokenizer = _check_choice("tokenizer", tokenizer, _TOKENIZERS)
        self.seed = _check_seed(seed)
        self.errors = _check_choice("errors", errors, _ERRORS)

    def __repr__(self) -> str:
        return (
            f"MinHasher(num_perm={self.num_perm}, ngram={self.ngram}, "
            f"tokenizer={self.tokenizer!r}, seed={self.seed})"
        )

    def signatures(self, texts: Texts) -> NDArray[np.uint32]:
        """Signatures ``(n, num_perm)`` uint32 of ``n`` str/bytes documents."""
        return _native.signatures(
            _as_texts(texts), self.num_perm, self.ngram, self.tokenizer, self.seed, self.errors
        )

    @staticmethod
    def jaccard(a: NDArray[np.uint32], b: NDArray[np.uint32]) -> Any:
        """Estimated Jaccard of two signatures ``(k,)`` (a float), or row-wise of ``(n, k)``
        arrays (``(n,)`` float64). Empty signatures estimate 0.0."""
        a = np.asarray(a)
        b = np.asarray(b)
        if a.shape != b.shape or a.ndim not in (1, 2) or a.shape[-1] == 0:
            raise ValueError(
                f"signatures must have equal shapes (k,) or (n, k), k >= 1; got {a.shape} and {b.shape}"
            )
        if a.dtype != np.uint32 or b.dtype != np.uint32:
            raise TypeError(f"signatures must be uint32, got {a.dtype} and {b.dtype}")
        empty = np.uint32(0xFFFFFFFF)
        est = (a == b).mean(axis=-1)
        est = np.where((a == empty).all(axis=-1) | (b == empty).all(axis=-1), 0.0, est)
        return float(est) if a.ndim == 1 else est.astype(np.float64)


# --- deduplicate --------------------------------------------------------------------------


@dataclass(frozen=True)
class DedupStats:
    """Counts of one :func:`deduplicate` run.

    ``exact_duplicates``: documents removed because their normalised text equals an earlier
    one's; ``near_duplicates``: further documents removed through verified near-duplicate
    pairs; ``clusters``: clusters with two or more documents; ``candidate_pairs``: pairs of
    exact-unique documents checked (every pair of a bucket of up to :data:`MAX_BUCKET`
    documents, leader and chain pairs of a larger one), ``verified_pairs``: those accepted.
    """

    documents: int
    exact_duplicates: int
    near_duplicates: int
    clusters: int
    bands: int
    rows: int
    seconds: float
    candidate_pairs: int = 0
    verified_pairs: int = 0


@dataclass(frozen=True)
class DedupResult:
    """``keep``: ``(n,)`` bool, True for documents to keep (one per cluster); ``cluster``:
    ``(n,)`` int64, the index of the cluster's kept document (a document alone in its cluster
    has its own index)."""

    keep: NDArray[np.bool_]
    cluster: NDArray[np.int64]
    stats: DedupStats


def _exact_representatives(hashes: NDArray[np.uint64]) -> NDArray[np.int64]:
    """For each document, the first index with the same exact hash."""
    n = hashes.shape[0]
    if n == 0:
        return np.empty(0, dtype=np.int64)
    order = np.argsort(hashes, kind="stable")
    sorted_h = hashes[order]
    starts = np.flatnonzero(np.r_[True, sorted_h[1:] != sorted_h[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rep = np.empty(n, dtype=np.int64)
    rep[order] = np.repeat(order[starts], sizes)
    return rep


def deduplicate(
    texts: Texts,
    threshold: float = 0.8,
    num_perm: int = 128,
    ngram: int = 5,
    tokenizer: str = "word",
    seed: int = 1,
    bands: int | None = None,
    rows: int | None = None,
    verify: str = "estimate",
    keep: str = "first",
    errors: str = "strict",
) -> DedupResult:
    """Find exact and near duplicates among ``texts`` and pick one document per cluster.

    1. Exact pass: documents with equal normalised text (NFKC + lowercase, so two empty
       documents are exact duplicates) form one group.
    2. Near pass, on the first document of each exact group: MinHash signatures, LSH banding
       (``bands`` x ``rows``, chosen by :func:`optimal_bands` unless both are given),
       candidate pairs, then verification: ``verify="estimate"`` accepts a pair whose
       estimated Jaccard (from the signatures) is at least ``threshold``; ``verify="exact"``
       accepts exact shingle-set Jaccard >= ``threshold`` (shingles recomputed for candidate
       documents only). Documents without shingles are never near
       duplicates. Candidates are every pair of a bucket (documents sharing a band hash) of
       up to :data:`MAX_BUCKET` documents; a larger bucket (a template shared by thousands
       of pages) is checked through :data:`BUCKET_LEADERS` leaders instead, in linear work.
    3. Union-find over exact and accepted pairs; ``keep="first"`` keeps the first document of
       each cluster in input order, ``keep="last"`` the last. Results do not depend on the
       thread count.
    """
    start = time.perf_counter()
    threshold = _check_threshold(threshold)
    num_perm = _check_num_perm(num_perm)
    ngram = _check_ngram(ngram)
    _check_choice("tokenizer", tokenizer, _TOKENIZERS)
    _check_choice("verify", verify, _VERIFY)
    _check_choice("keep", keep, _KEEP)
    _check_choice("errors", errors, _ERRORS)
    seed = _check_seed(seed)
    bands, rows = _resolve_banding(threshold, num_perm, bands, rows)
    docs = _as_texts(texts)
    n = len(docs)

    rep = _exact_representatives(_native.exact_hashes(docs, errors))
    index = np.arange(n, dtype=np.int64)
    dup = np.flatnonzero(rep != index)
    exact_pairs = np.stack([rep[dup], dup], axis=1)
    uniques = np.flatnonzero(rep == index)
    unique_docs = docs if uniques.shape[0] == n else [docs[i] for i in uniques.tolist()]

    sigs = _native.signatures(unique_docs, num_perm, ngram, tokenizer, seed, errors)
    if verify == "estimate":
        cut = verification_threshold(threshold, num_perm)

        def accept(p: NDArray[np.int64]) -> NDArray[np.bool_]:
            return _native.estimate_jaccard_pairs(sigs, p) >= cut
    else:

        def accept(p: NDArray[np.int64]) -> NDArray[np.bool_]:
            sim = _native.exact_jaccard_pairs(unique_docs, p, ngram, tokenizer, errors)
            return sim >= threshold

    buckets = _native.CandidateBuckets(_native.band_hashes(sigs, bands, rows), MAX_BUCKET)
    found: list[NDArray[np.int64]] = []
    checked = 0
    while (piece := buckets.next_piece(_ALL_UNITS)) is not None:
        near, k = _verify_piece(*piece, accept, BUCKET_LEADERS)
        found.append(near)
        checked += k
    accepted = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate([exact_pairs, uniques[accepted]]).astype(np.int64, copy=False)
    cluster = _native.connected_components(n, np.ascontiguousarray(pairs))
    if keep == "last":
        last = np.zeros(n, dtype=np.int64)
        np.maximum.at(last, cluster, index)
        cluster = last[cluster]
    keep_mask = cluster == index
    kept = int(keep_mask.sum())
    sizes = np.bincount(cluster, minlength=n)
    stats = DedupStats(
        documents=n,
        exact_duplicates=int(n - uniques.shape[0]),
        near_duplicates=int(uniques.shape[0] - kept),
        clusters=int((sizes >= 2).sum()),
        bands=bands,
        rows=rows,
        seconds=time.perf_counter() - start,
        candidate_pairs=int(checked),
        verified_pairs=int(accepted.shape[0]),
    )
    return DedupResult(keep=keep_mask, cluster=cluster, stats=stats)


# --- LSHIndex -----------------------------------------------------------------------------


class _Growable:
    """Rows appended in amortised O(rows): the capacity doubles, old rows are copied once."""

    def __init__(self, row_shape: tuple[int, ...], dtype: Any) -> None:
        self._buf = np.empty((0, *row_shape), dtype=dtype)
        self.n = 0

    def append(self, rows: NDArray[Any]) -> None:
        need = self.n + rows.shape[0]
        if need > self._buf.shape[0]:
            cap = max(need, 2 * self._buf.shape[0], 64)
            new = np.empty((cap, *self._buf.shape[1:]), dtype=self._buf.dtype)
            new[: self.n] = self._buf[: self.n]
            self._buf = new
        self._buf[self.n : need] = rows
        self.n = need

    @property
    def view(self) -> NDArray[Any]:
        return self._buf[: self.n]


# Rows inserted since the last full merge are searched in a small sorted tail of their own;
# past this many they are merged into the main sorted arrays (a linear merge of two runs).
_LSH_TAIL_ROWS = 4096


class LSHIndex:
    """A growing set of signatures with per-band sorted band hashes, for queries and for
    deduplicating a new shard against everything inserted before.

    ``LSHIndex(threshold=0.8, num_perm=128, bands=None, rows=None)``; ``bands``/``rows``
    default to :func:`optimal_bands`. Keys are ints (default: insertion numbers) or str.
    Queries return keys whose signature shares a band with the query and, unless
    ``verify=False``, whose estimated Jaccard is at least :func:`verification_threshold`.
    """

    def __init__(
        self,
        threshold: float = 0.8,
        num_perm: int = 128,
        bands: int | None = None,
        rows: int | None = None,
    ) -> None:
        self.threshold = _check_threshold(threshold)
        self.num_perm = _check_positive("num_perm", num_perm)
        self.bands, self.rows = _resolve_banding(self.threshold, self.num_perm, bands, rows)
        self._rows = _Growable((self.num_perm,), np.uint32)
        self._ikeys: _Growable | None = _Growable((), np.int64)
        self._str_keys: list[str] | None = None
        # Per-band sorted band hashes and their rows: `_main` covers rows [0, _main_rows),
        # `_tail` rows [_main_rows, _tail_rows); `None` when not built yet.
        self._main: tuple[NDArray[np.uint64], NDArray[np.int64]] | None = None
        self._main_rows = 0
        self._tail: tuple[NDArray[np.uint64], NDArray[np.int64]] | None = None
        self._tail_rows = 0

    @property
    def _sigs(self) -> NDArray[np.uint32]:
        return self._rows.view

    @property
    def _int_keys(self) -> NDArray[np.int64] | None:
        return None if self._ikeys is None else self._ikeys.view

    def __len__(self) -> int:
        return self._rows.n

    def __repr__(self) -> str:
        return (
            f"LSHIndex(threshold={self.threshold}, num_perm={self.num_perm}, "
            f"bands={self.bands}, rows={self.rows}, entries={len(self)})"
        )

    def insert(self, sigs: NDArray[np.uint32], keys: Sequence[Any] | None = None) -> None:
        """Add signatures ``(m, num_perm)`` uint32 under ``keys`` (``m`` ints or ``m`` str;
        default: consecutive ints continuing from ``len(self)``)."""
        sigs = _check_signatures(np.asarray(sigs), self.num_perm)
        m = sigs.shape[0]
        if keys is None:
            if self._int_keys is None:
                raise ValueError("this index has str keys: pass keys to insert")
            new_int = np.arange(len(self), len(self) + m, dtype=np.int64)
            new_str = None
        else:
            keys = list(keys) if not isinstance(keys, np.ndarray) else keys
            if len(keys) != m:
                raise ValueError(f"{m} signatures but {len(keys)} keys")
            is_str = m > 0 and all(isinstance(k, str) for k in keys)
            if is_str:
                new_int, new_str = None, list(keys)
            else:
                arr = np.asarray(keys)
                if m > 0 and not np.issubdtype(arr.dtype, np.integer):
                    raise TypeError(f"keys must be all int or all str, got dtype {arr.dtype}")
                new_int, new_str = arr.astype(np.int64), None
        if new_str is not None:
            if self._str_keys is None:
                if len(self) > 0:
                    raise TypeError("this index has int keys, got str keys")
                self._str_keys, self._ikeys = [], None
            self._str_keys.extend(new_str)
        else:
            if self._ikeys is None:
                if m > 0:
                    raise TypeError("this index has str keys, got int keys")
            else:
                assert new_int is not None
                self._ikeys.append(new_int)
        if m:
            self._rows.append(sigs)

    def _sorted_bands(self, first: int, last: int) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
        """Band hashes of rows [first, last) sorted per band ``(bands, m)``, with their rows."""
        bh = _native.band_hashes(self._sigs[first:last], self.bands, self.rows)
        order = np.argsort(bh, axis=0, kind="stable").T.copy()
        return np.take_along_axis(bh.T, order, axis=1), order.astype(np.int64) + first

    def _consolidate(self) -> list[tuple[NDArray[np.uint64], NDArray[np.int64]]]:
        """The sorted parts covering every row: the main part, plus a tail of recent rows."""
        n = len(self)
        if self._main is None:
            self._main, self._main_rows = self._sorted_bands(0, n), n
            self._tail = None
        elif n - self._main_rows > _LSH_TAIL_ROWS:
            # Stable sort of two sorted runs per band (timsort): a linear merge.
            new_h, new_o = self._sorted_bands(self._main_rows, n)
            h = np.concatenate([self._main[0], new_h], axis=1)
            o = np.concatenate([self._main[1], new_o], axis=1)
            idx = np.argsort(h, axis=1, kind="stable")
            self._main = (np.take_along_axis(h, idx, axis=1), np.take_along_axis(o, idx, axis=1))
            self._main_rows, self._tail = n, None
        if self._main_rows == n:
            return [self._main]
        if self._tail is None or self._tail_rows != n:
            self._tail, self._tail_rows = self._sorted_bands(self._main_rows, n), n
        return [self._main, self._tail]

    def _key(self, rows: NDArray[np.int64]) -> list[Any]:
        if self._str_keys is not None:
            return [self._str_keys[i] for i in rows.tolist()]
        assert self._int_keys is not None
        return self._int_keys[rows].tolist()

    def query_pairs(
        self, sigs: NDArray[np.uint32], verify: bool = True
    ) -> tuple[NDArray[np.int64], NDArray[np.float64]]:
        """Matches of many queries: ``(pairs (m, 2) int64 of (query row, index row),
        estimated Jaccard (m,))``, sorted by query row then index row."""
        sigs = _check_signatures(np.asarray(sigs), self.num_perm)
        parts = self._consolidate()
        qbh = _native.band_hashes(np.ascontiguousarray(sigs), self.bands, self.rows)
        found = []
        for hashes, order in parts:
            for j in range(self.bands):
                q = qbh[:, j]
                lo = np.searchsorted(hashes[j], q, side="left")
                hi = np.searchsorted(hashes[j], q, side="right")
                counts = np.where(q == 0, 0, hi - lo)
                total = int(counts.sum())
                if total == 0:
                    continue
                qrow = np.repeat(np.arange(q.shape[0], dtype=np.int64), counts)
                offsets = np.repeat(np.cumsum(counts) - counts, counts)
                pos = np.repeat(lo, counts) + (np.arange(total) - offsets)
                found.append(np.stack([qrow, order[j][pos]], axis=1))
        if not found:
            return np.empty((0, 2), dtype=np.int64), np.empty(0, dtype=np.float64)
        pairs = np.unique(np.concatenate(found), axis=0)
        est = MinHasher.jaccard(sigs[pairs[:, 0]], self._sigs[pairs[:, 1]])
        if verify:
            ok = est >= verification_threshold(self.threshold, self.num_perm)
            pairs, est = pairs[ok], est[ok]
        return pairs, est

    def query_many(self, sigs: NDArray[np.uint32], verify: bool = True) -> list[list[Any]]:
        """Keys matching each query row of ``sigs`` ``(m, num_perm)``."""
        sigs = _check_signatures(np.asarray(sigs), self.num_perm)
        pairs, _ = self.query_pairs(sigs, verify=verify)
        bounds = np.searchsorted(pairs[:, 0], np.arange(sigs.shape[0] + 1))
        keys = self._key(pairs[:, 1])
        return [keys[bounds[i] : bounds[i + 1]] for i in range(sigs.shape[0])]

    def query(self, signature: NDArray[np.uint32], verify: bool = True) -> list[Any]:
        """Keys matching one signature ``(num_perm,)`` uint32."""
        sig = np.asarray(signature)
        if sig.ndim != 1:
            raise ValueError(f"signature must have shape (num_perm,), got {sig.shape}")
        return self.query_many(sig[None, :], verify=verify)[0]

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index atomically (temporary file + rename); format in ``docs/dedup.md``."""
        self._consolidate()
        keys: Any = self._str_keys if self._str_keys is not None else self._int_keys
        _native.lsh_index_save(
            os.fspath(path), self.threshold, self.bands, self.rows, self._sigs, keys
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LSHIndex:
        """Read an index written by :meth:`save`; a corrupt or truncated file raises ValueError."""
        threshold, num_perm, bands, rows, sigs, keys = _native.lsh_index_load(os.fspath(path))
        index = cls(threshold, num_perm, bands, rows)
        if isinstance(keys, list):
            index._str_keys, index._ikeys = keys, None
        else:
            assert index._ikeys is not None
            index._ikeys.append(keys)
        index._rows.append(sigs)
        return index
