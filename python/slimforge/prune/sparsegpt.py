"""SparseGPT on one weight: GPTQ's Hessian, inverse Cholesky factor and column loop, with a mask.

Follows IST-DASLab ``sparsegpt.py`` (``fasterprune``): dead inputs (H_jj = 0) get H_jj = 1 and a
zero column; damping ``damp * mean(diag H)`` (GPTQ's rule, shared: retried +0.01 on failure);
``Hinv`` the upper Cholesky factor of ``H^-1``; per block of ``block_size`` columns, the
unstructured mask is the ``round(amount * rows * block)`` smallest ``w^2 / Hinv_jj^2`` at the
block's start (by selection in Rust, ties to the earlier element), or N:M windows chosen as the
loop reaches them; the column loop runs in Rust (``_native.prune_sparsegpt_block``: GPTQ's kernel
with its mask step, rows in parallel) and the later columns get one GEMM per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from slimforge import _native
from slimforge.calibration import all_finite
from slimforge.quant.gptq import GPTQResult, _inverse_cholesky

if TYPE_CHECKING:
    from slimforge.prune.api import SparseGPT

__all__ = ["SparseGPTResult", "sparsegpt_prune_weight"]


@dataclass
class SparseGPTResult:
    """weight: (out, in) float32, pruned (and dequantized when quantized); keep: (out, in) bool;
    quant: the quantized form (``GPTQResult``, columns in their original order) or None; damp:
    the damping fraction used."""

    weight: torch.Tensor
    keep: torch.Tensor
    quant: GPTQResult | None
    damp: float


def sparsegpt_prune_weight(
    weight: torch.Tensor, hessian: torch.Tensor, config: SparseGPT | None = None
) -> SparseGPTResult:
    """Prunes one weight ``(out, in)`` given its Hessian ``(in, in)`` (``2 X^T X / n``, as
    ``HessianObserver`` accumulates it). CPU, float32. ValueError on shape mismatch, NaN/Inf or
    an ``in`` not divisible by M; RuntimeError when damping cannot make H positive definite."""
    from slimforge.prune.api import SparseGPT

    cfg = config or SparseGPT()
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"hessian must be ({cols}, {cols}) for a weight with {cols} inputs, got "
            f"{tuple(hessian.shape)}"
        )
    if not all_finite(weight):
        raise ValueError("weight contains NaN or Inf")
    if not all_finite(hessian):
        raise ValueError("hessian contains NaN or Inf (check the calibration activations)")
    if cfg.m is not None and cols % cfg.m:
        raise ValueError(f"in_features ({cols}) must be divisible by M = {cfg.m}")
    quant = cfg.bits is not None
    if quant and cols % cfg.group_size:
        raise ValueError(f"in_features ({cols}) must be divisible by group_size {cfg.group_size}")
    w = weight.detach().to("cpu", torch.float32).clone()
    h = hessian.detach().to("cpu", torch.float32).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv, damp_used = _inverse_cholesky(h, cfg.damp, cfg.max_damp_retries)
    keep = torch.empty(rows, cols, dtype=torch.bool)
    codes = torch.empty(rows, cols, dtype=torch.uint8) if quant else None
    ng = cols // cfg.group_size if quant else 0
    scales = torch.empty(rows, ng)
    zeros = torch.empty(rows, ng)
    n, m = (cfg.n or 0), (cfg.m or 0)
    for i1 in range(0, cols, cfg.block_size):
        i2 = min(i1 + cfg.block_size, cols)
        wb = w[:, i1:i2].clone()
        hb = hinv[i1:i2, i1:i2].contiguous()
        mask = None
        if m == 0:
            d = torch.diagonal(hb)
            score = wb.square() / d.square().reshape(1, -1)
            k = min(score.numel(), round(float(cfg.amount or 0.0) * score.numel()))
            kept = np.empty(score.numel(), dtype=np.bool_)
            _native.prune_global_masks([score.reshape(-1).numpy()], [kept], k, False)
            mask = (~kept).astype(np.uint8).reshape(score.shape)
        pruned, err, c, sc, ze = _native.prune_sparsegpt_block(
            wb.numpy(),
            hb.numpy(),
            mask,
            n,
            m,
            cfg.bits or 0,
            cfg.group_size if quant else i2 - i1,
            cfg.symmetric,
        )
        w[:, i1:i2] = wb
        keep[:, i1:i2] = torch.from_numpy(pruned) == 0
        if codes is not None:
            codes[:, i1:i2] = torch.from_numpy(c)
            g1, g2 = i1 // cfg.group_size, i2 // cfg.group_size
            scales[:, g1:g2] = torch.from_numpy(sc)
            zeros[:, g1:g2] = torch.from_numpy(ze)
        if i2 < cols:
            w[:, i2:].addmm_(torch.from_numpy(err), hinv[i1:i2, i2:], alpha=-1)
    res = None
    if codes is not None and cfg.bits is not None:
        g_idx = (torch.arange(cols) // cfg.group_size).int()
        res = GPTQResult(codes, scales, zeros, g_idx, None, cfg.bits, cfg.group_size, damp_used)
    return SparseGPTResult(w, keep, res, damp_used)
