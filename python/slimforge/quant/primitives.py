"""Affine quantization primitives on torch tensors (Rust kernels underneath, CPU).

A weight ``w`` of shape ``(out, in)`` maps to unsigned codes ``q`` in ``[0, 2**bits - 1]`` with
per-group ``scales`` and integer-valued ``zeros`` (both float32, ``(out, in // group_size)``) so
that ``w ~= (q - zero) * scale``. INT4 codes pack two per byte along ``in``: element ``2j`` in
the low nibble, element ``2j + 1`` in the high nibble of byte ``j``.
"""

from __future__ import annotations

import numpy as np
import torch

from slimforge import _native

__all__ = [
    "ALLOWED_GROUP_SIZES",
    "choose_qparams",
    "dequantize_affine",
    "pack_int4",
    "quantize_affine",
    "resolve_group_size",
    "unpack_int4",
]

#: Group sizes accepted besides per-channel (``None`` or ``-1``: one group per row).
ALLOWED_GROUP_SIZES = (32, 64, 128)

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_bits(bits: int) -> int:
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return int(bits)


def resolve_group_size(group_size: int | None, in_features: int) -> int:
    """Group size in elements: ``None`` or ``-1`` means per-channel (``in_features``).

    Raises ``ValueError`` unless it is 32, 64, 128 or per-channel and divides ``in_features``.
    """
    if group_size is None or group_size == -1 or group_size == in_features:
        if in_features <= 0:
            raise ValueError(f"in_features must be positive, got {in_features}")
        return int(in_features)
    if group_size not in ALLOWED_GROUP_SIZES:
        raise ValueError(
            f"group_size must be one of {ALLOWED_GROUP_SIZES} or None/-1 (per-channel), "
            f"got {group_size!r}"
        )
    if in_features % group_size != 0:
        raise ValueError(
            f"in_features ({in_features}) must be divisible by group_size ({group_size})"
        )
    return int(group_size)


def _float_matrix(w: torch.Tensor, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """Flattens ``(..., in)`` float weights to a contiguous float32 ``(rows, in)`` array."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (fp32/bf16/fp16/fp64), got {w.dtype}"
        )
    if w.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    shape = tuple(w.shape)
    a = w.detach().to("cpu", torch.float32).reshape(-1, shape[-1]).contiguous().numpy()
    return a, shape


def _params(t: torch.Tensor, name: str, rows: int, groups: int) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.numel() != rows * groups:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}, expected {rows * groups} elements "
            f"({rows} rows x {groups} groups)"
        )
    return t.detach().to("cpu", torch.float32).reshape(rows, groups).contiguous().numpy()


def _codes(q: torch.Tensor, name: str) -> tuple[np.ndarray, tuple[int, ...]]:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(q).__name__}")
    if q.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {q.dtype}")
    if q.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension, got a scalar")
    shape = tuple(q.shape)
    return q.detach().cpu().reshape(-1, shape[-1]).contiguous().numpy(), shape


def choose_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int | None,
    symmetric: bool,
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
    a, shape = _float_matrix(w, "w")
    g = resolve_group_size(group_size, shape[-1])
    s, z = _native.quant_choose_qparams(a, bits, g, bool(symmetric))
    if no_clip:
        s = _no_clip_scales(a, bits, g, s)
    out = (*shape[:-1], shape[-1] // g)
    return (
        torch.from_numpy(s).reshape(out).to(w.device),
        torch.from_numpy(z).reshape(out).to(w.device),
    )


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
    a, shape = _float_matrix(w, "w")
    g = resolve_group_size(group_size, shape[-1])
    rows, ng = a.shape[0], shape[-1] // g
    q = _native.quant_quantize(
        a, _params(scales, "scales", rows, ng), _params(zeros, "zeros", rows, ng), bits, g
    )
    return torch.from_numpy(q).reshape(shape).to(w.device)


def dequantize_affine(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    """Float32 ``(q - zero) * scale`` for unpacked uint8 codes ``q: (..., in)``."""
    a, shape = _codes(q, "q")
    g = resolve_group_size(group_size, shape[-1])
    rows, ng = a.shape[0], shape[-1] // g
    w = _native.quant_dequantize(
        a, _params(scales, "scales", rows, ng), _params(zeros, "zeros", rows, ng), g
    )
    return torch.from_numpy(w).reshape(shape).to(q.device)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Packs uint8 codes in ``[0, 15]``, ``(..., n)`` with ``n`` even, into ``(..., n // 2)``.

    Element ``2j`` goes to the low nibble and ``2j + 1`` to the high nibble of byte ``j``.
    """
    a, shape = _codes(q, "q")
    if shape[-1] % 2 != 0:
        raise ValueError(f"pack_int4 needs an even last dimension, got shape {shape}")
    p = _native.quant_pack_int4(a)
    return torch.from_numpy(p).reshape(*shape[:-1], shape[-1] // 2).to(q.device)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(..., n)`` to codes ``(..., 2 * n)``."""
    a, shape = _codes(packed, "packed")
    q = _native.quant_unpack_int4(a)
    return torch.from_numpy(q).reshape(*shape[:-1], shape[-1] * 2).to(packed.device)
