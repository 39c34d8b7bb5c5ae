"""Train a small GPT on the bundled corpus, quantize it four ways with `quantize_`, compare.

Round-to-nearest INT8 and INT4, then GPTQ and AWQ calibrated on training windows, each measured
with `slimforge.eval` on held-out plays. On a model this small INT4 costs a fraction of a percent
of perplexity, about what one calibration draw moves (docs/benchmarks.md has trained models).

    python examples/quantize_gpt.py           # a few minutes on a laptop CPU
    python examples/quantize_gpt.py --quick   # a smoke run in seconds
"""

import argparse
import copy

import torch

from slimforge.data import lm_splits
from slimforge.data.windows import byte_tokens, random_windows, spaced_windows
from slimforge.eval import evaluate_lm, gap_recovered
from slimforge.models import GPT, GPTConfig
from slimforge.quant import AWQ, GPTQ, Int4WeightOnly, Int8WeightOnly, quantize_
from slimforge.train import TrainConfig, Trainer

parser = argparse.ArgumentParser(description="Quantize a small GPT four ways.")
parser.add_argument("--quick", action="store_true", help="tiny model, few steps")
quick = parser.parse_args().quick
if quick:
    torch.set_num_threads(1)  # tiny models run fastest on one thread
torch.manual_seed(0)
train, val = lm_splits()  # byte-level Shakespeare; Hamlet, Macbeth, The Tempest held out
train_ids, val_ids = byte_tokens(train), byte_tokens(val)
layers, width, seq, steps = (2, 64, 64, 25) if quick else (4, 128, 128, 300)
model = GPT(GPTConfig(num_layers=layers, hidden_size=width, max_seq_len=seq))
config = TrainConfig(steps=steps, batch_size=16, seq_len=seq, eval_windows=16, progress=not quick)
result = Trainer(model, train_ids, val_ids, config).fit()
smoke = " (--quick: a smoke run, the differences below are noise)" if quick else ""
print(f"trained {steps} steps ({result.tokens_per_s:,.0f} tokens/s){smoke}")

windows = spaced_windows(val_ids, seq, 32 if quick else 256)
batches = random_windows(train_ids, seq, 8, torch.Generator().manual_seed(1))
calibration = [next(batches) for _ in range(2 if quick else 8)]  # each run as model(batch)
rtn4 = fp32 = evaluate_lm(model, windows).perplexity
print(f"{'fp32':14s} perplexity {fp32:.4f}")
for name, cfg, calib in [
    ("INT8 RTN", Int8WeightOnly(), None),
    ("INT4 RTN g32", Int4WeightOnly(group_size=32), None),
    ("INT4 GPTQ g32", GPTQ(bits=4, group_size=32), calibration),
    ("INT4 AWQ g32", AWQ(bits=4, group_size=32), calibration),
]:
    quantized = quantize_(copy.deepcopy(model), cfg, calibration=calib, progress=False)
    ppl = evaluate_lm(quantized, windows).perplexity
    line = f"{name:14s} perplexity {ppl:.4f} ({(ppl / fp32 - 1) * 100:+.2f} % vs fp32)"
    if name == "INT4 RTN g32":
        rtn4 = ppl
    elif calib is not None and rtn4 > fp32:
        line += f", {gap_recovered(fp32, rtn4, ppl):.0f} % of the INT4 RTN gap recovered"
    print(line)
