"""A small training run the engine tests start as a subprocess (also under torchrun).

python train_run.py OUT [--steps N] [--resume] [--kill-at STEP] [--batch B] [--accum A]
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from safetensors.torch import save_model

import slimforge
from slimforge.data import lm_splits
from slimforge.data.windows import byte_tokens
from slimforge.models import GPT, GPTConfig
from slimforge.train import Callback, TrainConfig, Trainer
from slimforge.train.distributed import init_from_env, shutdown


class KillAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, step, metrics):  # type: ignore[no-untyped-def]
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--dropout", type=float, default=0.1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    slimforge.set_num_threads(1)
    rank, world = init_from_env()
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(num_layers=2, hidden_size=32, num_heads=2, max_seq_len=32, dropout=args.dropout)
    )
    train = byte_tokens(lm_splits()[0][:200_000])
    cfg = TrainConfig(
        steps=args.steps, batch_size=args.batch, seq_len=32, grad_accum=args.accum, lr=3e-3,
        save_every=args.save_every, optimizer=args.optimizer, log_every=1, progress=False,
    )  # fmt: skip
    callbacks = [KillAt(args.kill_at)] if args.kill_at else []
    trainer = Trainer(model, train, None, cfg, out_dir=args.out, callbacks=callbacks)
    trainer.fit(resume=args.resume)
    if rank == 0:
        save_model(model, os.path.join(args.out, "final.safetensors"))
    shutdown()


if __name__ == "__main__":
    main()
