"""Pipeline configurations: the demo's three sizes and user TOML files on top of them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import tomllib

from slimforge.data import DEFAULT_VAL_WORKS

__all__ = ["MODELS", "MODES", "demo_config", "load_config", "merge_config"]

MODES = ("quick", "default", "full")

#: The demo's tracks: ``gpt`` (the whole pipeline from the bundled corpus to an INT4 student),
#: ``smollm2`` (the compression half on the real SmolLM2-135M) and ``mobilenet_v2`` (the vision
#: path on torchvision's MobileNetV2 weights). Each names the module holding its ``STAGES`` and
#: ``track_config(mode)``.
MODELS = {
    "gpt": "slimforge.pipeline.stages",
    "smollm2": "slimforge.pipeline.smollm2",
    "mobilenet_v2": "slimforge.pipeline.vision",
}

_BASE: dict[str, Any] = {
    "run": {"threads": 0, "seed": 0, "model": "gpt"},
    "data": {
        "inputs": None,
        "field": "text",
        "val_works": list(DEFAULT_VAL_WORKS),
        "val_fraction": 0.02,
    },
    "dedup": {"threshold": 0.8},
    "teacher": {
        "layers": 4,
        "hidden": 128,
        "heads": 4,
        "experts": 4,
        "top_k": 2,
        "seq_len": 256,
        "batch": 8,
        "steps": 400,
        "lr": 2e-2,
        "optimizer": "lamb",
        "precision": "fp32",
        "checkpointing": False,
        "save_every": 50,
    },
    "synth": {
        "prompts": 48,
        "prompt_chars": 48,
        "max_new_tokens": 192,
        "temperature": 0.8,
        "top_p": 0.95,
        "repetition_penalty": 1.1,
        "batch": 16,
        "min_chars": 64,
    },
    "distill": {
        "layers": 2,
        "hidden": 128,
        "heads": 4,
        "steps": 300,
        "batch": 8,
        "lr": 3e-3,
        "temperature": 1.0,
        "alpha": 0.5,
        "synth_repeat": 1,
        "save_every": 50,
    },
    "prune": {
        "mlp_neurons": 0.3,
        "wanda": 0.5,
        "recovery_steps": 60,
        "lr": 1e-3,
        "calibration_batches": 8,
    },
    "quantize": {"group_size": 32, "calibration_batches": 8},
    "evaluate": {"windows": 64, "gen_tokens": 128, "prompt_tokens": 32, "gen_threads": 1},
}

_OVERRIDES: dict[str, dict[str, Any]] = {
    "quick": {
        "teacher": {
            "layers": 2,
            "hidden": 64,
            "heads": 2,
            "experts": 4,
            "seq_len": 64,
            "batch": 8,
            "steps": 30,
            "save_every": 10,
        },
        "synth": {
            "prompts": 8,
            "prompt_chars": 16,
            "max_new_tokens": 48,
            "batch": 8,
            "min_chars": 16,
        },
        "distill": {
            "layers": 1,
            "hidden": 64,
            "heads": 2,
            "steps": 30,
            "batch": 8,
            "save_every": 10,
        },
        "prune": {"recovery_steps": 5, "calibration_batches": 2},
        "quantize": {"calibration_batches": 2},
        "evaluate": {"windows": 16, "gen_tokens": 32, "prompt_tokens": 16},
    },
    "default": {},
    "full": {
        "teacher": {
            "layers": 6,
            "hidden": 192,
            "heads": 6,
            "experts": 8,
            "seq_len": 256,
            "batch": 16,
            "steps": 1500,
            "save_every": 100,
        },
        "synth": {"prompts": 256, "max_new_tokens": 256},
        "distill": {
            "layers": 3,
            "hidden": 160,
            "heads": 5,
            "batch": 16,
            "steps": 1500,
            "save_every": 100,
        },
        "prune": {"recovery_steps": 300},
        "evaluate": {"windows": 256},
    },
}


def merge_config(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with the tables of ``over`` merged into it, key by key (deep copies)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_config(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def demo_config(mode: str = "default", model: str = "gpt") -> dict[str, Any]:
    """The demo's configuration: ``quick`` (a smoke run, under 90 s on 2 cores), ``default``
    (under 10 minutes) or ``full`` (longer, better models), for the track ``model`` (see
    :data:`MODELS`)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {tuple(MODELS)}, got {model!r}")
    if model == "gpt":
        return merge_config(_BASE, _OVERRIDES[mode])
    import importlib

    cfg: dict[str, Any] = importlib.import_module(MODELS[model]).track_config(mode)
    cfg.setdefault("run", {}).setdefault("model", model)
    cfg["run"]["model"] = model
    return cfg


def load_config(path: str | Path) -> dict[str, Any]:
    """A TOML pipeline file: ``[run] base = "default"`` picks the demo size it starts from
    (``model = "smollm2"`` or ``"mobilenet_v2"`` another track of the demo)
    (``stages = [...]`` a subset, ``threads``, ``seed``), and each ``[stage]`` table overrides
    that stage's parameters; ``[data] inputs = ["docs.jsonl"]`` points at the user's documents.
    Unknown sections or keys are errors (a typo must not be silently ignored)."""
    p = Path(path)
    try:
        user = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{p}: not valid TOML ({e})") from e
    run = user.get("run", {})
    base = demo_config(str(run.get("base", "default")), str(run.get("model", "gpt")))
    for section, values in user.items():
        if section not in base:
            raise ValueError(f"{p}: unknown section [{section}] (known: {', '.join(base)})")
        if not isinstance(values, dict):
            raise ValueError(f"{p}: [{section}] must be a table")
        allowed = set(base[section]) | (
            {"base", "stages", "command"} if section == "run" else set()
        )
        bad = sorted(set(values) - allowed)
        if bad:
            raise ValueError(f"{p}: unknown keys {bad} in [{section}] (known: {sorted(allowed)})")
    cfg = merge_config(base, user)
    inputs = cfg["data"].get("inputs")
    if inputs:
        resolved = [(p.parent / x) if not Path(x).is_absolute() else Path(x) for x in inputs]
        missing = [str(x) for x in resolved if not x.is_file()]
        if missing:
            raise ValueError(f"{p}: input files not found: {missing}")
        cfg["data"]["inputs"] = [str(x) for x in resolved]
    return cfg
