"""The model protocol: GPT (dense or MoE MLP, learned or rotary positions, flash or SDPA
attention) and the Llama family, their specs, and the shared RoPE."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimforge.attention import apply_rotary, rotary_cos_sin
from slimforge.models import (
    GPT,
    BlockSpec,
    CausalLMOutput,
    GPTConfig,
    LlamaConfig,
    LlamaForCausalLM,
    ModelSpec,
    model_spec,
)
from slimforge.moe import MoE


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: torch's OpenMP barriers cost more than they save on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> GPTConfig:
    base = {"vocab_size": 32, "max_seq_len": 16, "num_layers": 2, "num_heads": 2, "hidden_size": 16}
    base.update(kw)
    return GPTConfig(**base)


def tiny_llama(**kw) -> LlamaConfig:
    base = {"vocab_size": 48, "hidden_size": 32, "intermediate_size": 48, "num_layers": 2,
            "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 64}  # fmt: skip
    base.update(kw)
    return LlamaConfig(**base)


@pytest.mark.parametrize("mlp", ["dense", "moe"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_forward_backward_and_loss(mlp, norm):
    torch.manual_seed(0)
    model = GPT(tiny(mlp=mlp, norm=norm, num_experts=4, top_k=2))
    idx = torch.randint(0, 32, (3, 10))
    out = model(idx, labels=idx)
    assert isinstance(out, CausalLMOutput)
    assert out.logits.shape == (3, 10, 32) and out.loss is not None
    # Labels are the inputs, shifted inside: position t is scored on token t + 1.
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1))
    aux = sum((m.aux_loss for m in model.moe_layers()), torch.tensor(0.0))
    torch.testing.assert_close(out.loss, ce + aux)
    assert (out.aux_loss is not None) == (mlp == "moe")
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    plain = model(idx)  # without labels: every position's logits, no loss
    assert plain.loss is None and plain.aux_loss is None
    torch.testing.assert_close(plain.logits, out.logits)


def test_ignore_index_masks_positions():
    torch.manual_seed(4)
    model = GPT(tiny())
    idx = torch.randint(0, 32, (2, 12))
    labels = idx.clone()
    labels[:, 6:] = -100
    out = model(idx, labels=labels)
    ce = F.cross_entropy(out.logits[:, :5].reshape(-1, 32), idx[:, 1:6].reshape(-1))
    torch.testing.assert_close(out.loss, ce)
    with pytest.raises(ValueError, match="labels must have shape"):
        model(idx, labels=idx[:, :5])


def test_moe_matches_dense_active_parameters():
    dense = GPT(tiny())
    moe = GPT(tiny(mlp="moe", num_experts=4, top_k=2))
    experts = sum(m.router.weight.numel() for m in moe.moe_layers())
    assert moe.num_params(active=True) == dense.num_params() + experts
    assert moe.num_params() > dense.num_params()


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("kv_heads", [None, 1])
def test_flash_and_sdpa_attention_agree(position, kv_heads):
    """The tiled kernel and PyTorch SDPA give the same model (forward and gradients)."""
    torch.manual_seed(1)
    cfg = tiny(position=position, num_kv_heads=kv_heads)
    flash = GPT(cfg)
    sdpa = GPT(cfg.replace(attn_impl="sdpa"))
    sdpa.load_state_dict(flash.state_dict())
    idx = torch.randint(0, 32, (2, 13))
    a, b = flash(idx, labels=idx), sdpa(idx, labels=idx)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(flash.named_parameters(), sdpa.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mlp", ["dense", "moe"])
@pytest.mark.parametrize("position", ["learned", "rope"])
def test_causality(mlp, position):
    torch.manual_seed(2)
    model = GPT(tiny(mlp=mlp, num_experts=4, top_k=1, position=position))
    idx = torch.randint(0, 32, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 32
    a, b = model(idx).logits, model(changed).logits
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_generate_and_training_reduces_loss():
    torch.manual_seed(3)
    model = GPT(tiny(mlp="moe", num_experts=4, top_k=2))
    data = torch.arange(16).repeat(4, 2)[:, :16] % 32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = last = None
    for _ in range(30):
        out = model(data, labels=data)
        lm = float((out.loss - out.aux_loss).detach())
        first = first if first is not None else lm
        last = lm
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert last < 0.5 * first
    gen = model.generate(data[:1, :3], 5, generator=torch.Generator().manual_seed(0))
    assert gen.shape == (1, 8) and torch.equal(gen[:, :3], data[:1, :3])
    assert all(isinstance(m, MoE) for m in model.moe_layers())


def test_config_validation():
    with pytest.raises(ValueError, match="mlp"):
        GPTConfig(mlp="sparse")
    with pytest.raises(ValueError, match="num_heads"):
        GPTConfig(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="num_kv_heads"):
        GPTConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="attn_impl"):
        GPTConfig(attn_impl="xformers")
    with pytest.raises(ValueError, match="max_seq_len"):
        GPT(tiny())(torch.zeros(1, 17, dtype=torch.int64))
    with pytest.raises(ValueError, match="input_ids"):
        GPT(tiny())(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="num_kv_heads"):
        LlamaConfig(num_heads=4, num_kv_heads=3, hidden_size=32)
    cfg = tiny()
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_rope_matches_the_rotate_half_formula():
    """The shared RoPE equals Hugging Face Llama's q * cos + rotate_half(q) * sin."""
    torch.manual_seed(5)
    b, t, h, d, base = 2, 9, 3, 8, 500.0
    x = torch.randn(b, t, h, d, dtype=torch.float64)
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    freqs = torch.outer(torch.arange(t, dtype=torch.float64), inv)
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]
    rotate_half = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
    want = x * emb.cos() + rotate_half * emb.sin()
    pos = torch.arange(t)
    got = apply_rotary(x, pos, base)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    tables = rotary_cos_sin(pos, d, base, dtype=torch.float64)
    torch.testing.assert_close(apply_rotary(x, cos_sin=tables), got)


