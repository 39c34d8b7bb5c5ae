"""The stages of the main job (``slimforge demo``, ``slimforge pipeline``): dedup, prepare,
teacher, synth, distill, prune, quantize, evaluate, report. Each reads the outputs of the
stages before it from their manifests and writes into its own folder."""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from slimforge.pipeline.runner import Stage, StageContext

__all__ = [
    "STAGES",
    "calibration_batches",
    "dir_bytes",
    "generation_speed",
    "load_stage_model",
    "model_config_dict",
    "save_model",
    "save_quantized_model",
]

# ------------------------------------------------------------------ helpers


def dir_bytes(path: str | Path) -> int:
    """A model's size on disk: the file, or the files directly in the model folder (its
    weights and configs; training checkpoints and logs beside them do not count)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(
        f.stat().st_size
        for f in p.iterdir()
        if f.is_file() and f.suffix in (".safetensors", ".json")
    )


def _kind(model: Any) -> str:
    """The ``model`` field of ``model_config.json`` (see ``slimforge.cli.generate.load_model``)."""
    from slimforge.models import GPT, LlamaForCausalLM

    if isinstance(model, LlamaForCausalLM):
        return "llama"
    if isinstance(model, GPT):
        return "gpt-moe" if model.config.mlp == "moe" else "gpt"
    raise ValueError(f"cannot save a {type(model).__name__} as a model folder (GPT or Llama)")


def model_config_dict(model: Any) -> dict[str, Any]:
    """What ``model_config.json`` holds for ``model``."""
    return {"model": _kind(model), **model.config.to_dict()}


def save_model(model: Any, path: Path) -> Path:
    """A float GPT as ``model_config.json`` + ``model.safetensors`` (what ``slimforge
    generate`` and ``slimforge eval`` load), written atomically."""
    from safetensors.torch import save_model as save_weights

    from slimforge.io import atomic_path

    path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path / "model.safetensors") as tmp:
        save_weights(model, str(tmp))
    with atomic_path(path / "model_config.json") as tmp:
        tmp.write_text(json.dumps(model_config_dict(model), indent=1))
    return path


def save_quantized_model(model: Any, float_config: dict[str, Any], path: Path) -> Path:
    """A quantized model folder (``save_quantized``) with its float model's config."""
    import shutil

    from slimforge.quant import save_quantized

    tmp_dir = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    save_quantized(model, tmp_dir)
    (tmp_dir / "model_config.json").write_text(json.dumps(float_config, indent=1))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp_dir, path)
    return path


def load_stage_model(path: str | Path) -> Any:
    from slimforge.cli.generate import load_model

    model, _ = load_model(path)
    return model.eval()


def _tokens(path: str | Path) -> Any:
    from slimforge.data.windows import file_tokens

    return file_tokens(path)


def _val_windows(ctx: StageContext) -> Any:
    from slimforge.data.windows import spaced_windows

    ev = ctx.config.get("evaluate", {})
    seq = int(ctx.config["teacher"]["seq_len"])
    return spaced_windows(_tokens(ctx.output("prepare", "val")), seq, int(ev.get("windows", 64)))


def calibration_batches(tokens: Any, seq_len: int, n: int, seed: int, batch: int = 8) -> list[Any]:
    """``n`` batches of ``batch`` random ``seq_len`` windows of 1-D ``tokens`` (seeded), the
    calibration data of pruning and quantization."""
    import torch

    from slimforge.data.windows import random_windows

    it = random_windows(tokens, seq_len, batch, torch.Generator().manual_seed(seed))
    return [next(it) for _ in range(n)]


def _calibration(ctx: StageContext, n: int) -> list[Any]:
    seq = int(ctx.config["teacher"]["seq_len"])
    seed = int(ctx.config["run"].get("seed", 0)) + 101
    return calibration_batches(_tokens(ctx.output("prepare", "train")), seq, n, seed)


