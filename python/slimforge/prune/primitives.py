"""Pruning primitives: masks from scores, with no module swapping.

Each function takes plain tensors and returns keep-masks (``torch.bool``, ``True`` = keep) of the
same shape; the selection runs in Rust (``slimforge._native.prune_*``) on float32 CPU copies.
Ties are broken by position, so a mask is a function of the scores alone: among equal scores
the earlier element (tensor order, then row-major index) is pruned first, which is what a
stable sort of the scores prunes. :mod:`slimforge.prune.reference` holds the plain PyTorch
versions the tests compare against.

- :func:`global_masks`: the ``round(amount * n)`` smallest ``|w|`` over *all* tensors together
  (a global magnitude threshold, by radix selection: no sort and no concatenated copy);
- :func:`row_masks`: the ``round(amount * in)`` smallest of each row (Wanda's per-output
  comparison, with an optional per-input ``scale``: ``|W_ij| * scale_j``);
- :func:`nm_masks`: N:M along the input dimension (the ``M - N`` smallest of every ``M``);
- :func:`group_norms`: L1/L2 norms of groups of rows or columns (neurons, heads, channels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from slimforge import _native

__all__ = [
    "check_amount",
    "check_nm",
    "global_masks",
    "global_threshold",
    "group_norms",
    "nm_masks",
    "row_masks",
]


def check_amount(amount: float, name: str = "amount") -> float:
    """``amount`` if it is a fraction in [0, 1), else ValueError."""
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise TypeError(f"{name} must be a float in [0, 1), got {type(amount).__name__}")
    if not (0.0 <= float(amount) < 1.0) or math.isnan(amount):
        raise ValueError(f"{name} must be in [0, 1), got {amount}")
    return float(amount)


def check_nm(n: int, m: int) -> tuple[int, int]:
    """``(n, m)`` if ``1 <= n <= m`` (N kept of every M), else ValueError."""
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 1 <= n <= m:
        raise ValueError(f"N:M sparsity needs 1 <= N <= M, got N = {n}, M = {m}")
    if m > 64:
        raise ValueError(f"M must be at most 64, got {m}")
    return n, m


def _f32(t: torch.Tensor, name: str) -> np.ndarray:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def _count(amount: float, n: int) -> int:
    return min(n, round(check_amount(amount) * n))


def global_threshold(tensors: Sequence[torch.Tensor], amount: float) -> tuple[float, int]:
    """``(threshold, ties)``: the largest pruned ``|w|`` when the ``round(amount * n)`` smallest
    magnitudes over all ``tensors`` (``n`` elements in all) are pruned, and how many elements
    equal to it are pruned (the earliest ones). ``-inf`` and 0 when nothing is pruned."""
    arrays = [_f32(t, f"tensors[{i}]").reshape(-1) for i, t in enumerate(tensors)]
    k = _count(amount, sum(a.size for a in arrays))
    return _native.prune_select(arrays, k, True)


def global_masks(tensors: Sequence[torch.Tensor], amount: float) -> list[torch.Tensor]:
    """Keep-masks pruning the ``round(amount * n)`` smallest ``|w|`` over all ``tensors``
    together (ties: the earlier element, in tensor order, is pruned first). Same shapes, bool,
    on the CPU."""
    arrays = [_f32(t, f"tensors[{i}]").reshape(-1) for i, t in enumerate(tensors)]
    k = _count(amount, sum(a.size for a in arrays))
    masks = [torch.empty(t.shape, dtype=torch.bool) for t in tensors]
    _native.prune_global_masks(arrays, [m.reshape(-1).numpy() for m in masks], k, True)
    return masks


def _scores_2d(w: torch.Tensor, name: str) -> np.ndarray:
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out, in), got shape {tuple(w.shape)}")
    return _f32(w, name)


def _scale(scale: torch.Tensor | None, cols: int) -> np.ndarray | None:
    if scale is None:
        return None
    s = _f32(scale, "scale").reshape(-1)
    if s.size != cols:
        raise ValueError(f"scale must have {cols} elements (one per input), got {s.size}")
    return s


def row_masks(
    weight: torch.Tensor, amount: float, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep-mask ``(out, in)`` pruning the ``round(amount * in)`` smallest scores of each row;
    scores are ``|W_ij| * scale_j`` (Wanda: ``scale = ||X_j||_2``) or ``|W_ij|``. Ties: the
    lower column is pruned first."""
    a = _scores_2d(weight, "weight")
    k = _count(amount, a.shape[1])
    return torch.from_numpy(_native.prune_row_masks(a, k, True, _scale(scale, a.shape[1])))


def nm_masks(
    weight: torch.Tensor, n: int = 2, m: int = 4, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep-mask ``(out, in)`` with the ``n`` largest scores of every ``m`` consecutive inputs of
    each row kept (scores as in :func:`row_masks`; ties: the lower column pruned first).
    ValueError when ``in`` is not divisible by ``m``."""
    check_nm(n, m)
    a = _scores_2d(weight, "weight")
    if a.shape[1] % m:
        raise ValueError(
            f"in_features ({a.shape[1]}) must be divisible by M = {m} for {n}:{m} sparsity"
        )
    return torch.from_numpy(_native.prune_nm_masks(a, n, m, True, _scale(scale, a.shape[1])))


def group_norms(
    weight: torch.Tensor,
    dim: int,
    group: int = 1,
    p: int = 2,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """L``p`` norm (``p`` 1 or 2) of each group of ``group`` consecutive rows (``dim=0``:
    output channels, e.g. neurons of an up projection, heads of q) or columns (``dim=1``: input
    channels, e.g. neurons of a down projection), elements scaled by the per-column ``scale``
    when given. ``weight`` ``(out, in)``; returns float32 ``(out // group,)`` or
    ``(in // group,)``."""
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (rows) or 1 (columns), got {dim}")
    a = _scores_2d(weight, "weight")
    out = _native.prune_group_norms(a, dim, group, p, _scale(scale, a.shape[1]))
    return torch.from_numpy(out)
