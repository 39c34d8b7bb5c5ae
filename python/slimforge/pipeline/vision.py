"""The demo's vision track (``slimforge demo --model mobilenet_v2``): MobileNetV2 with its real
ImageNet weights, transferred to scikit-learn's handwritten digits, channel-pruned, exported to
ONNX and quantized to INT8 for ONNX Runtime, every stage measured on held-out digits.

Stages: ``data`` (the digits at ``[data] image_size``, split into train and test), ``float``
(classifier replaced for 10 classes, fine-tuned on the Trainer), ``prune`` (expansion channels
of the inverted residuals removed, BatchNorm-aware, and a recovery fine-tune), ``quantize``
(BatchNorm folded, ONNX export, ONNX Runtime static INT8 QDQ calibrated on training images),
``evaluate`` (accuracy, agreement with the float model, parameters, multiply-adds, bytes on
disk, latency at batch 1 and ``[evaluate] batch``) and ``report`` (``report.md``,
``report.html``, PNG plots).

    from slimforge.pipeline import demo_config, run_pipeline
    run_pipeline("slimforge-demo-mobilenet_v2", demo_config("quick", "mobilenet_v2"))
"""

from __future__ import annotations

import copy
import html
import json
from pathlib import Path
from typing import Any

from slimforge.pipeline.config import MODES, merge_config
from slimforge.pipeline.runner import Stage, StageContext
from slimforge.pipeline.stages import _set_threads, dir_bytes

__all__ = ["STAGES", "track_config", "write_vision_report"]

_BASE: dict[str, Any] = {
    "run": {"threads": 0, "seed": 0, "model": "mobilenet_v2"},
    "data": {"image_size": 96, "test_fraction": 0.25},
    "float": {"steps": 150, "batch": 32, "lr": 1e-3, "weight_decay": 1e-4},
    "prune": {
        "amount": 0.3,
        "importance": "magnitude",
        "round_to": 8,
        "recovery_steps": 100,
        "batch": 32,
        "lr": 1e-3,
        "calibration_images": 128,
    },
    "quantize": {"calibration_images": 128, "calibration_batch": 32, "method": "minmax"},
    "evaluate": {"batch": 32, "repeats": 10, "batch_repeats": 5},
    "report": {},
}

_OVERRIDES: dict[str, dict[str, Any]] = {
    "quick": {
        "data": {"image_size": 32},
        "float": {"steps": 60},
        "prune": {"recovery_steps": 40, "calibration_images": 64},
        "quantize": {"calibration_images": 64},
        "evaluate": {"repeats": 3, "batch_repeats": 2},
    },
    "default": {},
    "full": {
        "data": {"image_size": 224},
        "float": {"steps": 300},
        "prune": {"recovery_steps": 200},
        "quantize": {"calibration_images": 256},
        "evaluate": {"repeats": 20, "batch_repeats": 5},
    },
}


def track_config(mode: str = "default") -> dict[str, Any]:
    """The vision track's configuration: ``quick`` (digits at 32x32, a smoke run under 90 s on
    2 cores), ``default`` (96x96, a few minutes) or ``full`` (224x224, MobileNetV2's own input
    size, longer fine-tunes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return merge_config(_BASE, _OVERRIDES[mode])


# ------------------------------------------------------------------ helpers


def _param(ctx: StageContext, key: str, kind: type, lo: float, hi: float | None = None) -> Any:
    """``ctx.params[key]`` as ``kind`` within [lo, hi]; ValueError naming ``[stage] key``."""
    value = ctx.params.get(key)
    bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
    if (
        not isinstance(value, int | float)
        or isinstance(value, bool)
        or (kind is int and not float(value).is_integer())
        or value < lo
        or (hi is not None and value > hi)
    ):
        raise ValueError(f"[{ctx.name}] {key} must be {kind.__name__} {bound}, got {value!r}")
    return kind(value)


def _seed(ctx: StageContext) -> int:
    return int(ctx.config.get("run", {}).get("seed", 0))


def _digits(ctx: StageContext, mean: Any, std: Any) -> tuple[Any, Any, Any, Any]:
    """The data stage's split as normalised RGB images: ``(train_x, train_y, test_x, test_y)``,
    images ``(n, 3, size, size)`` float32, labels int64."""
    import numpy as np
    import torch

    from slimforge.models.vision.data import _normalise

    with np.load(ctx.output("data", "dataset"), allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}

    def images(a: Any) -> Any:
        x = torch.from_numpy(a).float().div_(255.0)[:, None].repeat(1, 3, 1, 1)
        return _normalise(x, mean, std).contiguous()

    return (images(arrays["train_x"]), torch.from_numpy(arrays["train_y"]),
            images(arrays["test_x"]), torch.from_numpy(arrays["test_y"]))  # fmt: skip


def _calibration_images(train_x: Any, n: int, seed: int) -> Any:
    """``n`` training images in a seeded random order (calibration data)."""
    import torch

    order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed))
    return train_x[order[: min(n, train_x.shape[0])]]


def _training_flops(macs: int, images: int) -> float:
    """Forward and backward passes: about 3 x the forward's 2 x multiply-adds per image."""
    return 6.0 * macs * images


