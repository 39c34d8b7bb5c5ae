"""LAMB step time: slimforge's fused kernel vs its foreach path, timm's Lamb and torch's AdamW.

    PYTHONPATH=python python benches/python/lamb_bench.py [--quick] [--threads 1,2] [--reps N]

One optimizer step over ~100M float32 parameters (4 x 4096x4096, 8 x 4096x1024, 16 x 4096; with
``--quick`` ~10M: 4 x 1024x2048, 8 x 1024x256, 16 x 1024), timm's defaults (weight decay 0.01,
so every tensor takes the trust ratio, and global gradient clipping at 1.0). Every engine owns
its parameters and state; they share the (read-only) gradients. Best of ``--reps`` steps, the
engines taking turns, per thread count (torch's and slimforge's pools both set). AdamW (foreach
and fused) is the reference for a plain elementwise optimizer step on the same tensors.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch

import slimforge
from slimforge import _native
from slimforge.bench import best_times
from slimforge.optim import Lamb

FULL = [(4096, 4096)] * 4 + [(4096, 1024)] * 8 + [(4096,)] * 16
QUICK = [(1024, 2048)] * 4 + [(1024, 256)] * 8 + [(1024,)] * 16


def engines(shapes: list[tuple[int, ...]]) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    init = [torch.randn(*s) * 0.02 for s in shapes]
    grads = [torch.randn(*s) * 1e-3 for s in shapes]

    def params() -> list[torch.nn.Parameter]:
        ps = [torch.nn.Parameter(w.clone()) for w in init]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        return ps

    makers: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
        "slimforge fused": lambda ps: Lamb(ps, fused=True),
        "slimforge foreach": lambda ps: Lamb(ps, fused=False),
    }
    try:
        from timm.optim import Lamb as TimmLamb

        makers["timm Lamb"] = lambda ps: TimmLamb(ps)
    except ImportError:
        print("timm is not installed: skipping timm's Lamb")
    makers["AdamW foreach"] = lambda ps: torch.optim.AdamW(ps, foreach=True)
    makers["AdamW fused"] = lambda ps: torch.optim.AdamW(ps, fused=True)
    return {name: make(params()).step for name, make in makers.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~10M parameters, a few seconds")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--reps", type=int, default=None, help="timed steps per engine")
    args = ap.parse_args()
    shapes = QUICK if args.quick else FULL
    reps = args.reps or (10 if args.quick else 5)
    threads = [int(t) for t in args.threads.split(",")]
    n = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} CPUs, LAMB kernel "
        f"{_native.lamb_kernel_isa()}, {n / 1e6:.1f}M float32 parameters in {len(shapes)} "
        f"tensors, best of {reps} steps"
    )
    fns = engines(shapes)
    results: dict[int, dict[str, float]] = {}
    for t in threads:
        torch.set_num_threads(t)
        slimforge.set_num_threads(t)
        load = os.getloadavg()[0]
        results[t] = best_times(fns, reps)
        print(f"{t} thread(s): load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    header = f"{'engine':<18}" + "".join(f"{f'{t} thr ms':>11}" for t in threads)
    print(header + "   vs timm / vs AdamW foreach (per thread count)")
    for name in fns:
        row = f"{name:<18}" + "".join(f"{results[t][name] * 1e3:11.1f}" for t in threads)
        rel = []
        for t in threads:
            r = results[t]
            parts = []
            if "timm Lamb" in r:
                parts.append(f"{r['timm Lamb'] / r[name]:.2f}x faster")
            parts.append(f"{r[name] / r['AdamW foreach']:.2f}x time")
            rel.append(" / ".join(parts))
        print(row + "   " + " | ".join(rel))
    for t in threads:
        r = results[t]
        fused = r["slimforge fused"]
        goals = [f"<= 1.2x AdamW foreach: {fused <= 1.2 * r['AdamW foreach']}"]
        if "timm Lamb" in r:
            goals.insert(0, f">= 2x faster than timm: {2 * fused <= r['timm Lamb']}")
        gbs = n * 4 * 11 / fused / 1e9  # ~11 float32 reads/writes per parameter, see lamb.rs
        print(f"{t} thread(s): fused {', '.join(goals)}; ~{gbs:.0f} GB/s effective")


if __name__ == "__main__":
    main()
