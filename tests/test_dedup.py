"""Tests of slimforge.dedup: a pure-Python reference of the scheme, properties, accuracy on real
text against exact all-pairs Jaccard, datasketch side by side, the LSH index file."""

from __future__ import annotations

import math
import os
import random
import re
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import slimforge
from slimforge import _native
from slimforge.dedup import (
    LSHIndex,
    MinHasher,
    band_hashes,
    candidate_pairs,
    candidate_probability,
    connected_components,
    deduplicate,
    estimate_jaccard_pairs,
    exact_hashes,
    exact_jaccard_pairs,
    optimal_bands,
    signatures,
    verification_threshold,
)
from slimforge.dedup.synthetic import local_documents, near_duplicate_corpus

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1
EMPTY = np.uint32(M32)

# --- pure-Python reference of the documented scheme -------------------------------------------


def ref_splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & M64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return state, z ^ (z >> 31)


def ref_fmix64(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & M64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & M64
    return k ^ (k >> 33)


def ref_normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def ref_tokens(text: str, tokenizer: str) -> list[str]:
    norm = ref_normalize(text)
    if tokenizer == "word":
        return re.findall(r"[^\W_]+", norm)
    return list(" ".join(norm.split()))


def ref_shingles(text: str, ngram: int, tokenizer: str) -> list[tuple[str, ...]]:
    toks = ref_tokens(text, tokenizer)
    if not toks:
        return []
    if len(toks) < ngram:
        return [tuple(toks)]
    return [tuple(toks[i : i + ngram]) for i in range(len(toks) - ngram + 1)]


def ref_shingle_hashes(text: str, ngram: int, tokenizer: str, seed: int) -> list[int]:
    state, mult = 0x243F6A8885A308D3, []
    for _ in range(ngram):
        state, z = ref_splitmix64(state)
        mult.append(z | 1)
    out = []
    for sh in ref_shingles(text, ngram, tokenizer):
        acc = 0
        for c, tok in zip(mult, sh, strict=False):
            # xxh3_64 itself is the xxhash-rust crate's, exposed for this reference.
            acc = (acc + c * _native.xxh3_64(tok.encode("utf-8"), seed)) & M64
        out.append(ref_fmix64(acc))
    return out


def ref_permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    state, a, b = seed, [], []
    for _ in range(num_perm):
        state, z = ref_splitmix64(state)
        a.append((z & M32) | 1)
        state, z = ref_splitmix64(state)
        b.append(z & M32)
    return np.array(a, dtype=np.uint64), np.array(b, dtype=np.uint64)


def ref_signature(text: str, num_perm: int, ngram: int, tokenizer: str, seed: int) -> np.ndarray:
    xs = np.array([h & M32 for h in ref_shingle_hashes(text, ngram, tokenizer, seed)], np.uint64)
    if xs.size == 0:
        return np.full(num_perm, M32, dtype=np.uint32)
    a, b = ref_permutations(num_perm, seed)
    # a < 2**32 and x < 2**32, so a*x + b < 2**64: no uint64 overflow before the mask.
    vals = (a[:, None] * xs[None, :] + b[:, None]) & np.uint64(M32)
    return vals.min(axis=1).astype(np.uint32)


# Characters on which Python's str.isalnum/isspace/lower and Rust's char::is_alphanumeric/
# is_whitespace/to_lowercase agree (both sides' Unicode tables), incl. NFKC-changing ones.
ALPHABET = "abcxyzABCXYZ0189 _-.,;:!?'\"()\n\tàéîõüßÀÉÎÕÜøØæÆΣσςΑβγΩжЖя中文字日本ﬁﬂＡｂ１２①½"
texts_strategy = st.text(alphabet=ALPHABET, max_size=60)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\t ",
        "one",
        "The quick brown fox jumps over the lazy dog, twice: the quick brown fox!",
        "ΟΔΥΣΣΕΥΣ ΣΟΦΟΣ έφυγε",
        "Ｆｕｌｌ-width ﬁne ① snake_case x2 中文字",
    ],
)
@pytest.mark.parametrize("tokenizer,ngram", [("word", 5), ("word", 1), ("char", 5), ("word", 3)])
def test_signatures_match_python_reference(text: str, tokenizer: str, ngram: int) -> None:
    got = signatures([text], num_perm=70, ngram=ngram, tokenizer=tokenizer, seed=12345)
    want = ref_signature(text, 70, ngram, tokenizer, 12345)
    np.testing.assert_array_equal(got[0], want)


