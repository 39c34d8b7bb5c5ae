"""Tiled (flash) attention: a Rust CPU kernel (CUDA through `slimforge._cuda` when present).

`flash_attention` takes flash-attn's layout, (batch, seqlen, heads, head_dim), or packed
variable-length sequences, (total, heads, head_dim) with `cu_seqlens`; it supports causal and
sliding-window masks, global tokens, GQA/MQA, softcapping, and works under `torch.compile`.
`reference_attention` is the plain PyTorch reference with the same masks. `decode_attention`
is one generation step against a key/value cache (a Rust kernel on the CPU).
"""

from slimforge._optional import require

require("torch", "slimforge.attention")

from slimforge.attention.decode import decode_attention, decode_attention_reference
from slimforge.attention.module import (
    ATTN_IMPLS,
    Attention,
    apply_rotary,
    attend,
    rotary_cos_sin,
)
from slimforge.attention.ops import flash_attention
from slimforge.attention.reference import reference_attention

__all__ = [
    "ATTN_IMPLS",
    "Attention",
    "apply_rotary",
    "attend",
    "decode_attention",
    "decode_attention_reference",
    "flash_attention",
    "reference_attention",
    "rotary_cos_sin",
]
