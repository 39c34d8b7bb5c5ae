"""``slimforge prepare`` and ``slimforge train``: token files from documents, then a training run.

slimforge prepare corpus.jsonl.gz -o data/shakespeare              # byte-level ids
slimforge prepare docs.parquet -o data/smol --tokenizer smollm2    # SmolLM2's BPE
slimforge train --data data/shakespeare --out runs/gpt --steps 2000
slimforge train --data data/shakespeare --out runs/gpt --resume    # after an interruption
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_prepare", "add_train"]

MODELS = ("gpt", "gpt-moe", "llama")


def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prepare",
        help="turn JSONL/Parquet documents into memory-mapped token files for training",
        description=(
            "Reads documents from JSONL (plain or gzip) or Parquet files, tokenizes them "
            "(byte-level by default, or SmolLM2's BPE) and writes OUT/train.bin and OUT/val.bin "
            "with a JSON sidecar each. Documents are separated by a blank line (bytes) or the "
            "tokenizer's end-of-text id, and go to validation by a stable hash of their index. "
            "Streams the input: memory stays at one batch of documents."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=".jsonl, .jsonl.gz or .parquet")
    p.add_argument("-o", "--out", required=True, help="output directory")
    p.add_argument("--field", default="text", help="JSON field / Parquet column with the text")
    p.add_argument(
        "--tokenizer",
        default="byte",
        help="byte (UTF-8 bytes, vocabulary 256), smollm2 (from the pinned asset) or a GGUF path",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.005, help="share of documents held out (0..0.5)"
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_prepare)


def _tokenizer(name: str) -> tuple[Any, int, int | None, str]:
    """(encode_batch function, vocab size, separator id or None, label)."""
    import numpy as np

    if name == "byte":

        def as_bytes(texts: list[Any]) -> list[Any]:
            return [
                np.frombuffer(t if isinstance(t, bytes) else t.encode("utf-8"), np.uint8)
                for t in texts
            ]

        return as_bytes, 256, None, "byte"
    from slimforge.data.assets import smollm2_gguf
    from slimforge.models import ByteLevelBPETokenizer

    path = smollm2_gguf() if name == "smollm2" else Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {name!r}: not 'byte', 'smollm2' or a GGUF file")
    tok = ByteLevelBPETokenizer.from_gguf(path)

    def encode(texts: list[Any]) -> list[Any]:
        return tok.encode_batch([t.decode("utf-8") if isinstance(t, bytes) else t for t in texts])

    return encode, tok.vocab_size, tok.eos_token_id, str(name)


def run_prepare(args: argparse.Namespace) -> int:
    import zlib

    import numpy as np
    from tqdm.auto import tqdm

    from slimforge.data.tokens import TokenWriter
    from slimforge.io import iter_batches

    if not 0 <= args.val_fraction <= 0.5:
        raise ValueError(f"--val-fraction must be in [0, 0.5], got {args.val_fraction}")
    encode, vocab, sep, label = _tokenizer(args.tokenizer)
    sep_ids = np.array([sep] if sep is not None else list(b"\n\n"), dtype=np.int64)
    out = Path(args.out)
    meta = {"tokenizer": label, "sources": [str(p) for p in args.inputs]}
    cut = int(args.val_fraction * 2**32)
    index = 0
    with (
        TokenWriter(out / "train", vocab, **meta) as train,
        TokenWriter(out / "val", vocab, **meta) as val,
    ):
        bar = tqdm(desc="prepare", unit="doc", disable=args.quiet)
        for path in args.inputs:
            for batch in iter_batches(path, field=args.field):
                for ids in encode(list(batch.texts)):
                    # A stable hash of the document index decides the split.
                    to_val = zlib.crc32(index.to_bytes(8, "little")) < cut
                    (val if to_val else train).write(np.concatenate([ids, sep_ids]))
                    index += 1
                bar.update(len(batch.texts))
        bar.close()
    for name, w in (("train", train), ("val", val)):
        print(f"{out / name}.bin: {w.count:,} tokens in {w.documents:,} documents ({w.dtype})")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a language model on token files (resumable)",
        description=(
            "Trains a causal LM on OUT/train.bin made by `slimforge prepare` (validation on "
            "val.bin when present). Writes metrics.jsonl and checkpoints under --out; --resume "
            "continues from the newest checkpoint with the same result as an uninterrupted "
            "run. Ctrl-C saves a checkpoint before stopping. Under torchrun every process "
            "trains on its share of each batch."
        ),
    )
    p.add_argument("--data", required=True, help="directory with train.bin / val.bin")
    p.add_argument("--out", required=True, help="run directory (metrics, checkpoints, model)")
    p.add_argument("--model", choices=MODELS, default="gpt", help="architecture")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention")
    p.add_argument("--experts", type=int, default=8, help="gpt-moe: experts per layer")
    p.add_argument("--top-k", type=int, default=2, help="gpt-moe: experts per token")
    p.add_argument("--attn", choices=["flash", "sdpa"], default="flash")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=16, help="sequences per step and process")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--optimizer", choices=["adamw", "lamb"], default="adamw")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--checkpointing", action="store_true", help="recompute block activations")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch and slimforge threads")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def _model(args: argparse.Namespace, vocab: int) -> Any:
    from slimforge.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM

    if args.model == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3),
            num_layers=args.layers, num_heads=args.heads,
            num_kv_heads=args.kv_heads or args.heads, max_seq_len=args.seq_len,
            attn_impl=args.attn,
        )  # fmt: skip
        return LlamaForCausalLM(cfg), cfg
    cfg = GPTConfig(
        vocab_size=vocab, max_seq_len=args.seq_len, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, hidden_size=args.hidden,
        mlp="moe" if args.model == "gpt-moe" else "dense", num_experts=args.experts,
        top_k=args.top_k, attn_impl=args.attn, position="rope",
    )  # fmt: skip
    return GPT(cfg), cfg


def run_train(args: argparse.Namespace) -> int:
    import torch

    import slimforge
    from slimforge.data.tokens import TokenFile
    from slimforge.train import TrainConfig, Trainer
    from slimforge.train.distributed import init_from_env, shutdown

    slimforge.set_threads(args.threads)
    rank, world = init_from_env()
    data = Path(args.data)
    train = TokenFile(data / "train")
    val = TokenFile(data / "val") if (data / "val.json").is_file() else None
    if val is not None and len(val) < args.seq_len:
        val = None
    torch.manual_seed(args.seed)
    model, model_cfg = _model(args, train.vocab_size)
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, grad_accum=args.accum,
        lr=args.lr, optimizer=args.optimizer, precision=args.precision,
        checkpointing=args.checkpointing, eval_every=args.eval_every,
        save_every=args.save_every, seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    out = Path(args.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_config.json").write_text(
            json.dumps({"model": args.model, **model_cfg.to_dict()}, indent=1), encoding="utf-8"
        )
    trainer = Trainer(model, train, val, cfg, out_dir=out)
    result = trainer.fit(resume=args.resume)
    if rank == 0:
        ev = result.final_eval
        line = f"{len(result.losses)} steps, {result.tokens_per_s:,.0f} tokens/s"
        if result.losses:
            line += f", last loss {result.losses[-1]:.4f}"
        if ev is not None:
            line += f", validation {ev.nll:.4f} nats/token (perplexity {ev.perplexity:.2f})"
        print(line + (" (interrupted: resume with --resume)" if result.interrupted else ""))
    shutdown()
    return 130 if result.interrupted else 0