@given(texts=st.lists(texts_strategy, min_size=1, max_size=5), seed=st.integers(0, 2**64 - 1))
def test_reference_property(texts: list[str], seed: int) -> None:
    for tokenizer in ("word", "char"):
        got = signatures(texts, num_perm=33, ngram=3, tokenizer=tokenizer, seed=seed)
        for row, text in zip(got, texts, strict=True):
            np.testing.assert_array_equal(row, ref_signature(text, 33, 3, tokenizer, seed))


@given(texts=st.lists(texts_strategy, min_size=1, max_size=6))
def test_exact_hashes_follow_normalisation(texts: list[str]) -> None:
    h = exact_hashes(texts)
    want = [_native.xxh3_64(ref_normalize(t).encode("utf-8"), 0) for t in texts]
    assert h.dtype == np.uint64 and h.tolist() == want


@given(a=texts_strategy, b=texts_strategy)
def test_exact_jaccard_property(a: str, b: str) -> None:
    pairs = np.array([[0, 1], [1, 0], [0, 0]], dtype=np.int64)
    for tokenizer in ("word", "char"):
        got = exact_jaccard_pairs([a, b], pairs, ngram=2, tokenizer=tokenizer)
        sa, sb = set(ref_shingles(a, 2, tokenizer)), set(ref_shingles(b, 2, tokenizer))
        want = len(sa & sb) / len(sa | sb) if sa | sb else 0.0
        assert got[0] == pytest.approx(want) and got[1] == got[0]
        assert got[2] == (1.0 if sa else 0.0)


# --- properties -------------------------------------------------------------------------------

words_text = st.lists(
    st.sampled_from("alpha beta gamma delta eps zeta eta theta".split()), max_size=40
)


@given(words=words_text.filter(bool))
def test_identical_texts_estimate_one(words: list[str]) -> None:
    text = " ".join(words)
    sigs = signatures([text, text.upper(), text])
    assert MinHasher.jaccard(sigs[0], sigs[1]) == 1.0
    assert MinHasher.jaccard(sigs[0], sigs[2]) == 1.0


@given(
    docs=st.lists(words_text.map(" ".join), min_size=1, max_size=25),
    perm_seed=st.integers(0, 2**32 - 1),
)
def test_document_order_does_not_change_clusters(docs: list[str], perm_seed: int) -> None:
    def partition(texts: list[str], ids: list[int]) -> set[frozenset[int]]:
        res = deduplicate(texts, threshold=0.7, num_perm=64, ngram=2)
        groups: dict[int, set[int]] = {}
        for i, c in enumerate(res.cluster.tolist()):
            groups.setdefault(c, set()).add(ids[i])
        assert res.keep.sum() == len(groups)
        return {frozenset(g) for g in groups.values()}

    order = list(range(len(docs)))
    random.Random(perm_seed).shuffle(order)
    assert partition(docs, list(range(len(docs)))) == partition([docs[i] for i in order], order)


@given(texts=st.lists(texts_strategy, min_size=1, max_size=4), seed=st.integers(0, 2**63))
def test_seeds_reproduce_and_differ(texts: list[str], seed: int) -> None:
    a = signatures(texts, num_perm=32, seed=seed)
    np.testing.assert_array_equal(a, signatures(texts, num_perm=32, seed=seed))
    b = signatures(texts, num_perm=32, seed=seed + 1)
    for ra, rb in zip(a, b, strict=True):
        if not (ra == EMPTY).all():
            assert not np.array_equal(ra, rb)


