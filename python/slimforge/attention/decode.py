"""Decode attention: one new token per sequence against its key/value cache.

`decode_attention` is the attention of one generation step. It takes the fused q/k/v projection
of each sequence's new token, rotates q and k (rotate-half RoPE, at the token's position), appends
k and v to the caches, and attends every query head to the sequence's cached keys (GQA: query
head h reads kv head ``h // (heads_q // heads_kv)``). CPU float32 runs the Rust kernel
(``_native.attention_decode_step``: on the calling thread for batch-1-sized work, so a step pays
no thread-pool wake-up, and over (sequence, kv head) in the pool above ~2^18 multiply-adds);
other devices and dtypes run `decode_attention_reference`, the same step in torch ops.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from slimforge import _native

__all__ = ["decode_attention", "decode_attention_reference"]


def _check(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor, num_heads: int) -> int:
    """ValueError for inconsistent shapes; returns head_dim."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must be one (batch, heads_kv, capacity, head_dim) shape, got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    b, hkv, _, d = k_cache.shape
    if num_heads <= 0 or num_heads % hkv:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of heads_kv ({hkv})")
    if qkv.shape != (b, (num_heads + 2 * hkv) * d):
        raise ValueError(
            f"qkv must be (batch, (heads_q + 2 heads_kv) * head_dim) = "
            f"{(b, (num_heads + 2 * hkv) * d)}, got {tuple(qkv.shape)}"
        )
    if lengths.shape != (b,) or lengths.dtype != torch.int64:
        raise ValueError(
            f"lengths must be int64 ({b},), got {lengths.dtype} {tuple(lengths.shape)}"
        )
    return d


def decode_attention(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    num_heads: int,
    cos_sin: tuple[Tensor, Tensor] | None = None,
    softmax_scale: float | None = None,
) -> Tensor:
    """One decode step of attention with a key/value cache.

    Args:
        qkv: ``(batch, (heads_q + 2 heads_kv) * head_dim)``, the new tokens' q, k and v stacked
            (the output of a fused q/k/v projection).
        k_cache, v_cache: ``(batch, heads_kv, capacity, head_dim)``; the new k (rotated) and v
            are written at position ``lengths[b]`` of sequence b, in place.
        lengths: ``(batch,)`` int64, tokens already cached per sequence (not advanced here).
        num_heads: query heads.
        cos_sin: rotary tables ``(positions, head_dim // 2)`` (row p for position p, as
            ``rotary_cos_sin(torch.arange(capacity), head_dim)`` squeezed), or None for no
            rotary embedding.
        softmax_scale: default ``1 / sqrt(head_dim)``.

    Returns:
        ``(batch, heads_q * head_dim)`` in qkv's dtype: each query head's attention over keys
        ``0 ..= lengths[b]`` of its sequence.
    """
    d = _check(qkv, k_cache, v_cache, lengths, num_heads)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    native = (
        qkv.device.type == "cpu"
        and qkv.dtype == k_cache.dtype == v_cache.dtype == torch.float32
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and (cos_sin is None or all(t.dtype == torch.float32 for t in cos_sin))
    )
    if not native:
        return decode_attention_reference(qkv, k_cache, v_cache, lengths, num_heads, cos_sin, scale)
    cos = sin = None
    if cos_sin is not None:
        cos, sin = (t.contiguous().numpy() for t in cos_sin)
    out = _native.attention_decode_step(
        qkv.detach().contiguous().numpy(),
        k_cache.numpy(),
        v_cache.numpy(),
        lengths.contiguous().numpy(),
        num_heads,
        cos,
        sin,
        scale,
    )
    return torch.from_numpy(out)


def decode_attention_reference(
    qkv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    lengths: Tensor,
    num_heads: int,
    cos_sin: tuple[Tensor, Tensor] | None = None,
    softmax_scale: float | None = None,
) -> Tensor:
    """`decode_attention` in plain torch ops (any device and float dtype; scores in float32):
    the reference the Rust kernel is tested against, and the path for other devices."""
    d = _check(qkv, k_cache, v_cache, lengths, num_heads)
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else float(softmax_scale)
    b, hkv, cap, _ = k_cache.shape
    hq = num_heads
    q, k, v = qkv.view(b, hq + 2 * hkv, d).split([hq, hkv, hkv], dim=1)
    if cos_sin is not None:
        from slimforge.attention.module import apply_rotary

        cs = (cos_sin[0][lengths].unsqueeze(1), cos_sin[1][lengths].unsqueeze(1))
        q, k = apply_rotary(q, cos_sin=cs), apply_rotary(k, cos_sin=cs)
    rows = torch.arange(b, device=qkv.device)
    k_cache[rows, :, lengths] = k.to(k_cache.dtype)
    v_cache[rows, :, lengths] = v.to(v_cache.dtype)
    group = hq // hkv
    keys = k_cache.float().repeat_interleave(group, dim=1)  # (b, hq, cap, d)
    values = v_cache.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhnd->bhn", q.float() * scale, keys)
    hidden = torch.arange(cap, device=qkv.device)[None, :] > lengths[:, None]
    scores = scores.masked_fill(hidden[:, None, :], float("-inf"))
    out = torch.einsum("bhn,bhnd->bhd", torch.softmax(scores, dim=-1), values)
    return out.reshape(b, hq * d).to(qkv.dtype)
