"""`flash_attention` and its torch custom ops (`slimforge::flash_attn_fwd` / `_bwd`).

The ops call the Rust kernel for CPU tensors and `slimforge._cuda` for CUDA tensors. Layouts:
q `(batch, seqlen_q, heads_q, head_dim)`, k/v `(batch, seqlen_k, heads_kv, head_dim)`, or packed
`(total, heads, head_dim)` with `cu_seqlens` (int32, `batch + 1` offsets). The log-sum-exp is
`(batch, heads_q, seqlen_q)` (packed: `(heads_q, total_q)`), float32 (float64 for float64 inputs);
rows that see no key give output 0 and log-sum-exp `-inf`; rows with a NaN score (NaN in q or in a
visible key) give NaN output and log-sum-exp, as plain softmax attention does.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from slimforge import _native

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
MAX_HEAD_DIM = int(_native.ATTENTION_MAX_HEAD_DIM)
#: Largest sequence length, packed token count and head count (int32: the packed offsets and the
#: CUDA kernels' indices are 32-bit). Checked before any copy of the inputs is made.
MAX_TOKENS = 2**31 - 1


def _to_numpy(x: Tensor) -> np.ndarray:
    x = x.detach().contiguous()
    if x.dtype == torch.bfloat16:
        return x.view(torch.uint16).numpy()
    return x.numpy()


def _from_numpy(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t


def _cu_numpy(cu_seqlens: Tensor | None) -> np.ndarray | None:
    if cu_seqlens is None:
        return None
    return cu_seqlens.detach().cpu().contiguous().numpy()


def _cuda_module():
    try:
        from slimforge import _cuda  # type: ignore[attr-defined]
    except ImportError as e:  # pragma: no cover - depends on the build
        raise RuntimeError(
            "flash_attention got CUDA tensors, but slimforge's CUDA backend is not available "
            f"({e}); move the tensors to the CPU or install a CUDA-enabled build"
        ) from e
    if not _cuda.cuda_available():
        raise RuntimeError(
            "flash_attention got CUDA tensors, but slimforge's CUDA backend found no usable GPU"
        )
    return _cuda


def _check_cuda_args(num_global: int) -> None:
    if num_global:
        raise RuntimeError("num_global (global tokens) is supported on the CPU only")


@torch.library.custom_op("slimforge::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor | None,
    max_seqlen: int,
    causal: bool,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    softcap: float,
    num_global: int,
) -> tuple[Tensor, Tensor]:
    """Forward kernel: returns `(out, lse)`; see the module docstring for layouts."""
    if q.is_cuda:
        _check_cuda_args(num_global)
        return _cuda_module().flash_attention_forward_cuda(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            causal,
            window_left,
            window_right,
            softmax_scale,
            softcap,
            cu_seqlens,
            max_seqlen,
        )
    cu = _cu_numpy(cu_seqlens)
    out, lse = _native.flash_attn_fwd(
        _to_numpy(q),
        _to_numpy(k),
        _to_numpy(v),
        cu,
        cu,
        causal,
        window_left,
        window_right,
        softmax_scale,
        softcap,
        num_global,
    )
    return _from_numpy(out, q.dtype), torch.from_numpy(lse)


def _lse_shape(q: Tensor, packed: bool) -> tuple[int, ...]:
    if packed:
        return (q.shape[1], q.shape[0])
    return (q.shape[0], q.shape[2], q.shape[1])


@flash_attn_fwd.register_fake
def _(
    q,
    k,
    v,
    cu_seqlens,
    max_seqlen,
    causal,
    window_left,
    window_right,
    softmax_scale,
    softcap,
    num_global,
):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty(q.shape)
    lse = q.new_empty(_lse_shape(q, cu_seqlens is not None), dtype=lse_dtype)
    return out, lse


@torch.library.custom_op("slimforge::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    cu_seqlens: Tensor | None,
    max_seqlen: int,
    causal: bool,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    softcap: float,
    num_global: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward kernel: returns `(dq, dk, dv)` from the saved `out` and `lse`."""
    if q.is_cuda:
        _check_cuda_args(num_global)
        return _cuda_module().flash_attention_backward_cuda(
            dout.contiguous(),
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            out.contiguous(),
            lse.contiguous(),
            causal,
            window_left,
            window_right,
            softmax_scale,
            softcap,
            cu_seqlens,
            max_seqlen,
        )
    cu = _cu_numpy(cu_seqlens)
    dq, dk, dv = _native.flash_attn_bwd(
        _to_numpy(dout.to(q.dtype)),
        _to_numpy(q),
        _to_numpy(k),
        _to_numpy(v),
        _to_numpy(out),
        _to_numpy(lse),
        cu,
        cu,
        causal,
        window_left,
        window_right,
        softmax_scale,
        softcap,
        num_global,
    )
    return _from_numpy(dq, q.dtype), _from_numpy(dk, q.dtype), _from_numpy(dv, q.dtype)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, wl, wr, scale, softcap, num_global):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, wl, wr, scale, softcap, num_global = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.cu_seqlens = cu_seqlens
    ctx.args = (max_seqlen, causal, wl, wr, scale, softcap, num_global)