def test_thread_count_does_not_change_results() -> None:
    texts = local_documents()[:300]
    before = slimforge.get_num_threads()
    try:
        slimforge.set_num_threads(1)
        s1 = signatures(texts)
        r1 = deduplicate(texts, threshold=0.5)
        slimforge.set_num_threads(2)
        s2 = signatures(texts)
        r2 = deduplicate(texts, threshold=0.5)
    finally:
        slimforge.set_num_threads(before)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(r1.cluster, r2.cluster)
    np.testing.assert_array_equal(r1.keep, r2.keep)


def test_empty_whitespace_and_short_documents() -> None:
    texts = ["", "", "  \n", "...", "hi", "Hi!", "a b c d e f", "ü"]
    sigs = signatures(texts, num_perm=16)
    for i in range(4):
        assert (sigs[i] == EMPTY).all()
    assert not (sigs[4] == EMPTY).all()
    np.testing.assert_array_equal(sigs[4], sigs[5])
    assert MinHasher.jaccard(sigs[0], sigs[1]) == 0.0
    bh = band_hashes(sigs, 4, 4)
    assert (bh[:4] == 0).all() and (bh[4:] != 0).all()
    pairs = candidate_pairs(bh)
    assert pairs.tolist() == [[4, 5]]
    res = deduplicate(texts, threshold=0.8, num_perm=16)
    # Identical empty strings are exact duplicates; the other empty-of-tokens docs stay.
    assert res.keep.tolist() == [True, False, True, True, True, False, True, True]
    assert res.cluster.tolist() == [0, 0, 2, 3, 4, 4, 6, 7]
    # "hi" and "hi!" differ as normalised text, so the second is a near duplicate.
    assert res.stats.exact_duplicates == 1 and res.stats.near_duplicates == 1
    assert res.stats.clusters == 2 and res.stats.documents == 8
    empty = deduplicate([])
    assert empty.keep.shape == (0,) and empty.stats.documents == 0


def test_unicode_normalisation_and_bytes() -> None:
    sigs = signatures(["ﬁne ＷＯＲＤＳ here", b"fine words here", "FINE words HERE"], num_perm=8)
    np.testing.assert_array_equal(sigs[0], sigs[1])
    np.testing.assert_array_equal(sigs[0], sigs[2])
    with pytest.raises(ValueError, match="document 1 is not valid UTF-8"):
        signatures(["ok", b"bad \xff byte"])
    replaced = signatures([b"bad \xff byte"], errors="replace")
    np.testing.assert_array_equal(replaced, signatures(["bad \ufffd byte"]))
    with pytest.raises(ValueError, match="document 0 cannot be encoded"):
        signatures(["lone \ud800 surrogate"])
    np.testing.assert_array_equal(
        signatures(["lone \ud800 surrogate"], errors="replace"),
        signatures(["lone ? surrogate"]),
    )
    with pytest.raises(TypeError, match="document 1 must be str or bytes"):
        signatures(["a", 3])  # type: ignore[list-item]


def test_keep_last_and_cluster_ids() -> None:
    base = "one two three four five six seven eight nine ten eleven twelve"
    texts = ["unrelated words entirely here now", base, base + " thirteen", base.upper()]
    first = deduplicate(texts, threshold=0.7, verify="exact")
    last = deduplicate(texts, threshold=0.7, verify="exact", keep="last")
    assert first.cluster.tolist() == [0, 1, 1, 1] and first.keep.tolist() == [1, 1, 0, 0]
    assert last.cluster.tolist() == [0, 3, 3, 3] and last.keep.tolist() == [1, 0, 0, 1]


# --- primitives and validation -----------------------------------------------------------------


