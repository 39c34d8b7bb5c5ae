"""GPT trained with slimforge.attention reaches the same validation loss as with SDPA.

    PYTHONPATH=python python benches/python/gpt_train.py [--quick] [--steps N] [--threads N]
        [--position learned|rope] [--mlp dense|moe] [--order flash,sdpa|sdpa,flash|both] [--json F]

One byte-level `slimforge.models.GPT` configuration (default 4 layers x 128 hidden x 4 heads,
max_seq_len 128, learned positions) is trained twice by `slimforge.train.Trainer` on
`slimforge.data.lm_splits()`, with identical initial weights (same seed) and identical batches
(same window seed): once with ``attn_impl="flash"`` (slimforge's tiled attention kernel) and once
with ``attn_impl="sdpa"`` (torch ``scaled_dot_product_attention``). Everything else is the same
code, so any difference in the validation loss comes from the attention kernels' rounding. The
script prints each run's final validation loss (nats per byte and bits per byte, `slimforge.eval`
on the same evenly spaced held-out windows), their difference, the largest per-step difference of
the training losses, and the training throughput (tokens/s of forward + backward + optimizer
step, evaluation excluded) side by side with its ratio. ``--order both`` runs flash, sdpa, sdpa,
flash (each engine once first and once second) and averages the throughput of each engine.
``--mlp moe`` trains the MoE variant (8 experts, top 2).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch

import slimforge
from slimforge.data import lm_splits
from slimforge.data.windows import byte_tokens
from slimforge.models import GPT, GPTConfig
from slimforge.train import TrainConfig, Trainer

ENGINES = {"flash": "slimforge.attention", "sdpa": "torch SDPA"}


def run(
    config: GPTConfig, tc: TrainConfig, seed: int, train: torch.Tensor, val: torch.Tensor
) -> dict:  # type: ignore[type-arg]
    torch.manual_seed(seed)
    model = GPT(config)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    result = Trainer(model, train, val, tc).fit()
    final = result.final_eval
    assert final is not None
    return {
        "attn_impl": config.attn_impl,
        "init": init,
        "losses": result.losses,
        "val_nll": final.nll,
        "val_bpb": final.bits_per_token,
        "evals": [(step, ev.nll) for step, ev in result.evals],
        "tokens": result.tokens,
        "train_seconds": result.train_seconds,
        "tokens_per_s": result.tokens_per_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="a few dozen steps, under a minute")
    ap.add_argument("--steps", type=int, default=None, help="default 300 (--quick: 30)")
    ap.add_argument("--batch", type=int, default=None, help="default 16 (--quick: 8)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batches")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128, help="max_seq_len = training window")
    ap.add_argument("--position", choices=["learned", "rope"], default="learned")
    ap.add_argument("--mlp", choices=["dense", "moe"], default="dense")
    ap.add_argument(
        "--order",
        choices=["flash,sdpa", "sdpa,flash", "both"],
        default="flash,sdpa",
        help="which engine trains first; both: flash, sdpa, sdpa, flash",
    )
    ap.add_argument("--eval-windows", type=int, default=None, help="default 256 (--quick: 32)")
    ap.add_argument("--threads", type=int, default=None, help="torch and slimforge threads")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        slimforge.set_num_threads(args.threads)
    steps = args.steps or (30 if args.quick else 300)
    args.batch = args.batch or (8 if args.quick else 16)
    eval_windows = args.eval_windows or (32 if args.quick else 256)
    order = {
        "flash,sdpa": ["flash", "sdpa"],
        "sdpa,flash": ["sdpa", "flash"],
        "both": ["flash", "sdpa", "sdpa", "flash"],
    }[args.order]

    train_bytes, val_bytes = lm_splits()
    train, val = byte_tokens(train_bytes), byte_tokens(val_bytes)
    shape = {
        "vocab_size": 256,
        "num_layers": args.layers,
        "hidden_size": args.hidden,
        "num_heads": args.heads,
        "max_seq_len": args.seq_len,
        "position": args.position,
        "mlp": args.mlp,
    }
    tc = TrainConfig(
        steps=steps,
        batch_size=args.batch,
        seq_len=args.seq_len,
        lr=args.lr,
        eval_windows=eval_windows,
        seed=args.seed,
        progress=sys.stderr.isatty(),
    )
    print(
        f"corpus: {train.numel():,} train bytes, {val.numel():,} validation bytes; GPT "
        f"{args.layers} layers x {args.hidden} hidden x {args.heads} heads, {args.position} "
        f"positions, {args.mlp} MLP; {steps} steps of {args.batch} x {args.seq_len} tokens, "
        f"seed {args.seed}; validation on {eval_windows} windows; threads: torch "
        f"{torch.get_num_threads()}, slimforge {slimforge.get_num_threads()}"
    )
    runs = []
    for impl in order:
        r = run(GPTConfig(**shape, attn_impl=impl), tc, args.seed, train, val)
        runs.append(r)
        print(
            f"  {impl:<5} {'(' + ENGINES[impl] + ')':<21} final val {r['val_nll']:.4f} nats "
            f"({r['val_bpb']:.4f} bits/byte), train loss {r['losses'][-1]:.4f}; "
            f"{r['tokens_per_s']:,.0f} tokens/s ({r['train_seconds']:.1f} s)",
            flush=True,
        )
    by = {impl: [r for r in runs if r["attn_impl"] == impl] for impl in ENGINES}
    flash, sdpa = by["flash"][0], by["sdpa"][0]
    same_init = all(torch.equal(flash["init"][k], sdpa["init"][k]) for k in flash["init"])
    d_val = flash["val_nll"] - sdpa["val_nll"]
    d_train = max(abs(a - b) for a, b in zip(flash["losses"], sdpa["losses"], strict=True))
    tps = {impl: statistics.mean(r["tokens_per_s"] for r in rs) for impl, rs in by.items()}
    print(f"\nsame initial weights and batches: {'yes' if same_init else 'NO'}")
    print(
        f"final validation loss: flash {flash['val_nll']:.4f}, sdpa {sdpa['val_nll']:.4f} nats/byte"
        f"; flash - sdpa {d_val:+.5f} nats ({d_val / math.log(2):+.5f} bits/byte)"
    )
    print(f"largest per-step training-loss difference: {d_train:.5f} nats")
    for impl, rs in by.items():
        if len(rs) > 1:
            spread = max(r["val_nll"] for r in rs) - min(r["val_nll"] for r in rs)
            print(f"  {impl}: {len(rs)} runs, validation losses differ by {spread:.2e} nats")
    runs_note = " (mean of 2 runs each)" if args.order == "both" else ""
    print(
        f"training throughput{runs_note}: flash {tps['flash']:,.0f} tokens/s, sdpa "
        f"{tps['sdpa']:,.0f} tokens/s -> flash/sdpa speed {tps['flash'] / tps['sdpa']:.2f}x"
    )
    if args.json:
        for r in runs:
            del r["init"]
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "config": shape, "steps": steps, "runs": runs}, f, indent=1
            )


if __name__ == "__main__":
    main()
