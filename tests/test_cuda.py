"""CUDA backend tests.

Three layers:
- NVRTC compiles every kernel to PTX/cubin (no GPU needed; NVRTC comes with torch's CUDA wheels).
- The same CUDA sources run on the CPU under a host emulation (rust/cuda/emulation, built with
  g++): every thread is an OS thread and __syncthreads() a barrier. This checks the kernels'
  indexing, masking, tiling and barriers against float64 references without a GPU.
- `@pytest.mark.cuda` tests run the real kernels through slimforge._cuda on a GPU (skipped
  without one).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimforge import _cuda, _native

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "rust" / "cuda" / "kernels"
EMULATION = ROOT / "rust" / "cuda" / "emulation" / "host_emulation.cpp"
TPR = 4  # threads per row in kernels/attention.cu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ELEM = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# (causal, window_left, window_right)
MASKS = {
    "full": (False, -1, -1),
    "causal": (True, -1, -1),
    "window": (False, 5, 3),
    "causal_window": (True, 7, -1),
    "left_only": (False, 4, -1),
    "right_only": (False, -1, 2),
}


# ----------------------------------------------------------------------------------------------
# float64 reference


def reference_attention(
    q, k, v, causal, window_left, window_right, scale, softcap, cu_seqlens=None
):
    """Plain attention in the inputs' precision (use float64 for the truth): (out, lse).

    q (B, Nq, H, D) / k, v (B, Nk, Hkv, D), or packed (total, H, D) with cu_seqlens. lse is
    (B, H, Nq) or (H, total). Rows with no visible key give out 0 and lse -inf.
    """
    if cu_seqlens is not None:
        outs, lses = [], []
        bounds = cu_seqlens.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            o, l_ = reference_attention(
                q[None, a:b],
                k[None, a:b],
                v[None, a:b],
                causal,
                window_left,
                window_right,
                scale,
                softcap,
            )
            outs.append(o[0])
            lses.append(l_[0])
        return torch.cat(outs, 0), torch.cat(lses, 1)
    _, nq, hq, _ = q.shape
    nk, hkv = k.shape[1], k.shape[2]
    group = hq // hkv
    kk = k.repeat_interleave(group, dim=2).transpose(1, 2)
    vv = v.repeat_interleave(group, dim=2).transpose(1, 2)
    qq = q.transpose(1, 2)
    s = (qq @ kk.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    off = nk - nq
    i = torch.arange(nq, device=q.device)[:, None]
    j = torch.arange(nk, device=q.device)[None, :]
    right = 0 if causal else window_right
    mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    if window_left >= 0:
        mask &= j >= i + off - window_left
    if right >= 0:
        mask &= j <= i + off + right
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # keeps gradients NaN-free
    p = torch.exp(s - safe[..., None])
    out = (p @ vv).transpose(1, 2)
    return out, lse


def reference_grads(q, k, v, dout, *args, cu_seqlens=None):
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, _ = reference_attention(qq, kk, vv, *args, cu_seqlens=cu_seqlens)
    out.backward(dout)
    return qq.grad, kk.grad, vv.grad


def random_inputs(batch, nq, nk, hq, hkv, d, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, nq, hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(batch, nk, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, nk, hkv, d, generator=g, dtype=torch.float64)
    dout = torch.randn(batch, nq, hq, d, generator=g, dtype=torch.float64)
    return [t.to(dtype).to(device) for t in (q, k, v, dout)]


def max_err(a, b):
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    assert torch.equal(torch.isfinite(a), finite), "-inf pattern differs from the reference"
    return (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0


def assert_close_to_reference(name, ours, truth, torch_same_precision, floor):
    """Error of ours vs the float64 truth is at most twice torch's same-precision error (plus a
    floor relative to the values' magnitude, for when torch happens to be nearly exact)."""
    err = max_err(ours, truth)
    ref = max_err(torch_same_precision, truth)
    finite = truth[torch.isfinite(truth)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    assert err <= 2 * ref + floor * scale, f"{name}: error {err:.3g} vs torch's {ref:.3g}"


FLOOR = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


# ----------------------------------------------------------------------------------------------
# NVRTC compilation (no GPU)


def nvrtc_or_skip() -> tuple[int, int]:
    if not _native.built_with_cuda():
        pytest.skip("extension built without the `cuda` feature")
    _cuda.preload_nvrtc()
    try:
        return _native.cuda_nvrtc_version()
    except RuntimeError as e:
        pytest.skip(f"NVRTC not found: {e}")


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_every_kernel_compiles_to_ptx(arch):
    nvrtc_or_skip()
    modules = _native.cuda_compile_check(arch)
    for dtype in ("float32", "bfloat16", "float16"):
        assert f"attention[{dtype}, head_dim=64]" in modules
        assert f"moe[{dtype}, int64]" in modules
        assert f"quant[{dtype}, int4]" in modules
        assert f"quant[{dtype}, int8]" in modules
    assert all(size > 1000 for size in modules.values()), modules


@pytest.mark.slow
def test_kernels_compile_to_cubin_for_hopper():
    nvrtc_or_skip()
    modules = _native.cuda_compile_check("sm_90")
    assert len(modules) >= 8


def test_compile_check_rejects_bad_arch():
    if not _native.built_with_cuda():
        pytest.skip("extension built without the `cuda` feature")
    with pytest.raises(ValueError, match="architecture"):
        _native.cuda_compile_check("ampere")


def test_nvrtc_is_found_from_the_torch_wheels():
    dirs = _cuda.nvrtc_library_dirs()
    if not any(d.glob("libnvrtc.so.*") for d in dirs):
        pytest.skip("no nvidia-*-nvrtc wheel installed")
    major, _ = nvrtc_or_skip()
    assert major >= 12


def test_missing_driver_or_gpu_is_a_clean_error():
    """No panic reaches Python: without a GPU every entry raises RuntimeError."""
    if _cuda.cuda_available():
        assert _native.cuda_device_arch(torch.cuda.current_device()).startswith("sm_")
        return
    assert _cuda.cuda_unavailable_reason()
    if _native.built_with_cuda():
        with pytest.raises(RuntimeError, match="CUDA|driver|device"):
            _native.cuda_device_arch(0)
        call = dict(device=0, stream=0, dtype="float32", index_bits=64, x=16, token_of=16, xs=16)
        with pytest.raises(RuntimeError):
            _native.cuda_moe_permute(**call, rows_out=1, rows_x=1, dim=4)
    else:
        with pytest.raises(RuntimeError, match="cuda"):
            _native.cuda_compile_check("compute_80")


def test_cpu_tensors_are_rejected_before_any_cuda_call():
    q, k, v, dout = random_inputs(1, 4, 4, 1, 1, 8, torch.float32, 0)
    with pytest.raises(TypeError, match="CUDA"):
        _cuda.flash_attention_forward_cuda(q, k, v)
    with pytest.raises(TypeError, match="CUDA"):
        _cuda.flash_attention_backward_cuda(dout, q, k, v, q, torch.zeros(1, 1, 4))
    with pytest.raises(TypeError, match="CUDA"):
        _cuda.moe_permute_cuda(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="CUDA"):
        _cuda.moe_combine_cuda(
            torch.zeros(2, 4), torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2)
        )