def test_connected_components_matches_reference() -> None:
    rng = np.random.default_rng(3)
    n = 200
    pairs = rng.integers(0, n, size=(150, 2)).astype(np.int64)
    got = connected_components(n, pairs)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        parent[max(ri, rj)] = min(ri, rj)
    assert got.tolist() == [find(i) for i in range(n)]
    np.testing.assert_array_equal(connected_components(n, pairs[::-1].copy()), got)


def test_candidate_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    bh = rng.integers(1, 6, size=(60, 3)).astype(np.uint64)
    bh[rng.random(bh.shape) < 0.2] = 0
    want = sorted(
        {
            (i, j)
            for i in range(60)
            for j in range(i + 1, 60)
            for b in range(3)
            if bh[i, b] == bh[j, b] != 0
        }
    )
    got = candidate_pairs(bh)
    assert got.dtype == np.int64 and [tuple(p) for p in got.tolist()] == want


def test_huge_buckets_error_or_star_chain() -> None:
    bh = np.full((70_000, 1), 5, dtype=np.uint64)
    with pytest.raises(ValueError, match="largest bucket has 70000 documents"):
        candidate_pairs(bh)
    capped = candidate_pairs(bh, max_bucket=100)
    assert capped.shape == (2 * 70_000 - 3, 2)
    assert connected_components(70_000, capped).max() == 0
    small = np.array([[1], [1], [1], [2]], dtype=np.uint64)
    assert candidate_pairs(small, max_bucket=3).tolist() == [[0, 1], [0, 2], [1, 2]]
    assert candidate_pairs(small, max_bucket=2).tolist() == [[0, 1], [0, 2], [1, 2]]
    with pytest.raises(ValueError, match="max_bucket"):
        candidate_pairs(small, max_bucket=1)


def test_estimates_accept_readonly_memmap(tmp_path: Path) -> None:
    sigs = signatures(local_documents()[:50])
    path = tmp_path / "sigs.u32"
    sigs.tofile(path)
    mm = np.memmap(path, dtype=np.uint32, mode="r", shape=sigs.shape)
    pairs = np.array([[0, 1], [2, 2], [3, 49]], dtype=np.int64)
    est = estimate_jaccard_pairs(mm, pairs)
    np.testing.assert_array_equal(est, (sigs[pairs[:, 0]] == sigs[pairs[:, 1]]).mean(axis=1))
    np.testing.assert_array_equal(band_hashes(mm, 16, 8), band_hashes(sigs, 16, 8))


def test_optimal_bands_and_s_curve() -> None:
    assert optimal_bands(0.8, 128) == (16, 8)
    assert optimal_bands(0.8, 128, fp_weight=0.5, fn_weight=0.5) == (9, 13)
    b, r = optimal_bands(0.5, 64)
    assert b * r <= 64
    assert candidate_probability(0.85, 16, 8) > 0.99
    assert verification_threshold(0.8, 128) == 0.8
    assert math.isclose(verification_threshold(0.8, 128, 0.5), 0.8 - 0.5 * math.sqrt(0.16 / 128))


