"""The efficiency pipeline as a resumable run folder: dedup, prepare, teacher, synth, distill,
prune, quantize, evaluate, report.

    from slimforge.pipeline import demo_config, run_pipeline
    run_pipeline("slimforge-demo", demo_config("quick"))      # what `slimforge demo --quick` runs

``slimforge pipeline config.toml`` runs the same stages on the user's data, with the stages and
their parameters from the file (see docs/pipeline.md); ``--from STAGE`` redoes a stage and those
after it; re-running a stopped run resumes it.
"""

from slimforge._optional import require

require("torch", "slimforge.pipeline")

from slimforge.pipeline.config import MODELS, MODES, demo_config, load_config
from slimforge.pipeline.runner import RunFolder, Stage, StageContext
from slimforge.pipeline.stages import STAGES

__all__ = [
    "MODELS",
    "MODES",
    "STAGES",
    "RunFolder",
    "Stage",
    "StageContext",
    "demo_config",
    "load_config",
    "run_pipeline",
    "track_stages",
]


def track_stages(model: str) -> tuple[Stage, ...]:
    """The stages of the demo's track ``model`` (see :data:`MODELS`)."""
    import importlib

    if model not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {model!r}")
    stages: tuple[Stage, ...] = importlib.import_module(MODELS[model]).STAGES
    return stages


def run_pipeline(
    out_dir: str,
    config: dict,
    from_stage: str | None = None,
    progress: bool = True,
) -> dict:
    """Runs ``config["run"]["stages"]`` (default: all the stages of the track
    ``config["run"]["model"]``, :data:`STAGES` for ``gpt``) into ``out_dir``; returns the
    manifests by stage name."""
    stages = track_stages(str(config.get("run", {}).get("model", "gpt")))
    by_name = {s.name: s for s in stages}
    names = list(config.get("run", {}).get("stages") or by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; the stages are {list(by_name)}")
    order = [s for s in stages if s.name in names]  # always in pipeline order
    return RunFolder(out_dir).run(order, config, from_stage=from_stage, progress=progress)
