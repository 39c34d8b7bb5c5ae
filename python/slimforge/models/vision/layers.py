"""The building blocks of the edge CNNs: convolution + BatchNorm + activation, depthwise-separable
convolutions, inverted residuals, BatchNorm folding and a multiply-add counter.

Shapes are ``(batch, channels, height, width)`` float32 throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvBN",
    "DepthwiseSeparableConv",
    "InvertedResidual",
    "count_macs",
    "count_params",
    "fold_batchnorm",
]


def _check_channels(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


class ConvBN(nn.Module):
    """``act(bn(conv(x)))``: a bias-free ``kernel x kernel`` convolution, BatchNorm and ReLU6 (or
    no activation with ``act=False``).

    padding ``"symmetric"`` pads ``kernel // 2`` on every side (torchvision); ``"same"`` pads like
    TensorFlow's ``SAME`` (the extra pixel of a stride-2 convolution goes right and bottom), which
    networks converted from TensorFlow need. After :meth:`fold` the BatchNorm is an
    ``nn.Identity`` and the convolution carries its scale and shift.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
        padding: str = "symmetric",
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels, kernel=kernel)
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride!r}")
        if padding not in ("symmetric", "same"):
            raise ValueError(f"padding must be 'symmetric' or 'same', got {padding!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide {in_channels} and {out_channels}")
        self.kernel, self.stride, self.padding = kernel, stride, padding
        pad = kernel // 2 if padding == "symmetric" else 0
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel, stride, pad, groups=groups, bias=False
        )
        self.bn: nn.Module = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)
        self.act: nn.Module = nn.ReLU6(inplace=True) if act else nn.Identity()

    @property
    def depthwise(self) -> bool:
        """Whether every channel is convolved on its own (``groups == channels``)."""
        return self.conv.groups > 1 and self.conv.groups == self.conv.in_channels

    def _same_pad(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        k, s = self.kernel, self.stride
        ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
        pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == "same":
            x = self._same_pad(x)
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fold(self) -> None:
        """Folds the BatchNorm's running statistics into the convolution (eval-mode outputs are
        unchanged up to rounding); a no-op when already folded."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return
        conv = self.conv
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias - bn.running_mean * scale
        if conv.bias is not None:
            bias = bias + conv.bias * scale
        new = nn.Conv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            groups=conv.groups,
            bias=True,
        ).to(conv.weight.device, conv.weight.dtype)
        new.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        assert new.bias is not None
        new.bias.copy_(bias)
        self.conv = new
        self.bn = nn.Identity()


class DepthwiseSeparableConv(nn.Module):
    """A ``kernel x kernel`` depthwise convolution (one filter per channel) followed by a 1x1
    pointwise convolution that mixes channels, each with BatchNorm: ``in * k^2 + in * out``
    weights where a standard convolution has ``in * out * k^2``.

    The depthwise step has ReLU6; the pointwise step has it only with ``pointwise_act=True``
    (inverted residuals keep their projection linear).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 3,
        stride: int = 1,
        pointwise_act: bool = False,
        padding: str = "symmetric",
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        bn = {"eps": eps, "momentum": momentum}
        self.depthwise = ConvBN(
            in_channels, in_channels, kernel, stride, groups=in_channels, padding=padding, **bn
        )
        self.pointwise = ConvBN(in_channels, out_channels, 1, act=pointwise_act, **bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: a 1x1 expansion to ``hidden`` channels (ReLU6; absent when
    ``hidden == in_channels`` and ``expand`` is False), a depthwise-separable convolution down to
    ``out_channels`` with a linear projection, and a residual connection when the stride is 1
    and the widths match.

    ``separable=False`` puts a standard ``kernel x kernel`` convolution from ``hidden`` to
    ``out_channels`` where the depthwise-separable one is (the network the depthwise-separable
    design is compared against).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden: int,
        kernel: int = 3,
        stride: int = 1,
        expand: bool = True,
        separable: bool = True,
        padding: str = "symmetric",
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__()
        _check_channels(in_channels=in_channels, out_channels=out_channels, hidden=hidden)
        if not expand and hidden != in_channels:
            raise ValueError(f"without expansion hidden ({hidden}) must equal in ({in_channels})")
        bn = {"eps": eps, "momentum": momentum}
        self.expand: ConvBN | None = ConvBN(in_channels, hidden, 1, **bn) if expand else None
        self.conv: nn.Module
        if separable:
            self.conv = DepthwiseSeparableConv(
                hidden, out_channels, kernel, stride, padding=padding, **bn
            )
        else:
            self.conv = ConvBN(
                hidden, out_channels, kernel, stride, act=False, padding=padding, **bn
            )
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.conv(y)
        return x + y if self.residual else y


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Folds every :class:`ConvBN`'s BatchNorm into its convolution, in place; returns
    ``model``. Put the model in eval mode first: folding uses the running statistics, and a
    model in training mode is a ValueError."""
    if model.training:
        raise ValueError("fold_batchnorm needs model.eval(): it folds the running statistics")
    for m in model.modules():
        if isinstance(m, ConvBN):
            m.fold()
    return model


def count_params(model: nn.Module) -> int:
    """Number of parameters (BatchNorm affine parameters included, running statistics not)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 224, 224)) -> int:
    """Multiply-adds of one forward pass at ``input_size`` (``(batch, channels, h, w)``),
    counting the convolutions and linear layers: a convolution costs ``out elements x
    in_channels / groups x kernel area``, a linear ``out elements x in_features``."""
    if len(input_size) != 4 or any(not isinstance(s, int) or s < 1 for s in input_size):
        raise ValueError(f"input_size must be 4 positive ints (b, c, h, w), got {input_size!r}")
    total = 0

    def hook(m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += out.numel() * (m.in_channels // m.groups) * kh * kw
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    was = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(input_size, device=p.device, dtype=p.dtype))
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return total