# ------------------------------------------------------------------ 1. data


def stage_data(ctx: StageContext) -> dict[str, Any]:
    import numpy as np

    from slimforge.io import atomic_path
    from slimforge.models.vision import digits_dataset

    size = _param(ctx, "image_size", int, 32)
    fraction = _param(ctx, "test_fraction", float, 0.01, 0.9)
    seed = _seed(ctx)
    # Unnormalised [0, 1] grey images, stored as 8-bit: each model stage normalises them for
    # its own network (ImageNet statistics for MobileNetV2).
    x, y, xt, yt = digits_dataset(size, fraction, seed, mean=(0.0,) * 3, std=(1.0,) * 3)

    def grey(a: Any) -> Any:
        return np.round(a[:, 0].numpy() * 255.0).clip(0, 255).astype(np.uint8)

    out = ctx.dir / "digits.npz"
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, train_x=grey(x), train_y=y.numpy(), test_x=grey(xt),
                            test_y=yt.numpy())  # fmt: skip
    counts = np.bincount(yt.numpy(), minlength=10).tolist()
    ctx.log(f"digits {size}x{size}: {len(y):,} training and {len(yt):,} test images "
            f"(stratified, seed {seed})")  # fmt: skip
    return {
        "outputs": {"dataset": str(out)},
        "metrics": {"image_size": size, "train_images": len(y), "test_images": len(yt),
                    "test_fraction": fraction, "seed": seed, "test_per_class": counts,
                    "source": "scikit-learn load_digits (8x8, upscaled bilinear)"},
    }  # fmt: skip


# ------------------------------------------------------------------ 2. float


def stage_float(ctx: StageContext) -> dict[str, Any]:
    import torch

    from slimforge.models.vision import (
        count_macs,
        count_params,
        evaluate_classifier,
        fine_tune,
        mobilenet_v2,
        save_vision_model,
    )

    _set_threads(ctx.config)
    steps = _param(ctx, "steps", int, 1)
    batch = _param(ctx, "batch", int, 1)
    lr = _param(ctx, "lr", float, 0.0)
    wd = _param(ctx, "weight_decay", float, 0.0)
    seed = _seed(ctx)
    torch.manual_seed(seed)
    model = mobilenet_v2()  # the pinned ImageNet weights
    c = model.config
    x, y, xt, yt = _digits(ctx, c.mean, c.std)
    size = int(x.shape[-1])
    model.replace_classifier(10)
    model.config = model.config.replace(image_size=size)
    result = fine_tune(model, x, y, steps, batch, lr, wd, seed=seed, progress=ctx.progress)
    acc = evaluate_classifier(model, xt, yt)
    path = save_vision_model(model, ctx.dir / "model")
    macs = count_macs(model, (1, 3, size, size))
    ctx.log(f"MobileNetV2 (ImageNet weights, classifier for 10 digits): {steps} steps, "
            f"test accuracy {acc:.1%}")  # fmt: skip
    return {
        "outputs": {"model": str(path)},
        "metrics": {"params": count_params(model), "macs": macs, "accuracy": acc,
                    "steps": steps, "batch": batch, "train_seconds": result.train_seconds, "losses": result.losses,
                    "flops": _training_flops(macs, steps * batch)},
    }  # fmt: skip


# ------------------------------------------------------------------ 3. prune


