"""ONNX export and INT8 static quantization of the edge CNNs, run by ONNX Runtime.

    path = export_onnx(model, "mnv2.onnx")                      # float, BatchNorm folded
    int8 = quantize_static_onnx(path, "mnv2.int8.onnx", calibration_batches)
    logits = OnnxModel(int8, threads=2)(images)                 # a torch tensor in and out

INT8 is ONNX Runtime's static post-training quantization in QDQ form: weights int8 per output
channel (symmetric), activations uint8 per tensor (asymmetric), ranges from min/max over the
calibration images. ONNX Runtime fuses the QuantizeLinear / DequantizeLinear pairs around each
convolution into integer kernels (VNNI where the CPU has it). ``OnnxModel(..., optimize=False)``
runs the same graph op by op, without fusion: the reference the fused kernels are checked
against.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from slimforge._optional import require
from slimforge.calibration import prepare_calibration
from slimforge.io import atomic_path
from slimforge.models.vision.layers import fold_batchnorm

if TYPE_CHECKING:
    from slimforge.models.vision.qat import QAT

__all__ = ["OnnxModel", "export_onnx", "quantize_static_onnx"]

_INPUT, _OUTPUT = "images", "logits"


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    image_size: int = 224,
    opset: int = 17,
    fold: bool = True,
) -> Path:
    """Writes ``model`` (images ``(batch, 3, image_size, image_size)`` -> logits) as an ONNX file
    with a dynamic batch axis, atomically. With ``fold`` the BatchNorms of a copy are folded
    first (the model itself is not changed). Returns the path."""
    require("onnx", "slimforge.models.vision.export_onnx")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an int >= 32, got {image_size!r}")
    m = copy.deepcopy(model).eval().float().cpu()
    if fold:
        fold_batchnorm(m)
    x = torch.zeros(1, 3, image_size, image_size)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            m,
            (x,),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=[_INPUT],
            output_names=[_OUTPUT],
            dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}},
        )
    return out


class OnnxModel:
    """An ONNX file run by ONNX Runtime's CPU provider, called like a PyTorch classifier:
    ``OnnxModel(path)(images)`` takes ``(batch, 3, h, w)`` float32 (tensor or array) and returns
    the logits as a float32 tensor.

    threads: intra-op threads (0: ONNX Runtime's default); optimize: False disables every graph
    optimization, so QDQ graphs run op by op (the reference semantics)."""

    def __init__(self, path: str | os.PathLike[str], threads: int = 0, optimize: bool = True):
        require("onnxruntime", "slimforge.models.vision.OnnxModel")
        import onnxruntime as ort

        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise ValueError(f"threads must be an int >= 0, got {threads!r}")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} does not exist")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(self.path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def run(self, images: np.ndarray) -> np.ndarray:
        """Logits as a NumPy array from ``(batch, 3, h, w)`` float32 NumPy images."""
        return self.session.run(None, {self.input_name: images})[0]

    def __call__(self, images: Any) -> torch.Tensor:
        a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else images
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(f"images must be (batch, 3, h, w), got {a.shape}")
        return torch.from_numpy(self.run(a))

    @property
    def size_bytes(self) -> int:
        """Size of the ONNX file on disk."""
        return self.path.stat().st_size


class _Reader:
    """ONNX Runtime's calibration data reader over prepared image batches."""

    def __init__(self, batches: list[Any], name: str, progress: bool) -> None:
        from tqdm.auto import tqdm

        self._it = iter(tqdm(batches, desc="calibrating", unit="batch", disable=not progress))
        self._name = name

    def get_next(self) -> dict[str, np.ndarray] | None:
        b = next(self._it, None)
        if b is None:
            return None
        return {self._name: np.ascontiguousarray(b.detach().cpu().numpy(), dtype=np.float32)}


def quantize_static_onnx(
    model: nn.Module | str | os.PathLike[str],
    path: str | os.PathLike[str],
    calibration: Iterable[torch.Tensor] | torch.Tensor,
    per_channel: bool = True,
    method: str = "minmax",
    image_size: int = 224,
    progress: bool = True,
    qat: QAT | int | None = None,
    overrides: dict[str, list[dict[str, Any]]] | None = None,
) -> Path:
    """INT8 static post-training quantization in QDQ form (see the module docs), written to
    ``path`` atomically; returns the path.

    model: a PyTorch classifier (exported first with :func:`export_onnx`) or a float ONNX file.
    calibration: image batches ``(batch, 3, h, w)`` float32, preprocessed like the inputs
    (validated by the shared calibration driver's ``prepare_calibration``). method:
    ``"minmax"``, ``"percentile"`` (99.999 %) or ``"entropy"`` activation ranges.

    qat: quantization-aware fine-tuning, the fallback when post-training quantization loses
    too much accuracy: a :class:`~slimforge.models.vision.qat.QAT` config or a number of steps
    (``model`` must then be a ``VisionNet``; the fine-tune uses the calibration images, see
    :func:`~slimforge.models.vision.qat.qat_quantize_onnx`). overrides: activation ranges
    ``{tensor: [{"scale": ..., "zero_point": ...}]}`` passed to ONNX Runtime as
    ``TensorQuantOverrides`` (what QAT learned)."""
    require("onnxruntime", "slimforge.models.vision.quantize_static_onnx")
    if qat is not None:
        from slimforge.models.vision.qat import QAT, qat_quantize_onnx

        if isinstance(qat, bool) or not isinstance(qat, QAT | int):
            raise TypeError(f"qat must be a QAT config or a number of steps, got {qat!r}")
        if not isinstance(model, nn.Module):
            raise ValueError("qat needs the PyTorch model, not an ONNX file")
        if overrides is not None:
            raise ValueError("give qat or overrides, not both")
        config = QAT(steps=qat) if isinstance(qat, int) else qat
        return qat_quantize_onnx(
            model,  # type: ignore[arg-type]
            path,
            calibration,
            config,
            method=method,
            image_size=image_size,
            progress=progress,
        ).path
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise ValueError(f"method must be one of {sorted(methods)}, got {method!r}")
    batches = prepare_calibration(calibration)
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor) or b.dim() != 4 or b.shape[1] != 3:
            shape = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise ValueError(f"calibration batch {i} must be (batch, 3, h, w) images, got {shape}")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp_dir:
        tmp = Path(tmp_dir)
        if isinstance(model, nn.Module):
            float_path = export_onnx(model, tmp / "float.onnx", image_size=image_size)
        else:
            float_path = Path(model)
            if not float_path.is_file():
                raise FileNotFoundError(f"{float_path} does not exist")
        prepared = tmp / "prepared.onnx"
        quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
        name = OnnxModel(prepared).input_name
        with atomic_path(out) as dst:
            quantize_static(
                str(prepared),
                str(dst),
                _Reader(batches, name, progress),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=methods[method],
                extra_options={
                    "CalibTensorRangeSymmetric": False,
                    "TensorQuantOverrides": overrides or {},
                },
            )
    return out
