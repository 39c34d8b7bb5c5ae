"""Batch-1 decode GEMV: fp32 nn.Linear vs slimforge INT8 / INT4 g128 vs torch aten int kernels.

Weights are cold: each variant cycles through enough layers that its weights exceed the
last-level cache several times. Prints us/call, GB/s of weight bytes streamed and the speed-up
over fp32 nn.Linear at the same thread count, then the relative output error of each path.

    PYTHONPATH=python python benches/python/quant_gemv.py [--quick] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import subprocess
import time
from collections.abc import Callable

import torch
from torch import nn

import slimforge
from slimforge import _native
from slimforge.quant import QuantLinear


def l3_bytes() -> int:
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, check=True).stdout
        m = re.search(r"L3 cache:\s+(\d+)", out)
        if m:
            return int(m.group(1))
    except (OSError, subprocess.CalledProcessError):
        pass
    return 32 << 20


def time_cycle(fns: list[Callable[[], object]], passes: int) -> float:
    """Best mean seconds per call over `passes` passes through all layers (after one warm-up)."""
    for f in fns:
        f()
    best = float("inf")
    for _ in range(passes):
        t0 = time.perf_counter()
        for f in fns:
            f()
        best = min(best, (time.perf_counter() - t0) / len(fns))
    return best


def make_quant_layers(
    n_layers: int, k: int, n: int, bits: int, group: int | None
) -> list[QuantLinear]:
    layers = []
    g = torch.Generator().manual_seed(0)
    for _ in range(n_layers):
        ql = QuantLinear(k, n, bits, group, bias=False)
        ql.qweight.copy_(torch.randint(0, 256, ql.qweight.shape, generator=g, dtype=torch.uint8))
        ql.scales.uniform_(0.001, 0.01, generator=g)
        ql.zeros.fill_(2 ** (bits - 1))
        layers.append(ql)
    return layers


def crossover(ql: QuantLinear, m: int, passes: int) -> list[float]:
    """Seconds per call: fused int8 route, fused float route, dequantize + F.linear."""
    views = ql._native_weight()
    x = torch.randn(m, ql.in_features)
    out = []
    for route in ("int8", "float"):
        args = (*views, ql.bits, ql.group_size, route)
        out.append(time_cycle([lambda args=args: _native.quant_linear(x.numpy(), *args)], passes))
    out.append(time_cycle([lambda: torch.nn.functional.linear(x, ql.dequantize())], passes))
    return out


def layer_count(bytes_per_layer: int, cold_bytes: int, cap: int) -> int:
    return max(2, min(cap, -(-cold_bytes // bytes_per_layer)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer layers and passes (< 1 minute)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--cold-x-l3", type=float, default=None, help="weights per variant / L3 size")
    args = ap.parse_args()
    k = n = args.size
    l3 = l3_bytes()
    cold = args.cold_x_l3 if args.cold_x_l3 is not None else (0.5 if args.quick else 4.0)
    cold_bytes = int(cold * l3)
    passes = 2 if args.quick else 7
    cap = 40 if args.quick else 400
    print(
        f"isa={_native.quant_kernel_isa()} auto_route=int4:{_native.quant_default_route(4)},int8:{_native.quant_default_route(8)} "
        f"L3={l3 >> 20} MiB cold={cold}x L3 shape={n}x{k} batch=1 torch={torch.__version__} "
        f"loadavg={os.getloadavg()[0]:.1f} cpus={os.cpu_count()}"
    )
    rows: list[tuple[str, int, float, float]] = []
    torch.set_grad_enabled(False)
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        slimforge.set_num_threads(threads)
        x32 = torch.randn(1, k)
        xbf = x32.bfloat16()

        def record(
            name: str, fns: list[Callable[[], object]], nbytes: int, threads: int = threads
        ) -> None:
            try:
                t = time_cycle(fns, passes)
            except (RuntimeError, NotImplementedError, AttributeError, TypeError) as e:
                print(f"  {name}: n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                rows.append((name, threads, float("nan"), 0.0))
                return
            rows.append((name, threads, t, nbytes / t / 1e9))

        # fp32 and bf16 nn.Linear
        for dtype, x, label in ((torch.float32, x32, "fp32"), (torch.bfloat16, xbf, "bf16")):
            nb = n * k * (4 if dtype == torch.float32 else 2)
            L = layer_count(nb, cold_bytes, cap)
            lins = []
            for _ in range(L):
                lin = nn.Linear(k, n, bias=False, dtype=dtype)
                lins.append(lin)
            record(
                f"torch nn.Linear {label} W, {label} x", [lambda m=m, x=x: m(x) for m in lins], nb
            )
            del lins
            gc.collect()

        for bits, group, label in ((8, None, "INT8 per-channel"), (4, 128, "INT4 g128")):
            nb = n * k * bits // 8 + 2 * 4 * n * (k // (group or k))
            L = layer_count(nb, cold_bytes, cap)
            layers = make_quant_layers(L, k, n, bits, group)
            for route in ("int8", "float"):
                for ql in layers:
                    ql.route = route
                for x, xl in ((x32, "fp32"), (xbf, "bf16")):
                    record(
                        f"slimforge {label} route={route}, {xl} x",
                        [lambda m=m, x=x: m(x) for m in layers],
                        nb,
                    )
            # the same weights through torch's own CPU kernels
            if bits == 8:
                w8 = [(ql.qweight.to(torch.int16) - 128).to(torch.int8) for ql in layers]
                sc = [ql.scales.reshape(-1) for ql in layers]
                for x, xl in ((x32, "fp32"), (xbf, "bf16")):
                    s_cast = [s.to(x.dtype) for s in sc]
                    record(
                        f"aten _weight_int8pack_mm, {xl} x",
                        [
                            lambda w=w, s=s, x=x: torch.ops.aten._weight_int8pack_mm(x, w, s)
                            for w, s in zip(w8, s_cast, strict=True)
                        ],
                        nb,
                    )
                del w8, sc
            else:
                try:
                    packed = []
                    for ql in layers:
                        q = torch.stack((ql.qweight & 15, ql.qweight >> 4), -1).reshape(n, k)
                        pw = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                            q.to(torch.int32), 1
                        )
                        sz = torch.stack((ql.scales.T, (-(ql.zeros - 8) * ql.scales).T), -1).to(
                            torch.bfloat16
                        )
                        packed.append((pw, sz.contiguous()))
                    record(
                        "aten _weight_int4pack_mm_for_cpu, bf16 x",
                        [
                            lambda p=p, s=s, x=xbf: torch.ops.aten._weight_int4pack_mm_for_cpu(
                                x, p, 128, s
                            )
                            for p, s in packed
                        ],
                        nb,
                    )
                    del packed
                except (RuntimeError, AttributeError) as e:
                    print(f"  aten int4: n/a ({str(e).splitlines()[0][:80]})")
                    rows.append(
                        ("aten _weight_int4pack_mm_for_cpu, bf16 x", threads, float("nan"), 0.0)
                    )
            del layers
            gc.collect()

    print(f"\n{'variant':<48} {'thr':>3} {'us/call':>9} {'GB/s':>7} {'vs fp32':>8}")
    base = {t: us for name, t, us, _ in rows if name.startswith("torch nn.Linear fp32")}
    for name, t, sec, gbs in rows:
        if sec != sec:
            print(f"{name:<48} {t:>3} {'n/a':>9} {'':>7} {'':>8}")
            continue
        print(f"{name:<48} {t:>3} {sec * 1e6:>9.0f} {gbs:>7.2f} {base[t] / sec:>7.2f}x")

    # Batch crossover: fused kernel vs dequantize + torch matmul (hot weights, last thread count).
    print(
        "\nbatch crossover, ms per call (fused route=int8 / fused route=float / dequantize + F.linear):"
    )
    for bits, group in ((8, None), (4, 128)):
        (ql,) = make_quant_layers(1, k, n, bits, group)
        for m in (16,) if args.quick else (16, 32, 64, 128):
            cells = [f"{t * 1e3:.2f}" for t in crossover(ql, m, passes)]
            print(f"  INT{bits} m={m:<4} " + " / ".join(cells))

    # Relative output error of each path on Gaussian weights (x @ W.T in float64 is the reference).
    torch.set_num_threads(1)
    slimforge.set_num_threads(1)
    kk = 1024 if args.quick else k
    torch.manual_seed(0)
    lin = nn.Linear(kk, 256, bias=False)
    x = torch.randn(1, kk)
    ref_w = lin.weight.double()
    print("\nrelative output error ||y - x W^T|| / ||x W^T|| (float weights as reference):")
    for bits, group, sym in ((8, None, True), (4, 128, False), (4, 128, True), (4, 32, False)):
        ql = QuantLinear.from_float(lin, bits, group, sym)
        deq_ref = x.double() @ ql.dequantize().double().T
        for route in ("float", "int8"):
            ql.route = route
            for xv, xl in ((x, "fp32"), (x.bfloat16(), "bf16")):
                y = ql(xv).double()
                total = float((y - x.double() @ ref_w.T).norm() / (x.double() @ ref_w.T).norm())
                kernel = float((y - deq_ref).norm() / deq_ref.norm())
                print(
                    f"  INT{bits} g{group or 'ch'} {'sym' if sym else 'asym'} route={route:<5} {xl} x: "
                    f"total {total:.2e}, kernel-only (vs dequantized weight) {kernel:.2e}"
                )
    print(f"\ncommand: PYTHONPATH=python python {' '.join(os.sys.argv)}")


if __name__ == "__main__":
    main()
