#!/usr/bin/env python3
"""Check the built wheel the way a user gets it: no repository, no Rust, no dev dependencies.

    python scripts/check_wheel.py dist/slimforge-*.whl [--torch] [--keep DIR]

1. Contents: every module of python/slimforge, the native extension, its type stubs, `py.typed`
   and the bundled corpus are in the wheel, and nothing else of the tree is (tests, .venv, ...).
2. A fresh virtual environment with the wheel and no extras: only the core dependencies are
   installed; from a directory outside the tree `slimforge --version` prints the wheel's version,
   `slimforge dedup` removes the duplicates of a small file, and `slimforge demo` and importing a
   torch-facing area fail with an error naming the extra.
3. With `--torch`: `pip install 'slimforge[torch,llm]'` into a second fresh environment (torch
   pinned to the version of requirements-dev.txt); `slimforge demo --quick` writes its report and
   every `examples/*.py --quick` runs there.

Exit status 0 when everything holds, 1 otherwise (each failure printed). Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "python" / "slimforge"
# Installed by `pip install <wheel>` with no extras (plus pip itself in the fresh venv).
CORE = {"slimforge", "numpy", "tqdm", "pip", "setuptools", "wheel"}
MAX_WHEEL_MB = 40


class Failure(Exception):
    pass


def expected_files() -> set[str]:
    """Paths (inside the wheel) that must be there: the package as it is in the tree."""
    want = {f"slimforge/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")}
    want |= {f"slimforge/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.gz")}
    want |= {"slimforge/_native.pyi", "slimforge/py.typed"}
    return {w for w in want if "__pycache__" not in w}


def check_contents(wheel: Path, want: set[str] | None = None) -> list[str]:
    """Problems with the wheel's file list (empty when it is complete and clean)."""
    want = expected_files() if want is None else want
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    problems = [f"missing from the wheel: {m}" for m in sorted(want - names)]
    if not any(re.fullmatch(r"slimforge/_native\.[^/]*(so|pyd)", n) for n in names):
        problems.append("missing from the wheel: the native extension slimforge/_native.*.so")
    stray = sorted(n for n in names if not n.startswith("slimforge/") and ".dist-info/" not in n)
    problems += [f"not part of the package: {s}" for s in stray]
    mb = wheel.stat().st_size / 2**20
    if mb > MAX_WHEEL_MB:
        problems.append(f"wheel is {mb:.1f} MB (limit {MAX_WHEEL_MB} MB)")
    return problems


def wheel_version(wheel: Path) -> str:
    m = re.match(r"slimforge-([^-]+)-", wheel.name)
    if not m:
        raise Failure(f"not a slimforge wheel name: {wheel.name}")
    return m.group(1)


def run(cmd: list[str], cwd: Path, env: dict[str, str], expect: int = 0) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != expect:
        raise Failure(
            f"{' '.join(cmd)} exited {proc.returncode} (expected {expect}):\n"
            f"{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
        )
    return proc.stdout + proc.stderr


def make_venv(where: Path) -> tuple[Path, dict[str, str]]:
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = f"{where / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(where)
    return where / "bin", env


