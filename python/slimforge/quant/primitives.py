"""Affine quantization primitives on torch tensors: the one quantizer of the library.

A weight ``w`` of shape ``(out, in)`` maps to unsigned codes ``q`` in ``[0, 2**bits - 1]`` with
per-group ``scales`` and integer-valued ``zeros`` (both float32, ``(out, in // group_size)``) so
that ``w ~= (q - zero) * scale``. INT4 codes pack two per byte along ``in``: element ``2j`` in
the low nibble, element ``2j + 1`` in the high nibble of byte ``j``.

The rule (RTN, GPTQ, AWQ and QAT all use it): asymmetric maps ``[min(w, 0), max(w, 0)]`` onto
``[0, 2**bits - 1]`` with ``zero = round(-min / scale)``; symmetric uses ``scale = absmax /
(qmax / 2)`` and the mid-range zero; scales are at least float32 epsilon, so an all-zero group
dequantizes to exact zeros. Float32 CPU tensors run the Rust kernels; other devices and dtypes
run :func:`group_qparams`, the same rule in torch ops (bit-identical on float32, tested).
"""

from __future__ import annotations

import numpy as np
import torch

from slimforge import _native

__all__ = [
    "ALLOWED_GROUP_SIZES",
    "SUPPORTED_BITS",
    "check_bits",
    "check_group_size",
    "choose_qparams",
    "dequantize_affine",
    "fake_quantize_affine",
    "group_qparams",
    "pack_int4",
    "quantize_affine",
    "quantize_codes",
    "resolve_group_size",
    "unpack_int4",
]

#: Group sizes accepted besides per-channel (``None`` or ``-1``: one group per row).
ALLOWED_GROUP_SIZES = (32, 64, 128)
#: Bit widths ``QuantLinear`` runs.
SUPPORTED_BITS = (4, 8)
#: Smallest scale handed out (float32 epsilon), as the Rust kernels do.
SCALE_EPS = float(torch.finfo(torch.float32).eps)

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_bits(bits: int) -> int:
    """``bits`` if ``QuantLinear`` can run it (4 or 8), else ValueError."""
    if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be 4 or 8 (what QuantLinear runs), got {bits!r}")
    return int(bits)


def check_group_size(group_size: int | None) -> int | None:
    """``group_size`` if it is 32, 64, 128 or per-channel (``None``/``-1``), else ValueError.

    Config classes call it at construction; :func:`resolve_group_size` also checks that it
    divides a layer's ``in_features``.
    """
    if group_size is None or group_size == -1:
        return None
    if isinstance(group_size, bool) or group_size not in ALLOWED_GROUP_SIZES:
        raise ValueError(
            f"group_size must be one of {ALLOWED_GROUP_SIZES} or None/-1 (per-channel), "
            f"got {group_size!r}"
        )
    return int(group_size)


def resolve_group_size(group_size: int | None, in_features: int) -> int:
    """Group size in elements: ``None`` or ``-1`` means per-channel (``in_features``).

    Raises ``ValueError`` unless it is 32, 64, 128 or per-channel and divides ``in_features``.
    """
    if group_size is None or group_size == -1 or group_size == in_features:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        return int(in_features)
    check_group_size(group_size)
    if in_features % group_size != 0:
        raise ValueError(
            f"in_features ({in_features}) must be divisible by group_size ({group_size})"
        )
    return int(group_size)


def _native_ok(t: torch.Tensor) -> bool:
    """Whether the Rust kernels take ``t`` without a conversion (float32 on the CPU)."""
    return t.device.type == "cpu" and t.dtype == torch.float32


