"""Quantization-aware fine-tuning for ONNX Runtime's INT8 graph: the fallback when static
post-training quantization loses too much accuracy.

    result = qat_quantize_onnx(model, "mnv2.qat.int8.onnx", calibration, QAT(steps=200))
    logits = OnnxModel(result.path)(images)

The PyTorch model is fake-quantized the way ONNX Runtime's QDQ graph (:func:`quantize_static_onnx`)
computes it:

- every convolution and the classifier, after BatchNorm folding: weights int8, symmetric, per
  output channel (scale ``max|w| / 127``), recomputed from the current weights at each step;
- uint8 activations, per tensor, at exactly the tensors ONNX Runtime puts a ``QuantizeLinear``
  on: the input images, each convolution's output (after its ReLU6, which ONNX Runtime drops in
  favour of the uint8 range), each residual sum, the pooled features and the logits.

The activation ranges start from ONNX Runtime's own calibration (the post-training model is
built first and its scales and zero points read back) and are learned (LSQ: a learnable scale,
straight-through rounding; ReLU6 outputs keep zero point 0 and a range within [0, 6]). The
weights and ranges are fine-tuned on :class:`slimforge.train.Trainer` to match the float model's
output distribution (KL, no labels needed). The fine-tuned float weights are then exported and
quantized again by ONNX Runtime with the learned ranges passed as ``TensorQuantOverrides``; its
per-channel weight quantization gives the same weight grid as the fake quantizer.

The fake-quantized model computes what ONNX Runtime's QDQ graph computes op by op
(``OnnxModel(path, optimize=False)``), except that the int32 bias rounding is not simulated.
"""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from slimforge._optional import require
from slimforge.calibration import prepare_calibration
from slimforge.models.vision.layers import ConvBN, InvertedResidual, fold_batchnorm
from slimforge.models.vision.nets import VisionNet
from slimforge.quant.qat import fake_quantize_ste

__all__ = [
    "QAT",
    "FakeQuantVisionNet",
    "QATResult",
    "activation_qparams",
    "qat_quantize_onnx",
]

_QMAX = 255  # uint8 activations
_RELU6_MAX_SCALE = 6.0 / _QMAX


@dataclass(frozen=True)
class QAT:
    """Quantization-aware fine-tuning settings.

    steps: optimizer steps; batch_size: images per step; lr: peak AdamW learning rate of the
    weights (warm-up + cosine); range_lr: how many times faster the activation ranges move than
    the weights (they are learned in log scale); temperature: of the KL to the float model;
    seed: mini-batch order."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-5
    range_lr: float = 100.0
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("lr", "range_lr", "temperature"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v!r}")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounds in the forward pass, passes the gradient through unchanged."""
    return x + (torch.round(x) - x).detach()


class _ActQuant(nn.Module):
    """Learnable per-tensor uint8 fake quantization ``(round(clamp(x / s + z, 0, 255)) - z) * s``
    (LSQ gradients for the scale, straight-through for x inside the range)."""

    scale0: torch.Tensor

    def __init__(self, scale: float, zero_point: int, relu6: bool, range_lr: float) -> None:
        super().__init__()
        if relu6:
            scale = min(scale, _RELU6_MAX_SCALE)
        self.register_buffer("scale0", torch.tensor(float(scale)))
        self.log_scale = nn.Parameter(torch.zeros(()))
        self.zero = nn.Parameter(torch.tensor(float(zero_point)), requires_grad=not relu6)
        self.relu6, self.range_lr = relu6, range_lr

    def scale(self) -> torch.Tensor:
        s = self.scale0 * torch.exp(self.log_scale * self.range_lr)
        return s.clamp(max=_RELU6_MAX_SCALE) if self.relu6 else s

    def zero_point(self) -> torch.Tensor:
        if self.relu6:
            return torch.zeros((), device=self.zero.device)
        return _round_ste(self.zero).clamp(0, _QMAX)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.scale(), self.zero_point()
        q = _round_ste((x / s + z).clamp(0, _QMAX))
        return (q - z) * s

    def qparams(self) -> tuple[float, int]:
        """The scale (float32 value) and integer zero point ONNX Runtime is given."""
        with torch.no_grad():
            return float(self.scale().float()), int(self.zero_point())


