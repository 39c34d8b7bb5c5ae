"""Distil a small GPT student from a teacher, against the same student trained alone.

Both students start from the same weights and see the same windows for the same steps; the
distilled one also learns from the teacher's next-byte distributions (T = 1, alpha = 0.5). Bits per
byte on held-out plays (docs/benchmarks.md has three-seed figures).

    python examples/distill_student.py           # a few minutes on a laptop CPU
    python examples/distill_student.py --quick   # a smoke run in seconds
"""

import argparse
import math

import torch

from slimforge.data import lm_splits
from slimforge.data.windows import byte_tokens, spaced_windows
from slimforge.distill import DistillConfig, Distiller
from slimforge.eval import evaluate_lm
from slimforge.models import GPT, GPTConfig
from slimforge.train import TrainConfig, Trainer

parser = argparse.ArgumentParser(description="Distillation against plain training.")
parser.add_argument("--quick", action="store_true", help="tiny models, few steps")
quick = parser.parse_args().quick
if quick:
    torch.set_num_threads(1)
train, val = lm_splits()  # byte-level Shakespeare; Hamlet, Macbeth, The Tempest held out
train_ids = byte_tokens(train)
seq = 64 if quick else 128
windows = spaced_windows(byte_tokens(val), seq, 32 if quick else 256)
t_steps, s_steps = (20, 10) if quick else (400, 200)


def bits_per_byte(model: GPT) -> float:
    return evaluate_lm(model, windows).nll / math.log(2)


torch.manual_seed(0)
teacher = GPT(
    GPTConfig(num_layers=4, hidden_size=64 if quick else 192, num_heads=4, max_seq_len=seq)
)
Trainer(teacher, train_ids, None, TrainConfig(steps=t_steps, seq_len=seq, progress=not quick)).fit()
print(
    f"teacher          {teacher.num_params():>9,} parameters, {bits_per_byte(teacher):.3f} bits/byte"
)

config = GPTConfig(num_layers=2, hidden_size=32 if quick else 128, num_heads=4, max_seq_len=seq)
plain, distilled = GPT(config), GPT(config)
distilled.load_state_dict(plain.state_dict())  # the same starting point
steps = TrainConfig(steps=s_steps, seq_len=seq, progress=not quick)
Trainer(plain, train_ids, None, steps).fit()
Distiller(
    distilled, teacher, train_ids, None, DistillConfig(temperature=1.0, alpha=0.5), steps
).fit()
share = plain.num_params() / teacher.num_params()
print(f"student (plain)  {plain.num_params():>9,} parameters, {bits_per_byte(plain):.3f} bits/byte")
print(f"student (distilled, {share:.0%} of the teacher) {bits_per_byte(distilled):.3f} bits/byte")