def group_qparams(
    w: torch.Tensor, bits: int, symmetric: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine rule in torch ops, one group per row of ``w: (rows, group)``.

    Returns ``(scales, zeros)``, each ``(rows,)``, in float32 (float64 for float64 input), equal
    to what the Rust kernels compute for float32 input. Any device; no finiteness check (the
    Rust path raises on NaN/Inf).
    """
    qmax = 2**bits - 1
    out_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    zero_t = torch.zeros((), dtype=w.dtype, device=w.device)
    lo = torch.minimum(w.amin(dim=1), zero_t).double()
    hi = torch.maximum(w.amax(dim=1), zero_t).double()
    if symmetric:
        scale = (torch.maximum(hi, -lo) / (qmax / 2.0)).to(out_dtype).clamp_min(SCALE_EPS)
        return scale, torch.full_like(scale, (qmax + 1) / 2)
    scale = ((hi - lo) / qmax).to(out_dtype).clamp_min(SCALE_EPS)
    zero = torch.round(-lo / scale.double()).clamp(0, qmax).to(out_dtype)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, 2**bits - 1)`` in ``w``'s float dtype.

    ``scale``/``zero`` broadcast against ``w`` (e.g. ``(rows, 1)`` for one group per row).
    Rounds half to even, as the Rust kernels do.
    """
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def choose_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = False,
    *,
    no_clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization parameters for ``w: (..., in)``.

    Asymmetric (min-max): ``[min(w, 0), max(w, 0)]`` maps onto ``[0, 2**bits - 1]``.
    Symmetric (absmax): ``scale = absmax / 7.5`` (INT4) or ``/ 127.5`` (INT8), zero 8 or 128;
    a group's largest positive weight then lands half a step past the top code and is clipped.
    ``no_clip=True`` (symmetric only; torchao's ``SYMMETRIC_NO_CLIPPING_ERR``):
    ``scale = max(max(w) / 7, -min(w) / 8)`` (INT4) or ``max(max(w) / 127, -min(w) / 128)``
    (INT8), so the group's extreme weight is a code exactly and nothing is clipped.
    Returns ``(scales, zeros)``, float32, shape ``(..., in // group_size)``, on ``w``'s device.
    """
    check_bits(bits)
    if no_clip and not symmetric:
        raise ValueError("no_clip applies to symmetric quantization (min-max never clips)")
    _check_float(w, "w")
    shape = tuple(w.shape)
    g = resolve_group_size(group_size, shape[-1])
    out = (*shape[:-1], shape[-1] // g)
    if not _native_ok(w):
        wg = w.detach().reshape(-1, g)
        s_t, z_t = group_qparams(wg, bits, symmetric)
        if no_clip:
            s_t = _no_clip_scales_torch(wg, bits, s_t)
        return s_t.float().reshape(out), z_t.float().reshape(out)
    a = w.detach().reshape(-1, shape[-1]).contiguous().numpy()
    s, z = _native.quant_choose_qparams(a, bits, g, bool(symmetric))
    if no_clip:
        s = _no_clip_scales(a, bits, g, s)
    return torch.from_numpy(s).reshape(out), torch.from_numpy(z).reshape(out)


def _no_clip_scales(a: np.ndarray, bits: int, g: int, absmax_scales: np.ndarray) -> np.ndarray:
    """``max(max(w, 0) / (2^(b-1) - 1), -min(w, 0) / 2^(b-1))`` per group, float32.

    All-zero groups keep the absmax rule's floor scale.
    """
    half = 2 ** (bits - 1)
    grouped = a.reshape(a.shape[0], -1, g).astype(np.float64)
    hi = np.maximum(grouped.max(axis=-1), 0.0)
    lo = np.minimum(grouped.min(axis=-1), 0.0)
    s = np.maximum(hi / (half - 1), -lo / half).astype(np.float32)
    return np.where(s > 0, s, absmax_scales.reshape(s.shape)).reshape(absmax_scales.shape)


def _no_clip_scales_torch(wg: torch.Tensor, bits: int, absmax_scales: torch.Tensor) -> torch.Tensor:
    """:func:`_no_clip_scales` in torch ops for ``wg: (groups, group_size)``."""
    half = 2 ** (bits - 1)
    hi = wg.amax(dim=1).double().clamp_min(0.0)
    lo = wg.amin(dim=1).double().clamp_max(0.0)
    s = torch.maximum(hi / (half - 1), -lo / half).to(absmax_scales.dtype)
    return torch.where(s > 0, s, absmax_scales)


def _check_float(w: torch.Tensor, name: str) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got {w.dtype}"
        )
    if w.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")


def _check_params(t: torch.Tensor, name: str, rows: int, groups: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.numel() != rows * groups:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}, expected {rows * groups} elements "
            f"({rows} rows x {groups} groups)"
        )
    return t.detach().reshape(rows, groups)


def quantize_affine(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int | None,
) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, 2**bits - 1)`` as uint8, shape of ``w``.

    Rounds half to even and computes in float32, as ``torch.round`` does.
    """
    check_bits(bits)
    _check_float(w, "w")
    shape = tuple(w.shape)
    g = resolve_group_size(group_size, shape[-1])
    rows, ng = w.numel() // shape[-1], shape[-1] // g
    s = _check_params(scales, "scales", rows, ng)
    z = _check_params(zeros, "zeros", rows, ng)
    if not _native_ok(w):
        wg = w.detach().float().reshape(rows, ng, g)
        q = quantize_codes(
            wg, s.float().to(w.device)[..., None], z.float().to(w.device)[..., None], bits
        )
        return q.to(torch.uint8).reshape(shape)
    a = w.detach().reshape(rows, shape[-1]).contiguous().numpy()
    q = _native.quant_quantize(
        a, s.float().cpu().contiguous().numpy(), z.float().cpu().contiguous().numpy(), bits, g
    )
    return torch.from_numpy(q).reshape(shape)


def dequantize_affine(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    """Float32 ``(q - zero) * scale`` for unpacked uint8 codes ``q: (..., in)``."""
    _check_codes(q, "q")
    shape = tuple(q.shape)
    g = resolve_group_size(group_size, shape[-1])
    rows, ng = q.numel() // shape[-1], shape[-1] // g
    s = _check_params(scales, "scales", rows, ng).float()
    z = _check_params(zeros, "zeros", rows, ng).float()
    if q.device.type != "cpu":
        qf = q.reshape(rows, ng, g).float()
        return ((qf - z.to(q.device)[..., None]) * s.to(q.device)[..., None]).reshape(shape)
    a = q.detach().reshape(rows, shape[-1]).contiguous().numpy()
    w = _native.quant_dequantize(a, s.contiguous().numpy(), z.contiguous().numpy(), g)
    return torch.from_numpy(w).reshape(shape)


def fake_quantize_affine(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool = False,
    *,
    no_clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest quantization of ``w: (..., in)`` and back.

    Returns ``(dequantized (..., in) in w's dtype, codes (..., in) uint8, scales, zeros)`` with
    scales/zeros float32 ``(..., in // group_size)``. No gradient (see ``slimforge.quant.qat``
    for the straight-through version). Runs the rule in torch ops on any device (bit-identical
    to the Rust kernels, and faster for this round trip: search loops call it many times).
    Raises ValueError on NaN or Inf.
    """
    check_bits(bits)
    if no_clip and not symmetric:
        raise ValueError("no_clip applies to symmetric quantization (min-max never clips)")
    _check_float(w, "w")
    shape = tuple(w.shape)
    g = resolve_group_size(group_size, shape[-1])
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    wg = w.detach().reshape(-1, g).to(work)
    lo, hi = torch.aminmax(wg) if wg.numel() else (wg.new_zeros(()), wg.new_zeros(()))
    if not bool(torch.isfinite(lo) & torch.isfinite(hi)):
        raise ValueError("w contains NaN or Inf")
    s, z = group_qparams(wg, bits, symmetric)
    if no_clip:
        s = _no_clip_scales_torch(wg, bits, s)
    q = quantize_codes(wg, s[:, None], z[:, None], bits)
    deq = (q - z[:, None]) * s[:, None]
    out = (*shape[:-1], shape[-1] // g)
    return (
        deq.reshape(shape).to(w.dtype),
        q.to(torch.uint8).reshape(shape),
        s.float().reshape(out),
        z.float().reshape(out),
    )


def _check_codes(q: torch.Tensor, name: str) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {q.dtype}")
    if q.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Packs uint8 codes in ``[0, 15]``, ``(..., n)`` with ``n`` even, into ``(..., n // 2)``.

    Element ``2j`` goes to the low nibble and ``2j + 1`` to the high nibble of byte ``j``.
    """
    _check_codes(q, "q")
    shape = tuple(q.shape)
    if shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {shape}")
    p = _native.quant_pack_int4(q.detach().cpu().reshape(-1, shape[-1]).contiguous().numpy())
    return torch.from_numpy(p).reshape(*shape[:-1], shape[-1] // 2).to(q.device)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., n)`` to codes ``(..., 2 * n)``."""
    _check_codes(packed, "packed")
    shape = tuple(packed.shape)
    q = _native.quant_unpack_int4(packed.detach().cpu().reshape(-1, shape[-1]).contiguous().numpy())
    return torch.from_numpy(q).reshape(*shape[:-1], shape[-1] * 2).to(packed.device)
