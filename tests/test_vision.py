"""slimforge.models.vision: layers against plain PyTorch, the networks against torchvision and
timm on the same weights, BatchNorm folding against torch's fuse_conv_bn_eval, expansion-channel
pruning, ONNX export and INT8 in ONNX Runtime, and the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimforge.cli import main
from slimforge.models.vision import (
    PHOTOS,
    ConvBN,
    DepthwiseSeparableConv,
    EfficientNetLite0,
    InvertedResidual,
    MobileNetV2,
    VisionConfig,
    classify,
    compare_logits,
    count_macs,
    count_params,
    digits_dataset,
    efficientnet_lite0,
    evaluate_classifier,
    fine_tune,
    fold_batchnorm,
    load_torchvision_mobilenet_v2,
    load_vision_model,
    mobilenet_v2,
    photo,
    photo_crops,
    predict_logits,
    preprocess,
    save_vision_model,
)
from slimforge.prune import ExpansionChannels, prune_structured

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def vision_assets(assets):
    """The asset cache, once it holds both pinned weight wheels."""
    from slimforge.models.vision.nets import _LITE0_WHEEL, _MOBILENET_WHEEL

    for wheel in (_MOBILENET_WHEEL, _LITE0_WHEEL):
        if not (assets / wheel).is_file():
            pytest.skip(f"{assets / wheel} not fetched: run `make assets`")
    return assets


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so folding and pruning have something to get wrong."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return model.eval()


# ---------------------------------------------------------------------- layers


@given(
    cin=st.integers(1, 12),
    cout=st.integers(1, 12),
    kernel=st.sampled_from([1, 3, 5]),
    stride=st.sampled_from([1, 2]),
    size=st.integers(5, 13),
)
def test_depthwise_separable_matches_plain_convolutions(cin, cout, kernel, stride, size):
    torch.manual_seed(0)
    m = _randomise_bn(DepthwiseSeparableConv(cin, cout, kernel, stride))
    x = torch.randn(2, cin, size, size)
    d, p = m.depthwise, m.pointwise
    ref = F.conv2d(x, d.conv.weight, None, stride, kernel // 2, groups=cin)
    ref = F.batch_norm(ref, d.bn.running_mean, d.bn.running_var, d.bn.weight, d.bn.bias, eps=1e-5)
    ref = F.conv2d(ref.clamp(0, 6), p.conv.weight)
    ref = F.batch_norm(ref, p.bn.running_mean, p.bn.running_var, p.bn.weight, p.bn.bias, eps=1e-5)
    torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5)
    # weights: in * k^2 depthwise + in * out pointwise (plus 2 BatchNorm affines)
    assert count_params(m) == cin * kernel**2 + cin * cout + 2 * (cin + cout)


@given(size=st.integers(7, 30), kernel=st.sampled_from([3, 5]), stride=st.sampled_from([1, 2]))
def test_same_padding_matches_timm(size, kernel, stride):
    from timm.layers.padding import pad_same

    m = ConvBN(3, 4, kernel, stride, padding="same").eval()
    x = torch.randn(1, 3, size, size + 1)
    ref = F.conv2d(pad_same(x, [kernel, kernel], [stride, stride]), m.conv.weight, stride=stride)
    torch.testing.assert_close(m.conv(m._same_pad(x)), ref)


@given(
    cin=st.integers(1, 8),
    cout=st.integers(1, 8),
    kernel=st.sampled_from([1, 3]),
    depthwise=st.booleans(),
    seed=st.integers(0, 100),
)
def test_fold_matches_torch_fuse_conv_bn_eval(cin, cout, kernel, depthwise, seed):
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    torch.manual_seed(seed)
    groups = cin if depthwise else 1
    cout = cin if depthwise else cout
    m = _randomise_bn(ConvBN(cin, cout, kernel, groups=groups, act=False), seed)
    ref = fuse_conv_bn_eval(m.conv, m.bn)
    x = torch.randn(2, cin, 6, 6)
    before = m(x)
    m.fold()
    assert isinstance(m.bn, nn.Identity)
    torch.testing.assert_close(m.conv.weight, ref.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m.conv.bias, ref.bias, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x), before, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_whole_network_and_errors():
    torch.manual_seed(0)
    m = _randomise_bn(MobileNetV2())
    x = torch.randn(2, 3, 96, 96)
    ref = m(x)
    fold_batchnorm(m)
    assert not any(isinstance(b, nn.BatchNorm2d) for b in m.modules())
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(MobileNetV2().train())


def test_inverted_residual_structure_and_errors():
    blk = InvertedResidual(16, 16, 96, kernel=3, stride=1)
    assert blk.residual and blk.expand is not None
    assert not InvertedResidual(16, 24, 96, stride=2).residual
    std = InvertedResidual(16, 24, 96, separable=False)
    assert isinstance(std.conv, ConvBN) and std.conv.conv.groups == 1
    with pytest.raises(ValueError, match="hidden"):
        InvertedResidual(16, 16, 32, expand=False)
    with pytest.raises(ValueError, match="stride"):
        ConvBN(3, 4, 3, stride=3)
    with pytest.raises(ValueError, match="padding"):
        ConvBN(3, 4, 3, padding="valid")
    with pytest.raises(ValueError, match="arch"):
        VisionConfig(arch="resnet")
    with pytest.raises(ValueError, match="hidden"):
        VisionConfig(hidden=(1, 2))
    with pytest.raises(ValueError, match="images"):
        MobileNetV2()(torch.randn(1, 1, 32, 32))


def test_macs_match_torchvision_published_counts():
    """torchvision publishes each model's operation count in its weights' metadata."""
    tv = torchvision.models
    for ours, ref, weights in (
        (MobileNetV2(), tv.mobilenet_v2(), tv.MobileNet_V2_Weights.IMAGENET1K_V1),
        (None, tv.resnet18(), tv.ResNet18_Weights.IMAGENET1K_V1),
    ):
        macs = count_macs(ref)
        assert macs / 1e9 == pytest.approx(weights.meta["_ops"], abs=1e-3)
        if ours is not None:
            assert count_macs(ours) == macs
            assert count_params(ours) == weights.meta["num_params"]
    # the standard-convolution variant: each depthwise + pointwise pair becomes one k x k conv
    std = MobileNetV2(VisionConfig(separable=False))
    sep = MobileNetV2()
    extra = sum(o * h * k * k - (h * k * k + h * o) for (_, o, h, _, k) in sep.config.layout())
    bn_removed = sum(2 * h for (_, _, h, _, _) in sep.config.layout())
    assert count_params(std) - count_params(sep) == extra - bn_removed


# ---------------------------------------------------------------------- against peers


def test_mobilenet_v2_matches_torchvision_on_the_same_weights():
    torch.manual_seed(0)
    tv = _randomise_bn(torchvision.models.mobilenet_v2())
    ours = load_torchvision_mobilenet_v2(MobileNetV2(), tv.state_dict()).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        load_torchvision_mobilenet_v2(MobileNetV2(), {"x": torch.zeros(1)})


def _timm_lite0_keys() -> dict[str, str]:
    """slimforge name -> timm ``tf_efficientnet_lite0`` name."""
    m = {"stem.conv.weight": "conv_stem.weight"}
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    m.update({f"stem.bn.{k}": f"bn1.{k}" for k in bn})
    stages = [1, 2, 2, 3, 3, 4, 1]
    flat = [(s, j) for s, n in enumerate(stages) for j in range(n)]
    for i, (s, j) in enumerate(flat):
        t, b = f"blocks.{s}.{j}", f"blocks.{i}"
        if i == 0:
            parts = [("conv.depthwise", "conv_dw", "bn1"), ("conv.pointwise", "conv_pw", "bn2")]
        else:
            parts = [
                ("expand", "conv_pw", "bn1"),
                ("conv.depthwise", "conv_dw", "bn2"),
                ("conv.pointwise", "conv_pwl", "bn3"),
            ]
        for ours, conv, norm in parts:
            m[f"{b}.{ours}.conv.weight"] = f"{t}.{conv}.weight"
            m.update({f"{b}.{ours}.bn.{k}": f"{t}.{norm}.{k}" for k in bn})
    m["head.conv.weight"] = "conv_head.weight"
    m.update({f"head.bn.{k}": f"bn2.{k}" for k in bn})
    m["classifier.weight"], m["classifier.bias"] = "classifier.weight", "classifier.bias"
    return m


def test_efficientnet_lite0_matches_timm_on_the_same_weights():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = _randomise_bn(timm.create_model("tf_efficientnet_lite0", pretrained=False))
    ours = EfficientNetLite0().eval()
    sd = ref.state_dict()
    ours.load_state_dict({k: sd[v] for k, v in _timm_lite0_keys().items()}, strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_preprocess_matches_torchvision_transforms():
    from torchvision import transforms as T

    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 300, 451, generator=g)
    ref = T.Compose(
        [
            T.Resize(256, antialias=True),
            T.CenterCrop(224),
            T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ]
    )(img)
    torch.testing.assert_close(preprocess(img), ref, rtol=0, atol=1e-5)
    arr = (img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    assert preprocess(arr).shape == (3, 224, 224)
    assert preprocess(arr[:, :, 0]).shape == (3, 224, 224)
    with pytest.raises(ValueError, match="image"):
        preprocess(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(TypeError, match="image"):
        preprocess([1, 2, 3])
    with pytest.raises(ValueError, match="size"):
        preprocess(img, size=0)


# ---------------------------------------------------------------------- pruning


@settings(max_examples=3)
@given(amount=st.sampled_from([0.1, 0.25, 0.5]), round_to=st.sampled_from([1, 8]))
def test_expansion_pruning_removes_dead_channels_exactly(amount, round_to):
    """Channels whose whole group is zero must be the ones removed, and the output is kept."""
    torch.manual_seed(0)
    m = _randomise_bn(MobileNetV2(VisionConfig(num_classes=10, image_size=64)))
    sp = m.conv_spec()
    keeps = {}
    with torch.no_grad():
        for i, e, d, p in sp.expansions(m):
            h = e.conv.out_channels
            keep = h - round(amount * h)
            keep = min(h, max(round_to, -(-keep // round_to) * round_to))
            dead = torch.randperm(h)[: h - keep]
            e.conv.weight[dead] = 0
            d.conv.weight[dead] = 0
            p.conv.weight[:, dead] = 0
            keeps[f"blocks.{i}.expand"] = keep
    x = torch.randn(2, 3, 64, 64)
    ref = m(x)
    res = prune_structured(m, ExpansionChannels(amount, round_to=round_to))
    assert {k: len(v) for k, v in res.kept.items()} == keeps
    torch.testing.assert_close(m(x), ref, rtol=1e-4, atol=1e-4)
    assert m.config.hidden == m.hidden_widths()
    assert res.params_after < res.params_before


def test_expansion_pruning_bn_aware_and_activation_scores():
    torch.manual_seed(0)
    m = _randomise_bn(MobileNetV2(VisionConfig(num_classes=10, image_size=64)))
    i, e, d, p = m.conv_spec().expansions(m)[3]
    # a channel the expansion's BatchNorm scales to ~0 is worth nothing: magnitude must drop it
    with torch.no_grad():
        e.bn.weight[5] = 1e-6
        d.bn.weight[5] = 1e-6
        p.conv.weight[:, 5] *= 1e-6
    h = e.conv.out_channels
    res = prune_structured(m, ExpansionChannels(0.1))
    assert 5 not in res.kept[f"blocks.{i}.expand"] and len(res.kept[f"blocks.{i}.expand"]) < h
    # activation importance: ||W_proj[:, j]|| * ||X_j|| from the calibration images
    torch.manual_seed(1)
    m = _randomise_bn(MobileNetV2(VisionConfig(num_classes=10, image_size=64)))
    x = torch.randn(4, 3, 64, 64)
    seen = {}
    i, e, d, p = m.conv_spec().expansions(m)[2]
    hk = p.conv.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        m(x)
    hk.remove()
    score = p.conv.weight.detach().flatten(1).norm(dim=0) * seen["x"].square().sum((0, 2, 3)).sqrt()
    h = e.conv.out_channels
    res = prune_structured(m, ExpansionChannels(0.25, importance="activation"), calibration=[x])
    kept = torch.tensor(res.kept[f"blocks.{i}.expand"])
    removed = torch.tensor(sorted(set(range(h)) - set(kept.tolist())))
    assert len(kept) == h - round(0.25 * h)
    # the kept channels are a top-k set of the reference score (ties may go either way)
    assert float(score[kept].min()) >= float(score[removed].max()) * (1 - 1e-5)
    assert float(score[kept].sum()) > float(score[removed].sum())


def test_pruned_model_saves_loads_and_folds(tmp_path):
    torch.manual_seed(0)
    m = _randomise_bn(MobileNetV2(VisionConfig(num_classes=10, image_size=64)))
    prune_structured(m, ExpansionChannels(0.3, round_to=8))
    x = torch.randn(2, 3, 64, 64)
    save_vision_model(m, tmp_path / "a")
    back = load_vision_model(tmp_path / "a")
    assert back.config.hidden == m.hidden_widths()
    torch.testing.assert_close(back(x), m(x))
    fold_batchnorm(m)
    save_vision_model(m, tmp_path / "b")
    torch.testing.assert_close(load_vision_model(tmp_path / "b")(x), back(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="removes no channel"):
        prune_structured(MobileNetV2(), ExpansionChannels(0.001))
    with pytest.raises(ValueError, match="CNN spec"):
        prune_structured(nn.Sequential(nn.Conv2d(3, 3, 1)), ExpansionChannels(0.3))
    with pytest.raises(ValueError, match="calibration"):
        prune_structured(MobileNetV2(), ExpansionChannels(0.3, importance="activation"))


def test_fine_tune_on_digits_beats_chance_and_stays_finite():
    """Transfer to digits through the Trainer, on a small classifier made of the same blocks:
    judged against chance and against itself before training."""
    x, y, xt, yt = digits_dataset(16)
    assert x.shape[1:] == (3, 16, 16) and set(y.tolist()) == set(range(10))
    torch.manual_seed(0)
    m = nn.Sequential(
        ConvBN(3, 16, 3, 1),
        DepthwiseSeparableConv(16, 32, 3, 2, pointwise_act=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    before = evaluate_classifier(m, xt, yt)
    res = fine_tune(m, x, y, steps=80, batch_size=32, lr=1e-2, progress=False)
    assert len(res.losses) == 80 and all(np.isfinite(res.losses))
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    after = evaluate_classifier(m, xt, yt)
    assert after > max(before, 0.1) + 0.2
    with pytest.raises(ValueError, match="labels"):
        fine_tune(m, x, y[:3], steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        fine_tune(m, x, y, steps=1, batch_size=0)


# ---------------------------------------------------------------------- ONNX


def test_onnx_export_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimforge.models.vision.onnx import OnnxModel, export_onnx

    torch.manual_seed(0)
    for m in (
        _randomise_bn(MobileNetV2(VisionConfig(num_classes=10, image_size=64))),
        _randomise_bn(EfficientNetLite0(VisionConfig("efficientnet_lite0", 10, image_size=64))),
    ):
        path = export_onnx(m, tmp_path / "m.onnx", image_size=64)
        x = torch.randn(3, 3, 64, 64)
        got = OnnxModel(path, threads=1)(x)
        torch.testing.assert_close(got, m(x).detach(), rtol=0, atol=1e-4)
        assert isinstance(m.stem.bn, nn.BatchNorm2d)  # exported a folded copy
    with pytest.raises(ValueError, match="images"):
        OnnxModel(path)(np.zeros((1, 1, 64, 64), np.float32))
    with pytest.raises(ValueError, match="threads"):
        OnnxModel(path, threads=-1)


def test_int8_qdq_fused_kernels_agree_with_op_by_op_reference(tmp_path):
    """INT8 through ONNX Runtime: the fused integer kernels against the same QDQ graph run op by
    op (the reference semantics), and the INT8 model against the float one."""
    pytest.importorskip("onnxruntime")
    from slimforge.models.vision.onnx import OnnxModel, quantize_static_onnx

    torch.manual_seed(0)
    m = _randomise_bn(MobileNetV2(VisionConfig(num_classes=10, image_size=32)))
    x = torch.randn(192, 3, 32, 32)
    path = quantize_static_onnx(m, tmp_path / "q.onnx", list(x[:64].split(32)), image_size=32)
    test = x[64:]
    fused = predict_logits(OnnxModel(path, threads=1), test)
    reference = predict_logits(OnnxModel(path, threads=1, optimize=False), test)
    ref_float = predict_logits(m, test)
    assert compare_logits(reference, fused).agreement >= 0.95
    # the quantization error is small next to the logits' own spread
    err = (fused - ref_float).pow(2).mean().sqrt()
    assert float(err) < 0.2 * float(ref_float.std())
    assert path.stat().st_size < 0.4 * 4 * count_params(m)
    with pytest.raises(ValueError, match="method"):
        quantize_static_onnx(m, tmp_path / "r.onnx", [x[:8]], method="mse")
    with pytest.raises(ValueError, match="calibration batch"):
        quantize_static_onnx(m, tmp_path / "r.onnx", [x[:8, 0]])


# ---------------------------------------------------------------------- real weights


@pytest.mark.assets
def test_real_weights_classify_bundled_photos_and_match_torchvision(vision_assets):
    assets = vision_assets
    pytest.importorskip("skimage")
    from slimforge.models.vision.nets import _MOBILENET_MEMBER, _MOBILENET_WHEEL, _read_state_dict

    ours = mobilenet_v2(assets=assets)
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(_read_state_dict(_MOBILENET_WHEEL, _MOBILENET_MEMBER, assets))
    tv.eval()
    names = ["chelsea", "coffee"]
    x = torch.stack([preprocess(photo(n)) for n in names])
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=1e-4)
    lite = efficientnet_lite0(assets=assets)
    xl = torch.stack(
        [preprocess(photo(n), mean=lite.config.mean, std=lite.config.std) for n in names]
    )
    for model, batch in ((ours, x), (lite, xl)):
        for name, top in zip(names, classify(model, batch, top=1), strict=True):
            assert top[0][1] in PHOTOS[name], (type(model).__name__, name, top)


@pytest.mark.assets
@pytest.mark.slow
def test_real_mobilenet_int8_and_onnx(vision_assets, tmp_path):
    assets = vision_assets
    pytest.importorskip("onnxruntime")
    pytest.importorskip("skimage")
    from slimforge.models.vision.onnx import OnnxModel, export_onnx, quantize_static_onnx

    m = mobilenet_v2(assets=assets)
    crops = photo_crops(16, seed=1)
    ref = predict_logits(m, crops)
    f = export_onnx(m, tmp_path / "f.onnx")
    torch.testing.assert_close(predict_logits(OnnxModel(f), crops), ref, rtol=0, atol=1e-4)
    q = quantize_static_onnx(f, tmp_path / "q.onnx", [photo_crops(16, seed=2)], progress=False)
    ev = compare_logits(ref, predict_logits(OnnxModel(q), crops))
    # INT8 is not the float model, but it is far closer to it than to a different network
    other = compare_logits(ref, predict_logits(efficientnet_lite0(assets=assets), crops))
    assert ev.kl < other.kl / 3 and ev.agreement > other.agreement
    assert q.stat().st_size < 0.35 * f.stat().st_size


# ---------------------------------------------------------------------- command line


def test_cli_help_and_user_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["vision", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(a in out for a in ("classify", "prune", "quantize", "export"))
    for action in ("classify", "prune", "quantize", "export"):
        with pytest.raises(SystemExit) as e:
            main(["vision", action, "--help"])
        assert e.value.code == 0
    assert main(["vision", "prune", "--out", "x", "--amount", "1.5"]) == 2
    assert "--amount" in capsys.readouterr().err
    assert main(["vision", "export", "--model", "resnet", "--out", "x.onnx"]) == 2
    assert main(["vision", "classify", "photo:nothing"]) == 2


@pytest.mark.assets
def test_cli_classify_and_export(vision_assets, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SLIMFORGE_ASSETS", str(vision_assets))
    pytest.importorskip("skimage")
    assert main(["vision", "classify", "photo:chelsea", "--top", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["top"][0]["index"] in PHOTOS["chelsea"]
    assert main(["vision", "export", "--out", str(tmp_path / "m.onnx")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["max_abs_diff"] < 1e-4
