"""peft's adapter format, both ways: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are peft's: ``base_model.model.<module>.lora_A.weight`` ``(r, in)``,
``...lora_B.weight`` ``(out, r)`` and, for DoRA, ``...lora_magnitude_vector`` ``(out,)``, where
``<module>`` is the module's name in the Hugging Face model. slimforge's `LlamaForCausalLM`
keeps the blocks at the root (``layers.3.self_attn.q_proj``) where transformers' has them under
``model.`` (``model.layers.3.self_attn.q_proj``): `peft_module_name` and `module_name_from_peft`
map the names; other models keep their names.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimforge.lora.config import LoraConfig
from slimforge.lora.layer import BASE_TYPES, LoraLinear
from slimforge.lora.model import _adapter_names, lora_layers, set_adapter
from slimforge.nn import replace_modules

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "MAX_CONFIG_BYTES",
    "hf_state_dict",
    "load_adapter",
    "module_name_from_peft",
    "peft_module_name",
    "save_adapter",
]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Largest adapter_config.json read (a rank_pattern over thousands of modules fits).
MAX_CONFIG_BYTES = 16 << 20
PREFIX = "base_model.model."
_SUFFIXES = {
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_magnitude_vector": "m",
    ".lora_magnitude_vector.weight": "m",
}
# peft's init_lora_weights <-> LoraConfig.init (True is peft's default: A like nn.Linear).
_INIT_TO_PEFT: dict[str, Any] = {"gaussian": "gaussian", "kaiming": True, "pissa": "pissa"}
# Config fields whose non-default values change what the adapter computes: refused on load.
_UNSUPPORTED = {
    "bias": ("none",),
    "fan_in_fan_out": (False,),
    "lora_bias": (False,),
    "use_qalora": (False,),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "target_parameters": (None, []),
    "trainable_token_indices": (None, {}),
    "alora_invocation_tokens": (None,),
    "arrow_config": (None,),
    "use_bdlora": (None, False),
    "velora_config": (None,),
    "monteclora_config": (None,),
    "kasa_config": (None,),
}


def _hf_prefixed(model: nn.Module) -> bool:
    """Whether the model is slimforge's Llama, whose Hugging Face twin nests blocks in model."""
    from slimforge.models.llama import LlamaForCausalLM

    return isinstance(model, LlamaForCausalLM)


def peft_module_name(model: nn.Module, name: str) -> str:
    """The Hugging Face name of ``model``'s module ``name`` (``layers.0.mlp.up_proj`` ->
    ``model.layers.0.mlp.up_proj`` for slimforge's Llama; unchanged for other models)."""
    if _hf_prefixed(model) and name != "lm_head" and not name.startswith("lm_head."):
        return "model." + name
    return name


