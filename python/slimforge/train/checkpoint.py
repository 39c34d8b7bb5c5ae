"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a directory ``OUT/checkpoints/step-000123/`` holding

- ``model.safetensors``: the model's ``state_dict`` (shared tensors stored once);
- ``optimizer.safetensors``: every tensor of the optimizer state, keyed
  ``state.<param index>.<name>``; and the RNG states and data position as uint8 tensors;
- ``trainer.json``: the step, the config, the optimizer's parameter groups and non-tensor state,
  the gradient scaler's state and the run's history so far.

No pickle: tensors go to safetensors, the rest to JSON. A checkpoint is written into a
temporary directory and renamed into place, then ``OUT/checkpoints/latest`` (a one-line file)
is replaced atomically, so a run killed at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint"]

FORMAT = "slimforge-train-checkpoint"
VERSION = 1


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for idx, entries in state["state"].items():
        rest = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                rest[name] = value
        plain[str(idx)] = rest
    return tensors, {"state": plain, "param_groups": state["param_groups"]}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in meta["state"].items()}
    for key, t in tensors.items():
        if not key.startswith("state."):
            continue
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors(data_generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    if data_generator is not None:
        out["rng.data"] = data_generator.get_state()
    return out


def save_checkpoint(
    out_dir: str | os.PathLike[str],
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    data_generator: torch.Generator | None = None,
    keep: int = 2,
) -> Path:
    """Writes the checkpoint of ``step`` under ``out_dir/checkpoints`` atomically and keeps the
    newest ``keep`` of them. ``trainer_state``: JSON-ready values (config, history, scaler...).
    Returns the checkpoint directory."""
    from safetensors.torch import save_file, save_model

    from slimforge.io import atomic_path

    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
        save_file(
            {**opt_tensors, **_rng_tensors(data_generator)}, str(tmp / "optimizer.safetensors")
        )
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": step,
            "optimizer": opt_meta,
            "python_random": _python_random_state(),
            **trainer_state,
        }
        (tmp / "trainer.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with atomic_path(root / "latest") as t:
        t.write_text(final.name + "\n", encoding="utf-8")
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[: max(0, len(done) - keep)]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _python_random_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def latest_checkpoint(out_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``out_dir/checkpoints``, or None."""
    root = Path(out_dir) / "checkpoints"
    pointer = root / "latest"
    if pointer.is_file():
        cand = root / pointer.read_text(encoding="utf-8").strip()
        if (cand / "trainer.json").is_file():
            return cand
    done = sorted(p for p in root.glob("step-*") if (p / "trainer.json").is_file())
    return done[-1] if done else None


def load_checkpoint(
    path: str | os.PathLike[str],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """Restores the model, the optimizer, the RNG states and the data position saved in
    ``path``; returns the trainer's JSON state (``step``, history, ...)."""
    from safetensors.torch import load_file, load_model

    d = Path(path)
    try:
        meta = json.loads((d / "trainer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{d}: not a training checkpoint ({e})") from e
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{d}: not a {FORMAT} v{VERSION} checkpoint")
    load_model(model, str(d / "model.safetensors"), strict=True)
    tensors = load_file(str(d / "optimizer.safetensors"))
    optimizer.load_state_dict(_join_optimizer(tensors, meta["optimizer"]))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng.cuda."))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    if data_generator is not None:
        if "rng.data" not in tensors:
            raise ValueError(f"{d}: the checkpoint has no data position")
        data_generator.set_state(tensors["rng.data"])
    version, internal, gauss = meta["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return meta
