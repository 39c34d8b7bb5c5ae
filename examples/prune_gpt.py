"""Train a small GPT, prune it with masks (magnitude, Wanda, SparseGPT, 2:4) and structurally.

Unstructured and 2:4 pruning keep the shapes and zero weights through masks; `prune_structured`
removes MLP neurons and returns a smaller dense model, then a short `Trainer` run recovers.
Perplexity on held-out plays with `slimforge.eval` (docs/benchmarks.md has SmolLM2 figures).

    python examples/prune_gpt.py           # a few minutes on a laptop CPU
    python examples/prune_gpt.py --quick   # a smoke run in seconds
"""

import argparse
import copy

import torch

from slimforge import prune
from slimforge.data import lm_splits
from slimforge.data.windows import byte_tokens, random_windows, spaced_windows
from slimforge.eval import evaluate_lm
from slimforge.models import GPT, GPTConfig
from slimforge.prune import Magnitude, MLPNeurons, SparseGPT, Wanda, prune_, prune_structured
from slimforge.train import TrainConfig, Trainer

parser = argparse.ArgumentParser(description="Prune a small GPT five ways.")
parser.add_argument("--quick", action="store_true", help="tiny model, few steps")
quick = parser.parse_args().quick
if quick:
    torch.set_num_threads(1)
torch.manual_seed(0)
train, val = lm_splits()  # byte-level Shakespeare; Hamlet, Macbeth, The Tempest held out
train_ids, val_ids = byte_tokens(train), byte_tokens(val)
layers, width, seq, steps = (2, 64, 64, 25) if quick else (4, 128, 128, 300)
model = GPT(GPTConfig(num_layers=layers, hidden_size=width, max_seq_len=seq))
config = TrainConfig(steps=steps, batch_size=16, seq_len=seq, progress=not quick)
Trainer(model, train_ids, None, config).fit()
windows = spaced_windows(val_ids, seq, 32 if quick else 256)
batches = random_windows(train_ids, seq, 8, torch.Generator().manual_seed(1))
calibration = [next(batches) for _ in range(2 if quick else 8)]
print(f"dense            perplexity {evaluate_lm(model, windows).perplexity:.3f}")

configs = {"magnitude 50%": Magnitude(0.5), "wanda 50%": Wanda(0.5)}
configs |= {"sparsegpt 50%": SparseGPT(0.5), "sparsegpt 2:4": SparseGPT(n=2, m=4)}
for name, cfg in configs.items():
    cal = None if name.startswith("magnitude") else calibration
    pruned = prune_(copy.deepcopy(model), cfg, cal, progress=not quick)
    ppl, sparsity = evaluate_lm(pruned, windows).perplexity, prune.sparsity_report(pruned).sparsity
    print(f"{name:<16} perplexity {ppl:.3f} ({sparsity:.0%} of the block weights zero)")

small = copy.deepcopy(model)
res = prune_structured(small, MLPNeurons(0.3), calibration)
before = evaluate_lm(small, windows).perplexity
recovery = TrainConfig(steps=steps // 5, batch_size=16, seq_len=seq, lr=1e-3, progress=False)
Trainer(small, train_ids, None, recovery).fit()  # a short recovery fine-tune
after, params = (
    evaluate_lm(small, windows).perplexity,
    f"{res.params_before:,} -> {res.params_after:,}",
)
print(f"30% MLP neurons  {params} parameters, perplexity {before:.3f} -> {after:.3f} recovered")
