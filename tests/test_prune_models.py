"""Structured pruning (rewired models equal the masked originals), lottery tickets, and the
unstructured methods on real SmolLM2 blocks (assets)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slimforge.eval import evaluate_lm
from slimforge.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM
from slimforge.prune import (
    AttentionHeads,
    Blocks,
    LotteryTicket,
    Magnitude,
    MLPNeurons,
    SparseGPT,
    Wanda,
    prune_,
    prune_structured,
)


def gpt(activation: str = "gelu", kv: int | None = None) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(
            num_layers=3,
            hidden_size=64,
            num_heads=4,
            num_kv_heads=kv,
            vocab_size=64,
            activation=activation,
            position="rope",
        )  # fmt: skip
    ).eval()


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=6,
        num_kv_heads=2, max_seq_len=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def calib() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 64, (2, 24), generator=g) for _ in range(3)]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def zero_columns(model: nn.Module, name: str, keep: list[int], width: int, group: int = 1) -> None:
    """Zeroes the input columns of ``name`` that belong to removed units."""
    lin = model.get_submodule(name)
    gone = sorted(set(range(width)) - set(keep))
    with torch.no_grad():
        for u in gone:
            lin.weight[:, u * group : (u + 1) * group] = 0


@pytest.mark.parametrize(
    ("make", "down"),
    [
        (lambda: gpt("gelu"), "mlp.proj"),
        (lambda: gpt("swiglu"), "mlp.proj"),
        (llama, "mlp.down_proj"),
    ],
)
@pytest.mark.parametrize("calibrated", [False, True])
def test_removing_neurons_equals_zeroing_them(make, down, calibrated) -> None:
    model = make()
    ref = copy.deepcopy(model)
    res = prune_structured(model, MLPNeurons(0.3, round_to=2), calib() if calibrated else None)
    spec = model.spec()
    width = ref.get_submodule(f"{spec.blocks}.0.{down}").in_features
    for key, keep in res.kept.items():
        assert len(keep) == width - round(0.3 * width) + (width - round(0.3 * width)) % 2
        zero_columns(ref, f"{key.rpartition('.')[0]}.{down}", keep, width)
    ids = calib()[0]
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)
    assert res.params_after < res.params_before
    cfg = model.config  # type: ignore[union-attr]
    assert cfg.intermediate_size == len(next(iter(res.kept.values())))


@pytest.mark.parametrize("calibrated", [False, True])
@pytest.mark.parametrize(
    ("make", "amount", "removed"),
    [
        (lambda: gpt(), 0.25, 1 / 4),  # MHA: whole heads
        (lambda: gpt(kv=2), 0.5, 1 / 2),  # GQA: 1 of the 2 queries of each KV group
        (llama, 0.34, 1 / 3),  # GQA 6 / 2: 1 of 3 per group
    ],
)
def test_removing_heads_equals_zeroing_them(make, amount, removed, calibrated) -> None:
    model = make()
    ref = copy.deepcopy(model)
    res = prune_structured(model, AttentionHeads(amount), calib() if calibrated else None)
    assert res.fraction_removed == pytest.approx(removed)
    spec = model.spec()
    out = spec.block.attn_out
    attn = ref.get_submodule(f"{spec.blocks}.0.{out.rpartition('.')[0]}")
    nh = getattr(attn, "num_heads", None) or attn.cfg.num_heads
    hd = getattr(attn, "head_dim", None) or attn.cfg.head_dim
    for key, heads in res.kept.items():
        zero_columns(ref, f"{key}.{out.rpartition('.')[2]}", heads, nh, hd)
    ids = calib()[1]
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=1e-4, atol=1e-4)


def test_removing_blocks_drops_the_least_influential() -> None:
    model = gpt()
    with torch.no_grad():  # make block 1 (nearly) the identity: its influence is the lowest
        model.blocks[1].attn.proj.weight.mul_(1e-4)
        model.blocks[1].mlp.proj.weight.mul_(1e-4)
    res = prune_structured(model, Blocks(1), calib())
    assert res.kept == {"blocks": [0, 2]}
    assert len(model.blocks) == 2 and model.config.num_layers == 2
    assert logits(model, calib()[0]).shape == (2, 24, 64)


def test_structured_errors() -> None:
    with pytest.raises(ValueError, match="needs a model spec"):
        prune_structured(nn.Sequential(nn.Linear(4, 4)), MLPNeurons(0.3), spec=None)
    with pytest.raises(ValueError, match="MoE"):
        prune_structured(GPT(GPTConfig(num_layers=1, hidden_size=32, mlp="moe")), MLPNeurons(0.3))
    with pytest.raises(ValueError, match="removes 0 of the 3 query heads"):
        prune_structured(llama(), AttentionHeads(0.1))
    with pytest.raises(ValueError, match="needs calibration"):
        prune_structured(gpt(), Blocks(1))
    with pytest.raises(ValueError, match="every one of the 3 blocks"):
        prune_structured(gpt(), Blocks(3), calib())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        MLPNeurons(1.0)


# ---------------------------------------------------------------------------- lottery tickets


def test_lottery_ticket_prunes_the_remaining_weights_and_rewinds() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 3))
    x, y = torch.randn(256, 20), torch.randint(0, 3, (256,))
    theta0 = {k: v.clone() for k, v in net.state_dict().items()}

    def train(model: nn.Module) -> float:
        from slimforge.prune import apply_masks

        opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(30):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            apply_masks(model)
        return float(loss.detach())

    ticket = LotteryTicket(net, rate=0.2)
    history = ticket.run(train, rounds=3)
    assert [round(h.sparsity, 3) for h in history] == [0.0, 0.2, 0.36, 0.488]
    for name in ("0", "2"):
        m = net.get_submodule(name)
        assert (m.weight[~m.weight_mask] == 0).all()
    # Rewinding then retraining: rewind again and the kept weights are theta_0's.
    ticket.rewind()
    w = net[0].weight
    assert torch.equal(w[net[0].weight_mask], theta0["0.weight"][net[0].weight_mask])
    assert torch.equal(net[0].bias, theta0["0.bias"])
    mask = net[0].weight_mask.clone()
    ticket.reinitialize(seed=1)
    assert torch.equal(net[0].weight_mask, mask) and (net[0].weight[~mask] == 0).all()
    assert not torch.equal(net[0].weight[mask], theta0["0.weight"][mask])


# ---------------------------------------------------------------------------- SmolLM2 (assets)


@pytest.mark.slow
@pytest.mark.assets
def test_wanda_and_sparsegpt_beat_magnitude_on_smollm2_blocks(smollm2_gguf_path) -> None:
    from pathlib import Path

    from slimforge.data.windows import chunk_windows
    from slimforge.models import ByteLevelBPETokenizer

    model = LlamaForCausalLM.from_gguf(smollm2_gguf_path, num_layers=2)
    tok = ByteLevelBPETokenizer.from_gguf(smollm2_gguf_path)
    lic = Path("/usr/share/common-licenses")
    ev = torch.stack(
        chunk_windows(torch.tensor(tok.encode((lic / "Apache-2.0").read_text())), 128)[:4]
    )
    cal_ids = torch.tensor(tok.encode((lic / "GPL-3").read_text()))[: 3 * 128]
    cal = [w[None] for w in chunk_windows(cal_ids, 128)]
    ppl = {}
    for name, cfg in (
        ("magnitude", Magnitude(0.5, scope="layer")),
        ("wanda", Wanda(0.5)),
        ("sparsegpt", SparseGPT(0.5)),
    ):
        m = copy.deepcopy(model)
        prune_(m, cfg, None if name == "magnitude" else cal, progress=False)
        ppl[name] = evaluate_lm(m, ev, batch_size=4).perplexity
    assert ppl["wanda"] < ppl["magnitude"] and ppl["sparsegpt"] < ppl["magnitude"], ppl
