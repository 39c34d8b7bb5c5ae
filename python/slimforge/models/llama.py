"""A minimal Llama-architecture causal LM (SmolLM2 and kin) and a byte-level BPE tokenizer.

RMSNorm, rotary embeddings (Hugging Face ``rotate_half`` convention), grouped-query attention,
SwiGLU MLP, optionally tied embeddings. ``LlamaForCausalLM.from_gguf`` loads a llama.cpp GGUF
file (F32/F16/BF16/Q4_0/Q4_1/Q8_0 tensors dequantized to float32) and un-permutes the q/k rows
that llama.cpp's converter permuted for its adjacent-pair RoPE. The tied output head is
``F.linear(h, embed_tokens.weight)``, so it is not an ``nn.Linear`` and quantizers leave it alone.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ByteLevelBPETokenizer",
    "LlamaConfig",
    "LlamaForCausalLM",
    "greedy_generate",
    "perplexity",
]


@dataclass
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(
    seq_len: int, head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (seq_len, head_dim) float32."""
    inv = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    )
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads
        q = self.q_proj(x).view(b, t, nh, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, nkv, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, nkv, hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        rep = nh // nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, nh * hd))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    """input_ids (batch, seq) int64 -> logits (batch, seq, vocab) float."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be (batch, seq) int64; got {tuple(input_ids.shape)} {input_ids.dtype}"
            )
        x = self.embed_tokens(input_ids)
        cos, sin = rope_tables(input_ids.shape[1], self.cfg.head_dim, self.cfg.rope_theta, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.embed_tokens.weight)
        return self.lm_head(x)

    @classmethod
    def from_gguf(cls, path: str | Path, num_layers: int | None = None) -> LlamaForCausalLM:
        """Load a llama-architecture GGUF file; ``num_layers`` keeps only the first layers."""
        from slimforge.quant.formats.gguf import read_gguf

        f = read_gguf(path)
        md = f.metadata
        arch = md.get("general.architecture")
        if arch != "llama":
            raise ValueError(f"{path}: architecture {arch!r} is not 'llama'")
        cfg = LlamaConfig(
            vocab_size=len(md["tokenizer.ggml.tokens"]),
            hidden_size=int(md["llama.embedding_length"]),
            intermediate_size=int(md["llama.feed_forward_length"]),
            num_layers=int(md["llama.block_count"]) if num_layers is None else num_layers,
            num_heads=int(md["llama.attention.head_count"]),
            num_kv_heads=int(
                md.get("llama.attention.head_count_kv", md["llama.attention.head_count"])
            ),
            rope_theta=float(md.get("llama.rope.freq_base", 10000.0)),
            rms_norm_eps=float(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in f.tensors,
        )
        model = cls(cfg)

        def get(name: str) -> torch.Tensor:
            if name not in f.tensors:
                raise ValueError(f"{path}: tensor {name} missing")
            return torch.from_numpy(f.tensors[name].dequantize().copy())

        def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
            # Inverse of llama.cpp's convert permute (HF halves -> adjacent pairs).
            return (
                w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
                .swapaxes(1, 2)
                .reshape(w.shape)
            )

        with torch.no_grad():
            model.embed_tokens.weight.copy_(get("token_embd.weight"))
            model.norm.weight.copy_(get("output_norm.weight"))
            if model.lm_head is not None:
                model.lm_head.weight.copy_(get("output.weight"))
            for i, layer in enumerate(model.layers):
                p = f"blk.{i}."
                layer.input_layernorm.weight.copy_(get(p + "attn_norm.weight"))
                layer.post_attention_layernorm.weight.copy_(get(p + "ffn_norm.weight"))
                at = layer.self_attn
                at.q_proj.weight.copy_(unpermute(get(p + "attn_q.weight"), cfg.num_heads))
                at.k_proj.weight.copy_(unpermute(get(p + "attn_k.weight"), cfg.num_kv_heads))
                at.v_proj.weight.copy_(get(p + "attn_v.weight"))
                at.o_proj.weight.copy_(get(p + "attn_output.weight"))
                layer.mlp.gate_proj.weight.copy_(get(p + "ffn_gate.weight"))
                layer.mlp.up_proj.weight.copy_(get(p + "ffn_up.weight"))
                layer.mlp.down_proj.weight.copy_(get(p + "ffn_down.weight"))
        return model.eval()


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


# GPT-2 / ByteLevel pre-tokenizer; Python `re` spelling of \p{L} = [^\W\d_], \p{N} ~ \d.
_GPT2_SPLIT = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
)


class ByteLevelBPETokenizer:
    """Byte-level BPE (GPT-2 style) from a vocabulary list and ranked merges.

    ``split_digits=True`` splits every digit into its own pre-token first, as SmolLM's
    tokenizer (llama.cpp pre-tokenizer ``smollm``) does.
    """

    def __init__(self, tokens: list[str], merges: list[str], split_digits: bool = True) -> None:
        self.tokens = list(tokens)
        self.vocab = {t: i for i, t in enumerate(self.tokens)}
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.split_digits = split_digits
        self.byte_enc = _bytes_to_unicode()
        self.byte_dec = {c: b for b, c in self.byte_enc.items()}
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_gguf(cls, path: str | Path) -> ByteLevelBPETokenizer:
        from slimforge.quant.formats.gguf import read_gguf

        md = read_gguf(path).metadata
        if md.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(
                f"{path}: tokenizer model {md.get('tokenizer.ggml.model')!r} is not BPE"
            )
        return cls(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.merges"],
                   split_digits=md.get("tokenizer.ggml.pre") == "smollm")  # fmt: skip

    def _pretokenize(self, text: str) -> list[str]:
        if not self.split_digits:
            return _GPT2_SPLIT.findall(text)
        pieces: list[str] = []
        for part in re.split(r"(\d)", text):
            if not part:
                continue
            if len(part) == 1 and part.isdigit():
                pieces.append(part)
            else:
                pieces.extend(_GPT2_SPLIT.findall(part))
        return pieces

    def _bpe(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = [self.byte_enc[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [
                (self.ranks.get((a, b), math.inf), i)
                for i, (a, b) in enumerate(zip(word, word[1:], strict=False))
            ]
            rank, _ = min(pairs)
            if rank == math.inf:
                break
            i0 = next(i for r, i in pairs if r == rank)
            first, second = word[i0], word[i0 + 1]
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids = []
        for sym in word:
            if sym not in self.vocab:
                raise ValueError(f"symbol {sym!r} is not in the vocabulary")
            ids.append(self.vocab[sym])
        self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return [i for piece in self._pretokenize(text) for i in self._bpe(piece)]

    def decode(self, ids: list[int]) -> str:
        data = bytes(self.byte_dec[c] for i in ids for c in self.tokens[i] if c in self.byte_dec)
        return data.decode("utf-8", errors="replace")


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, seq_len: int = 256) -> float:
    """Perplexity of 1-D token ids over consecutive non-overlapping windows of ``seq_len``."""
    ids = ids.reshape(-1)
    nll, count = 0.0, 0
    for s in range(0, ids.numel() - 1, seq_len):
        chunk = ids[s : s + seq_len]
        if chunk.numel() < 2:
            break
        logits = model(chunk[None]).float()
        loss = F.cross_entropy(logits[0, :-1], chunk[1:], reduction="sum")
        nll += float(loss)
        count += chunk.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def greedy_generate(model: nn.Module, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation (no KV cache: recomputes the prefix each step)."""
    out = list(ids)
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([out]))
        out.append(int(logits[0, -1].argmax()))
    return out[len(ids) :]
