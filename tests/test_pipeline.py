"""The main job: `slimforge demo --quick` end to end, resumable run folders, the TOML pipeline
and the stage verbs (distill, synth, prune, quantize, eval) as users call them."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from slimforge.cli import main
from slimforge.pipeline import RunFolder, Stage, demo_config, load_config, run_pipeline


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out), "-q", "--threads", "2"]) == 0
    return out


def test_quick_demo_report_structure_and_figures(quick_run: Path) -> None:
    md = (quick_run / "report.md").read_text(encoding="utf-8")
    for section in ("What each stage bought", "Stages", "How these were measured",
                    "Synthetic data filter", "Samples", "Reproduce"):  # fmt: skip
        assert f"## {section}" in md
    assert "slimforge demo --quick" in md
    html = (quick_run / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!doctype html>") and "<table>" in html
    for png in ("losses.png", "size_quality.png", "speed.png"):
        data = (quick_run / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f'src="{png}"' in html
    rows = json.loads((quick_run / "evaluate" / "manifest.json").read_text())["metrics"]["rows"]
    names = [r["model"] for r in rows]
    assert names[0].startswith("teacher") and names[-1] == "student INT4 (GPTQ)" and len(rows) == 5
    for r in rows:
        assert 0.5 < r["val_bpb"] < 8.5, r  # bits per byte: below 8 means it learned something
        assert r["bytes"] > 1000 and r["params"] > 1000 and r["active_params"] <= r["params"]
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0
    teacher, student, pruned, int8, int4 = rows
    assert student["params"] < 0.6 * teacher["params"]
    assert pruned["params"] < student["params"]
    assert int4["params"] == int8["params"] == pruned["params"]
    assert int4["bytes"] < int8["bytes"] < pruned["bytes"]
    # Every number in the model table is finite.
    table = md.split("## What each stage bought")[1].split("## ")[0]
    numbers = re.findall(r"[-+]?\d[\d,]*\.?\d*", table)
    assert numbers and all(math.isfinite(float(n.replace(",", ""))) for n in numbers)
    for stage in ("teacher", "distill", "prune"):
        m = json.loads((quick_run / stage / "manifest.json").read_text())["metrics"]
        assert m["flops"] > 0 and m["losses"]
        assert all(step >= 1 and math.isfinite(loss) for step, loss in m["losses"])


def test_quick_demo_rerun_skips_and_from_redoes(quick_run: Path, capsys) -> None:
    before = {p.parent.name: p.read_text() for p in quick_run.glob("*/manifest.json")}
    assert main(["demo", "--quick", "--out", str(quick_run), "-q", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 9
    after = {p.parent.name: p.read_text() for p in quick_run.glob("*/manifest.json")}
    assert after == before
    assert main(["demo", "--quick", "--out", str(quick_run), "-q", "--from", "evaluate"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped") == 7 and "[8/9] evaluate: finished" in out
    assert main(["demo", "--quick", "--out", str(quick_run), "--from", "nope"]) == 2


def _stages(calls: list[str], fail_at: str | None = None) -> list[Stage]:
    def make(name: str) -> Stage:
        def fn(ctx):
            calls.append(name)
            if name == fail_at:
                raise KeyboardInterrupt
            (ctx.dir / "out.txt").write_text(name + str(ctx.params))
            return {"outputs": {"file": str(ctx.dir / "out.txt")}, "metrics": {"n": len(calls)}}

        return Stage(name, fn)

    return [make(n) for n in ("a", "b", "c")]


def test_run_folder_resumes_after_an_interruption(tmp_path: Path) -> None:
    calls: list[str] = []
    config = {"a": {"x": 1}, "b": {}, "c": {}}
    with pytest.raises(KeyboardInterrupt):
        RunFolder(tmp_path).run(_stages(calls, fail_at="b"), config, progress=False)
    assert calls == ["a", "b"]
    assert (tmp_path / "a" / "manifest.json").is_file()
    assert not (tmp_path / "b" / "manifest.json").exists()
    calls.clear()
    m = RunFolder(tmp_path).run(_stages(calls), config, progress=False)
    assert calls == ["b", "c"] and set(m) == {"a", "b", "c"}
    calls.clear()
    RunFolder(tmp_path).run(_stages(calls), config, progress=False)
    assert calls == []
    # Changing a stage's parameters redoes it and every stage after it.
    RunFolder(tmp_path).run(_stages(calls), {**config, "b": {"y": 2}}, progress=False)
    assert calls == ["b", "c"]
    calls.clear()
    RunFolder(tmp_path).run(_stages(calls), {**config, "b": {"y": 2}}, "a", progress=False)
    assert calls == ["a", "b", "c"]
    # A damaged manifest means the stage did not finish.
    (tmp_path / "c" / "manifest.json").write_text("{not json")
    calls.clear()
    RunFolder(tmp_path).run(_stages(calls), {**config, "b": {"y": 2}}, progress=False)
    assert calls == ["c"]


def test_teacher_stage_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    config = demo_config("quick")
    config["run"]["stages"] = ["dedup", "prepare", "teacher"]
    config["teacher"]["steps"] = 12
    config["teacher"]["save_every"] = 4
    first = run_pipeline(str(tmp_path), config, progress=False)["teacher"]
    # A stop after step 8: drop the manifest and the last checkpoint, as if killed there.
    (tmp_path / "teacher" / "manifest.json").unlink()
    ckpts = tmp_path / "teacher" / "run" / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    assert latest.endswith("12")
    import shutil

    shutil.rmtree(ckpts / latest)
    (ckpts / "latest").write_text(sorted(p.name for p in ckpts.iterdir() if p.is_dir())[-1])
    again = run_pipeline(str(tmp_path), config, progress=False)["teacher"]
    assert again["metrics"]["val_bpb"] == pytest.approx(first["metrics"]["val_bpb"], abs=1e-6)


def test_pipeline_toml_on_user_documents(tmp_path: Path, capsys) -> None:
    docs = tmp_path / "docs.jsonl"
    lines = [{"body": f"Document {i}: " + " ".join(f"word{(i * j) % 97}" for j in range(300))}
             for i in range(60)]  # fmt: skip
    lines.append(lines[0])  # an exact duplicate
    docs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg = tmp_path / "pipe.toml"
    cfg.write_text(
        '[run]\nbase = "quick"\nstages = ["dedup", "prepare", "teacher"]\n'
        '[data]\ninputs = ["docs.jsonl"]\nfield = "body"\nval_fraction = 0.2\n'
        "[teacher]\nsteps = 3\n"
    )
    assert main(["pipeline", str(cfg), "--out", str(tmp_path / "run"), "-q"]) == 0
    m = json.loads((tmp_path / "run" / "dedup" / "manifest.json").read_text())["metrics"]
    assert m["documents"] == 61 and m["exact_duplicates"] == 1
    p = json.loads((tmp_path / "run" / "prepare" / "manifest.json").read_text())["metrics"]
    assert p["train_documents"] + p["val_documents"] == 60 and p["val_documents"] > 0
    assert (tmp_path / "run" / "teacher" / "model" / "model.safetensors").is_file()
    bad = tmp_path / "bad.toml"
    for text, match in (("[teacherr]\nsteps = 1\n", "unknown section"),
                        ("[teacher]\nstepz = 1\n", "unknown keys"),
                        ('[data]\ninputs = ["missing.jsonl"]\n', "not found"),
                        ("[run\n", "TOML")):  # fmt: skip
        bad.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_config(bad)
    assert main(["pipeline", str(bad), "--out", str(tmp_path / "r2")]) == 2
    assert "TOML" in capsys.readouterr().err


def test_stage_verbs_as_users_call_them(quick_run: Path, tmp_path: Path, capsys) -> None:
    data, teacher = quick_run / "prepare", quick_run / "teacher" / "model"
    common = ["--seq-len", "64"]
    st = tmp_path / "student"
    assert main(["distill", "--teacher", str(teacher), "--data", str(data), "--out", str(st),
                 "--layers", "1", "--hidden", "64", "--heads", "2", "--steps", "3",
                 "--batch", "4", *common, "-q"]) == 0  # fmt: skip
    assert "of the teacher's parameters" in capsys.readouterr().out
    assert main(["distill", "--teacher", str(teacher), "--data", str(data), "--out",
                 str(tmp_path / "half"), "--keep-layers", "1", "--steps", "2", "--batch", "2",
                 *common, "-q"]) == 0  # fmt: skip
    synth = tmp_path / "s.jsonl"
    assert main(["synth", str(teacher), "--prompts-from", str(data / "train_texts.jsonl"),
                 "--n", "3", "--prompt-chars", "16", "--max-new-tokens", "24",
                 "--min-chars", "1", "--max-repeated-ngram", "1", "-o", str(synth), "-q"]) == 0  # fmt: skip
    recs = [json.loads(x) for x in synth.read_text().splitlines()]
    assert recs and all("prompt" in r and "sampling" in r for r in recs)
    assert main(["prune", str(st), "--method", "wanda", "--amount", "0.5", "--data", str(data),
                 *common, "-o", str(tmp_path / "w")]) == 0  # fmt: skip
    assert main(["prune", str(st), "--method", "neurons", "--amount", "0.5", "--round-to", "32",
                 "--data", str(data), *common, "-o", str(tmp_path / "n")]) == 0  # fmt: skip
    assert main(["quantize", str(tmp_path / "n"), "--method", "gptq", "--bits", "4",
                 "--data", str(data), *common, "-o", str(tmp_path / "q4")]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(st), str(tmp_path / "w"), str(tmp_path / "n"), str(tmp_path / "q4"),
                 "--data", str(data), *common, "--windows", "4", "--gen-tokens", "8",
                 "--json"]) == 0  # fmt: skip
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == 4 and all(0 < r["bits_per_byte"] < 9 for r in rows)
    assert rows[3]["bytes"] < rows[2]["bytes"] < rows[0]["bytes"]
    assert main(["prune", str(st), "--method", "wanda", "--amount", "0.5",
                 "-o", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "--data" in capsys.readouterr().err


def test_report_renders_its_plots_in_headless_chromium(
    quick_run: Path, tmp_path: Path, render_html
) -> None:
    shot = tmp_path / "report.png"
    sizes = render_html(quick_run / "report.html", shot)
    assert len(sizes) == 3 and all(w > 100 for w in sizes)  # every plot decoded and laid out
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
