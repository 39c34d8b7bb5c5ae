"""Model-level LoRA verbs: inject adapters through the shared surgery walker, switch and
disable them, count what trains, merge (and re-quantize) them into the base."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from slimforge.lora.config import LoraConfig
from slimforge.lora.layer import (
    BASE_TYPES,
    LoraLinear,
    RequantError,
    _float_linear,
    base_weight,
    is_quantized_base,
    requantize_error,
)
from slimforge.nn import ModuleFilter, module_filter, replace_modules, select_modules, set_submodule
from slimforge.quant.linear import QuantEmbedding, QuantLinear

__all__ = [
    "apply_lora",
    "delete_adapter",
    "disable_adapters",
    "lora_layers",
    "merge_and_unload",
    "merge_lora",
    "parameter_counts",
    "set_adapter",
    "trainable_parameters",
    "unmerge_lora",
]

REQUANTIZE_MODEL = ("rtn", "gptq", None)


def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    """``(name, layer)`` of every `LoraLinear` in ``model``, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLinear)]


def _output_head(model: nn.Module) -> set[str]:
    from slimforge.models.spec import model_spec

    spec = model_spec(model)
    heads = {"lm_head"}
    if spec is not None and spec.lm_head:
        heads.add(spec.lm_head)
    return heads


def _target_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the base linears and existing `LoraLinear` layers ``config`` selects: the
    outermost ones (never a module inside another selected one or inside a LoraLinear)."""
    include = None if config.target_modules == "all-linear" else config.target_modules
    exclude = list(config.exclude_modules)
    if config.target_modules == "all-linear":
        exclude += sorted(_output_head(model))
    keep = module_filter((*BASE_TYPES, LoraLinear), include, exclude or None)
    wrapped = [n for n, _ in lora_layers(model)]
    chosen: list[str] = []
    for name, _ in select_modules(model, keep):
        if not any(name.startswith(p + ".") for p in (*chosen, *wrapped)):
            chosen.append(name)
    return chosen


def _adapter_names(model: nn.Module) -> list[str]:
    seen: dict[str, None] = {}
    for _, layer in lora_layers(model):
        for a in layer.adapters:
            seen[a] = None
    return list(seen)


def apply_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> nn.Module:
    """Adds adapter ``adapter_name`` to every linear ``config.target_modules`` selects and makes
    it the active, trainable one; every other parameter of the model is frozen.

    Plain ``nn.Linear``, ``QuantLinear`` (QLoRA) and ``InputTransformedLinear`` modules are
    wrapped in a `LoraLinear` (in place, through ``slimforge.nn.replace_modules``); layers that
    are already `LoraLinear` get the new adapter beside their others. Returns ``model``.
    ``ValueError`` when nothing matches or the name is taken.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(f"adapter names are non-empty strings without dots, got {adapter_name!r}")
    if adapter_name in _adapter_names(model):
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise ValueError("the model has merged adapters: unmerge_lora(model) first")
    names = _target_names(model, config)
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, BASE_TYPES)]
        raise ValueError(
            f"no linear module matches target_modules={config.target_modules!r} "
            f"(exclude {list(config.exclude_modules)}); linears are named like {linears[:4]}"
        )
    # Check every target before changing anything (PiSSA on a quantized base, ranks).
    for name in names:
        m = model.get_submodule(name)
        base = m.original_base if isinstance(m, LoraLinear) else m
        if config.init == "pissa" and not isinstance(base, nn.Linear):
            raise ValueError(
                f"{name}: PiSSA needs a float base (it rewrites the base weight): apply it to "
                "the float model, then quantize the base layers with quantize_ (QPiSSA)"
            )
    existing = {n for n, _ in lora_layers(model)}
    for name in names:
        if name in existing:
            model.get_submodule(name).add_adapter(adapter_name, config)  # type: ignore[operator]
    fresh = [n for n in names if n not in existing]
    if fresh:
        model = replace_modules(
            model,
            lambda m, n: LoraLinear(m, adapter_name, config),
            lambda m, n: isinstance(m, BASE_TYPES),
            names=fresh,
        )
    set_adapter(model, adapter_name)
    return model


