"""CUDA kernels for PyTorch CUDA tensors: flash attention, MoE dispatch and quantized GEMV.

The kernels are CUDA C compiled at run time by NVRTC (nothing CUDA is needed to build or import
slimforge) and launched on PyTorch's current stream, on memory PyTorch allocates. NVRTC is looked
up in ``SLIMFORGE_NVRTC`` (a ``libnvrtc.so.*`` file or its directory), then in the ``nvidia-*`` pip
wheels that CUDA builds of torch install (``nvidia/cu13/lib``, ``nvidia/cuda_nvrtc/lib``), then on
the system library path.

These are the low-level entry points; the attention, MoE and quantization modules route CUDA
tensors here and add autograd. All functions raise ``RuntimeError`` when the CUDA backend is unusable (see
:func:`cuda_available`), ``TypeError`` for wrong dtypes/devices and ``ValueError`` for bad shapes.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import torch

from slimforge import _native

__all__ = [
    "cuda_available",
    "cuda_unavailable_reason",
    "flash_attention_backward_cuda",
    "flash_attention_forward_cuda",
    "moe_combine_cuda",
    "moe_permute_cuda",
    "nvrtc_library_dirs",
    "preload_nvrtc",
    "quant_gemv_supported",
    "quant_linear_cuda",
]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = {torch.int32: 32, torch.int64: 64}


def nvrtc_library_dirs() -> list[Path]:
    """Directories that may hold ``libnvrtc.so.*``, in lookup order."""
    dirs: list[Path] = []
    env = os.environ.get("SLIMFORGE_NVRTC")
    if env:
        p = Path(env)
        dirs.append(p if p.is_dir() else p.parent)
    try:
        import nvidia  # namespace package installed by the nvidia-* wheels

        for root in getattr(nvidia, "__path__", []):
            for sub in ("cu13/lib", "cuda_nvrtc/lib", "cu12/lib"):
                d = Path(root) / sub
                if d.is_dir():
                    dirs.append(d)
    except ImportError:
        pass
    return dirs


@functools.cache
def preload_nvrtc() -> Path | None:
    """Loads NVRTC from the first directory of :func:`nvrtc_library_dirs` that has it.

    ``libnvrtc-builtins`` is loaded first and both go in the global namespace, so that NVRTC's own
    by-name ``dlopen`` of the builtins and the native module's lookup of ``libnvrtc.so.<major>``
    resolve to these copies. Returns the directory used, or None (then the system path is tried).
    """
    for d in nvrtc_library_dirs():
        libs = sorted(d.glob("libnvrtc.so.*"))
        if not libs:
            continue
        try:
            for builtins in sorted(d.glob("libnvrtc-builtins.so.*")):
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
            ctypes.CDLL(str(libs[0]), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        return d
    return None


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA kernels cannot run here, or None when they can."""
    if not _native.built_with_cuda():
        return "slimforge was built without the `cuda` feature"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    preload_nvrtc()
    try:
        _native.cuda_nvrtc_version()
        _native.cuda_device_arch(torch.cuda.current_device())
    except RuntimeError as e:
        return str(e)
    return None


@functools.cache
def cuda_available() -> bool:
    """True when the extension has the ``cuda`` feature, torch sees a GPU, and the driver and
    NVRTC load."""
    return cuda_unavailable_reason() is None


def _require_backend() -> None:
    if not cuda_available():
        raise RuntimeError(f"slimforge CUDA kernels unavailable: {cuda_unavailable_reason()}")


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def _stream(device: int) -> int:
    return int(torch.cuda.current_stream(device).cuda_stream)


