"""LoRA and QLoRA: adapt a small GPT trained on Shakespeare to Milton, on a float and an INT4 base.

    python examples/lora_finetune.py [--quick]

Pre-trains a byte-level GPT on the bundled Shakespeare, then trains rank-8 adapters on Milton's
works (the last tenth held out) over the float model and over its INT4 copy, saves the QLoRA
adapter in peft's format and merges it back into INT4 by round-to-nearest.
"""

import argparse
import copy

import torch

from slimforge.data import load_texts
from slimforge.data.windows import byte_tokens
from slimforge.lora import LoraConfig, apply_lora, merge_and_unload, parameter_counts, save_adapter
from slimforge.models import GPT, GPTConfig
from slimforge.quant import Int4WeightOnly, quantize_
from slimforge.train import TrainConfig, Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--quick", action="store_true", help="a few steps (seconds)")
args = parser.parse_args()
pre_steps, lora_steps = (60, 40) if args.quick else (1500, 300)

torch.manual_seed(0)
shakespeare = byte_tokens("\n\n".join(load_texts(["shakespeare-modern"])).encode())
milton = byte_tokens("\n\n".join(load_texts(["milton"])).encode())
cut = int(0.9 * milton.numel())
config = TrainConfig(steps=pre_steps, batch_size=16, seq_len=128, lr=3e-3, eval_windows=32,
                     progress=False)  # fmt: skip
base = GPT(GPTConfig(num_layers=2, hidden_size=128, max_seq_len=128, attn_impl="sdpa"))
Trainer(base, shakespeare, config=config).fit()

for name in ("lora", "qlora"):
    model = copy.deepcopy(base)
    if name == "qlora":
        quantize_(model, Int4WeightOnly(group_size=32))  # frozen INT4 base
    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    ft = config.replace(steps=lora_steps, lr=1e-2, weight_decay=0.0)
    trainer = Trainer(model, milton[:cut], milton[cut:], ft)  # trains the adapters only
    before = trainer.evaluate().perplexity
    after = trainer.fit().final_eval.perplexity
    trainable, total = parameter_counts(model)
    print(f"{name:<5} ({trainable:,} of {total:,} parameters train): held-out Milton "
          f"perplexity {before:.2f} -> {after:.2f}")  # fmt: skip

save_adapter(model, "milton-adapter")  # adapter_config.json + adapter_model.safetensors
errors = merge_and_unload(model, requantize="rtn")  # back to plain INT4 layers
merged = trainer.evaluate().perplexity
worst = max(e.weight_error for e in errors.values())
print(f"merged into INT4 (RTN): perplexity {merged:.2f}, worst relative weight error {worst:.4f}")
