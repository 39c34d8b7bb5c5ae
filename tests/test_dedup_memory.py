"""Candidates in linear work: templated corpora (one template shared by thousands of documents)
are deduplicated with work and memory linear in the size of their LSH buckets, and corpora with
small buckets get exactly the all-pairs result."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import slimforge
import slimforge.dedup as dd
import slimforge.dedup.stages as dds
from slimforge import _native
from slimforge.data import load_texts
from slimforge.dedup import band_hashes, deduplicate, signatures
from slimforge.dedup.files import dedup_files


def templated(n: int, seed: int = 0, words: int = 330) -> list[str]:
    """``n`` documents: one shared template of ``words`` words plus a unique five-word tail
    (the generator of benches/python/dedup_templated.py)."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 9))) for _ in range(2000)
    ]
    template = " ".join(rng.choices(vocab, k=words))
    return [
        f"{template} item{i} " + " ".join(f"t{rng.randrange(10**9)}" for _ in range(4))
        for i in range(n)
    ]


def unrelated(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"u{rng.randrange(10**6)}" for _ in range(60)) for _ in range(n)]


def mixed_corpus(seed: int = 0, common: int = 250, own: int = 60) -> list[str]:
    """Three templates sharing most of their text (so that their documents meet in large
    buckets in some bands without being near duplicates: Jaccard about 0.65 across templates),
    120 variants of each (a unique tail, some with a few words replaced), interleaved with
    unrelated documents."""
    rng = random.Random(seed)
    shared = templated(1, seed=seed + 100, words=common)[0].rsplit(" ", 5)[0]
    docs: list[str] = []
    for t in range(3):
        words = f"{shared} {templated(1, seed=seed + t, words=own)[0].rsplit(' ', 5)[0]}".split()
        for i in range(120):
            w = list(words)
            for _ in range(rng.choice([0, 0, 0, 1, 2])):
                w[rng.randrange(len(w))] = f"e{rng.randrange(10**6)}"
            docs.append(" ".join(w) + f" doc{t}x{i} z{rng.randrange(10**9)}")
    docs += unrelated(60, seed)
    rng.shuffle(docs)
    return docs


def exhaustive(monkeypatch: pytest.MonkeyPatch, docs: list[str], **kw: object) -> dd.DedupResult:
    """`deduplicate` with every bucket small: every candidate pair verified (the old rule)."""
    with monkeypatch.context() as m:
        m.setattr(dd, "MAX_BUCKET", 2**62)
        return deduplicate(docs, **kw)  # type: ignore[arg-type]


def same_result(a: dd.DedupResult, b: dd.DedupResult) -> None:
    np.testing.assert_array_equal(a.keep, b.keep)
    np.testing.assert_array_equal(a.cluster, b.cluster)


def test_templated_corpus_is_one_cluster_in_linear_work() -> None:
    n = 3000
    docs = templated(n) + unrelated(200)
    res = deduplicate(docs, threshold=0.8)
    assert res.cluster[:n].tolist() == [0] * n
    assert res.keep[n:].all() and res.stats.near_duplicates == n - 1
    # Quadratic would be about 16 bands * n^2 / 2 raw pairs, 4.5 million distinct.
    assert res.stats.candidate_pairs <= 4 * n, res.stats
    assert res.stats.verified_pairs >= n - 1


