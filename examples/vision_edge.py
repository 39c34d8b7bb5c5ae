"""MobileNetV2 with torchvision's ImageNet weights, taken to the edge: classify a photo, quantize
to INT8 for ONNX Runtime, prune 30 % of the expansion channels after a transfer to digits.

Needs the pinned assets (`make assets`) and the `vision` extra.

    python examples/vision_edge.py [--quick]
"""

import argparse
import importlib.util
import tempfile
from pathlib import Path

from slimforge.models.vision import (
    classify,
    compare_logits,
    digits_dataset,
    evaluate_classifier,
    fine_tune,
    mobilenet_v2,
    photo,
    photo_crops,
    predict_logits,
    preprocess,
)
from slimforge.models.vision.onnx import OnnxModel, quantize_static_onnx
from slimforge.prune import ExpansionChannels, prune_structured

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--quick", action="store_true", help="fewer images and steps")
args = p.parse_args()
crops, steps = (32, 20) if args.quick else (256, 150)

missing = [m for m in ("onnxruntime", "skimage", "sklearn") if not importlib.util.find_spec(m)]
if missing:
    raise SystemExit(print(f"needs pip install 'slimforge[vision]' ({', '.join(missing)} missing)"))
try:
    model = mobilenet_v2()
except FileNotFoundError as e:  # the message says how to fetch the pinned weights
    raise SystemExit(print(f"MobileNetV2 weights not found: {e}")) from None
name, index, prob = classify(model, preprocess(photo("chelsea"))[None], top=1)[0][0]
print(f"chelsea: {name} ({index}) {prob:.0%}")

with tempfile.TemporaryDirectory() as tmp:
    int8 = quantize_static_onnx(model, Path(tmp) / "mnv2.int8.onnx", [photo_crops(32, seed=2)])
    x = photo_crops(crops, seed=1)
    ev = compare_logits(predict_logits(model, x), predict_logits(OnnxModel(int8), x))
    print(f"INT8 agreement {ev.agreement:.1%} KL {ev.kl:.3f} on {crops} crops, "
          f"{int8.stat().st_size / 1e6:.1f} MB")  # fmt: skip

x, y, xt, yt = digits_dataset(64)
model.replace_classifier(10)
fine_tune(model, x, y, steps=steps, progress=False)
before = evaluate_classifier(model, xt, yt)
result = prune_structured(model, ExpansionChannels(0.3))
fine_tune(model, x, y, steps=steps, seed=1, progress=False)
print(f"digits accuracy {before:.1%} -> pruned {evaluate_classifier(model, xt, yt):.1%}, "
      f"{result.params_before:,} -> {result.params_after:,} parameters")  # fmt: skip