def test_validation_errors() -> None:
    sigs = signatures(["a b c d e f"], num_perm=16)
    with pytest.raises(ValueError, match="threshold"):
        deduplicate(["a"], threshold=0.0)
    with pytest.raises(ValueError, match="threshold"):
        deduplicate(["a"], threshold=1.5)
    with pytest.raises(ValueError, match="num_perm"):
        MinHasher(num_perm=0)
    with pytest.raises(ValueError, match="ngram"):
        MinHasher(ngram=0)
    with pytest.raises(ValueError, match="tokenizer"):
        MinHasher(tokenizer="bpe")
    with pytest.raises(ValueError, match="verify"):
        deduplicate(["a"], verify="maybe")
    with pytest.raises(ValueError, match="keep"):
        deduplicate(["a"], keep="random")
    with pytest.raises(ValueError, match="exceeds num_perm"):
        deduplicate(["a"], num_perm=16, bands=5, rows=4)
    with pytest.raises(ValueError, match="exceeds num_perm"):
        _native.band_hashes(sigs, 5, 4)
    with pytest.raises(ValueError, match="at least 1"):
        band_hashes(sigs, 0, 4)
    with pytest.raises(ValueError, match="both bands and rows"):
        LSHIndex(0.8, 128, bands=4)
    with pytest.raises(TypeError, match="uint32"):
        band_hashes(sigs.astype(np.int64), 4, 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uint32"):
        _native.estimate_jaccard_pairs(sigs.astype(np.float32), np.zeros((1, 2), np.int64))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="uint32"):
        band_hashes(sigs[0], 4, 4)
    with pytest.raises(TypeError, match="C-contiguous"):
        _native.band_hashes(np.asfortranarray(np.vstack([sigs, sigs]))[:, ::2], 2, 4)
    with pytest.raises(ValueError, match=r"shape \(m, 2\)"):
        connected_components(3, np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="indices must lie"):
        estimate_jaccard_pairs(sigs, np.array([[0, 1]], dtype=np.int64))
    with pytest.raises(ValueError, match="indices must lie"):
        exact_jaccard_pairs(["a"], np.array([[0, -1]], dtype=np.int64))
    with pytest.raises(TypeError, match="list or tuple"):
        _native.signatures("not a list")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="single str"):
        signatures("not a list")
    with pytest.raises(ValueError, match="errors"):
        signatures(["a"], errors="ignore")
    with pytest.raises(ValueError, match="seed"):
        signatures(["a"], seed=-1)


# --- accuracy on real text ---------------------------------------------------------------------


def exact_all_pairs(docs: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) with at least one common word 5-gram, their exact Jaccard (Python
    reference shingles), and each document's best Jaccard to any other."""
    sparse = pytest.importorskip("scipy.sparse")
    ids: dict[tuple[str, ...], int] = {}
    rows, cols = [], []
    for i, d in enumerate(docs):
        for sh in set(ref_shingles(d, 5, "word")):
            rows.append(i)
            cols.append(ids.setdefault(sh, len(ids)))
    x = sparse.csr_matrix(
        (np.ones(len(rows), np.float64), (rows, cols)), shape=(len(docs), len(ids))
    )
    sizes = np.asarray(x.sum(axis=1)).ravel()
    inter = sparse.triu(x @ x.T, k=1).tocoo()
    pairs = np.stack([inter.row, inter.col], axis=1).astype(np.int64)
    jac = inter.data / (sizes[inter.row] + sizes[inter.col] - inter.data)
    best = np.zeros(len(docs))
    np.maximum.at(best, pairs[:, 0], jac)
    np.maximum.at(best, pairs[:, 1], jac)
    return pairs, jac, best


@pytest.fixture(scope="module")
def accuracy_corpus() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    docs = near_duplicate_corpus(n_base=400, seed=7)
    return (docs, *exact_all_pairs(docs))


def test_exact_jaccard_matches_reference(accuracy_corpus) -> None:
    docs, pairs, jac, _ = accuracy_corpus
    got = exact_jaccard_pairs(docs, pairs)
    np.testing.assert_allclose(got, jac, rtol=0, atol=1e-12)


def test_estimate_error_is_ideal_and_matches_datasketch(accuracy_corpus) -> None:
    datasketch = pytest.importorskip("datasketch")
    docs, pairs, jac, _ = accuracy_corpus
    sel = (jac >= 0.5) & (jac < 1.0)
    assert sel.sum() >= 100, "corpus must have pairs across the Jaccard spectrum"
    p, j = pairs[sel], jac[sel]
    est = estimate_jaccard_pairs(signatures(docs), p)
    mae = float(np.abs(est - j).mean())
    ideal = float(np.mean(np.sqrt(j * (1 - j) / 128))) * math.sqrt(2 / math.pi)
    assert mae <= ideal * 1.15 + 0.002, (mae, ideal)
    assert abs(float((est - j).mean())) < 0.01

    need = sorted(set(p.ravel().tolist()))
    sketches = {}
    for i in need:
        m = datasketch.MinHash(num_perm=128, seed=1)
        m.update_batch([" ".join(sh).encode() for sh in set(ref_shingles(docs[i], 5, "word"))])
        sketches[i] = m
    ds = np.array([sketches[a].jaccard(sketches[b]) for a, b in p.tolist()])
    ds_mae = float(np.abs(ds - j).mean())
    print(
        f"MAE on {sel.sum()} pairs: slimforge {mae:.4f}, datasketch {ds_mae:.4f}, ideal {ideal:.4f}"
    )
    assert mae <= ds_mae + 0.005


