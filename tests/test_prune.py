"""Pruning kernels and masks against plain PyTorch references (slimforge.prune.reference).

Masks must equal the references exactly: ties are broken by position (the earlier element is
pruned first, as a stable sort orders them), so scores are drawn from a coarse grid here to make
ties common.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimforge import _native
from slimforge.models import GPT, GPTConfig
from slimforge.prune import (
    NM,
    Magnitude,
    MaskCallback,
    Sparse24Linear,
    SparseGPT,
    Wanda,
    apply_masks,
    global_masks,
    global_threshold,
    group_norms,
    is_24_sparse,
    make_permanent,
    masked_modules,
    nm_masks,
    prune_,
    row_masks,
    sparsegpt_prune_weight,
    sparsity_report,
    to_sparse24,
)
from slimforge.prune.reference import (
    global_masks_reference,
    group_norms_reference,
    nm_masks_reference,
    row_masks_reference,
    sparsegpt_reference,
)
from slimforge.quant import QuantLinear
from slimforge.train import TrainConfig, Trainer


def coarse(shape: tuple[int, ...], seed: int, levels: int) -> torch.Tensor:
    """Values on a grid of ``levels`` steps: many exact ties (and signed zeros)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-levels, levels + 1, shape, generator=g).float() / levels


shapes = st.lists(st.tuples(st.integers(1, 9), st.integers(1, 40)), min_size=1, max_size=4)
amounts = st.floats(0.0, 0.999, allow_nan=False)


@given(shapes, amounts, st.integers(0, 10_000), st.sampled_from([2, 5, 1000]))
def test_global_masks_equal_a_stable_sort(shape_list, amount, seed, levels) -> None:
    ts = [coarse(s, seed + i, levels) for i, s in enumerate(shape_list)]
    got = global_masks(ts, amount)
    want = global_masks_reference(ts, amount)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    pruned = sum(int((~m).sum()) for m in got)
    assert pruned == round(amount * sum(t.numel() for t in ts))


@given(
    st.integers(1, 8),
    st.integers(1, 12),
    st.sampled_from([(2, 4), (1, 4), (3, 4), (4, 4), (1, 2), (2, 8)]),
    amounts,
    st.booleans(),
    st.integers(0, 10_000),
)
def test_row_and_nm_masks_equal_the_references(rows, windows, nm, amount, scaled, seed) -> None:
    n, m = nm
    w = coarse((rows, windows * m), seed, 3)
    scale = coarse((windows * m,), seed + 1, 4).abs() if scaled else None
    assert torch.equal(row_masks(w, amount, scale), row_masks_reference(w, amount, scale))
    got = nm_masks(w, n, m, scale)
    assert torch.equal(got, nm_masks_reference(w, n, m, scale))
    assert (got.reshape(rows, windows, m).sum(-1) == n).all()


@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 2]), st.booleans())
def test_group_norms_match_float64(groups, group, p, scaled) -> None:
    w = torch.randn(groups * group, 3 * group)
    scale = torch.rand(3 * group) if scaled else None
    for dim in (0, 1):
        got = group_norms(w, dim, group, p, scale)
        want = group_norms_reference(w, dim, group, p, scale)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_threshold_is_torch_kthvalue_and_large_inputs_split_in_chunks() -> None:
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(700, 1000, generator=g), torch.randn(123_457, generator=g)]
    flat = torch.cat([t.reshape(-1) for t in ts]).abs()
    for amount in (0.1, 0.5, 0.9):
        k = round(amount * flat.numel())
        t, ties = global_threshold(ts, amount)
        assert t == float(torch.kthvalue(flat, k).values)
        assert ties >= 1
    masks = global_masks(ts, 0.5)
    want = global_masks_reference(ts, 0.5)
    assert all(torch.equal(a, b) for a, b in zip(masks, want, strict=True))


def test_clear_errors() -> None:
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            Magnitude(bad)
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            Wanda(bad)
    with pytest.raises(ValueError, match="1 <= N <= M"):
        NM(5, 4)
    with pytest.raises(ValueError, match="1 <= N <= M"):
        SparseGPT(n=3, m=2)
    with pytest.raises(ValueError, match="not both"):
        Wanda(0.5, n=2, m=4)
    with pytest.raises(ValueError, match="divisible by M = 4"):
        nm_masks(torch.randn(3, 6))
    model = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(ValueError, match=r"^0: in_features \(6\) must be divisible by M = 4"):
        prune_(model, NM(2, 4))
    with pytest.raises(ValueError, match="needs calibration"):
        prune_(model, Wanda(0.5))
    with pytest.raises(ValueError, match="takes no calibration"):
        prune_(model, Magnitude(0.5), [torch.randn(2, 6)])
    with pytest.raises(TypeError, match="floating-point"):
        global_masks([torch.ones(3, dtype=torch.int64)], 0.5)
    with pytest.raises(ValueError, match="NaN"):
        global_masks([torch.tensor([1.0, float("nan")])], 0.5)
    with pytest.raises(ValueError, match="2:4"):
        Sparse24Linear.from_linear(nn.Linear(8, 2))