def _backward(ctx, dout, dlse):
    # lse is an auxiliary output: gradients flowing into it are not propagated.
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.slimforge.flash_attn_bwd(
        dout, q, k, v, out, lse, ctx.cu_seqlens, *ctx.args
    )
    return dq, dk, dv, None, None, None, None, None, None, None, None


torch.library.register_autograd(
    "slimforge::flash_attn_fwd", _backward, setup_context=_setup_context
)


def _as_int(name: str, x) -> int:
    try:
        return int(x)
    except (ValueError, OverflowError) as e:  # NaN, inf
        raise ValueError(f"{name} must be an int, got {x!r}") from e
    except TypeError as e:
        raise TypeError(f"{name} must be an int, got {type(x).__name__}") from e


def _validate(q, k, v, window, cu_seqlens, softcap, num_global, causal):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of float32, bfloat16, float64, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    want_dim = 3 if cu_seqlens is not None else 4
    layout = "(total, heads, head_dim)" if want_dim == 3 else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want_dim:
            raise ValueError(f"{name} must be {want_dim}-D {layout}, got shape {tuple(t.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if want_dim == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k disagree on batch: {q.shape[0]} vs {k.shape[0]}")
    if want_dim == 3 and q.shape[0] != k.shape[0]:
        raise ValueError(
            f"packed q and k must hold the same tokens, got {q.shape[0]} and {k.shape[0]}"
        )
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"q and k disagree on head_dim: {d} vs {k.shape[-1]}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {d}")
    hq, hkv = q.shape[-2], k.shape[-2]
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    # Sizes first, before anything is copied: an expanded (stride-0) tensor can claim 2^40
    # tokens that `.contiguous()` would then try to materialise.
    if want_dim == 4:
        sizes = (("seqlen_q", q.shape[1]), ("seqlen_k", k.shape[1]))
        totals = (
            ("total tokens of q (batch * seqlen_q)", q.shape[0] * q.shape[1]),
            ("total tokens of k (batch * seqlen_k)", k.shape[0] * k.shape[1]),
        )
    else:
        sizes = (("total tokens of q", q.shape[0]), ("total tokens of k", k.shape[0]))
        totals = ()
    for name, n in (*sizes, *totals, ("heads_q", hq)):
        if n > MAX_TOKENS:
            raise ValueError(f"{name} must be at most {MAX_TOKENS} (2^31 - 1), got {n}")
    if len(window) != 2:
        raise ValueError(f"window must be a pair (left, right), got {window!r}")
    left, right = _as_int("window[0]", window[0]), _as_int("window[1]", window[1])
    if left < -1 or right < -1:
        raise ValueError(f"window bounds must be -1 (unbounded) or >= 0, got {window!r}")
    if causal and right > 0:
        raise ValueError(
            f"causal attention sees no keys right of the diagonal, got window {window!r}"
        )
    # A bound past the sequence masks nothing more (left >= seqlen_k - 1 reaches key 0 from every
    # query, right >= seqlen_q - 1 the last key): clamp before any arithmetic, so sys.maxsize
    # neither overflows int64 nor the kernels' index arithmetic.
    # (Symbolic sizes under torch.compile clamp to MAX_TOKENS instead: no guard on the lengths,
    # and the kernels clamp to each sequence again.)
    max_q, max_k = (n if isinstance(n, int) else MAX_TOKENS for _, n in sizes)
    left = min(left, max_k) if left >= 0 else -1
    right = min(right, max_q) if right >= 0 else -1
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dtype != torch.int32:
            got = cu_seqlens.dtype if isinstance(cu_seqlens, Tensor) else type(cu_seqlens).__name__
            raise TypeError(f"cu_seqlens must be an int32 tensor, got {got}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(
                f"cu_seqlens must be 1-D with batch + 1 >= 2 entries, got {tuple(cu_seqlens.shape)}"
            )
    if not (softcap >= 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap must be >= 0, got {softcap}")
    num_global = _as_int("num_global", num_global)
    if num_global < 0:
        raise ValueError(f"num_global must be >= 0, got {num_global}")
    # More global tokens than tokens: every token is global (the same mask), and it fits int64.
    num_global = min(num_global, max(max_q, max_k))
    return left, right, num_global


def flash_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    softmax_scale: float | None = None,
    cu_seqlens: Tensor | None = None,
    max_seqlen: int | None = None,
    softcap: float = 0.0,
    num_global: int = 0,
) -> Tensor:
    """Tiled attention softmax(q k^T * scale) v without materialising the score matrix.

    Args:
        q: (batch, seqlen_q, heads_q, head_dim), or (total, heads_q, head_dim) with `cu_seqlens`.
        k, v: (batch, seqlen_k, heads_kv, head_dim), or (total, heads_kv, head_dim); heads_q
            must be a multiple of heads_kv (GQA/MQA: query head h uses kv head
            h // (heads_q // heads_kv)). float32, bfloat16 or float64; any strides.
        causal: bottom-right aligned causal mask (as flash-attn >= 2.1).
        window: (left, right): query i sees keys [i + Nk - Nq - left, i + Nk - Nq + right];
            -1 means unbounded; bounds past the sequence (e.g. sys.maxsize) are clamped to it.
        softmax_scale: defaults to 1 / sqrt(head_dim).
        cu_seqlens: int32 (batch + 1,) offsets of packed sequences (same for q and k).
        max_seqlen: longest sequence in the pack (computed when omitted).
        softcap: if > 0, scores become softcap * tanh(scores / softcap).
        num_global: the first `num_global` tokens of each sequence attend to and are attended
            by every token (Longformer-style global attention).

    Returns:
        Tensor shaped like q. Rows that see no key are 0. A NaN in q, or in a key a row sees,
        makes that row NaN (and its gradients), as plain softmax attention does.

    Raises:
        TypeError / ValueError for bad dtypes, shapes or options, including sequence lengths,
        packed totals or head counts above 2^31 - 1 (checked before any copy of the inputs).
    """
    left, right, num_global = _validate(q, k, v, window, cu_seqlens, softcap, num_global, causal)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    if cu_seqlens is not None and max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    elif max_seqlen is None:
        max_seqlen = max(q.shape[1], k.shape[1])
    max_seqlen = _as_int("max_seqlen", max_seqlen)
    if not 0 <= max_seqlen <= MAX_TOKENS:
        raise ValueError(f"max_seqlen must be in 0..{MAX_TOKENS}, got {max_seqlen}")
    out, _ = torch.ops.slimforge.flash_attn_fwd(
        q,
        k,
        v,
        cu_seqlens,
        max_seqlen,
        bool(causal),
        left,
        right,
        scale,
        float(softcap),
        int(num_global),
    )
    return out
