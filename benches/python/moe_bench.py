"""MoE layer vs the Hugging Face Mixtral-style per-expert loop, forward + backward, on CPU.

    PYTHONPATH=python python benches/python/moe_bench.py [--quick] [--threads N]

For each size and dtype it times slimforge's `MoE` (every expert-matmul strategy) and the loop
`moe_reference` (same parameters, same routing), prints speed-ups, and breaks slimforge's layer
time into routing, dispatch plan, permute/combine (forward and backward) and expert matmuls.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from slimforge.bench import median_time
from slimforge.moe import MoE, combine, dispatch_plan, moe_reference, permute, route_topk
from slimforge.moe.layer import grouped_mm_available


def fwd_bwd_layer(m: MoE, x: torch.Tensor, g: torch.Tensor) -> Callable[[], object]:
    def run() -> None:
        m.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        (m(xx) * g).sum().backward()

    return run


def fwd_bwd_loop(m: MoE, x: torch.Tensor, g: torch.Tensor) -> Callable[[], object]:
    def run() -> None:
        m.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        y = moe_reference(xx, m.router.weight, m.w_in, m.w_out, m.top_k, activation=m.activation)
        (y * g).sum().backward()

    return run


def breakdown(m: MoE, x: torch.Tensor, g: torch.Tensor, reps: int) -> dict[str, float]:
    """Seconds spent in the layer's routing and data-movement steps (forward + backward)."""
    with torch.no_grad():
        logits = m.router(x).float()
        idx, _ = route_topk(logits, m.top_k)
        plan = dispatch_plan(idx, m.num_experts)
        xs = permute(x, plan)
    weights = torch.rand(idx.shape)

    def route() -> None:
        lg = m.router(x).float()
        i, _ = route_topk(lg, m.top_k)
        lg.softmax(-1).gather(1, i)

    def permute_fb() -> None:
        xx = x.detach().requires_grad_()
        permute(xx, plan).backward(xs)

    def combine_fb() -> None:
        ys = xs.detach().requires_grad_()
        w = weights.detach().requires_grad_()
        combine(ys, w, plan).backward(g)

    with torch.no_grad():
        return {
            "route": median_time(route, reps),
            "plan": median_time(lambda: dispatch_plan(idx, m.num_experts), reps),
        } | {
            "permute": _grad_timed(permute_fb, reps),
            "combine": _grad_timed(combine_fb, reps),
        }


def _grad_timed(fn: Callable[[], object], reps: int) -> float:
    with torch.enable_grad():
        return median_time(fn, reps)


def bench(
    name: str, t: int, d: int, h: int, e: int, k: int, dtype: torch.dtype, reps: int
) -> dict[str, float]:
    torch.manual_seed(0)
    m = MoE(d, h, e, k, dtype=dtype)
    x = torch.randn(t, d).to(dtype)
    g = torch.randn(t, d).to(dtype)
    impls = ["segments", "bmm"] + (["grouped_mm"] if grouped_mm_available(dtype) else [])
    res: dict[str, float] = {}
    for impl in impls:
        m.expert_impl = impl
        res[impl] = median_time(fwd_bwd_layer(m, x, g), reps)
    m.expert_impl = "auto"
    res["auto"] = median_time(fwd_bwd_layer(m, x, g), reps)
    res["loop"] = median_time(fwd_bwd_loop(m, x, g), reps)
    parts = breakdown(m, x, g, reps)
    moved = sum(parts.values())
    flops = 2 * 3 * t * k * d * h * (3 if m.activation == "swiglu" else 2)
    dt = str(dtype).replace("torch.", "")
    print(
        f"{name:<12} T={t:<5} D={d:<5} H={h:<5} E={e:<3} k={k} {dt:<8} "
        f"loop {res['loop'] * 1e3:8.1f} ms | "
        + " ".join(f"{i} {res[i] * 1e3:7.1f} ms ({res['loop'] / res[i]:.2f}x)" for i in impls)
        + f" | auto {res['auto'] * 1e3:7.1f} ms ({res['loop'] / res['auto']:.2f}x) "
        f"{flops / res['auto'] / 1e9:.0f} GF/s"
    )
    print(
        " " * 13
        + "breakdown of auto (fwd+bwd): "
        + ", ".join(f"{p} {v * 1e3:.2f} ms" for p, v in parts.items())
        + f" -> routing+dispatch+combine {100 * moved / res['auto']:.1f}% of layer time"
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    ap.add_argument("--threads", type=int, default=None, help="torch and slimforge threads")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        import slimforge

        torch.set_num_threads(args.threads)
        slimforge.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.quick:
        sizes = [("mixtral-like", 1024, 256, 704, 8, 2), ("fine-grain", 512, 256, 256, 64, 6)]
        reps = args.reps or 2
    else:
        sizes = [
            ("mixtral-like", 4096, 512, 1408, 8, 2),
            ("fine-grain", 512, 512, 256, 64, 6),
            ("fine-grain", 4096, 512, 256, 64, 6),
        ]
        reps = args.reps or 3
    for dtype in (torch.float32, torch.bfloat16):
        for size in sizes:
            bench(*size, dtype=dtype, reps=reps)


if __name__ == "__main__":
    main()
