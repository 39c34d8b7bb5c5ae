"""``slimforge lora``: fine-tune a model's LoRA adapters on your text, save them in peft's
format, optionally merge them and quantize.

slimforge lora --model runs/gpt --text notes.txt --out runs/gpt-lora
slimforge lora --model smollm2 --text kjv.txt --out runs/smol-kjv --int4 --merge rtn
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_lora"]

MERGES = ("none", "float", "rtn", "gptq")


def add_lora(sub: argparse._SubParsersAction) -> None:
    """Registers the ``lora`` verb on the ``slimforge`` sub-command parser."""
    p = sub.add_parser(
        "lora",
        help="fine-tune LoRA / QLoRA adapters on text, save them in peft's format",
        description=(
            "Loads a model (a `slimforge train` run folder, a llama GGUF file or 'smollm2'), "
            "adds LoRA adapters (on an INT4 / INT8 base with --int4 / --int8: QLoRA), trains "
            "them with the Trainer on your text (UTF-8 files, the last --val-fraction held out) "
            "or on `slimforge prepare` token files, and writes OUT/adapter (peft's "
            "adapter_config.json + adapter_model.safetensors), OUT/metrics.jsonl, checkpoints "
            "and OUT/summary.json. --merge folds the adapters in and writes OUT/merged "
            "(float, or quantized by RTN or GPTQ calibrated on the training text)."
        ),
    )
    p.add_argument("--model", required=True, help="run folder, .gguf file, or 'smollm2'")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files")
    src.add_argument("--data", metavar="DIR", help="train.bin / val.bin from `slimforge prepare`")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--tokenizer", default=None, help="byte, smollm2 or a GGUF path (default: the model's)"
    )
    p.add_argument("--layers", type=int, default=None, help="GGUF: keep the first N blocks only")
    p.add_argument("--r", type=int, default=8, help="adapter rank")
    p.add_argument("--alpha", type=float, default=None, help="scaling numerator (default: 2r)")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", default="all-linear", help="comma-separated names or all-linear")
    p.add_argument("--init", choices=["gaussian", "kaiming", "pissa"], default="gaussian")
    p.add_argument("--dora", action="store_true", help="DoRA adapters")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r)")
    base = p.add_mutually_exclusive_group()
    base.add_argument("--int4", action="store_true", help="QLoRA: INT4 round-to-nearest base")
    base.add_argument("--int8", action="store_true", help="QLoRA: INT8 round-to-nearest base")
    p.add_argument("--group-size", type=int, default=64, help="quantization group (32, 64, 128)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--checkpointing", action="store_true", help="recompute block activations")
    p.add_argument("--val-fraction", type=float, default=0.05, help="--text: held-out tail")
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--merge", choices=MERGES, default="none", help="fold the adapters in")
    p.add_argument(
        "--bits", type=int, choices=[4, 8], default=4, help="--merge rtn/gptq of a float base"
    )
    p.add_argument("--calibration-windows", type=int, default=16, help="--merge gptq")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch and slimforge threads")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_lora)


def _load_model(spec: str, layers: int | None) -> tuple[Any, str]:
    """(model in eval mode, default tokenizer name) for a run folder, GGUF file or 'smollm2'."""
    import torch

    from slimforge.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM

    if spec == "smollm2" or spec.endswith(".gguf"):
        from slimforge.data.assets import smollm2_gguf

        path = smollm2_gguf() if spec == "smollm2" else Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--model {spec}: no such GGUF file")
        return LlamaForCausalLM.from_gguf(path, num_layers=layers), str(path)
    run = Path(spec)
    cfg_path = run / "model_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--model {spec}: not a GGUF file, 'smollm2' or a run folder")
    from safetensors.torch import load_model

    from slimforge.train.checkpoint import latest_checkpoint

    data = json.loads(cfg_path.read_text(encoding="utf-8"))
    kind = data.pop("model", "gpt")
    model: torch.nn.Module
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig.from_dict(data))
    else:
        model = GPT(GPTConfig.from_dict(data))
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        raise FileNotFoundError(f"--model {spec}: no checkpoint under {run / 'checkpoints'}")
    load_model(model, str(ckpt / "model.safetensors"))
    vocab = data.get("vocab_size")
    return model.eval(), "byte" if vocab == 256 else ""


def _token_data(args: argparse.Namespace, tokenizer: str) -> tuple[Any, Any]:
    """(train tokens, held-out tokens) as 1-D int64 tensors or token files."""
    import numpy as np
    import torch

    from slimforge.cli.train import _tokenizer

    if args.data is not None:
        from slimforge.data.tokens import TokenFile

        d = Path(args.data)
        val = TokenFile(d / "val") if (d / "val.json").is_file() else None
        return TokenFile(d / "train"), val
    if not tokenizer:
        raise ValueError("--tokenizer is needed: the run folder's vocabulary is not byte-level")
    encode, _, _, _ = _tokenizer(tokenizer)
    text = "\n\n".join(Path(f).read_text(encoding="utf-8") for f in args.text)
    ids = torch.from_numpy(np.asarray(encode([text])[0], dtype=np.int64))
    cut = int(ids.numel() * (1 - args.val_fraction))
    need = 2 * args.seq_len
    if cut < need or ids.numel() - cut < args.seq_len:
        raise ValueError(
            f"the text gives {ids.numel():,} tokens: too few for --seq-len {args.seq_len} with "
            f"--val-fraction {args.val_fraction}"
        )
    return ids[:cut], ids[cut:]


def run_lora(args: argparse.Namespace) -> int:
    import torch

    import slimforge
    from slimforge.data.windows import spaced_windows
    from slimforge.lora import (
        LoraConfig,
        apply_lora,
        merge_and_unload,
        parameter_counts,
        save_adapter,
        trainable_parameters,
    )
    from slimforge.quant import GPTQ, Int4WeightOnly, Int8WeightOnly, quantize_, save_quantized
    from slimforge.train import TrainConfig, Trainer

    if not 0 < args.val_fraction < 0.5:
        raise ValueError(f"--val-fraction must be in (0, 0.5), got {args.val_fraction}")
    slimforge.set_threads(args.threads)
    targets = args.targets if args.targets == "all-linear" else tuple(args.targets.split(","))
    lora_cfg = LoraConfig(
        r=args.r, alpha=args.alpha if args.alpha is not None else 2.0 * args.r,
        dropout=args.dropout, target_modules=targets, rslora=args.rslora, use_dora=args.dora,
        init=args.init,
    )  # fmt: skip
    train_cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, grad_accum=args.accum,
        lr=args.lr, precision=args.precision, checkpointing=args.checkpointing,
        eval_windows=args.eval_windows, seed=args.seed, progress=not args.quiet,
        weight_decay=0.0,
    )  # fmt: skip
    model, default_tok = _load_model(args.model, args.layers)
    train, val = _token_data(args, args.tokenizer or default_tok)
    torch.manual_seed(args.seed)
    quantized = args.int4 or args.int8
    if quantized and args.init == "pissa":
        # QPiSSA: PiSSA on the float weights, then quantize the residual bases
        apply_lora(model, lora_cfg)
    if quantized:
        bits = 4 if args.int4 else 8
        qcfg = (
            Int4WeightOnly(group_size=args.group_size)
            if bits == 4
            else Int8WeightOnly(group_size=args.group_size)
        )
        quantize_(model, qcfg, progress=not args.quiet)
    if not (quantized and args.init == "pissa"):
        apply_lora(model, lora_cfg)
    trainable, total = parameter_counts(model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        model, train, val, train_cfg, params=trainable_parameters(model), out_dir=out / "train"
    )
    summary: dict[str, Any] = {
        "model": args.model, "base": "int4" if args.int4 else "int8" if args.int8 else "float",
        "lora": lora_cfg.to_dict(), "trainable": trainable, "total": total,
    }  # fmt: skip
    if val is not None:
        summary["eval_before"] = _eval_dict(trainer.evaluate())
    result = trainer.fit()
    save_adapter(model, out / "adapter", base_model_name_or_path=str(args.model))
    summary.update(steps=len(result.losses), tokens_per_s=result.tokens_per_s,
                   final_loss=result.losses[-1] if result.losses else None)  # fmt: skip
    if result.final_eval is not None:
        summary["eval_after"] = _eval_dict(result.final_eval)
    if args.merge != "none" and not result.interrupted:
        calibration = None
        if args.merge == "gptq":
            n = args.calibration_windows
            windows = spaced_windows(train, args.seq_len, n)
            calibration = [windows[i : i + 4] for i in range(0, n, 4)]
        if quantized:
            method = None if args.merge == "float" else args.merge
            errors = merge_and_unload(
                model, requantize=method, calibration=calibration, progress=not args.quiet
            )
        else:
            errors = merge_and_unload(model, requantize=None)
            if args.merge == "rtn":
                cfg = Int4WeightOnly(group_size=args.group_size) if args.bits == 4 else (
                    Int8WeightOnly(group_size=args.group_size))  # fmt: skip
                quantize_(model, cfg, progress=not args.quiet)
            elif args.merge == "gptq":
                gptq = GPTQ(bits=args.bits, group_size=args.group_size)
                quantize_(model, gptq, calibration=calibration, progress=not args.quiet)
        save_quantized(model, out / "merged")
        merged: dict[str, Any] = {
            "method": args.merge,
            "layers": {k: {"weight_error": e.weight_error, "delta_error": e.delta_error}
                       for k, e in errors.items()},
        }  # fmt: skip
        if val is not None:
            merged["eval"] = _eval_dict(trainer.evaluate())
        summary["merge"] = merged
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    line = f"trainable {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)"
    if "eval_after" in summary:
        before, after = summary["eval_before"]["perplexity"], summary["eval_after"]["perplexity"]
        line += f"; held-out perplexity {before:.2f} -> {after:.2f}"
    if "merge" in summary and "eval" in summary["merge"]:
        line += f"; merged ({args.merge}) {summary['merge']['eval']['perplexity']:.2f}"
    print(line)
    print(f"adapter: {out / 'adapter'}")
    return 130 if result.interrupted else 0


def _eval_dict(ev: Any) -> dict[str, float]:
    return {"nll": ev.nll, "perplexity": ev.perplexity, "tokens": ev.tokens}
