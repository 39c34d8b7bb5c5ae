"""Plain PyTorch attention with the masks of `flash_attention` (float64-capable)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _mask(nq: int, nk: int, causal: bool, window: tuple[int, int], num_global: int, device):
    left, right = window
    if causal:
        right = 0
    i = torch.arange(nq, device=device).unsqueeze(1)
    j = torch.arange(nk, device=device).unsqueeze(0)
    centre = i + (nk - nq)
    visible = torch.ones(nq, nk, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= j >= centre - left
    if right >= 0:
        visible &= j <= centre + right
    if num_global > 0:
        visible |= (i < num_global) | (j < num_global)
    return visible


def _dense(q, k, v, causal, window, scale, softcap, num_global):
    # q (nq, hq, d), k/v (nk, hkv, d) -> (nq, hq, d)
    nq, hq, _ = q.shape
    nk, hkv, _ = k.shape
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    visible = _mask(nq, nk, causal, window, num_global, q.device)
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # Rows that see no key: softmax gives NaN; flash attention defines them as 0.
    probs = torch.where(visible.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.einsum("hij,jhd->ihd", probs, v)


def reference_attention(
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
    """Attention computed densely in the dtype of q (pass float64 tensors for an exact reference).

    Same arguments and layouts as :func:`slimforge.attention.flash_attention`; materialises the
    (seqlen_q x seqlen_k) score matrix of each sequence and head.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    window = (int(window[0]), int(window[1]))
    if cu_seqlens is None:
        outs = [
            _dense(q[b], k[b], v[b], causal, window, scale, softcap, num_global)
            for b in range(q.shape[0])
        ]
        return torch.stack(outs) if outs else q.clone()
    bounds = cu_seqlens.tolist()
    outs = [
        _dense(q[s:e], k[s:e], v[s:e], causal, window, scale, softcap, num_global)
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outs) if outs else q.clone()