def test_candidate_work_grows_linearly() -> None:
    work = {}
    for n in (1000, 4000):
        bh = band_hashes(signatures(templated(n)), 16, 8)
        buckets = _native.CandidateBuckets(bh, dd.MAX_BUCKET)
        assert buckets.largest() > dd.MAX_BUCKET
        units = buckets.units_left()
        assert units <= 16 * n  # rows of the large buckets, not their pairs
        work[n] = deduplicate(templated(n)).stats.candidate_pairs
        all_pairs = _native.CandidateBuckets(bh, 2**62).units_left()
        assert all_pairs > 16 * (n // 2) ** 2  # what the exhaustive rule would verify
    assert work[4000] <= 4.5 * work[1000], work


@pytest.mark.parametrize("verify", ["estimate", "exact"])
@pytest.mark.parametrize("corpus", ["templated", "mixed"])
def test_leaders_match_all_pairs_on_templated_corpora(
    monkeypatch: pytest.MonkeyPatch, verify: str, corpus: str
) -> None:
    docs = templated(400) + unrelated(50) if corpus == "templated" else mixed_corpus()
    linear = deduplicate(docs, threshold=0.8, verify=verify)
    assert linear.stats.candidate_pairs <= 6 * len(docs)
    full = exhaustive(monkeypatch, docs, threshold=0.8, verify=verify)
    same_result(linear, full)
    assert full.stats.candidate_pairs > 10 * linear.stats.candidate_pairs


def test_leaders_do_not_depend_on_thread_count() -> None:
    docs = mixed_corpus(seed=5) + templated(1000, seed=9)
    before = slimforge.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            slimforge.set_num_threads(threads)
            results.append(deduplicate(docs))
    finally:
        slimforge.set_num_threads(before)
    same_result(*results)
    assert results[0].stats.candidate_pairs == results[1].stats.candidate_pairs


def test_leader_pairs_rule() -> None:
    """Groups 0..4 interleaved in one bucket; a pair verifies iff same group."""
    members = np.arange(100, dtype=np.int64)
    group = members % 5
    offsets = np.array([0, 100], dtype=np.int64)
    calls = []

    def accept(p: np.ndarray) -> np.ndarray:
        calls.append(len(p))
        assert (p[:, 0] < p[:, 1]).all()
        return group[p[:, 0]] == group[p[:, 1]]

    for leaders in (5, 8):
        calls.clear()
        acc, checked = dd._leader_pairs(members, offsets, accept, leaders)
        ids = dd.connected_components(100, acc)
        np.testing.assert_array_equal(ids, group)  # the smallest member of each group
        assert checked == sum(calls) <= 5 * 100
    # One leader: group 0 found through it, the other members chained to their unlinked
    # neighbour, which is in another group: they stay apart. Never a wrong join.
    acc, checked = dd._leader_pairs(members, offsets, accept, 1)
    assert (group[acc[:, 0]] == group[acc[:, 1]]).all()
    assert checked == 99 + 79
    ids = dd.connected_components(100, acc)
    assert (ids[group == 0] == 0).all() and len(set(ids.tolist())) == 81
    # Empty input and pairs seen in several buckets checked once.
    assert dd._leader_pairs(members[:0], np.zeros(1, np.int64), accept, 4)[1] == 0
    twice = np.array([0, 5, 10, 0, 5, 10], dtype=np.int64)
    calls.clear()
    acc, checked = dd._leader_pairs(twice, np.array([0, 3, 6]), accept, 4)
    assert checked == calls[0] == 2 and acc.tolist() == [[0, 5], [0, 10]]


def test_normal_corpora_keep_the_all_pairs_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the bundled corpus every bucket is small, so the result is the all-pairs one."""
    texts = load_texts()
    bh = band_hashes(signatures(texts), 16, 8)
    assert _native.CandidateBuckets(bh, 2).largest() <= dd.MAX_BUCKET
    same_result(deduplicate(texts), exhaustive(monkeypatch, texts))


@pytest.mark.parametrize("verify", ["estimate", "exact"])
def test_files_path_pieces_match_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, verify: str
) -> None:
    docs = mixed_corpus(seed=3) + templated(300, seed=4)
    docs.append(docs[5])  # an exact duplicate
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    mem = deduplicate(docs, threshold=0.8, verify=verify)
    # One band per chunk and one bucket per piece: boundaries must not change the result.
    monkeypatch.setattr(dds, "_BYTES_PER_ROW_BAND", 1 << 40)
    monkeypatch.setattr(dds, "_BYTES_PER_UNIT", 1 << 40)
    monkeypatch.setattr(dds, "_EXACT_CHUNK", 7)
    monkeypatch.setattr(dds, "_ESTIMATE_CHUNK", 5)
    report = dedup_files([src], tmp_path / "o.jsonl", verify=verify, progress=False)
    rows = [r.split("\t") for r in (tmp_path / "o.clusters.tsv").read_text().splitlines()[1:]]
    np.testing.assert_array_equal([int(r[3]) for r in rows], mem.cluster)
    np.testing.assert_array_equal([r[4] == "1" for r in rows], mem.keep)
    assert report.kept == int(mem.keep.sum()) < len(docs) - 300


#: What `slimforge dedup` holds outside the candidate stage's budget on this corpus: the
#: interpreter, numpy and the extension (about 40 MB), pass 1's batch of 8,192 documents with
#: their signatures, per-document arrays and the mapped signature pages (measured: 105-115 MB
#: in all with any budget from 16 to 1,024 MB).
FIXED_OVERHEAD_MB = 160


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_templated_15k_peak_rss_within_budget(tmp_path: Path) -> None:
    """The quadratic candidate stage needed more than 6 GB here (0.9 GB at 3,000 documents)."""
    src = tmp_path / "templated.jsonl"
    with src.open("w") as f:
        for i, t in enumerate(templated(15_000)):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    budget = 64
    # VmHWM is the peak of the process after exec; ru_maxrss would count the pages of the
    # (large) pytest process it was forked from.
    code = (
        "import json, sys\n"
        "from slimforge.cli import main\n"
        "main(sys.argv[1:])\n"
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
        "print(json.dumps({'vmhwm_kb': int(hwm.split()[1])}))\n"
    )
    argv = ["dedup", str(src), "-o", str(tmp_path / "o.jsonl"), "-q", "--json"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv, "--memory-mb", str(budget)],
        check=True,
        capture_output=True,
        text=True,
    )
    lines = proc.stdout.strip().splitlines()
    peak_mb = json.loads(lines[-1])["vmhwm_kb"] / 1024
    report = json.loads("\n".join(lines[:-1]))
    assert report["documents"] == 15_000 and report["kept"] == 1
    assert peak_mb < budget + FIXED_OVERHEAD_MB, peak_mb