def _train_config(p: dict[str, Any], ctx: StageContext, steps: int, lr: float) -> Any:
    from slimforge.train import TrainConfig

    return TrainConfig(
        steps=steps, batch_size=int(p.get("batch", 16)),
        seq_len=int(ctx.config["teacher"]["seq_len"]), lr=lr,
        optimizer=p.get("optimizer", "adamw"), precision=p.get("precision", "fp32"),
        checkpointing=bool(p.get("checkpointing", False)), save_every=int(p.get("save_every", 50)),
        eval_windows=int(ctx.config.get("evaluate", {}).get("windows", 64)),
        seed=int(ctx.config["run"].get("seed", 0)), progress=ctx.progress, log_every=10,
    )  # fmt: skip


def _train_flops(model: Any, tokens: int, seq_len: int, forward_only: bool = False) -> float:
    """Training compute by the usual estimate: 6 x active non-embedding parameters x tokens
    (2x for a forward pass alone), plus attention scores (12 x layers x seq x width per token,
    6 x for forward only)."""
    cfg = model.config
    emb = cfg.vocab_size * cfg.hidden_size
    n = model.num_params(active=True) - emb
    attn = 12 * cfg.num_layers * seq_len * cfg.hidden_size
    if forward_only:
        return float((2 * n + attn / 2) * tokens)
    return float((6 * n + attn) * tokens)


def _losses(run_dir: Path) -> list[list[float]]:
    """``[step, training loss]`` pairs from a Trainer's metrics.jsonl (every ``log_every``)."""
    out: list[list[float]] = []
    p = run_dir / "metrics.jsonl"
    if p.is_file():
        for line in p.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if "loss" in rec and "step" in rec:
                out.append([int(rec["step"]), float(rec["loss"])])
    return out


def _fit(trainer: Any, run_dir: Path) -> Any:
    from slimforge.train.checkpoint import latest_checkpoint

    result = trainer.fit(resume=latest_checkpoint(run_dir) is not None)
    if result.interrupted:
        raise KeyboardInterrupt("interrupted: re-run the same command to resume")
    return result


def _set_threads(config: dict[str, Any]) -> None:
    import slimforge

    slimforge.set_threads(int(config["run"].get("threads", 0) or 0))


# ------------------------------------------------------------------ 1. dedup


