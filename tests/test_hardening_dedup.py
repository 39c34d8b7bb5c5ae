"""Hardening of the dedup file job (`slimforge dedup`, `dedup_files`, `slimforge.io`).

One section per class of failure, each with the reported example and variants:

1. inputs destroyed: every written path (output, clusters TSV, rejects file, saved index) must
   differ from every input and `--against` index and from each other, however it is spelled
   (symlinks, ``..``, hard links), or nothing is written;
3. unbounded allocations and hangs from parameters: `ngram`, `num_perm`, `batch_size`,
   `memory_mb`, `max_line_bytes` have stated limits; the band search is bounded, keeps its
   answers and stops on a signal; a JSONL line over `max_line_bytes` is an error found while it
   is read (memory stays bounded even for a huge line in a small gzip file);
7. leftovers and small CLI faults: work directories and temporary files name their process and
   a later run removes those of dead processes; outputs get ``0o666 & ~umask``; every user error
   exits 2 with one line and no traceback; file names are escaped in the clusters TSV; a field
   whose type changes (JSONL to Parquet) is reported with file:line; empty and zero-padded gzip
   are read.

Then fuzz tests (hypothesis, bounded examples) of the JSONL and Parquet readers: random bytes,
random JSON lines, truncated or corrupted gzip and Parquet, wrong argument types. Each example
must give a correct result or a documented exception (`ValueError` incl. `InputError`,
`TypeError`, `OSError`), never a crash or a hang. ``SLIMFORGE_FUZZ_EXAMPLES`` scales them.
"""

from __future__ import annotations

import csv
import faulthandler
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimforge.cli import main
from slimforge.data import corpus_path
from slimforge.dedup import MAX_NGRAM, MAX_NUM_PERM, LSHIndex, MinHasher, optimal_bands, signatures
from slimforge.dedup.files import dedup_files, escape_tsv_field, unescape_tsv_field
from slimforge.io import (
    DEFAULT_MAX_LINE_BYTES,
    InputError,
    Record,
    Reject,
    atomic_path,
    iter_batches,
    iter_records,
    remove_stale_temps,
)

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

FUZZ_EXAMPLES = max(10, int(os.environ.get("SLIMFORGE_FUZZ_EXAMPLES", "150")) // 3)
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: Exceptions the readers document for bad input (InputError is a ValueError).
CLEAN = (ValueError, TypeError, OSError)

WORDS = [f"w{i}" for i in range(200)]


def _doc(seed: int, n: int = 40) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n))


def _write_docs(path: Path, texts: list[str], extra: dict[str, Any] | None = None) -> None:
    lines = [json.dumps({"text": t, **(extra or {})}) + "\n" for t in texts]
    data = "".join(lines).encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def _corpus(path: Path) -> Path:
    texts = [_doc(i) for i in range(12)] + [_doc(3), _doc(5).upper()]
    _write_docs(path, texts)
    return path


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


