"""Plain PyTorch references of the pruning kernels (the tests compare against them).

Each one is the obvious implementation: a *stable* sort of the scores, the first ``k`` pruned,
so ties go to the earlier element exactly as the Rust kernels break them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "global_masks_reference",
    "group_norms_reference",
    "nm_masks_reference",
    "row_masks_reference",
    "sparsegpt_reference",
]


def global_masks_reference(tensors: Sequence[torch.Tensor], amount: float) -> list[torch.Tensor]:
    """Concatenate ``|w|``, stable-sort, prune the first ``round(amount * n)``."""
    flat = torch.cat([t.detach().float().abs().reshape(-1) for t in tensors])
    k = round(amount * flat.numel())
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:k]] = False
    return [
        m.reshape(t.shape)
        for m, t in zip(keep.split([t.numel() for t in tensors]), tensors, strict=True)
    ]


def _scores(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().float().abs()
    return w if scale is None else w * scale.float().reshape(1, -1)


def row_masks_reference(
    weight: torch.Tensor, amount: float, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Per row: stable-sort ``|W| (* scale)``, prune the first ``round(amount * in)``."""
    s = _scores(weight, scale)
    k = round(amount * s.shape[1])
    keep = torch.ones_like(s, dtype=torch.bool)
    keep.scatter_(1, torch.sort(s, dim=1, stable=True).indices[:, :k], False)
    return keep


def nm_masks_reference(
    weight: torch.Tensor, n: int, m: int, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Per window of ``m`` inputs: stable-sort, prune the first ``m - n``."""
    s = _scores(weight, scale)
    rows, cols = s.shape
    win = s.reshape(rows * cols // m, m)
    keep = torch.ones_like(win, dtype=torch.bool)
    keep.scatter_(1, torch.sort(win, dim=1, stable=True).indices[:, : m - n], False)
    return keep.reshape(rows, cols)


def group_norms_reference(
    weight: torch.Tensor, dim: int, group: int = 1, p: int = 2, scale: torch.Tensor | None = None
) -> torch.Tensor:
    """Norms in float64 of groups of rows (``dim=0``) or columns (``dim=1``)."""
    w = weight.detach().double()
    if scale is not None:
        w = w * scale.double().reshape(1, -1)
    t = w if dim == 0 else w.T
    t = t.reshape(t.shape[0] // group, -1)
    return (t.abs().sum(1) if p == 1 else t.square().sum(1).sqrt()).float()


def sparsegpt_reference(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    amount: float | None = None,
    n: int = 0,
    m: int = 0,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (IST-DASLab ``sparsegpt.py``'s ``fasterprune``) in float64, without
    quantization: ``(pruned weight, keep-mask)``. Unstructured masks take the ``round(amount *
    numel)`` smallest ``w^2 / Hinv_jj^2`` of each block at the block's start (stable sort);
    N:M masks the ``m - n`` smallest of each window when the loop reaches it."""
    w = weight.detach().double().clone()
    h = hessian.detach().double().clone()
    rows, cols = w.shape
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        d = torch.diagonal(h1)
        mask1 = torch.zeros_like(w1, dtype=torch.bool)  # True = pruned
        if n == 0:
            score = (w1**2 / d.reshape(1, -1) ** 2).reshape(-1)
            k = round(float(amount or 0.0) * score.numel())
            mask1.view(-1)[torch.sort(score, stable=True).indices[:k]] = True
        for i in range(i2 - i1):
            if n and i % m == 0:
                s = w1[:, i : i + m] ** 2 / d[i : i + m].reshape(1, -1) ** 2
                drop = torch.sort(s, dim=1, stable=True).indices[:, : m - n]
                mask1[:, i : i + m] = False
                mask1[:, i : i + m].scatter_(1, drop, True)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            e = (col - q) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ h1[i, i:].unsqueeze(0)
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w, keep