def stage_dedup(ctx: StageContext) -> dict[str, Any]:
    import csv

    from slimforge.data import corpus_path
    from slimforge.dedup.files import dedup_files
    from slimforge.io import Record, iter_records

    p, data = ctx.params, ctx.config["data"]
    inputs = [Path(x) for x in (data.get("inputs") or [corpus_path()])]
    out = ctx.dir / "corpus.dedup.jsonl.gz"
    report = dedup_files(
        inputs, out, field=data.get("field", "text"),
        threshold=float(p.get("threshold", 0.8)), progress=ctx.progress,
    )  # fmt: skip
    ctx.log(report.summary().replace("\n", "\n  "))
    # Examples: removed documents with the document they duplicate.
    texts: list[str] = []
    for path in inputs:
        texts += [
            r.text
            for r in iter_records(path, field=data.get("field", "text"))
            if isinstance(r, Record)
        ]
    examples: list[dict[str, str]] = []
    with open(report.clusters_path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if row["kept"] == "0" and len(examples) < 3:
                i, keeper = int(row["index"]), int(row["cluster"])
                examples.append({"removed": texts[i][:160], "kept": texts[keeper][:160]})
    return {
        "outputs": {"corpus": str(out)},
        "metrics": {
            "documents": report.documents, "kept": report.kept,
            "exact_duplicates": report.exact_duplicates, "near_duplicates": report.near_duplicates,
            "input_bytes": report.input_bytes, "seconds": report.seconds, "examples": examples,
        },
    }  # fmt: skip


# ------------------------------------------------------------------ 2. prepare


def _is_held_out(record: dict[str, Any], val_works: list[str], index: int, fraction: float) -> bool:
    import zlib

    work = record.get("work")
    if work is not None and val_works:
        return any(work == w or work.startswith(w + "_") for w in val_works)
    return zlib.crc32(index.to_bytes(8, "little")) < int(fraction * 2**32)


def stage_prepare(ctx: StageContext) -> dict[str, Any]:
    import gzip

    from slimforge.data.tokens import TokenWriter

    data = ctx.config["data"]
    val_works = list(data.get("val_works") or [])
    fraction = float(data.get("val_fraction", 0.02))
    field = data.get("field", "text")
    sep = b"\n\n"
    n_train = n_val = 0
    train_texts = ctx.dir / "train_texts.jsonl"
    with (
        TokenWriter(ctx.dir / "train", 256, tokenizer="byte") as tw,
        TokenWriter(ctx.dir / "val", 256, tokenizer="byte") as vw,
        open(train_texts, "w", encoding="utf-8") as tt,
        gzip.open(ctx.output("dedup", "corpus"), "rt", encoding="utf-8") as f,
    ):
        for i, line in enumerate(f):
            rec = json.loads(line)
            raw = rec[field].encode("utf-8") + sep
            if _is_held_out(rec, val_works, i, fraction):
                # A held-out work's other editions (e.g. hamlet_gut_f) stay out of training too.
                if rec.get("work") is None or rec.get("work") in val_works:
                    vw.write(np.frombuffer(raw, np.uint8))
                    n_val += 1
            else:
                tw.write(np.frombuffer(raw, np.uint8))
                tt.write(json.dumps({"text": rec[field]}) + "\n")
                n_train += 1
    ctx.log(
        f"train {tw.count:,} bytes in {n_train:,} documents, validation {vw.count:,} in {n_val:,}"
    )
    if vw.count < 4 * int(ctx.config["teacher"]["seq_len"]):
        raise ValueError("the validation split is too small: hold out more text")
    return {
        "outputs": {"train": str(ctx.dir / "train"), "val": str(ctx.dir / "val"),
                    "train_texts": str(train_texts)},
        "metrics": {"train_bytes": tw.count, "val_bytes": vw.count,
                    "train_documents": n_train, "val_documents": n_val, "val_works": val_works},
    }  # fmt: skip


# ------------------------------------------------------------------ 3. teacher


def stage_teacher(ctx: StageContext) -> dict[str, Any]:
    import torch

    from slimforge.models import GPT, GPTConfig
    from slimforge.train import Trainer

    _set_threads(ctx.config)
    p = ctx.params
    seed = int(ctx.config["run"].get("seed", 0))
    torch.manual_seed(seed)
    cfg = GPTConfig(
        vocab_size=256, max_seq_len=int(p["seq_len"]), num_layers=int(p["layers"]),
        hidden_size=int(p["hidden"]), num_heads=int(p["heads"]),
        mlp="moe" if int(p.get("experts", 0)) > 1 else "dense",
        num_experts=max(1, int(p.get("experts", 0))), top_k=int(p.get("top_k", 2)),
        position="rope", attn_impl="flash", activation=p.get("activation", "gelu"),
    )  # fmt: skip
    model = GPT(cfg)
    run_dir = ctx.dir / "run"
    tc = _train_config(p, ctx, int(p["steps"]), float(p["lr"]))
    trainer = Trainer(model, _tokens(ctx.output("prepare", "train")), _val_windows(ctx), tc,
                      out_dir=run_dir)  # fmt: skip
    result = _fit(trainer, run_dir)
    ev = trainer.evaluate()
    save_model(model, ctx.dir / "model")
    ctx.log(f"teacher: {model.num_params():,} parameters ({model.num_params(active=True):,} "
            f"active), validation {ev.nll / math.log(2):.3f} bits/byte")  # fmt: skip
    return {
        "outputs": {"model": str(ctx.dir / "model")},
        "metrics": {
            "params": model.num_params(), "active_params": model.num_params(active=True),
            "steps": tc.steps, "tokens": result.tokens, "train_seconds": result.train_seconds,
            "flops": _train_flops(model, result.tokens, tc.seq_len),
            "val_bpb": ev.nll / math.log(2), "losses": _losses(run_dir),
            "features": {"mlp": cfg.mlp, "experts": cfg.num_experts, "top_k": cfg.top_k,
                         "attention": "tiled (slimforge.attention)", "optimizer": tc.optimizer,
                         "precision": tc.precision, "checkpointing": tc.checkpointing},
        },
    }  # fmt: skip


# ------------------------------------------------------------------ 4. synth


def stage_synth(ctx: StageContext) -> dict[str, Any]:
    import torch

    from slimforge.data.tokens import TokenWriter
    from slimforge.synth import FilterConfig, SynthConfig, prompts_from_corpus, synthesize

    _set_threads(ctx.config)
    p = ctx.params
    teacher = load_stage_model(ctx.output("teacher", "model"))
    texts = [
        json.loads(x)["text"] for x in open(ctx.output("prepare", "train_texts"), encoding="utf-8")
    ]
    seed = int(ctx.config["run"].get("seed", 0))
    prompts = prompts_from_corpus(
        texts, int(p["prompts"]), chars=int(p.get("prompt_chars", 64)), seed=seed
    )
    torch.manual_seed(seed)
    room = teacher.config.max_seq_len - max(len(x.encode("utf-8")) for x in prompts)
    max_new = min(int(p["max_new_tokens"]), room)
    if max_new < 1:
        raise ValueError("the prompts fill the teacher's context: lower synth.prompt_chars")
    if max_new < int(p["max_new_tokens"]):
        ctx.log(f"max_new_tokens {p['max_new_tokens']} -> {max_new}: the teacher's context is "
                f"{teacher.config.max_seq_len} tokens")  # fmt: skip
    sc = SynthConfig(
        max_new_tokens=max_new, temperature=float(p.get("temperature", 0.8)),
        top_p=float(p.get("top_p", 0.95)), repetition_penalty=float(p.get("repetition_penalty", 1.1)),
        batch_size=int(p.get("batch", 16)), seed=seed,
    )  # fmt: skip
    fc = FilterConfig(min_chars=int(p.get("min_chars", 64)),
                      max_repeated_ngram=float(p.get("max_repeated_ngram", 0.3)))  # fmt: skip
    out = ctx.dir / "synth.jsonl"
    report = synthesize(teacher, prompts, out, sc, fc, against=texts, progress=ctx.progress,
                        teacher_name="demo teacher")  # fmt: skip
    ctx.log(report.summary().replace("\n", "\n  "))
    kept = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    with TokenWriter(ctx.dir / "tokens", 256, tokenizer="byte") as w:
        for rec in kept:
            w.write(
                np.frombuffer((rec["prompt"] + rec["text"]).encode("utf-8") + b"\n\n", np.uint8)
            )
    samples = [{"prompt": r["prompt"], "text": r["text"][:300]} for r in kept[:2]]
    gen_tokens = report.tokens_per_s * report.seconds
    return {
        "outputs": {"jsonl": str(out), "tokens": str(ctx.dir / "tokens")},
        "metrics": {**report.to_dict(), "token_count": w.count, "samples": samples,
                    "flops": _train_flops(teacher, int(gen_tokens), max_new, True)},
    }  # fmt: skip


# ------------------------------------------------------------------ 5. distill


def _student(ctx: StageContext, p: dict[str, Any]) -> Any:
    from slimforge.models import GPT, GPTConfig

    t = ctx.config["teacher"]
    cfg = GPTConfig(
        vocab_size=256, max_seq_len=int(t["seq_len"]), num_layers=int(p["layers"]),
        hidden_size=int(p["hidden"]), num_heads=int(p["heads"]), position="rope",
        attn_impl="flash", activation=p.get("activation", "gelu"),
    )  # fmt: skip
    return GPT(cfg)


def stage_distill(ctx: StageContext) -> dict[str, Any]:
    import torch

    from slimforge.distill import DistillConfig, Distiller

    _set_threads(ctx.config)
    p = ctx.params
    torch.manual_seed(int(ctx.config["run"].get("seed", 0)) + 1)
    teacher = load_stage_model(ctx.output("teacher", "model"))
    student = _student(ctx, p)
    real = _tokens(ctx.output("prepare", "train"))
    parts = [real]
    if "synth" in ctx.upstream:
        synth = _tokens(ctx.output("synth", "tokens"))
        repeat = int(p.get("synth_repeat", 1))
        parts += [synth] * repeat
    train = torch.cat(parts)
    share = 1.0 - len(real) / len(train)
    run_dir = ctx.dir / "run"
    dc = DistillConfig(
        temperature=float(p.get("temperature", 1.0)), alpha=float(p.get("alpha", 0.5))
    )
    tc = _train_config(p, ctx, int(p["steps"]), float(p["lr"]))
    d = Distiller(student, teacher, train, _val_windows(ctx), dc, tc, out_dir=run_dir)
    result = _fit(d.trainer, run_dir)
    ev = d.trainer.evaluate()
    save_model(student, ctx.dir / "model")
    ratio = student.num_params() / teacher.num_params()
    ctx.log(f"student: {student.num_params():,} parameters ({ratio:.0%} of the teacher), "
            f"validation {ev.nll / math.log(2):.3f} bits/byte; synthetic share {share:.1%}")  # fmt: skip
    flops = _train_flops(student, result.tokens, tc.seq_len) + _train_flops(
        teacher, result.tokens, tc.seq_len, forward_only=True
    )
    return {
        "outputs": {"model": str(ctx.dir / "model")},
        "metrics": {
            "params": student.num_params(), "active_params": student.num_params(active=True),
            "teacher_params": teacher.num_params(), "param_ratio": ratio,
            "steps": tc.steps, "tokens": result.tokens, "train_seconds": result.train_seconds,
            "flops": flops, "val_bpb": ev.nll / math.log(2), "losses": _losses(run_dir),
            "synthetic_share": share, "temperature": dc.temperature, "alpha": dc.alpha,
        },
    }  # fmt: skip


# ------------------------------------------------------------------ 6. prune


def stage_prune(ctx: StageContext) -> dict[str, Any]:
    import torch

    from slimforge.distill import DistillConfig, Distiller
    from slimforge.eval import evaluate_lm
    from slimforge.prune import MLPNeurons, Wanda, make_permanent, prune_, prune_structured

    _set_threads(ctx.config)
    p = ctx.params
    torch.manual_seed(int(ctx.config["run"].get("seed", 0)) + 2)
    student = load_stage_model(ctx.output("distill", "model"))
    val = _val_windows(ctx)
    cal = _calibration(ctx, int(p.get("calibration_batches", 8)))
    before = evaluate_lm(student, val).nll / math.log(2)
    # Unstructured Wanda, measured for the report (masks do not shrink an INT4 file).
    wanda_amount = float(p.get("wanda", 0.5))
    masked = prune_(copy.deepcopy(student), Wanda(wanda_amount), cal, progress=False)
    make_permanent(masked)
    wanda_bpb = evaluate_lm(masked, val).nll / math.log(2)
    # Structured: whole MLP neurons out, a smaller dense model, then recovery by distillation.
    amount = float(p.get("mlp_neurons", 0.3))
    group = int(ctx.config.get("quantize", {}).get("group_size", 32))
    res = prune_structured(student, MLPNeurons(amount, round_to=group), cal)
    pruned_bpb = evaluate_lm(student, val).nll / math.log(2)
    teacher = load_stage_model(ctx.output("teacher", "model"))
    run_dir = ctx.dir / "run"
    tc = _train_config(
        {**ctx.config["distill"], **p}, ctx, int(p["recovery_steps"]), float(p["lr"])
    )
    d = Distiller(student, teacher, _tokens(ctx.output("prepare", "train")), val,
                  DistillConfig(temperature=1.0, alpha=0.5), tc, out_dir=run_dir)  # fmt: skip
    result = _fit(d.trainer, run_dir)
    recovered = evaluate_lm(student, val).nll / math.log(2)
    save_model(student, ctx.dir / "model")
    ctx.log(
        f"Wanda {wanda_amount:.0%}: {before:.3f} -> {wanda_bpb:.3f} bits/byte (masks, not kept)"
    )
    ctx.log(f"MLP neurons {amount:.0%}: {res.params_before:,} -> {res.params_after:,} parameters, "
            f"{before:.3f} -> {pruned_bpb:.3f} -> {recovered:.3f} bits/byte after "
            f"{tc.steps} recovery steps")  # fmt: skip
    flops = _train_flops(student, result.tokens, tc.seq_len) + _train_flops(
        teacher, result.tokens, tc.seq_len, forward_only=True
    )
    return {
        "outputs": {"model": str(ctx.dir / "model")},
        "metrics": {
            "params_before": res.params_before, "params_after": res.params_after,
            "mlp_neurons_removed": amount, "bpb_before": before, "bpb_pruned": pruned_bpb,
            "bpb_recovered": recovered, "wanda_amount": wanda_amount, "wanda_bpb": wanda_bpb,
            "recovery_steps": tc.steps, "tokens": result.tokens,
            "train_seconds": result.train_seconds, "flops": flops, "losses": _losses(run_dir),
        },
    }  # fmt: skip


# ------------------------------------------------------------------ 7. quantize


def stage_quantize(ctx: StageContext) -> dict[str, Any]:
    from slimforge.eval import evaluate_lm
    from slimforge.quant import GPTQ, quantize_

    _set_threads(ctx.config)
    p = ctx.params
    src = Path(
        ctx.output("prune", "model") if "prune" in ctx.upstream else ctx.output("distill", "model")
    )
    float_config = json.loads((src / "model_config.json").read_text())
    cal = _calibration(ctx, int(p.get("calibration_batches", 8)))
    val = _val_windows(ctx)
    outputs: dict[str, str] = {}
    metrics: dict[str, Any] = {}
    for bits in (8, 4):
        model = load_stage_model(src)
        start = time.perf_counter()
        quantize_(
            model, GPTQ(bits=bits, group_size=int(p.get("group_size", 32))), cal, progress=False
        )
        seconds = time.perf_counter() - start
        path = save_quantized_model(model, float_config, ctx.dir / f"int{bits}")
        bpb = evaluate_lm(model, val).nll / math.log(2)
        outputs[f"int{bits}"] = str(path)
        metrics[f"int{bits}"] = {"bytes": dir_bytes(path), "seconds": seconds, "val_bpb": bpb}
        ctx.log(f"GPTQ INT{bits}: {dir_bytes(path):,} bytes, {bpb:.3f} bits/byte ({seconds:.1f} s)")
    metrics["gguf"] = ("not written: GGUF export covers Llama-architecture models (slimforge "
                       "export --format gguf); the demo's GPT student is not one")  # fmt: skip
    return {"outputs": outputs, "metrics": metrics}


# ------------------------------------------------------------------ 8. evaluate


def generation_speed(model: Any, prompt: Any, new_tokens: int, repeats: int = 2) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, temperature=0.0)
        best = min(best, time.perf_counter() - start)
    return new_tokens / best


