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

import torch
from torch import nn

from slimforge.io import atomic_path
from slimforge.nn.surgery import set_submodule
from slimforge.quant.linear import QuantEmbedding, QuantLinear
from slimforge.quant.primitives import SUPPORTED_BITS, resolve_group_size
from slimforge.quant.transformed import InputTransformedLinear

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_FEATURES",
    "load_quantized",
    "module_from_spec",
    "register_quantized_module",
    "save_quantized",
]

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


#: Largest ``quant_config.json`` read, in bytes (a config holds ~150 bytes per module).
MAX_CONFIG_BYTES = 64 << 20
#: Largest feature count / table size a config may declare (the stored tensors must match).
MAX_FEATURES = (1 << 31) - 1
# Nesting of module specs (InputTransformedLinear wraps one inner module).
_MAX_SPEC_DEPTH = 2

# safetensors dtype names of the torch dtypes quantized modules hold.
_ST_DTYPES = {
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.bool: "BOOL",
}


def _field(spec: dict[str, Any], key: str, where: str) -> Any:
    if key not in spec:
        raise ValueError(f"{where}: missing field {key!r}")
    return spec[key]


def _int_field(spec: dict[str, Any], key: str, where: str, lo: int, hi: int) -> int:
    v = _field(spec, key, where)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{where}: {key} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise ValueError(f"{where}: {key} = {v} is outside [{lo}, {hi}]")
    return v


def _bool_field(spec: dict[str, Any], key: str, where: str) -> bool:
    v = _field(spec, key, where)
    if not isinstance(v, bool):
        raise ValueError(f"{where}: {key} must be true or false, got {v!r}")
    return v


def _bits_and_group(spec: dict[str, Any], where: str, in_features: int) -> None:
    bits = _field(spec, "bits", where)
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{where}: bits must be 4 or 8, got {bits!r}")
    g = _field(spec, "group_size", where)
    if isinstance(g, bool) or not isinstance(g, int):
        raise ValueError(f"{where}: group_size must be an integer, got {g!r}")
    try:
        resolve_group_size(g, in_features)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if bits == 4 and in_features % 2:
        raise ValueError(f"{where}: INT4 needs an even input size, got {in_features}")


def _check_spec(spec: Any, where: str, depth: int = 0) -> None:
    """Types and ranges of one module's constructor arguments (the built-in types; a type
    registered elsewhere is checked by building it on the meta device)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: the module spec must be an object, got {type(spec).__name__}")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in _MODULE_TYPES:
        raise ValueError(f"{where}: unknown module type {kind!r}")
    if kind == "QuantLinear":
        n_in = _int_field(spec, "in_features", where, 1, MAX_FEATURES)
        _int_field(spec, "out_features", where, 1, MAX_FEATURES)
        _bits_and_group(spec, where, n_in)
        _bool_field(spec, "bias", where)
    elif kind == "QuantEmbedding":
        n = _int_field(spec, "num_embeddings", where, 1, MAX_FEATURES)
        dim = _int_field(spec, "embedding_dim", where, 1, MAX_FEATURES)
        _bits_and_group(spec, where, dim)
        if spec.get("padding_idx") is not None:
            _int_field(spec, "padding_idx", where, -n, n - 1)
    elif kind == "InputTransformedLinear":
        n_in = _int_field(spec, "in_features", where, 1, MAX_FEATURES)
        _bool_field(spec, "perm", where)
        _bool_field(spec, "pre_scale", where)
        inner = _field(spec, "inner", where)
        if depth + 1 >= _MAX_SPEC_DEPTH:
            raise ValueError(f"{where}: module specs nested too deeply")
        _check_spec(inner, f"{where} (inner)", depth + 1)
        if isinstance(inner, dict) and inner.get("in_features", n_in) != n_in:
            raise ValueError(
                f"{where}: in_features = {n_in} but the inner module takes "
                f"{inner.get('in_features')!r}"
            )


def _read_config(cfg_path: Path) -> dict[str, Any]:
    size = cfg_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{cfg_path}: {size} bytes exceeds MAX_CONFIG_BYTES = {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{cfg_path}: JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, too-long int literals
        raise ValueError(f"{cfg_path}: not valid UTF-8 JSON: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{cfg_path} is not a {FORMAT} config")
    version = config.get("version")
    if isinstance(version, bool) or version != VERSION:
        raise ValueError(f"{cfg_path}: unsupported version {version!r}, expected {VERSION}")
    modules = config.get("modules")
    if not isinstance(modules, dict):
        raise ValueError(f"{cfg_path}: 'modules' must be an object of module specs")
    for fqn, spec in modules.items():
        _check_spec(spec, f"{cfg_path}: module {fqn!r}")
    return modules


def _stored_tensors(weights_path: Path) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict]:
    """``{name: (dtype, shape)}`` from the safetensors header (no tensor data are read) and the
    header's metadata; the safetensors library checks the header against the file size."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights_path), framework="pt") as f:
            meta = f.metadata() or {}
            stored = {}
            for k in f.keys():
                sl = f.get_slice(k)
                stored[k] = (str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
    except SafetensorError as e:
        raise ValueError(f"{weights_path}: not a valid safetensors file: {e}") from None
    return stored, meta


def _check_declared_shapes(
    fqn: str,
    spec: dict[str, Any],
    stored: dict[str, tuple[str, tuple[int, ...]]],
    aliases: dict[str, str],
    where: str,
    weights_path: Path,
) -> None:
    """Builds the module on the meta device (no memory) and compares every tensor it would hold
    with the stored one's dtype and shape."""
    cls = _MODULE_TYPES[spec["type"]]
    try:
        with torch.device("meta"):
            skeleton = cls.from_spec(spec)  # type: ignore[attr-defined]
    except (TypeError, ValueError, KeyError, RuntimeError, OverflowError) as e:
        raise ValueError(f"{where}: invalid spec: {e}") from None
    prefix = f"{fqn}." if fqn else ""
    for key, t in skeleton.state_dict().items():
        name = prefix + key
        got = stored.get(name) or stored.get(aliases.get(name, ""))
        if got is None:
            raise ValueError(f"{weights_path}: tensor {name!r} of module {fqn!r} is missing")
        want = (_ST_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape))
        if got != want:
            raise ValueError(
                f"{weights_path}: tensor {name!r} is {got[0]} {list(got[1])}, but the config "
                f"declares module {fqn!r} as {spec['type']}, which holds {want[0]} {list(want[1])}"
            )


