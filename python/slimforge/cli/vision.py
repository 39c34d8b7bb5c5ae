"""``slimforge vision``: classify images with an edge CNN, prune it, quantize it to INT8, export
it to ONNX.

slimforge vision classify photo:chelsea my_photo.jpg --model efficientnet_lite0
slimforge vision prune --amount 0.3 --steps 150 --out runs/mnv2-digits-pruned
slimforge vision quantize --model mobilenet_v2 --out mnv2.int8.onnx
slimforge vision quantize --model mobilenet_v2 --out mnv2.qat.int8.onnx --qat-steps 100
slimforge vision export --model runs/mnv2-digits-pruned --out pruned.onnx
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_vision"]

_NAMES = ("mobilenet_v2", "efficientnet_lite0")
_MODEL_HELP = (
    "mobilenet_v2 or efficientnet_lite0 (ImageNet weights from the pinned assets), or a folder "
    "written by `slimforge vision prune`"
)


def add_vision(sub: argparse._SubParsersAction) -> None:
    """Registers the ``vision`` verb group on the ``slimforge`` sub-command parser."""
    p = sub.add_parser(
        "vision",
        help="edge CNNs: classify images, prune channels, INT8-quantize, export to ONNX",
        description=(
            "MobileNetV2 and EfficientNet-Lite0 with their real ImageNet weights (fetched by "
            "`make assets`). `classify` names what is in a photo; `prune` adapts a pretrained "
            "network to scikit-learn's handwritten digits, removes channels and fine-tunes it "
            "again; `quantize` writes an INT8 ONNX file run by ONNX Runtime; `export` writes a "
            "float ONNX file and checks it against PyTorch."
        ),
    )
    vs = p.add_subparsers(dest="vision_command", required=True, metavar="ACTION")

    c = vs.add_parser(
        "classify",
        help="top-k ImageNet classes of image files or bundled photos",
        description=(
            "Prints the most likely ImageNet classes of each image. IMAGE is a file PIL can "
            "read (JPEG, PNG, ...) or photo:NAME for a photo bundled with scikit-image "
            "(photo:chelsea, photo:coffee, photo:astronaut, photo:rocket, ...)."
        ),
    )
    c.add_argument("images", nargs="+", metavar="IMAGE", help="image file or photo:NAME")
    c.add_argument("--model", default="mobilenet_v2", help=_MODEL_HELP + ", or an .onnx file")
    c.add_argument("--top", type=int, default=5, help="classes to print per image (default 5)")
    c.add_argument("--json", action="store_true", help="print JSON instead of text")
    c.set_defaults(func=_run_classify)

    r = vs.add_parser(
        "prune",
        help="transfer to digits, remove expansion channels, fine-tune again",
        description=(
            "Starts from a pretrained network, replaces its classifier for the 10 digit classes "
            "of scikit-learn's digits (8x8 images resized to --image-size), fine-tunes it "
            "(--steps), removes --amount of every inverted residual's expansion channels "
            "(BatchNorm-aware) and fine-tunes the pruned network for --steps more. A folder "
            "from an earlier run is pruned and fine-tuned without the first stage. Writes "
            "OUT/model.safetensors, OUT/config.json and OUT/summary.json (accuracies, sizes)."
        ),
    )
    r.add_argument("--model", default="mobilenet_v2", help=_MODEL_HELP)
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--amount", type=float, default=0.3, help="fraction of channels to remove")
    r.add_argument(
        "--importance",
        choices=["magnitude", "activation"],
        default="magnitude",
        help="channel score: BN-folded weight norms, or weights x calibration activations",
    )
    r.add_argument("--round-to", type=int, default=8, help="kept widths a multiple of this")
    r.add_argument("--steps", type=int, default=150, help="fine-tuning steps per stage")
    r.add_argument("--batch", type=int, default=32, help="images per step")
    r.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    r.add_argument("--image-size", type=int, default=64, help="digits resized to this side")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_run_prune)

    q = vs.add_parser(
        "quantize",
        help="INT8 static quantization to an ONNX file (ONNX Runtime)",
        description=(
            "Folds BatchNorm, exports to ONNX and quantizes statically (weights int8 per "
            "channel, activations uint8 per tensor, QDQ) with activation ranges from "
            "--calibration images: random crops of the bundled photos for ImageNet models, "
            "digits for models from `vision prune`. Prints the size and the top-1 agreement "
            "and KL against the float model on --check other images. When INT8 loses too much "
            "accuracy, --qat-steps N fine-tunes the network for N steps with the INT8 rounding "
            "simulated (quantization-aware training, on the calibration images, matching the "
            "float model's outputs: no labels needed) and learns the activation ranges that "
            "ONNX Runtime then uses."
        ),
    )
    q.add_argument("--model", default="mobilenet_v2", help=_MODEL_HELP)
    q.add_argument("--out", required=True, help="output .onnx file")
    q.add_argument("--calibration", type=int, default=64, help="calibration images")
    q.add_argument(
        "--method", choices=["minmax", "percentile", "entropy"], default="minmax",
        help="how activation ranges are chosen",
    )  # fmt: skip
    q.add_argument("--check", type=int, default=128, help="held-out images for the check")
    q.add_argument(
        "--qat-steps", type=int, default=0,
        help="quantization-aware fine-tuning steps (default 0: post-training quantization only)",
    )  # fmt: skip
    q.add_argument("--qat-lr", type=float, default=1e-5, help="QAT peak learning rate")
    q.add_argument("--qat-batch", type=int, default=16, help="QAT images per step")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_run_quantize)

    e = vs.add_parser(
        "export",
        help="float ONNX file, checked against PyTorch in ONNX Runtime",
        description=(
            "Folds BatchNorm and writes an ONNX file (dynamic batch), then runs it in ONNX "
            "Runtime on a few images and prints the largest difference from PyTorch's logits."
        ),
    )
    e.add_argument("--model", default="mobilenet_v2", help=_MODEL_HELP)
    e.add_argument("--out", required=True, help="output .onnx file")
    e.set_defaults(func=_run_export)


def _load(name: str) -> Any:
    from slimforge.models import vision

    if name == "mobilenet_v2":
        return vision.mobilenet_v2()
    if name == "efficientnet_lite0":
        return vision.efficientnet_lite0()
    if Path(name).is_dir():
        return vision.load_vision_model(name)
    raise ValueError(f"--model must be one of {_NAMES} or a model folder, got {name!r}")


def _images(model: Any, n: int, seed: int) -> Any:
    """Images like the model's inputs: photo crops (ImageNet models) or digits (others)."""
    from slimforge.models import vision

    c = model.config
    if c.num_classes == 1000:
        return vision.photo_crops(n, c.image_size, seed=seed, mean=c.mean, std=c.std)
    x, _, xt, _ = vision.digits_dataset(c.image_size, mean=c.mean, std=c.std)
    pool = x if seed % 2 == 0 else xt
    if n > len(pool):
        raise ValueError(f"only {len(pool)} digit images, asked for {n}")
    return pool[:n]


