"""`slimforge demo --model smollm2 --quick`: the compression half of the main job on the real
SmolLM2-135M (its first two blocks, to stay quick) end to end, as users run it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from slimforge.cli import main
from slimforge.pipeline import demo_config, load_config, track_stages

pytestmark = pytest.mark.assets


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slimforge.data.assets import smollm2_gguf

    if not smollm2_gguf().is_file():
        pytest.skip("the SmolLM2-135M asset is not fetched (make assets)")
    out = tmp_path_factory.mktemp("smol") / "run"
    args = ["demo", "--model", "smollm2", "--quick", "--out", str(out), "-q", "--threads", "2"]
    assert main(args) == 0
    return out


def _metrics(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text())["metrics"]


def test_report_structure_and_figures(smol_run: Path, capsys) -> None:
    md = (smol_run / "report.md").read_text(encoding="utf-8")
    for section in ("What each stage bought", "How these were measured", "Stages", "Reproduce"):
        assert f"## {section}" in md
    assert "slimforge demo --model smollm2 --quick" in md
    html = (smol_run / "report.html").read_text(encoding="utf-8")
    for png in ("size_quality.png", "losses.png"):
        data = (smol_run / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f'src="{png}"' in html
    rows = _metrics(smol_run, "evaluate")["rows"]
    assert [r["model"] for r in rows] == [
        "SmolLM2-135M (float32)", "LoRA-adapted, merged", "MLP neurons pruned + LoRA recovery",
        "GPTQ INT8", "GPTQ INT4 (group 32)",
    ]  # fmt: skip
    for r in rows:
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0, r
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
    base, adapted, pruned, int8, int4 = rows
    assert base["params"] == adapted["params"] > pruned["params"] == int8["params"]
    # INT4 + INT8 embedding is well under a third of the float32 folder at two blocks (the
    # embedding table dominates); INT8 sits between.
    assert int4["bytes"] < int8["bytes"] < pruned["bytes"] / 2.5
    ad, pr = _metrics(smol_run, "adapt"), _metrics(smol_run, "prune")
    # LoRA lowers the held-out loss even in four steps (the 2-block model starts far off).
    assert ad["perplexity"] < ad["perplexity_before"]
    assert pr["params_after"] < pr["params_before"] and pr["intermediate_size"] % 32 == 0
    table = md.split("## What each stage bought")[1].split("## ")[0]
    numbers = re.findall(r"[-+]?\d[\d,]*\.?\d*", table)
    assert numbers and all(math.isfinite(float(n.replace(",", ""))) for n in numbers)


def test_gguf_export_copies_gptq_codes_and_reads_back(smol_run: Path) -> None:
    ex = _metrics(smol_run, "export")
    layers = _metrics(smol_run, "base")["layers"]
    # Every linear's GPTQ codes go into Q4_1 blocks as they are, and the embedding table's
    # symmetric INT8 groups of 32 into Q8_0 blocks: nothing is re-quantized.
    assert ex["q4_1"]["codes_copied"] == 7 * layers + 1
    assert ex["q4_1"]["requantized"] == 0
    ev = _metrics(smol_run, "evaluate")
    int4 = ev["rows"][-1]["perplexity"]
    back = ev["gguf"]["perplexity_slimforge"]
    assert abs(math.log(back / int4)) < 0.02, (back, int4)
    lc = ev["gguf"]["llama_cpp"]
    if isinstance(lc, dict):  # llama-cpp-python installed (a bench dependency)
        assert lc["agreement"] >= 0.85
        assert abs(math.log(lc["perplexity"] / ev["gguf"]["perplexity_slimforge_windows"])) < 0.1
    else:
        assert "not installed" in lc


def test_rerun_skips_and_from_redoes(smol_run: Path, capsys) -> None:
    args = ["demo", "--model", "smollm2", "--quick", "--out", str(smol_run), "-q"]
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == len(track_stages("smollm2"))
    assert main([*args, "--from", "evaluate"]) == 0
    out = capsys.readouterr().out
    assert "[8/9] evaluate: perplexity" in out and "[7/9] export: done earlier" in out


def test_track_configs(tmp_path: Path) -> None:
    cfg = demo_config("quick", "smollm2")
    assert cfg["run"]["model"] == "smollm2" and cfg["base"]["layers"] == 2
    assert [s.name for s in track_stages("smollm2")][:3] == ["dedup", "prepare", "base"]
    with pytest.raises(ValueError, match="model must be one of"):
        demo_config("quick", "resnet")
    toml = tmp_path / "p.toml"
    toml.write_text('[run]\nmodel = "smollm2"\nbase = "quick"\n[adapt]\nsteps = 3\n')
    cfg = load_config(toml)
    assert cfg["adapt"]["steps"] == 3 and cfg["base"]["layers"] == 2
    toml.write_text('[run]\nmodel = "smollm2"\n[teacher]\nsteps = 3\n')
    with pytest.raises(ValueError, match=r"unknown section \[teacher\]"):
        load_config(toml)
