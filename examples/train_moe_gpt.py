"""Train a dense GPT and a Mixture-of-Experts GPT with the same active parameters, side by side.

Shows `GPTConfig(mlp="moe")`, the Trainer on the bundled corpus (same batches for both models),
the MoE auxiliary loss inside the model's loss, active against total parameters, and the load
of each expert after training.

    python examples/train_moe_gpt.py           # a few minutes on a laptop CPU
    python examples/train_moe_gpt.py --quick   # a smoke run in seconds
"""

import argparse

import torch

from slimforge.data import lm_splits
from slimforge.data.windows import byte_tokens
from slimforge.models import GPT, GPTConfig
from slimforge.train import TrainConfig, Trainer

parser = argparse.ArgumentParser(description="Dense vs MoE GPT on the bundled corpus.")
parser.add_argument("--quick", action="store_true", help="tiny models, few steps")
quick = parser.parse_args().quick
if quick:
    torch.set_num_threads(1)  # tiny models run fastest on one thread
train, val = lm_splits()
train_ids, val_ids = byte_tokens(train), byte_tokens(val)
seq = 64 if quick else 128
dense = GPTConfig(num_layers=2 if quick else 4, hidden_size=64 if quick else 128, max_seq_len=seq)
moe = dense.replace(mlp="moe", num_experts=8, top_k=2)  # experts intermediate_size // top_k wide
steps = 20 if quick else 300
config = TrainConfig(steps=steps, batch_size=16, seq_len=seq, eval_windows=32, progress=not quick)
for name, cfg in [("dense", dense), ("moe", moe)]:
    torch.manual_seed(0)
    model = GPT(cfg)
    result = Trainer(model, train_ids, val_ids, config).fit()  # same seed: same batches
    total, active = model.num_params(), model.num_params(active=True)
    print(
        f"{name:5s} {total:>9,} params ({active:,} active per token), {steps} steps: "
        f"val perplexity {result.final_eval.perplexity:.3f}, {result.tokens_per_s:,.0f} tokens/s"
    )
ids = val_ids[:seq][None]
with torch.no_grad():
    out = model(ids, labels=ids)  # the MoE model: loss = LM loss + aux_loss
print(f"moe   LM loss {float(out.loss - out.aux_loss):.4f}, aux loss {float(out.aux_loss):.4f}")
print(f"moe   tokens per expert in block 0: {model.moe_layers()[0].last_load.tokens_per_expert}")