def stage_prune(ctx: StageContext) -> dict[str, Any]:
    import torch

    from slimforge.models.vision import (
        count_macs,
        evaluate_classifier,
        fine_tune,
        load_vision_model,
        save_vision_model,
    )
    from slimforge.prune import ExpansionChannels, prune_structured

    _set_threads(ctx.config)
    amount = _param(ctx, "amount", float, 0.0, 1.0)
    round_to = _param(ctx, "round_to", int, 1)
    steps = _param(ctx, "recovery_steps", int, 0)
    batch = _param(ctx, "batch", int, 1)
    lr = _param(ctx, "lr", float, 0.0)
    n_cal = _param(ctx, "calibration_images", int, 1)
    importance = ctx.params.get("importance", "magnitude")
    seed = _seed(ctx)
    torch.manual_seed(seed + 2)
    model = load_vision_model(ctx.output("float", "model"))
    c = model.config
    x, y, xt, yt = _digits(ctx, c.mean, c.std)
    size = int(x.shape[-1])
    widths_before = model.hidden_widths()
    macs_before = count_macs(model, (1, 3, size, size))
    before = evaluate_classifier(model, xt, yt)
    calibration = None
    if importance != "magnitude":  # activation scores ("auto" uses them when given images)
        calibration = list(_calibration_images(x, n_cal, seed + 101).split(batch))
    res = prune_structured(
        model,
        ExpansionChannels(amount, importance=importance, round_to=round_to),
        calibration=calibration,
    )
    pruned = evaluate_classifier(model, xt, yt)
    train_seconds, losses = 0.0, []
    if steps:
        result = fine_tune(model, x, y, steps, batch, lr, seed=seed + 1, progress=ctx.progress)
        train_seconds, losses = result.train_seconds, result.losses
    recovered = evaluate_classifier(model, xt, yt)
    path = save_vision_model(model, ctx.dir / "model")
    macs = count_macs(model, (1, 3, size, size))
    removed = res.removed / res.total  # of the expansions' channels (blocks without one aside)
    ctx.log(f"expansion channels -{amount:.0%} (kept widths multiples of {round_to}): "
            f"{res.params_before:,} -> {res.params_after:,} parameters, accuracy "
            f"{before:.1%} -> {pruned:.1%} -> {recovered:.1%} after {steps} recovery steps")  # fmt: skip
    return {
        "outputs": {"model": str(path)},
        "metrics": {
            "amount": amount, "importance": importance,
            "round_to": round_to, "channels_removed": removed,
            "widths_before": list(widths_before), "widths_after": list(model.hidden_widths()),
            "params_before": res.params_before, "params_after": res.params_after,
            "macs_before": macs_before, "macs_after": macs, "accuracy_before": before,
            "accuracy_pruned": pruned, "accuracy_recovered": recovered,
            "recovery_steps": steps, "train_seconds": train_seconds, "losses": losses,
            "flops": _training_flops(macs, steps * batch),
        },
    }  # fmt: skip


# ------------------------------------------------------------------ 4. quantize