def _read_image(spec: str) -> Any:
    from slimforge.models import vision

    if spec.startswith("photo:"):
        return vision.photo(spec[len("photo:") :])
    from PIL import Image

    with Image.open(spec) as im:
        return im.convert("RGB").copy()


def _run_classify(args: argparse.Namespace) -> int:
    import torch

    from slimforge.models import vision

    if args.top < 1:
        raise ValueError(f"--top must be >= 1, got {args.top}")
    if args.model.endswith(".onnx"):
        from slimforge.models.vision.onnx import OnnxModel

        model: Any = OnnxModel(args.model)
        size, mean, std = 224, vision.IMAGENET_MEAN, vision.IMAGENET_STD
        if "lite" in Path(args.model).name:
            mean = std = (0.5, 0.5, 0.5)
    else:
        model = _load(args.model)
        if model.config.num_classes != 1000:
            raise ValueError("classify names ImageNet classes: give an ImageNet model")
        size, mean, std = model.config.image_size, model.config.mean, model.config.std
    batch = torch.stack(
        [vision.preprocess(_read_image(s), size, mean=mean, std=std) for s in args.images]
    )
    results = vision.classify(model, batch, top=args.top)
    if args.json:
        out = [
            {"image": s, "top": [{"class": c, "index": i, "p": p} for c, i, p in r]}
            for s, r in zip(args.images, results, strict=True)
        ]
        print(json.dumps(out, indent=2))
        return 0
    for s, r in zip(args.images, results, strict=True):
        print(s)
        for c, i, p in r:
            print(f"  {p:6.1%}  {c} ({i})")
    return 0