@pytest.mark.parametrize("verify", ["estimate", "exact"])
def test_dedup_recall_and_no_false_removals(accuracy_corpus, verify: str) -> None:
    docs, pairs, jac, best = accuracy_corpus
    res = deduplicate(docs, threshold=0.8, verify=verify)
    assert (res.stats.bands, res.stats.rows) == (16, 8)
    true = pairs[jac >= 0.85]
    assert len(true) >= 100
    recall = float((res.cluster[true[:, 0]] == res.cluster[true[:, 1]]).mean())
    removed = ~res.keep
    floor = 0.8 if verify == "exact" else 0.7
    print(
        f"{verify}: recall {recall:.4f} on {len(true)} pairs; removed {removed.sum()}; {res.stats}"
    )
    assert recall >= 0.99
    assert not np.any(removed & (best < floor)), np.sort(best[removed])[:5]
    # Verification only removes: every accepted near pair was a raw band candidate.
    assert res.stats.verified_pairs <= res.stats.candidate_pairs


def test_verification_prevents_raw_band_over_removal(accuracy_corpus) -> None:
    docs, _, _, best = accuracy_corpus
    sigs = signatures(docs)
    cand = candidate_pairs(band_hashes(sigs, 16, 8))
    raw = connected_components(len(docs), cand)
    verified = deduplicate(docs, threshold=0.8)
    raw_removed = raw != np.arange(len(docs))
    assert (~verified.keep).sum() <= raw_removed.sum()
    # Raw collisions alone remove documents far below the threshold; verification does not.
    assert np.any(raw_removed & (best < 0.7))


@pytest.mark.slow
def test_dedup_accuracy_large_corpus() -> None:
    docs = near_duplicate_corpus(n_base=2500, seed=11)
    pairs, jac, best = exact_all_pairs(docs)
    res = deduplicate(docs, threshold=0.8)
    true = pairs[jac >= 0.85]
    recall = float((res.cluster[true[:, 0]] == res.cluster[true[:, 1]]).mean())
    assert recall >= 0.99
    assert not np.any(~res.keep & (best < 0.7))
    sel = (jac >= 0.5) & (jac < 1)
    est = estimate_jaccard_pairs(signatures(docs), pairs[sel])
    assert float(np.abs(est - jac[sel]).mean()) <= 0.034


# --- LSH index ---------------------------------------------------------------------------------