def test_native_launchers_validate_before_touching_the_gpu():
    if not _native.built_with_cuda():
        pytest.skip("extension built without the `cuda` feature")
    base = dict(
        device=0, stream=0, dtype="float32", q=16, k=16, v=16, out=16, lse=16, cu_seqlens=0,
        batch=1, seqlen_q=4, seqlen_k=4, heads_q=4, heads_kv=2, head_dim=64, max_seqlen=0,
        causal=False, window_left=-1, window_right=-1, softmax_scale=0.125, softcap=0.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="head_dim"):
        _native.cuda_attention_forward(**{**base, "head_dim": 60})
    with pytest.raises(ValueError, match="heads"):
        _native.cuda_attention_forward(**{**base, "heads_kv": 3})
    with pytest.raises(ValueError, match="null"):
        _native.cuda_attention_forward(**{**base, "k": 0})
    with pytest.raises(TypeError, match="dtype"):
        _native.cuda_attention_forward(**{**base, "dtype": "int8"})
    # Empty inputs are a no-op that needs no GPU.
    _native.cuda_attention_forward(**{**base, "seqlen_q": 0, "q": 0, "out": 0, "lse": 0})


# ----------------------------------------------------------------------------------------------
# Host emulation of the kernels (g++)


class AttnParams(ctypes.Structure):
    _fields_ = [
        *[
            (n, ctypes.c_uint64)
            for n in ("q", "k", "v", "out", "lse", "cu_seqlens", "dout", "delta", "dq", "dk", "dv")
        ],
        *[
            (n, ctypes.c_int32)
            for n in (
                "seqlen_q",
                "seqlen_k",
                "heads_q",
                "heads_kv",
                "lse_batch_stride",
                "lse_head_stride",
                "window_left",
                "window_right",
            )
        ],
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
    ]


def fwd_smem(d, m, n):
    return 4 * (m * (d + 1) + 2 * n * (d + 1) + m * (n + 1))


def dkv_smem(d, m, n):
    return 4 * (2 * n * (d + 1) + 2 * m * (d + 1) + 2 * n * (m + 1) + 2 * m)


