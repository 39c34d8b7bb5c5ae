"""CUDA kernels vs PyTorch on the same GPU, in one process.

Attention: TFLOP/s of forward and forward+backward, slimforge's NVRTC kernel vs torch SDPA's
flash backend (bf16, layout (batch, seqlen, heads, head_dim)); forward FLOPs 4*B*H*N^2*D (halved
for causal), forward+backward 3.5x that. MoE: GB/s of permute (xs = x[token_of]) vs torch
indexing and of combine (y[t] = sum_s w[t,s] * ys[pos[t,s]]) vs torch gather-multiply-sum, counting
bytes read and written once. Quantized GEMV (1-8 tokens, bf16 activations): time and weight GB/s
of the fused INT4 g128 / INT8 kernel vs a bf16 `F.linear` (cuBLAS) with the same shape and vs
dequantize-then-`F.linear` (what CUDA `QuantLinear` did before the kernel).

    python benches/python/cuda_bench.py [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from slimforge import _cuda
from slimforge.bench import cuda_time


def bench_attention(batch, seqlen, heads, head_dim, causal, dtype, warmup, iters):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, seqlen, heads, head_dim)
    q, k, v, dout = (torch.randn(shape, device="cuda", dtype=dtype, generator=g) for _ in range(4))
    fwd_flops = 4 * batch * heads * seqlen * seqlen * head_dim / (2 if causal else 1)

    def ours_fwd():
        return _cuda.flash_attention_forward_cuda(q, k, v, causal)

    out, lse = ours_fwd()

    def ours_fwd_bwd():
        o, l_ = _cuda.flash_attention_forward_cuda(q, k, v, causal)
        _cuda.flash_attention_backward_cuda(dout, q, k, v, o, l_, causal)

    qt, kt, vt = (t.transpose(1, 2).detach().requires_grad_(True) for t in (q, k, v))
    dt = dout.transpose(1, 2)

    def sdpa_fwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    def sdpa_fwd_bwd():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        torch.autograd.grad(o, (qt, kt, vt), dt)

    diff = (out.float() - sdpa_fwd().transpose(1, 2).float()).abs().max().item()
    row = {
        "kernel": "attention",
        "batch": batch,
        "seqlen": seqlen,
        "heads": heads,
        "head_dim": head_dim,
        "causal": causal,
        "dtype": str(dtype).removeprefix("torch."),
        "max_abs_diff_vs_sdpa": diff,
    }
    for name, ours, peer, flops in (
        ("fwd", ours_fwd, sdpa_fwd, fwd_flops),
        ("fwd_bwd", ours_fwd_bwd, sdpa_fwd_bwd, 3.5 * fwd_flops),
    ):
        t_ours, t_peer = cuda_time(ours, warmup, iters), cuda_time(peer, warmup, iters)
        row[f"{name}_tflops"] = flops / t_ours / 1e12
        row[f"{name}_sdpa_tflops"] = flops / t_peer / 1e12
        row[f"{name}_ratio"] = t_peer / t_ours
    return row


def bench_moe(tokens, dim, top_k, dtype, warmup, iters):
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(tokens, dim, device="cuda", dtype=dtype, generator=g)
    assignments = tokens * top_k
    order = torch.randperm(assignments, device="cuda", generator=g)
    token_of = order // top_k
    pos = torch.empty_like(order)
    pos[order] = torch.arange(assignments, device="cuda")
    pos = pos.view(tokens, top_k)
    w = torch.rand(tokens, top_k, device="cuda", generator=g)
    xs = _cuda.moe_permute_cuda(x, token_of)
    assert torch.equal(xs, x[token_of])
    elem = x.element_size()
    rows = []
    moved = 2 * assignments * dim * elem
    t_ours = cuda_time(lambda: _cuda.moe_permute_cuda(x, token_of), warmup, iters)
    t_peer = cuda_time(lambda: x[token_of], warmup, iters)
    rows.append(
        {
            "kernel": "moe_permute",
            "tokens": tokens,
            "dim": dim,
            "top_k": top_k,
            "dtype": str(dtype).removeprefix("torch."),
            "gbps": moved / t_ours / 1e9,
            "torch_gbps": moved / t_peer / 1e9,
            "ratio": t_peer / t_ours,
        }
    )
    moved = (assignments + tokens) * dim * elem
    t_ours = cuda_time(lambda: _cuda.moe_combine_cuda(xs, pos, w), warmup, iters)
    t_peer = cuda_time(lambda: (w[..., None].to(dtype) * xs[pos]).sum(1), warmup, iters)
    rows.append(
        {
            "kernel": "moe_combine",
            "tokens": tokens,
            "dim": dim,
            "top_k": top_k,
            "dtype": str(dtype).removeprefix("torch."),
            "gbps": moved / t_ours / 1e9,
            "torch_gbps": moved / t_peer / 1e9,
            "ratio": t_peer / t_ours,
        }
    )
    return rows


def bench_quant_gemv(tokens, out, k, bits, warmup, iters):
    g = torch.Generator(device="cuda").manual_seed(2)
    gs = 128 if bits == 4 else k
    codes = torch.randint(0, 2**bits, (out, k), device="cuda", generator=g, dtype=torch.uint8)
    qweight = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous() if bits == 4 else codes
    scales = torch.rand(out, k // gs, device="cuda", generator=g) * 0.01 + 1e-3
    zeros = torch.full((out, k // gs), 2.0 ** (bits - 1), device="cuda")
    x = torch.randn(tokens, k, device="cuda", generator=g, dtype=torch.bfloat16)
    w = ((codes.float() - zeros.repeat_interleave(gs, 1)) * scales.repeat_interleave(gs, 1)).to(
        torch.bfloat16
    )

    def ours():
        return _cuda.quant_linear_cuda(x, qweight, scales, zeros, None, bits, gs)

    def dequant_linear():
        q = codes if bits == 8 else torch.stack((qweight & 15, qweight >> 4), -1).reshape(out, k)
        wd = (q.float() - zeros.repeat_interleave(gs, 1)) * scales.repeat_interleave(gs, 1)
        return torch.nn.functional.linear(x, wd.to(torch.bfloat16))

    diff = (ours().float() - torch.nn.functional.linear(x, w).float()).abs().max().item()
    t_ours = cuda_time(ours, warmup, iters)
    t_bf16 = cuda_time(lambda: torch.nn.functional.linear(x, w), warmup, iters)
    t_deq = cuda_time(dequant_linear, warmup, iters)
    weight_bytes = qweight.numel() + 8 * scales.numel()
    return {
        "kernel": f"quant_gemv_int{bits}",
        "tokens": tokens,
        "out": out,
        "k": k,
        "us": t_ours * 1e6,
        "weight_gbps": weight_bytes / t_ours / 1e9,
        "bf16_linear_us": t_bf16 * 1e6,
        "dequant_linear_us": t_deq * 1e6,
        "ratio_vs_bf16": t_bf16 / t_ours,
        "ratio_vs_dequant": t_deq / t_ours,
        "max_abs_diff_vs_bf16": diff,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="few shapes, few iterations (< 1 minute)"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if not _cuda.cuda_available():
        print(f"CUDA kernels unavailable: {_cuda.cuda_unavailable_reason()}; nothing to measure")
        return 0
    warmup, iters = (2, 5) if args.quick else (3, 20)
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    results = []
    seqlens = [1024, 4096] if args.quick else [512, 1024, 2048, 4096, 8192]
    head_dims = [64, 128]
    for head_dim in head_dims:
        for seqlen in seqlens:
            for causal in (False, True):
                batch = max(1, 16384 // seqlen)
                heads = 2048 // head_dim
                row = bench_attention(
                    batch, seqlen, heads, head_dim, causal, torch.bfloat16, warmup, iters
                )
                results.append(row)
                print(
                    f"attention B={batch} N={seqlen} H={heads} D={head_dim} causal={causal!s:5}: "
                    f"fwd {row['fwd_tflops']:7.1f} TFLOP/s (sdpa {row['fwd_sdpa_tflops']:6.1f}, x{row['fwd_ratio']:.2f})  "
                    f"fwd+bwd {row['fwd_bwd_tflops']:7.1f} (sdpa {row['fwd_bwd_sdpa_tflops']:6.1f}, "
                    f"x{row['fwd_bwd_ratio']:.2f})  max|diff| {row['max_abs_diff_vs_sdpa']:.2e}",
                    flush=True,
                )
    moe_shapes = (
        [(8192, 4096, 2)] if args.quick else [(8192, 1024, 2), (16384, 4096, 2), (16384, 7168, 8)]
    )
    for tokens, dim, top_k in moe_shapes:
        for row in bench_moe(tokens, dim, top_k, torch.bfloat16, warmup, iters):
            results.append(row)
            print(
                f"{row['kernel']:12} T={tokens} D={dim} k={top_k}: {row['gbps']:7.1f} GB/s "
                f"(torch {row['torch_gbps']:7.1f}, x{row['ratio']:.2f})",
                flush=True,
            )
    gemv_shapes = (
        [(1, 4096, 4096)] if args.quick else [(1, 4096, 4096), (8, 4096, 4096), (1, 14336, 4096)]
    )
    for tokens, out, k in gemv_shapes:
        for bits in (4, 8):
            row = bench_quant_gemv(tokens, out, k, bits, warmup, iters)
            results.append(row)
            print(
                f"{row['kernel']:15} m={tokens} {out}x{k}: {row['us']:7.1f} us "
                f"({row['weight_gbps']:6.0f} GB/s of weights); bf16 F.linear {row['bf16_linear_us']:7.1f} us "
                f"(x{row['ratio_vs_bf16']:.2f}), dequant + F.linear {row['dequant_linear_us']:7.1f} us "
                f"(x{row['ratio_vs_dequant']:.2f}); max|diff| {row['max_abs_diff_vs_bf16']:.2e}",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "gpu": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "results": results,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
