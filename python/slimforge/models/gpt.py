"""A small decoder-only transformer in the style of nanoGPT, whose MLP can be a `MoE`.

One readable file: token + learned position embeddings, pre-norm blocks (RMSNorm or LayerNorm),
causal self-attention through `GPTConfig.attention_fn` (PyTorch's scaled_dot_product_attention by
default), a dense MLP or a sparse `slimforge.moe.MoE`, and a tied LM head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.moe import MoE
from slimforge.moe.reference import expert_activation

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention, q/k/v: (batch, heads, seqlen, head_dim) -> same shape."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@dataclass
class GPTConfig:
    """Model shape. With mlp="moe" each block's MLP is a `MoE` of `num_experts` experts of width
    `moe_hidden` (default mlp_hidden // top_k, so a token uses as many MLP parameters as the
    dense model); aux losses of the MoE layers are added to the training loss."""

    vocab_size: int = 256
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp: str = "dense"
    num_experts: int = 8
    top_k: int = 2
    moe_hidden: int | None = None
    dropout: float = 0.0
    mlp_hidden: int | None = None  # dense MLP width, default 4 * n_embd
    activation: str = "gelu"  # MLP / expert nonlinearity: gelu, relu, silu or swiglu
    norm: str = "rms"  # "rms" or "layer"
    capacity_factor: float | None = None
    router: str = "softmax"
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    # (q, k, v) -> out, each (batch, heads, seqlen, head_dim); must apply the causal mask.
    attention_fn: AttentionFn | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.mlp not in ("dense", "moe"):
            raise ValueError(f"mlp must be 'dense' or 'moe', got {self.mlp!r}")
        if self.norm not in ("rms", "layer"):
            raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    @property
    def dense_hidden(self) -> int:
        return self.mlp_hidden if self.mlp_hidden is not None else 4 * self.n_embd

    @property
    def expert_hidden(self) -> int:
        if self.moe_hidden is not None:
            return self.moe_hidden
        return max(1, self.dense_hidden // self.top_k)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rms":
        return nn.RMSNorm(config.n_embd)
    return nn.LayerNorm(config.n_embd)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.attention_fn = config.attention_fn or sdpa_causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = self.attention_fn(q, k, v).transpose(1, 2).reshape(b, t, c)
        return self.dropout(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.dense_hidden
        self.activation = config.activation
        width = 2 * hidden if config.activation == "swiglu" else hidden
        self.fc = nn.Linear(config.n_embd, width, bias=False)
        self.proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(expert_activation(self.fc(x), self.activation)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(config)
        self.attn = CausalSelfAttention(config)
        self.norm2 = make_norm(config)
        self.mlp: nn.Module
        if config.mlp == "moe":
            self.mlp = MoE(
                config.n_embd,
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.dropout(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """Decoder-only LM. `forward(idx (B, T) int64, targets (B, T) | None) -> (logits, loss)`:
    logits (B, T, vocab) with targets, else (B, 1, vocab) for the last position; loss is the
    cross-entropy plus the MoE auxiliary losses (None without targets). `last_lm_loss` keeps
    the cross-entropy alone."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight
        self.last_lm_loss: float | None = None
        self.apply(self._init_weights)
        # Scaled init of the residual projections (GPT-2).
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight", "mlp.w_out")):
                nn.init.normal_(p, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, MoE):
            nn.init.normal_(module.w_in, std=0.02)

    def num_params(self, active: bool = False) -> int:
        """Parameter count without position embeddings; `active`: those one token uses."""
        total = sum(p.numel() for p in self.parameters()) - self.pos_emb.weight.numel()
        if active:
            for m in self.moe_layers():
                per_expert = (m.w_in.numel() + m.w_out.numel()) // m.w_in.shape[0]
                total -= per_expert * (m.w_in.shape[0] - m.top_k)
        return total

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None
        logits = self.lm_head(x)
        lm_loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        self.last_lm_loss = float(lm_loss.detach())
        loss = lm_loss
        for moe in self.moe_layers():
            if moe.aux_loss is not None:
                loss = loss + moe.aux_loss
        return logits, loss

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample `max_new_tokens` tokens after idx (B, T); returns (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits, _ = self(context)
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = F.softmax(logits, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