# ---------------------------------------------------------------------------- prune_


@pytest.fixture
def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(num_layers=2, hidden_size=64, vocab_size=64))


@pytest.fixture
def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (2, 32), generator=g) for _ in range(3)]


@pytest.mark.parametrize(
    ("cfg", "calibrated"),
    [
        (Magnitude(0.5), False),
        (Magnitude(0.3, scope="layer"), False),
        (NM(2, 4), False),
        (Wanda(0.5), True),
        (Wanda(n=2, m=4), True),
        (SparseGPT(0.5), True),
        (SparseGPT(n=2, m=4), True),
    ],
)
def test_prune_reaches_the_sparsity_in_the_block_linears(gpt, batches, cfg, calibrated) -> None:
    prune_(gpt, cfg, batches if calibrated else None, progress=False)
    names = [n for n, _ in masked_modules(gpt)]
    assert names == [
        f"blocks.{i}.{p}" for i in (0, 1) for p in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    ]
    report = sparsity_report(gpt)
    target = getattr(cfg, "amount", None) or 0.5
    assert abs(report.sparsity - target) < 1e-3
    if isinstance(cfg, Magnitude) and cfg.scope == "layer":
        assert all(abs(x.sparsity - 0.3) < 1e-3 for x in report.layers)
    if getattr(cfg, "m", None):
        for _, m in masked_modules(gpt):
            assert is_24_sparse(m.weight)
    assert torch.isfinite(gpt(batches[0]).logits).all()


def test_wanda_mask_is_the_reference_on_the_calibration_inputs() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(5, 16) * torch.linspace(0.1, 3, 16)
    prune_(lin_model := nn.Sequential(lin), Wanda(0.5), [x], spec=None, progress=False)
    assert lin_model is not None
    ref = copy.deepcopy(lin)
    norm = x.square().sum(0).sqrt()
    want = row_masks_reference(ref.weight, 0.5, norm)
    assert torch.equal(lin.weight_mask, want)


def test_sparsegpt_kernel_matches_the_float64_reference() -> None:
    g = torch.Generator().manual_seed(3)
    k = 96
    x = torch.randn(4 * k, k, generator=g) @ (torch.randn(k, k, generator=g) * 0.2 + torch.eye(k))
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(40, k, generator=g)
    for cfg, ref in (
        (SparseGPT(0.5, block_size=32), {"amount": 0.5}),
        (SparseGPT(n=2, m=4, block_size=32), {"n": 2, "m": 4}),
    ):
        got = sparsegpt_prune_weight(w, h, cfg)
        want_w, want_keep = sparsegpt_reference(w, h, block_size=32, **ref)  # type: ignore[arg-type]
        agree = float((got.keep == want_keep).float().mean())
        assert agree > 0.995, agree
        rows = (got.keep == want_keep).all(1)
        torch.testing.assert_close(got.weight[rows], want_w.float()[rows], rtol=1e-3, atol=1e-3)
        assert torch.equal(got.weight == 0, ~got.keep)

        # The point of SparseGPT: a lower layer error than the same mask without the update.
        def err(wp: torch.Tensor) -> float:
            d = (w - wp).double()
            return float(((d @ h.double()) * d).sum())

        assert err(got.weight) < 0.7 * err(w * got.keep)


def test_sparsegpt_with_int4_values_gives_a_2_4_quant_linear(gpt, batches) -> None:
    prune_(gpt, SparseGPT(n=2, m=4, bits=4, group_size=64), batches, progress=False)
    q = gpt.blocks[0].mlp.fc
    assert isinstance(q, QuantLinear)
    assert is_24_sparse(q.dequantize())
    sp = Sparse24Linear.from_quant_linear(q)
    assert torch.equal(sp.dequantize(), q.dequantize())
    assert abs(sparsity_report(gpt).sparsity - 0.5) < 1e-2


