"""`Attention`: multi-head (GQA/MQA) self-attention built on `flash_attention`, and the pieces
every model of the library shares: `attend` (tiled kernel or PyTorch SDPA behind one call) and
rotary position embeddings (`rotary_cos_sin`, `apply_rotary`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimforge.attention.ops import flash_attention

__all__ = ["ATTN_IMPLS", "Attention", "apply_rotary", "attend", "rotary_cos_sin"]

#: "flash": slimforge's tiled kernel (Rust on CPU, CUDA through NVRTC); "sdpa": PyTorch's
#: ``scaled_dot_product_attention``.
ATTN_IMPLS = ("flash", "sdpa")


def _flash(q: Tensor, k: Tensor, v: Tensor, **kw: object) -> Tensor:
    """:func:`flash_attention`, with float16 inputs (fp16 autocast) computed in float32."""
    if q.dtype == torch.float16:
        return flash_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)  # type: ignore[arg-type]
    return flash_attention(q, k, v, **kw)  # type: ignore[arg-type]


def attend(q: Tensor, k: Tensor, v: Tensor, causal: bool = True, impl: str = "flash") -> Tensor:
    """Attention in flash-attn's layout: q ``(batch, seqlen, heads_q, head_dim)``, k/v
    ``(batch, seqlen_k, heads_kv, head_dim)`` with heads_q a multiple of heads_kv (GQA).

    ``impl="flash"`` runs :func:`flash_attention` (float16 inputs in float32); ``"sdpa"`` runs
    PyTorch's SDPA (which wants heads before tokens, so the call transposes). Returns q's shape.
    """
    if impl == "flash":
        return _flash(q, k, v, causal=causal)
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=causal,
            enable_gqa=q.shape[2] != k.shape[2],
        )
        return out.transpose(1, 2)
    raise ValueError(f"attention impl must be one of {ATTN_IMPLS}, got {impl!r}")


def rotary_cos_sin(
    positions: Tensor, head_dim: int, base: float = 10000.0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """cos and sin tables ``(..., tokens, 1, head_dim // 2)`` for :func:`apply_rotary`, from one
    integer position per token; compute once per forward pass and share across layers."""
    half = head_dim // 2
    inv_freq = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., tokens, half)
    return angles.cos().unsqueeze(-2).to(dtype), angles.sin().unsqueeze(-2).to(dtype)


def apply_rotary(
    x: Tensor,
    positions: Tensor | None = None,
    base: float = 10000.0,
    cos_sin: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Rotary position embedding (rotate-half form, as Hugging Face Llama) of
    x ``(..., tokens, heads, head_dim)``.

    Give one integer position per token (broadcast against x's token axis), or the tables of
    :func:`rotary_cos_sin`. Pairs ``(x[i], x[i + head_dim // 2])`` rotate together; an odd last
    element passes through.
    """
    d = x.shape[-1]
    half = d // 2
    if cos_sin is None:
        if positions is None:
            raise ValueError("apply_rotary needs positions or cos_sin")
        cos_sin = rotary_cos_sin(positions, d, base)
    cos, sin = cos_sin[0].to(x.dtype), cos_sin[1].to(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class Attention(nn.Module):
    """Self-attention: fused qkv projection, optional GQA and rotary embeddings, output projection.

    Input x: (batch, seqlen, dim), or (total, dim) with `cu_seqlens` for packed sequences.
    The fused projection's output rows are stacked ``[q; k; v]`` (``num_heads * head_dim``,
    then ``num_kv_heads * head_dim`` twice). ``impl``: "flash" (default) or "sdpa" (dense
    batches only, no window/softcap).
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
        impl: str = "flash",
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
        if impl not in ATTN_IMPLS:
            raise ValueError(f"impl must be one of {ATTN_IMPLS}, got {impl!r}")
        if impl == "sdpa" and (tuple(window) != (-1, -1) or softcap):
            raise ValueError("impl='sdpa' supports neither window nor softcap; use 'flash'")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal, self.window, self.softcap = causal, tuple(window), softcap
        self.rotary, self.rotary_base = rotary, rotary_base
        self.impl = impl
        self.qkv = nn.Linear(dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def qkv_rows(self) -> tuple[int, int, int]:
        """Output rows of the fused projection that hold q, k and v."""
        d = self.head_dim
        return self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d

    def _positions(self, x: Tensor, cu_seqlens: Tensor | None) -> Tensor:
        if cu_seqlens is None:
            return torch.arange(x.shape[1], device=x.device)
        total = x.shape[0]
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
        starts = torch.repeat_interleave(cu_seqlens[:-1].to(torch.long), lengths, output_size=total)
        return torch.arange(total, device=x.device) - starts

    def forward(
        self,
        x: Tensor,
        cu_seqlens: Tensor | None = None,
        max_seqlen: int | None = None,
        cos_sin: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """``cos_sin``: precomputed rotary tables (:func:`rotary_cos_sin`) to share across
        layers; computed here when omitted."""
        lead = x.shape[:-1]
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).view(*lead, hq + 2 * hkv, d)
        q, k, v = qkv.split([hq, hkv, hkv], dim=-2)
        if self.rotary:
            if cos_sin is None:
                cos_sin = rotary_cos_sin(self._positions(x, cu_seqlens), d, self.rotary_base)
            q = apply_rotary(q, cos_sin=cos_sin)
            k = apply_rotary(k, cos_sin=cos_sin)
        if self.impl == "sdpa":
            if cu_seqlens is not None:
                raise ValueError("impl='sdpa' takes dense batches, not cu_seqlens")
            out = attend(q, k, v, self.causal, "sdpa")
        else:
            out = _flash(
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