def module_name_from_peft(model: nn.Module, hf_name: str) -> str:
    """The inverse of `peft_module_name`."""
    if _hf_prefixed(model) and hf_name.startswith("model."):
        return hf_name[len("model.") :]
    return hf_name


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict under Hugging Face names (the tied head added as
    ``lm_head.weight`` for slimforge's Llama), to build the transformers twin of a model:
    ``transformers.LlamaForCausalLM(cfg).load_state_dict(hf_state_dict(model))``."""
    out = {peft_module_name(model, k): v for k, v in model.state_dict().items()}
    if _hf_prefixed(model) and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def _layers_with(model: nn.Module, adapter_name: str) -> list[tuple[str, LoraLinear]]:
    layers = [(n, m) for n, m in lora_layers(model) if adapter_name in m.adapters]
    if not layers:
        raise ValueError(
            f"no adapter named {adapter_name!r} in the model; adapters: {_adapter_names(model)}"
        )
    return layers


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    """Bare module names when they select exactly these modules (peft's usual form), else a
    regex that fully matches exactly their Hugging Face names."""
    words = sorted({n.rsplit(".", 1)[-1] for n in names})
    same = sorted(
        n
        for n, m in model.named_modules()
        if n.rsplit(".", 1)[-1] in words and isinstance(m, (*BASE_TYPES, LoraLinear))
        and ".base_layer" not in n
    )  # fmt: skip
    if same == sorted(names):
        return words
    return "(" + "|".join(re.escape(peft_module_name(model, n)) for n in names) + ")"


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes adapter ``adapter_name`` to directory ``path`` in peft's format (each file
    atomically), loadable by ``peft.PeftModel.from_pretrained`` on the Hugging Face twin of
    the model, or by `load_adapter`. Per-module ranks or alphas that differ from the first
    module's go to ``rank_pattern`` / ``alpha_pattern``. Returns the directory."""
    from safetensors.torch import save_file

    from slimforge.io import atomic_path

    layers = _layers_with(model, adapter_name)
    first = layers[0][1]
    cfg = first.configs[adapter_name]
    r0, alpha0 = first.lora_A[adapter_name].shape[0], first.configs[adapter_name].alpha
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for name, layer in layers:
        c = layer.configs[adapter_name]
        if (c.use_dora, c.rslora, c.dropout, c.init) != (
            cfg.use_dora,
            cfg.rslora,
            cfg.dropout,
            cfg.init,
        ):
            raise ValueError(
                f"{name}: adapter {adapter_name!r} differs from {layers[0][0]}'s in use_dora, "
                "rslora, dropout or init, which peft's format holds once per adapter"
            )
        key = PREFIX + peft_module_name(model, name)
        a = layer.lora_A[adapter_name].detach()
        tensors[key + ".lora_A.weight"] = a.contiguous().cpu()
        tensors[key + ".lora_B.weight"] = layer.lora_B[adapter_name].detach().contiguous().cpu()
        if adapter_name in layer.lora_magnitude:
            m = layer.lora_magnitude[adapter_name].detach()
            tensors[key + ".lora_magnitude_vector"] = m.contiguous().cpu()
        hf = peft_module_name(model, name)
        if a.shape[0] != r0:
            rank_pattern[hf] = int(a.shape[0])
        if c.alpha != alpha0:
            alpha_pattern[hf] = c.alpha
    alpha: float | int = int(alpha0) if float(alpha0).is_integer() else alpha0
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": int(r0),
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": _target_modules(model, [n for n, _ in layers]),
        "exclude_modules": None,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.use_dora,
        "init_lora_weights": _INIT_TO_PEFT[cfg.init],
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "inference_mode": True,
    }
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    with atomic_path(d / ADAPTER_CONFIG) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return d


def _read_config(path: Path) -> dict[str, Any]:
    where = path / ADAPTER_CONFIG
    size = where.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{where}: {size} bytes, more than MAX_CONFIG_BYTES ({MAX_CONFIG_BYTES})")
    try:
        data = json.loads(where.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: not valid UTF-8 JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{where}: peft_type {data.get('peft_type')!r} is not 'LORA'")
    for key, allowed in _UNSUPPORTED.items():
        if key in data and data[key] not in allowed:
            raise ValueError(f"{where}: {key}={data[key]!r} is not supported (only {allowed[0]!r})")
    return data


def _number(where: Path, key: str, v: Any, integer: bool = False) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok or (integer and not float(v).is_integer()):
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{where}: {key} must be {kind}, got {v!r}")
    return float(v)


def _pattern_value(patterns: dict[str, Any], hf_name: str) -> Any:
    """peft's rule: the first pattern key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", hf_name):
            return value
    return None


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    trainable: bool = False,
) -> LoraConfig:
    """Loads a peft LoRA adapter directory into ``model`` as adapter ``adapter_name`` and makes
    it the active one; returns its `LoraConfig` (rank and alpha of the first module).

    Every module named in the file is wrapped (or gets the adapter beside its others); ranks are
    read from the tensors, alphas from ``lora_alpha`` / ``alpha_pattern``. PiSSA adapters
    (``init_lora_weights="pissa"``) recompute the residual base from the base weight, as peft
    does, so they load onto the float base they were made from. The files are untrusted: a
    malformed one raises ``ValueError`` naming it before the model changes. ``trainable``:
    whether the loaded parameters require grad.
    """
    from safetensors import SafetensorError, safe_open

    d = Path(path)
    data = _read_config(d)
    where = d / ADAPTER_CONFIG
    r_default = int(_number(where, "r", data.get("r", 8), integer=True))
    alpha_default = _number(where, "lora_alpha", data.get("lora_alpha", 8))
    dropout = data.get("lora_dropout", 0.0)
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"{where}: lora_dropout must be in [0, 1), got {dropout!r}")
    flags = {}
    for key in ("use_rslora", "use_dora"):
        v = data.get(key, False)
        if not isinstance(v, bool):
            raise ValueError(f"{where}: {key} must be true or false, got {v!r}")
        flags[key] = v
    init_value = data.get("init_lora_weights", True)
    if init_value in (True, False, "gaussian"):
        init = "kaiming" if init_value is True else "gaussian"
    elif init_value == "pissa":
        init = "pissa"
    else:
        raise ValueError(
            f"{where}: init_lora_weights={init_value!r} is not supported (true, false, "
            "'gaussian' or 'pissa')"
        )
    patterns = {}
    for key in ("rank_pattern", "alpha_pattern"):
        v = data.get(key) or {}
        if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
            raise ValueError(f"{where}: {key} must map module patterns to numbers")
        for k, x in v.items():
            _number(where, f"{key}[{k!r}]", x, integer=key == "rank_pattern")
            try:
                re.compile(k)
            except re.error as e:
                raise ValueError(f"{where}: {key} key {k!r} is not a regex: {e}") from None
        patterns[key] = v
    if adapter_name in _adapter_names(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")

    weights = d / ADAPTER_WEIGHTS
    modules: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if not key.startswith(PREFIX):
                    raise ValueError(f"{weights}: tensor {key!r} does not start with {PREFIX!r}")
                suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
                if suffix is None:
                    raise ValueError(f"{weights}: tensor {key!r} is not a LoRA A, B or magnitude")
                hf, part = key[len(PREFIX) : -len(suffix)], _SUFFIXES[suffix]
                entry = modules.setdefault(hf, {})
                if part in entry:
                    raise ValueError(f"{weights}: two {part} tensors for module {hf!r}")
                entry[part] = f.get_tensor(key)
    except SafetensorError as e:
        raise ValueError(f"{weights}: not a valid safetensors file: {e}") from None
    if not modules:
        raise ValueError(f"{weights}: holds no LoRA tensors")

    plan: list[tuple[str, LoraConfig, dict[str, torch.Tensor]]] = []
    for hf, parts in modules.items():
        name = module_name_from_peft(model, hf)
        here = f"{weights}: module {hf!r}"
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{here} is not in the model (as {name!r})") from None
        if not isinstance(target, (*BASE_TYPES, LoraLinear)):
            raise ValueError(f"{here} is a {type(target).__name__}, not a linear layer")
        base = target.original_base if isinstance(target, LoraLinear) else target
        inner = getattr(base, "inner", base)
        in_f, out_f = int(inner.in_features), int(inner.out_features)  # type: ignore[arg-type]
        want = {"A", "B", "m"} if flags["use_dora"] else {"A", "B"}
        if set(parts) != want:
            raise ValueError(f"{here}: holds {sorted(parts)}, expected {sorted(want)}")
        a, b = parts["A"], parts["B"]
        for label, t in parts.items():
            if not t.is_floating_point():
                raise ValueError(f"{here}: {label} must be floating point, got {t.dtype}")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{here}: {label} holds NaN or Inf")
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or a.shape[1] != in_f or r < 1:
            raise ValueError(f"{here}: lora_A must be (r, {in_f}), got {list(a.shape)}")
        if tuple(b.shape) != (out_f, r):
            raise ValueError(f"{here}: lora_B must be ({out_f}, {r}), got {list(b.shape)}")
        if "m" in parts and tuple(parts["m"].shape) != (out_f,):
            raise ValueError(
                f"{here}: the magnitude must be ({out_f},), got {list(parts['m'].shape)}"
            )
        r_cfg = _pattern_value(patterns["rank_pattern"], hf) or r_default
        if int(r_cfg) != r:
            raise ValueError(f"{here}: rank {r} in the tensors, {int(r_cfg)} in the config")
        alpha = _pattern_value(patterns["alpha_pattern"], hf) or alpha_default
        if init == "pissa" and not isinstance(base, nn.Linear):
            raise ValueError(f"{here}: a PiSSA adapter needs the float base it was made from")
        cfg = LoraConfig(
            r=r, alpha=float(alpha), dropout=float(dropout), target_modules=(name,),
            rslora=flags["use_rslora"], use_dora=flags["use_dora"], init=init,
        )  # fmt: skip
        plan.append((name, cfg, parts))

    existing = {n for n, _ in lora_layers(model)}
    fresh = {name: cfg for name, cfg, _ in plan if name not in existing}
    for name, cfg, _ in plan:
        if name in existing:
            model.get_submodule(name).add_adapter(adapter_name, cfg)  # type: ignore[operator]
    if fresh:
        model = replace_modules(
            model,
            lambda m, n: _empty_layer(m, adapter_name, fresh[n]),
            lambda m, n: isinstance(m, BASE_TYPES),
            names=list(fresh),
        )
    with torch.no_grad():
        for name, _, parts in plan:
            layer = model.get_submodule(name)
            assert isinstance(layer, LoraLinear)
            layer.lora_A[adapter_name].copy_(parts["A"])
            layer.lora_B[adapter_name].copy_(parts["B"])
            if "m" in parts:
                layer.lora_magnitude[adapter_name].copy_(parts["m"])
    set_adapter(model, adapter_name)
    if not trainable:
        for _, layer in lora_layers(model):
            for dct in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
                if adapter_name in dct:
                    dct[adapter_name].requires_grad_(False)
    first = plan[0][1]
    return LoraConfig(
        r=r_default, alpha=alpha_default, dropout=float(dropout),
        target_modules=tuple(sorted({n.rsplit(".", 1)[-1] for n, _, _ in plan})),
        rslora=flags["use_rslora"], use_dora=flags["use_dora"], init=first.init,
    )  # fmt: skip


def _empty_layer(base: nn.Module, adapter_name: str, cfg: LoraConfig) -> LoraLinear:
    layer = LoraLinear(base)
    layer.add_adapter(adapter_name, cfg)
    return layer
