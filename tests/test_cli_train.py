"""`slimforge prepare` and `slimforge train` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from slimforge.cli import main
from slimforge.data import corpus_path
from slimforge.data.tokens import TokenFile

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SLIMFORGE_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
SMALL = ["--layers", "1", "--hidden", "32", "--heads", "2", "--seq-len", "64", "--batch", "4",
         "--threads", "1", "-q"]  # fmt: skip


def test_prepare_writes_token_files_of_every_document(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["prepare", str(corpus_path()), "-o", str(tmp_path / "d"), "-q"]) == 0
    train, val = TokenFile(tmp_path / "d" / "train"), TokenFile(tmp_path / "d" / "val")
    assert train.meta["documents"] + val.meta["documents"] == 4960
    assert val.meta["documents"] > 0 and train.tokens.dtype == np.uint8
    assert "tokens in" in capsys.readouterr().out
    assert main(["prepare", str(corpus_path()), "-o", str(tmp_path / "e"), "--val-fraction",
                 "0.9"]) == 2  # fmt: skip


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    import signal
    import time

    data = tmp_path / "d"
    assert main(["prepare", str(corpus_path()), "-o", str(data), "-q"]) == 0

    def cmd(out: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "slimforge", "train", "--data", str(data), "--out",
                str(tmp_path / out), "--steps", "12", "--save-every", "3", *SMALL, *extra]  # fmt: skip

    whole = subprocess.run(cmd("whole"), env=ENV, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(cmd("parts"), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = tmp_path / "parts" / "checkpoints" / "step-0000003"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # finishes the running step, saves, exits 130
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 130), err  # 0 only if it had already finished
    resumed = subprocess.run(cmd("parts", "--resume"), env=ENV, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    a = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    last_a = [r for r in a if r.get("step") == 12 and "loss" in r]
    last_b = [r for r in b if r.get("step") == 12 and "loss" in r]
    assert last_a[-1]["loss"] == last_b[-1]["loss"]  # bit for bit
    eval_a = [r["eval_nll"] for r in a if "eval_nll" in r]
    eval_b = [r["eval_nll"] for r in b if "eval_nll" in r]
    assert eval_a[-1] == eval_b[-1]
    cfg = json.loads((tmp_path / "whole" / "model_config.json").read_text())
    assert cfg["model"] == "gpt" and cfg["num_layers"] == 1


def test_train_reports_missing_data_as_a_user_error(tmp_path: Path) -> None:
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