class _WeightQuant(nn.Module):
    """Per-output-channel symmetric int8 fake quantization of a weight (ONNX Runtime's grid:
    scale ``max|w| / 127``, codes in [-127, 127]), clipped straight-through gradient."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        absmax = w.detach().abs().flatten(1).amax(1).clamp(min=1e-12)
        shape = (-1,) + (1,) * (w.dim() - 1)
        scale = (absmax / 127.0).reshape(shape)
        return fake_quantize_ste(w, scale, torch.full_like(scale, 127.0), 8)


def _onnx_path(name: str) -> str:
    """The ONNX exporter's scope of a module: ``blocks.3.conv.pointwise`` -> ``/blocks.3/conv/
    pointwise`` (a list index stays joined to its list)."""
    return "/" + re.sub(r"\.(?=\D)", "/", name)


class FakeQuantVisionNet(nn.Module):
    """A BatchNorm-folded copy of a :class:`VisionNet` fake-quantized like ONNX Runtime's QDQ
    graph (see the module docs), with learnable activation ranges.

    qparams: ``{onnx tensor name: (scale, zero point)}`` of the activations, as
    :func:`activation_qparams` reads them from a QDQ file; every tensor the QAT model quantizes
    must be there, and every tensor there must be one it quantizes (a ``Pad`` output, which
    shares its input's range, excepted); otherwise a ValueError names the difference.
    range_lr: see :class:`QAT`. forward(images) -> logits."""

    def __init__(
        self, model: VisionNet, qparams: dict[str, tuple[float, int]], range_lr: float = 100.0
    ) -> None:
        super().__init__()
        if not isinstance(model, VisionNet):
            raise TypeError(f"model must be a VisionNet, got {type(model).__name__}")
        net = copy.deepcopy(model).float().cpu().eval()
        fold_batchnorm(net)
        net.dropout = nn.Dropout(0.0)  # the exported graph has no dropout either
        self.net = net
        points: dict[str, tuple[str, bool]] = {"images": ("", False)}
        for name, m in net.named_modules():
            if isinstance(m, ConvBN):
                relu6 = isinstance(m.act, nn.ReLU6)
                op = "act/Clip" if relu6 else "conv/Conv"
                points[f"{_onnx_path(name)}/{op}_output_0"] = (name, relu6)
            elif isinstance(m, InvertedResidual) and m.residual:
                points[f"{_onnx_path(name)}/Add_output_0"] = (name, False)
        points["/ReduceMean_output_0"] = ("classifier:in", False)
        points["logits"] = ("classifier", False)
        given = {k for k in qparams if not k.endswith("/Pad_output_0")}
        if given != set(points):
            raise ValueError(
                "the QDQ graph's quantized activations differ from the QAT model's: "
                f"only in the graph {sorted(given - set(points))[:5]}, "
                f"only in the model {sorted(set(points) - given)[:5]}"
            )
        self.tensor_names = list(points)
        self.quantizers = nn.ModuleList(
            _ActQuant(*qparams[t], relu6=points[t][1], range_lr=range_lr) for t in self.tensor_names
        )
        self._hooks: list[tuple[str, str, int]] = []
        modules = dict(net.named_modules())
        for t, q in zip(self.tensor_names, self.quantizers, strict=True):
            target = points[t][0]
            if target == "":
                continue  # the input: quantized in forward
            if target == "classifier:in":
                h = modules["classifier"].register_forward_pre_hook(
                    lambda _m, args, q=q: (q(args[0]),) + tuple(args[1:])
                )
                self._hooks.append(("classifier", "pre", h.id))
            else:
                h = modules[target].register_forward_hook(lambda _m, _a, out, q=q: q(out))
                self._hooks.append((target, "post", h.id))
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                parametrize.register_parametrization(m, "weight", _WeightQuant())
        self.pad_aliases = _pad_aliases(qparams)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.quantizers[0](images))

    def overrides(self) -> dict[str, list[dict[str, Any]]]:
        """The learned activation ranges as ONNX Runtime's ``TensorQuantOverrides``: ``{tensor:
        [{"scale": float32, "zero_point": uint8}]}`` (``Pad`` outputs share their input's)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for t, q in zip(self.tensor_names, self.quantizers, strict=True):
            s, z = q.qparams()
            out[t] = [{"scale": np.array(s, np.float32), "zero_point": np.array(z, np.uint8)}]
        for pad_out, pad_in in self.pad_aliases.items():
            if pad_in in out:
                out[pad_out] = out[pad_in]
        return out

    def float_model(self) -> VisionNet:
        """A plain copy of the (folded) network holding the fine-tuned float weights, without
        fake quantization: the model to export."""
        convs = [m for m in self.net.modules() if parametrize.is_parametrized(m, "weight")]
        for m in convs:  # the copy must not share the parametrized classes
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
        try:
            plain = copy.deepcopy(self.net)
        finally:
            for m in convs:
                parametrize.register_parametrization(m, "weight", _WeightQuant())
        modules = dict(plain.named_modules())
        for name, kind, hid in self._hooks:
            m = modules[name]
            (m._forward_pre_hooks if kind == "pre" else m._forward_hooks).pop(hid, None)
        return plain.eval()


def _pad_aliases(qparams: dict[str, tuple[float, int]]) -> dict[str, str]:
    """``{Pad output: the quantized tensor it pads}``, recorded by :func:`activation_qparams`."""
    return dict(getattr(qparams, "pad_inputs", {}))


class _QParams(dict):
    """``{tensor: (scale, zero point)}`` with the ``Pad`` nodes' ``{output: input}`` attached."""

    pad_inputs: dict[str, str]


def activation_qparams(path: str | os.PathLike[str]) -> dict[str, tuple[float, int]]:
    """The activations' per-tensor ``(scale, zero point)`` of a QDQ ONNX file, keyed by the
    quantized tensor's name in the float graph (the input of each activation
    ``QuantizeLinear``)."""
    require("onnx", "slimforge.models.vision.activation_qparams")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    out = _QParams()
    out.pad_inputs = {}
    dq_source: dict[str, str] = {}
    for n in graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        name = n.input[0]
        if name.endswith("_QuantizeLinear_Input"):  # a graph output renamed by the quantizer
            name = name[: -len("_QuantizeLinear_Input")]
        scale = float(numpy_helper.to_array(inits[n.input[1]]))
        zero = int(numpy_helper.to_array(inits[n.input[2]]))
        out[name] = (scale, zero)
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            dq_source[n.output[0]] = n.input[0]
    q_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    for n in graph.node:
        if n.op_type == "Pad" and n.output[0].endswith("/Pad_output_0"):
            src = q_of.get(dq_source.get(n.input[0], ""), n.input[0])
            out.pad_inputs[n.output[0]] = src
    return out


@dataclass
class QATResult:
    """path: the INT8 QDQ ONNX file; model: the fake-quantized PyTorch model after fine-tuning;
    initial_qparams: ONNX Runtime's calibrated activation ranges it started from; train: the
    Trainer's result; seconds: wall time of the whole call."""

    path: Path
    model: FakeQuantVisionNet
    initial_qparams: dict[str, tuple[float, int]]
    train: Any
    seconds: float


def _kl_loss(temperature: float) -> Any:
    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, teacher = batch
        s = F.log_softmax(model(images).float() / temperature, -1)
        t = F.log_softmax(teacher.float() / temperature, -1)
        return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2

    return loss


def qat_quantize_onnx(
    model: VisionNet,
    path: str | os.PathLike[str],
    calibration: Iterable[torch.Tensor] | torch.Tensor,
    config: QAT | None = None,
    images: torch.Tensor | None = None,
    method: str = "minmax",
    image_size: int | None = None,
    progress: bool = True,
) -> QATResult:
    """INT8 static quantization with quantization-aware fine-tuning (see the module docs),
    written to ``path`` atomically.

    calibration: image batches for ONNX Runtime's calibration (the initial ranges) and, unless
    ``images`` is given, for the fine-tune; images: ``(n, 3, h, w)`` fine-tuning images;
    method: the initial ranges' calibration method (see :func:`quantize_static_onnx`);
    image_size: the export size (default: the model's ``config.image_size``)."""
    import time

    from slimforge.models.vision.data import _ShuffledBatches, predict_logits
    from slimforge.models.vision.onnx import quantize_static_onnx
    from slimforge.train import TrainConfig, Trainer

    t0 = time.perf_counter()
    if not isinstance(model, VisionNet):
        raise TypeError(f"model must be a VisionNet for quantization-aware training, got "
                        f"{type(model).__name__}")  # fmt: skip
    config = config or QAT()
    if not isinstance(config, QAT):
        raise TypeError(f"config must be a QAT, got {type(config).__name__}")
    batches: list[torch.Tensor] = []
    for i, b in enumerate(prepare_calibration(calibration)):
        if not isinstance(b, torch.Tensor) or b.dim() != 4 or b.shape[1] != 3:
            raise ValueError(f"calibration batch {i} must be (batch, 3, h, w) images")
        batches.append(b)
    size = image_size or model.config.image_size
    train_x = images if images is not None else torch.cat([b.float() for b in batches])
    if not isinstance(train_x, torch.Tensor) or train_x.dim() != 4 or train_x.shape[1] != 3:
        raise ValueError("images must be (n, 3, h, w)")
    if config.batch_size > train_x.shape[0]:
        raise ValueError(
            f"QAT batch_size ({config.batch_size}) exceeds the {train_x.shape[0]} training images"
        )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        ptq = quantize_static_onnx(
            model, tmp / "ptq.onnx", batches, method=method, image_size=size, progress=progress
        )
        qparams = activation_qparams(ptq)
        fq = FakeQuantVisionNet(model, qparams, range_lr=config.range_lr)
        teacher = predict_logits(model, train_x)
        cfg = TrainConfig(
            steps=config.steps,
            batch_size=config.batch_size,
            lr=config.lr,
            weight_decay=0.0,
            betas=(0.9, 0.999),
            log_every=max(1, config.steps // 10),
            seed=config.seed,
            progress=progress,
        )
        data = _ShuffledBatches(train_x, teacher, config.batch_size, config.steps, config.seed)
        train = Trainer(fq, data, config=cfg, loss_fn=_kl_loss(config.temperature)).fit()
        fq.eval()
        quantize_static_onnx(
            fq.float_model(),
            out,
            batches,
            image_size=size,
            progress=progress,
            overrides=fq.overrides(),
        )
    return QATResult(out, fq, dict(qparams), train, time.perf_counter() - t0)
