"""``slimforge generate`` and ``slimforge export``: run a causal LM, or write it as GGUF.

slimforge generate model.gguf --prompt "The capital of France is" --max-new-tokens 32
slimforge generate runs/gpt --ids 5,9,2 --temperature 0.8 --top-p 0.9 --seed 1 --stream
slimforge generate model.gguf --prompt "Hello" --quantize int4        # INT4 weights first
slimforge export model.gguf --format gguf --type q8_0 -o model-q8_0.gguf
slimforge export runs/llama --format gguf --type f16 --tokenizer smollm2.gguf -o out.gguf

MODEL is a llama-architecture GGUF file (with its tokenizer), a directory written by
`slimforge train` (``model_config.json`` and checkpoints), or a directory of
`slimforge.quant.save_quantized` with the ``model_config.json`` of its float model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["add_export", "add_generate", "load_model"]


def load_model(path: str | Path) -> tuple[Any, Any]:
    """``(model, tokenizer or None)`` from a GGUF file, a model directory (see the module
    docstring) or ``"smollm2"`` (the pinned asset); ValueError when ``path`` is none of them."""
    from slimforge.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM
    from slimforge.models.tokenizer import ByteLevelBPETokenizer

    p = Path(path)
    if str(path) == "smollm2" and not p.exists():
        from slimforge.data.assets import smollm2_gguf

        p = smollm2_gguf()  # the pinned SmolLM2-135M asset (`make assets`)
    if p.is_file():
        model = LlamaForCausalLM.from_gguf(p)
        return model, ByteLevelBPETokenizer.from_gguf(p)
    cfg_file = p / "model_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{p}: not a GGUF file nor a model directory (no model_config.json in it)")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    kind = cfg.pop("model", "gpt")
    if kind == "llama":
        model: Any = LlamaForCausalLM(LlamaConfig.from_dict(cfg))
    elif kind in ("gpt", "gpt-moe"):
        model = GPT(GPTConfig.from_dict(cfg))
    else:
        raise ValueError(f"{cfg_file}: unknown model {kind!r} (gpt, gpt-moe or llama)")
    if (p / "quant_config.json").is_file():
        from slimforge.quant import load_quantized

        model = load_quantized(model, p)
    else:
        from safetensors.torch import load_model as load_weights

        from slimforge.train.checkpoint import latest_checkpoint

        weights = p / "model.safetensors"
        if not weights.is_file():
            ckpt = latest_checkpoint(p)
            if ckpt is None:
                raise ValueError(f"{p}: no model.safetensors and no checkpoint in it")
            weights = ckpt / "model.safetensors"
        load_weights(model, str(weights), strict=True)
    return model.eval(), None


def _ids(text: str) -> list[int]:
    try:
        ids = [int(t, 10) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ids, got {text!r}") from None
    if not ids:
        raise argparse.ArgumentTypeError("expected at least one id")
    return ids


def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with a causal LM (KV-cache generation)",
        description=(
            "Continues a prompt (--prompt TEXT with the model's tokenizer, or --ids) with "
            "KV-cache generation and prints the continuation: text when the model has a "
            "tokenizer, else the new ids. MODEL: a llama GGUF file, a `slimforge train` run "
            "directory or a saved quantized model directory."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="GGUF file or model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer: a GGUF model)")
    src.add_argument("--ids", type=_ids, help="prompt token ids, comma-separated")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--stop", type=_ids, default=None, help="stop ids (default: the tokenizer's EOS)"
    )
    p.add_argument(
        "--quantize", choices=["none", "int8", "int4"], default="none",
        help="round-to-nearest weight quantization before generating (INT4: groups of 32)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=0, help="torch and slimforge threads")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.set_defaults(func=run_generate)


def _quantize(model: Any, kind: str) -> Any:
    if kind == "none":
        return model
    from slimforge.quant import Int4WeightOnly, Int8WeightOnly, quantize_

    cfg = Int8WeightOnly() if kind == "int8" else Int4WeightOnly(group_size=32)
    return quantize_(model, cfg, progress=False)


def run_generate(args: argparse.Namespace) -> int:
    import torch

    import slimforge
    from slimforge.models.generation import GenerationOutput, generate

    slimforge.set_threads(args.threads)
    model, tok = load_model(args.model)
    model = _quantize(model, args.quantize)
    if args.prompt is not None:
        if tok is None:
            raise ValueError("--prompt needs a tokenizer (a GGUF model); pass --ids instead")
        ids = tok.encode(args.prompt)
        if getattr(tok, "bos_token_id", None) is not None and (
            not ids or ids[0] != tok.bos_token_id
        ):
            ids = [tok.bos_token_id, *ids]
    else:
        ids = args.ids
    stop = args.stop
    if stop is None and tok is not None and getattr(tok, "eos_token_id", None) is not None:
        stop = [tok.eos_token_id]

    def show(t: torch.Tensor) -> None:
        i = int(t[0])
        text = tok.decode([i]) if tok is not None else f"{i} "
        sys.stdout.write(text)
        sys.stdout.flush()

    out = generate(
        model, [ids], args.max_new_tokens, args.temperature, args.top_p, args.top_k,
        args.repetition_penalty, stop, args.seed, return_dict=True,
        streamer=show if args.stream else None,
    )  # fmt: skip
    assert isinstance(out, GenerationOutput)
    new = out.new_tokens[0, : int(out.num_new[0])].tolist()
    if args.stream:
        print()
    elif tok is not None:
        print(tok.decode(new))
    else:
        print(" ".join(map(str, new)))
    return 0


def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a llama-architecture model as GGUF for llama.cpp",
        description=(
            "Writes MODEL (a llama GGUF file, a `slimforge train` run directory of a llama "
            "model, or a saved quantized llama) as a GGUF file llama.cpp loads. Weights "
            "quantized with asymmetric INT4 codes in groups of 32 map code for code onto "
            "Q4_1 (symmetric onto Q4_0, INT8 onto Q8_0); others are re-quantized, and the "
            "report says which and by how much."
        ),
    )
    p.add_argument("model", metavar="MODEL", help="GGUF file or model directory")
    p.add_argument("-o", "--output", required=True, help="the GGUF file to write")
    p.add_argument("--format", choices=["gguf"], default="gguf")
    p.add_argument("--type", choices=["q4_0", "q4_1", "q8_0", "f16", "f32"], default="q8_0")
    p.add_argument(
        "--tokenizer", default=None,
        help="GGUF file whose tokenizer metadata to copy (default: MODEL's, when a GGUF)",
    )  # fmt: skip
    p.add_argument(
        "--quantize", choices=["none", "int8", "int4"], default="none",
        help="round-to-nearest weight quantization before exporting (INT4: groups of 32)",
    )  # fmt: skip
    p.add_argument("--name", default=None, help="general.name in the file")
    p.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    from slimforge.quant.formats.gguf_writer import export_gguf

    src = Path(args.model)
    out = Path(args.output)
    if src.exists() and out.exists() and src.resolve() == out.resolve():
        raise ValueError(f"--output {out} would overwrite the input model")
    model, _ = load_model(src)
    model = _quantize(model, args.quantize)
    tokenizer = args.tokenizer or (str(src) if src.is_file() else None)
    if tokenizer is None:
        raise ValueError("pass --tokenizer GGUF: llama.cpp needs the vocabulary in the file")
    report = export_gguf(model, out, args.type, tokenizer=tokenizer, name=args.name)
    print(report.summary())
    return 0
