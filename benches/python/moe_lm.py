"""Dense vs MoE byte-level LM on the bundled Shakespeare corpus, same active parameters per token.

    PYTHONPATH=python python benches/python/moe_lm.py [--quick] [--steps N] [--threads N] [--json F]

Both models are nanoGPT-style decoders (`slimforge.models.GPT`) of the same shape; the dense MLP
has width 4 * n_embd, the MoE MLP has `num_experts` experts of width 4 * n_embd / top_k with
top_k of them per token, so each token uses the same number of MLP parameters. Both see the
same batches for the same number of tokens; the script prints validation cross-entropy (bits per
byte too) along the way and the training throughput.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from lm_data import lm_tensors, random_windows  # this directory is on sys.path as a script

from slimforge.models import GPT, GPTConfig


def batches(data: torch.Tensor, block: int, batch: int, seed: int):
    return random_windows(data, block, batch, torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate(model: GPT, val: torch.Tensor, block: int, batch: int, n_batches: int) -> float:
    model.eval()
    it = batches(val, block, batch, seed=1234)
    total = 0.0
    for _ in range(n_batches):
        x, y = next(it)
        model(x, y)
        assert model.last_lm_loss is not None
        total += model.last_lm_loss
    model.train()
    return total / n_batches


def train(config: GPTConfig, train_data, val_data, args) -> dict:
    torch.manual_seed(args.seed)
    model = GPT(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    it = batches(train_data, config.block_size, args.batch, seed=args.seed)
    curve = []
    train_time = 0.0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            val = evaluate(model, val_data, config.block_size, args.batch, args.eval_batches)
            curve.append((step, step * args.batch * config.block_size, val))
            print(
                f"  {config.mlp:<5} step {step:5d}  val CE {val:.4f} ({val / math.log(2):.3f} bpb)"
            )
        if step == args.steps:
            break
        lr = args.lr * min(1.0, (step + 1) / args.warmup)
        lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = next(it)
        start = time.perf_counter()
        _, loss = model(x, y)
        assert loss is not None
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_time += time.perf_counter() - start
    tokens = args.steps * args.batch * config.block_size
    return {
        "mlp": config.mlp,
        "params": model.num_params(),
        "active_params": model.num_params(active=True),
        "curve": curve,
        "final_val": curve[-1][2],
        "tokens": tokens,
        "tokens_per_s": tokens / train_time,
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
        shape = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64}
        args.steps = args.steps or 40
        args.eval_every, args.eval_batches = 20, 2
    else:
        shape = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128}
        args.steps = args.steps or 300
        args.eval_every, args.eval_batches = 50, 16
    args.warmup = max(1, args.steps // 20)
    train_data, val_data = lm_tensors()
    print(
        f"corpus: {train_data.numel():,} train bytes, {val_data.numel():,} validation bytes; "
        f"{args.steps} steps of {args.batch} x {shape['block_size']} tokens; "
        f"torch {torch.get_num_threads()} threads"
    )
    results = []
    for mlp in ("dense", "moe"):
        config = GPTConfig(vocab_size=256, mlp=mlp, num_experts=8, top_k=2, **shape)
        res = train(config, train_data, val_data, args)
        print(
            f"{mlp:<5} params {res['params']:,} (active {res['active_params']:,}), "
            f"final val CE {res['final_val']:.4f}, {res['tokens_per_s']:,.0f} tokens/s"
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
