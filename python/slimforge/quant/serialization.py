"""Save and load quantized models as safetensors + a JSON config (no pickle).

A checkpoint is a directory with ``model.safetensors`` (the whole ``state_dict``, quantized
buffers in the documented layout) and ``quant_config.json`` (which submodules are quantized,
with their constructor arguments). Each file is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from slimforge.io import atomic_path
from slimforge.nn.surgery import set_submodule
from slimforge.quant.linear import QuantEmbedding, QuantLinear
from slimforge.quant.transformed import InputTransformedLinear

__all__ = ["load_quantized", "module_from_spec", "register_quantized_module", "save_quantized"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "quant_config.json"
FORMAT = "slimforge-quant"
VERSION = 1


class _Spec(Protocol):
    def quant_spec(self) -> dict[str, Any]: ...


_MODULE_TYPES: dict[str, type[nn.Module]] = {}


def register_quantized_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Makes a quantized module class saveable: it needs ``quant_spec() -> dict`` and a
    classmethod ``from_spec(spec) -> module`` that builds an empty module of that shape."""
    if not (hasattr(cls, "quant_spec") and hasattr(cls, "from_spec")):
        raise TypeError(f"{cls.__name__} needs quant_spec() and from_spec(spec)")
    _MODULE_TYPES[cls.__name__] = cls
    return cls


register_quantized_module(QuantLinear)
register_quantized_module(QuantEmbedding)
register_quantized_module(InputTransformedLinear)


def module_from_spec(spec: dict[str, Any]) -> nn.Module:
    """An empty quantized module of the registered type and shape that ``spec`` records."""
    cls = _MODULE_TYPES.get(spec.get("type", ""))
    if cls is None:
        raise ValueError(f"unknown quantized module type {spec.get('type')!r}")
    return cls.from_spec(spec)  # type: ignore[attr-defined]


def save_quantized(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Writes ``model`` (with quantized submodules) to the directory ``path``."""
    from safetensors.torch import save_model

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    modules = {}
    for fqn, m in model.named_modules():
        name = type(m).__name__
        if _MODULE_TYPES.get(name) is type(m):
            modules[fqn] = {"type": name, **m.quant_spec()}  # type: ignore[operator]
    config = {"format": FORMAT, "version": VERSION, "modules": modules}
    with atomic_path(d / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt"})
    with atomic_path(d / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def load_quantized(
    model_or_factory: nn.Module | Callable[[], nn.Module], path: str | os.PathLike[str]
) -> nn.Module:
    """Loads a checkpoint written by :func:`save_quantized`.

    ``model_or_factory`` is the float model (or a callable building it); the recorded
    submodules are replaced by empty quantized modules and all tensors are loaded strictly.
    Returns the model (the same object when a model was given).
    """
    from safetensors.torch import load_model

    d = Path(path)
    cfg_path, weights_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found (expected a directory written by save_quantized)"
            )
    with open(cfg_path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a {FORMAT} config")
    if config.get("version") != VERSION:
        raise ValueError(
            f"{cfg_path}: unsupported version {config.get('version')!r}, expected {VERSION}"
        )
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory must return an nn.Module, got {type(model).__name__}")
    for fqn, spec in config["modules"].items():
        cls = _MODULE_TYPES.get(spec.get("type"))
        if cls is None:
            raise ValueError(f"{cfg_path}: unknown module type {spec.get('type')!r} at {fqn!r}")
        new = cls.from_spec(spec)  # type: ignore[attr-defined]
        if fqn == "":
            model = new
            continue
        try:
            set_submodule(model, fqn, new)
        except AttributeError as e:
            raise ValueError(f"the checkpoint quantizes {fqn!r}, which the model lacks") from e
    load_model(model, str(weights_path), strict=True)
    return model
