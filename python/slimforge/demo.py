"""The main job on the bundled corpus (`make demo`, `slimforge demo`): the whole efficiency
pipeline (:mod:`slimforge.pipeline`) from deduplication to an INT4 student and a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["run_demo"]


def run_demo(
    out_dir: str | Path = "slimforge-demo",
    progress: bool = True,
    quick: bool = False,
    full: bool = False,
    from_stage: str | None = None,
    threads: int = 0,
    model: str = "gpt",
) -> dict[str, Any]:
    """Runs the pipeline on the bundled corpus into ``out_dir`` (resumable; ``from_stage``
    redoes a stage and those after it) and returns the manifests by stage. ``model``: ``gpt``
    (the whole pipeline: teacher, synthetic data, student, pruning, INT4), ``smollm2`` (the
    compression half on the real SmolLM2-135M: LoRA, pruning, GPTQ, GGUF) or ``mobilenet_v2``
    (the vision path: channel pruning, INT8, ONNX)."""
    from slimforge.pipeline import demo_config, run_pipeline

    if quick and full:
        raise ValueError("choose --quick or --full, not both")
    mode = "quick" if quick else "full" if full else "default"
    config = demo_config(mode, model)
    config["run"]["threads"] = threads
    config["run"]["command"] = (
        "slimforge demo"
        + ("" if model == "gpt" else f" --model {model}")
        + {"quick": " --quick", "full": " --full"}.get(mode, "")
    )
    print(f"== slimforge demo ({model}, {mode}) into {out_dir}")
    manifests = run_pipeline(str(out_dir), config, from_stage=from_stage, progress=progress)
    outputs = manifests.get("report", {}).get("outputs", {})
    report = outputs.get("markdown")
    if report:
        print(f"\nreport: {report}")
        summary = outputs.get("summary") or Path(report).read_text(encoding="utf-8").splitlines()[2]
        print(summary)
    return manifests
