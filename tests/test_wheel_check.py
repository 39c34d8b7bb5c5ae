"""The wheel check (scripts/check_wheel.py, run by `make test` on the real wheel) must fail when
package data is left out of the wheel, and the optional-dependency guard must name the extra."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("check_wheel", ROOT / "scripts" / "check_wheel.py")
assert spec is not None and spec.loader is not None
check_wheel = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_wheel)


def fake_wheel(path: Path, drop: str | None = None, extra: str | None = None) -> Path:
    """A zip laid out like the wheel (file contents empty), minus `drop`, plus `extra`."""
    names = sorted(check_wheel.expected_files())
    names += ["slimforge/_native.abi3.so", "slimforge-0.1.0.dist-info/METADATA"]
    if extra:
        names.append(extra)
    with zipfile.ZipFile(path, "w") as z:
        for n in names:
            if n != drop:
                z.writestr(n, b"")
    return path


def test_expected_files_cover_package_data() -> None:
    want = check_wheel.expected_files()
    assert "slimforge/data/corpus.jsonl.gz" in want
    assert "slimforge/_native.pyi" in want and "slimforge/py.typed" in want
    assert "slimforge/__init__.py" in want and "slimforge/cli/__init__.py" in want


def test_complete_wheel_passes(tmp_path: Path) -> None:
    assert check_wheel.check_contents(fake_wheel(tmp_path / "slimforge-0.1.0-x.whl")) == []


@pytest.mark.parametrize(
    "drop",
    [
        "slimforge/data/corpus.jsonl.gz",
        "slimforge/_native.pyi",
        "slimforge/py.typed",
        "slimforge/dedup/__init__.py",
        "slimforge/_native.abi3.so",
    ],
)
def test_missing_file_fails(tmp_path: Path, drop: str) -> None:
    problems = check_wheel.check_contents(fake_wheel(tmp_path / "w.whl", drop=drop))
    assert problems, f"leaving out {drop} was not noticed"
    shown = "native extension" if drop.endswith(".so") else drop
    assert any(shown in p for p in problems)


def test_stray_file_fails(tmp_path: Path) -> None:
    problems = check_wheel.check_contents(fake_wheel(tmp_path / "w.whl", extra="tests/x.py"))
    assert problems == ["not part of the package: tests/x.py"]


def test_missing_torch_names_the_extra(tmp_path: Path) -> None:
    """Importing a torch-facing area where torch cannot be imported: one ImportError naming
    `slimforge[torch]` (torch blocked through sys.modules in a subprocess)."""
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import slimforge, slimforge.dedup, slimforge.cli\n"  # the core imports without torch
        "for area in ('quant', 'train', 'models', 'attention', 'moe', 'optim'):\n"
        "    try:\n"
        "        __import__('slimforge.' + area)\n"
        "    except ImportError as e:\n"
        "        assert \"pip install 'slimforge[torch]'\" in str(e), e\n"
        "        print(area, 'ok')\n"
        "    else:\n"
        "        raise SystemExit(area + ' imported without torch')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        w for a in ("quant", "train", "models", "attention", "moe", "optim") for w in (a, "ok")
    ]