def stage_quantize(ctx: StageContext) -> dict[str, Any]:
    import time

    from slimforge.models.vision import compare_logits, load_vision_model, predict_logits
    from slimforge.models.vision.onnx import OnnxModel, export_onnx, quantize_static_onnx

    _set_threads(ctx.config)
    n_cal = _param(ctx, "calibration_images", int, 1)
    cal_batch = _param(ctx, "calibration_batch", int, 1)
    method = ctx.params.get("method", "minmax")
    pruned = load_vision_model(ctx.output("prune", "model"))
    c = pruned.config
    x, _, xt, _ = _digits(ctx, c.mean, c.std)
    size = int(x.shape[-1])
    start = time.perf_counter()
    # The float model too, so the report separates what the runtime buys from what pruning
    # and INT8 buy.
    float_onnx = export_onnx(load_vision_model(ctx.output("float", "model")),
                             ctx.dir / "float.onnx", image_size=size)  # fmt: skip
    pruned_onnx = export_onnx(pruned, ctx.dir / "pruned.onnx", image_size=size)
    export_seconds = time.perf_counter() - start
    calibration = list(_calibration_images(x, n_cal, _seed(ctx) + 101).split(cal_batch))
    start = time.perf_counter()
    int8 = quantize_static_onnx(pruned_onnx, ctx.dir / "pruned.int8.onnx", calibration,
                                method=method, image_size=size, progress=ctx.progress)  # fmt: skip
    quant_seconds = time.perf_counter() - start
    probe = xt[:64]
    ref = predict_logits(pruned, probe)
    parity = compare_logits(ref, predict_logits(OnnxModel(pruned_onnx), probe))
    q = compare_logits(ref, predict_logits(OnnxModel(int8), probe))
    ctx.log(f"ONNX fp32 {pruned_onnx.stat().st_size:,} bytes (max |logit diff| from PyTorch "
            f"{parity.max_abs:.1e}), INT8 {int8.stat().st_size:,} bytes (top-1 agreement "
            f"{q.agreement:.1%} on {len(probe)} test images)")  # fmt: skip
    return {
        "outputs": {"float_onnx": str(float_onnx), "pruned_onnx": str(pruned_onnx),
                    "int8_onnx": str(int8)},
        "metrics": {"calibration_images": sum(len(b) for b in calibration), "method": method,
                    "batchnorm_folded": True, "onnx_max_abs_diff": parity.max_abs,
                    "int8_agreement_probe": q.agreement, "probe_images": len(probe),
                    "export_seconds": export_seconds, "quantize_seconds": quant_seconds,
                    "bytes": {"float_onnx": float_onnx.stat().st_size,
                              "pruned_onnx": pruned_onnx.stat().st_size,
                              "int8_onnx": int8.stat().st_size}},
    }  # fmt: skip


# ------------------------------------------------------------------ 5. evaluate


def stage_evaluate(ctx: StageContext) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from slimforge.bench import best_times
    from slimforge.models.vision import (
        compare_logits,
        count_macs,
        count_params,
        fold_batchnorm,
        load_vision_model,
        predict_logits,
    )
    from slimforge.models.vision.onnx import OnnxModel

    _set_threads(ctx.config)
    batch = _param(ctx, "batch", int, 1)
    reps1 = _param(ctx, "repeats", int, 1)
    reps_n = _param(ctx, "batch_repeats", int, 1)
    threads = int(ctx.config.get("run", {}).get("threads", 0) or 0) or torch.get_num_threads()
    torch.set_num_threads(threads)
    float_model = load_vision_model(ctx.output("float", "model"))
    pruned = load_vision_model(ctx.output("prune", "model"))
    c = float_model.config
    _, _, xt, yt = _digits(ctx, c.mean, c.std)
    size = int(xt.shape[-1])
    shape = (1, 3, size, size)
    folded = {"float": fold_batchnorm(copy.deepcopy(float_model)),
              "pruned": fold_batchnorm(copy.deepcopy(pruned))}  # fmt: skip
    q = ctx.upstream["quantize"]["outputs"]
    # (name, runtime, model, the folder or file on disk, the network it runs)
    models = [
        ("float", "PyTorch fp32", float_model, ctx.output("float", "model"), float_model),
        ("float", "ONNX Runtime fp32", OnnxModel(q["float_onnx"], threads=threads),
         q["float_onnx"], folded["float"]),
        ("pruned", "PyTorch fp32", pruned, ctx.output("prune", "model"), pruned),
        ("pruned", "ONNX Runtime fp32", OnnxModel(q["pruned_onnx"], threads=threads),
         q["pruned_onnx"], folded["pruned"]),
        ("pruned", "ONNX Runtime INT8", OnnxModel(q["int8_onnx"], threads=threads),
         q["int8_onnx"], folded["pruned"]),
    ]  # fmt: skip
    reference = predict_logits(float_model, xt)
    rows: list[dict[str, Any]] = []
    for name, runtime, model, path, net in tqdm(models, desc="accuracy", unit="model",
                                               disable=not ctx.progress):  # fmt: skip
        logits = reference if model is float_model else predict_logits(model, xt)
        cmp = compare_logits(reference, logits)
        rows.append({
            "model": f"{name}, {runtime}", "stage": name, "runtime": runtime, "path": str(path),
            "params": count_params(net), "macs": count_macs(net, shape),
            "bytes": dir_bytes(path),
            "accuracy": float((logits.argmax(-1) == yt).float().mean()),
            "agreement": cmp.agreement, "kl": cmp.kl,
        })  # fmt: skip
    # Latency: the engines take turns on the same images (a burst of load hits all alike).
    x1 = xt[:1]
    xn = xt[:batch] if len(xt) >= batch else xt[:1].repeat(batch, 1, 1, 1)

    def call(model: Any, images: Any) -> Any:
        if isinstance(model, OnnxModel):
            a = images.numpy()
            return lambda: model.run(a)
        return lambda: model(images)

    with torch.inference_mode():
        t1 = best_times({r["model"]: call(m[2], x1) for r, m in zip(rows, models, strict=True)},
                        reps1)  # fmt: skip
        tn = best_times({r["model"]: call(m[2], xn) for r, m in zip(rows, models, strict=True)},
                        reps_n)  # fmt: skip
    for r in rows:
        r["ms_b1"], r["ms_bn"] = t1[r["model"]] * 1e3, tn[r["model"]] * 1e3
        ctx.log(f"{r['model']:30s} {r['bytes']:>10,} bytes  accuracy {r['accuracy']:.1%}  "
                f"agreement {r['agreement']:.1%}  {r['ms_b1']:7.2f} ms (1)  "
                f"{r['ms_bn']:8.1f} ms ({batch})")  # fmt: skip
    return {"outputs": {}, "metrics": {"rows": rows, "threads": threads, "batch": batch,
                                       "repeats": reps1, "batch_repeats": reps_n,
                                       "test_images": len(yt), "image_size": size}}  # fmt: skip