def dq_smem(d, m, n):
    return 4 * (2 * m * (d + 1) + 2 * n * (d + 1) + m * (n + 1))


@functools.cache
def emulator(
    elem: int,
    head_dim: int,
    tiles: tuple[int, int, int, int],
    idx_bits: int = 64,
    rpt: int = 2,
    bits: int = 4,
) -> ctypes.CDLL:
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found: host emulation of the CUDA kernels needs it")
    fm, fn, bm, bn = tiles
    flags = [
        f"-DELEM={elem}",
        f"-DHEAD_DIM={head_dim}",
        f"-DFWD_BLOCK_M={fm}",
        f"-DFWD_BLOCK_N={fn}",
        f"-DFWD_RPT={rpt}",
        f"-DBWD_BLOCK_M={bm}",
        f"-DBWD_BLOCK_N={bn}",
        f"-DIDX_BITS={idx_bits}",
        f"-DBITS={bits}",
    ]
    sources = b"".join(p.read_bytes() for p in sorted(KERNELS.iterdir())) + EMULATION.read_bytes()
    tag = hashlib.sha256(sources + " ".join(flags).encode()).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"slimforge-cuda-emulation-{tag}.so"
    if not out.exists():
        tmp = out.with_suffix(f".{id(flags)}.tmp")
        cmd = [
            gxx,
            "-std=c++20",
            "-O1",
            "-shared",
            "-fPIC",
            "-pthread",
            "-Wno-unknown-pragmas",
            *flags,
        ]
        subprocess.run([*cmd, str(EMULATION), "-o", str(tmp)], check=True, capture_output=True)
        tmp.replace(out)
    lib = ctypes.CDLL(str(out))
    lib.emu_attention.argtypes = [
        ctypes.c_char_p,
        ctypes.POINTER(AttnParams),
        *[ctypes.c_uint] * 4,
        ctypes.c_size_t,
    ]
    i64 = ctypes.c_int64
    lib.emu_moe_permute.argtypes = [
        ctypes.c_int,
        *[ctypes.c_void_p] * 3,
        i64,
        i64,
        i64,
        *[ctypes.c_uint] * 3,
    ]
    lib.emu_moe_combine.argtypes = [
        *[ctypes.c_void_p] * 4,
        i64,
        i64,
        i64,
        i64,
        ctypes.c_uint,
        ctypes.c_uint,
    ]
    lib.emu_quant_gemv.argtypes = [
        *[ctypes.c_void_p] * 6,
        ctypes.c_int,
        i64,
        i64,
        i64,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_uint,
        ctypes.c_size_t,
    ]
    return lib