@pytest.fixture(autouse=True)
def _hang_guard() -> Iterator[None]:
    """A test that hangs dumps its stack and fails the run instead of blocking CI."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# ============================================================ 1. inputs are never destroyed


@pytest.mark.parametrize(
    "extra",
    [
        ["--clusters", "{in}"],
        ["--save-index", "{in}"],
        ["--clusters", "{out}"],
        ["--save-index", "{out}"],
        ["--save-index", "{clusters}"],
        ["--clusters", "{d}/sub/../in.jsonl"],
        ["--save-index", "{d}/./in.jsonl"],
    ],
)
def test_written_paths_may_not_be_inputs_or_each_other(
    tmp_path: Path, extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    src = _corpus(tmp_path / "in.jsonl")
    (tmp_path / "sub").mkdir()
    out = tmp_path / "o.jsonl"
    names = {"in": src, "out": out, "clusters": tmp_path / "o.clusters.tsv", "d": tmp_path}
    before = _snapshot(tmp_path)
    argv = ["dedup", str(src), "-o", str(out), "-q", *[e.format(**names) for e in extra]]
    rc, err = _cli(argv, capsys)
    assert rc == 2, err
    assert "same file" in err or "also an input" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert _snapshot(tmp_path) == before, "nothing may be written or removed"
    assert not any(p.name.startswith(".slimforge") for p in tmp_path.iterdir())


def test_input_named_like_the_rejects_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "o.rejects.jsonl"
    _corpus(src)
    src.write_bytes(src.read_bytes() + b"not json\n")
    before = src.read_bytes()
    out = tmp_path / "o.jsonl"
    rc, err = _cli(["dedup", str(src), "-o", str(out), "-q", "--on-error", "skip"], capsys)
    assert rc == 2 and "rejects file" in err and "also an input" in err, err
    assert src.read_bytes() == before and not out.exists()
    # Without --on-error skip nothing is written there: the run is allowed... and fails on
    # the malformed line, leaving the input intact.
    rc, err = _cli(["dedup", str(src), "-o", str(out), "-q"], capsys)
    assert rc == 2 and "o.rejects.jsonl:15" in err
    assert src.read_bytes() == before


def test_symlinks_and_hard_links_are_the_same_file(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "in.jsonl")
    before = src.read_bytes()
    (tmp_path / "link.tsv").symlink_to(src)
    os.link(src, tmp_path / "hard.tsv")
    (tmp_path / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    for clusters in ("link.tsv", "hard.tsv", "dirlink/in.jsonl"):
        with pytest.raises(ValueError, match="also an input"):
            dedup_files(
                [src], tmp_path / "o.jsonl", clusters_path=tmp_path / clusters, progress=False
            )
    # An output reached through a symlinked directory is the input too.
    with pytest.raises(ValueError, match="also an input"):
        dedup_files([src], tmp_path / "dirlink" / "in.jsonl", progress=False)
    assert src.read_bytes() == before
    assert (tmp_path / "link.tsv").is_symlink()


def test_against_index_is_never_overwritten(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "in.jsonl")
    idx = tmp_path / "shard.lshidx"
    dedup_files([src], tmp_path / "a.jsonl", save_index=idx, progress=False)
    before = idx.read_bytes()
    for kwargs in ({"save_index": idx}, {"clusters_path": idx}):
        with pytest.raises(ValueError, match="--against index"):
            dedup_files([src], tmp_path / "b.jsonl", against=[idx], progress=False, **kwargs)
    assert idx.read_bytes() == before
    assert LSHIndex.load(idx).num_perm == 128


def test_distinct_paths_still_work_and_same_input_twice_is_fine(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "in.jsonl")
    report = dedup_files([src, src], tmp_path / "o.jsonl", progress=False)
    assert report.documents == 28 and report.kept == 12


# ===================================================== 3. parameters with stated limits


def test_ngram_and_num_perm_limits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (MAX_NGRAM, MAX_NUM_PERM) == (1024, 8192)
    t0 = time.perf_counter()
    for bad in (MAX_NGRAM + 1, 10**9, 10**30):
        with pytest.raises(ValueError, match="ngram must be at most 1024"):
            MinHasher(ngram=bad)
        with pytest.raises(ValueError, match="ngram must be at most 1024"):
            signatures(["a b"], ngram=bad)
    for bad in (MAX_NUM_PERM + 1, 10**6, 10**30):
        with pytest.raises(ValueError, match="num_perm must be at most 8192"):
            MinHasher(num_perm=bad)
        with pytest.raises(ValueError, match="at most 8192"):
            optimal_bands(0.8, bad)
    assert time.perf_counter() - t0 < 2.0, "validation must come before any work"
    # The limits themselves work.
    assert signatures(["a b c"], ngram=MAX_NGRAM, num_perm=8).shape == (1, 8)
    src = _corpus(tmp_path / "in.jsonl")
    for extra, what in (
        (["--ngram", str(10**9)], "ngram"),
        (["--num-perm", str(10**6)], "num_perm"),
        (["--num-perm", "10000", "--bands", "10", "--rows", "10"], "num_perm"),
    ):
        rc, err = _cli(["dedup", str(src), "-o", str(tmp_path / "o.jsonl"), *extra], capsys)
        assert rc == 2 and what in err and "Traceback" not in err, err


# Answers of the original band search (a plain double loop over (bands, rows)), recorded
# before it was restructured: thresholds 0.50, 0.55, ... 0.95.
_BANDS_BEFORE = {
    (64, 0.05): [(21, 3), (19, 3), (16, 4), (16, 4), (12, 5), (12, 5), (10, 6), (8, 8), (6, 10), (4, 16)],
    (64, 0.5): [(14, 4), (12, 5), (10, 6), (9, 7), (8, 8), (7, 9), (5, 11), (4, 15), (3, 21), (2, 32)],
    (128, 0.05): [(26, 3), (32, 4), (24, 4), (25, 5), (21, 6), (18, 7), (16, 8), (12, 10), (9, 14), (6, 21)],
    (128, 0.5): [(25, 5), (21, 6), (18, 7), (16, 8), (14, 9), (11, 11), (9, 13), (8, 16), (5, 25), (3, 42)],
    (256, 0.05): [(53, 4), (51, 5), (41, 5), (42, 6), (36, 7), (30, 8), (25, 10), (19, 13), (15, 17), (9, 28)],
    (256, 0.5): [(42, 6), (36, 7), (32, 8), (28, 9), (25, 10), (21, 12), (17, 15), (13, 19), (9, 28), (5, 51)],
}  # fmt: skip


@pytest.mark.parametrize(("k", "fp"), sorted(_BANDS_BEFORE))
def test_band_search_answers_are_unchanged(k: int, fp: float) -> None:
    thresholds = [round(0.5 + 0.05 * i, 2) for i in range(10)]
    got = [optimal_bands(t, k, fp_weight=fp, fn_weight=1 - fp) for t in thresholds]
    assert got == _BANDS_BEFORE[(k, fp)]


def test_band_search_is_bounded_and_interruptible() -> None:
    t0 = time.perf_counter()
    b, r = optimal_bands(0.8, MAX_NUM_PERM)
    elapsed = time.perf_counter() - t0
    assert b * r <= MAX_NUM_PERM and elapsed < 10.0, elapsed

    class Stop(Exception):
        pass

    def handler(signum: int, frame: Any) -> None:
        raise Stop

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, min(0.01, elapsed / 20))
        t0 = time.perf_counter()
        with pytest.raises(Stop):
            optimal_bands(0.8, MAX_NUM_PERM)
        assert time.perf_counter() - t0 < elapsed
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_batch_and_memory_limits(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "in.jsonl")
    out = tmp_path / "o.jsonl"
    for kwargs, match in (
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 10**30}, "batch_size"),
        ({"batch_size": 2**20, "num_perm": 8192}, "batch_size \\* num_perm"),
        ({"memory_mb": 15}, "memory_mb"),
        ({"memory_mb": 10**30}, "memory_mb"),
        ({"max_line_bytes": 0}, "max_line_bytes"),
        ({"max_line_bytes": 2**80}, "max_line_bytes"),
        ({"seed": 2**64}, "seed"),
        ({"bands": 10**30, "rows": 10**30}, "exceeds num_perm"),
        ({"bands": 4}, "both bands and rows"),
    ):
        with pytest.raises(ValueError, match=match):
            dedup_files([src], out, progress=False, **kwargs)
    for kwargs in ({"batch_size": 1.5}, {"memory_mb": "64"}, {"field": 3}, {"inputs": [3]}):
        inputs = kwargs.pop("inputs", [src])
        with pytest.raises(TypeError):
            dedup_files(inputs, out, progress=False, **kwargs)
    assert not out.exists()
    assert not list(tmp_path.glob(".slimforge*"))


def _long_line_file(path: Path, line_bytes: int, before: int = 2) -> None:
    """`before` documents, then one line of `line_bytes` bytes (a JSON string), then another
    document; gzip-compressed (very small) when the name ends in .gz."""
    head = "".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(before)).encode()
    filler = line_bytes - len(b'{"text": ""}')
    tail = json.dumps({"text": "after"}).encode() + b"\n"
    if not path.name.endswith(".gz"):
        with path.open("wb") as f:
            f.write(head + b'{"text": "')
            chunk = b"a" * (1 << 20)
            for _ in range(filler // len(chunk)):
                f.write(chunk)
            f.write(b"a" * (filler % len(chunk)) + b'"}\n' + tail)
        return
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    parts = [z.compress(head + b'{"text": "')]
    chunk = b"a" * (1 << 20)
    for _ in range(filler // len(chunk)):
        parts.append(z.compress(chunk))
    parts.append(z.compress(b"a" * (filler % len(chunk)) + b'"}\n' + tail))
    parts.append(z.flush())
    path.write_bytes(b"".join(parts))


@pytest.mark.parametrize("name", ["long.jsonl", "long.jsonl.gz"])
def test_long_lines_are_an_error_at_their_line(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / name
    _long_line_file(src, (2 << 20) + 5)
    for on_error in ("fail", "skip"):
        seen = []
        with pytest.raises(InputError, match=rf"{name}:3: line is longer than 1048576 bytes") as ei:
            for b in iter_batches(src, on_error=on_error, max_line_bytes=1 << 20, batch_size=1):
                seen.extend(b.lines.tolist())
        assert ei.value.line == 3 and seen == [1, 2], "documents before it come first"
        with pytest.raises(InputError, match=":3: line is longer"):
            list(iter_records(src, on_error=on_error, max_line_bytes=1 << 20))
    # Exactly at the limit is read.
    lines = list(iter_records(src, max_line_bytes=(2 << 20) + 5))
    assert [r.line for r in lines] == [1, 2, 3, 4]
    with pytest.raises(InputError):
        list(iter_records(src, max_line_bytes=(2 << 20) + 4))
    # The command line: --max-line-mb, exit 2, file:line, nothing written.
    out = tmp_path / "o.jsonl"
    rc, err = _cli(["dedup", str(src), "-o", str(out), "-q", "--max-line-mb", "1"], capsys)
    assert rc == 2 and f"{name}:3: line is longer" in err and "Traceback" not in err, err
    assert not out.exists()
    rc, err = _cli(["dedup", str(src), "-o", str(out), "-q", "--max-line-mb", "3"], capsys)
    assert rc == 0, err
    assert _clusters(tmp_path / "o.clusters.tsv")[2][2] == "3"


_RSS_CODE = """
import json, resource, sys
from slimforge.io import iter_batches, InputError
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kwargs = {} if sys.argv[2] == "default" else {"max_line_bytes": int(sys.argv[2])}
try:
    n = sum(len(b.texts) for b in iter_batches(sys.argv[1], **kwargs))
    outcome = f"read {n}"
