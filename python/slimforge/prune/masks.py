"""Masks on modules: pruned weights stay zero through training, until ``make_permanent``.

A pruned module keeps its ``weight`` parameter (zeros where pruned: no ``weight_orig`` copy, no
renamed keys, unlike ``torch.nn.utils.prune``) and gains a non-persistent bool buffer
``weight_mask`` (``True`` = kept; one byte per weight) and a gradient hook that multiplies the
weight's gradient by the mask. An optimizer's momentum or weight decay can still move a zero, so
training loops re-apply the masks after each step: :class:`MaskCallback` does it for
`slimforge.train.Trainer`, :func:`apply_masks` for a loop of your own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from slimforge.train import Callback

__all__ = [
    "LayerSparsity",
    "MaskCallback",
    "SparsityReport",
    "apply_masks",
    "attach_mask",
    "make_permanent",
    "masked_modules",
    "sparsity_report",
]

_HOOK = "_slimforge_prune_hook"


def _weight(module: nn.Module) -> torch.Tensor:
    """``module.weight``, typed (``nn.Module.__getattr__`` is typed as a tensor or module)."""
    return cast(torch.Tensor, module.weight)


def _mask(module: nn.Module) -> torch.Tensor:
    """``module.weight_mask``, typed."""
    return cast(torch.Tensor, module.weight_mask)


def _mask_grad(module: nn.Module) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        mask = getattr(module, "weight_mask", None)
        return grad if mask is None else grad * mask.to(grad.dtype)

    return hook


def attach_mask(module: nn.Module, keep: torch.Tensor) -> None:
    """Zeroes ``module.weight`` where ``keep`` is False and keeps it so: stores ``keep`` as the
    buffer ``weight_mask`` (combined with an existing mask: a weight once pruned stays pruned)
    and masks the weight's gradient."""
    w = getattr(module, "weight", None)
    if not isinstance(w, nn.Parameter):
        raise TypeError(f"{type(module).__name__} has no weight parameter to mask")
    if tuple(keep.shape) != tuple(w.shape):
        raise ValueError(f"mask shape {tuple(keep.shape)} != weight shape {tuple(w.shape)}")
    keep = keep.to(device=w.device, dtype=torch.bool)
    old = getattr(module, "weight_mask", None)
    if isinstance(old, torch.Tensor):
        old.logical_and_(keep)
    else:
        module.register_buffer("weight_mask", keep.clone(), persistent=False)
    with torch.no_grad():
        w.mul_(_mask(module).to(w.dtype))
    if getattr(module, _HOOK, None) is None:
        object.__setattr__(module, _HOOK, w.register_hook(_mask_grad(module)))
        object.__setattr__(module, "_slimforge_prune_param", id(w))


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every module carrying a pruning mask."""
    for name, m in model.named_modules():
        if isinstance(getattr(m, "weight_mask", None), torch.Tensor):
            yield name, m


def apply_masks(model: nn.Module) -> int:
    """Re-zeroes every masked weight (after an optimizer step); returns the modules touched.
    Also restores the gradient hook on a module copied without it (``copy.deepcopy``)."""
    n = 0
    with torch.no_grad():
        for _, m in masked_modules(model):
            w = _weight(m)
            w.mul_(_mask(m).to(w.dtype))
            hook = getattr(m, _HOOK, None)
            if hook is None or id(w) != getattr(m, "_slimforge_prune_param", None):
                object.__setattr__(m, _HOOK, w.register_hook(_mask_grad(m)))
            object.__setattr__(m, "_slimforge_prune_param", id(w))
            n += 1
    return n


class MaskCallback(Callback):
    """Keeps pruned weights at zero during `Trainer.fit` (re-applies the masks after each
    optimizer step): ``Trainer(model, data, callbacks=[MaskCallback()])``."""

    def on_train_start(self, trainer: Any) -> None:
        apply_masks(trainer.model)

    def on_step_end(self, trainer: Any, step: int, metrics: dict[str, float]) -> bool | None:
        apply_masks(trainer.model)
        return None


def make_permanent(model: nn.Module) -> nn.Module:
    """Bakes the masks in: pruned weights are zero in ``weight`` and stay plain parameters; the
    ``weight_mask`` buffers and gradient hooks are removed. Returns the model."""
    with torch.no_grad():
        for _, m in list(masked_modules(model)):
            _weight(m).mul_(_mask(m).to(_weight(m).dtype))
            hook = getattr(m, _HOOK, None)
            if hook is not None:
                hook.remove()
            for attr in (_HOOK, "_slimforge_prune_param"):
                if attr in m.__dict__:
                    object.__delattr__(m, attr)
            del m.weight_mask
    return model


@dataclass(frozen=True)
class LayerSparsity:
    """One weight: its module name, shape, element count, zeros, and whether it carries a mask."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    masked: bool

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass(frozen=True)
class SparsityReport:
    """Zeros per prunable weight (``nn.Linear`` / ``nn.Conv*`` weights and masked modules);
    ``parameters``/``zero_parameters``: over every parameter of the model."""

    layers: list[LayerSparsity] = field(default_factory=list)
    parameters: int = 0
    zero_parameters: int = 0

    @property
    def numel(self) -> int:
        return sum(x.numel for x in self.layers)

    @property
    def zeros(self) -> int:
        return sum(x.zeros for x in self.layers)

    @property
    def sparsity(self) -> float:
        """Zeros over the listed weights."""
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def model_sparsity(self) -> float:
        """Zeros over every parameter (embeddings and norms included)."""
        return self.zero_parameters / self.parameters if self.parameters else 0.0

    def __str__(self) -> str:
        width = max([len(x.name) for x in self.layers] + [5])
        lines = [f"{'layer':<{width}}  {'shape':>14}  {'zeros':>11}  sparsity"]
        for x in self.layers:
            shape = "x".join(map(str, x.shape))
            flag = " (masked)" if x.masked else ""
            lines.append(f"{x.name:<{width}}  {shape:>14}  {x.zeros:>11,}  {x.sparsity:7.2%}{flag}")
        lines.append(
            f"{'total':<{width}}  {self.numel:>14,}  {self.zeros:>11,}  {self.sparsity:7.2%} "
            f"({self.model_sparsity:.2%} of all {self.parameters:,} parameters)"
        )
        return "\n".join(lines)


_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Zeros of every linear / conv weight (and masked module) of ``model``; quantized layers
    (``QuantLinear``, ``Sparse24Linear``) count the zeros of their dequantized weight."""
    layers = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        masked = isinstance(getattr(m, "weight_mask", None), torch.Tensor)
        if not isinstance(w, torch.Tensor) and callable(getattr(m, "dequantize", None)):
            w = m.dequantize()  # QuantLinear, Sparse24Linear: zeros of the stored weight
        elif not isinstance(w, torch.Tensor) or not (isinstance(m, _PRUNABLE) or masked):
            continue
        if not isinstance(w, torch.Tensor) or w.dim() < 2:
            continue
        zeros = int((w == 0).sum())
        layers.append(LayerSparsity(name, tuple(w.shape), w.numel(), zeros, masked))
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    zero = sum(int((p == 0).sum()) for p in params)
    return SparsityReport(layers, total, zero)
