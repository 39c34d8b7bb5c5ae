"""``Sparse24Linear``: a 2:4 sparse weight stored compressed, with INT8 or INT4 values.

Storage (``rust/prune/sparse24.rs``): the two kept codes of every window of 4 inputs
(``values``: ``(out, in / 2)`` bytes for INT8, ``(out, in / 4)`` for INT4) and their 2-bit
positions (``meta``: ``(out, in / 8)`` bytes), with per-group ``scales`` / ``zeros`` over the
original columns, as ``QuantLinear`` has them (``w = (q - zero) * scale``). An INT8 2:4 weight
takes ``in / 2 + in / 8`` bytes per row instead of ``in`` (0.625x of dense INT8, 0.16x of fp32).

On the CPU, float32 inputs run the Rust kernel that reads this layout directly (AVX-512: one
permute gathers the activations of 16 kept values); other devices and dtypes dequantize and call
``F.linear``. Built from a float ``nn.Linear`` whose weight is 2:4 (``prune_(model, NM(2, 4))``
then :func:`to_sparse24`) or from a ``QuantLinear`` whose codes are (SparseGPT with ``bits``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimforge import _native
from slimforge.nn.surgery import ModuleFilter, all_of, replace_modules
from slimforge.quant.linear import QuantLinear
from slimforge.quant.primitives import (
    check_bits,
    choose_qparams,
    dequantize_affine,
    quantize_affine,
    resolve_group_size,
)

__all__ = ["Sparse24Linear", "is_24_sparse", "to_sparse24"]


def is_24_sparse(weight: torch.Tensor) -> bool:
    """Whether every window of 4 consecutive inputs of each row has at most 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) <= 2).all())


