"""GPTQ's column loop: the Rust kernel vs the same loop in torch ops, side by side.

Times `slimforge.quant.gptq.gptq_quantize_weight(..., kernel="native")` and `kernel="torch"` on
the weight shapes GPTQ meets in SmolLM2-135M (stacked q/k/v, o, stacked gate/up, down; group 64),
in the library's own GPT (group 128) and in a 7B-class layer (4096 x 4096, group 128), with a
Hessian from correlated random activations. Both routes include everything the function does
(damping, Cholesky, act-order, the lazy block updates); only the column loop differs. Also prints
how many codes agree and the GPTQ objective tr(dW H dW^T) of each.

    PYTHONPATH=python python benches/python/gptq_bench.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse

import torch

from slimforge import _native
from slimforge.bench import best_of
from slimforge.quant.gptq import GPTQ, GPTQResult, gptq_quantize_weight

SHAPES = [
    # (name, out, in, group)
    ("SmolLM2 q/k/v stacked", 960, 576, 64),
    ("SmolLM2 o_proj", 576, 576, 64),
    ("SmolLM2 gate/up stacked", 3072, 576, 64),
    ("SmolLM2 down_proj", 576, 1536, 64),
    ("own GPT qkv", 768, 256, 128),
    ("own GPT mlp.proj", 256, 1024, 128),
    ("7B-class 4096 x 4096", 4096, 4096, 128),
]


def run_shape(name: str, out: int, k: int, gs: int, reps: int) -> None:
    g = torch.Generator().manual_seed(out * 7 + k)
    x = torch.randn(2 * k, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.1 + torch.eye(k))
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(out, k, generator=g) * 0.05
    cfg = GPTQ(bits=4, group_size=gs)
    t_torch, r_torch = best_of(lambda: gptq_quantize_weight(w, h, cfg, kernel="torch"), reps)
    t_nat, r_nat = best_of(lambda: gptq_quantize_weight(w, h, cfg, kernel="native"), reps)

    def objective(r: GPTQResult) -> float:
        d = (w - r.dequantize()).double()
        return float(((d @ h.double()) * d).sum())

    same = float((r_torch.q == r_nat.q).float().mean()) * 100
    print(
        f"{name:<26} {out:>5} x {k:<5} {t_torch * 1e3:7.0f} ms {t_nat * 1e3:7.0f} ms "
        f"{t_torch / t_nat:7.2f}x  {same:10.2f} %  {objective(r_nat) / objective(r_torch):.4f}",
        flush=True,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes only, one repetition")
    ap.add_argument("--threads", type=int, default=0, help="torch and slimforge threads")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        _native.set_num_threads(args.threads)
    shapes = SHAPES[:2] if args.quick else SHAPES
    reps = 1 if args.quick else args.reps
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"{_native.get_num_threads()} slimforge threads; best of {reps}"
    )
    print(
        f"{'shape':<26} {'out x in':>11} {'torch':>9} {'native':>9} {'speed-up':>8}  codes equal  objective native/torch"
    )
    for name, out, k, gs in shapes:
        run_shape(name, out, k, gs, reps)


if __name__ == "__main__":
    main()