def test_llama_follows_the_protocol_with_both_attention_impls():
    torch.manual_seed(6)
    flash = LlamaForCausalLM(tiny_llama()).eval()
    sdpa = LlamaForCausalLM(tiny_llama(attn_impl="sdpa")).eval()
    sdpa.load_state_dict(flash.state_dict())
    idx = torch.randint(0, 48, (2, 11))
    a, b = flash(idx, labels=idx), sdpa(idx, labels=idx)
    assert a.logits.shape == (2, 11, 48)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    ce = F.cross_entropy(a.logits[:, :-1].reshape(-1, 48), idx[:, 1:].reshape(-1))
    torch.testing.assert_close(a.loss, ce)
    untied = LlamaForCausalLM(tiny_llama(tie_embeddings=False))
    assert isinstance(untied.lm_head, nn.Linear) and untied.spec().lm_head == "lm_head"


def test_specs_name_existing_modules():
    gpt = GPT(tiny())
    spec = gpt.spec().check(gpt)
    assert spec.block.fused_qkv == "attn.qkv" and spec.lm_head is None
    moe = GPT(tiny(mlp="moe", num_experts=4))
    assert moe.spec().check(moe).block.moe == "mlp" and moe.spec().block.mlp_in == ()
    llama = LlamaForCausalLM(tiny_llama())
    assert model_spec(llama) == llama.spec().check(llama)
    assert spec.split_name("blocks.1.attn.qkv") == (1, "attn.qkv")
    assert spec.split_name("tok_emb") is None
    with pytest.raises(ValueError, match="no 'missing'"):
        ModelSpec("blocks", BlockSpec(attn_out="missing")).check(gpt)


def test_hugging_face_llama_layout_is_recognised_by_name():
    """A module tree with Hugging Face's LlamaForCausalLM names (model.layers.N.self_attn.q_proj,
    lm_head) gets the Llama spec without a spec() method."""

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            inner = LlamaForCausalLM(tiny_llama())
            self.model = nn.Module()
            self.model.embed_tokens = inner.embed_tokens
            self.model.layers = inner.layers
            self.model.norm = inner.norm
            self.lm_head = nn.Linear(32, 48, bias=False)

    spec = model_spec(Wrapper())
    assert spec is not None and spec.blocks == "model.layers" and spec.lm_head == "lm_head"
    assert spec.block.query_key == ("self_attn.q_proj", "self_attn.k_proj")
    assert model_spec(nn.Sequential(nn.Linear(4, 4))) is None