class Sparse24Linear(nn.Module):
    """Linear layer with a frozen 2:4 sparse INT8 / INT4 weight in compressed form.

    Buffers: ``values``, ``meta`` uint8, ``scales``, ``zeros`` float32 ``(out, in //
    group_size)``, optional ``bias``. ``forward`` takes ``(..., in)`` and returns ``(..., out)``
    in the input dtype; gradients reach the input only.
    """

    values: torch.Tensor
    meta: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 8,
        group_size: int | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        check_bits(bits)
        if in_features % 8:
            raise ValueError(f"2:4 storage needs in_features divisible by 8, got {in_features}")
        g = resolve_group_size(group_size, in_features)
        if g % 4:
            raise ValueError(f"group_size must be a multiple of 4, got {g}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size = int(bits), g
        vb = in_features // 2 if bits == 8 else in_features // 4
        ng = in_features // g
        self.register_buffer("values", torch.zeros(out_features, vb, dtype=torch.uint8))
        self.register_buffer("meta", torch.zeros(out_features, in_features // 8, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, ng))
        self.register_buffer("zeros", torch.zeros(out_features, ng))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None

    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        keep: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int | None,
    ) -> Sparse24Linear:
        """From dense uint8 codes ``(out, in)`` and a keep-mask with at most 2 of every 4 kept
        (pruned positions must hold their group's zero point, so they dequantize to 0)."""
        out, k = codes.shape
        layer = cls(k, out, bits, group_size, bias is not None)
        ng = k // layer.group_size
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (out, ng):
                raise ValueError(f"{name} must have shape {(out, ng)}, got {tuple(t.shape)}")
        vals, meta = _native.prune_sparse24_compress(
            codes.detach().cpu().contiguous().numpy(),
            keep.detach().cpu().to(torch.bool).contiguous().numpy(),
            bits,
        )
        layer.values.copy_(torch.from_numpy(vals))
        layer.meta.copy_(torch.from_numpy(meta))
        layer.scales.copy_(scales.detach().float().cpu())
        layer.zeros.copy_(zeros.detach().float().cpu())
        if bias is not None and layer.bias is not None:
            layer.bias.copy_(bias.detach().float().cpu())
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = False,
    ) -> Sparse24Linear:
        """Quantizes a 2:4 sparse ``nn.Linear`` (round to nearest, per ``group_size`` columns;
        None: per row) and compresses it. ValueError when the weight is not 2:4."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().float().cpu()
        if not is_24_sparse(w):
            raise ValueError(
                "the weight is not 2:4 sparse (more than 2 nonzeros in a window of 4 inputs): "
                "prune it first, e.g. prune_(model, NM(2, 4))"
            )
        g = resolve_group_size(group_size, linear.in_features)
        scales, zeros = choose_qparams(w, bits, g, symmetric)
        q = quantize_affine(w, scales, zeros, bits, g)
        return cls.from_codes(q, w != 0, scales, zeros, linear.bias, bits, g)

    @classmethod
    def from_quant_linear(cls, layer: QuantLinear) -> Sparse24Linear:
        """Compresses a ``QuantLinear`` whose dequantized weight is 2:4 sparse."""
        if not isinstance(layer, QuantLinear):
            raise TypeError(f"expected a QuantLinear, got {type(layer).__name__}")
        w = layer.dequantize()
        if not is_24_sparse(w):
            raise ValueError("the quantized weight is not 2:4 sparse")
        q = layer.qweight
        if layer.bits == 4:
            q = torch.from_numpy(_native.quant_unpack_int4(q.contiguous().numpy()))
        return cls.from_codes(
            q, w != 0, layer.scales, layer.zeros, layer.bias, layer.bits, layer.group_size
        )

    def dequantize(self) -> torch.Tensor:
        """Dense float32 weight ``(out, in)`` (zeros where pruned)."""
        codes = _native.prune_sparse24_decompress(
            self.values.contiguous().numpy(),
            self.meta.contiguous().numpy(),
            self.scales.contiguous().numpy(),
            self.zeros.contiguous().numpy(),
            self.in_features,
            self.bits,
            self.group_size,
        )
        return dequantize_affine(torch.from_numpy(codes), self.scales, self.zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected {self.in_features} input features, got {x.shape[-1]}")
        if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled():
            lead = x.shape[:-1]
            x2 = x.reshape(-1, self.in_features).contiguous()
            y = _native.prune_sparse24_linear(
                x2.numpy(),
                self.values.numpy(),
                self.meta.numpy(),
                self.scales.numpy(),
                self.zeros.numpy(),
                None if self.bias is None else self.bias.numpy(),
                self.bits,
                self.group_size,
            )
            return torch.from_numpy(y).reshape(*lead, self.out_features)
        w = self.dequantize().to(device=x.device, dtype=x.dtype)
        b = None if self.bias is None else self.bias.to(device=x.device, dtype=x.dtype)
        return F.linear(x, w, b)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


def to_sparse24(
    model: nn.Module,
    bits: int = 8,
    group_size: int | None = None,
    filter_fn: ModuleFilter | None = None,
    symmetric: bool = False,
) -> nn.Module:
    """Replaces every 2:4 sparse ``nn.Linear`` (and ``QuantLinear``) selected by ``filter_fn``
    with a :class:`Sparse24Linear`; layers that are not 2:4, or whose ``in_features`` is not a
    multiple of 8, stay as they are. Returns the model."""

    def pick(m: nn.Module, _n: str) -> bool:
        return isinstance(m, nn.Linear | QuantLinear)

    def swap(m: nn.Module, _n: str) -> nn.Module:
        if m.in_features % 8:  # type: ignore[operator]
            return m
        if isinstance(m, QuantLinear):
            return Sparse24Linear.from_quant_linear(m) if is_24_sparse(m.dequantize()) else m
        assert isinstance(m, nn.Linear)
        if not is_24_sparse(m.weight):
            return m
        return Sparse24Linear.from_linear(m, bits, group_size, symmetric)

    return replace_modules(model, swap, all_of(pick, filter_fn))
