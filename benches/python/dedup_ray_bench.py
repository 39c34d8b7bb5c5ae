#!/usr/bin/env python3
"""File dedup on Ray against the local engine: throughput with 1 and 2 workers and peak memory
per worker as the corpus grows, in one process.

    python benches/python/dedup_ray_bench.py [--quick] [--repeat 2]

Corpus: `slimforge.dedup.synthetic.near_duplicate_corpus` (real text from this machine plus
edited copies: about half of it near duplicates), written as JSONL shards of 1,100 documents;
the "Nx" corpus adds N - 1 copies of it with half of each document's words edited (new
documents, far from every other), in N times as many shards of the same size.

Throughput (documents and MB of text per second, end to end: JSONL in, output and clusters
TSV written) on the 16x corpus in shards of 8,800 documents, side by side, each engine with its default partitions
(one per GiB of input and at least one per worker): the local engine on 1 and 2 threads, and
the Ray engine on a local cluster of 1 and 2 CPUs (one worker per CPU, one thread each; the
cluster is started before the clock starts). The results of every run are compared byte for
byte with the local engine's.

Projection: the units of a 1-worker run with 16 partitions (their wall time in the worker) scheduled on k workers,
longest first, stage after stage, plus what that run spent outside the units (task dispatch,
planning, joining the outputs) as measured; it assumes a free core per worker and storage that
keeps up.

Peak RSS per worker: the largest VmHWM of one unit of each stage (`RayEngine.peak_rss`, reset
at the start of every unit), for the 1x and 4x corpora on the 2-worker cluster, beside the
peak of an idle worker (Ray and slimforge imported), with 4 band-key partitions per 1x.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

import slimforge
from slimforge.dedup.engines import LocalEngine, RayEngine, run_unit
from slimforge.dedup.files import dedup_files
from slimforge.dedup.synthetic import edit_words, near_duplicate_corpus

DOCS_PER_SHARD = 1100
#: Band-key partitions of the run whose units the projection schedules.
PROJECTION_PARTITIONS = 16
#: Copies of the corpus in the throughput runs, in shards of 8 x DOCS_PER_SHARD documents.
THROUGHPUT_COPIES = 16


def write_corpus(
    folder: Path, base: list[str], copies: int, per_shard: int = DOCS_PER_SHARD
) -> list[Path]:
    vocab = sorted({w for d in base[:50] for w in d.split()})
    docs = list(base)
    for r in range(1, copies):
        rng = random.Random(r)
        docs += [edit_words(d, 0.5, rng, vocab) for d in base]
    folder.mkdir(parents=True)
    paths = []
    for s, i in enumerate(range(0, len(docs), per_shard)):
        p = folder / f"shard{s:04d}.jsonl"
        chunk = docs[i : i + per_shard]
        p.write_text("".join(json.dumps({"text": t}) + "\n" for t in chunk), encoding="utf-8")
        paths.append(p)
    return paths


def idle_worker_rss() -> int:
    def noop(run_dir: str, unit: int) -> dict[str, Any]:
        return {}

    task = ray.remote(num_cpus=1)(run_unit)
    return max(e["peak_rss"] for e in ray.get([task.remote(noop, "", u, 1) for u in range(2)]))


def run(paths: list[Path], out_dir: Path, engine: Any, partitions: int | None) -> tuple[float, Any]:
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir()
    t0 = time.perf_counter()
    report = dedup_files(
        paths, out_dir / "o.jsonl", engine=engine, partitions=partitions, progress=False
    )
    return time.perf_counter() - t0, report


def makespan(seconds: list[float], workers: int) -> float:
    """Wall time of independent units on `workers` workers, longest first to the least busy."""
    busy = [0.0] * workers
    for s in sorted(seconds, reverse=True):
        busy[busy.index(min(busy))] += s
    return max(busy)


def outputs(out_dir: Path) -> bytes:
    return (out_dir / "o.jsonl").read_bytes() + (out_dir / "o.clusters.tsv").read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small corpus (checks only)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per engine (best kept)")
    args = parser.parse_args()
    base = near_duplicate_corpus(600 if args.quick else 4440, seed=7)
    scales = (1, 4)
    tmp = Path(tempfile.mkdtemp(prefix="dedup-ray-bench-"))
    try:
        corpora = {k: write_corpus(tmp / f"in{k}x", base, k) for k in scales}
        parts = {k: 4 * k for k in scales}
        copies = 4 if args.quick else THROUGHPUT_COPIES
        big = write_corpus(tmp / "throughput", base, copies, 8 * DOCS_PER_SHARD)
        mb = sum(p.stat().st_size for p in big) / 1e6
        print(f"throughput corpus {copies}x: {len(big)} shards, {mb:.1f} MB of JSONL")
        print("load average before: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))

        # --- throughput, side by side on the largest corpus -------------------------------
        times: dict[str, float] = {}
        stage_times: dict[str, dict[str, float]] = {}
        reference = None
        report = None

        def keep_best(key: str, dt: float, engine: Any) -> None:
            if dt < times.get(key, float("inf")):
                times[key], stage_times[key] = dt, dict(engine.seconds)

        for threads in (1, 2):
            slimforge.set_num_threads(threads)
            for _ in range(args.repeat):
                engine = LocalEngine()
                dt, report = run(big, tmp / "out", engine, None)
                keep_best(f"local, {threads} thread(s)", dt, engine)
            reference = reference or outputs(tmp / "out")
            assert outputs(tmp / "out") == reference
        slimforge.set_num_threads(2)
        rss: dict[int, dict[str, int]] = {}
        for cpus in (1, 2):
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            idle = idle_worker_rss()
            for _ in range(args.repeat):
                engine = RayEngine()
                dt, _ = run(big, tmp / "out", engine, None)
                keep_best(f"ray, {cpus} worker(s)", dt, engine)
                assert outputs(tmp / "out") == reference, "Ray result differs from local"
            if cpus == 1:  # units to project from: 16 partitions, so stage 2b can spread
                projection = RayEngine()
                t_proj, _ = run(big, tmp / "out", projection, PROJECTION_PARTITIONS)
                assert outputs(tmp / "out") == reference, "Ray result differs from local"
            if cpus == 2:
                for k in scales:
                    engine = RayEngine()
                    run(corpora[k], tmp / "out", engine, parts[k])
                    rss[k] = engine.peak_rss
            ray.shutdown()
        assert report is not None
        docs = report.documents
        base_t = times["local, 1 thread(s)"]
        print(
            f"\n{docs:,} documents, {report.input_bytes / 1e6:.1f} MB of text, kept {report.kept:,}"
        )
        print(f"{'engine':<22} {'seconds':>8} {'docs/s':>9} {'MB/s':>6} {'vs local 1 thread':>18}")
        for name, t in times.items():
            print(
                f"{name:<22} {t:>8.2f} {docs / t:>9,.0f} {report.input_bytes / 1e6 / t:>6.1f} "
                f"{base_t / t:>17.2f}x"
            )
        print(
            f"ray 2 workers vs 1 worker: {times['ray, 1 worker(s)'] / times['ray, 2 worker(s)']:.2f}x"
        )
        names = list(stage_times["local, 1 thread(s)"])
        print(
            f"\nseconds per stage (best run)\n{'engine':<22}" + "".join(f"{n:>11}" for n in names)
        )
        for key, st in stage_times.items():
            print(f"{key:<22}" + "".join(f"{st.get(n, 0.0):>11.2f}" for n in names))

        # Projection: each stage's units (measured on one worker, one thread) scheduled on k
        # workers, longest first, plus what ran outside the stages (plan, join) as measured.
        outside = t_proj - sum(projection.seconds.values())
        print(
            f"\nprojected from a 1-worker run with {PROJECTION_PARTITIONS} partitions "
            f"({t_proj:.2f} s; outside the stages: {outside:.2f} s)"
        )
        # What a stage took beyond its units (scheduling, starting tasks), kept as measured.
        dispatch = sum(projection.seconds[st] - sum(u) for st, u in projection.unit_seconds.items())
        print(f"  (dispatch beyond the units: {dispatch:.2f} s, kept constant)")
        for k in (1, 2, 4, 8, 16, 64):
            spans = sum(makespan(u, k) for u in projection.unit_seconds.values())
            total = outside + dispatch + spans
            print(f"  {k:>3} workers: {total:6.2f} s  {docs / total:>10,.0f} docs/s")
        print(f"\npeak RSS per worker, MiB (idle worker: {idle / 2**20:.0f})")
        stages = list(rss[scales[0]])
        print(f"{'corpus':<8}" + "".join(f"{s:>12}" for s in stages))
        for k in scales:
            n = sum(1 for p in corpora[k] for _ in p.open())
            print(f"{k}x {n:>5}" + "".join(f"{rss[k][s] / 2**20:>12.0f}" for s in stages))
        print("load average after: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