def stage_evaluate(ctx: StageContext) -> dict[str, Any]:
    import torch

    from slimforge.eval import evaluate_lm
    from slimforge.synth import ByteCodec

    _set_threads(ctx.config)
    p = ctx.params
    val = _val_windows(ctx)
    prompt_len, new = int(p.get("prompt_tokens", 32)), int(p.get("gen_tokens", 128))
    prompt = val[:1, :prompt_len]
    models = [("teacher (fp32, MoE)", ctx.output("teacher", "model")),
              ("student (distilled)", ctx.output("distill", "model"))]  # fmt: skip
    if "prune" in ctx.upstream:
        models.append(("student pruned", ctx.output("prune", "model")))
    if "quantize" in ctx.upstream:
        models += [("student INT8 (GPTQ)", ctx.output("quantize", "int8")),
                   ("student INT4 (GPTQ)", ctx.output("quantize", "int4"))]  # fmt: skip
    rows, samples = [], {}
    codec = ByteCodec()
    # Decoding one token at a time with these small models is bound by per-operation overhead,
    # which extra threads only add to: speeds are measured on `gen_threads` threads.
    gen_threads = int(p.get("gen_threads", 1))
    eval_threads = torch.get_num_threads()
    for name, path in models:
        model = load_stage_model(path)
        ev = evaluate_lm(model, val)
        float_cfg = json.loads((Path(path) / "model_config.json").read_text())
        # Parameters of the float architecture (a quantized model's packed tensors would
        # count storage words, not weights).
        from slimforge.models import GPT, GPTConfig

        fm = GPT(GPTConfig.from_dict({k: v for k, v in float_cfg.items() if k != "model"}))
        params, active = fm.num_params(), fm.num_params(active=True)
        torch.set_num_threads(gen_threads)
        try:
            speed = generation_speed(model, prompt, new)
        finally:
            torch.set_num_threads(eval_threads)
        out = model.generate(prompt, max_new_tokens=new, temperature=0.8, top_p=0.95,
                             repetition_penalty=1.1, seed=0)  # fmt: skip
        samples[name] = codec.decode(out[0, prompt_len:].tolist())
        rows.append({
            "model": name, "path": str(path), "params": int(params), "active_params": int(active),
            "bytes": dir_bytes(path), "val_bpb": ev.nll / math.log(2), "tokens_per_s": speed,
        })  # fmt: skip
        ctx.log(f"{name:22s} {rows[-1]['bytes']:>10,} bytes  {rows[-1]['val_bpb']:.3f} bits/byte  "
                f"{speed:7.1f} tokens/s")  # fmt: skip
    return {"outputs": {}, "metrics": {"rows": rows, "samples": samples,
                                       "prompt": codec.decode(prompt[0].tolist()),
                                       "threads": eval_threads,
                                       "gen_threads": gen_threads}}  # fmt: skip


# ------------------------------------------------------------------ 9. report


def stage_report(ctx: StageContext) -> dict[str, Any]:
    from slimforge.pipeline.report import write_report

    paths = write_report(ctx.dir.parent, ctx.upstream, ctx.config)
    for p in paths.values():
        ctx.log(f"wrote {p}")
    return {"outputs": {k: str(v) for k, v in paths.items()}, "metrics": {}}


STAGES = (
    Stage("dedup", stage_dedup, (), "exact and near-duplicate removal"),
    Stage("prepare", stage_prepare, ("dedup",), "byte-level token files, held-out works aside"),
    Stage("teacher", stage_teacher, ("prepare",), "train the MoE teacher"),
    Stage("synth", stage_synth, ("teacher",), "synthetic textbook set from the teacher"),
    Stage("distill", stage_distill, ("teacher",), "distil a dense student"),
    Stage("prune", stage_prune, ("distill",), "prune the student and recover"),
    Stage("quantize", stage_quantize, ("prune",), "GPTQ INT8 and INT4"),
    Stage("evaluate", stage_evaluate, ("quantize",), "every stage on held-out text"),
    Stage("report", stage_report, ("evaluate",), "report.md, report.html and plots"),
)