# ------------------------------------------------------------------ 6. report


def _plots(root: Path, m: dict[str, dict[str, Any]]) -> dict[str, Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    out: dict[str, Path] = {}
    ev = m.get("evaluate", {}).get("metrics", {})
    rows = ev.get("rows", [])
    if rows:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        markers = {"PyTorch fp32": "o", "ONNX Runtime fp32": "s", "ONNX Runtime INT8": "^"}
        for r in rows:  # a legend, not labels: a model and its ONNX export nearly coincide
            ax.scatter(r["bytes"] / 1e6, r["accuracy"] * 100, s=50, label=r["model"],
                       marker=markers.get(r["runtime"], "o"), alpha=0.8)  # fmt: skip
        ax.set_xlim(left=0)
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("Size against accuracy (upper left is better)")
        fig.tight_layout()
        out["size_accuracy"] = root / "size_accuracy.png"
        fig.savefig(out["size_accuracy"], dpi=110)
        plt.close(fig)
        fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.6), sharey=True)
        names = [r["model"] for r in rows]
        for ax, key, label in ((axes[0], "ms_b1", "batch 1"),
                               (axes[1], "ms_bn", f"batch {ev.get('batch', 32)}")):  # fmt: skip
            bars = ax.barh(names, [r[key] for r in rows])
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
            ax.set_xlabel(f"ms per {label}")
            ax.margins(x=0.2)  # room for the labels
        axes[0].invert_yaxis()  # the float model on top (the y axis is shared)
        fig.suptitle(f"Latency on this CPU ({ev.get('threads', 1)} threads, lower is better)")
        fig.tight_layout()
        out["latency"] = root / "latency.png"
        fig.savefig(out["latency"], dpi=110)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for stage, label in (("float", "transfer fine-tune"), ("prune", "recovery after pruning")):
        losses = m.get(stage, {}).get("metrics", {}).get("losses") or []
        if losses:
            ax.plot(range(1, len(losses) + 1), losses, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.legend()
    ax.set_title("Fine-tuning losses")
    fig.tight_layout()
    out["losses"] = root / "losses.png"
    fig.savefig(out["losses"], dpi=110)
    plt.close(fig)
    return out


def _model_table(rows: list[dict[str, Any]], batch: int) -> list[list[str]]:
    from slimforge.pipeline.report import fmt_bytes

    if not rows:
        return []
    base = rows[0]
    out = [["model", "parameters", "multiply-adds", "on disk", "float size / size",
            "accuracy", "agreement with float", "batch 1 (ms)", "speed-up", f"batch {batch} (ms)",
            "speed-up"]]  # fmt: skip
    for r in rows:
        out.append([
            r["model"], f"{r['params']:,}", f"{r['macs'] / 1e6:.1f} M", fmt_bytes(r["bytes"]),
            f"{base['bytes'] / r['bytes']:.1f}x", f"{r['accuracy']:.1%}",
            f"{r['agreement']:.1%}", f"{r['ms_b1']:.2f}", f"{base['ms_b1'] / r['ms_b1']:.2f}x",
            f"{r['ms_bn']:.1f}", f"{base['ms_bn'] / r['ms_bn']:.2f}x",
        ])  # fmt: skip
    return out


def _stage_summary(name: str, met: dict[str, Any]) -> str:
    """One line on what a stage did, from its metrics."""
    if name == "data":
        return (f"digits at {met['image_size']}x{met['image_size']}: {met['train_images']:,} "
                f"training, {met['test_images']:,} held-out test images")  # fmt: skip
    if name == "float":
        return (f"ImageNet MobileNetV2, new 10-class head, {met['steps']} steps, "
                f"accuracy {met['accuracy']:.1%}")  # fmt: skip
    if name == "prune":
        return (f"{met['channels_removed']:.0%} of the expansion channels removed, "
                f"{met['params_before']:,} -> {met['params_after']:,} parameters, accuracy "
                f"{met['accuracy_pruned']:.1%} before and {met['accuracy_recovered']:.1%} after "
                f"{met['recovery_steps']} recovery steps")  # fmt: skip
    if name == "quantize":
        b = met["bytes"]
        return (f"BatchNorm folded, ONNX {b['pruned_onnx']:,} bytes, static INT8 QDQ "
                f"{b['int8_onnx']:,} bytes ({met['calibration_images']} calibration images)")  # fmt: skip
    if name == "evaluate":
        return f"{len(met.get('rows', []))} models on {met['test_images']} test images"
    return ""


def _stage_table(m: dict[str, dict[str, Any]], threads: int) -> list[list[str]]:
    from slimforge.pipeline.report import energy_estimate

    rows = [["stage", "wall time", "training compute", "energy (estimate)", "what it did"]]
    for name, man in m.items():
        if name == "report":
            continue
        met = man.get("metrics", {})
        sec = float(man.get("seconds", 0.0))
        flops = met.get("flops")
        try:
            text = _stage_summary(name, met)
        except (KeyError, TypeError):
            text = ""
        rows.append([name, f"{sec:.1f} s", f"{flops:.2e} FLOPs" if flops else "-",
                     f"{energy_estimate(sec, threads) * 1000:.0f} mWh", text])  # fmt: skip
    return rows


def _summary(ev: dict[str, Any]) -> str:
    rows = ev.get("rows", [])
    if len(rows) < 2:
        return "Fewer than two models were evaluated."
    f, last = rows[0], rows[-1]
    return (
        f"The final model ({last['model']}) is {f['bytes'] / last['bytes']:.1f}x smaller on "
        f"disk than the {f['model']} model, runs {f['ms_b1'] / last['ms_b1']:.2f}x as fast at "
        f"batch 1 and {f['ms_bn'] / last['ms_bn']:.2f}x at batch {ev.get('batch', 32)} on "
        f"{ev.get('threads', 1)} thread(s), and its held-out accuracy is "
        f"{last['accuracy']:.1%} against the float model's {f['accuracy']:.1%} (top-1 "
        f"agreement {last['agreement']:.1%})."
    )


def write_vision_report(
    root: Path, manifests: dict[str, dict[str, Any]], config: dict[str, Any]
) -> dict[str, Path | str]:
    """Writes ``report.md``, ``report.html`` and the plots of a vision run into ``root``;
    returns their paths and the one-sentence ``summary``."""
    from slimforge.pipeline.report import (
        WATTS_PER_THREAD,
        html_table,
        md_table,
        versions,
        write_page,
    )

    ev = manifests.get("evaluate", {}).get("metrics", {})
    threads = int(ev.get("threads", 1))
    batch = int(ev.get("batch", 32))
    model_rows = _model_table(ev.get("rows", []), batch)
    stage_rows = _stage_table(manifests, threads)
    summary = _summary(ev)
    sections: list[tuple[str, str, str]] = [
        ("What each stage bought", md_table(model_rows), html_table(model_rows)),
        ("Stages", md_table(stage_rows), html_table(stage_rows)),
    ]
    notes = (
        f"Accuracy: top-1 on the {ev.get('test_images', '?')} held-out test digits "
        f"({ev.get('image_size', '?')}x{ev.get('image_size', '?')}), which no model trained or "
        "calibrated on. Agreement: the fraction of those images whose top-1 class equals the "
        "float PyTorch model's. Parameters and multiply-adds: of the network each runtime runs "
        "(the ONNX files hold BatchNorm folded into the convolutions; INT8 stores the same "
        "weights in 8 bits). On disk: model.safetensors + config.json for PyTorch, the .onnx "
        f"file for ONNX Runtime. Latency: best of {ev.get('repeats', '?')} calls at batch 1 and "
        f"of {ev.get('batch_repeats', '?')} at batch {batch}, the models taking turns on the "
        f"same images, {threads} thread(s) for PyTorch (eager, fp32) and ONNX Runtime (CPU "
        "provider, graph optimizations on). Training compute: 6 x multiply-adds x images seen. "
        f"Energy: wall time x threads x {WATTS_PER_THREAD:.0f} W, an assumption, not a "
        "measurement."
    )
    sections.append(("How these were measured", notes, f"<p>{html.escape(notes)}</p>"))
    pr = manifests.get("prune", {}).get("metrics", {})
    if pr:
        text = (
            f"{pr['amount']:.0%} of each inverted residual's expansion channels requested "
            f"({pr['importance']} scores, BatchNorm-aware, kept widths multiples of "
            f"{pr['round_to']}): {pr['channels_removed']:.1%} removed, multiply-adds "
            f"{pr['macs_before'] / 1e6:.1f} M -> {pr['macs_after'] / 1e6:.1f} M. Accuracy "
            f"{pr['accuracy_before']:.1%} before pruning, {pr['accuracy_pruned']:.1%} right "
            f"after, {pr['accuracy_recovered']:.1%} after {pr['recovery_steps']} recovery steps."
        )
        sections.append(("Pruning", text, f"<p>{html.escape(text)}</p>"))
    qm = manifests.get("quantize", {}).get("metrics", {})
    if qm:
        text = (
            f"ONNX Runtime static quantization, QDQ format: weights int8 per output channel, "
            f"activations uint8 per tensor, {qm['method']} ranges from "
            f"{qm['calibration_images']} training images. The float ONNX file matches PyTorch "
            f"within {qm['onnx_max_abs_diff']:.1e} (largest logit difference on "
            f"{qm['probe_images']} test images)."
        )
        sections.append(("INT8 and ONNX", text, f"<p>{html.escape(text)}</p>"))
    vers = versions()
    for mod in ("onnxruntime", "onnx"):
        try:
            vers[mod] = __import__(mod).__version__
        except ImportError:
            vers[mod] = "not installed"
    command = config.get("run", {}).get("command", "slimforge demo --model mobilenet_v2")
    repro = f"{command}\n\n" + "\n".join(f"{k}: {v}" for k, v in vers.items())
    sections.append(("Reproduce", f"```\n{repro}\n```", f"<pre>{html.escape(repro)}</pre>"))
    cfg_json = json.dumps({k: v for k, v in config.items() if k != "run"}, indent=1)
    sections.append(
        ("Configuration", f"```json\n{cfg_json}\n```", f"<pre>{html.escape(cfg_json)}</pre>")
    )
    plots = _plots(root, manifests)
    paths = write_page(root, "slimforge pipeline report: MobileNetV2 on digits", summary,
                        plots, sections)  # fmt: skip
    return {**paths, "summary": summary}


def stage_report(ctx: StageContext) -> dict[str, Any]:
    out = write_vision_report(ctx.dir.parent, ctx.upstream, ctx.config)
    for k, v in out.items():
        if k != "summary":
            ctx.log(f"wrote {v}")
    return {"outputs": {k: str(v) for k, v in out.items()}, "metrics": {}}


STAGES = (
    Stage("data", stage_data, (), "scikit-learn's digits, split into train and test"),
    Stage("float", stage_float, ("data",), "MobileNetV2 (ImageNet weights) fine-tuned on digits"),
    Stage("prune", stage_prune, ("float",), "prune expansion channels and recover"),
    Stage("quantize", stage_quantize, ("prune",), "BatchNorm folded, ONNX, static INT8"),
    Stage("evaluate", stage_evaluate, ("quantize",), "accuracy, size and latency of each model"),
    Stage("report", stage_report, ("evaluate",), "report.md, report.html and plots"),
)
