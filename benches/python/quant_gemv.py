"""Batch-1 decode GEMV: fp32 nn.Linear vs slimforge INT8 / INT4 g128 vs torch aten int kernels,
torchao and optimum-quanto.

Weights are cold: each variant cycles through enough layers that its weights exceed the
last-level cache several times. Prints us/call, GB/s of weight bytes streamed, the speed-up
over fp32 nn.Linear at the same thread count and, for the peers, how much faster slimforge's
best route is; then the relative output error of each path. torchao and optimum-quanto
(requirements-bench.txt) are optional: a peer that is missing, fails to import or has no CPU
kernel for a variant is reported as n/a with the reason.

    PYTHONPATH=python python benches/python/quant_gemv.py [--quick] [--threads 1,2] [--no-peers]
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable

import torch
from torch import nn

import slimforge
from slimforge import _native
from slimforge.bench import cycle_time, timed
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
        out.append(cycle_time([lambda args=args: _native.quant_linear(x.numpy(), *args)], passes))
    out.append(cycle_time([lambda: torch.nn.functional.linear(x, ql.dequantize())], passes))
    return out


def _torchao(config: object) -> Callable[[nn.Linear], nn.Module]:
    from torchao.quantization import quantize_ as ao_quantize_

    def build(lin: nn.Linear) -> nn.Module:
        ao_quantize_(lin, config)
        return lin

    return build


def _quanto(weights: str) -> Callable[[nn.Linear], nn.Module]:
    from optimum import quanto

    def build(lin: nn.Linear) -> nn.Module:
        holder = nn.Sequential(lin)
        quanto.quantize(holder, weights=getattr(quanto, weights))
        quanto.freeze(holder)
        return holder[0]

    return build


def peer_variants() -> list[tuple[str, int, torch.dtype, float, Callable[[], object]]]:
    """(name, bits, activation dtype, weight bytes per element, factory of a layer builder).

    Each factory imports its library, so a missing or broken peer fails there, not at import.
    Weights are created in the activation dtype (torchao and quanto keep scales in it).
    """
    from torch import bfloat16 as bf16
    from torch import float32 as f32

    def ao_int8() -> Callable[[nn.Linear], nn.Module]:
        from torchao.quantization import Int8WeightOnlyConfig

        return _torchao(Int8WeightOnlyConfig())

    def ao_int4() -> Callable[[nn.Linear], nn.Module]:
        from torchao.quantization import Int4WeightOnlyConfig

        return _torchao(Int4WeightOnlyConfig(group_size=128))

    def ao_intx4() -> Callable[[nn.Linear], nn.Module]:
        from torchao.quantization import IntxWeightOnlyConfig
        from torchao.quantization.granularity import PerGroup

        return _torchao(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(128)))

    def ao_proto_int4() -> Callable[[nn.Linear], nn.Module]:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return _torchao(PrototypeInt4WeightOnlyConfig(group_size=128))

    def ao_da8w4() -> Callable[[nn.Linear], nn.Module]:
        from torchao.prototype.quantization.int4 import Int8DynamicActivationInt4WeightConfig

        return _torchao(Int8DynamicActivationInt4WeightConfig(group_size=128))

    def quanto_int4_fp32() -> Callable[[nn.Linear], nn.Module]:
        # fp32 x with qint4 weights runs quanto's C++ extension, JIT-built by ninja on first use.
        if shutil.which("ninja") is None:
            raise RuntimeError("quanto's fp32 int4 path JIT-builds a C++ extension: needs ninja")
        return _quanto("qint4")

    return [
        ("torchao Int8WeightOnly", 8, f32, 1.0, ao_int8),
        ("torchao Int8WeightOnly", 8, bf16, 1.0, ao_int8),
        ("torchao Int4WeightOnly g128", 4, bf16, 0.5, ao_int4),
        ("torchao Prototype Int4WeightOnly g128 (CPU)", 4, f32, 0.5, ao_proto_int4),
        ("torchao Prototype Int4WeightOnly g128 (CPU)", 4, bf16, 0.5, ao_proto_int4),
        ("torchao Int8DynamicActivationInt4Weight g128", 4, f32, 0.5, ao_da8w4),
        ("torchao IntxWeightOnly int4 g128 (int8 storage)", 4, f32, 1.0, ao_intx4),
        ("torchao IntxWeightOnly int4 g128 (int8 storage)", 4, bf16, 1.0, ao_intx4),
        ("quanto qint8", 8, f32, 1.0, lambda: _quanto("qint8")),
        ("quanto qint8", 8, bf16, 1.0, lambda: _quanto("qint8")),
        ("quanto qint4 g128", 4, f32, 0.5, quanto_int4_fp32),
        ("quanto qint4 g128", 4, bf16, 0.5, lambda: _quanto("qint4")),
    ]


def short_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:100] if lines else ''}"


def layer_count(bytes_per_layer: int, cold_bytes: int, cap: int) -> int:
    return max(2, min(cap, -(-cold_bytes // bytes_per_layer)))


def peer_rows(
    rows: list[tuple[str, int, float, float, int, str]],
    thread_counts: list[int],
    n: int,
    k: int,
    cold_bytes: int,
    cap: int,
    passes: int,
    pass_budget_s: float,
) -> None:
    """Times each torchao / optimum-quanto variant that builds and runs; n/a rows otherwise."""
    print("peers (build, check on one layer, then time on cold layers):")
    for name, bits, act, per_weight, factory in peer_variants():
        xl = "fp32" if act == torch.float32 else "bf16"
        label = f"{name}, {xl} x"
        x = torch.randn(1, k, generator=torch.Generator().manual_seed(1)).to(act)
        src = nn.Linear(k, n, bias=False)
        ref = x.double() @ src.weight.double().T
        group = 128 if bits == 4 else k
        nb = int(n * k * per_weight) + 2 * n * (k // group) * (4 if act == torch.float32 else 2)

        def copy_of(src: nn.Linear = src, act: torch.dtype = act) -> nn.Linear:
            lin = torch.nn.utils.skip_init(nn.Linear, k, n, bias=False, dtype=act)
            with torch.no_grad():
                lin.weight.copy_(src.weight)
            return lin

        try:
            build = factory()
            probe = build(copy_of())
            err = float((probe(x).double() - ref).norm() / ref.norm())
        except Exception as e:  # a missing peer, or one without this CPU kernel
            print(f"  {label}: n/a ({short_error(e)})")
            rows.extend((label, t, float("nan"), 0.0, bits, xl) for t in thread_counts)
            continue
        # A call far slower than streaming its weights is compute-bound: cold layers change
        # nothing there, so such a variant gets as many layers as fit in `pass_budget_s`.
        torch.set_num_threads(min(thread_counts))  # the slowest setting sizes the pass
        per_call = timed(lambda p=probe, x=x: (p(x), p(x)))[1] / 2
        count = min(layer_count(nb, cold_bytes, cap), max(2, int(pass_budget_s / per_call)))
        layers = [probe] + [build(copy_of()) for _ in range(count - 1)]
        print(f"  {label}: {len(layers)} layers, relative output error {err:.2e}")
        for threads in thread_counts:
            torch.set_num_threads(threads)
            t = cycle_time([lambda m=m, x=x: m(x) for m in layers], passes)
            rows.append((label, threads, t, nb / t / 1e9, bits, xl))
        del layers, probe
        gc.collect()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer layers and passes (< 1 minute)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--no-peers", action="store_true", help="skip torchao / optimum-quanto")
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
    # (name, threads, seconds per call, GB/s, weight bits or 0 for float, activation label)
    rows: list[tuple[str, int, float, float, int, str]] = []
    torch.set_grad_enabled(False)
    thread_counts = [int(t) for t in args.threads.split(",")]
    for threads in thread_counts:
        torch.set_num_threads(threads)
        slimforge.set_num_threads(threads)
        x32 = torch.randn(1, k)
        xbf = x32.bfloat16()

        def record(
            name: str,
            fns: list[Callable[[], object]],
            nbytes: int,
            threads: int = threads,
            bits: int = 0,
        ) -> None:
            act = "bf16" if name.endswith("bf16 x") else "fp32"
            try:
                t = cycle_time(fns, passes)
            except (RuntimeError, NotImplementedError, AttributeError, TypeError) as e:
                print(f"  {name}: n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
                rows.append((name, threads, float("nan"), 0.0, bits, act))
                return
            rows.append((name, threads, t, nbytes / t / 1e9, bits, act))

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
                        bits=bits,
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
                        bits=8,
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
                        bits=4,
                    )
                    del packed
                except (RuntimeError, AttributeError) as e:
                    print(f"  aten int4: n/a ({str(e).splitlines()[0][:80]})")
                    rows.append(
                        (
                            "aten _weight_int4pack_mm_for_cpu, bf16 x",
                            threads,
                            float("nan"),
                            0.0,
                            4,
                            "bf16",
                        )
                    )
            del layers
            gc.collect()

    if not args.no_peers:
        peer_rows(rows, thread_counts, n, k, cold_bytes, cap, passes, 0.2 if args.quick else 2.0)

    # "slimforge faster": this row's time / slimforge's best route, same bits, x dtype, threads.
    best_sf: dict[tuple[int, str, int], float] = {}
    for name, t, sec, _, bits, act in rows:
        if name.startswith("slimforge") and sec == sec:
            key = (bits, act, t)
            best_sf[key] = min(sec, best_sf.get(key, float("inf")))
    print(
        f"\n{'variant':<62} {'thr':>3} {'us/call':>9} {'GB/s':>7} {'vs fp32':>8} "
        f"{'slimforge faster':>16}"
    )
    base = {t: sec for name, t, sec, *_ in rows if name.startswith("torch nn.Linear fp32")}
    for name, t, sec, gbs, bits, act in rows:
        if sec != sec:
            print(f"{name:<62} {t:>3} {'n/a':>9}")
            continue
        sf = best_sf.get((bits, act, t))
        vs_sf = f"{sec / sf:>15.2f}x" if bits and sf and not name.startswith("slimforge") else ""
        print(f"{name:<62} {t:>3} {sec * 1e6:>9.0f} {gbs:>7.2f} {base[t] / sec:>7.2f}x {vs_sf}")

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
    print(f"\ncommand: PYTHONPATH=python python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
