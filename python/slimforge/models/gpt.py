"""A small decoder-only transformer in the style of nanoGPT, whose MLP can be a `MoE`.

One readable file: token embeddings with learned or rotary positions, pre-norm blocks (RMSNorm
or LayerNorm), causal self-attention through `slimforge.attention` (the tiled kernel by default,
PyTorch SDPA with ``attn_impl="sdpa"``; GQA with ``num_kv_heads``), a dense MLP or a sparse
`slimforge.moe.MoE`, and a tied LM head. Follows the causal-LM protocol
(`slimforge.models.protocol`): ``model(input_ids, labels=None)`` returns every position's logits
and the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slimforge.attention import (
    ATTN_IMPLS,
    Attention,
    apply_rotary,
    flash_attention,
    rotary_cos_sin,
)
from slimforge.config import Config
from slimforge.models.generation import GenerationMixin, KVCache, packed_positions
from slimforge.models.protocol import (
    CausalLMOutput,
    causal_lm_loss,
    check_input_ids,
    tied_logits,
)
from slimforge.models.spec import BlockSpec, ModelSpec
from slimforge.moe import MoE
from slimforge.moe.reference import expert_activation

__all__ = ["GPT", "GPTConfig"]


@dataclass(frozen=True)
class GPTConfig(Config):
    """Model shape. With ``mlp="moe"`` each block's MLP is a `MoE` of ``num_experts`` experts of
    width ``moe_intermediate_size`` (default ``intermediate_size // top_k``, so a token uses as
    many MLP parameters as the dense model); aux losses of the MoE layers are added to the loss.

    The size names are the library's one vocabulary (also `LlamaConfig`'s): ``vocab_size``,
    ``hidden_size``, ``intermediate_size`` (default 4 x hidden), ``num_layers``, ``num_heads``,
    ``num_kv_heads`` (default num_heads), ``max_seq_len``.
    """

    vocab_size: int = 256
    max_seq_len: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None
    hidden_size: int = 128
    intermediate_size: int | None = None
    mlp: str = "dense"
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int | None = None
    dropout: float = 0.0
    activation: str = "gelu"  # MLP / expert nonlinearity: gelu, relu, silu or swiglu
    norm: str = "rms"  # "rms" or "layer"
    position: str = "learned"  # "learned" (absolute embeddings) or "rope"
    rope_theta: float = 10000.0
    attn_impl: str = "flash"  # "flash" (slimforge.attention) or "sdpa"
    capacity_factor: float | None = None
    router: str = "softmax"
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3

    def __post_init__(self) -> None:
        if self.mlp not in ("dense", "moe"):
            raise ValueError(f"mlp must be 'dense' or 'moe', got {self.mlp!r}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.position not in ("learned", "rope"):
            raise ValueError(f"position must be 'learned' or 'rope', got {self.position!r}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")
        for name in ("vocab_size", "max_seq_len", "num_layers", "num_heads", "hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads})"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def dense_hidden(self) -> int:
        return (
            self.intermediate_size if self.intermediate_size is not None else 4 * self.hidden_size
        )

    @property
    def expert_hidden(self) -> int:
        if self.moe_intermediate_size is not None:
            return self.moe_intermediate_size
        return max(1, self.dense_hidden // self.top_k)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rms":
        return nn.RMSNorm(config.hidden_size)
    return nn.LayerNorm(config.hidden_size)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.dense_hidden
        self.activation = config.activation
        width = 2 * hidden if config.activation == "swiglu" else hidden
        self.fc = nn.Linear(config.hidden_size, width, bias=False)
        self.proj = nn.Linear(hidden, config.hidden_size, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(expert_activation(self.fc(x), self.activation)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = Attention(
            config.hidden_size,
            config.num_heads,
            config.kv_heads,
            rotary=config.position == "rope",
            rotary_base=config.rope_theta,
            impl=config.attn_impl,
        )
        self.norm2 = make_norm(config)
        self.mlp: nn.Module
        if config.mlp == "moe":
            self.mlp = MoE(
                config.hidden_size,
                config.expert_hidden,
                config.num_experts,
                config.top_k,
                capacity_factor=config.capacity_factor,
                router=config.router,
                aux_loss_coef=config.aux_loss_coef,
                z_loss_coef=config.z_loss_coef,
                activation=config.activation,
            )
        else:
            self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), cos_sin=cos_sin))
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(GenerationMixin, nn.Module):
    """Decoder-only LM following the causal-LM protocol.

    ``forward(input_ids (B, T) int64, labels (B, T) | None) -> CausalLMOutput``: logits
    ``(B, T, vocab)``; with labels (the input ids, shifted inside; -100 ignored) the loss is the
    next-token cross-entropy plus the MoE auxiliary losses (``aux_loss``). The output head is
    tied to the token embedding.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_emb = (
            nn.Embedding(config.max_seq_len, config.hidden_size)
            if config.position == "learned"
            else None
        )
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = make_norm(config)
        self.apply(self._init_weights)
        # Scaled init of the residual projections (GPT-2).
        residual_std = 0.02 / math.sqrt(2 * config.num_layers)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight", "mlp.w_out")):
                nn.init.normal_(p, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, MoE):
            nn.init.normal_(module.w_in, std=0.02)

    def spec(self) -> ModelSpec:
        """Where the blocks, projections and norms are (see `slimforge.models.spec`)."""
        c = self.config
        moe = c.mlp == "moe"
        return ModelSpec(
            blocks="blocks",
            block=BlockSpec(
                attn_norm="norm1",
                attn_in=("attn.qkv",),
                attn_out="attn.proj",
                mlp_norm="norm2",
                mlp_in=() if moe else ("mlp.fc",),
                mlp_out=None if moe else "mlp.proj",
                query_key=(),
                fused_qkv="attn.qkv",
                qkv_rows=(
                    c.num_heads * c.head_dim,
                    c.kv_heads * c.head_dim,
                    c.kv_heads * c.head_dim,
                ),
                moe="mlp" if moe else None,
                keep_float=("mlp.router",) if moe else (),
            ),
            embed="tok_emb",
            final_norm="norm",
            lm_head=None,
            family="gpt",
        )

    def num_params(self, active: bool = False) -> int:
        """Parameter count without position embeddings; `active`: those one token uses."""
        total = sum(p.numel() for p in self.parameters())
        if self.pos_emb is not None:
            total -= self.pos_emb.weight.numel()
        if active:
            for m in self.moe_layers():
                per_expert = (m.w_in.numel() + m.w_out.numel()) // m.w_in.shape[0]
                total -= per_expert * (m.w_in.shape[0] - m.top_k)
        return total

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> CausalLMOutput:
        check_input_ids(input_ids, self.config.max_seq_len)
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.tok_emb(input_ids)
        cos_sin = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        else:
            cos_sin = rotary_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cos_sin)
        logits = tied_logits(self.norm(x), self.tok_emb)
        if labels is None:
            return CausalLMOutput(logits)
        loss = causal_lm_loss(logits, labels)
        aux = None
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                aux = moe.aux_loss if aux is None else aux + moe.aux_loss
        if aux is not None:
            loss = loss + aux
        return CausalLMOutput(logits, loss, aux)

    # ------------------------------------------------------------------ generation (KV cache)

    def make_cache(self, batch: int, capacity: int) -> KVCache:
        """A preallocated `KVCache` for ``batch`` sequences of up to ``capacity`` tokens."""
        c = self.config
        w = self.norm.weight  # the embedding may be quantized (no .weight)
        dtype = (
            w.dtype if w.dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32
        )
        theta = c.rope_theta if c.position == "rope" else None
        return KVCache(
            c.num_layers, batch, c.kv_heads, c.head_dim, capacity, dtype, w.device, theta
        )

    @torch.no_grad()
    def forward_cached(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        cu_seqlens: torch.Tensor | None = None,
        plan: object = None,
    ) -> torch.Tensor:
        """Logits ``(batch, vocab)`` of each sequence's newest token, filling ``cache``.

        Prefill (``cu_seqlens`` int32 ``(batch + 1,)`` given): ``input_ids (total,)`` holds the
        prompts packed one after another, the cache must be empty; attention runs through the
        tiled kernel on the pack. Decode: ``input_ids (batch,)``, one new token per sequence,
        through `decode_attention`. Dropout is not applied (inference). ``plan`` is unused (the
        q/k/v projection is already one fused linear).
        """
        c = self.config
        hq, hkv, d = c.num_heads, c.kv_heads, c.head_dim
        x = self.tok_emb(input_ids)
        if cu_seqlens is not None:
            if bool((cache.lengths != 0).any()):
                raise ValueError("prefill needs an empty cache (cache.reset() first)")
            seq, pos, lengths = packed_positions(cu_seqlens.cpu())
            seq, pos = seq.to(x.device), pos.to(x.device)
            n = input_ids.shape[0]
            cos_sin = None
            if self.pos_emb is not None:
                x = x + self.pos_emb(pos)
            else:
                cos_sin = rotary_cos_sin(pos, d, c.rope_theta)
            max_seqlen = int(lengths.max())
            for i, block in enumerate(self.blocks):
                at = block.attn
                qkv = at.qkv(block.norm1(x)).view(n, hq + 2 * hkv, d)
                q, k, v = qkv.split([hq, hkv, hkv], dim=1)
                if cos_sin is not None:
                    q, k = apply_rotary(q, cos_sin=cos_sin), apply_rotary(k, cos_sin=cos_sin)
                cache.write_prefill(i, k, v, seq, pos)
                dtype = q.dtype
                if dtype == torch.float16:
                    q, k, v = q.float(), k.float(), v.float()
                y = flash_attention(
                    q, k, v, causal=True, window=at.window, softcap=at.softcap,
                    cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                ).to(dtype)  # fmt: skip
                x = x + at.proj(y.reshape(n, hq * d))
                x = x + block.mlp(block.norm2(x))
            cache.lengths.copy_(lengths.to(cache.lengths.device))
            x = x[cu_seqlens[1:].long().to(x.device) - 1]
            return tied_logits(self.norm(x), self.tok_emb)
        lengths = cache.lengths
        if self.pos_emb is not None:
            x = x + self.pos_emb(lengths)
        for i, block in enumerate(self.blocks):
            at = block.attn
            if at.window != (-1, -1) or at.softcap:
                raise ValueError("cached decoding does not support attention windows or softcap")
            y = cache.attend(i, at.qkv(block.norm1(x)), hq, rotary=at.rotary)
            x = x + at.proj(y.to(x.dtype))
            x = x + block.mlp(block.norm2(x))
        lengths += 1
        return tied_logits(self.norm(x), self.tok_emb)