def test_index_query_matches_batch_dedup(tmp_path: Path) -> None:
    docs = near_duplicate_corpus(n_base=200, seed=3)
    old, new = docs[: len(docs) // 2], docs[len(docs) // 2 :]
    hasher = MinHasher()
    index = LSHIndex(threshold=0.8, num_perm=128)
    old_sigs, new_sigs = hasher.signatures(old), hasher.signatures(new)
    index.insert(old_sigs[:50])
    index.insert(old_sigs[50:])
    assert len(index) == len(old)
    qp, est = index.query_pairs(new_sigs)
    # Reference: candidates of the concatenation that cross from new to old, verified alike.
    allsigs = np.concatenate([old_sigs, new_sigs])
    cand = candidate_pairs(band_hashes(allsigs, index.bands, index.rows))
    cross = cand[(cand[:, 0] < len(old)) & (cand[:, 1] >= len(old))]
    ok = estimate_jaccard_pairs(allsigs, cross) >= verification_threshold(0.8, 128)
    want = sorted((j - len(old), i) for i, j in cross[ok].tolist())
    assert [tuple(p) for p in qp.tolist()] == want
    assert len(want) > 0
    per_query = index.query_many(new_sigs)
    assert sum(map(len, per_query)) == len(want)
    q0 = int(qp[0, 0])
    assert index.query(new_sigs[q0]) == per_query[q0]
    assert index.query(old_sigs[7]) and 7 in index.query(old_sigs[7])
    assert index.query(signatures([""])[0]) == []

    path = tmp_path / "shard.lshidx"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["shard.lshidx"]
    loaded = LSHIndex.load(path)
    assert (loaded.threshold, loaded.num_perm, loaded.bands, loaded.rows) == (0.8, 128, 16, 8)
    assert loaded.query_many(new_sigs) == per_query
    loaded.insert(new_sigs[:3])
    assert (
        len(loaded) == len(old) + 3
        and loaded.query(new_sigs[1])
        and len(old) + 1 in loaded.query(new_sigs[1])
    )


@pytest.mark.parametrize("tail_rows", [3, 4096])
def test_index_alternating_inserts_and_queries(
    tail_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Single inserts between queries use the recent-rows tail and, past `tail_rows`, merge it
    # into the main arrays; every answer must equal a fresh index built from the same rows.
    import slimforge.dedup as dd

    monkeypatch.setattr(dd, "_LSH_TAIL_ROWS", tail_rows)
    docs = near_duplicate_corpus(n_base=60, seed=5)
    sigs = MinHasher().signatures(docs)
    index = LSHIndex(threshold=0.8, num_perm=128)
    index.insert(sigs[:10])
    for i in range(10, len(docs)):
        index.insert(sigs[i : i + 1], keys=[i])
        if i % 7 == 0 or i == len(docs) - 1:
            fresh = LSHIndex(threshold=0.8, num_perm=128)
            fresh.insert(sigs[: i + 1])
            probe = sigs[max(0, i - 20) : i + 1]
            got_pairs, got_est = index.query_pairs(probe)
            want_pairs, want_est = fresh.query_pairs(probe)
            np.testing.assert_array_equal(got_pairs, want_pairs)
            np.testing.assert_array_equal(got_est, want_est)
            assert index.query(sigs[i]) == fresh.query(sigs[i])
            assert i in index.query(sigs[i])
    assert len(index) == len(docs)


def test_index_str_keys_and_corruption(tmp_path: Path) -> None:
    sigs = signatures(
        ["alpha beta gamma delta epsilon", "zeta eta theta iota kappa", ""], num_perm=32
    )
    index = LSHIndex(threshold=0.5, num_perm=32)
    index.insert(sigs, keys=["doc-a", "doc-ü", "empty"])
    assert index.query(sigs[1]) == ["doc-ü"]
    with pytest.raises(TypeError, match="str keys"):
        index.insert(sigs[:1], keys=[5])
    with pytest.raises(ValueError, match="pass keys"):
        index.insert(sigs[:1])
    with pytest.raises(ValueError, match="num_perm = 32"):
        index.insert(signatures(["x"], num_perm=16))
    path = tmp_path / "idx"
    index.save(path)
    again = LSHIndex.load(path)
    assert again.query(sigs[0]) == ["doc-a"] and len(again) == 3

    data = bytearray(path.read_bytes())
    data[100] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        LSHIndex.load(path)
    data[100] ^= 0x10
    path.write_bytes(bytes(data[:-20]))
    with pytest.raises(ValueError, match="not a valid LSH index"):
        LSHIndex.load(path)
    path.write_bytes(b"PK\x03\x04 something else entirely")
    with pytest.raises(ValueError, match="magic"):
        LSHIndex.load(path)
    with pytest.raises(OSError, match="could not read"):
        LSHIndex.load(tmp_path / "missing")
    with pytest.raises(OSError):
        index.save(tmp_path / "no-such-dir" / "idx")
    assert sorted(os.listdir(tmp_path)) == ["idx"]
