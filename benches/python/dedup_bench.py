#!/usr/bin/env python3
"""Dedup speed and quality side by side: slimforge vs datasketch vs rensa, same corpus, same
shingles, starting from raw text, in one process.

    python benches/python/dedup_bench.py [--quick] [--repeat N]

Corpus: the bundled public-domain corpus (12.3 MB, 4,960 documents), optionally repeated.
Peers shingle in Python (`[^\\W_]+` tokens of NFKC-lowercased text, word 5-grams), which is what
their users do; slimforge tokenises in Rust. Reported: end-to-end documents/s and MB/s
(signatures + LSH + clustering, raw text in, keep mask out), the signature kernel alone, thread
scaling, and agreement with slimforge's result.

Signature kernel: slimforge's `MinHasher().signatures(texts)` from the raw str documents
(normalise, tokenise, hash, 128 permutations) against rensa's `RMinHash(128, seed=1).update(s)`
over the already-built shingle strings of each document (rensa's hashing and permutations only);
both on one thread, best of 5, in the same process; MB/s are of the raw text both came from.
"""

from __future__ import annotations

import argparse
import re
import time
import unicodedata

import numpy as np

import slimforge
from slimforge.bench import best_time, timed
from slimforge.data import load_texts
from slimforge.dedup import MinHasher, deduplicate

TOKEN = re.compile(r"[^\W_]+")
# Timings of the signature kernels (slimforge's and rensa's) take the best of this many runs.
KERNEL_REPEATS = 5


def shingles(text: str, n: int = 5) -> list[str]:
    toks = TOKEN.findall(unicodedata.normalize("NFKC", text).lower())
    if len(toks) < n:
        return [" ".join(toks)]
    return [" ".join(toks[i : i + n]) for i in range(len(toks) - n + 1)]


def keep_from_lsh(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([find(i) == i for i in range(n)])


def run_datasketch(texts: list[str], threshold: float, k: int) -> tuple[np.ndarray, float, float]:
    from datasketch import MinHash, MinHashLSH

    t0 = time.perf_counter()
    sh = [shingles(t) for t in texts]
    t_sh = time.perf_counter() - t0
    lsh = MinHashLSH(threshold=threshold, num_perm=k)
    sigs = []
    for i, s in enumerate(sh):
        m = MinHash(num_perm=k, seed=1)
        m.update_batch([x.encode() for x in s])
        sigs.append(m)
        lsh.insert(i, m)
    pairs = [(i, j) for i, m in enumerate(sigs) for j in lsh.query(m) if j < i]
    return keep_from_lsh(len(texts), pairs), time.perf_counter() - t0, t_sh


def rensa_signatures(sh: list[list[str]], k: int) -> list:  # type: ignore[type-arg]
    from rensa import RMinHash

    sigs = []
    for s in sh:
        m = RMinHash(num_perm=k, seed=1)
        m.update(s)
        sigs.append(m)
    return sigs


def run_rensa(texts: list[str], threshold: float, k: int) -> tuple[np.ndarray, float, float, float]:
    from rensa import RMinHashLSH

    t0 = time.perf_counter()
    sh = [shingles(t) for t in texts]
    t_sh = time.perf_counter() - t0
    sigs, t_kernel = timed(lambda: rensa_signatures(sh, k))
    lsh = RMinHashLSH(threshold=threshold, num_perm=k, num_bands=16)
    for i, m in enumerate(sigs):
        lsh.insert(i, m)
    pairs = []
    for i, m in enumerate(sigs):
        for j in lsh.query(m):
            if j < i and sigs[i].jaccard(sigs[j]) >= threshold:
                pairs.append((i, j))
    t_total = time.perf_counter() - t0
    # The kernel alone: best of 5 (KERNEL_REPEATS), like slimforge's signature timing.
    t_kernel = min(
        t_kernel, best_time(lambda: rensa_signatures(sh, k), KERNEL_REPEATS - 1, warmup=False)
    )
    return keep_from_lsh(len(texts), pairs), t_total, t_sh, t_kernel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every fifth document")
    p.add_argument("--repeat", type=int, default=1, help="repeat the corpus N times")
    p.add_argument("--skip-datasketch", action="store_true")
    args = p.parse_args()
    texts = load_texts() * args.repeat
    if args.quick:
        texts = texts[::5]
    mb = sum(len(t.encode()) for t in texts) / 1e6
    n, k, thr = len(texts), 128, 0.8
    print(f"corpus: {n} documents, {mb:.1f} MB; k={k}, threshold={thr}, word 5-grams")
    print(f"machine threads available: {slimforge.get_num_threads()}")

    rows = []
    for threads in (1, 2):
        slimforge.set_num_threads(threads)
        deduplicate(texts[:50], threshold=thr)  # warm the pool
        best = best_time(lambda: deduplicate(texts, threshold=thr), 3, warmup=False)
        res = deduplicate(texts, threshold=thr)
        hasher = MinHasher(num_perm=k)
        sig_t = best_time(lambda h=hasher: h.signatures(texts), KERNEL_REPEATS, warmup=False)
        rows.append((threads, best, sig_t))
        print(
            f"slimforge {threads} thread(s): end-to-end {best:.3f} s = {n / best:,.0f} docs/s,"
            f" {mb / best:.1f} MB/s; signatures {sig_t:.3f} s = {mb / sig_t:.1f} MB/s"
        )
    sf_keep = res.keep
    slimforge.set_num_threads(1)
    sf_1, sf_sig_1 = rows[0][1], rows[0][2]
    sf_2 = rows[1][1]

    keep_r, t_r, t_r_sh, t_r_kernel = run_rensa(texts, thr, k)
    print(
        f"rensa R-MinHash: end-to-end {t_r:.3f} s = {n / t_r:,.0f} docs/s"
        f" (Python shingling {t_r_sh:.3f} s, signature kernel {t_r_kernel:.3f} s)"
    )
    if not args.skip_datasketch:
        keep_d, t_d, t_d_sh = run_datasketch(texts, thr, k)
        print(
            f"datasketch: end-to-end {t_d:.3f} s = {n / t_d:,.0f} docs/s (shingling {t_d_sh:.3f} s)"
        )

    print("\nratios (higher = slimforge faster):")
    print(f"  end-to-end vs rensa, 1 thread:       {t_r / sf_1:7.1f}x")
    print(f"  end-to-end vs rensa, 2 threads:      {t_r / sf_2:7.1f}x")
    if not args.skip_datasketch:
        print(f"  end-to-end vs datasketch, 1 thread:  {t_d / sf_1:7.1f}x")
        print(f"  end-to-end vs datasketch, 2 threads: {t_d / sf_2:7.1f}x")
    print(
        f"  signature kernel vs rensa's (1 thread, slimforge from raw text): {t_r_kernel / sf_sig_1:5.2f}x"
        f"  ({mb / sf_sig_1:.0f} vs {mb / t_r_kernel:.0f} MB/s, best of {KERNEL_REPEATS} each)"
    )
    print(f"  thread scaling 1 -> 2 (end-to-end): {sf_1 / sf_2:5.2f}x")
    print("\nagreement of the keep masks with slimforge:")
    print(
        f"  rensa:      {np.mean(keep_r == sf_keep):.4f}  (removed {n - keep_r.sum()} vs {n - sf_keep.sum()})"
    )
    if not args.skip_datasketch:
        print(f"  datasketch: {np.mean(keep_d == sf_keep):.4f}  (removed {n - keep_d.sum()})")


if __name__ == "__main__":
    main()