def _check_float(
    name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype | None
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise TypeError(f"{name} must be on {device}, got {t.device}")
    if dtype is None and t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _AttnShape:
    """Shapes of one attention call, validated."""

    def __init__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor | None,
        max_seqlen: int | None,
    ) -> None:
        if not q.is_cuda:
            raise TypeError(f"q must be a CUDA tensor, got device {q.device}")
        _check_float("q", q, q.device, None)
        _check_float("k", k, q.device, q.dtype)
        _check_float("v", v, q.device, q.dtype)
        if k.shape != v.shape:
            raise ValueError(
                f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
            )
        self.varlen = cu_seqlens is not None
        if self.varlen:
            assert cu_seqlens is not None
            if q.dim() != 3 or k.dim() != 3:
                raise ValueError(
                    "varlen attention expects q (total, heads, head_dim) and k/v (total, heads_kv, "
                    f"head_dim), got {tuple(q.shape)} and {tuple(k.shape)}"
                )
            if (
                cu_seqlens.device != q.device
                or cu_seqlens.dtype != torch.int32
                or cu_seqlens.dim() != 1
            ):
                raise TypeError(
                    f"cu_seqlens must be a 1-D int32 tensor on {q.device}, got {cu_seqlens.dtype} "
                    f"{tuple(cu_seqlens.shape)} on {cu_seqlens.device}"
                )
            if cu_seqlens.numel() < 2:
                raise ValueError("cu_seqlens needs at least two entries (batch + 1)")
            if q.shape[0] != k.shape[0]:
                raise ValueError(
                    f"varlen q and k/v must have the same total length, got {q.shape[0]} and {k.shape[0]}"
                )
            self.batch = cu_seqlens.numel() - 1
            self.seqlen_q = self.seqlen_k = q.shape[0]
            if max_seqlen is None or max_seqlen <= 0:  # unknown: one sync to find it
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
            if max_seqlen < 0 or max_seqlen > q.shape[0]:
                raise ValueError(f"max_seqlen must be in [0, {q.shape[0]}], got {max_seqlen}")
            self.max_seqlen = max_seqlen
            _, self.heads_q, self.head_dim = q.shape
            self.heads_kv = k.shape[1]
        else:
            if q.dim() != 4 or k.dim() != 4:
                raise ValueError(
                    "expected q (batch, seqlen_q, heads, head_dim) and k/v (batch, seqlen_k, "
                    f"heads_kv, head_dim), got {tuple(q.shape)} and {tuple(k.shape)}"
                )
            if q.shape[0] != k.shape[0]:
                raise ValueError(
                    f"q and k/v must have the same batch size, got {q.shape[0]} and {k.shape[0]}"
                )
            self.batch, self.seqlen_q, self.heads_q, self.head_dim = q.shape
            self.seqlen_k, self.heads_kv = k.shape[1], k.shape[2]
            self.max_seqlen = 0
        if k.shape[-1] != self.head_dim:
            raise ValueError(
                f"q and k/v must have the same head_dim, got {self.head_dim} and {k.shape[-1]}"
            )
        if self.heads_kv == 0 or self.heads_q % self.heads_kv != 0:
            raise ValueError(
                f"the number of query heads ({self.heads_q}) must be a multiple of the number of "
                f"key/value heads ({self.heads_kv})"
            )
        if self.head_dim % 8 != 0 or not 8 <= self.head_dim <= 256:
            raise ValueError(f"head_dim must be a multiple of 8 in [8, 256], got {self.head_dim}")

    def lse_shape(self) -> tuple[int, ...]:
        if self.varlen:
            return (self.heads_q, self.seqlen_q)
        return (self.batch, self.heads_q, self.seqlen_q)

    def native_args(self) -> dict[str, int]:
        return {
            "batch": self.batch,
            "seqlen_q": self.seqlen_q,
            "seqlen_k": self.seqlen_k,
            "heads_q": self.heads_q,
            "heads_kv": self.heads_kv,
            "head_dim": self.head_dim,
            "max_seqlen": self.max_seqlen,
        }


def _mask_args(
    causal: bool,
    window_left: int,
    window_right: int,
    softmax_scale: float | None,
    softcap: float,
    head_dim: int,
) -> dict[str, object]:
    if softmax_scale is None:
        softmax_scale = head_dim**-0.5
    return {
        "causal": bool(causal),
        "window_left": int(window_left),
        "window_right": int(window_right),
        "softmax_scale": float(softmax_scale),
        "softcap": float(softcap),
    }