def _run_prune(args: argparse.Namespace) -> int:
    from slimforge.models import vision
    from slimforge.prune import ExpansionChannels, prune_structured

    if not 0 < args.amount < 1:
        raise ValueError(f"--amount must be in (0, 1), got {args.amount}")
    for name in ("steps", "batch", "round_to"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 32:
        raise ValueError(f"--image-size must be >= 32, got {args.image_size}")
    progress = not args.quiet
    model = _load(args.model)
    c = model.config
    size = c.image_size if c.num_classes == 10 else args.image_size
    x, y, xt, yt = vision.digits_dataset(size, mean=c.mean, std=c.std)
    summary: dict[str, Any] = {"model": args.model, "amount": args.amount}
    if c.num_classes != 10:
        model.replace_classifier(10)
        model.config = model.config.replace(image_size=size)
        vision.fine_tune(model, x, y, args.steps, args.batch, args.lr, progress=progress)
    summary["accuracy_before"] = vision.evaluate_classifier(model, xt, yt)
    summary["params_before"] = vision.count_params(model)
    calib = list(x[:128].split(32)) if args.importance == "activation" else None
    res = prune_structured(
        model,
        ExpansionChannels(args.amount, importance=args.importance, round_to=args.round_to),
        calibration=calib,
    )
    summary["accuracy_pruned"] = vision.evaluate_classifier(model, xt, yt)
    vision.fine_tune(model, x, y, args.steps, args.batch, args.lr, seed=1, progress=progress)
    summary["accuracy_after"] = vision.evaluate_classifier(model, xt, yt)
    summary["params_after"] = res.params_after
    summary["channels_removed"] = res.fraction_removed
    summary["macs_after"] = vision.count_macs(model, (1, 3, size, size))
    out = vision.save_vision_model(model, args.out)
    from slimforge.io import atomic_path

    with atomic_path(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary, indent=2))
    return 0


def _run_quantize(args: argparse.Namespace) -> int:
    from slimforge.models import vision
    from slimforge.models.vision.onnx import OnnxModel, quantize_static_onnx
    from slimforge.models.vision.qat import QAT

    if args.calibration < 1 or args.check < 1:
        raise ValueError("--calibration and --check must be >= 1")
    if args.qat_steps < 0:
        raise ValueError(f"--qat-steps must be >= 0, got {args.qat_steps}")
    qat = None
    if args.qat_steps:
        if not 1 <= args.qat_batch <= args.calibration:
            raise ValueError(f"--qat-batch must be in [1, --calibration], got {args.qat_batch}")
        qat = QAT(steps=args.qat_steps, batch_size=args.qat_batch, lr=args.qat_lr)
    model = _load(args.model)
    calib = _images(model, args.calibration, seed=0)
    path = quantize_static_onnx(
        model,
        args.out,
        list(calib.split(16)),
        method=args.method,
        image_size=model.config.image_size,
        progress=not args.quiet,
        qat=qat,
    )
    check = _images(model, args.check, seed=1)
    ev = vision.compare_logits(
        vision.predict_logits(model, check), vision.predict_logits(OnnxModel(path), check)
    )
    report = {
        "out": str(path),
        "bytes": path.stat().st_size,
        "float_param_bytes": 4 * vision.count_params(model),
        "top1_agreement": ev.agreement,
        "kl": ev.kl,
        "check_images": args.check,
        "qat_steps": args.qat_steps,
    }
    print(json.dumps(report, indent=2))
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from slimforge.models import vision
    from slimforge.models.vision.onnx import OnnxModel, export_onnx

    model = _load(args.model)
    path = export_onnx(model, args.out, image_size=model.config.image_size)
    x = _images(model, 4, seed=1)
    diff = vision.compare_logits(
        vision.predict_logits(model, x), vision.predict_logits(OnnxModel(path), x)
    )
    print(
        json.dumps({"out": str(path), "bytes": path.stat().st_size, "max_abs_diff": diff.max_abs})
    )
    return 0
