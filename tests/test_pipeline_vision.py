"""The demo's vision track: `slimforge demo --model mobilenet_v2 --quick` end to end on the
pinned MobileNetV2 weights (report structure, every figure finite and plausible, checked against
the float model and ONNX Runtime's float run), resuming, `--from`, and configuration errors."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from slimforge.cli import main
from slimforge.pipeline import demo_config, load_config, run_pipeline
from slimforge.pipeline.runner import StageContext

ROWS = (
    "float, PyTorch fp32",
    "float, ONNX Runtime fp32",
    "pruned, PyTorch fp32",
    "pruned, ONNX Runtime fp32",
    "pruned, ONNX Runtime INT8",
)


def _manifest(run: Path, stage: str) -> dict:
    return json.loads((run / stage / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory: pytest.TempPathFactory, assets: Path) -> Iterator[Path]:
    import slimforge

    out = tmp_path_factory.mktemp("vision") / "run"
    argv = ["demo", "--model", "mobilenet_v2", "--quick", "--out", str(out), "-q"]
    # One thread: a second one only waits for a core when the test machine is busy.
    threads = torch.get_num_threads(), slimforge.get_num_threads()
    try:
        assert main([*argv, "--threads", "1"]) == 0
        yield out
    finally:
        torch.set_num_threads(threads[0])
        slimforge.set_num_threads(threads[1])


@pytest.mark.assets
def test_quick_vision_demo_report_and_figures(vision_run: Path) -> None:
    md = (vision_run / "report.md").read_text(encoding="utf-8")
    for section in ("What each stage bought", "Stages", "How these were measured", "Pruning",
                    "INT8 and ONNX", "Reproduce", "Configuration"):  # fmt: skip
        assert f"## {section}" in md
    assert "slimforge demo --model mobilenet_v2 --quick" in md and "onnxruntime: " in md
    page = (vision_run / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!doctype html>") and "<table>" in page
    for png in ("size_accuracy.png", "latency.png", "losses.png"):
        data = (vision_run / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f'src="{png}"' in page and f"]({png})" in md

    ev = _manifest(vision_run, "evaluate")["metrics"]
    assert ev["threads"] == 1 and ev["batch"] == 32 and ev["image_size"] == 32
    rows = {r["model"]: r for r in ev["rows"]}
    assert tuple(rows) == ROWS
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0, r
        assert math.isfinite(r["kl"]) and r["kl"] > -1e-6  # KL >= 0 up to float rounding
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("ms_b1", "ms_bn")), r
        assert 1e5 < r["bytes"] < 2e7 and 1e6 < r["params"] < 3e6 and r["macs"] > 1e6
        assert r["accuracy"] > 0.3, r  # chance is 0.1: the transfer and recovery learned
    f, f_ort = rows["float, PyTorch fp32"], rows["float, ONNX Runtime fp32"]
    p, p_ort, q = (rows[k] for k in ROWS[2:])
    assert f["agreement"] == 1.0 and f["kl"] == 0.0  # the reference itself
    assert f["accuracy"] > 0.6
    # ONNX Runtime's float run of an exported model matches PyTorch's (BatchNorm folded).
    assert abs(f_ort["accuracy"] - f["accuracy"]) <= 2 / 450 and f_ort["agreement"] >= 0.99
    assert abs(p_ort["accuracy"] - p["accuracy"]) <= 2 / 450
    assert f_ort["macs"] == f["macs"] and f_ort["params"] < f["params"]  # BN folded away
    # Pruning shrinks the network; INT8 shrinks the file about 4x.
    assert p["params"] < 0.85 * f["params"] and p["macs"] < 0.85 * f["macs"]
    assert p["bytes"] < f["bytes"] and q["bytes"] < 0.35 * p_ort["bytes"]
    assert q["params"] == p_ort["params"] and q["macs"] == p_ort["macs"]

    pr = _manifest(vision_run, "prune")["metrics"]
    assert all(w % 8 == 0 for w in pr["widths_after"])
    assert sum(pr["widths_after"]) < sum(pr["widths_before"])
    assert 0.2 < pr["channels_removed"] < 0.35
    assert pr["accuracy_recovered"] == pytest.approx(p["accuracy"])
    assert all(math.isfinite(x) for x in pr["losses"]) and len(pr["losses"]) == 40
    qm = _manifest(vision_run, "quantize")["metrics"]
    assert qm["onnx_max_abs_diff"] < 1e-3 and qm["calibration_images"] == 64
    data = _manifest(vision_run, "data")["metrics"]
    assert data["train_images"] + data["test_images"] == 1797
    assert sum(data["test_per_class"]) == data["test_images"] == 450

    # Every number in the model table is finite; the summary is the table's last row.
    table = md.split("## What each stage bought")[1].split("## ")[0]
    numbers = re.findall(r"[-+]?\d[\d,]*\.?\d*", table)
    assert numbers and all(math.isfinite(float(n.replace(",", ""))) for n in numbers)
    out = _manifest(vision_run, "report")["outputs"]
    assert {"markdown", "html", "summary"} <= set(out)
    assert out["summary"] in md and "pruned, ONNX Runtime INT8" in out["summary"]
    assert f"{f['bytes'] / q['bytes']:.1f}x smaller" in out["summary"]


@pytest.mark.assets
def test_quick_vision_demo_rerun_skips_and_from_redoes(vision_run: Path, capsys) -> None:
    capsys.readouterr()
    argv = ["demo", "--model", "mobilenet_v2", "--quick", "--out", str(vision_run), "-q",
            "--threads", "1"]  # fmt: skip
    before = {p.parent.name: p.read_text() for p in vision_run.glob("*/manifest.json")}
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 6
    after = {p.parent.name: p.read_text() for p in vision_run.glob("*/manifest.json")}
    assert after == before
    summary = _manifest(vision_run, "report")["outputs"]["summary"]
    assert summary in out  # the demo prints the report's summary
    assert main([*argv, "--from", "evaluate"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 4
    assert "[5/6] evaluate: finished" in out and "[6/6] report: finished" in out
    for stage in ("data", "float", "prune", "quantize"):
        assert (vision_run / stage / "manifest.json").read_text() == before[stage]
    assert (vision_run / "evaluate" / "manifest.json").read_text() != before["evaluate"]
    assert main([*argv, "--from", "teacher"]) == 2


def test_vision_track_config_errors(tmp_path: Path) -> None:
    for mode in ("quick", "default", "full"):
        cfg = demo_config(mode, "mobilenet_v2")
        assert cfg["run"]["model"] == "mobilenet_v2"
        assert set(cfg) == {"run", "data", "float", "prune", "quantize", "evaluate", "report"}
    assert demo_config("quick", "mobilenet_v2")["data"]["image_size"] == 32
    assert demo_config("full", "mobilenet_v2")["data"]["image_size"] == 224
    with pytest.raises(ValueError, match="mode must be one of"):
        demo_config("fast", "mobilenet_v2")
    from slimforge.pipeline.vision import track_config

    with pytest.raises(ValueError, match="mode must be one of"):
        track_config("huge")
    for text, match in (('[run]\nmodel = "mobilenet_v2"\n[teacher]\nsteps = 1\n', "unknown section"),
                        ('[run]\nmodel = "mobilenet_v2"\n[float]\nstepz = 1\n', "unknown keys"),
                        ('[run]\nmodel = "mobilenet_v2"\nbase = "tiny"\n', "mode must be")):  # fmt: skip
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_config(bad)
    cfg = demo_config("quick", "mobilenet_v2")
    cfg["run"]["stages"] = ["data"]
    cfg["data"]["image_size"] = 16
    with pytest.raises(ValueError, match=r"\[data\] image_size must be int >= 32, got 16"):
        run_pipeline(str(tmp_path / "run"), cfg, progress=False)
    cfg["data"]["image_size"] = 40
    cfg["data"]["test_fraction"] = "a lot"
    with pytest.raises(ValueError, match=r"\[data\] test_fraction"):
        run_pipeline(str(tmp_path / "run"), cfg, progress=False)
    cfg["run"]["stages"] = ["float"]
    with pytest.raises(ValueError, match="needs"):
        run_pipeline(str(tmp_path / "run"), cfg, progress=False)


def test_data_stage_from_a_toml_matches_digits_dataset(tmp_path: Path) -> None:
    """The data stage's stored split, normalised for MobileNetV2, is `digits_dataset` at the
    same size, seed and split (up to its 8-bit storage)."""
    from slimforge.models.vision import IMAGENET_MEAN, IMAGENET_STD, digits_dataset
    from slimforge.pipeline.vision import _digits

    toml = tmp_path / "vision.toml"
    toml.write_text('[run]\nmodel = "mobilenet_v2"\nbase = "quick"\nstages = ["data"]\nseed = 3\n'
                    "[data]\nimage_size = 40\n")  # fmt: skip
    assert main(["pipeline", str(toml), "--out", str(tmp_path / "run"), "-q"]) == 0
    manifest = _manifest(tmp_path / "run", "data")
    assert manifest["metrics"]["seed"] == 3 and manifest["metrics"]["image_size"] == 40
    with np.load(manifest["outputs"]["dataset"], allow_pickle=False) as z:
        assert z["train_x"].dtype == np.uint8 and z["train_x"].shape[1:] == (40, 40)
    ctx = StageContext("x", tmp_path, {}, {}, {"data": manifest}, progress=False)
    got = _digits(ctx, IMAGENET_MEAN, IMAGENET_STD)
    want = digits_dataset(40, 0.25, 3)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
    assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
    bound = 0.5 / 255 / min(IMAGENET_STD) + 1e-5  # half an 8-bit step, normalised
    assert float((got[0] - want[0]).abs().max()) <= bound
    assert float((got[2] - want[2]).abs().max()) <= bound


@pytest.mark.assets
def test_vision_report_renders_its_plots_in_headless_chromium(
    vision_run: Path, render_html
) -> None:
    sizes = render_html(vision_run / "report.html")
    assert len(sizes) == 3 and all(w > 100 for w in sizes)  # every plot decoded