def flash_attention_forward_cuda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-attention forward on CUDA (online softmax, fp32 accumulation).

    Args:
        q: (batch, seqlen_q, heads, head_dim), or (total, heads, head_dim) with ``cu_seqlens``;
            float32, bfloat16 or float16 on a CUDA device. head_dim a multiple of 8, at most 256.
        k, v: (batch, seqlen_k, heads_kv, head_dim) (or (total, heads_kv, head_dim)), q's dtype;
            heads a multiple of heads_kv (GQA: query head h reads kv head h // (heads / heads_kv)).
        causal: mask keys after the query, aligned bottom-right when seqlen_q != seqlen_k
            (same as ``window_right = 0``).
        window_left, window_right: sliding window; query i sees keys
            [i + seqlen_k - seqlen_q - window_left, i + seqlen_k - seqlen_q + window_right];
            -1 is unbounded.
        softmax_scale: defaults to head_dim ** -0.5.
        softcap: if > 0, scores become softcap * tanh(scores / softcap).
        cu_seqlens: int32 (batch + 1,) offsets of packed sequences (varlen; q and k share them).
        max_seqlen: longest packed sequence, at least the true maximum (rows past it are not
            computed); found from cu_seqlens, with a sync, if None or <= 0.

    Returns:
        out: q's shape and dtype. lse: float32 (batch, heads, seqlen_q), or (heads, total) for
        varlen; natural-log sum of exp of the (scaled, capped) scores. Rows with no visible key
        give out 0 and lse -inf.
    """
    shape = _AttnShape(q, k, v, cu_seqlens, max_seqlen)
    _require_backend()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(shape.lse_shape(), dtype=torch.float32, device=q.device)
    device = _device_index(q)
    _native.cuda_attention_forward(
        device=device,
        stream=_stream(device),
        dtype=_dtype_name(q.dtype),
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        out=out.data_ptr(),
        lse=lse.data_ptr(),
        cu_seqlens=cu_seqlens.data_ptr() if cu_seqlens is not None else 0,
        **shape.native_args(),
        **_mask_args(causal, window_left, window_right, softmax_scale, softcap, shape.head_dim),  # type: ignore[arg-type]
    )
    return out, lse


def flash_attention_backward_cuda(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    softmax_scale: float | None = None,
    softcap: float = 0.0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash-attention backward on CUDA: recomputes probabilities from ``lse``.

    Takes the forward's inputs and outputs (same shapes and options as
    :func:`flash_attention_forward_cuda`) and ``dout`` (out's shape and dtype). Returns
    (dq, dk, dv) with the shapes and dtype of (q, k, v); accumulation is fp32, and dk/dv sum over
    the query heads that share a kv head. Deterministic (no atomics).
    """
    shape = _AttnShape(q, k, v, cu_seqlens, max_seqlen)
    _check_float("out", out, q.device, q.dtype)
    _check_float("dout", dout, q.device, q.dtype)
    if out.shape != q.shape or dout.shape != q.shape:
        raise ValueError(
            f"out and dout must have q's shape {tuple(q.shape)}, got {tuple(out.shape)} and {tuple(dout.shape)}"
        )
    _check_float("lse", lse, q.device, torch.float32)
    if tuple(lse.shape) != shape.lse_shape():
        raise ValueError(f"lse must have shape {shape.lse_shape()}, got {tuple(lse.shape)}")
    _require_backend()
    q, k, v, out, lse, dout = (t.contiguous() for t in (q, k, v, out, lse, dout))
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    device = _device_index(q)
    _native.cuda_attention_backward(
        device=device,
        stream=_stream(device),
        dtype=_dtype_name(q.dtype),
        q=q.data_ptr(),
        k=k.data_ptr(),
        v=v.data_ptr(),
        out=out.data_ptr(),
        lse=lse.data_ptr(),
        dout=dout.data_ptr(),
        delta=delta.data_ptr(),
        dq=dq.data_ptr(),
        dk=dk.data_ptr(),
        dv=dv.data_ptr(),
        cu_seqlens=cu_seqlens.data_ptr() if cu_seqlens is not None else 0,
        **shape.native_args(),
        **_mask_args(causal, window_left, window_right, softmax_scale, softcap, shape.head_dim),  # type: ignore[arg-type]
    )
    return dq, dk, dv


def _check_index(name: str, t: torch.Tensor, device: torch.device, ndim: int) -> int:
    if not isinstance(t, torch.Tensor) or t.dtype not in _INDEX_DTYPES:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be an int32 or int64 tensor, got {got}")
    if t.device != device:
        raise TypeError(f"{name} must be on {device}, got {t.device}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    return _INDEX_DTYPES[t.dtype]


def _row_numel(t: torch.Tensor) -> int:
    n = 1
    for s in t.shape[1:]:
        n *= s
    return n


def moe_permute_cuda(x: torch.Tensor, token_of: torch.Tensor) -> torch.Tensor:
    """Gathers rows into expert order: ``xs[i] = x[token_of[i]]``.

    Args:
        x: (tokens, ...) float32/bfloat16/float16 on a CUDA device.
        token_of: (assignments,) int32 or int64 on x's device. An index outside [0, tokens)
            gives a zero row (no bounds error is raised from the GPU).

    Returns:
        xs: (assignments, ...) with x's dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise TypeError("x must be a CUDA tensor")
    _check_float("x", x, x.device, None)
    if x.dim() < 1:
        raise ValueError("x must have a leading token dimension")
    bits = _check_index("token_of", token_of, x.device, 1)
    _require_backend()
    x, token_of = x.contiguous(), token_of.contiguous()
    xs = torch.empty((token_of.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    device = _device_index(x)
    _native.cuda_moe_permute(
        device=device,
        stream=_stream(device),
        dtype=_dtype_name(x.dtype),
        index_bits=bits,
        x=x.data_ptr(),
        token_of=token_of.data_ptr(),
        xs=xs.data_ptr(),
        rows_out=token_of.shape[0],
        rows_x=x.shape[0],
        dim=_row_numel(x),
    )
    return xs


def moe_combine_cuda(ys: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted combine of expert outputs: ``y[t] = sum_s weights[t, s] * ys[pos[t, s]]``.

    One thread block owns each token, so the sum is race-free and deterministic (fp32
    accumulation, in slot order).

    Args:
        ys: (assignments, ...) float32/bfloat16/float16 on a CUDA device.
        pos: (tokens, top_k) int32 or int64: row of ys holding slot s of token t; a position
            outside [0, assignments) is skipped (a dropped slot).
        weights: (tokens, top_k) floating point; used in float32.

    Returns:
        y: (tokens, ...) with ys's dtype.
    """
    if not isinstance(ys, torch.Tensor) or not ys.is_cuda:
        raise TypeError("ys must be a CUDA tensor")
    _check_float("ys", ys, ys.device, None)
    if ys.dim() < 1:
        raise ValueError("ys must have a leading assignment dimension")
    bits = _check_index("pos", pos, ys.device, 2)
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        raise TypeError("weights must be a floating-point tensor")
    if weights.device != ys.device:
        raise TypeError(f"weights must be on {ys.device}, got {weights.device}")
    if weights.shape != pos.shape:
        raise ValueError(
            f"weights must have pos's shape {tuple(pos.shape)}, got {tuple(weights.shape)}"
        )
    _require_backend()
    ys, pos = ys.contiguous(), pos.contiguous()
    w = weights.to(torch.float32).contiguous()
    tokens, top_k = pos.shape
    y = torch.empty((tokens, *ys.shape[1:]), dtype=ys.dtype, device=ys.device)
    device = _device_index(ys)
    _native.cuda_moe_combine(
        device=device,
        stream=_stream(device),
        dtype=_dtype_name(ys.dtype),
        index_bits=bits,
        ys=ys.data_ptr(),
        pos=pos.data_ptr(),
        weights=w.data_ptr(),
        y=y.data_ptr(),
        tokens=tokens,
        top_k=top_k,
        rows_ys=ys.shape[0],
        dim=_row_numel(ys),
    )
    return y


QUANT_GEMV_MAX_TOKENS = 8  # QG_MAX_TOKENS in rust/cuda/kernels/quant.cu


def quant_gemv_supported(bits: int, in_features: int, group_size: int) -> bool:
    """Whether :func:`quant_linear_cuda` takes this layout (INT4 groups a multiple of 8, INT8 of 4)."""
    per_word = {4: 8, 8: 4}.get(bits)
    return (
        per_word is not None
        and group_size > 0
        and group_size % per_word == 0
        and in_features % group_size == 0
    )


def quant_linear_cuda(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Weight-only quantized ``x @ W.T (+ bias)`` for up to 8 tokens, fp32 accumulation.

    Args:
        x: (tokens, in_features) float32/bfloat16/float16 on a CUDA device, tokens <= 8.
        qweight: uint8 codes, (out, in_features // 2) for INT4 (element ``2j`` in the low nibble
            of byte ``j``) or (out, in_features) for INT8, on x's device.
        scales, zeros: (out, in_features // group_size) float32; ``w = (q - zero) * scale``.
        bias: (out,) float32 or None.

    Returns:
        (tokens, out) in x's dtype.
    """
    if not isinstance(x, torch.Tensor) or not x.is_cuda:
        raise TypeError("x must be a CUDA tensor")
    _check_float("x", x, x.device, None)
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, in_features), got shape {tuple(x.shape)}")
    tokens, k = x.shape
    if tokens > QUANT_GEMV_MAX_TOKENS:
        raise ValueError(f"at most {QUANT_GEMV_MAX_TOKENS} tokens per call, got {tokens}")
    if not quant_gemv_supported(bits, k, group_size):
        raise ValueError(
            f"unsupported layout: bits {bits}, in_features {k}, group_size {group_size} (bits 4 "
            "or 8; group_size a multiple of 8 for INT4, 4 for INT8, dividing in_features)"
        )
    _check_float("qweight", qweight, x.device, torch.uint8)
    out = qweight.shape[0]
    row_bytes = k // 2 if bits == 4 else k
    if qweight.shape != (out, row_bytes):
        raise ValueError(f"qweight must be {(out, row_bytes)}, got {tuple(qweight.shape)}")
    groups = k // group_size
    for name, t in (("scales", scales), ("zeros", zeros)):
        _check_float(name, t, x.device, torch.float32)
        if t.shape != (out, groups):
            raise ValueError(f"{name} must be {(out, groups)}, got {tuple(t.shape)}")
    if bias is not None:
        _check_float("bias", bias, x.device, torch.float32)
        if bias.shape != (out,):
            raise ValueError(f"bias must be ({out},), got {tuple(bias.shape)}")
    _require_backend()
    x, qweight = x.contiguous(), qweight.contiguous()
    scales, zeros = scales.contiguous(), zeros.contiguous()
    bias = None if bias is None else bias.contiguous()
    y = torch.empty((tokens, out), dtype=x.dtype, device=x.device)
    device = _device_index(x)
    _native.cuda_quant_gemv(
        device=device,
        stream=_stream(device),
        dtype=_dtype_name(x.dtype),
        bits=bits,
        x=x.data_ptr(),
        qweight=qweight.data_ptr(),
        scales=scales.data_ptr(),
        zeros=zeros.data_ptr(),
        bias=0 if bias is None else bias.data_ptr(),
        y=y.data_ptr(),
        tokens=tokens,
        n=out,
        k=k,
        group_size=group_size,
    )
    return y
