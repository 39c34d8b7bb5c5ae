"""Tiled attention vs torch SDPA (CPU flash backend) vs naive softmax(QK^T)V, in one process.

B = 4, H = 8, D = 64, fp32. Engines take turns (best of `--reps` each), so a burst of load on a
shared machine does not fall on one engine only. Forward FLOPs = 4 B H N^2 D (halved for causal); forward+backward
counts 3.5x the forward. Also: a 256-wide sliding window at N = 4096 vs SDPA with a bool mask, and
the machine's sgemm rate (torch.mm 4096^3) as the peak reference.

    PYTHONPATH=python python benches/python/attention_bench.py [--quick] [--threads N]

`--cpu-time`: one thread, N = 2048, B = 1, process CPU time instead of wall clock (robust on a
busy machine: time spent waiting for a core is not counted).
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from slimforge import _native
from slimforge.attention import flash_attention
from slimforge.bench import CPU, best_time, best_times


def sgemm_rate(n: int, reps: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_time(lambda: torch.mm(a, b), reps) / 1e9


def sdpa(q, k, v, causal, mask=None):
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION if mask is None else SDPBackend.MATH):
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=causal,
        ).transpose(1, 2)


def sdpa_masked(q, k, v, mask):
    # The CPU flash backend refuses explicit masks; this is the best SDPA backend that takes one.
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask
    ).transpose(1, 2)


def naive(q, k, v, causal):
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    s = qt @ kt.transpose(-1, -2) * q.shape[-1] ** -0.5
    if causal:
        n = s.shape[-1]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (torch.softmax(s, dim=-1) @ vt).transpose(1, 2)


def fwd_bwd(fn, q, k, v, g, *args):
    def run():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        out = fn(qq, kk, vv, *args)
        torch.autograd.grad(out, (qq, kk, vv), g)

    return run


def cpu_time_comparison() -> None:
    torch.set_num_threads(1)
    _native.set_num_threads(1)
    b, h, n, d = 1, 8, 2048, 64
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(b, n, h, d, generator=g) for _ in range(4))
    print(f"1 thread, process CPU time, B={b} H={h} N={n} D={d} fp32, best of 3")
    for causal in (False, True):
        flops = 4 * b * h * n * n * d / (2 if causal else 1) / 1e9
        cases = {
            "ours fwd": lambda: flash_attention(q, k, v, causal=causal),  # noqa: B023
            "sdpa fwd": lambda: sdpa(q, k, v, causal),  # noqa: B023
            "ours fwd+bwd": fwd_bwd(flash_attention, q, k, v, dout, causal),
            "sdpa fwd+bwd": fwd_bwd(sdpa, q, k, v, dout, causal),
        }
        best = best_times(cases, 3, warmup=False, clock=CPU)
        kind = "causal" if causal else "full"
        for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            ours, ref = best[f"ours {mode}"], best[f"sdpa {mode}"]
            print(
                f"{kind:<6} {mode:<8} ours {ours:.3f} s {flops * mult / ours:6.1f} GF/s   "
                f"sdpa {ref:.3f} s {flops * mult / ref:6.1f} GF/s   ours/sdpa speed {ref / ours:.2f}x"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 1024 and 2048 only, one repetition")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and slimforge")
    ap.add_argument("--reps", type=int, default=5, help="timed runs per engine, taking turns")
    ap.add_argument("--cpu-time", action="store_true", help="1-thread CPU-time comparison only")
    args = ap.parse_args()
    if args.cpu_time:
        cpu_time_comparison()
        return
    if args.threads:
        torch.set_num_threads(args.threads)
        _native.set_num_threads(args.threads)
    threads = _native.get_num_threads()
    torch_threads = torch.get_num_threads()
    reps = 1 if args.quick else args.reps
    sizes = [1024] if args.quick else [1024, 2048, 4096]
    b, h, d = (1 if args.quick else 4), 8, 64
    peak = sgemm_rate(2048 if args.quick else 4096, reps)
    print(f"threads: slimforge {threads}, torch {torch_threads}; B={b} H={h} D={d} fp32")
    print(f"sgemm (torch.mm) {peak:.1f} GFLOP/s = peak reference\n")
    header = f"{'case':<24}{'ours s':>9}{'GF/s':>8}{'%peak':>7}{'sdpa s':>9}{'GF/s':>8}"
    print(header + f"{'naive s':>9}{'ours/sdpa speed':>17}")
    for n in sizes:
        g = torch.Generator().manual_seed(n)
        q, k, v, dout = (torch.randn(b, n, h, d, generator=g) for _ in range(4))
        for causal in (False, True):
            flops = 4 * b * h * n * n * d / (2 if causal else 1)
            for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                if mode == "fwd":
                    pair = {
                        "ours": lambda: flash_attention(q, k, v, causal=causal),  # noqa: B023
                        "sdpa": lambda: sdpa(q, k, v, causal),  # noqa: B023
                    }
                    slow_fn = lambda: naive(q, k, v, causal)  # noqa: B023, E731
                else:
                    pair = {
                        "ours": fwd_bwd(flash_attention, q, k, v, dout, causal),
                        "sdpa": fwd_bwd(sdpa, q, k, v, dout, causal),
                    }
                    slow_fn = fwd_bwd(naive, q, k, v, dout, causal)
                best = best_times(pair, reps)
                ours, ref = best["ours"], best["sdpa"]
                slow = best_time(slow_fn, 1) if n <= 2048 else float("nan")
                f = flops * mult / 1e9
                name = f"N={n} {'causal' if causal else 'full'} {mode}"
                print(
                    f"{name:<24}{ours:>9.3f}{f / ours:>8.1f}{100 * f / ours / peak:>6.0f}%"
                    f"{ref:>9.3f}{f / ref:>8.1f}{slow:>9.3f}{ref / ours:>16.2f}x"
                )
    n = 2048 if args.quick else 4096
    w = 256
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, h, d, generator=g) for _ in range(3))
    i = torch.arange(n)
    mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - w)
    best = best_times(
        {
            "ours": lambda: flash_attention(q, k, v, causal=True, window=(w - 1, 0)),
            "sdpa": lambda: sdpa_masked(q, k, v, mask),
        },
        reps,
    )
    ours, ref = best["ours"], best["sdpa"]
    err = (
        (flash_attention(q, k, v, causal=True, window=(w - 1, 0)) - sdpa_masked(q, k, v, mask))
        .abs()
        .max()
    )
    print(
        f"\nsliding window {w}, N={n} fwd: ours {ours:.3f} s, SDPA + bool mask {ref:.3f} s "
        f"-> {ref / ours:.1f}x (max |diff| {err:.1e})"
    )


if __name__ == "__main__":
    main()