def set_adapter(model: nn.Module, names: str | Sequence[str]) -> None:
    """Activates adapter(s) ``names`` in every layer that has them: their parameters train,
    every other adapter's are frozen (and every non-adapter parameter stays frozen)."""
    wanted = [names] if isinstance(names, str) else list(names)
    known = _adapter_names(model)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"no adapters {unknown} in the model; adapters: {known}")
    layers = lora_layers(model)
    if any(
        layer.merged_adapters and set(layer.merged_adapters) != set(wanted) for _, layer in layers
    ):
        raise ValueError("the model has merged adapters: unmerge_lora(model) first")
    adapter_params = set()
    for _, layer in layers:
        layer.set_active(wanted)
        for d in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
            for a, p in d.items():
                p.requires_grad_(a in wanted)
                adapter_params.add(id(p))
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Removes adapter ``name`` from every layer; layers left without adapters go back to
    their base module."""
    if name not in _adapter_names(model):
        raise ValueError(f"no adapter {name!r}; adapters: {_adapter_names(model)}")
    for lname, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)
        if not layer.adapters:
            set_submodule(model, lname, layer.base_layer)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block every `LoraLinear` runs its original base layer only (merged layers
    included): the base model's outputs, without removing anything."""
    layers = [layer for _, layer in lora_layers(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before, strict=True):
            layer.disabled = was


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after `apply_lora`: the active adapters'), for an
    optimizer or ``Trainer(params=...)``."""
    return [p for p in model.parameters() if p.requires_grad]


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; a quantized layer's weight counts its
    ``out x in`` elements, so float and INT4 bases give the same total."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, LoraLinear):
            stash = m.__dict__.get("_unmerged_base")
            if stash is not None:
                seen.update(id(x) for x in stash.modules())
        if id(m) in seen:
            continue
        if isinstance(m, QuantLinear):
            total += m.in_features * m.out_features
        elif isinstance(m, QuantEmbedding):
            total += m.num_embeddings * m.embedding_dim
    return trainable, total


def merge_lora(
    model: nn.Module,
    names: Sequence[str] | None = None,
    *,
    requantize: str | None = "rtn",
    symmetric: bool = False,
) -> dict[str, RequantError]:
    """`LoraLinear.merge_` on every layer (default: the active adapters); returns the
    re-quantization error of each layer with a quantized base."""
    errors: dict[str, RequantError] = {}
    for lname, layer in lora_layers(model):
        todo = None if names is None else [n for n in names if n in layer.adapters]
        if todo == []:
            continue
        err = layer.merge_(todo, requantize=requantize, symmetric=symmetric)
        if err is not None:
            errors[lname] = err
    return errors


def unmerge_lora(model: nn.Module) -> None:
    """`LoraLinear.unmerge_` on every layer: the original bases, bit for bit."""
    for _, layer in lora_layers(model):
        layer.unmerge_()


def merge_and_unload(
    model: nn.Module,
    *,
    requantize: str | None = "rtn",
    calibration: Sequence[torch.Tensor] | None = None,
    symmetric: bool = False,
    progress: bool = False,
) -> dict[str, RequantError]:
    """Folds the active adapters into their bases and puts the bases back in place of every
    `LoraLinear` (the adapters are gone; no copy of the original bases is kept).

    Float bases become ``nn.Linear`` with ``W + delta``. Quantized bases are re-quantized with
    their bits and group size: ``"rtn"`` (round to nearest, per layer), ``"gptq"`` (GPTQ on the
    merged float weights, block by block from ``calibration`` batches, e.g. the fine-tuning
    windows; ``symmetric`` as GPTQ's) or ``None`` (a float32 ``nn.Linear``). Returns the
    `RequantError` of each re-quantized layer by name.
    """
    if requantize not in REQUANTIZE_MODEL:
        raise ValueError(f"requantize must be one of {REQUANTIZE_MODEL}, got {requantize!r}")
    if requantize == "gptq" and calibration is None:
        raise ValueError("requantize='gptq' needs calibration batches")
    if requantize != "gptq" and calibration is not None:
        raise ValueError(f"requantize={requantize!r} takes no calibration data")
    layers = lora_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA layers")
    errors: dict[str, RequantError] = {}
    # GPTQ: every quantized layer becomes float first, then GPTQ runs once per (bits, group).
    pending: dict[tuple[int, int | None], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for lname, layer in layers:
        base = layer.original_base
        if requantize == "gptq" and is_quantized_base(base):
            old = base_weight(base).float()
            layer.unmerge_()
            merged = old.clone()
            for n in layer.active_adapters:
                merged += layer.delta_weight(n).to(merged.device)
            inner = base.inner if hasattr(base, "inner") else base
            assert isinstance(inner, QuantLinear)
            gs = None if inner.group_size == inner.in_features else inner.group_size
            pending.setdefault((inner.bits, gs), {})[lname] = (merged, old)
            # GPTQ writes its result into the float weight: keep `merged` apart from it.
            set_submodule(model, lname, _float_linear(base, merged.clone()))
            continue
        err = layer.merge_(
            None, requantize=None if requantize is None else "rtn", symmetric=symmetric
        )
        if err is not None:
            errors[lname] = err
        new = layer.base_layer
        layer.__dict__.pop("_unmerged_base", None)
        set_submodule(model, lname, new)
    if pending:
        from slimforge.quant.gptq import GPTQ, quantize_gptq

        for (bits, gs), group in pending.items():
            cfg = GPTQ(bits=bits, group_size=gs, symmetric=symmetric)
            results = quantize_gptq(
                model, cfg, list(calibration or ()), _named_linears(set(group)), progress=progress
            )
            missing = set(group) - set(results)
            if missing:
                raise ValueError(
                    f"GPTQ did not reach {sorted(missing)} (outside the model's blocks?): "
                    "use requantize='rtn'"
                )
            for lname, (merged, old) in group.items():
                errors[lname] = requantize_error(results[lname].dequantize(), merged, old)
    return errors


def _named_linears(names: set[str]) -> ModuleFilter:
    return lambda m, n: n in names and isinstance(m, nn.Linear)
