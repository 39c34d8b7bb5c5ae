"""Quantization-aware fine-tuning for ONNX Runtime's INT8 graph (slimforge.models.vision.qat)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimforge.models.vision import (
    EfficientNetLite0,
    MobileNetV2,
    VisionConfig,
    compare_logits,
    predict_logits,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from slimforge.models.vision.onnx import OnnxModel, quantize_static_onnx  # noqa: E402
from slimforge.models.vision.qat import (  # noqa: E402
    QAT,
    FakeQuantVisionNet,
    _ActQuant,
    _WeightQuant,
    activation_qparams,
    qat_quantize_onnx,
)


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        model.classifier.weight.mul_(30.0)  # logits spread over a few units, like a trained net
    return model.eval()


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(1e-3, 0.5),
    zero=st.integers(0, 255),
    seed=st.integers(0, 2**16),
)
def test_activation_quantizer_matches_torch_fake_quantize(scale, zero, seed):
    """The learnable quantizer computes torch's per-tensor affine fake quantization (uint8) and
    gives the LSQ gradient to its scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, generator=g) * 300 * scale
    q = _ActQuant(scale, zero, relu6=False, range_lr=1.0)
    s = float(q.scale().detach())
    want = torch.fake_quantize_per_tensor_affine(x, s, zero, 0, 255)
    torch.testing.assert_close(q(x), want, rtol=0, atol=1e-5 * s)
    # LSQ: d out / d s = round(x/s) - x/s inside the range, (0 or 255) - z outside
    x.requires_grad_(True)
    q(x).sum().backward()
    st_ = q.scale().detach()
    r = x.detach() / st_
    v = r + zero
    inside = (v >= 0) & (v <= 255)
    lsq = torch.where(
        inside,
        torch.round(r) - r,
        torch.where(v < 0, torch.tensor(0.0 - zero), torch.tensor(255.0 - zero)),
    )
    assert q.log_scale.grad is not None
    torch.testing.assert_close(q.log_scale.grad, (lsq.sum() * s).reshape(()), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(x.grad, inside.float())


@settings(max_examples=25, deadline=None)
@given(shape=st.sampled_from([(4, 3, 3, 3), (8, 1, 3, 3), (5, 7)]), seed=st.integers(0, 2**16))
def test_weight_quantizer_is_onnx_runtimes_symmetric_per_channel_grid(shape, seed):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    got = _WeightQuant()(w)
    scale = w.abs().flatten(1).amax(1) / 127
    s = scale.reshape((-1,) + (1,) * (w.dim() - 1))
    codes = torch.round(w / s)
    assert codes.abs().max() <= 127
    torch.testing.assert_close(got, codes * s)
    want = torch.fake_quantize_per_channel_affine(
        w, scale, torch.zeros_like(scale).int(), 0, -127, 127
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_fake_quant_model_covers_onnx_runtimes_qdq_graph(tmp_path):
    """The QAT model quantizes exactly the tensors ONNX Runtime quantizes (Lite0's Pad outputs
    share their input's range), starts from ONNX Runtime's ranges and computes what the QDQ
    graph computes."""
    torch.manual_seed(0)
    for m in (
        _randomise_bn(MobileNetV2(VisionConfig(num_classes=10, image_size=32))),
        _randomise_bn(EfficientNetLite0(VisionConfig("efficientnet_lite0", 10, image_size=32))),
    ):
        x = torch.randn(96, 3, 32, 32)
        path = quantize_static_onnx(m, tmp_path / "q.onnx", [x[:32]], image_size=32, progress=False)
        qp = activation_qparams(path)
        fq = FakeQuantVisionNet(m, qp).eval()
        assert {
            k: (float(v[0]["scale"]), int(v[0]["zero_point"])) for k, v in fq.overrides().items()
        } == qp
        test = x[32:]
        with torch.no_grad():
            got = fq(test)
        ref = predict_logits(OnnxModel(path, threads=1, optimize=False), test)
        out_scale = qp["logits"][0]
        # equal up to a few output steps (float rounding flips propagate), far below INT8's error
        assert float((got - ref).abs().max()) <= 4 * out_scale
        # the same int8 weight grid as the file's DequantizeLinear of every weight
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(path)).graph
        inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        checked = 0
        for node in graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0].endswith("weight_quantized"):
                q, s, z = (torch.from_numpy(inits[n].astype("float32")) for n in node.input[:3])
                shape = (-1,) + (1,) * (q.dim() - 1)
                w = (q - z.reshape(shape)) * s.reshape(shape)
                mine = fq.net.get_submodule(node.input[0].rsplit(".", 1)[0]).weight.detach()
                torch.testing.assert_close(mine, w, rtol=0, atol=1e-7)
                checked += 1
        assert checked == sum(isinstance(t, nn.Conv2d | nn.Linear) for t in fq.net.modules())
        plain = fq.float_model()
        torch.testing.assert_close(
            predict_logits(plain, test), predict_logits(m, test), atol=1e-4, rtol=0
        )
        with torch.no_grad():
            torch.testing.assert_close(fq(test), got)  # float_model() left the QAT model intact
    bad = dict(qp)
    bad.pop("logits")
    with pytest.raises(ValueError, match="differ"):
        FakeQuantVisionNet(m, bad)
    with pytest.raises(TypeError, match="VisionNet"):
        FakeQuantVisionNet(nn.Linear(2, 2), qp)  # type: ignore[arg-type]


