"""Quantization-aware training: fake-quantized linears, then conversion to real ``QuantLinear``.

``prepare_qat(model, QATConfig(bits=4, group_size=32))`` swaps each ``nn.Linear`` for a
``FakeQuantLinear`` that keeps the float weight trainable and, in the forward pass, uses its
per-group min-max fake quantization ``(clamp(round(w/s) + z, 0, 2^b-1) - z) * s``. The backward
pass is the clipped straight-through estimator (torchao's ``_Round`` + clamp): gradient 1 where
``round(w/s) + z`` lies inside ``[0, 2^b-1]``, 0 outside. Scales and zeros are recomputed from the
current weight every step and receive no gradient. ``convert(model)`` replaces every
``FakeQuantLinear`` with a ``QuantLinear`` holding exactly the codes the fake quantizer used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.nn.surgery import ModuleFilter, all_of, replace_modules, select_modules
from slimforge.quant.api import QuantConfig, register_quantize_handler
from slimforge.quant.linear import QuantLinear
from slimforge.quant.primitives import check_bits, group_qparams, resolve_group_size

__all__ = ["FakeQuantLinear", "QATConfig", "convert", "fake_quantize_ste", "prepare_qat"]


@dataclass(frozen=True)
class QATConfig(QuantConfig):
    """bits: 4 or 8; group_size: 32, 64, 128 or None (per-channel), dividing in_features;
    symmetric: absmax scale, mid-range zero. ``quantize_(model, QATConfig())`` is the prepare
    step (:func:`prepare_qat`); :func:`convert` produces the ``QuantLinear`` modules."""

    bits: int = 4
    group_size: int | None = 32
    symmetric: bool = False


class _FakeQuantSTE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int
    ) -> torch.Tensor:
        q = torch.round(w / scale) + zero
        inside = (q >= 0) & (q <= maxq)
        ctx.save_for_backward(inside)
        return (torch.clamp(q, 0, maxq) - zero) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None


def fake_quantize_ste(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Fake-quantize ``w`` with broadcastable ``scale``/``zero``; clipped STE gradient to ``w``."""
    return _FakeQuantSTE.apply(w, scale.detach(), zero.detach(), 2**bits - 1)


class FakeQuantLinear(nn.Module):
    """A linear whose forward uses the group fake-quantized weight; ``weight`` stays float.

    weight: (out, in) trainable; bias: (out,) or None.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        bits: int = 4,
        group_size: int | None = 32,
        symmetric: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        group_size = resolve_group_size(group_size, weight.shape[1])
        self.weight = weight
        self.bias = bias
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        #: Dotted name in the model (set by ``prepare_qat``), for error messages.
        self.name = name

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: QATConfig, name: str | None = None
    ) -> FakeQuantLinear:
        return cls(
            linear.weight, linear.bias, config.bits, config.group_size, config.symmetric, name
        )

    def _params(self, named: bool) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight.detach().float().reshape(-1, self.group_size)
        s, z = group_qparams(w, self.bits, self.symmetric)
        # A NaN/Inf weight makes its group's scale non-finite (min/max propagate NaN), so checking
        # the (out, in / group) scales finds it without a pass over the weight. Not while tracing
        # (a data-dependent branch); the eager path and convert() always check.
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(s).all()):
            raise ValueError(self._non_finite_message(named))
        ng = self.in_features // self.group_size
        return s.reshape(-1, ng), z.reshape(-1, ng)

    def _non_finite_message(self, named: bool) -> str:
        w = self.weight.detach()
        bad = (~torch.isfinite(w)).nonzero()
        where = ""
        if len(bad):
            r, c = (int(i) for i in bad[0])
            where = f" ({float(w[r, c])} at row {r}, column {c})"
        prefix = f"{self.name}: " if named and self.name else ""
        return f"{prefix}weight contains NaN or Inf{where}; QAT cannot quantize it"

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scales, zeros), each (out, in // group_size) float32, from the current weight.

        Raises ValueError (naming the module when ``prepare_qat`` created it) if the weight holds
        NaN or Inf, as ``quantize_`` does: their scales would be NaN.
        """
        return self._params(named=True)

    def fake_quant_weight(self) -> torch.Tensor:
        """(out, in) fake-quantized weight (differentiable through the clipped STE)."""
        s, z = self.qparams()
        wg = self.weight.float().reshape(-1, self.group_size)
        out = fake_quantize_ste(wg, s.reshape(-1, 1), z.reshape(-1, 1), self.bits)
        return out.reshape(self.weight.shape).to(self.weight.dtype)

    def _codes(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        wg = self.weight.detach().float().reshape(-1, self.group_size)
        q = torch.clamp(torch.round(wg / s.reshape(-1, 1)) + z.reshape(-1, 1), 0, 2**self.bits - 1)
        return q.reshape(self.weight.shape).to(torch.uint8)

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes the fake quantizer uses now."""
        return self._codes(*self.qparams())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.fake_quant_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, symmetric={self.symmetric}"
        )


def prepare_qat(
    model: nn.Module,
    config: QATConfig,
    filter_fn: ModuleFilter | None = None,
) -> nn.Module:
    """Swap selected ``nn.Linear`` modules for ``FakeQuantLinear`` in place (the same weight and
    bias Parameters are kept, so an existing optimizer still updates them). Returns ``model``.

    Every selected layer is checked first (group size dividing ``in_features``), so a bad layer
    leaves the model untouched."""
    keep = all_of(lambda m, n: isinstance(m, nn.Linear), filter_fn)
    for name, lin in select_modules(model, keep):
        try:
            resolve_group_size(config.group_size, lin.in_features)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from e
    return replace_modules(model, lambda m, n: FakeQuantLinear.from_linear(m, config, n), keep)


def convert(model: nn.Module) -> nn.Module:
    """Replace every ``FakeQuantLinear`` with a ``QuantLinear`` of the same codes. Returns model.

    A weight holding NaN or Inf is a ValueError naming the module (as with ``quantize_``), not
    a layer with NaN scales."""

    def to_quant(fq: nn.Module, _name: str) -> nn.Module:
        assert isinstance(fq, FakeQuantLinear)
        # Unnamed: replace_modules puts the module's name in front of the ValueError.
        s, z = fq._params(named=False)
        bias = None if fq.bias is None else fq.bias.detach()
        return QuantLinear.from_quantized(fq._codes(s, z), s, z, bias, fq.bits, fq.group_size)

    if not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("convert: the model has no FakeQuantLinear; call prepare_qat first")
    return replace_modules(model, to_quant, lambda m, n: isinstance(m, FakeQuantLinear))


@register_quantize_handler(QATConfig)
def _prepare_linear_qat(module: nn.Module, config: QATConfig) -> nn.Module:
    """``quantize_(model, QATConfig())`` handler: the prepare step for one linear."""
    return FakeQuantLinear.from_linear(module, config)