def test_masks_survive_training_and_make_permanent_keeps_the_keys(gpt, batches) -> None:
    keys = set(gpt.state_dict())
    prune_(gpt, Magnitude(0.6), progress=False)
    zeros = {n: ~m.weight_mask.clone() for n, m in masked_modules(gpt)}
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=32, lr=1e-2, weight_decay=0.1, progress=False)
    # Adam state from before pruning moves zeros unless the masks are re-applied.
    Trainer(gpt, torch.cat(batches).reshape(-1), config=cfg, callbacks=[MaskCallback()]).fit()
    for n, m in masked_modules(gpt):
        assert (m.weight[zeros[n]] == 0).all()
        assert m.weight.grad is None or (m.weight.grad[zeros[n]] == 0).all()
    assert set(gpt.state_dict()) == keys  # the mask buffers are not persistent
    twin = copy.deepcopy(gpt)
    assert apply_masks(twin) == 8  # restores the gradient hooks a deepcopy drops
    twin(batches[0], labels=batches[0]).loss.backward()
    assert all((m.weight.grad[~m.weight_mask] == 0).all() for _, m in masked_modules(twin))
    make_permanent(gpt)
    assert not list(masked_modules(gpt))
    assert set(gpt.state_dict()) == keys
    assert abs(sparsity_report(gpt).sparsity - 0.6) < 1e-3


# ---------------------------------------------------------------------------- 2:4 storage


@pytest.mark.parametrize(("bits", "group"), [(8, None), (8, 32), (4, 64), (4, 32)])
@pytest.mark.parametrize("tokens", [1, 3, 9])
def test_sparse24_linear_matches_the_dense_reference(bits, group, tokens) -> None:
    torch.manual_seed(bits + tokens)
    lin = nn.Linear(128, 40)
    prune_(nn.Sequential(lin), NM(2, 4), spec=None)
    make_permanent(lin)
    sp = Sparse24Linear.from_linear(lin, bits, group)
    g = sp.group_size
    from slimforge.quant.primitives import choose_qparams, dequantize_affine, quantize_affine

    s, z = choose_qparams(lin.weight.detach(), bits, g)
    dense = dequantize_affine(quantize_affine(lin.weight.detach(), s, z, bits, g), s, z, g)
    assert torch.equal(sp.dequantize(), dense)
    x = torch.randn(tokens, 128)
    want = F.linear(x.double(), dense.double(), lin.bias.detach().double())
    with torch.no_grad():
        got = sp(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # Storage: in / 2 (INT8) or in / 4 (INT4) value bytes plus in / 8 index bytes per row.
    assert sp.values.shape == (40, 64 if bits == 8 else 32) and sp.meta.shape == (40, 16)
    # With gradients the dequantized path runs, and the input gets its gradient.
    xg = x.clone().requires_grad_()
    sp(xg).sum().backward()
    assert xg.grad is not None


def test_sparse24_kernel_isa_paths_agree() -> None:
    # The AVX-512 kernel needs group and in multiples of 32; odd shapes take the portable one.
    torch.manual_seed(0)
    for k, group in ((96, 32), (40, None)):
        lin = nn.Linear(k, 17, bias=False)
        prune_(nn.Sequential(lin), NM(2, 4), spec=None)
        sp = Sparse24Linear.from_linear(lin, 8, group)
        x = torch.randn(2, k)
        with torch.no_grad():
            torch.testing.assert_close(sp(x), F.linear(x, sp.dequantize()), rtol=1e-4, atol=1e-4)


def test_to_sparse24_swaps_only_2_4_layers(gpt, batches) -> None:
    prune_(gpt, NM(2, 4), filter_fn=lambda m, n: "mlp" in n, progress=False)
    make_permanent(gpt)
    ref = copy.deepcopy(gpt)
    to_sparse24(gpt, bits=8)
    kinds = {n: type(m).__name__ for n, m in gpt.named_modules() if "blocks.0" in n}
    assert kinds["blocks.0.mlp.fc"] == "Sparse24Linear"
    assert kinds["blocks.0.attn.qkv"] == "Linear"
    with torch.no_grad():
        a, b = gpt(batches[0]).logits, ref(batches[0]).logits
    assert float((a - b).abs().max()) < 0.05 * float(b.abs().max())


def test_native_sparse24_rejects_bad_layouts() -> None:
    codes = np.zeros((2, 12), dtype=np.uint8)
    with pytest.raises(ValueError, match="divisible by 8"):
        _native.prune_sparse24_compress(codes, np.zeros((2, 12), dtype=bool), 8)
    keep = np.zeros((2, 16), dtype=bool)
    keep[1, 4:7] = True
    with pytest.raises(ValueError, match="row 1, columns 4..8: 3 of 4 kept"):
        _native.prune_sparse24_compress(np.zeros((2, 16), dtype=np.uint8), keep, 8)
