"""Hostile sizes and values in the tensor kernels (attention, MoE, quantization).

- Absurd shapes and counts (2^40 tokens, 2^31 heads, negative or huge top_k, num_experts 0 or
  2^40, empty tensors with huge dimensions) must give a clean ValueError / TypeError /
  RuntimeError, never an abort or a PanicException. Calls that crashed the interpreter before the
  fix run in a subprocess (`_isolated_*`, each with a hypothesis fuzz over absurd sizes inside), so
  a regression fails one test instead of killing pytest.
- NaN must propagate like the reference: flash_attention's output, lse and gradients have the
  NaN pattern of plain softmax attention (CPU kernel and the CUDA kernel under host emulation).
- Windows past the sequence (sys.maxsize) mean "unbounded", not an integer overflow.
- Every native function rejects Fortran-ordered / strided arrays with a TypeError instead of
  reading them as C-ordered.
- QAT's convert() and FakeQuantLinear reject NaN/Inf weights with the module's name.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from slimforge import _native
from slimforge.attention import flash_attention
from slimforge.attention.reference import reference_attention
from slimforge.moe._ops import MAX_EXPERTS, dispatch_plan, route_topk
from slimforge.quant import quantize_
from slimforge.quant.api import Int8WeightOnly
from slimforge.quant.qat import FakeQuantLinear, QATConfig, convert, prepare_qat

HERE = Path(__file__).resolve().parent
CLEAN = (ValueError, TypeError, RuntimeError)
HUGE = [2**20, 2**31, 2**40, 2**62]


# ----------------------------------------------------------------------------------------------
# helpers


def _expect(label: str, fn, exc=CLEAN, match: str | None = None) -> BaseException:
    """Runs `fn`, which must raise `exc` (a message matching `match`); anything else, a
    PanicException (a BaseException) included, is an AssertionError."""
    try:
        fn()
    except exc as e:
        if match is not None and not re.search(match, str(e)):
            raise AssertionError(f"{label}: message {str(e)!r} does not match {match!r}") from e
        print(f"OK {label}: {type(e).__name__}: {e}")
        return e
    except BaseException as e:
        raise AssertionError(f"{label}: expected {exc}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"{label}: no exception")


def _clean_or_ok(fn) -> object:
    """`fn()` may succeed or raise a clean Python exception; nothing else."""
    try:
        return fn()
    except CLEAN as e:
        return e
    except BaseException as e:
        raise AssertionError(f"unclean failure {type(e).__name__}: {e}") from e


def _run_isolated(name: str, timeout: float = 240) -> str:
    """Runs `_isolated_<name>()` of this module in a fresh interpreter; it must exit with 0."""
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); "
        f"import test_hardening_kernels as t; t._isolated_{name}(); print('DONE')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"subprocess exited with {r.returncode}:\n{out[-6000:]}"
    assert "DONE" in r.stdout, out[-6000:]
    return r.stdout


def _zeros(shape, dtype=np.float32) -> np.ndarray:
    """A (possibly empty, possibly huge-dimensioned) C-contiguous array."""
    return np.zeros(shape, dtype=dtype)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _creatable(*shapes) -> bool:
    """Whether numpy can hold these shapes without real memory (empty, or small)."""
    for s in shapes:
        n = _numel(s)
        if n > 2**16:
            return False
        if n == 0:
            nonzero = 1
            for d in s:
                nonzero *= max(d, 1)
            if nonzero * 8 > 2**62:  # numpy rejects "array is too big"
                return False
    return True


# ----------------------------------------------------------------------------------------------
# attention: absurd sizes (isolated)


def _fwd(q, k, v, cu=None, causal=False, wl=-1, wr=-1, scale=0.5, softcap=0.0, g=0):
    return _native.flash_attn_fwd(q, k, v, cu, cu, causal, wl, wr, scale, softcap, g)


def _isolated_attention() -> None:
    small = _zeros((1, 4, 1, 8))
    # Expanded (stride-0) tensors claim huge sizes without memory: rejected before any copy.
    big_q = torch.zeros(1, 1, 1, 8).expand(1, 2**40, 1, 8)
    kv = torch.zeros(1, 4, 1, 8)
    _expect("2^40 tokens", lambda: flash_attention(big_q, kv, kv), ValueError, "seqlen_q")
    many_heads = torch.zeros(1, 1, 1, 8).expand(1, 1, 2**31, 8)
    _expect("2^31 heads", lambda: flash_attention(many_heads, kv, kv), ValueError, "heads_q")
    wide = torch.zeros(1, 1, 1, 8).expand(2**20, 2**12, 1, 8)
    _expect("2^32 total tokens", lambda: flash_attention(wide, wide, wide), ValueError, "total")
    packed = torch.zeros(1, 1, 8).expand(2**31, 1, 8)
    cu = torch.tensor([0, 2**31 - 1], dtype=torch.int32)
    _expect("2^31 packed tokens", lambda: flash_attention(packed, packed, packed, cu_seqlens=cu))
    _expect(
        "max_seqlen 2^70",
        lambda: flash_attention(kv, kv, kv, max_seqlen=2**70),
        ValueError,
        "max_seqlen",
    )
    # Native entry: empty arrays with huge dimensions.
    _expect("native seqlen 2^40", lambda: _fwd(*[_zeros((0, 2**40, 1, 8))] * 3), ValueError)
    _expect(
        "native heads 2^31",
        lambda: _fwd(_zeros((1, 0, 2**31, 8)), small, small),
        ValueError,
        "heads_q",
    )
    # 2^40 empty sequences used to allocate 2^40 offsets (abort): now an empty result.
    e = _zeros((2**40, 0, 3, 8))
    out, lse = _fwd(e, e, e)
    assert out.shape == (2**40, 0, 3, 8) and lse.shape == (2**40, 3, 0)
    dq, dk, dv = _native.flash_attn_bwd(
        e, e, e, e, out, lse, None, None, False, -1, -1, 0.5, 0.0, 0
    )
    assert dq.shape == dk.shape == dv.shape == e.shape
    # Queries without keys (and keys without queries) with many heads: zeros, quickly.
    q0 = _zeros((3, 0, 64, 8))
    k1 = _zeros((3, 5, 1, 8))
    out, lse = _fwd(q0, k1, k1)
    assert out.shape == (3, 0, 64, 8)
    dq, dk, dv = _native.flash_attn_bwd(
        q0, q0, k1, k1, out, lse, None, None, False, -1, -1, 0.5, 0.0, 0
    )
    assert not dk.any() and not dv.any()
    # Many empty packed sequences and heads: no batch x heads loop blow-up.
    cu = np.zeros(2**16 + 1, dtype=np.int32)
    cu[-1] = 3
    qp = _zeros((3, 256, 8))
    out, lse = _fwd(qp, qp, qp, cu)
    assert out.shape == qp.shape and lse.shape == (256, 3)
    # Scalars: windows saturate, negatives and huge counts are ValueErrors (not OverflowError).
    out, _ = _fwd(small, small, small, wl=2**70, wr=2**70)
    assert out.shape == small.shape
    _expect("window -2^70", lambda: _fwd(small, small, small, wl=-(2**70)), ValueError)
    _expect("window -2", lambda: _fwd(small, small, small, wr=-2), ValueError)
    _expect("num_global -1", lambda: _fwd(small, small, small, g=-1), ValueError)
    _expect("num_global 2^70", lambda: _fwd(small, small, small, g=2**70), ValueError)
    _expect("window 1.5", lambda: _fwd(small, small, small, wl=1.5), TypeError)
    _expect("scale NaN", lambda: _fwd(small, small, small, scale=float("nan")), ValueError)
    _expect("bad cu", lambda: _fwd(qp, qp, qp, np.array([0, 5], dtype=np.int32)), ValueError)

    dims = st.sampled_from([0, 1, 2, 3, 17, *HUGE])

    @settings(max_examples=150, deadline=None, database=None)
    @given(b=dims, nq=dims, nk=dims, hq=dims, group=st.sampled_from([1, 2, 2**31]), d=dims)
    def fuzz(b, nq, nk, hq, group, d):
        hkv = max(hq // group, 1) if hq else 1
        qs, ks = (b, nq, hq, d), (b, nk, hkv, d)
        if not _creatable(qs, ks):
            return
        q, k = _zeros(qs), _zeros(ks)
        r = _clean_or_ok(lambda: _fwd(q, k, k, causal=True, wl=2**62))
        if isinstance(r, tuple):
            out, lse = r
            assert out.shape == qs and lse.shape == (b, hq, nq)
            g = _clean_or_ok(
                lambda: _native.flash_attn_bwd(
                    q, q, k, k, out, lse, None, None, True, 2**62, -1, 0.5, 0.0, 0
                )
            )
            assert not isinstance(g, BaseException), g
        # Packed: offsets of absurd sequences.
        cu = np.array([0, min(nq, 2**31 - 1)], dtype=np.int32)
        qp, kp = (nq, hq, d), (nq, hkv, d)
        if _creatable(qp, kp):
            _clean_or_ok(lambda: _fwd(_zeros(qp), _zeros(kp), _zeros(kp), cu))

    fuzz()


def test_absurd_attention_sizes_are_clean_errors() -> None:
    out = _run_isolated("attention")
    assert "OK 2^40 tokens: ValueError" in out
    assert "OK 2^31 heads: ValueError" in out
    assert "OK native heads 2^31: ValueError" in out


# ----------------------------------------------------------------------------------------------
# attention: NaN propagation (CPU kernel)


def _rand(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def _nan_case(dtype, where, pos, b=1, nq=37, nk=45, hq=4, hkv=2, d=16, seed=0):
    q = _rand((b, nq, hq, d), dtype, seed)
    k = _rand((b, nk, hkv, d), dtype, seed + 1)
    v = _rand((b, nk, hkv, d), dtype, seed + 2)
    t = {"q": q, "k": k, "v": v}[where]
    t[pos] = float("nan")
    return q, k, v


def _assert_nan_pattern(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    got, want = torch.isnan(ours), torch.isnan(ref)
    assert torch.equal(got, want), (
        f"{what}: NaN pattern differs: {int(got.sum())} NaN vs {int(want.sum())} in the reference"
    )
    assert torch.isfinite(ours[~got].double()).all(), f"{what}: non-finite values besides NaN"


MASKS = [
    {},
    {"causal": True},
    {"window": (5, 3)},
    {"causal": True, "window": (7, 0)},
    {"softcap": 2.0},
    {"num_global": 3, "window": (4, 4)},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
@pytest.mark.parametrize("where", ["q", "k"])
def test_forward_nan_matches_the_reference_pattern(dtype, mask, where) -> None:
    # A NaN in q used to give a zero output row; a NaN in k used to vanish.
    pos = (0, 20, 1, 3)
    q, k, v = _nan_case(dtype, where, pos)
    out = flash_attention(q, k, v, **mask)
    ref = reference_attention(q.double(), k.double(), v.double(), **mask)
    assert torch.isnan(ref).any(), "the case must reach the output"
    _assert_nan_pattern(out, ref, f"out ({where})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_nan_in_a_masked_key_stays_invisible(dtype) -> None:
    # Key 40 is seen by no query under causal with nq = nk: its NaN must not leak.
    q, k, v = _nan_case(dtype, "k", (0, 40, 0, 0), nq=45, nk=45)
    out = flash_attention(q, k, v, causal=True)
    ref = reference_attention(q.double(), k.double(), v.double(), causal=True)
    _assert_nan_pattern(out, ref, "out")
    assert torch.isnan(out[0, 40:, 0:2]).all() and torch.isfinite(out[0, :40]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_backward_nan_matches_the_reference_pattern(dtype, where) -> None:
    q, k, v = _nan_case(dtype, where, (0, 11, 1, 5), nq=70, nk=90)
    dout = _rand(q.shape, dtype, 9)
    ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = flash_attention(*ins)
    out.backward(dout)
    ref_ins = [t.double().clone().requires_grad_(True) for t in (q, k, v)]
    ref = reference_attention(*ref_ins)
    ref.backward(dout.double())
    _assert_nan_pattern(out.detach(), ref.detach(), "out")
    assert torch.isnan(ref_ins[0].grad).any(), "the case must reach the gradients"
    for name, a, b in zip("qkv", ins, ref_ins, strict=True):
        _assert_nan_pattern(a.grad, b.grad, f"d{name}")


def test_nan_lse_and_packed_sequences() -> None:
    # Packed: a NaN in one sequence stays in that sequence, and its lse is NaN (not -inf).
    cu = torch.tensor([0, 30, 30, 75, 100], dtype=torch.int32)
    q = _rand((100, 2, 8), torch.float32, 1)
    k = _rand((100, 1, 8), torch.float32, 2)
    q[40, 1, 0] = float("nan")
    out, lse = torch.ops.slimforge.flash_attn_fwd(q, k, k, cu, 45, True, -1, 0, 0.3, 0.0, 0)
    ref = reference_attention(q.double(), k.double(), k.double(), True, (-1, 0), 0.3, cu)
    _assert_nan_pattern(out, ref, "out")
    assert torch.isnan(lse[1, 40]) and torch.isfinite(lse[0]).all()
    assert torch.isfinite(lse[1, :40]).all() and torch.isfinite(lse[1, 41:]).all()


@settings(max_examples=25, deadline=None)
@given(
    where=st.sampled_from("qkv"),
    i=st.integers(0, 39),
    mask=st.sampled_from(MASKS[:4]),
    nq=st.integers(1, 40),
    nk=st.integers(1, 40),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_nan_anywhere_matches_the_reference(where, i, mask, nq, nk, dtype) -> None:
    n = nq if where == "q" else nk
    pos = (0, i % n, 1, i % 8)
    q, k, v = _nan_case(dtype, where, pos, nq=nq, nk=nk, hq=2, hkv=2, d=8, seed=i)
    if where == "v" and mask:
        # The dense reference multiplies masked probabilities (0) by v too, so a NaN in a
        # masked value reaches rows that never see it there; the kernel skips masked tiles.
        return
    out = flash_attention(q, k, v, **mask)
    ref = reference_attention(q.double(), k.double(), v.double(), **mask)
    _assert_nan_pattern(out, ref, "out")


# ----------------------------------------------------------------------------------------------
# attention: NaN in the CUDA kernel (host emulation, no GPU needed)


def test_cuda_kernel_propagates_nan_under_host_emulation() -> None:
    sys.path.insert(0, str(HERE))
    try:
        import test_cuda as tc
    finally:
        sys.path.remove(str(HERE))
    for where, mask in (("q", "full"), ("k", "full"), ("q", "causal"), ("k", "window")):
        causal, wl, wr = tc.MASKS[mask]
        q, k, v, dout = tc.random_inputs(1, 37, 37, 4, 2, 16, torch.float32, seed=3)
        t = {"q": q, "k": k}[where]
        t[0, 20, 1, 3] = float("nan")
        args = (causal, wl, wr, 0.25, 0.0)
        out, lse, dq, dk, dv = tc.emulated_attention(q, k, v, dout, *args, tc.SMALL_TILES)
        as64 = [x.double() for x in (q, k, v, dout)]
        out64, lse64 = tc.reference_attention(*as64[:3], *args)
        _assert_nan_pattern(out, out64, f"emulated out ({where}, {mask})")
        assert torch.equal(torch.isnan(lse), torch.isnan(lse64)), "lse NaN pattern"
        if mask == "full":
            grads = tc.reference_grads(*as64, *args)
            for name, ours, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), grads, strict=True):
                _assert_nan_pattern(ours, ref, f"emulated {name} ({where})")


# ----------------------------------------------------------------------------------------------
# attention: windows past the sequence


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_windows_mean_unbounded(dtype) -> None:
    for nq, nk in ((50, 50), (70, 20), (20, 70)):
        q = _rand((1, nq, 2, 16), dtype, 4)
        k = _rand((1, nk, 2, 16), dtype, 5)
        v = _rand((1, nk, 2, 16), dtype, 6)
        for window, causal, same in (
            ((sys.maxsize, 0), True, (-1, 0)),
            ((2**80, 2**80), False, (-1, -1)),
            ((sys.maxsize, 3), False, (-1, 3)),
            ((4, sys.maxsize), False, (4, -1)),
        ):
            got = flash_attention(q, k, v, causal=causal, window=window)
            want = flash_attention(q, k, v, causal=causal, window=same)
            assert torch.equal(got, want), (nq, nk, window)
            ref = reference_attention(q.double(), k.double(), v.double(), causal, same)
            assert (got.double() - ref).abs().max() < 1e-4
    # The native entry saturates and clamps in Rust as well (i64::MAX used to overflow there).
    q = _rand((1, 70, 1, 8), torch.float32, 7).numpy()
    k = _rand((1, 20, 1, 8), torch.float32, 8).numpy()
    a, lse_a = _fwd(q, k, k, causal=True, wl=2**63 - 1)
    b, lse_b = _fwd(q, k, k, causal=True, wl=-1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(lse_a, lse_b)
    ga = _native.flash_attn_bwd(q, q, k, k, a, lse_a, None, None, True, 2**63 - 1, -1, 0.5, 0, 0)
    gb = _native.flash_attn_bwd(q, q, k, k, b, lse_b, None, None, True, -1, -1, 0.5, 0, 0)
    for x, y in zip(ga, gb, strict=True):
        np.testing.assert_array_equal(x, y)
    # num_global past the sequence: every token global = no mask.
    q, k, v = (_rand((1, 30, 1, 8), torch.float32, s) for s in (1, 2, 3))
    assert torch.equal(
        flash_attention(q, k, v, causal=True, num_global=2**70), flash_attention(q, k, v)
    )


# ----------------------------------------------------------------------------------------------
# contiguity: every native family


def _fortran(a: np.ndarray) -> np.ndarray:
    f = np.asfortranarray(a)
    assert not f.flags.c_contiguous
    return f


def test_attention_rejects_non_c_contiguous_arrays() -> None:
    q = _rand((2, 5, 2, 8), torch.float32, 0).numpy()
    lse = _fwd(q, q, q)[1]
    cu = np.array([0, 4, 10], dtype=np.int32)
    packed = q.reshape(10, 2, 8)
    for name, args in (
        ("q", (_fortran(q), q, q)),
        ("k", (q, _fortran(q), q)),
        ("v", (q, q, q[:, :, :, ::-1])),
    ):
        _expect(name, lambda a=args: _fwd(*a), TypeError, f"{name} must be a C-contiguous")
    strided_cu = np.array([0, 0, 4, 4, 10, 10], dtype=np.int32)[::2]
    _expect(
        "cu_seqlens",
        lambda: _fwd(packed, packed, packed, strided_cu),
        TypeError,
        "cu_seqlens_q must be a C-contiguous",
    )
    assert _fwd(packed, packed, packed, cu)[0].shape == packed.shape
    out = _fwd(q, q, q)[0]
    bwd = _native.flash_attn_bwd
    for name, args in (
        ("dout", (_fortran(q), q, q, q, out, lse)),
        ("out", (q, q, q, q, _fortran(out), lse)),
        ("lse", (q, q, q, q, out, _fortran(lse))),
    ):
        _expect(
            name,
            lambda a=args: bwd(*a, None, None, False, -1, -1, 0.5, 0.0, 0),
            TypeError,
            name,
        )


def test_moe_rejects_non_c_contiguous_arrays() -> None:
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    idx = np.array([[0, 1], [1, 2], [2, 0]], dtype=np.int64)
    plan = _native.moe_dispatch_plan(idx, 3)
    token_of, pos = plan[3], plan[5]
    out = np.zeros((6, 4), dtype=np.float32)
    _expect("route logits", lambda: _native.moe_route(_fortran(x), 2), TypeError, "logits")
    _expect("plan idx", lambda: _native.moe_dispatch_plan(_fortran(idx), 3), TypeError, "idx")
    _expect(
        "permute x",
        lambda: _native.moe_permute(_fortran(x[:3]), token_of, out),
        TypeError,
        "x must be",
    )
    _expect(
        "permute out",
        lambda: _native.moe_permute(x[:3].copy(), token_of, _fortran(out)),
        TypeError,
        "out must be",
    )
    _expect(
        "permute width",
        lambda: _native.moe_permute(x[:3].copy(), token_of, np.zeros((12, 2), np.float32)),
        ValueError,
        "columns",
    )
    y = np.zeros((3, 4), dtype=np.float32)
    _expect("combine ys", lambda: _native.moe_combine(_fortran(x), pos, y), TypeError, "ys")
    _expect("combine pos", lambda: _native.moe_combine(x, _fortran(pos), y), TypeError, "pos")
    _expect("rowdot dy", lambda: _native.moe_rowdot(_fortran(x[:3]), x, pos), TypeError, "dy must")
    w = np.ones((3, 2), dtype=np.float32)
    _expect(
        "combine weights",
        lambda: _native.moe_combine(x, pos, y, _fortran(w)),
        TypeError,
        "weights",
    )


def test_quant_rejects_non_c_contiguous_arrays() -> None:
    w = _rand((8, 64), torch.float32, 0).numpy()
    s, z = _native.quant_choose_qparams(w, 8, 32, False)
    q = _native.quant_quantize(w, s, z, 8, 32)
    packed = _native.quant_pack_int4(q & 15)
    x = _rand((3, 64), torch.float32, 1).numpy()
    wf = _fortran(w)
    # Before: a Fortran-ordered weight was read transposed without a word.
    _expect("choose_qparams", lambda: _native.quant_choose_qparams(wf, 8, 32, False), TypeError)
    _expect("quantize", lambda: _native.quant_quantize(wf, s, z, 8, 32), TypeError, "w must")
    _expect("dequantize", lambda: _native.quant_dequantize(_fortran(q), s, z, 32), TypeError)
    _expect(
        "dequantize scales",
        lambda: _native.quant_dequantize(q, _fortran(s), z, 32),
        TypeError,
        "scales",
    )
    _expect("pack", lambda: _native.quant_pack_int4(_fortran(q & 15)), TypeError)
    _expect("unpack", lambda: _native.quant_unpack_int4(_fortran(packed)), TypeError)
    _expect(
        "linear x",
        lambda: _native.quant_linear(_fortran(x), q, s, z, None, 8, 32),
        TypeError,
        "x must",
    )
    bias = np.zeros(16, dtype=np.float32)[::2]
    _expect("linear bias", lambda: _native.quant_linear(x, q, s, z, bias, 8, 32), TypeError)
    xb = _fortran(np.zeros((3, 64), dtype=np.int16))
    _expect("linear_bf16", lambda: _native.quant_linear_bf16(xb, q, s, z, None, 8, 32), TypeError)
    hinv = np.eye(64, dtype=np.float32)
    _expect(
        "gptq w",
        lambda: _native.quant_gptq_block(_fortran(w.copy()), hinv, 4, 32, False),
        TypeError,
        "w must",
    )


# ----------------------------------------------------------------------------------------------
# MoE: absurd sizes (isolated)


def _isolated_moe() -> None:
    logits = np.zeros((4, 8), dtype=np.float32)
    idx = np.array([[0, 1], [1, 2]], dtype=np.int64)
    for k in (-1, 0, 9, 2**31, 2**40, 2**70):
        _expect(f"route top_k {k}", lambda k=k: _native.moe_route(logits, k), ValueError, "top_k")
    _expect("route top_k float", lambda: _native.moe_route(logits, 1.5), TypeError)
    # (2^40, 0) logits: used to allocate 2^40 * top_k outputs before checking num_experts.
    _expect("route 0 experts", lambda: _native.moe_route(_zeros((2**40, 0)), 1), ValueError)
    _expect("route_topk 0 experts", lambda: route_topk(torch.zeros(3, 0), 1), ValueError)
    _expect("route_topk top_k -1", lambda: route_topk(torch.zeros(3, 4), -1), ValueError)
    _expect("route_topk top_k float", lambda: route_topk(torch.zeros(3, 4), 2.0), TypeError)
    for e in (0, -1, 2**20 + 1, 2**40, 2**70):
        _expect(f"plan {e} experts", lambda e=e: _native.moe_dispatch_plan(idx, e), ValueError)
        _expect(
            f"dispatch_plan {e} experts",
            lambda e=e: dispatch_plan(torch.from_numpy(idx), e),
            ValueError,
            "num_experts",
        )
    _expect("plan capacity -1", lambda: _native.moe_dispatch_plan(idx, 3, -1), ValueError)
    _expect("plan capacity 2^70", lambda: _native.moe_dispatch_plan(idx, 3, 2**70), ValueError)
    plan = dispatch_plan(torch.from_numpy(idx), 3, capacity=2**70)  # clamped: same as dropless
    assert plan.dropped == 0 and plan.num_rows == 4
    _expect("plan top_k 0", lambda: _native.moe_dispatch_plan(_zeros((2**40, 0), np.int64), 4))
    # Padding every slot of one expert across 2^20 experts would need 2^20 * T * k rows.
    skewed = np.zeros((40_000, 1), dtype=np.int64)
    _expect(
        "padded blow-up",
        lambda: _native.moe_dispatch_plan(skewed, MAX_EXPERTS, None, True),
        ValueError,
        "padded plan",
    )
    big = _native.moe_dispatch_plan(skewed, MAX_EXPERTS, 4, True)
    assert big[5].shape == (40_000, 1) and big[6] == 40_000 - 4
    # Kernels: indices out of range and widths that do not match.
    x = np.zeros((3, 4), dtype=np.float32)
    out = np.zeros((2, 4), dtype=np.float32)
    for bad in (3, -2, 2**40):
        _expect(
            f"permute token_of {bad}",
            lambda b=bad: _native.moe_permute(x, np.array([0, b]), out),
            ValueError,
        )
        _expect(
            f"combine pos {bad}",
            lambda b=bad: _native.moe_combine(x, np.array([[0, b]]), out[:1]),
            ValueError,
        )
    dtypes = st.sampled_from([np.float32, np.float64])
    sizes = st.sampled_from([0, 1, 2, 5, 64, *HUGE])

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        t=sizes,
        e=sizes,
        k=st.one_of(sizes, st.integers(-5, 5)),
        cap=st.one_of(st.none(), sizes, st.integers(-2, 3)),
        padded=st.booleans(),
        dtype=dtypes,
        seed=st.integers(0, 2**16),
    )
    def fuzz(t, e, k, cap, padded, dtype, seed):
        rng = np.random.default_rng(seed)
        if _creatable((t, e)):
            lg = rng.standard_normal((t, e)).astype(dtype)
            r = _clean_or_ok(lambda: _native.moe_route(lg, k))
            if isinstance(r, tuple):
                assert r[0].shape == (t, k) and ((r[0] >= 0) & (r[0] < e)).all()
        width = max(k, 0)
        if _creatable((t, width)):
            ids = rng.integers(0, max(min(e, 2**62), 1), (t, width), dtype=np.int64)
            r = _clean_or_ok(lambda: _native.moe_dispatch_plan(ids, e, cap, padded))
            if isinstance(r, tuple):
                routed, counts, offsets, token_of, slot_of, pos, dropped = r
                assert routed.shape == (e,) and offsets[-1] == token_of.shape[0]
                assert pos.shape == (t, width) and dropped == int((pos < 0).sum())

    fuzz()


def test_absurd_moe_sizes_are_clean_errors() -> None:
    out = _run_isolated("moe")
    assert "OK route 0 experts: ValueError" in out
    assert "OK plan 1099511627776 experts: ValueError" in out
    assert "OK padded blow-up: ValueError" in out


# ----------------------------------------------------------------------------------------------
# quantization: absurd sizes (isolated)


def _isolated_quant() -> None:
    w = _rand((4, 64), torch.float32, 0).numpy()
    s, z = _native.quant_choose_qparams(w, 8, 32, False)
    q = _native.quant_quantize(w, s, z, 8, 32)
    for gs in (0, -1, 2**40, 2**70):
        _expect(
            f"choose_qparams group_size {gs}",
            lambda g=gs: _native.quant_choose_qparams(w, 8, g, False),
            ValueError,
        )
    for b in (-1, 3, 2**40, 2**70):
        _expect(f"bits {b}", lambda b=b: _native.quant_choose_qparams(w, b, 32, False), ValueError)
    for b in (-1, 2**70):
        _expect(f"default_route bits {b}", lambda b=b: _native.quant_default_route(b), ValueError)
    # Empty weights with huge dimensions: empty results, no 2^40-sized allocation.
    s0, z0 = _native.quant_choose_qparams(_zeros((2**40, 0)), 8, 32, False)
    assert s0.shape == (2**40, 0)
    s1, _ = _native.quant_choose_qparams(_zeros((0, 2**40)), 4, 2**40, True)
    assert s1.shape == (0, 1)
    assert _native.quant_unpack_int4(_zeros((2**40, 0), np.uint8)).shape == (2**40, 0)
    # GPTQ: a (0, 2^32) block with a (0, 0) hinv used to pass 2^32 * 2^32 == 0 (wrapped) and
    # then index hinv out of bounds (PanicException).
    _expect(
        "gptq cols^2 overflow",
        lambda: _native.quant_gptq_block(_zeros((0, 2**32)), _zeros((0, 0)), 4, 2**32, False),
        ValueError,
        "overflows",
    )
    # GEMV: m * n overflows, or cannot be allocated.
    for m, n in ((2**40, 2**40), (2**30, 2**30)):
        _expect(
            f"linear {m} x {n}",
            lambda m=m, n=n: _native.quant_linear(
                _zeros((m, 0)),
                _zeros((n, 0), np.uint8),
                _zeros((n, 0)),
                _zeros((n, 0)),
                None,
                8,
                32,
            ),
            CLEAN,
            "overflows|out of memory",
        )
    _expect(
        "linear x width",
        lambda: _native.quant_linear(_zeros((2, 63)), q, s, z, None, 8, 32),
        ValueError,
        "features",
    )
    sizes = st.sampled_from([0, 1, 2, 32, 64, *HUGE])

    @settings(max_examples=200, deadline=None, database=None)
    @given(
        rows=sizes,
        cols=sizes,
        m=sizes,
        gs=st.one_of(sizes, st.integers(-2, 3)),
        bits=st.sampled_from([-1, 0, 2, 4, 8, 9, 2**33]),
        sym=st.booleans(),
    )
    def fuzz(rows, cols, m, gs, bits, sym):
        if not _creatable((rows, cols), (m, cols)):
            return
        w = _zeros((rows, cols))
        r = _clean_or_ok(lambda: _native.quant_choose_qparams(w, bits, gs, sym))
        if isinstance(r, tuple):
            sc, zp = r
            _clean_or_ok(lambda: _native.quant_quantize(w, sc, zp, bits, gs))
            codes = np.zeros((rows, cols), dtype=np.uint8)
            _clean_or_ok(lambda: _native.quant_dequantize(codes, sc, zp, gs))
            _clean_or_ok(
                lambda: _native.quant_linear(_zeros((m, cols)), codes, sc, zp, None, 8, gs)
            )
        _clean_or_ok(lambda: _native.quant_pack_int4(np.zeros((rows, cols), np.uint8)))
        if _creatable((rows, cols // 2), (rows, 1)):
            half = np.zeros((rows, cols // 2), dtype=np.uint8)
            _clean_or_ok(lambda: _native.quant_unpack_int4(half))
            _clean_or_ok(
                lambda: _native.quant_dequantize_packed(
                    half, _zeros((rows, 1)), _zeros((rows, 1)), bits, gs
                )
            )
        if cols <= 64:
            _clean_or_ok(
                lambda: _native.quant_gptq_block(
                    w.copy(), np.eye(cols, dtype=np.float32), bits, gs, sym
                )
            )

    fuzz()


def test_absurd_quant_sizes_are_clean_errors() -> None:
    out = _run_isolated("quant")
    assert "OK gptq cols^2 overflow: ValueError" in out
    assert "OK linear 1099511627776 x 1099511627776: ValueError" in out


# ----------------------------------------------------------------------------------------------
# QAT: non-finite weights


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_qat_rejects_non_finite_weights_with_the_module_name(bad) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 4))
    prepare_qat(model, QATConfig(bits=4, group_size=None))
    with torch.no_grad():
        model[0].weight[3, 17] = bad
    # convert(): the name comes first, as quantize_ writes it; no NaN scales.
    with pytest.raises(ValueError, match=r"^0: weight contains NaN or Inf .*row 3, column 17"):
        convert(model)
    assert isinstance(model[0], FakeQuantLinear)
    # The parameter computation itself (every forward) names the module prepare_qat gave it.
    with pytest.raises(ValueError, match=r"^0: weight contains NaN or Inf"):
        model[0].qparams()
    with pytest.raises(ValueError, match=r"^0: weight contains NaN or Inf"):
        model(torch.randn(2, 64))
    # quantize_ says the same for the same weight.
    lin = nn.Sequential(nn.Linear(64, 4))
    with torch.no_grad():
        lin[0].weight[3, 17] = bad
    with pytest.raises(ValueError, match=r"^0: weight contains NaN or Inf"):
        quantize_(lin, Int8WeightOnly(group_size=None))
    # A layer made through quantize_(QATConfig) has no name: the message still says what.
    fq = FakeQuantLinear(nn.Parameter(lin[0].weight.detach().clone()), None, 8, 32)
    with pytest.raises(ValueError, match=r"^weight contains NaN or Inf"):
        fq.codes()
    # Finite weights still convert.
    with torch.no_grad():
        model[0].weight[3, 17] = 0.5
    convert(model)