except InputError as e:
    outcome = f"InputError line {e.line}"
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "grew_mb": (peak - base) / 1024}))
"""


@pytest.mark.parametrize(
    ("line_mb", "cap", "bound_mb"),
    [(200, str(1 << 20), 48), (80, "default", 48 + 2 * DEFAULT_MAX_LINE_BYTES / 2**20)],
)
def test_a_huge_line_in_a_small_gzip_stays_within_memory(
    tmp_path: Path, line_mb: int, cap: str, bound_mb: float
) -> None:
    """The reported case: one giant line in a small .jsonl.gz took twice its size. Now the
    reader holds at most the limit of it (the cap, plus the 1 MiB read buffers)."""
    src = tmp_path / "huge.jsonl.gz"
    _long_line_file(src, line_mb << 20)
    assert src.stat().st_size < 4 << 20
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_CODE, str(src), cap],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "InputError line 3", result
    assert result["grew_mb"] < bound_mb, result


# ================================================ 7. leftovers, modes and command-line faults


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"


_KILLED_RUN = """
import os, sys
from slimforge.dedup import files, stages
stage = sys.argv[3]
def die(*a, **k):
    os._exit(9)
setattr(files if hasattr(files, stage) else stages, stage, die)
files.dedup_files([sys.argv[1]], sys.argv[2], progress=False, on_error="skip")
"""


@pytest.mark.parametrize("stage", ["bucket_partition", "_write_jsonl"])
def test_a_killed_run_leaves_named_leftovers_that_the_next_run_removes(
    tmp_path: Path, stage: str
) -> None:
    src = _corpus(tmp_path / "in.jsonl")
    src.write_bytes(src.read_bytes() + b"oops\n")
    out = tmp_path / "out" / "o.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(src), str(out), stage])
    assert proc.wait(timeout=120) == 9
    left = sorted(p.name for p in out.parent.iterdir())
    work = [n for n in left if n.startswith(".slimforge-dedup-")]
    assert len(work) == 1 and re.fullmatch(
        rf"\.slimforge-dedup-{_host()}-{proc.pid}-\w+", work[0]
    ), left
    if stage == "_write_jsonl":
        temps = [n for n in left if n.endswith(".tmp")]
        assert len(temps) >= 2, left  # output, clusters (and rejects) temporaries
        for n in temps:
            assert re.fullmatch(rf"\.o\.[a-z.]+\.slimforge-tmp-{_host()}-{proc.pid}-\w+\.tmp", n), n
    # Leftovers of a live process, of another host, and unrelated files stay.
    keep = [
        out.parent / f".slimforge-dedup-{_host()}-{os.getppid()}-abc",
        out.parent / f".slimforge-dedup-otherhost-{_dead_pid()}-abc",
        out.parent / f".o.jsonl.slimforge-tmp-{_host()}-{os.getppid()}-abc.tmp",
        out.parent / f".o.jsonl.slimforge-tmp-otherhost-{_dead_pid()}-abc.tmp",
        out.parent / ".slimforge-dedup-notes",
        out.parent / "o.tmp",
    ]
    for p in keep:
        if "dedup" in p.name:
            p.mkdir()
        else:
            p.write_text("x")
    report = dedup_files([src], out, progress=False, on_error="skip")
    assert report.rejected == 1
    after = sorted(p.name for p in out.parent.iterdir())
    assert after == sorted(
        ["o.jsonl", "o.clusters.tsv", "o.rejects.jsonl", *(p.name for p in keep)]
    )


def test_stale_temps_of_dead_processes_only(tmp_path: Path) -> None:
    dead, alive = _dead_pid(), os.getpid()
    names = {
        f".a.jsonl.slimforge-tmp-{_host()}-{dead}-x1y2.tmp": False,
        f".a.jsonl.slimforge-tmp-{_host()}-{alive}-x1y2.tmp": True,
        f".a.jsonl.slimforge-tmp-elsewhere-{dead}-x1y2.tmp": True,
        ".a.jsonl.x1y2.tmp": True,  # the old naming has no owner: left alone
    }
    for n in names:
        (tmp_path / n).write_text("x")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [n for n, stays in names.items() if not stays]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, s in names.items() if s)
    with atomic_path(tmp_path / "new.txt") as tmp:
        assert re.fullmatch(rf"\.new\.txt\.slimforge-tmp-{_host()}-{alive}-\w+\.tmp", tmp.name)
        tmp.write_text("y")
    assert (tmp_path / "new.txt").read_text() == "y"


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_outputs_get_the_umask_mode(tmp_path: Path, umask: int) -> None:
    src = _corpus(tmp_path / "in.jsonl")
    src.write_bytes(src.read_bytes() + b"oops\n")
    old = os.umask(umask)
    try:
        for out in ("o.jsonl", "o.jsonl.gz", "o.parquet"):
            dedup_files(
                [src],
                tmp_path / out,
                on_error="skip",
                save_index=tmp_path / "i.idx",
                progress=False,
            )
            written = [tmp_path / out, tmp_path / "o.clusters.tsv", tmp_path / "o.rejects.jsonl"]
            for p in [*written, tmp_path / "i.idx"]:
                assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, (p, oct(umask))
    finally:
        os.umask(old)


@pytest.mark.parametrize(
    ("extra", "usage"),
    [
        (["--batch-size", "1e30"], True),
        (["--batch-size", "lots"], True),
        (["--threshold", "nan"], True),
        (["--threshold", "inf"], True),
        (["--num-perm", "12.5"], True),
        (["--max-line-mb", "0.5"], True),
        (["--batch-size", str(10**30)], False),
        (["--batch-size", "0"], False),
        (["--num-perm", str(10**30)], False),
        (["--ngram", "0"], False),
        (["--seed", "-1"], False),
        (["--seed", str(2**64)], False),
        (["--threshold", "1.5"], False),
        (["--bands", str(10**30), "--rows", str(10**30)], False),
        (["--bands", "3"], False),
        (["--memory-mb", "1"], False),
        (["--memory-mb", str(10**30)], False),
        (["--max-line-mb", "0"], False),
        (["--max-line-mb", str(10**30)], False),
        (["--field", "nope"], False),
        (["--against", "{d}/missing.lshidx"], False),
        (["--against", "{d}/in.jsonl"], False),
        (["--work-dir", "{d}/in.jsonl"], False),
    ],
)
def test_user_errors_exit_2_with_one_line(
    tmp_path: Path, extra: list[str], usage: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _corpus(tmp_path / "in.jsonl")
    out = tmp_path / "o.jsonl"
    argv = ["dedup", str(src), "-o", str(out), "-q", *[e.format(d=tmp_path) for e in extra]]
    rc, err = _cli(argv, capsys)
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if usage:
        assert lines[0].startswith("usage:") and "error: argument" in lines[-1], err
    else:
        assert len(lines) == 1 and lines[0].startswith("slimforge dedup: error: "), err
    assert not out.exists()


def test_user_errors_in_a_real_process(tmp_path: Path) -> None:
    src = _corpus(tmp_path / "in.jsonl")
    for extra in (["--batch-size", str(10**30)], ["--ngram", str(10**9)], ["--clusters", str(src)]):
        proc = subprocess.run(
            [sys.executable, "-m", "slimforge", "dedup", str(src), "-o", str(tmp_path / "o.jsonl")]
            + extra,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _clusters(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


@pytest.mark.parametrize("name", ["a\tb.jsonl", "new\nline.jsonl", "back\\slash.jsonl", '"q.jsonl'])
@pytest.mark.parametrize("out_name", ["o.jsonl", "o.parquet"])
def test_file_names_are_escaped_in_the_clusters_tsv(
    tmp_path: Path, name: str, out_name: str
) -> None:
    """Every writer of the TSV: JSONL to JSONL (Rust), Parquet to Parquet (pyarrow), and the
    mixed conversions (Python)."""
    src = _corpus(tmp_path / name)
    pq_src = tmp_path / (name.replace(".jsonl", "") + ".parquet")
    pq.write_table(pa.table({"text": [_doc(i) for i in range(5)]}), pq_src)
    for ins in ([src], [pq_src]):
        dedup_files(ins, tmp_path / out_name, progress=False)
        text = (tmp_path / "o.clusters.tsv").read_text(encoding="utf-8")
        rows = text.splitlines()
        assert len(rows) == 1 + (14 if ins == [src] else 5)
        assert all(len(r.split("\t")) == 5 for r in rows)
        assert {unescape_tsv_field(r[1]) for r in _clusters(tmp_path / "o.clusters.tsv")} == {
            str(ins[0])
        }
        with (tmp_path / "o.clusters.tsv").open(newline="", encoding="utf-8") as f:
            read = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
        assert [int(r["index"]) for r in read] == list(range(len(rows) - 1))


def test_escaping_round_trips() -> None:
    cases = [
        "plain.jsonl",
        "a\tb",
        "c\nd\re",
        "x\\ty",
        "\\",
        "\x00\x1f\x7f",
        "é\u2028\x85",
        "\udcff",
    ]
    for s in cases:
        e = escape_tsv_field(s)
        assert "\t" not in e and len(e.splitlines()) <= 1, e
        assert e.isprintable() or e == s
        assert unescape_tsv_field(e) == s
    assert escape_tsv_field("a\tb\\n") == "a\\tb\\\\n"
    assert os.fsencode(unescape_tsv_field(escape_tsv_field(os.fsdecode(b"n\xffm")))) == b"n\xffm"


def test_the_demo_reads_its_tsv(tmp_path: Path) -> None:
    from slimforge.pipeline import demo_config, run_pipeline

    config = demo_config("quick")
    config["run"]["stages"] = ["dedup"]
    m = run_pipeline(str(tmp_path / "demo"), config, progress=False)["dedup"]["metrics"]
    assert m["documents"] > 0 and m["exact_duplicates"] > 0
    # The removed examples come from the clusters TSV, paired with their kept twins.
    assert m["examples"] and all(e["removed"] and e["kept"] for e in m["examples"])


def test_jsonl_to_parquet_type_change_names_file_line_and_field(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [{"text": _doc(i), "n": i} for i in range(5)] + [{"text": _doc(9), "n": "five"}]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(InputError, match=r"in\.jsonl:6: field 'n' is str"):
        dedup_files([src], tmp_path / "o.parquet", progress=False)
    assert not (tmp_path / "o.parquet").exists()
    # Across write batches (8,192 rows), and a field the schema lacks.
    many = [{"text": _doc(i, 12), "n": i} for i in range(8200)]
    for bad, match in (
        ({"text": "x y z", "n": [1]}, r":8201: field 'n' is list"),
        ({"text": "x y z", "n": 1, "extra": True}, r":8201: field 'extra' is not in the Parquet"),
    ):
        src.write_text("".join(json.dumps(x) + "\n" for x in [*many, bad]))
        with pytest.raises(InputError, match=match):
            dedup_files([src], tmp_path / "o.parquet", progress=False)
    # Key order changing between batches and a field missing in a whole batch are fine.
    mixed = [{"n": i, "text": f"doc {i}"} for i in range(8192)]
    mixed += [{"text": "last one", "n": -1}, {"text": "very last"}]
    src.write_text("".join(json.dumps(x) + "\n" for x in mixed))
    dedup_files([src], tmp_path / "o.parquet", progress=False)
    table = pq.read_table(tmp_path / "o.parquet")
    assert table.column_names == ["n", "text"]
    assert table.num_rows == 8194 and table.column("n").null_count == 1


def test_empty_and_zero_padded_gzip_are_read(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl.gz"
    empty.write_bytes(b"")
    assert list(iter_batches(empty)) == []
    with pytest.raises(ValueError, match="no documents found"):
        dedup_files([empty], tmp_path / "o.jsonl", progress=False)
    padded = tmp_path / "padded.jsonl.gz"
    texts = [_doc(i) for i in range(6)]
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    padded.write_bytes(gzip.compress(body[:100]) + gzip.compress(body[100:]) + b"\0" * 10000)
    if shutil.which("gzip"):  # gzip -t: "decompression OK, trailing zero bytes ignored"
        proc = subprocess.run(["gzip", "-t", str(padded)], capture_output=True, text=True)
        assert proc.returncode in (0, 2), proc.stderr
    assert [r.text for r in iter_records(padded) if isinstance(r, Record)] == texts
    assert dedup_files([padded, empty], tmp_path / "o.jsonl", progress=False).documents == 6
    for bad, what in ((b"\0" * 10, "zeros"), (gzip.compress(body) + b"\0\0junk", "junk")):
        p = tmp_path / f"{what}.jsonl.gz"
        p.write_bytes(bad)
        with pytest.raises(OSError, match=f"{what}.jsonl.gz"):
            list(iter_batches(p))


def test_bundled_corpus_output_is_unchanged(tmp_path: Path) -> None:
    """The hardening changes nothing on normal input: the bundled corpus gives the same kept
    documents (byte for byte) and clusters TSV (but for the file column, the corpus's path)
    as before it (sha256 of the outputs recorded then)."""
    report = dedup_files([corpus_path()], tmp_path / "o.jsonl.gz", progress=False)
    assert (report.documents, report.kept, report.exact_duplicates, report.near_duplicates) == (
        4960,
        4645,
        314,
        1,
    )
    assert (report.bands, report.rows, report.rejects_path) == (16, 8, None)
    kept = gzip.decompress((tmp_path / "o.jsonl.gz").read_bytes())
    assert hashlib.sha256(kept).hexdigest() == _CORPUS_KEPT_SHA256
    rows = (tmp_path / "o.clusters.tsv").read_text().splitlines()
    assert {r.split("\t")[1] for r in rows[1:]} == {escape_tsv_field(str(corpus_path()))}
    without_file = "".join("\t".join(r.split("\t")[:1] + r.split("\t")[2:]) + "\n" for r in rows)
    assert hashlib.sha256(without_file.encode()).hexdigest() == _CORPUS_TSV_SHA256


_CORPUS_KEPT_SHA256 = "fba4a5501b0130e5220c9606735b43cf42455f421198f4894e3f8538023752d9"
_CORPUS_TSV_SHA256 = "789677d7b77acd4d95d5b687bbc3f94fb0d4e041258a42e97fc0302a05dfbae6"


# ========================================================================= fuzz: readers


def _read_all(path: Path, on_error: str, **kw: Any) -> list[Record | Reject]:
    items = list(iter_records(path, on_error=on_error, **kw))
    lines = [i.line for i in items]
    assert lines == sorted(lines) and len(set(lines)) == len(lines)
    return items


@FUZZ
@given(data=st.binary(max_size=600), suffix=st.sampled_from([".jsonl", ".jsonl.gz", ".parquet"]))
def test_fuzz_random_bytes(tmp_path: Path, data: bytes, suffix: str) -> None:
    p = tmp_path / f"f{suffix}"
    p.write_bytes(data)
    for on_error in ("fail", "skip"):
        try:
            items = _read_all(p, on_error, max_line_bytes=256)
        except CLEAN:
            continue
        for it in items:
            if isinstance(it, Record):
                assert isinstance(it.text, str)
            else:
                assert on_error == "skip" and isinstance(it.reason, str) and it.raw
        if suffix == ".jsonl":
            nonblank = [ln for ln in data.split(b"\n") if ln.strip(b" \t\r\x0b\x0c")]
            assert len(items) == len(nonblank) or on_error == "fail"
    try:
        for b in iter_batches(p, on_error="skip", batch_size=3, max_line_bytes=64):
            assert len(b.texts) == len(b.lines) <= 3 and b.text_bytes >= 0
    except CLEAN:
        pass


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=4),
    max_leaves=12,
)
_line_value = _json | st.dictionaries(
    st.sampled_from(["text", "id", "x"]), _json | st.text(max_size=30), max_size=3
)


@FUZZ
@given(values=st.lists(_line_value, max_size=12), gz=st.booleans(), ascii_=st.booleans())
def test_fuzz_random_json_lines(tmp_path: Path, values: list[Any], gz: bool, ascii_: bool) -> None:
    p = tmp_path / ("f.jsonl.gz" if gz else "f.jsonl")
    body = "".join(json.dumps(v, ensure_ascii=ascii_) + "\n" for v in values).encode()
    p.write_bytes(gzip.compress(body) if gz else body)
    items = _read_all(p, "skip")
    assert [i.line for i in items] == list(range(1, len(values) + 1))
    for v, it in zip(values, items, strict=True):
        is_doc = isinstance(v, dict) and isinstance(v.get("text"), str)
        assert isinstance(it, Record) == is_doc, (v, it)
        if is_doc:
            assert it.text == v["text"] and json.loads(it.raw or b"") == v
    first_bad = next((i for i in items if isinstance(i, Reject)), None)
    if first_bad is None:
        assert _read_all(p, "fail") == items
    else:
        with pytest.raises(InputError) as ei:
            _read_all(p, "fail")
        assert ei.value.line == first_bad.line


def _valid_gzip(tmp_path: Path) -> tuple[bytes, list[str]]:
    texts = [_doc(i, 30) for i in range(40)]
    body = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    return gzip.compress(body, mtime=0), texts


@FUZZ
@given(data=st.data())
def test_fuzz_truncated_or_corrupted_gzip(tmp_path: Path, data: st.DataObject) -> None:
    good, texts = _valid_gzip(tmp_path)
    mode = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    at = data.draw(st.integers(0, len(good) - 1))
    if mode == "truncate":
        bad = good[:at]
    elif mode == "flip":
        bad = good[:at] + bytes([good[at] ^ data.draw(st.integers(1, 255))]) + good[at + 1 :]
    else:
        bad = good[:at] + data.draw(st.binary(min_size=1, max_size=8)) + good[at:]
    p = tmp_path / "c.jsonl.gz"
    p.write_bytes(bad)
    try:
        items = _read_all(p, "skip")
    except CLEAN as e:
        assert isinstance(e, OSError | ValueError) and "c.jsonl.gz" in str(e)
        return
    got = [i.text for i in items if isinstance(i, Record)]
    if mode == "truncate":
        assert at == 0 and got == [], "a truncated stream must not read as complete"
    elif got != texts:
        # Only header fields outside the data (mtime, flags' unused bits, OS) may change
        # without an error; the data itself is checked by its CRC-32 and length.
        pytest.fail(f"corrupted gzip read without error: {mode} at {at}")


def _valid_parquet(path: Path) -> list[str]:
    texts = [_doc(i, 10) for i in range(30)]
    pq.write_table(pa.table({"text": texts, "id": list(range(30))}), path, row_group_size=10)
    return texts


@settings(FUZZ, max_examples=max(10, FUZZ_EXAMPLES // 2))
@given(data=st.data())
def test_fuzz_corrupted_parquet(tmp_path: Path, data: st.DataObject) -> None:
    p = tmp_path / "c.parquet"
    texts = _valid_parquet(p)
    good = p.read_bytes()
    at = data.draw(st.integers(0, len(good) - 1))
    if data.draw(st.booleans()):
        bad = good[:at]
    else:
        bad = good[:at] + bytes([good[at] ^ data.draw(st.integers(1, 255))]) + good[at + 1 :]
    p.write_bytes(bad)
    for on_error in ("fail", "skip"):
        try:
            items = _read_all(p, on_error)
            batches = list(iter_batches(p, on_error=on_error, batch_size=7))
        except CLEAN:
            continue
        got = [i.text for i in items if isinstance(i, Record)]
        assert all(isinstance(t, str) for t in got) and len(texts) > 0
        assert sum(len(b.texts) for b in batches) == len(got)


def test_wrong_argument_types_raise_cleanly(tmp_path: Path) -> None:
    p = _corpus(tmp_path / "in.jsonl")
    for kwargs, exc in (
        ({"field": 3}, TypeError),
        ({"batch_size": "8"}, TypeError),
        ({"batch_size": True}, TypeError),
        ({"batch_size": 0}, ValueError),
        ({"batch_size": 2**64}, ValueError),
        ({"max_line_bytes": -1}, ValueError),
        ({"max_line_bytes": 1.0}, TypeError),
        ({"on_error": "ignore"}, ValueError),
    ):
        with pytest.raises(exc):
            list(iter_batches(p, **kwargs))
    with pytest.raises(FileNotFoundError):
        list(iter_batches(tmp_path / "missing.jsonl"))
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unknown format"):
        list(iter_batches(tmp_path / "x.csv"))
    (tmp_path / "dir.jsonl").mkdir()
    with pytest.raises(OSError):
        list(iter_batches(tmp_path / "dir.jsonl"))
