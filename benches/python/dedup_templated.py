#!/usr/bin/env python3
"""`slimforge dedup` on a templated corpus: time, peak memory and documents removed.

    python benches/python/dedup_templated.py [--quick] [--sizes 3000,15000,100000]
        [--memory-mb 256 --memory-mb 1024] [--rss-cap-mb 12000] [--work-dir DIR]

Corpus: N documents sharing one template of about 2 KB (330 words) followed by a tail of five
words unique to the document, as boilerplate or templated pages are: every pair has Jaccard
about 0.97 on word 5-grams, so all N are one near-duplicate cluster and the LSH buckets hold
most of the corpus in every band. Written as JSONL (`{"id": i, "text": ...}`), deterministic.

Each run is the CLI in its own subprocess (`python -m slimforge dedup IN -o OUT -q --json
[--memory-mb M]`); its peak RSS is the child's `ru_maxrss` from `os.wait4`. A run whose RSS
passes `--rss-cap-mb` (sampled every 50 ms from /proc) is killed and reported as such, so that
a quadratic build cannot take the machine down. `--quick`: N = 3,000 only. `--bundled` adds the
bundled corpus (gzip JSONL in, JSONL out), whose buckets are all small. To measure another
build, put it first on PYTHONPATH: the child inherits the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

TEMPLATE_WORDS = 330
TAIL_WORDS = 5


def templated_documents(n: int, seed: int = 0) -> Iterator[str]:
    """``n`` documents: one shared template of about 2 KB plus a unique five-word tail each
    (the same documents as ``templated`` in tests/test_dedup_memory.py)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choices(letters, k=rng.randint(3, 9))) for _ in range(2000)]
    template = " ".join(rng.choices(vocab, k=TEMPLATE_WORDS))
    for i in range(n):
        tail = [f"item{i}"] + [f"t{rng.randrange(10**9)}" for _ in range(TAIL_WORDS - 1)]
        yield f"{template} {' '.join(tail)}"


def write_corpus(path: Path, n: int, seed: int = 0) -> int:
    """Writes the JSONL corpus, streaming (this process stays small: a forked child's peak RSS
    counts its parent's pages); returns its size in bytes."""
    with path.open("w", encoding="utf-8") as f:
        for i, text in enumerate(templated_documents(n, seed)):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path.stat().st_size


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_dedup(src: Path, out: Path, memory_mb: int | None, cap_mb: float) -> dict[str, object]:
    """One CLI run; returns wall seconds, peak RSS (MB), the JSON report or the error."""
    cmd = [sys.executable, "-m", "slimforge", "dedup", str(src), "-o", str(out), "-q", "--json"]
    if memory_mb is not None:
        cmd += ["--memory-mb", str(memory_mb)]
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se)
        killed = threading.Event()
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.05):
                if _rss_mb(proc.pid) > cap_mb:
                    killed.set()
                    os.kill(proc.pid, signal.SIGKILL)
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        so.seek(0)
        se.seek(0)
        stdout, stderr = so.read().decode(), se.read().decode()
    result: dict[str, object] = {"seconds": wall, "peak_rss_mb": usage.ru_maxrss / 1024}
    if killed.is_set():
        result["error"] = f"killed: RSS passed {cap_mb:.0f} MB"
    elif proc.returncode != 0:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
        result["error"] = lines[-1] if lines else f"exit code {proc.returncode}"
    else:
        result["report"] = json.loads(stdout)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 3,000 only")
    p.add_argument("--sizes", default="3000,15000,100000", help="comma-separated N")
    p.add_argument(
        "--memory-mb",
        type=int,
        action="append",
        default=None,
        help="budget(s) to pass to --memory-mb (repeatable; default: 256 and the CLI default)",
    )
    p.add_argument("--rss-cap-mb", type=float, default=12000, help="kill a run past this RSS")
    p.add_argument("--work-dir", default=None, help="where corpora and outputs go (temporary)")
    p.add_argument(
        "--bundled", action="store_true", help="also run on the bundled corpus (a normal one)"
    )
    args = p.parse_args()
    sizes = [3000] if args.quick else [int(s) for s in args.sizes.split(",")]
    budgets: list[int | None] = list(args.memory_mb) if args.memory_mb else [256, None]

    print(f"python {sys.executable}; PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}")
    print(
        f"{'N':>8} {'MB':>6} {'--memory-mb':>11} {'wall s':>8} {'peak RSS MB':>11} "
        f"{'removed':>8}  note"
    )
    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        corpora: list[tuple[str, Path | None, int]] = [(f"{n:,}", None, n) for n in sizes]
        if args.bundled:
            from slimforge.data import corpus_path

            corpora.append(("bundled", corpus_path(), 0))
        for label, src, n in corpora:
            if src is None:
                src = Path(tmp) / f"templated-{n}.jsonl"
                write_corpus(src, n)
            size = src.stat().st_size
            for budget in budgets:
                out = Path(tmp) / f"out-{label}-{budget}.jsonl"
                r = run_dedup(src, out, budget, args.rss_cap_mb)
                report = r.get("report")
                removed = (
                    f"{report['documents'] - report['kept']:,}" if isinstance(report, dict) else "-"
                )
                print(
                    f"{label:>8} {size / 1e6:>6.1f} {budget or 'default':>11} "
                    f"{r['seconds']:>8.2f} {r['peak_rss_mb']:>11.0f} {removed:>8}  "
                    f"{str(r.get('error', ''))[:120]}",
                    flush=True,
                )
            if n:
                src.unlink()


if __name__ == "__main__":
    main()