def cdiv(a, b):
    return -(-a // b)


def emulated_attention(
    q,
    k,
    v,
    dout,
    causal,
    window_left,
    window_right,
    scale,
    softcap,
    tiles,
    cu_seqlens=None,
    rpt=None,
):
    """Runs attn_fwd, then the three backward kernels, with the launchers' geometry."""
    fm, fn, bm, bn = tiles
    d = q.shape[-1]
    if rpt is None:
        rpt = 2 if d <= 128 else 1  # as AttnConfig::choose
    lib = emulator(ELEM[q.dtype], d, tiles, rpt=rpt)
    varlen = cu_seqlens is not None
    if varlen:
        total, hq, _ = q.shape
        hkv = k.shape[1]
        batch = cu_seqlens.numel() - 1
        nq = nk = total
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        len_q = len_k = max(lens) if lens else 0
        lse = torch.empty(hq, total, dtype=torch.float32)
        lse_strides = (0, total)
    else:
        batch, nq, hq, _ = q.shape
        nk, hkv = k.shape[1], k.shape[2]
        len_q, len_k = nq, nk
        lse = torch.empty(batch, hq, nq, dtype=torch.float32)
        lse_strides = (hq * nq, nq)
    q, k, v, dout = (t.contiguous() for t in (q, k, v, dout))
    out = torch.full_like(q, float("nan"))
    delta = torch.full_like(lse, float("nan"))
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    cu = cu_seqlens.to(torch.int32).contiguous() if varlen else None
    p = AttnParams(
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        out=out.data_ptr(),
        lse=lse.data_ptr(),
        cu_seqlens=cu.data_ptr() if cu is not None else 0,
        dout=dout.data_ptr(),
        delta=delta.data_ptr(),
        dq=dq.data_ptr(),
        dk=dk.data_ptr(),
        dv=dv.data_ptr(),
        seqlen_q=nq,
        seqlen_k=nk,
        heads_q=hq,
        heads_kv=hkv,
        lse_batch_stride=lse_strides[0],
        lse_head_stride=lse_strides[1],
        window_left=window_left,
        window_right=0 if causal else window_right,
        scale=scale,
        softcap=softcap,
    )
    launches = [
        (b"attn_fwd", (cdiv(len_q, fm), hq, batch), fm // rpt * TPR, fwd_smem(d, fm, fn)),
        (b"attn_bwd_delta", (cdiv(len_q, bm), hq, batch), bm, 0),
        (b"attn_bwd_dkv", (cdiv(len_k, bn), hkv, batch), bn * TPR, dkv_smem(d, bm, bn)),
        (b"attn_bwd_dq", (cdiv(len_q, bm), hq, batch), bm * TPR, dq_smem(d, bm, bn)),
    ]
    for name, grid, block, smem in launches:
        rc = lib.emu_attention(name, ctypes.byref(p), *grid, block, smem)
        assert rc == 0, f"{name.decode()}: threads of a block disagreed on __syncthreads() counts"
    return out, lse, dq, dk, dv


SMALL_TILES = (16, 16, 16, 16)


def check_emulated(
    batch,
    nq,
    nk,
    hq,
    hkv,
    d,
    dtype,
    mask,
    softcap,
    seed,
    tiles=SMALL_TILES,
    varlen_lens=None,
    rpt=None,
):
    causal, wl, wr = MASKS[mask]
    scale = d**-0.5
    cu = None
    if varlen_lens is not None:
        total = sum(varlen_lens)
        q, k, v, dout = (t[0] for t in random_inputs(1, total, total, hq, hkv, d, dtype, seed))
        cu = torch.tensor([0, *torch.tensor(varlen_lens).cumsum(0).tolist()], dtype=torch.int32)
    else:
        q, k, v, dout = random_inputs(batch, nq, nk, hq, hkv, d, dtype, seed)
    args = (causal, wl, wr, scale, softcap)
    out, lse, dq, dk, dv = emulated_attention(q, k, v, dout, *args, tiles, cu_seqlens=cu, rpt=rpt)
    as64 = [t.double() for t in (q, k, v, dout)]
    out64, lse64 = reference_attention(*as64[:3], *args, cu_seqlens=cu)
    grads64 = reference_grads(*as64, *args, cu_seqlens=cu)
    out_pt, _ = reference_attention(q, k, v, *args, cu_seqlens=cu)
    grads_pt = reference_grads(q, k, v, dout, *args, cu_seqlens=cu)
    floor = FLOOR[dtype]
    assert_close_to_reference("out", out, out64, out_pt, floor)
    assert max_err(lse, lse64) <= 1e-4, "lse"
    for name, ours, truth, pt in zip(
        ("dq", "dk", "dv"), (dq, dk, dv), grads64, grads_pt, strict=True
    ):
        assert_close_to_reference(name, ours, truth, pt, floor)


@pytest.mark.parametrize("mask", list(MASKS))
def test_emulated_attention_masks(mask):
    check_emulated(2, 37, 37, 4, 2, 16, torch.float32, mask, 0.0, seed=1)


@pytest.mark.parametrize("mask", ["causal", "window", "full"])
def test_emulated_attention_unequal_lengths_bottom_right(mask):
    check_emulated(1, 21, 45, 2, 1, 16, torch.float32, mask, 0.0, seed=2)
    check_emulated(1, 45, 21, 2, 2, 16, torch.float32, mask, 0.0, seed=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_attention_half_precision(dtype):
    check_emulated(1, 40, 40, 4, 1, 16, dtype, "causal", 0.0, seed=4)


def test_emulated_attention_softcap_and_gqa():
    check_emulated(1, 33, 33, 6, 2, 16, torch.float32, "causal", 5.0, seed=5)


def test_emulated_attention_varlen():
    check_emulated(
        0, 0, 0, 2, 1, 16, torch.float32, "causal", 0.0, seed=6, varlen_lens=[5, 0, 37, 16]
    )
    check_emulated(0, 0, 0, 4, 4, 16, torch.float32, "window", 0.0, seed=7, varlen_lens=[23, 1, 9])


def test_emulated_attention_fully_masked_rows():
    # seqlen_k < seqlen_q with causal: the first rows see no key -> out 0, lse -inf, zero grads.
    q, k, v, dout = random_inputs(1, 20, 6, 2, 2, 16, torch.float32, seed=8)
    out, lse, dq, _, _ = emulated_attention(q, k, v, dout, True, -1, -1, 0.25, 0.0, SMALL_TILES)
    assert torch.isneginf(lse[:, :, :14]).all() and torch.isfinite(lse[:, :, 14:]).all()
    assert (out[:, :14] == 0).all() and (dq[:, :14] == 0).all()
    check_emulated(1, 20, 6, 2, 2, 16, torch.float32, "causal", 0.0, seed=8)


def test_emulated_attention_one_row_per_thread():
    # The forward layout used for head_dim 256 (no register tiling over rows).
    check_emulated(2, 37, 29, 2, 1, 16, torch.float32, "window", 0.0, seed=10, rpt=1)
    check_emulated(1, 30, 30, 2, 2, 16, torch.bfloat16, "causal", 2.0, seed=11, rpt=1)


def test_emulated_attention_production_tiles():
    # The tiles the launcher picks for head_dim 64 on a large-shared-memory GPU.
    check_emulated(
        1, 70, 150, 2, 1, 64, torch.float32, "causal", 0.0, seed=9, tiles=(128, 64, 32, 32)
    )


@settings(max_examples=8, deadline=None)
@given(
    nq=st.integers(1, 40),
    nk=st.integers(1, 40),
    heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]),
    mask=st.sampled_from(list(MASKS)),
    softcap=st.sampled_from([0.0, 3.0]),
    seed=st.integers(0, 2**16),
)
def test_emulated_attention_property(nq, nk, heads, mask, softcap, seed):
    check_emulated(1, nq, nk, heads[0], heads[1], 8, torch.float32, mask, softcap, seed)


def emulated_permute(x, token_of, vec16):
    lib = emulator(
        ELEM[x.dtype], 16, SMALL_TILES, idx_bits=64 if token_of.dtype == torch.int64 else 32
    )
    rows = token_of.shape[0]
    dim = x[0].numel() if x.shape[0] else 0
    xs = torch.full((rows, *x.shape[1:]), float("nan"), dtype=x.dtype)
    units = dim * x.element_size() // 16 if vec16 else dim
    bx = cdiv(min(max(units, 1), 256), 32) * 32
    by = max(256 // bx, 1)
    rc = lib.emu_moe_permute(
        int(vec16),
        x.data_ptr(),
        token_of.data_ptr(),
        xs.data_ptr(),
        rows,
        x.shape[0],
        units,
        cdiv(rows, by),
        bx,
        by,
    )
    assert rc == 0
    return xs


def emulated_combine(ys, pos, weights):
    lib = emulator(ELEM[ys.dtype], 16, SMALL_TILES, idx_bits=64 if pos.dtype == torch.int64 else 32)
    tokens, top_k = pos.shape
    dim = ys[0].numel()
    y = torch.full((tokens, dim), float("nan"), dtype=ys.dtype)
    w = weights.float().contiguous()
    bx = cdiv(min(max(dim, 1), 256), 32) * 32
    rc = lib.emu_moe_combine(
        ys.data_ptr(),
        pos.data_ptr(),
        w.data_ptr(),
        y.data_ptr(),
        tokens,
        top_k,
        ys.shape[0],
        dim,
        tokens,
        bx,
    )
    assert rc == 0
    return y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_emulated_moe_permute_is_exact(dtype, index_dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(13, 40, generator=g).to(dtype)
    token_of = torch.randint(0, 13, (29,), generator=g).to(index_dtype)
    token_of[3] = -1  # out of range: zero row
    token_of[7] = 13
    expected = x[token_of.clamp(0, 12).long()]
    expected[3] = 0
    expected[7] = 0
    for vec16 in (False, True):  # 40 * elem bytes is a multiple of 16 for every dtype
        assert torch.equal(emulated_permute(x, token_of, vec16), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulated_moe_combine_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    tokens, top_k, dim = 11, 3, 300  # dim > 256 threads: the column loop wraps
    ys = torch.randn(tokens * top_k, dim, generator=g).to(dtype)
    pos = torch.randperm(tokens * top_k, generator=g).reshape(tokens, top_k)
    pos[2, 1] = -1  # dropped slot
    w = torch.rand(tokens, top_k, generator=g)
    ours = emulated_combine(ys, pos, w)
    keep = (pos >= 0).double()
    truth = (w.double()[..., None] * keep[..., None] * ys.double()[pos.clamp(min=0)]).sum(1)
    same_precision = (
        (w[..., None] * keep[..., None] * ys.float()[pos.clamp(min=0)]).sum(1).to(dtype)
    )
    assert_close_to_reference("y", ours, truth, same_precision, 1e-6)


QG_ROWS, QG_MAX_TOKENS = 8, 8  # kernels/quant.cu


def random_quant_layer(out, k, bits, group_size, seed, bias=True):
    """Random codes, scales and (fractional) zero points in the QuantLinear layout."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (out, k), generator=g, dtype=torch.uint8)
    groups = k // group_size
    scales = torch.rand(out, groups, generator=g) * 0.1 + 0.01
    zeros = torch.rand(out, groups, generator=g) * (2**bits - 1)
    b = torch.randn(out, generator=g) if bias else None
    return codes, scales, zeros, b


def pack_nibbles(codes):
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def quant_reference(x, codes, scales, zeros, bias, group_size):
    w = (
        codes.double() - zeros.double().repeat_interleave(group_size, 1)
    ) * scales.double().repeat_interleave(group_size, 1)
    y = x.double() @ w.T
    return y if bias is None else y + bias.double()


def emulated_quant_gemv(x, qweight, scales, zeros, bias, bits, group_size, vec4=None):
    """vec4: read rows as 16-byte units (None: where the launcher would)."""
    lib = emulator(ELEM[x.dtype], 16, SMALL_TILES, bits=bits)
    tokens, k = x.shape
    out = qweight.shape[0]
    can = (k * bits // 8) % 16 == 0 and qweight.data_ptr() % 16 == 0
    vec4 = can if vec4 is None else vec4
    assert can or not vec4
    y = torch.full((tokens, out), float("nan"), dtype=x.dtype)
    rc = lib.emu_quant_gemv(
        x.data_ptr(),
        qweight.data_ptr(),
        scales.data_ptr(),
        zeros.data_ptr(),
        None if bias is None else bias.data_ptr(),
        y.data_ptr(),
        tokens,
        out,
        k,
        group_size,
        int(vec4),
        cdiv(out, QG_ROWS),
        32 * QG_ROWS,
        32 * QG_ROWS * QG_MAX_TOKENS * 4,
    )
    assert rc == 0
    return y


def check_quant_gemv(run, tokens, out, k, bits, group_size, dtype, bias, seed):
    codes, scales, zeros, b = random_quant_layer(out, k, bits, group_size, seed, bias)
    qweight = pack_nibbles(codes) if bits == 4 else codes
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = run(x, qweight, scales, zeros, b, bits, group_size)
    assert y.dtype == dtype and y.shape == (tokens, out)
    truth = quant_reference(x, codes, scales, zeros, b, group_size)
    w = (codes.float() - zeros.repeat_interleave(group_size, 1)) * scales.repeat_interleave(
        group_size, 1
    )
    same_precision = (x.float() @ w.T + (0 if b is None else b)).to(dtype)
    assert_close_to_reference("y", y.cpu(), truth, same_precision, FLOOR[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("vec4", [False, True])
def test_emulated_quant_gemv_matches_reference(dtype, bits, vec4):
    # 21 rows: the last block is partial; 8 tokens: the most one call takes; 16-byte or 4-byte
    # row reads (k = 512 allows both).
    run = functools.partial(emulated_quant_gemv, vec4=vec4)
    check_quant_gemv(run, 8, 21, 512, bits, 128, dtype, True, seed=bits)


@settings(max_examples=12, deadline=None)
@given(
    tokens=st.integers(1, QG_MAX_TOKENS),
    out=st.integers(1, 20),
    words=st.integers(1, 70),
    bits=st.sampled_from([4, 8]),
    group_words=st.sampled_from([1, 2, 4, 0]),
    bias=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_emulated_quant_gemv_property(tokens, out, words, bits, group_words, bias, seed):
    """Any row length (in 32-bit words, so the lane loop wraps or leaves lanes idle), group size
    (a word, a few words, or per-channel), token count and bias."""
    per_word = 8 if bits == 4 else 4
    k = words * per_word
    group_size = k if group_words == 0 or words % group_words else group_words * per_word
    check_quant_gemv(
        emulated_quant_gemv, tokens, out, k, bits, group_size, torch.float32, bias, seed
    )


def test_quant_gemv_rejects_bad_inputs_before_any_cuda_call():
    assert _cuda.quant_gemv_supported(4, 256, 128)
    assert _cuda.quant_gemv_supported(8, 12, 4)
    assert not _cuda.quant_gemv_supported(4, 24, 12)  # INT4 groups are whole 32-bit words
    assert not _cuda.quant_gemv_supported(3, 256, 128)
    assert not _cuda.quant_gemv_supported(4, 256, 96)
    codes, scales, zeros, b = random_quant_layer(4, 64, 4, 32, 0)
    with pytest.raises(TypeError, match="CUDA"):
        _cuda.quant_linear_cuda(torch.zeros(1, 64), pack_nibbles(codes), scales, zeros, b, 4, 32)
    if not _native.built_with_cuda():
        return
    base = dict(
        device=0, stream=0, dtype="float32", bits=4, x=16, qweight=16, scales=16, zeros=16,
        bias=0, y=16, tokens=1, n=4, k=64, group_size=32,
    )  # fmt: skip
    with pytest.raises(ValueError, match="tokens"):
        _native.cuda_quant_gemv(**{**base, "tokens": 9})
    with pytest.raises(ValueError, match="group_size"):
        _native.cuda_quant_gemv(**{**base, "group_size": 12})
    with pytest.raises(ValueError, match="bits"):
        _native.cuda_quant_gemv(**{**base, "bits": 2})
    with pytest.raises(ValueError, match="aligned"):
        _native.cuda_quant_gemv(**{**base, "qweight": 18})
    with pytest.raises(ValueError, match="null"):
        _native.cuda_quant_gemv(**{**base, "x": 0})
    with pytest.raises(TypeError, match="dtype"):
        _native.cuda_quant_gemv(**{**base, "dtype": "int8"})
    # No tokens: a no-op that needs no GPU.
    _native.cuda_quant_gemv(**{**base, "tokens": 0})


# ----------------------------------------------------------------------------------------------
# Real kernels on a GPU

needs_gpu = pytest.mark.skipif(
    not _cuda.cuda_available(), reason="no usable CUDA GPU + driver + NVRTC"
)

GPU_SHAPES = [
    # batch, nq, nk, hq, hkv, d
    (2, 128, 128, 4, 4, 64),
    (1, 257, 300, 8, 2, 128),
    (3, 65, 33, 4, 1, 32),
    (1, 100, 100, 2, 2, 256),
]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask", list(MASKS))
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_gpu_attention_forward_backward(shape, mask, dtype):
    batch, nq, nk, hq, hkv, d = shape
    causal, wl, wr = MASKS[mask]
    scale = d**-0.5
    softcap = 0.0 if mask != "causal" else 20.0
    q, k, v, dout = random_inputs(batch, nq, nk, hq, hkv, d, dtype, seed=nq + nk + d, device="cuda")
    out, lse = _cuda.flash_attention_forward_cuda(
        q, k, v, causal, wl, wr, scale, softcap, None, None
    )
    dq, dk, dv = _cuda.flash_attention_backward_cuda(
        dout, q, k, v, out, lse, causal, wl, wr, scale, softcap, None, None
    )
    args = (causal, wl, wr, scale, softcap)
    as64 = [t.double() for t in (q, k, v, dout)]
    out64, lse64 = reference_attention(*as64[:3], *args)
    out_pt, _ = reference_attention(q, k, v, *args)
    floor = FLOOR[dtype]
    assert_close_to_reference("out", out, out64, out_pt, floor)
    assert max_err(lse, lse64) <= 1e-3
    for name, ours, truth, pt in zip(
        ("dq", "dk", "dv"),
        (dq, dk, dv),
        reference_grads(*as64, *args),
        reference_grads(q, k, v, dout, *args),
        strict=True,
    ):
        assert_close_to_reference(name, ours, truth, pt, floor)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_attention_varlen(dtype):
    lens = [17, 0, 130, 64, 1]
    total = sum(lens)
    q, k, v, dout = (
        t[0] for t in random_inputs(1, total, total, 4, 2, 64, dtype, seed=3, device="cuda")
    )
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    args = (True, -1, -1, 0.125, 0.0)
    out, lse = _cuda.flash_attention_forward_cuda(q, k, v, *args, cu, max(lens))
    assert lse.shape == (4, total)
    dq, dk, dv = _cuda.flash_attention_backward_cuda(dout, q, k, v, out, lse, *args, cu, max(lens))
    as64 = [t.double() for t in (q, k, v, dout)]
    out64, lse64 = reference_attention(*as64[:3], *args, cu_seqlens=cu)
    out_pt, _ = reference_attention(q, k, v, *args, cu_seqlens=cu)
    assert_close_to_reference("out", out, out64, out_pt, FLOOR[dtype])
    assert max_err(lse, lse64) <= 1e-3
    grads64 = reference_grads(*as64, *args, cu_seqlens=cu)
    grads_pt = reference_grads(q, k, v, dout, *args, cu_seqlens=cu)
    for name, ours, truth, pt in zip(
        ("dq", "dk", "dv"), (dq, dk, dv), grads64, grads_pt, strict=True
    ):
        assert_close_to_reference(name, ours, truth, pt, FLOOR[dtype])


@pytest.mark.cuda
@needs_gpu
def test_gpu_attention_matches_sdpa_and_runs_on_the_current_stream():
    q, k, v, _ = random_inputs(2, 256, 256, 8, 8, 64, torch.float16, seed=4, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out, _ = _cuda.flash_attention_forward_cuda(q, k, v, True, -1, -1, None, 0.0, None, None)
    stream.synchronize()
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    assert (out.float() - sdpa.float()).abs().max().item() < 1e-2


@pytest.mark.cuda
@needs_gpu
def test_gpu_attention_rejects_bad_inputs():
    q, k, v, _ = random_inputs(1, 8, 8, 4, 3, 64, torch.float32, seed=0, device="cuda")
    with pytest.raises(ValueError, match="multiple"):
        _cuda.flash_attention_forward_cuda(q, k, v)
    q, k, v, _ = random_inputs(1, 8, 8, 2, 2, 60, torch.float32, seed=0, device="cuda")
    with pytest.raises(ValueError, match="head_dim"):
        _cuda.flash_attention_forward_cuda(q, k, v)
    with pytest.raises(TypeError):
        _cuda.flash_attention_forward_cuda(q, k.cpu(), v)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dim", [1, 7, 64, 1000])
def test_gpu_moe_permute_and_combine(dtype, index_dtype, dim):
    g = torch.Generator().manual_seed(dim)
    tokens, top_k = 300, 2
    x = torch.randn(tokens, dim, generator=g).to(dtype).cuda()
    token_of = torch.randint(0, tokens, (tokens * top_k,), generator=g).to(index_dtype).cuda()
    xs = _cuda.moe_permute_cuda(x, token_of)
    assert torch.equal(xs, x[token_of.long()])
    pos = torch.randperm(tokens * top_k, generator=g).reshape(tokens, top_k).to(index_dtype).cuda()
    w = torch.rand(tokens, top_k, generator=g).cuda()
    y = _cuda.moe_combine_cuda(xs, pos, w)
    truth = (w.double()[..., None] * xs.double()[pos.long()]).sum(1)
    same_precision = (w[..., None] * xs.float()[pos.long()]).sum(1).to(dtype)
    assert_close_to_reference("y", y, truth, same_precision, 1e-6)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(
    ("tokens", "out", "k", "group_size"), [(1, 4096, 4096, 128), (5, 1000, 576, 64), (8, 7, 64, 64)]
)
def test_gpu_quant_gemv(dtype, bits, tokens, out, k, group_size):
    def run(x, qweight, scales, zeros, b, bits, group_size):
        return _cuda.quant_linear_cuda(
            x.cuda(),
            qweight.cuda(),
            scales.cuda(),
            zeros.cuda(),
            None if b is None else b.cuda(),
            bits,
            group_size,
        )

    check_quant_gemv(run, tokens, out, k, bits, group_size, dtype, tokens % 2 == 1, seed=out)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_quant_linear_routes_decode_calls_to_the_kernel(bits, monkeypatch):
    """QuantLinear on CUDA: up to 8 tokens run the fused kernel, more dequantize + cuBLAS; both
    match the dequantized weight's matmul (the CPU module's default int8-activation route would
    add its own ~5e-3 activation rounding, so it is not the reference)."""
    from slimforge.quant import Int4WeightOnly, Int8WeightOnly, quantize_

    torch.manual_seed(bits)
    model = torch.nn.Sequential(torch.nn.Linear(512, 300))
    cfg = Int4WeightOnly(group_size=64) if bits == 4 else Int8WeightOnly()
    quantize_(model, cfg)
    layer = model[0]
    w, b = layer.dequantize().double(), layer.bias.double()
    model.cuda()
    calls = []
    kernel = _cuda.quant_linear_cuda

    def spy(x, *args):
        calls.append(x.shape[0])
        return kernel(x, *args)

    monkeypatch.setattr(_cuda, "quant_linear_cuda", spy)
    for tokens in (1, 8, 9, 40):
        x = torch.randn(tokens, 512)
        want = x.double() @ w.T + b
        calls.clear()
        got = model(x.cuda()).cpu().double()
        assert calls == ([tokens] if tokens <= _cuda.QUANT_GEMV_MAX_TOKENS else []), tokens
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (tokens, (got - want).abs().max())
        xb = x.to(torch.bfloat16)
        got_bf16 = model(xb.cuda()).cpu().double()
        want_bf16 = xb.double() @ w.T + b
        assert torch.allclose(got_bf16, want_bf16, atol=0.05, rtol=0.02), tokens


def test_reference_attention_matches_sdpa_on_cpu():
    """The reference itself agrees with torch's SDPA where both apply (causal, no GQA)."""
    q, k, v, _ = random_inputs(2, 19, 19, 3, 3, 8, torch.float64, seed=11)
    out, _ = reference_attention(q, k, v, True, -1, -1, 8**-0.5, 0.0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    assert torch.allclose(out, sdpa, atol=1e-12)
    assert math.isfinite(out.abs().max().item())