def load_quantized(
    model_or_factory: nn.Module | Callable[[], nn.Module], path: str | os.PathLike[str]
) -> nn.Module:
    """Loads a checkpoint written by :func:`save_quantized`.

    ``model_or_factory`` is the float model (or a callable building it); the recorded
    submodules are replaced by empty quantized modules and all tensors are loaded strictly.
    Returns the model (the same object when a model was given).

    The checkpoint may be untrusted: a malformed one raises ``ValueError`` naming the file and
    the module. The config's types and ranges are checked (``bits`` 4 or 8, group sizes, sizes
    up to ``MAX_FEATURES``, a config of at most ``MAX_CONFIG_BYTES``), every quantized module's
    declared tensors are compared (dtype and shape) with the safetensors header before any
    module is built, and after loading every module checks its buffers (``check_buffers``:
    finite positive scales, integer zero points in ``[0, 2**bits - 1]``, a true permutation,
    ...). Memory: the float model, the tensors of the file, and nothing the config alone
    declares.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    d = Path(path)
    cfg_path, weights_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found (expected a directory written by save_quantized)"
            )
    modules = _read_config(cfg_path)
    stored, meta = _stored_tensors(weights_path)
    # save_model stores one copy of tensors that share memory; the metadata maps the others.
    aliases = {k: v for k, v in meta.items() if isinstance(v, str) and v in stored}
    for fqn, spec in modules.items():
        where = f"{cfg_path}: module {fqn!r}"
        _check_declared_shapes(fqn, spec, stored, aliases, where, weights_path)
    model = model_or_factory if isinstance(model_or_factory, nn.Module) else model_or_factory()
    if not isinstance(model, nn.Module):
        raise TypeError(f"the factory must return an nn.Module, got {type(model).__name__}")
    for fqn, spec in modules.items():
        new = _MODULE_TYPES[spec["type"]].from_spec(spec)  # type: ignore[attr-defined]
        if fqn == "":
            model = new
            continue
        try:
            set_submodule(model, fqn, new)
        except (AttributeError, TypeError) as e:  # no such path, or not a submodule there
            raise ValueError(
                f"{cfg_path}: the checkpoint quantizes {fqn!r}, which the model lacks"
            ) from e
    try:
        load_model(model, str(weights_path), strict=True)
    except SafetensorError as e:
        raise ValueError(f"{weights_path}: not a valid safetensors file: {e}") from None
    except RuntimeError as e:  # missing / unexpected keys, shape mismatches of float tensors
        raise ValueError(f"{weights_path} does not match the model: {e}") from None
    for fqn in modules:
        m = model.get_submodule(fqn) if fqn else model
        check = getattr(m, "check_buffers", None)
        if callable(check):
            check(f"{weights_path}: module {fqn!r}")
    return model
