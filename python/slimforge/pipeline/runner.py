"""A resumable run folder: stages in order, each finished stage recorded by a manifest.

    run = RunFolder("slimforge-demo")
    manifests = run.run(stages, config, from_stage=None)

Each stage writes into ``<run>/<stage>/`` and returns a dict of outputs and metrics; the
runner then writes ``<stage>/manifest.json`` atomically. A stage is skipped when its manifest
exists with the same key (a hash of the stage's parameters and of the manifests it read), so a
re-run after an interruption resumes at the first unfinished stage (and stages that train
resume from their own checkpoints); ``from_stage`` redoes that stage and the ones after it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slimforge.io import atomic_path

__all__ = ["Stage", "StageContext", "RunFolder"]


@dataclass
class StageContext:
    """What a stage function sees: its folder, its parameters, the whole configuration, the
    manifests of the stages before it (by name) and whether to show progress bars."""

    name: str
    dir: Path
    params: dict[str, Any]
    config: dict[str, Any]
    upstream: dict[str, dict[str, Any]]
    progress: bool = True

    def log(self, message: str) -> None:
        print(f"  {message}", flush=True)

    def output(self, stage: str, key: str) -> Any:
        """An output of an earlier stage (KeyError naming what is missing)."""
        if stage not in self.upstream:
            raise KeyError(f"stage {self.name!r} needs stage {stage!r}, which has not run")
        outputs = self.upstream[stage].get("outputs", {})
        if key not in outputs:
            raise KeyError(f"stage {stage!r} has no output {key!r}")
        return outputs[key]


@dataclass(frozen=True)
class Stage:
    """A named step: ``fn(ctx) -> {"outputs": {...}, "metrics": {...}}``; ``needs``: the
    stages that must come before it in a chain. A stage's key covers its parameters and the
    keys of every stage before it, so changing an early stage redoes the later ones."""

    name: str
    fn: Callable[[StageContext], dict[str, Any]]
    needs: tuple[str, ...] = ()
    help: str = ""


#: Run settings that do not change what a stage computes (threads change only float summation
#: order and speed) and so do not invalidate finished stages.
_NOT_IN_KEY = ("threads", "command", "stages")


def _key(params: Mapping[str, Any], upstream: Sequence[str]) -> str:
    blob = json.dumps({"params": params, "upstream": list(upstream)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class RunFolder:
    root: Path
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifests = {}

    def manifest_path(self, stage: str) -> Path:
        return self.root / stage / "manifest.json"

    def load_manifest(self, stage: str) -> dict[str, Any] | None:
        p = self.manifest_path(stage)
        if not p.is_file():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # a damaged manifest: the stage runs again

    def run(
        self,
        stages: Sequence[Stage],
        config: dict[str, Any],
        from_stage: str | None = None,
        progress: bool = True,
    ) -> dict[str, dict[str, Any]]:
        """Runs the stages in order (see the module doc); returns every stage's manifest."""
        names = [s.name for s in stages]
        if from_stage is not None and from_stage not in names:
            raise ValueError(f"--from {from_stage!r}: not a stage of this run ({', '.join(names)})")
        self.root.mkdir(parents=True, exist_ok=True)
        redo = False
        keys: dict[str, str] = {}
        for i, stage in enumerate(stages, 1):
            missing = [n for n in stage.needs if n not in keys]
            if missing:
                raise ValueError(f"stage {stage.name!r} needs {missing} before it")
            params = dict(config.get(stage.name, {}))
            run = {k: v for k, v in config.get("run", {}).items() if k not in _NOT_IN_KEY}
            key = _key({"stage": params, "run": run, "data": config.get("data", {})},
                       [keys[n] for n in names[: i - 1]])  # fmt: skip
            keys[stage.name] = key
            redo = redo or stage.name == from_stage
            old = self.load_manifest(stage.name)
            head = f"[{i}/{len(stages)}] {stage.name}"
            if not redo and old is not None and old.get("key") == key:
                print(f"{head}: done earlier ({old.get('seconds', 0):.1f} s), skipped", flush=True)
                self.manifests[stage.name] = old
                continue
            stage_dir = self.root / stage.name
            if redo and stage_dir.exists():
                shutil.rmtree(stage_dir)
            elif old is not None:  # parameters changed: start the stage afresh
                shutil.rmtree(stage_dir, ignore_errors=True)
            stage_dir.mkdir(parents=True, exist_ok=True)
            print(f"{head}: {stage.help or stage.name}", flush=True)
            ctx = StageContext(
                stage.name, stage_dir, params, config,
                {n: self.manifests[n] for n in names[: i - 1] if n in self.manifests}, progress,
            )  # fmt: skip
            start = time.perf_counter()
            result = stage.fn(ctx)
            seconds = time.perf_counter() - start
            manifest = {
                "stage": stage.name, "key": key, "seconds": seconds,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "outputs": result.get("outputs", {}), "metrics": result.get("metrics", {}),
            }  # fmt: skip
            with atomic_path(self.manifest_path(stage.name)) as tmp:
                tmp.write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
            self.manifests[stage.name] = manifest
            print(f"{head}: finished in {seconds:.1f} s", flush=True)
            sys.stdout.flush()
        return self.manifests
