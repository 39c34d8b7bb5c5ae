"""Dense vs MoE byte-level LM on the bundled Shakespeare corpus, same active parameters per token.

    PYTHONPATH=python python benches/python/moe_lm.py [--quick] [--steps N] [--threads N] [--json F]

Both models are nanoGPT-style decoders (`slimforge.models.GPT`) of the same shape; the dense MLP
has width 4 * hidden_size, the MoE MLP has `num_experts` experts of width 4 * hidden_size / top_k
with top_k of them per token, so each token uses the same number of MLP parameters. Both are
trained by `slimforge.train.Trainer` (AdamW, warm-up + cosine, same seed, so the same batches)
on `slimforge.data.lm_splits()` for the same number of tokens; the script prints the validation
cross-entropy (and bits per byte) along the way, evaluated by `slimforge.eval` on the same evenly
spaced held-out windows, and the training throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from slimforge.data import lm_splits
from slimforge.data.windows import byte_tokens
from slimforge.models import GPT, GPTConfig
from slimforge.train import TrainConfig, Trainer


def train(config: GPTConfig, train_data: torch.Tensor, val_data: torch.Tensor, args) -> dict:  # type: ignore[no-untyped-def]
    torch.manual_seed(args.seed)
    model = GPT(config)
    tc = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        seq_len=config.max_seq_len,
        lr=args.lr,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    result = Trainer(model, train_data, val_data, tc).fit()
    curve = []
    for step, ev in result.evals:
        curve.append((step, step * args.batch * config.max_seq_len, ev.nll))
        print(
            f"  {config.mlp:<5} step {step:5d}  val CE {ev.nll:.4f} ({ev.bits_per_token:.3f} bpb)"
        )
    return {
        "mlp": config.mlp,
        "params": model.num_params(),
        "active_params": model.num_params(active=True),
        "curve": curve,
        "final_val": curve[-1][2],
        "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny run, under a minute")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the curves here")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        shape = {"num_layers": 2, "num_heads": 2, "hidden_size": 64, "max_seq_len": 64}
        args.steps = args.steps or 40
        args.eval_every, args.eval_windows = 20, 32
    else:
        shape = {"num_layers": 4, "num_heads": 4, "hidden_size": 128, "max_seq_len": 128}
        args.steps = args.steps or 300
        args.eval_every, args.eval_windows = 50, 256
    train_bytes, val_bytes = lm_splits()
    train_data, val_data = byte_tokens(train_bytes), byte_tokens(val_bytes)
    print(
        f"corpus: {train_data.numel():,} train bytes, {val_data.numel():,} validation bytes; "
        f"{args.steps} steps of {args.batch} x {shape['max_seq_len']} tokens; validation on "
        f"{args.eval_windows} windows; torch {torch.get_num_threads()} threads"
    )
    results = []
    for mlp in ("dense", "moe"):
        config = GPTConfig(vocab_size=256, mlp=mlp, num_experts=8, top_k=2, **shape)
        res = train(config, train_data, val_data, args)
        print(
            f"{mlp:<5} params {res['params']:,} (active {res['active_params']:,}), "
            f"final val CE {res['final_val']:.4f} ({res['final_val'] / math.log(2):.3f} bpb), "
            f"{res['tokens_per_s']:,.0f} tokens/s"
        )
        results.append(res)
    dense, moe = results
    print(
        f"MoE - dense final val CE: {moe['final_val'] - dense['final_val']:+.4f} nats/byte; "
        f"MoE throughput {moe['tokens_per_s'] / dense['tokens_per_s']:.2f}x dense"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "shape": shape, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
