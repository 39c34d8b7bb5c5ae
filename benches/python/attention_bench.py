"""Tiled attention vs torch SDPA (CPU flash backend) vs naive softmax(QK^T)V, in one process.

B = 4, H = 8, D = 64, fp32. Forward FLOPs = 4 B H N^2 D (halved for causal); forward+backward
counts 3.5x the forward. Also: a 256-wide sliding window at N = 4096 vs SDPA with a bool mask, and
the machine's sgemm rate (torch.mm 4096^3) as the peak reference.

    PYTHONPATH=python python benches/python/attention_bench.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from slimforge import _native
from slimforge.attention import flash_attention


def best_time(fn, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 1024 and 2048 only, one repetition")
    ap.add_argument("--threads", type=int, default=None, help="threads for torch and slimforge")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        _native.set_num_threads(args.threads)
    threads = _native.get_num_threads()
    torch_threads = torch.get_num_threads()
    reps = 1 if args.quick else 3
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
                    ours = best_time(lambda: flash_attention(q, k, v, causal=causal), reps)  # noqa: B023
                    ref = best_time(lambda: sdpa(q, k, v, causal), reps)  # noqa: B023
                    slow = (
                        best_time(lambda: naive(q, k, v, causal), 1)  # noqa: B023
                        if n <= 2048
                        else float("nan")
                    )
                else:
                    ours = best_time(fwd_bwd(flash_attention, q, k, v, dout, causal), reps)
                    ref = best_time(fwd_bwd(sdpa, q, k, v, dout, causal), reps)
                    slow = (
                        best_time(fwd_bwd(naive, q, k, v, dout, causal), 1)
                        if n <= 2048
                        else float("nan")
                    )
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
    ours = best_time(lambda: flash_attention(q, k, v, causal=True, window=(w - 1, 0)), reps)
    ref = best_time(lambda: sdpa_masked(q, k, v, mask), reps)
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