def test_qat_lowers_int8_error_and_exports_the_learned_ranges(tmp_path):
    """Two bright outliers among the calibration images stretch the post-training ranges (coarse
    steps for the ordinary images); QAT on ordinary images lowers the INT8 model's KL to the
    float model, and ONNX Runtime's INT8 file carries exactly the learned ranges."""
    torch.manual_seed(0)
    m = _randomise_bn(MobileNetV2(VisionConfig(num_classes=10, image_size=32)))
    x = torch.randn(256, 3, 32, 32)
    train, test = x[:128], x[128:]
    calibration = [torch.cat([train[:30], train[30:32] * 10])]
    ptq = quantize_static_onnx(m, tmp_path / "ptq.onnx", calibration, image_size=32, progress=False)
    res = qat_quantize_onnx(
        m,
        tmp_path / "qat.onnx",
        calibration,
        QAT(steps=40, batch_size=16, lr=1e-5),
        images=train,
        progress=False,
    )
    ref = predict_logits(m, test)
    e_ptq = compare_logits(ref, predict_logits(OnnxModel(ptq, threads=1), test))
    e_qat = compare_logits(ref, predict_logits(OnnxModel(res.path, threads=1), test))
    assert e_qat.kl < 0.7 * e_ptq.kl, (e_ptq, e_qat)
    assert e_qat.agreement >= e_ptq.agreement
    # the file's ranges are the learned ones, and they moved from ONNX Runtime's calibration
    written = activation_qparams(res.path)
    learned = {
        k: (float(v[0]["scale"]), int(v[0]["zero_point"])) for k, v in res.model.overrides().items()
    }
    assert written == learned
    moved = sum(written[k] != res.initial_qparams[k] for k in written)
    assert moved > len(written) // 2
    assert activation_qparams(ptq) == res.initial_qparams


def test_qat_options_and_errors(tmp_path):
    m = _randomise_bn(MobileNetV2(VisionConfig(num_classes=10, image_size=32)))
    x = torch.randn(16, 3, 32, 32)
    for bad in ({"steps": 0}, {"batch_size": 0}, {"lr": -1.0}, {"range_lr": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            QAT(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        qat_quantize_onnx(m, tmp_path / "q.onnx", [x], QAT(steps=1, batch_size=32))
    with pytest.raises(TypeError, match="VisionNet"):
        qat_quantize_onnx(nn.Linear(2, 2), tmp_path / "q.onnx", [x])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="qat"):
        quantize_static_onnx(m, tmp_path / "q.onnx", [x], qat="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ONNX file"):
        quantize_static_onnx(tmp_path / "f.onnx", tmp_path / "q.onnx", [x], qat=2)
    # the quantize option runs the same path (steps as an int)
    path = quantize_static_onnx(
        m, tmp_path / "q.onnx", [x], image_size=32, progress=False, qat=QAT(steps=2, batch_size=8)
    )
    assert OnnxModel(path, threads=1)(x[:2]).shape == (2, 10)


def test_cli_quantize_with_qat(tmp_path, capsys):
    import json

    from slimforge.cli import main
    from slimforge.models.vision import save_vision_model

    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    folder = save_vision_model(
        _randomise_bn(MobileNetV2(VisionConfig(num_classes=10, image_size=32))), tmp_path / "m"
    )
    out = tmp_path / "q.onnx"
    args = ["vision", "quantize", "--model", str(folder), "--out", str(out), "-q"]
    args += ["--calibration", "16", "--check", "16", "--qat-steps", "2", "--qat-batch", "8"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["qat_steps"] == 2 and out.is_file() and 0 <= report["top1_agreement"] <= 1
    assert main(args[:-4] + ["--qat-steps", "-1"]) == 2
    assert "--qat-steps" in capsys.readouterr().err
    assert main(args[:-2] + ["--qat-batch", "64"]) == 2
    assert "--qat-batch" in capsys.readouterr().err
