"""``slimforge distill``, ``synth``, ``prune``, ``quantize`` and ``eval``: the pipeline's stages
as verbs over your own model folders and token files.

slimforge distill --teacher runs/gpt --data data/shakespeare --out runs/student --steps 500
slimforge synth runs/gpt --prompts-from corpus.jsonl.gz --n 200 --against corpus.jsonl.gz -o synth.jsonl
slimforge prune runs/student --method wanda --amount 0.5 --data data/shakespeare -o runs/student-w50
slimforge prune runs/student --method neurons --amount 0.3 --data data/shakespeare -o runs/student-n30
slimforge quantize runs/student --method gptq --bits 4 --data data/shakespeare -o runs/student-int4
slimforge eval runs/gpt runs/student runs/student-int4 --data data/shakespeare

MODEL is a `slimforge train` / `distill` / `prune` folder, a `quantize` folder or a llama GGUF
file; DATA a `slimforge prepare` folder (train.bin for calibration, val.bin for evaluation).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import slimforge

__all__ = ["add_distill", "add_eval", "add_prune", "add_quantize", "add_synth"]


def _data_tokens(data: str, split: str) -> Any:
    from slimforge.data.windows import file_tokens

    if not (Path(data) / f"{split}.json").is_file():
        raise FileNotFoundError(f"{data}: no {split}.bin/{split}.json (run `slimforge prepare`)")
    return file_tokens(Path(data) / split)


def _calibration(data: str, seq_len: int, batches: int, seed: int = 0) -> list[Any]:
    from slimforge.pipeline.stages import calibration_batches

    return calibration_batches(_data_tokens(data, "train"), seq_len, batches, seed)


def _max_len(model: Any) -> int:
    cfg = model.config
    return int(getattr(cfg, "max_seq_len", 0) or 256)


# ------------------------------------------------------------------ distill


def add_distill(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="train a smaller student on a teacher's soft targets (resumable)",
        description=(
            "Distils TEACHER into a student on DATA/train.bin (validation on val.bin): "
            "Hinton's loss, temperature-softened KL scaled by T^2 plus hard-label cross-entropy "
            "weighted by 1 - alpha. The student is the teacher with only some blocks "
            "(--keep-layers, DistilBERT's initialisation) or a fresh dense GPT (--layers and "
            "--hidden). Writes a model folder that `slimforge generate` and `eval` read; "
            "--resume continues a stopped run."
        ),
    )
    p.add_argument("--teacher", required=True, metavar="MODEL", help="teacher model folder or GGUF")
    p.add_argument("--data", required=True, help="`slimforge prepare` folder")
    p.add_argument("--out", required=True, help="student run folder")
    p.add_argument("--keep-layers", default=None,
                   help="every_other, a count, or block indices like 0,2,5 (default every_other)")  # fmt: skip
    p.add_argument("--layers", type=int, default=None, help="fresh dense GPT student: blocks")
    p.add_argument("--hidden", type=int, default=None, help="fresh dense GPT student: width")
    p.add_argument("--heads", type=int, default=4, help="fresh dense GPT student: heads")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the soft-target term")
    p.add_argument("--divergence", choices=["forward", "reverse", "jsd"], default="forward")
    p.add_argument("--hidden-weight", type=float, default=0.0, help="hidden-state MSE weight")
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_distill)


def _keep(text: str | None) -> Any:
    if text is None or text == "every_other":
        return "every_other"
    if "," in text:
        return [int(x) for x in text.split(",") if x.strip()]
    return int(text)


def run_distill(args: argparse.Namespace) -> int:
    import torch

    from slimforge.cli.generate import load_model
    from slimforge.distill import DistillConfig, Distiller, init_student
    from slimforge.models import GPT, GPTConfig
    from slimforge.pipeline.stages import model_config_dict, save_model
    from slimforge.train import TrainConfig

    slimforge.set_threads(args.threads)
    teacher, _ = load_model(args.teacher)
    torch.manual_seed(args.seed)
    if (args.layers is None) != (args.hidden is None):
        raise ValueError("give both --layers and --hidden for a fresh student, or neither")
    if args.layers is not None:
        if args.keep_layers is not None:
            raise ValueError("--keep-layers copies teacher blocks; --layers/--hidden build anew")
        vocab = int(teacher.config.vocab_size)
        student: Any = GPT(GPTConfig(
            vocab_size=vocab, max_seq_len=max(args.seq_len, _max_len(teacher)),
            num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
            position="rope",
        ))  # fmt: skip
    else:
        student = init_student(teacher, _keep(args.keep_layers))
    train = _data_tokens(args.data, "train")
    val = _data_tokens(args.data, "val") if (Path(args.data) / "val.json").is_file() else None
    if val is not None and len(val) < args.seq_len:
        val = None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_config.json").write_text(json.dumps(model_config_dict(student), indent=1))
    d = Distiller(
        student, teacher, train, val,
        DistillConfig(temperature=args.temperature, alpha=args.alpha,
                      divergence=args.divergence, hidden_weight=args.hidden_weight),
        TrainConfig(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr,
                    save_every=args.save_every, seed=args.seed, progress=not args.quiet),
        out_dir=out,
    )  # fmt: skip
    result = d.fit(resume=args.resume)
    if result.interrupted:
        print("interrupted: resume with --resume")
        return 130
    save_model(student, out)
    ratio = sum(p.numel() for p in student.parameters()) / sum(
        p.numel() for p in teacher.parameters()
    )
    line = f"student: {ratio:.0%} of the teacher's parameters, {len(result.losses)} steps"
    if result.final_eval is not None:
        line += f", validation {result.final_eval.nll:.4f} nats/token"
    print(line + f"; model in {out}")
    return 0


# ------------------------------------------------------------------ synth


def add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a filtered synthetic corpus with a teacher model",
        description=(
            "Generates one document per prompt with MODEL (KV-cache generation, batched), "
            "filters them (length, repeated n-grams, optional teacher-perplexity band, near "
            "duplicates within the set and against --against files) and writes the kept "
            "documents as JSONL with their prompt and sampling settings, plus a report "
            "(OUT.report.json). Prompts: openings of documents (--prompts-from) or a template "
            "(--template 'A lesson on {topic}:' --values topic=tides,verbs)."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="model folder or GGUF file")
    p.add_argument("-o", "--out", required=True, help="output .jsonl")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompts-from", nargs="+", metavar="FILE", help="JSONL/Parquet documents")
    src.add_argument("--template", action="append", help="a str.format template (repeatable)")
    p.add_argument("--values", action="append", default=[], metavar="NAME=A,B",
                   help="values of a template field (repeatable)")  # fmt: skip
    p.add_argument("--field", default="text", help="JSON field / Parquet column with the text")
    p.add_argument("--n", type=int, default=100, help="documents to generate")
    p.add_argument("--prompt-chars", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--against", nargs="*", default=[], metavar="FILE",
                   help="training documents to drop near copies of")  # fmt: skip
    p.add_argument("--min-chars", type=int, default=64)
    p.add_argument("--max-repeated-ngram", type=float, default=0.3)
    p.add_argument("--perplexity-band", default=None, metavar="LO,HI",
                   help="keep texts whose teacher perplexity lies in (LO, HI)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_synth)


def _texts(paths: list[str], field: str) -> list[str]:
    from slimforge.io import Record, iter_records

    return [
        r.text for path in paths for r in iter_records(path, field=field) if isinstance(r, Record)
    ]


def run_synth(args: argparse.Namespace) -> int:
    from slimforge.cli.generate import load_model
    from slimforge.synth import (
        ByteCodec,
        FilterConfig,
        SynthConfig,
        prompts_from_corpus,
        prompts_from_templates,
        synthesize,
    )  # fmt: skip

    slimforge.set_threads(args.threads)
    model, tokenizer = load_model(args.model)
    codec: Any = tokenizer if tokenizer is not None else ByteCodec()
    if args.prompts_from:
        prompts = prompts_from_corpus(_texts(args.prompts_from, args.field), args.n,
                                      chars=args.prompt_chars, seed=args.seed)  # fmt: skip
    else:
        fields: dict[str, list[str]] = {}
        for v in args.values:
            name, sep, vals = v.partition("=")
            if not sep:
                raise ValueError(f"--values {v!r}: expected NAME=A,B")
            fields[name] = [x for x in vals.split(",") if x]
        prompts = prompts_from_templates(args.template, fields, args.n, seed=args.seed)
    band = None
    if args.perplexity_band:
        lo, _, hi = args.perplexity_band.partition(",")
        band = (float(lo), float(hi))
    report = synthesize(
        model, prompts, args.out,
        SynthConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k,
                    repetition_penalty=args.repetition_penalty, batch_size=args.batch,
                    seed=args.seed),
        FilterConfig(min_chars=args.min_chars, max_repeated_ngram=args.max_repeated_ngram,
                     perplexity_band=band),
        codec=codec, against=_texts(args.against, args.field) if args.against else None,
        progress=not args.quiet, teacher_name=str(args.model),
    )  # fmt: skip
    print(report.summary())
    print(f"wrote {args.out} and {args.out}.report.json")
    return 0


# ------------------------------------------------------------------ prune

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt", "neurons", "heads", "blocks")


def add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model: masks (magnitude, Wanda, SparseGPT, N:M) or a smaller dense model",
        description=(
            "Unstructured methods (magnitude, wanda, sparsegpt; --amount or --nm 2:4) zero "
            "weights and save a model of the same shape (smaller only once compressed). "
            "Structured methods remove whole MLP neurons (neurons), attention heads (heads) or "
            "blocks (blocks) and save a smaller dense model that runs faster anywhere. Wanda, "
            "SparseGPT and the structured methods calibrate on DATA/train.bin."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="model folder or GGUF file")
    p.add_argument("-o", "--out", required=True, help="output model folder")
    p.add_argument("--method", choices=PRUNE_METHODS, default="wanda")
    p.add_argument("--amount", type=float, default=None, help="fraction to remove, in [0, 1)")
    p.add_argument("--nm", default=None, metavar="N:M", help="N:M sparsity, e.g. 2:4")
    p.add_argument("--data", default=None, help="`slimforge prepare` folder (calibration)")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--round-to", type=int, default=1, help="neurons: kept width multiple")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    from slimforge.cli.generate import load_model
    from slimforge.pipeline.stages import dir_bytes, save_model
    from slimforge.prune import (
        NM,
        AttentionHeads,
        Blocks,
        Magnitude,
        MLPNeurons,
        SparseGPT,
        Wanda,
        make_permanent,
        prune_,
        prune_structured,
        sparsity_report,
    )  # fmt: skip

    slimforge.set_threads(args.threads)
    model, _ = load_model(args.model)
    structured = args.method in ("neurons", "heads", "blocks")
    nm = None
    if args.nm:
        n, _, m = args.nm.partition(":")
        nm = (int(n), int(m))
        if structured:
            raise ValueError("--nm applies to magnitude, wanda and sparsegpt")
    if nm is None and args.amount is None:
        raise ValueError("give --amount (or --nm N:M)")
    cal = None
    if args.method != "magnitude":
        if args.data is None:
            raise ValueError(f"--method {args.method} calibrates: give --data")
        cal = _calibration(args.data, min(args.seq_len, _max_len(model)), args.calibration_batches)
    before = sum(p.numel() for p in model.parameters())
    if structured:
        cfg: Any = {
            "neurons": lambda: MLPNeurons(args.amount, round_to=args.round_to),
            "heads": lambda: AttentionHeads(args.amount),
            "blocks": lambda: Blocks(args.amount),
        }[args.method]()
        res = prune_structured(model, cfg, cal)
        print(f"{args.method}: removed {res.removed} of {res.total}; parameters "
              f"{res.params_before:,} -> {res.params_after:,}")  # fmt: skip
    else:
        kwargs: dict[str, Any] = {"n": nm[0], "m": nm[1]} if nm else {"amount": args.amount}
        if args.method == "magnitude":
            cfg = NM(*nm) if nm else Magnitude(args.amount)
        else:
            cfg = (Wanda if args.method == "wanda" else SparseGPT)(**kwargs)
        prune_(model, cfg, cal)
        print(f"{args.method}: {sparsity_report(model).sparsity:.1%} of the block weights are zero")
        make_permanent(model)
    save_model(model, Path(args.out))
    after = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({dir_bytes(args.out):,} bytes, {after:,} of {before:,} parameters)")
    return 0


# ------------------------------------------------------------------ quantize


def add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model's linear layers to INT8/INT4 (round-to-nearest, GPTQ or AWQ)",
        description=(
            "Quantizes MODEL's linear layers (MoE routers stay float) and saves a quantized "
            "model folder that `slimforge generate`, `eval` and `export` read. rtn needs no "
            "data; gptq and awq calibrate on DATA/train.bin."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="model folder or GGUF file")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--method", choices=["rtn", "gptq", "awq"], default="gptq")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, default=32, help="32, 64, 128, or 0 per channel")
    p.add_argument("--data", default=None, help="`slimforge prepare` folder (calibration)")
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from slimforge.cli.generate import load_model
    from slimforge.pipeline.stages import dir_bytes, model_config_dict, save_quantized_model
    from slimforge.quant import AWQ, GPTQ, Int4WeightOnly, Int8WeightOnly, quantize_

    slimforge.set_threads(args.threads)
    model, _ = load_model(args.model)
    float_config = model_config_dict(model)
    group = args.group_size or None
    cal = None
    if args.method == "rtn":
        cfg: Any = Int8WeightOnly() if args.bits == 8 else Int4WeightOnly(group_size=group)
    else:
        if args.data is None:
            raise ValueError(f"--method {args.method} calibrates: give --data")
        cal = _calibration(args.data, min(args.seq_len, _max_len(model)), args.calibration_batches)
        cfg = (GPTQ if args.method == "gptq" else AWQ)(bits=args.bits, group_size=group)
    model = quantize_(model, cfg, cal)
    save_quantized_model(model, float_config, Path(args.out))
    print(f"wrote {args.out} ({dir_bytes(args.out):,} bytes)")
    return 0


# ------------------------------------------------------------------ eval


def add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="measure models on held-out tokens: loss, perplexity, size, generation speed",
        description=(
            "For each MODEL: parameters, bytes on disk, next-token loss and perplexity on "
            "DATA/val.bin (bits per byte for byte-level data), and greedy generation tokens/s "
            "at batch 1."
        ),
    )
    p.add_argument("models", nargs="+", metavar="MODEL", help="model folders or GGUF files")
    p.add_argument("--data", required=True, help="`slimforge prepare` folder with val.bin")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--windows", type=int, default=64, help="evaluation windows")
    p.add_argument("--gen-tokens", type=int, default=64, help="0: skip the speed test")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON lines")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from slimforge.cli.generate import load_model
    from slimforge.data.tokens import TokenFile
    from slimforge.data.windows import spaced_windows
    from slimforge.eval import evaluate_lm
    from slimforge.pipeline.stages import dir_bytes, generation_speed

    slimforge.set_threads(args.threads)
    val = _data_tokens(args.data, "val")
    byte_level = TokenFile(Path(args.data) / "val").meta.get("tokenizer") == "byte"
    for path in args.models:
        model, _ = load_model(path)
        seq = min(args.seq_len, _max_len(model))
        windows = spaced_windows(val, seq, args.windows)
        ev = evaluate_lm(model, windows)
        speed = float("nan")
        if args.gen_tokens > 0:
            prompt = windows[:1, : min(16, seq // 2)]
            new = min(args.gen_tokens, _max_len(model) - prompt.shape[1])
            speed = generation_speed(model, prompt, new)
        row = {
            "model": str(path), "bytes": dir_bytes(path),
            "params": sum(p.numel() for p in model.parameters()),
            "nll": ev.nll, "perplexity": ev.perplexity, "tokens_per_s": speed,
        }  # fmt: skip
        if byte_level:
            row["bits_per_byte"] = ev.nll / math.log(2)
        if args.json:
            print(json.dumps(row))
        else:
            quality = (f"{row['bits_per_byte']:.3f} bits/byte" if byte_level
                       else f"perplexity {ev.perplexity:.2f}")  # fmt: skip
            print(f"{path}: {row['bytes']:,} bytes, {quality}, {speed:.1f} tokens/s")
    return 0
