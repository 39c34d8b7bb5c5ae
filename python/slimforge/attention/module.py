"""`Attention`: multi-head (GQA/MQA) self-attention built on `flash_attention`."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from slimforge.attention.ops import flash_attention


def apply_rotary(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding (rotate-half form) of x (..., tokens, heads, head_dim).

    `positions` holds one integer position per token, broadcast against x's token axis.
    """
    d = x.shape[-1]
    half = d // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., tokens, half)
    cos = angles.cos().unsqueeze(-2).to(x.dtype)
    sin = angles.sin().unsqueeze(-2).to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class Attention(nn.Module):
    """Self-attention: fused qkv projection, optional GQA and rotary embeddings, output projection.

    Input x: (batch, seqlen, dim), or (total, dim) with `cu_seqlens` for packed sequences.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        causal: bool = True,
        window: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        rotary: bool = False,
        rotary_base: float = 10000.0,
        bias: bool = False,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})"
            )
        head_dim = dim // num_heads if head_dim is None else head_dim
        if head_dim <= 0:
            raise ValueError(f"head_dim must be positive, got {head_dim}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal, self.window, self.softcap = causal, tuple(window), softcap
        self.rotary, self.rotary_base = rotary, rotary_base
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def _positions(self, x: Tensor, cu_seqlens: Tensor | None) -> Tensor:
        if cu_seqlens is None:
            return torch.arange(x.shape[1], device=x.device)
        total = x.shape[0]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
        starts = torch.repeat_interleave(cu_seqlens[:-1].to(torch.long), lengths, output_size=total)
        return torch.arange(total, device=x.device) - starts

    def forward(
        self, x: Tensor, cu_seqlens: Tensor | None = None, max_seqlen: int | None = None
    ) -> Tensor:
        lead = x.shape[:-1]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).view(*lead, hq + 2 * hkv, d)
        q, k, v = qkv.split([hq, hkv, hkv], dim=-2)
        if self.rotary:
            pos = self._positions(x, cu_seqlens)
            q = apply_rotary(q, pos, self.rotary_base)
            k = apply_rotary(k, pos, self.rotary_base)
        out = flash_attention(
            q,
            k,
            v,
            causal=self.causal,
            window=self.window,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            softcap=self.softcap,
        )
        return self.proj(out.reshape(*lead, hq * d))
