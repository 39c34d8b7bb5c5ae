"""Temperature and alpha of the distillation loss, against plain training, from one teacher.

The teacher is the demo's (`slimforge demo` writes it to RUN/teacher/model); the student (2
blocks, width 128) starts from the same weights for every setting and sees the same windows
(batch 8 x 256 bytes) for the same steps. Validation bits per byte on the demo's held-out plays.

    slimforge demo --out slimforge-demo            # once, for the teacher and the token files
    python benches/python/distill_sweep.py slimforge-demo --steps 150
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from slimforge.cli.generate import load_model
from slimforge.distill import DistillConfig, Distiller
from slimforge.eval import evaluate_lm
from slimforge.models import GPT, GPTConfig
from slimforge.pipeline.stages import _tokens
from slimforge.train import TrainConfig, Trainer

ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
ap.add_argument("run", help="a `slimforge demo` run folder")
ap.add_argument("--steps", type=int, default=150)
ap.add_argument("--threads", type=int, default=2)
args = ap.parse_args()
torch.set_num_threads(args.threads)
teacher, _ = load_model(f"{args.run}/teacher/model")
train = _tokens(f"{args.run}/prepare/train")
from slimforge.data.windows import spaced_windows  # noqa: E402

val = spaced_windows(_tokens(f"{args.run}/prepare/val"), 256, 48)
cfg = GPTConfig(num_layers=2, hidden_size=128, num_heads=4, position="rope", max_seq_len=256)
torch.manual_seed(0)
init = GPT(cfg).state_dict()
settings = {
    "plain": None,
    "T=1, alpha=1": DistillConfig(temperature=1.0, alpha=1.0),
    "T=1, alpha=0.5": DistillConfig(temperature=1.0, alpha=0.5),
    "T=2, alpha=0.5": DistillConfig(temperature=2.0, alpha=0.5),
}
for name, dc in settings.items():
    model = GPT(cfg)
    model.load_state_dict(init)
    tc = TrainConfig(steps=args.steps, batch_size=8, seq_len=256, lr=3e-3, progress=False)
    t = time.perf_counter()
    if dc is None:
        Trainer(model, train, None, tc).fit()
    else:
        Distiller(model, teacher, train, None, dc, tc).fit()
    bpb = evaluate_lm(model, val).nll / math.log(2)
    print(f"{name:16s} {bpb:.4f} bits/byte ({time.perf_counter() - t:.0f} s)", flush=True)
