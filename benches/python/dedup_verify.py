"""Effect of candidate verification on a near-duplicate corpus (real text + deterministic edits).

For raw LSH candidates, estimated-Jaccard cuts around the threshold, and exact verification:
recall of true pairs with J >= 0.85 (same cluster), documents removed, and documents removed
whose best true Jaccard to any other document is below 0.7. The true Jaccard of every pair of
documents comes from `slimforge.dedup.exact_jaccard_pairs` (word 5-gram sets; checked against a
pure-Python reference by tests/test_dedup.py). Also prints single-thread CPU throughput of
`signatures` on the standard-library sources.

    PYTHONPATH=python python benches/python/dedup_verify.py [--quick]
"""

from __future__ import annotations

import argparse
import glob
import sysconfig

import numpy as np

import slimforge
from slimforge import dedup
from slimforge.bench import CPU, best_time
from slimforge.dedup.synthetic import near_duplicate_corpus

LICENSES = "/usr/share/common-licenses"


def exact_all_pairs(docs: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All pairs (i < j) with at least one common word 5-gram, their exact Jaccard, and each
    document's best Jaccard to any other (library `exact_jaccard_pairs` over every pair)."""
    i, j = np.triu_indices(len(docs), k=1)
    pairs = np.stack([i, j], axis=1).astype(np.int64)
    jac = dedup.exact_jaccard_pairs(docs, pairs)
    shared = jac > 0
    pairs, jac = pairs[shared], jac[shared]
    best = np.zeros(len(docs))
    np.maximum.at(best, pairs[:, 0], jac)
    np.maximum.at(best, pairs[:, 1], jac)
    return pairs, jac, best


def verification_table(n_base: int, seeds: list[int], threshold: float = 0.8) -> None:
    print("| corpus seed | rule | recall J>=0.85 | removed | removed with best J < 0.7 |")
    print("|---|---|---|---|---|")
    for seed in seeds:
        docs = near_duplicate_corpus(n_base, seed)
        pairs, jac, best = exact_all_pairs(docs)
        true = pairs[jac >= 0.85]
        sigs = dedup.signatures(docs)
        cand = dedup.candidate_pairs(dedup.band_hashes(sigs, 16, 8))
        est = dedup.estimate_jaccard_pairs(sigs, cand)
        exact = dedup.exact_jaccard_pairs(docs, cand)
        rules = {"raw band collisions": cand}
        for margin in (0.5, 0.0):
            cut = dedup.verification_threshold(threshold, 128, margin)
            rules[f"estimate >= {cut:.3f}"] = cand[est >= cut]
        rules[f"exact >= {threshold}"] = cand[exact >= threshold]
        for name, accepted in rules.items():
            cl = dedup.connected_components(len(docs), accepted)
            removed = cl != np.arange(len(docs))
            recall = (cl[true[:, 0]] == cl[true[:, 1]]).mean()
            bad = int((removed & (best < 0.7)).sum())
            print(
                f"| {seed} ({len(docs)} docs, {len(true)} pairs) | {name} | {recall:.4f} | {removed.sum()} | {bad} |"
            )


def throughput(quick: bool) -> None:
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(stdlib + "/**/*.py", recursive=True))
    texts = [open(f, encoding="utf-8", errors="replace").read() for f in files]
    if quick:
        texts = texts[:2000]
    nbytes = sum(len(t.encode()) for t in texts)
    print(
        f"\nsignatures on {len(texts)} stdlib files, {nbytes / 1e6:.1f} MB, kernel {slimforge._native.minhash_kernel()}"
    )
    for threads in (1, 2):
        slimforge.set_num_threads(threads)
        reps = 2 if quick else 3
        best_wall = best_time(lambda: dedup.signatures(texts), reps, warmup=False)
        best_cpu = best_time(lambda: dedup.signatures(texts), reps, warmup=False, clock=CPU)
        print(
            f"{threads} thread(s): {nbytes / best_wall / 1e6:.0f} MB/s wall, "
            f"{nbytes / best_cpu / 1e6:.0f} MB/s per CPU-second"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one small corpus, fewer repeats")
    args = ap.parse_args()
    verification_table(200 if args.quick else 400, [7] if args.quick else [7, 1, 2, 3])
    throughput(args.quick)


if __name__ == "__main__":
    main()