def core_env(wheel: Path, tmp: Path) -> None:
    """Fresh venv, wheel without extras: core dependencies only, dedup works, torch areas name
    their extra."""
    bin_, env = make_venv(tmp / "venv-core")
    t0 = time.perf_counter()
    run([str(bin_ / "pip"), "install", "-q", str(wheel)], tmp, env)
    print(f"  pip install of the wheel (no extras): {time.perf_counter() - t0:.1f} s")
    listed = json.loads(run([str(bin_ / "pip"), "list", "--format=json"], tmp, env).split("\n")[0])
    names = {p["name"].lower() for p in listed}
    if names - CORE:
        raise Failure(f"the core install pulled more than the core dependencies: {names - CORE}")
    print(f"  installed: {', '.join(sorted(names - {'pip', 'setuptools', 'wheel'}))}")
    work = tmp / "outside"
    work.mkdir()
    out = run([str(bin_ / "slimforge"), "--version"], work, env).strip()
    if out != f"slimforge {wheel_version(wheel)}":
        raise Failure(f"--version says {out!r}, the wheel is {wheel_version(wheel)}")
    py = str(bin_ / "python")
    probe = (
        "import importlib.metadata as m, slimforge; "
        "assert slimforge.__version__ == m.version('slimforge'), slimforge.__version__; "
        "assert slimforge.built_with_cuda(), 'the wheel must carry the CUDA kernels'; "
        "print(slimforge.__file__)"
    )
    where = run([py, "-c", probe], work, env).strip()
    if str(ROOT) in where:
        raise Failure(f"slimforge imported from the tree, not the wheel: {where}")
    rng = random.Random(0)
    docs = [
        {"text": f"record {i}: " + " ".join(f"w{rng.randrange(100_000)}" for _ in range(40))}
        for i in range(50)
    ]
    docs += docs[:10]  # ten exact duplicates
    (work / "in.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    run([str(bin_ / "slimforge"), "dedup", "in.jsonl", "-o", "out.jsonl"], work, env)
    kept = (work / "out.jsonl").read_text().count("\n")
    if kept != 50:
        raise Failure(f"dedup kept {kept} of 60 documents, expected 50")
    # The demo trains models: without torch it must stop at once and name the extra.
    msg = run([str(bin_ / "slimforge"), "demo", "--quick", "-q", "--out", "demo"], work, env, 2)
    if "slimforge[torch]" not in msg:
        raise Failure(f"slimforge demo without torch does not name the extra:\n{msg}")
    msg = run([py, "-c", "import slimforge.quant"], work, env, expect=1)
    if "slimforge[torch]" not in msg:
        raise Failure(f"importing slimforge.quant without torch does not name the extra:\n{msg}")
    run([str(bin_ / "slimforge"), "train", "--help"], work, env)
    print(
        "  core install: --version, dedup, train --help, the extra-naming errors of demo and "
        "import: ok"
    )


def torch_env(wheel: Path, tmp: Path) -> None:
    """Fresh venv with the torch and llm extras: every example runs in quick mode."""
    bin_, env = make_venv(tmp / "venv-torch")
    pins = {
        line.split("==")[0].lower(): line.strip()
        for line in (ROOT / "requirements-dev.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    constraints = tmp / "constraints.txt"
    constraints.write_text("\n".join(pins.values()) + "\n")
    t0 = time.perf_counter()
    run(
        [str(bin_ / "pip"), "install", "-q", "-c", str(constraints), f"{wheel}[torch,llm]"],
        tmp,
        env,
    )
    print(f"  pip install of the wheel with [torch,llm]: {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    run([str(bin_ / "slimforge"), "demo", "--quick", "-q", "--out", "demo"], tmp, env)
    report = tmp / "demo" / "report.md"
    if not report.is_file() or "## What each stage bought" not in report.read_text():
        raise Failure("slimforge demo --quick wrote no report")
    print(f"  slimforge demo --quick: ok ({time.perf_counter() - t0:.0f} s)")
    work = tmp / "examples"
    shutil.copytree(ROOT / "examples", work)
    for script in sorted(work.glob("*.py")):
        t0 = time.perf_counter()
        run([str(bin_ / "python"), script.name, "--quick"], work, env)
        print(f"  examples/{script.name} --quick: ok ({time.perf_counter() - t0:.0f} s)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel", type=Path)
    ap.add_argument("--torch", action="store_true", help="also run the examples with [torch,llm]")
    ap.add_argument("--keep", type=Path, help="work here and keep it (default: a temp dir)")
    args = ap.parse_args()
    wheel = args.wheel.resolve()
    print(f"checking {wheel.name} ({wheel.stat().st_size / 2**20:.1f} MB)")
    problems = check_contents(wheel)
    for p in problems:
        print(f"  FAIL {p}")
    if problems:
        return 1
    print("  contents: ok")
    tmp = args.keep or Path(tempfile.mkdtemp(prefix="slimforge-wheel-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        core_env(wheel, tmp)
        if args.torch:
            torch_env(wheel, tmp)
    except Failure as e:
        print(f"  FAIL {e}")
        return 1
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print("wheel check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
