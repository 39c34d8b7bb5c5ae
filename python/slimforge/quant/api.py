"""``quantize_(model, config)``: swap layers for quantized ones in place, torchao style.

Configs are frozen dataclasses; each config class has one handler, registered with
:func:`register_quantize_handler`, that turns one module into its quantized replacement (or
returns it unchanged when it does not apply).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from slimforge.quant.linear import QuantEmbedding, QuantLinear

__all__ = [
    "Int4WeightOnly",
    "Int8WeightOnly",
    "QuantConfig",
    "quantize_",
    "register_quantize_handler",
]


@dataclass(frozen=True)
class QuantConfig:
    """Base class of quantization configs (dispatched by type in :func:`quantize_`)."""


@dataclass(frozen=True)
class Int8WeightOnly(QuantConfig):
    """INT8 weights, round-to-nearest; per-channel by default (``group_size=None``).

    Applies to ``nn.Linear`` (-> :class:`QuantLinear`) and ``nn.Embedding``
    (-> :class:`QuantEmbedding`). ``symmetric=True``: absmax scale, zero point 128.
    ``no_clip`` (symmetric only; the default when symmetric): ``scale = max(max(w) / 127,
    -min(w) / 128)`` per channel, so the largest weight is not clipped by half a step (see
    ``choose_qparams``); ``no_clip=False`` gives the plain absmax / 127.5 scale. On SmolLM2-135M
    this is the difference between +0.75 % and +1.03 % perplexity.
    """

    group_size: int | None = None
    symmetric: bool = True
    no_clip: bool | None = None

    def __post_init__(self) -> None:
        if self.no_clip is None:
            object.__setattr__(self, "no_clip", self.symmetric)
        if self.no_clip and not self.symmetric:
            raise ValueError("no_clip applies to symmetric quantization (min-max never clips)")


@dataclass(frozen=True)
class Int4WeightOnly(QuantConfig):
    """INT4 weights, round-to-nearest, groups of ``group_size`` (32, 64, 128 or None/-1).

    Applies to ``nn.Linear``. ``symmetric=False``: min-max scale and zero point per group.
    ``no_clip=True`` (symmetric only): ``scale = max(max(w) / 7, -min(w) / 8)`` per group.
    """

    group_size: int | None = 128
    symmetric: bool = False
    no_clip: bool = False

    def __post_init__(self) -> None:
        if self.no_clip and not self.symmetric:
            raise ValueError("no_clip applies to symmetric quantization (min-max never clips)")


Handler = Callable[[nn.Module, QuantConfig], nn.Module]
_HANDLERS: dict[type, Handler] = {}

C = TypeVar("C", bound=Callable[..., nn.Module])


def register_quantize_handler(config_cls: type) -> Callable[[C], C]:
    """Decorator: ``handler(module, config) -> module`` becomes the handler of ``config_cls``."""

    def deco(fn: C) -> C:
        _HANDLERS[config_cls] = fn
        return fn

    return deco


def _default_filter(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding))


def _handler_for(config: QuantConfig) -> Handler:
    for cls in type(config).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    known = ", ".join(sorted(c.__name__ for c in _HANDLERS))
    raise TypeError(f"no quantize handler for {type(config).__name__}; registered: {known}")


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replaces, in place, each submodule selected by ``filter_fn(module, fqn)`` (default:
    every ``nn.Linear`` and ``nn.Embedding``) with ``handler(module, config)``.

    Returns ``model``, or its replacement when ``model`` itself was selected.
    """
    handler = _handler_for(config)
    keep = filter_fn if filter_fn is not None else _default_filter
    targets = [(fqn, m) for fqn, m in model.named_modules() if keep(m, fqn)]
    for fqn, module in targets:
        try:
            new = handler(module, config)
        except (ValueError, TypeError) as e:
            raise type(e)(f"cannot quantize {fqn or 'the model'!r}: {e}") from e
        if new is module:
            continue
        if fqn == "":
            return new
        parent_name, _, child = fqn.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


@register_quantize_handler(Int8WeightOnly)
def _int8_weight_only(module: nn.Module, config: QuantConfig) -> nn.Module:
    assert isinstance(config, Int8WeightOnly)
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(
            module, 8, config.group_size, config.symmetric, config.no_clip
        )
    if isinstance(module, nn.Embedding):
        return QuantEmbedding.from_float(
            module, 8, config.group_size, config.symmetric, config.no_clip
        )
    return module


@register_quantize_handler(Int4WeightOnly)
def _int4_weight_only(module: nn.Module, config: QuantConfig) -> nn.Module:
    assert isinstance(config, Int4WeightOnly)
    if isinstance(module, nn.Linear):
        return QuantLinear.from_float(
            module, 4, config.group_size, config.symmetric, config.no_clip
        )
    return module
