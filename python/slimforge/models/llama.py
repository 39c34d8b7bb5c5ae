"""A minimal Llama-architecture causal LM (SmolLM2 and kin).

RMSNorm, rotary embeddings (Hugging Face ``rotate_half`` convention, `slimforge.attention`'s
``apply_rotary``), grouped-query attention through `slimforge.attention.attend` (the tiled
kernel, or SDPA), SwiGLU MLP, optionally tied embeddings. ``LlamaForCausalLM.from_gguf`` loads a
llama.cpp GGUF file (F32/F16/BF16/Q4_0/Q4_1/Q8_0 and k-quant tensors dequantized to float32)
and un-permutes the q/k rows that llama.cpp's converter permuted for its adjacent-pair RoPE.
The tied output head multiplies by the embedding table (a quantized table runs its own
quantized matmul), so it is not an ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.attention import (
    ATTN_IMPLS,
    apply_rotary,
    attend,
    flash_attention,
    rotary_cos_sin,
)
from slimforge.config import Config
from slimforge.models.generation import (
    GenerationMixin,
    GenerationOutput,
    KVCache,
    fuse_projections,
    generate,
    packed_positions,
)
from slimforge.models.protocol import (
    CausalLMOutput,
    causal_lm_loss,
    check_input_ids,
    tied_logits,
)
from slimforge.models.spec import LLAMA_BLOCK, ModelSpec
from slimforge.models.tokenizer import ByteLevelBPETokenizer

__all__ = [
    "ByteLevelBPETokenizer",
    "LlamaConfig",
    "LlamaForCausalLM",
    "greedy_generate",
]


@dataclass(frozen=True)
class LlamaConfig(Config):
    """Llama-family shape in the library's size vocabulary (as `GPTConfig`); defaults are
    SmolLM2-135M's. ``attn_impl``: "flash" (slimforge.attention) or "sdpa"."""

    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    max_seq_len: int = 8192
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attn_impl: str = "flash"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                f"({self.num_heads}), itself a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {self.attn_impl!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class LlamaRMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back (Hugging Face's ``LlamaRMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight

    def fast(self, x: torch.Tensor) -> torch.Tensor:
        """The same norm as one fused op for float32 input (decode steps), else ``forward``."""
        if x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return self(x)
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.num_heads, self.cfg.num_kv_heads
        q = apply_rotary(self.q_proj(x).view(b, t, nh, hd), cos_sin=cos_sin)
        k = apply_rotary(self.k_proj(x).view(b, t, nkv, hd), cos_sin=cos_sin)
        v = self.v_proj(x).view(b, t, nkv, hd)
        y = attend(q, k, v, causal=True, impl=self.cfg.attn_impl)
        return self.o_proj(y.reshape(b, t, nh * hd))


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
        self.input_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(GenerationMixin, nn.Module):
    """Llama-architecture causal LM following the causal-LM protocol:
    ``forward(input_ids (B, T), labels=None) -> CausalLMOutput`` with logits ``(B, T, vocab)``.

    Module names follow Hugging Face's ``LlamaModel`` blocks (``layers.N.self_attn.q_proj``).
    With tied embeddings the output head is the embedding table itself (no ``lm_head``).
    """

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = LlamaRMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    def spec(self) -> ModelSpec:
        """Where the blocks, projections and norms are (see `slimforge.models.spec`)."""
        return ModelSpec(
            blocks="layers",
            block=LLAMA_BLOCK,
            embed="embed_tokens",
            final_norm="norm",
            lm_head=None if self.lm_head is None else "lm_head",
            family="llama",
        )

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> CausalLMOutput:
        check_input_ids(input_ids, self.cfg.max_seq_len)
        x = self.embed_tokens(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        cos_sin = rotary_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta)
        for layer in self.layers:
            x = layer(x, cos_sin)
        x = self.norm(x)
        logits = tied_logits(x, self.embed_tokens) if self.lm_head is None else self.lm_head(x)
        if labels is None:
            return CausalLMOutput(logits)
        return CausalLMOutput(logits, causal_lm_loss(logits, labels))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return tied_logits(x, self.embed_tokens) if self.lm_head is None else self.lm_head(x)

    # ------------------------------------------------------------------ generation (KV cache)

    def make_cache(self, batch: int, capacity: int) -> KVCache:
        """A preallocated `KVCache` for ``batch`` sequences of up to ``capacity`` tokens."""
        c = self.cfg
        w = self.norm.weight
        dtype = (
            w.dtype if w.dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32
        )
        return KVCache(
            c.num_layers, batch, c.num_kv_heads, c.head_dim, capacity, dtype, w.device, c.rope_theta
        )

    def decode_plan(self) -> list[tuple[Any, Any, Any, Any]] | Any:
        """What a decode step runs, built once per `generate` call (copies of the weights, taken
        now: build it again after changing them).

        When every projection is a CPU quantized linear (`quantize_` with ``Int4WeightOnly`` /
        ``Int8WeightOnly``, GPTQ, RTN; no input transform or adapter) and the norms are
        float32, the whole stack of blocks runs as one native call per step
        (`_native.LlamaStackDecoder`, the same kernels as below without the per-op overhead).
        Otherwise, per layer, the projections: fused q/k/v, o, fused gate/up, down
        (`fuse_projections`).
        """
        native = self._native_decoder()
        return native if native is not None else self._op_plan()

    def _op_plan(self) -> list[tuple[Any, Any, Any, Any]]:
        plan = []
        for layer in self.layers:
            at, mlp = layer.self_attn, layer.mlp
            plan.append(
                (
                    fuse_projections([at.q_proj, at.k_proj, at.v_proj]),
                    fuse_projections([at.o_proj]),
                    fuse_projections([mlp.gate_proj, mlp.up_proj]),
                    fuse_projections([mlp.down_proj]),
                )
            )
        return plan

    def _native_decoder(self) -> Any:
        """`_native.LlamaStackDecoder` over the blocks, or None when some part does not fit it."""
        from slimforge import _native
        from slimforge.quant.linear import FusedQuantLinear, fuse_quant_linears

        def proj(mods: list[nn.Module]) -> tuple[Any, ...] | None:
            f = fuse_quant_linears(mods)
            if not isinstance(f, FusedQuantLinear) or f.perm is not None:
                return None
            if f.pre_scale is not None:
                return None
            return (*f.native, f.bits, f.group_size, f.route)

        norms = [self.norm.weight] + [
            w for layer in self.layers
            for w in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
        ]  # fmt: skip
        if any(w.dtype != torch.float32 or not w.is_cpu for w in norms):
            return None
        blocks = []
        for layer in self.layers:
            at, mlp = layer.self_attn, layer.mlp
            parts = (
                proj([at.q_proj, at.k_proj, at.v_proj]),
                proj([at.o_proj]),
                proj([mlp.gate_proj, mlp.up_proj]),
                proj([mlp.down_proj]),
            )
            if any(p is None for p in parts):
                return None
            qkv, o, gate_up, down = parts
            blocks.append(
                (
                    layer.input_layernorm.weight.detach().numpy(),
                    qkv,
                    o,
                    layer.post_attention_layernorm.weight.detach().numpy(),
                    gate_up,
                    down,
                )
            )
        c = self.cfg
        return _native.LlamaStackDecoder(
            blocks, self.norm.weight.detach().numpy(), c.num_heads, c.num_kv_heads, c.head_dim,
            c.norm_eps,
        )  # fmt: skip

    @torch.no_grad()
    def forward_cached(
        self,
        input_ids: torch.Tensor,
        cache: KVCache,
        cu_seqlens: torch.Tensor | None = None,
        plan: list[tuple[Any, Any, Any, Any]] | None = None,
    ) -> torch.Tensor:
        """Logits ``(batch, vocab)`` of each sequence's newest token, filling ``cache``.

        Prefill (``cu_seqlens`` int32 ``(batch + 1,)`` given): ``input_ids (total,)`` holds the
        prompts packed one after another, the cache must be empty; attention runs through the
        tiled kernel on the pack. Decode: ``input_ids (batch,)``, one new token per sequence,
        attending through `decode_attention`; ``plan`` is `decode_plan` (built when omitted).
        """
        c = self.cfg
        nh, nkv, hd = c.num_heads, c.num_kv_heads, c.head_dim
        if cu_seqlens is not None:
            if bool((cache.lengths != 0).any()):
                raise ValueError("prefill needs an empty cache (cache.reset() first)")
            seq, pos, lengths = packed_positions(cu_seqlens.cpu())
            seq, pos = seq.to(input_ids.device), pos.to(input_ids.device)
            n = input_ids.shape[0]
            cos_sin = rotary_cos_sin(pos, hd, c.rope_theta)
            x = self.embed_tokens(input_ids)
            max_seqlen = int(lengths.max())
            for i, layer in enumerate(self.layers):
                at = layer.self_attn
                h = layer.input_layernorm(x)
                q = apply_rotary(at.q_proj(h).view(n, nh, hd), cos_sin=cos_sin)
                k = apply_rotary(at.k_proj(h).view(n, nkv, hd), cos_sin=cos_sin)
                v = at.v_proj(h).view(n, nkv, hd)
                cache.write_prefill(i, k, v, seq, pos)
                if q.dtype == torch.float16:
                    q, k, v = q.float(), k.float(), v.float()
                y = flash_attention(
                    q, k, v, causal=True, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen
                ).to(h.dtype)
                x = x + at.o_proj(y.reshape(n, nh * hd))
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            cache.lengths.copy_(lengths.to(cache.lengths.device))
            last = cu_seqlens[1:].long().to(x.device) - 1
            return self._logits(self.norm(x[last]))
        if plan is None:
            plan = self.decode_plan()
        x = self.embed_tokens(input_ids)
        if not isinstance(plan, list):
            if cache._native and x.dtype == torch.float32 and x.is_cpu:
                x = x.contiguous()
                cos, sin = cache.rope if cache.rope is not None else (None, None)
                plan.step(
                    x.numpy(), cache.k.numpy(), cache.v.numpy(), cache.lengths.numpy(),
                    None if cos is None else cos.numpy(), None if sin is None else sin.numpy(),
                    cache.scale,
                )  # fmt: skip
                cache.lengths += 1
                return self._logits(x)
            plan = self._op_plan()
        inter = c.intermediate_size
        for i, (layer, (qkv_fn, o_fn, gate_up_fn, down_fn)) in enumerate(
            zip(self.layers, plan, strict=False)
        ):
            y = cache.attend(i, qkv_fn(layer.input_layernorm.fast(x)), nh)
            x = x + o_fn(y.to(x.dtype))
            gu = gate_up_fn(layer.post_attention_layernorm.fast(x))
            x = x + down_fn(F.silu(gu[:, :inter]) * gu[:, inter:])
        cache.lengths += 1
        return self._logits(self.norm.fast(x))

    @classmethod
    def from_gguf(
        cls, path: str | Path, num_layers: int | None = None, attn_impl: str = "flash"
    ) -> LlamaForCausalLM:
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
            max_seq_len=int(md.get("llama.context_length", 8192)),
            rope_theta=float(md.get("llama.rope.freq_base", 10000.0)),
            norm_eps=float(md.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="output.weight" not in f.tensors,
            attn_impl=attn_impl,
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


@torch.no_grad()
def greedy_generate(model: nn.Module, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of one list of ids (the new ids only): with a KV cache for models
    that have one (`generate`), else recomputing the sequence each step."""
    out = generate(model, [list(ids)], max_new_tokens, temperature=0.0, return_dict=True)
    assert isinstance(out, GenerationOutput)
    return out.new_tokens[0, : int(out.num_new[0])].tolist()
