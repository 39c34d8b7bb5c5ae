"""Platform guarantees: one fork-safe thread pool, GIL released around Rust work, abi3 import."""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import slimforge
from slimforge.dedup import MinHasher

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [f"document {i} " + "lorem ipsum dolor sit amet consectetur " * 20 for i in range(200)]


def _child_signatures(q: mp.Queue) -> None:  # runs in a forked child
    q.put(MinHasher().signatures(TEXTS).sum(dtype=np.uint64).item())


def test_pool_survives_fork() -> None:
    expected = MinHasher().signatures(TEXTS).sum(dtype=np.uint64).item()  # pool now running
    ctx = mp.get_context("fork")
    q: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child_signatures, args=(q,))
    proc.start()
    proc.join(timeout=60)
    if proc.is_alive():
        proc.kill()
        pytest.fail("Rust work in a forked child deadlocked")
    assert proc.exitcode == 0
    assert q.get(timeout=5) == expected


def test_thread_count_setting_and_env() -> None:
    before = slimforge.get_num_threads()
    try:
        slimforge.set_num_threads(1)
        assert slimforge.get_num_threads() == 1
        a = MinHasher().signatures(TEXTS)
        slimforge.set_num_threads(2)
        assert slimforge.get_num_threads() == 2
        np.testing.assert_array_equal(a, MinHasher().signatures(TEXTS))
        with pytest.raises(ValueError):
            slimforge.set_num_threads(0)
    finally:
        slimforge.set_num_threads(before)
    out = subprocess.run(
        [sys.executable, "-c", "import slimforge; print(slimforge.get_num_threads())"],
        env={**os.environ, "SLIMFORGE_NUM_THREADS": "3"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "3"


def test_set_threads_sets_both_pools() -> None:
    torch = pytest.importorskip("torch")
    before = (slimforge.get_num_threads(), torch.get_num_threads())
    try:
        slimforge.set_threads(1)
        assert (slimforge.get_num_threads(), torch.get_num_threads()) == (1, 1)
        slimforge.set_threads(0)  # 0: leave both as they are
        assert (slimforge.get_num_threads(), torch.get_num_threads()) == (1, 1)
        slimforge.set_threads(2)
        assert (slimforge.get_num_threads(), torch.get_num_threads()) == (2, 2)
        for bad in (-1, 1.5, True):
            with pytest.raises(ValueError, match="threads"):
                slimforge.set_threads(bad)  # type: ignore[arg-type]
    finally:
        slimforge.set_num_threads(before[0])
        torch.set_num_threads(before[1])


def test_gil_is_released_during_rust_work() -> None:
    texts = [" ".join(f"w{(i * 7 + j) % 9973}" for j in range(3000)) for i in range(300)]
    hasher = MinHasher(num_perm=256)
    done = threading.Event()

    def work() -> None:
        for _ in range(3):
            hasher.signatures(texts)
        done.set()

    t = threading.Thread(target=work)
    ticks = 0
    t.start()
    while not done.is_set():
        ticks += 1
    t.join()
    # With the GIL held for the whole Rust call this loop could not run while it worked.
    assert ticks > 1000


def _other_pythons() -> list[str]:
    """CPython 3.10, 3.12 and 3.13 interpreters present on this machine (pyenv or PATH)."""
    found = []
    pyenv = Path.home() / ".pyenv" / "versions"
    for v in ("3.10", "3.12", "3.13"):
        cands = sorted(pyenv.glob(f"{v}.*/bin/python{v}")) if pyenv.exists() else []
        exe = str(cands[-1]) if cands else shutil.which(f"python{v}")
        if exe and "shims" not in exe:
            found.append(exe)
    return found


def test_extension_is_abi3_and_imports_on_other_pythons() -> None:
    so = Path(slimforge._native.__file__)
    assert so.name.endswith(".abi3.so"), so.name
    pythons = _other_pythons()
    if not pythons:
        pytest.skip("no other CPython 3.10-3.13 interpreter on this machine")
    for exe in pythons:
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import slimforge; "
            "print(slimforge.__version__, slimforge.get_num_threads())"
        )
        out = subprocess.run(
            [exe, "-S", "-c", code, str(so.parent.parent)], capture_output=True, text=True
        )
        assert out.returncode == 0, f"{exe}: {out.stderr}"
        assert out.stdout.split()[0] == slimforge.__version__
