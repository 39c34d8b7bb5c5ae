"""The nanoGPT-style model with a dense or a MoE MLP."""

from __future__ import annotations

import pytest
import torch

from slimforge.models import GPT, GPTConfig
from slimforge.moe import MoE


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: torch's OpenMP barriers cost more than they save on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**kw) -> GPTConfig:
    base = {"vocab_size": 32, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16}
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("mlp", ["dense", "moe"])
@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_forward_backward_and_loss(mlp, norm):
    torch.manual_seed(0)
    model = GPT(tiny(mlp=mlp, norm=norm, num_experts=4, top_k=2))
    idx = torch.randint(0, 32, (3, 10))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 10, 32) and loss is not None
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 32), idx.view(-1))
    aux = sum((m.aux_loss for m in model.moe_layers()), torch.tensor(0.0))
    torch.testing.assert_close(loss, ce + aux)
    assert (aux > 0) == (mlp == "moe")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    last, none = model(idx)
    assert last.shape == (3, 1, 32) and none is None
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_moe_matches_dense_active_parameters():
    dense = GPT(tiny())
    moe = GPT(tiny(mlp="moe", num_experts=4, top_k=2))
    experts = sum(m.router.weight.numel() for m in moe.moe_layers())
    assert moe.num_params(active=True) == dense.num_params() + experts
    assert moe.num_params() > dense.num_params()


def test_attention_hook_is_used():
    calls = []

    def attention(q, k, v):
        calls.append(q.shape)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch.manual_seed(1)
    model = GPT(tiny(attention_fn=attention))
    ref = GPT(tiny())
    ref.load_state_dict(model.state_dict())
    idx = torch.randint(0, 32, (2, 7))
    torch.testing.assert_close(model(idx, idx)[0], ref(idx, idx)[0])
    assert calls == [(2, 2, 7, 8)] * 2


def test_causality():
    torch.manual_seed(2)
    model = GPT(tiny(mlp="moe", num_experts=4, top_k=1))
    idx = torch.randint(0, 32, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (changed[0, 8] + 1) % 32
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])


def test_generate_and_training_reduces_loss():
    torch.manual_seed(3)
    model = GPT(tiny(mlp="moe", num_experts=4, top_k=2))
    data = torch.arange(16).repeat(4, 2)[:, :16] % 32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        _, loss = model(data[:, :-1], data[:, 1:])
        assert loss is not None
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.last_lm_loss is not None and model.last_lm_loss < 0.5 * first
    out = model.generate(data[:1, :3], 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 8) and torch.equal(out[:, :3], data[:1, :3])
    assert all(isinstance(m, MoE) for m in model.moe_layers())


def test_config_validation():
    with pytest.raises(ValueError, match="mlp"):
        GPTConfig(mlp="sparse")
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="block_size"):
        GPT(tiny())(torch.zeros(1, 17, dtype=torch.int64))
