"""Tests for slimforge.quant: primitives, fused kernels, QuantLinear, quantize_, save/load."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimforge import _native
from slimforge.quant import (
    Int4WeightOnly,
    Int8WeightOnly,
    QuantConfig,
    QuantEmbedding,
    QuantLinear,
    choose_qparams,
    dequantize_affine,
    load_quantized,
    pack_int4,
    quantize_,
    quantize_affine,
    register_quantize_handler,
    save_quantized,
    unpack_int4,
)
from slimforge.quant.linear import FUSED_MAX_TOKENS

F32_EPS = 2.0**-23
GROUPS = [32, 64, 128, None]


def make_weight(kind: str, rows: int, cols: int, seed: int, scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        w = torch.randn(rows, cols, generator=g)
    elif kind == "positive":
        w = torch.rand(rows, cols, generator=g) + 0.5
    elif kind == "zeros":
        w = torch.zeros(rows, cols)
    elif kind == "constant":
        w = torch.full((rows, cols), -0.75)
    else:  # outliers
        w = torch.randn(rows, cols, generator=g)
        w[:, :: max(1, cols // 7)] *= 100.0
    return w * scale


# Reference implementations (float64 where it helps).


def ref_qparams(w: torch.Tensor, bits: int, g: int, symmetric: bool):
    qmax = 2**bits - 1
    wg = w.double().reshape(w.shape[0], -1, g)
    lo = wg.min(-1).values.clamp(max=0.0)
    hi = wg.max(-1).values.clamp(min=0.0)
    if symmetric:
        amax = torch.maximum(hi, -lo)
        s = (amax / (qmax / 2.0)).float().clamp(min=torch.finfo(torch.float32).eps)
        z = torch.full_like(s, (qmax + 1) / 2)
    else:
        s = ((hi - lo) / qmax).float().clamp(min=torch.finfo(torch.float32).eps)
        z = torch.round(-lo / s.double()).clamp(0, qmax).float()
    return s, z


def ref_quantize(w, s, z, bits, g):
    qmax = 2**bits - 1
    wg = w.float().reshape(w.shape[0], -1, g)
    q = torch.clamp(torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1), 0, qmax)
    return q.to(torch.uint8).reshape(w.shape)


def ref_dequantize(q, s, z, g):
    qg = q.float().reshape(q.shape[0], -1, g)
    return ((qg - z.unsqueeze(-1)) * s.unsqueeze(-1)).reshape(q.shape)


def ref_pack(q):
    return q[..., 0::2] | (q[..., 1::2] << 4)


def act_error_bound(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Bound of the int8-activation route: sum_k |w_k| * absmax(block(k)) / 254."""
    m, k = x2.shape
    if k % 32:
        return torch.zeros(m, w.shape[0], dtype=torch.float64)
    amax = x2.double().abs().reshape(m, k // 32, 32).amax(-1).repeat_interleave(32, -1)
    return (amax / 254.0) @ w.double().abs().T


# Primitives.


@given(
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    group=st.sampled_from(GROUPS),
    rows=st.integers(1, 6),
    ngroups=st.integers(1, 3),
    kind=st.sampled_from(["normal", "positive", "zeros", "constant", "outliers"]),
    scale=st.sampled_from([1e-3, 1.0, 37.0]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_error_at_most_half_step(
    bits, symmetric, group, rows, ngroups, kind, scale, dtype, seed
):
    cols = (group or 32) * ngroups
    w = make_weight(kind, rows, cols, seed, scale).to(dtype)
    g = group or cols
    s, z = choose_qparams(w, bits, group, symmetric)
    assert s.shape == z.shape == (rows, cols // g)
    assert s.dtype == z.dtype == torch.float32
    rs, rz = ref_qparams(w.float(), bits, g, symmetric)
    assert torch.equal(s, rs) and torch.equal(z, rz)
    if symmetric:
        assert torch.all(z == 2 ** (bits - 1))
    assert torch.all(z == z.round()) and torch.all((z >= 0) & (z <= 2**bits - 1))
    q = quantize_affine(w, s, z, bits, group)
    assert q.dtype == torch.uint8 and q.shape == w.shape
    assert int(q.max()) <= 2**bits - 1
    assert torch.equal(q, ref_quantize(w, s, z, bits, g))
    d = dequantize_affine(q, s, z, group)
    assert torch.equal(d, ref_dequantize(q, s, z, g))
    wf = w.float()
    bound = s.repeat_interleave(g, -1) * 0.5 * (1 + 1e-5) + F32_EPS * wf.abs()
    assert torch.all((wf - d).abs() <= bound)


def ref_no_clip_scales(w: torch.Tensor, bits: int, g: int) -> torch.Tensor:
    """float64 ``max(max(w, 0) / (2^(b-1) - 1), -min(w, 0) / 2^(b-1))`` per group."""
    half = 2 ** (bits - 1)
    wg = w.double().reshape(w.shape[0], -1, g)
    hi = wg.max(-1).values.clamp(min=0.0)
    lo = wg.min(-1).values.clamp(max=0.0)
    s = torch.maximum(hi / (half - 1), -lo / half).float()
    return torch.where(s > 0, s, torch.full_like(s, F32_EPS))


@given(
    bits=st.sampled_from([4, 8]),
    group=st.sampled_from(GROUPS),
    rows=st.integers(1, 6),
    ngroups=st.integers(1, 3),
    kind=st.sampled_from(["normal", "positive", "zeros", "constant", "outliers"]),
    scale=st.sampled_from([1e-3, 1.0, 37.0]),
    seed=st.integers(0, 2**16),
)
def test_no_clip_symmetric_never_clips(bits, group, rows, ngroups, kind, scale, seed):
    cols = (group or 32) * ngroups
    w = make_weight(kind, rows, cols, seed, scale)
    g = group or cols
    s, z = choose_qparams(w, bits, group, True, no_clip=True)
    assert torch.equal(s, ref_no_clip_scales(w, bits, g))
    assert torch.all(z == 2 ** (bits - 1))
    # Unclamped codes already lie in [0, 2^b - 1]: the clamp never fires.
    wg = w.reshape(rows, -1, g)
    raw = torch.round(wg / s.unsqueeze(-1)) + z.unsqueeze(-1)
    assert raw.min() >= 0 and raw.max() <= 2**bits - 1
    q = quantize_affine(w, s, z, bits, group)
    d = dequantize_affine(q, s, z, group)
    bound = s.repeat_interleave(g, -1) * 0.5 * (1 + 1e-5) + F32_EPS * w.abs()
    assert torch.all((w - d).abs() <= bound)
    # The weight that sets the scale (the max, or the min) is a code, up to float32 rounding.
    dg = d.reshape(rows, -1, g)
    errs = []
    for pick in (wg.argmax(-1, keepdim=True), wg.argmin(-1, keepdim=True)):
        ext = wg.gather(-1, pick).squeeze(-1)
        errs.append((dg.gather(-1, pick).squeeze(-1) - ext).abs() / ext.abs().clamp(min=1e-30))
    assert torch.all(torch.minimum(*errs) <= 4 * F32_EPS)


def test_no_clip_keeps_the_positive_max_that_absmax_clips() -> None:
    lin = nn.Linear(64, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.linspace(-0.5, 1.0, 64).repeat(2, 1))
    default = QuantLinear.from_float(lin, 8, None, symmetric=True).dequantize()
    exact = QuantLinear.from_float(lin, 8, None, symmetric=True, no_clip=True).dequantize()
    # absmax / 127.5 puts 1.0 at code 127.5, clamped to 127: half a step short.
    assert default[0, -1].item() == pytest.approx(127 / 127.5, rel=1e-6)
    assert exact[0, -1].item() == pytest.approx(1.0, rel=1e-6)
    model = quantize_(nn.Sequential(lin), Int8WeightOnly(no_clip=True))
    assert torch.equal(model[0].dequantize(), exact)
    # Symmetric Int8WeightOnly() defaults to no_clip; asymmetric to min-max (no error).
    assert Int8WeightOnly().no_clip is True
    assert Int8WeightOnly(symmetric=False).no_clip is False
    model = quantize_(nn.Sequential(copy.deepcopy(lin)), Int8WeightOnly())
    assert torch.equal(model[0].dequantize(), exact)
    model = quantize_(nn.Sequential(copy.deepcopy(lin)), Int8WeightOnly(no_clip=False))
    assert torch.equal(model[0].dequantize(), default)
    emb = nn.Embedding(3, 64)
    with torch.no_grad():
        emb.weight.copy_(lin.weight[:1].repeat(3, 1))
    qemb = QuantEmbedding.from_float(emb, 8, None, symmetric=True, no_clip=True)
    assert torch.equal(qemb.dequantize(), exact[:1].repeat(3, 1))
    with pytest.raises(ValueError, match="symmetric"):
        Int8WeightOnly(symmetric=False, no_clip=True)
    with pytest.raises(ValueError, match="symmetric"):
        Int4WeightOnly(no_clip=True)
    with pytest.raises(ValueError, match="symmetric"):
        choose_qparams(lin.weight, 8, None, False, no_clip=True)
    s4, _ = choose_qparams(lin.weight, 4, 32, True, no_clip=True)
    assert torch.allclose(s4[:, 1], torch.full((2,), 1.0 / 7))


@given(
    shape=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    half=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_pack_unpack_exact(shape, half, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (*shape, 2 * half), generator=g, dtype=torch.uint8)
    p = pack_int4(q)
    assert p.shape == (*shape, half) and p.dtype == torch.uint8
    assert torch.equal(p, ref_pack(q))
    assert torch.equal(unpack_int4(p), q)


def test_pack_layout_low_nibble_first():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x0F]]
    assert unpack_int4(torch.tensor([[0xA3]], dtype=torch.uint8)).tolist() == [[3, 10]]


def test_pack_large_buffer_parallel_path():
    q = torch.randint(0, 16, (1024, 4096), dtype=torch.uint8)
    p = pack_int4(q)
    assert torch.equal(p, ref_pack(q))
    assert torch.equal(unpack_int4(p), q)


# Fused kernels and QuantLinear.


def layer(bits, group, symmetric, out, k, bias, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(k, out, bias=bias)
    return lin, QuantLinear.from_float(lin, bits, group, symmetric)


@given(
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    group=st.sampled_from(GROUPS),
    ngroups=st.integers(1, 3),
    out=st.integers(1, 40),
    lead=st.sampled_from([(), (1,), (3,), (2, 3), (5, 4), (21,), (FUSED_MAX_TOKENS + 3,)]),
    route=st.sampled_from(["float", "int8", "auto"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_float64_reference(
    bits, symmetric, group, ngroups, out, lead, route, dtype, bias, seed
):
    k = (group or 32) * ngroups
    lin, ql = layer(bits, group, symmetric, out, k, bias, seed)
    ql.route = route
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    y = ql(x)
    assert y.shape == (*lead, out) and y.dtype == dtype
    w = ql.dequantize().double()
    x2 = x.reshape(-1, k).double()
    ref = x2 @ w.T
    if bias:
        ref = ref + lin.bias.detach().double()
    mag = x2.abs() @ w.abs().T + (lin.bias.detach().double().abs() if bias else 0.0)
    m = x2.shape[0]
    route_used = _native.quant_default_route(bits) if route == "auto" else route
    fused = m <= ql.fused_max_tokens()
    # float32 accumulation; bfloat16 adds rounding of the output (and of the weight off the fused path)
    tol = 1e-5 * mag + 1e-6
    if dtype == torch.bfloat16:
        tol = tol + (2.0**-8 if fused else 2.0**-6) * mag
    if fused and route_used == "int8":
        tol = tol + act_error_bound(x2, w) * 1.001
    err = (y.reshape(m, out).double() - ref).abs()
    assert torch.all(err <= tol), float((err - tol).max())


@pytest.mark.parametrize("bits", [4, 8])
def test_int8_route_is_close_but_float_route_is_tighter(bits):
    _, ql = layer(bits, 128, False, 64, 1024, False, 0)
    x = torch.randn(2, 1024)
    ref = x.double() @ ql.dequantize().double().T
    errs = {}
    for route in ("float", "int8"):
        ql.route = route
        errs[route] = float((ql(x).double() - ref).norm() / ref.norm())
    assert errs["float"] < 1e-6
    assert errs["float"] < errs["int8"] < 2e-2


@given(
    bits=st.sampled_from([4, 8]),
    group=st.sampled_from(GROUPS),
    lead=st.sampled_from([(1,), (3,), (2, 5), (FUSED_MAX_TOKENS + 1,)]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_backward_reaches_input_only(bits, group, lead, dtype, seed):
    k, out = 128, 24
    _, ql = layer(bits, group, False, out, k, True, seed)
    x = torch.randn(*lead, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    x.requires_grad_(True)
    g = torch.randn(*lead, out, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    ql(x).backward(g)
    w = ql.dequantize().double()
    ref = g.double() @ w
    tol = 1e-5 if dtype == torch.float32 else 2.0**-6
    mag = g.double().abs() @ w.abs()
    assert x.grad is not None and x.grad.dtype == dtype
    assert torch.all((x.grad.double() - ref).abs() <= tol * mag + 1e-6)
    assert all(not b.requires_grad for b in ql.buffers())


@pytest.mark.parametrize("route", ["float", "int8"])
def test_nan_in_input_propagates(route):
    _, ql = layer(4, 32, False, 8, 64, False, 3)
    ql.route = route
    x = torch.randn(3, 64)
    x[1, 5] = math.nan
    y = ql(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_buffer_updates_reach_the_kernel():
    _, a = layer(4, 32, False, 16, 64, True, 1)
    _, b = layer(4, 32, False, 16, 64, True, 2)
    x = torch.randn(2, 64)
    ya = a(x)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), ya)
    a.qweight = torch.zeros_like(a.qweight)
    a.route = "float"
    assert torch.allclose(a(x), x @ a.dequantize().T + a.bias, atol=1e-5)
    a.bfloat16()
    assert a.scales.dtype == a.zeros.dtype == a.bias.dtype == torch.float32
    assert a(x.bfloat16()).dtype == torch.bfloat16


def test_lora_style_training_on_frozen_int4_base():
    torch.manual_seed(0)
    base = QuantLinear.from_float(nn.Linear(64, 32), 4, 32)
    a = nn.Parameter(torch.randn(4, 64) * 0.1)
    b = nn.Parameter(torch.zeros(32, 4))
    opt = torch.optim.SGD([a, b], lr=0.1)
    x, target = torch.randn(8, 64), torch.randn(8, 32)
    before = base.qweight.clone()
    losses = []
    for _ in range(20):
        y = base(x) + (x @ a.T) @ b.T
        loss = ((y - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert torch.equal(base.qweight, before)


def test_peer_torch_weight_int8pack_mm_agrees():
    torch.manual_seed(0)
    lin = nn.Linear(256, 48, bias=False)
    ql = QuantLinear.from_float(lin, 8, None, symmetric=True)
    ql.route = "float"
    x = torch.randn(3, 256)
    w_signed = (ql.qweight.to(torch.int16) - 128).to(torch.int8)
    try:
        peer = torch.ops.aten._weight_int8pack_mm(x, w_signed, ql.scales.reshape(-1))
    except (RuntimeError, AttributeError) as e:  # not built into every torch
        pytest.skip(f"aten._weight_int8pack_mm unavailable: {e}")
    assert torch.allclose(ql(x), peer, rtol=1e-4, atol=1e-4)


def test_native_routes_and_isa_are_reported():
    assert _native.quant_default_route(4) == "int8"
    assert _native.quant_default_route(8) in ("int8", "float")
    assert isinstance(_native.quant_kernel_isa(), str)
    _, ql = layer(8, 32, True, 8, 64, False, 0)
    with pytest.raises(ValueError, match="route"):
        _native.quant_linear(
            np.zeros((1, 64), np.float32),
            ql.qweight.numpy(),
            ql.scales.numpy(),
            ql.zeros.numpy(),
            None,
            8,
            32,
            "fast",
        )
    with pytest.raises(TypeError, match="contiguous"):
        _native.quant_dequantize(
            ql.qweight.numpy()[:, ::2], ql.scales.numpy(), ql.zeros.numpy(), 32
        )


# quantize_ and QuantEmbedding.


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Embedding(50, 64),
        nn.Linear(64, 128),
        nn.ReLU(),
        nn.Sequential(nn.Linear(128, 128), nn.GELU()),
        nn.Linear(128, 10, bias=False),
    )


@pytest.mark.parametrize(
    ("config", "rel_tol"),
    [
        (Int8WeightOnly(), 2e-2),
        (Int4WeightOnly(group_size=64), 2e-1),
        (Int4WeightOnly(group_size=32, symmetric=True), 2e-1),
    ],
)
def test_quantize_swaps_layers_in_place(config, rel_tol):
    model = small_model()
    idx = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        ref = model(idx)
    out = quantize_(model, config)
    assert out is model
    assert isinstance(model[1], QuantLinear) and isinstance(model[3][0], QuantLinear)
    assert isinstance(model[4], QuantLinear) and model[4].bias is None
    expect_emb = QuantEmbedding if isinstance(config, Int8WeightOnly) else nn.Embedding
    assert type(model[0]) is expect_emb
    assert model[1].bits == (8 if isinstance(config, Int8WeightOnly) else 4)
    with torch.no_grad():
        y = model(idx)
    assert y.shape == ref.shape
    assert float((y - ref).norm() / ref.norm()) < rel_tol


def test_filter_fn_selects_layers():
    model = small_model()
    quantize_(model, Int4WeightOnly(group_size=32), filter_fn=lambda m, fqn: fqn == "3.0")
    assert isinstance(model[3][0], QuantLinear)
    assert type(model[1]) is nn.Linear and type(model[4]) is nn.Linear


def test_quantize_root_linear_returns_replacement():
    lin = nn.Linear(64, 8)
    q = quantize_(lin, Int8WeightOnly())
    assert isinstance(q, QuantLinear)


def test_quant_embedding_matches_dequantized_table():
    emb = nn.Embedding(30, 64, padding_idx=0)
    for bits, g in ((8, None), (8, 32), (4, 64)):
        qe = QuantEmbedding.from_float(emb, bits, g)
        idx = torch.tensor([[0, 5, 29], [3, 3, 1]])
        table = qe.dequantize()
        assert torch.equal(qe(idx), table[idx])
        step = qe.scales.repeat_interleave(qe.group_size, -1)
        assert torch.all((table - emb.weight.detach()).abs() <= step * 0.5 * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("bits", [4, 8])
def test_from_quantized_matches_codes(bits):
    g = torch.Generator().manual_seed(1)
    q = torch.randint(0, 2**bits, (16, 64), generator=g, dtype=torch.uint8)
    s = torch.rand(16, 2, generator=g) + 0.1
    z = torch.randint(0, 2**bits, (16, 2), generator=g).float()
    b = torch.randn(16, generator=g)
    ql = QuantLinear.from_quantized(q, s, z, b, bits, 32)
    assert torch.equal(ql.dequantize(), ref_dequantize(q, s, z, 32))
    if bits == 4:
        assert torch.equal(ql.qweight, ref_pack(q))
    assert torch.equal(ql.bias, b)


def test_custom_config_registration():
    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass(frozen=True)
    class Tag(QuantConfig):
        bits: int = 8

    @dataclass(frozen=True)
    class TagWithTables(Tag):
        module_types: ClassVar[tuple[type[nn.Module], ...]] = (nn.Linear, nn.Embedding)

    seen = []

    @register_quantize_handler(Tag)
    def _handler(module, config):
        seen.append(type(module).__name__)
        if isinstance(module, nn.Linear):
            return QuantLinear.from_float(module, config.bits, None, True)
        return module

    model = small_model()
    quantize_(model, Tag())
    # The config's module_types decide what is selected: linears only by default.
    assert seen == ["Linear"] * 3
    assert isinstance(model[1], QuantLinear)
    seen.clear()
    quantize_(small_model(), TagWithTables())  # found through the MRO, tables included
    assert seen.count("Linear") == 3 and seen.count("Embedding") == 1
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        Tag(bits=3)


# save / load.


@pytest.mark.parametrize("config", [Int8WeightOnly(), Int4WeightOnly(group_size=64)])
def test_save_load_round_trip_exact(tmp_path, config):
    model = small_model()
    quantize_(model, config)
    save_quantized(model, tmp_path / "ckpt")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["model.safetensors", "quant_config.json"]
    loaded = load_quantized(small_model, tmp_path / "ckpt")
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys()
    for key in sd_a:
        assert sd_a[key].dtype == sd_b[key].dtype and torch.equal(sd_a[key], sd_b[key]), key
    idx = torch.randint(0, 50, (2, 4))
    assert torch.equal(model(idx), loaded(idx))
    into = small_model()
    assert load_quantized(into, tmp_path / "ckpt") is into
    cfg = json.loads((tmp_path / "ckpt" / "quant_config.json").read_text())
    assert cfg["modules"]["1"]["type"] == "QuantLinear"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_quantized(small_model, tmp_path / "missing")
    model = small_model()
    quantize_(model, Int8WeightOnly())
    save_quantized(model, tmp_path / "c")
    with pytest.raises(ValueError, match="lacks"):
        load_quantized(lambda: nn.Sequential(nn.Linear(4, 4)), tmp_path / "c")
    (tmp_path / "c" / "quant_config.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="slimforge-quant"):
        load_quantized(small_model, tmp_path / "c")


# Error paths.


def test_error_paths():
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="divisible"):
        choose_qparams(w, 4, 64, False)
    with pytest.raises(ValueError, match="group_size"):
        choose_qparams(w, 4, 48, False)
    with pytest.raises(ValueError, match="bits"):
        choose_qparams(w, 3, 32, False)
    with pytest.raises(TypeError, match="floating"):
        choose_qparams(w.to(torch.int32), 8, 32, False)
    for bad in (math.nan, math.inf):
        wb = w.clone()
        wb[1, 2] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            choose_qparams(wb, 8, 32, False)
    s, z = choose_qparams(w, 8, 32, False)
    with pytest.raises(ValueError, match="scales"):
        quantize_affine(w, torch.zeros_like(s), z, 8, 32)
    with pytest.raises(ValueError, match="zeros"):
        quantize_affine(w, s, z + 0.5, 8, 32)
    with pytest.raises(ValueError, match="elements"):
        quantize_affine(w, s[:, :1], z, 8, 32)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_affine(torch.zeros(4, 96, dtype=torch.int8), s, z, 32)
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_int4(torch.tensor([1, 16], dtype=torch.uint8))
    with pytest.raises(ValueError, match="divisible"):
        QuantLinear.from_float(nn.Linear(96, 4), 4, 64)
    with pytest.raises(ValueError, match="bits"):
        QuantLinear(64, 4, bits=2)
    with pytest.raises(ValueError, match="even"):
        QuantLinear(63, 4, bits=4, group_size=None)
    with pytest.raises(ValueError, match="< 16"):
        QuantLinear.from_quantized(
            torch.full((2, 32), 16, dtype=torch.uint8),
            torch.ones(2, 1),
            torch.zeros(2, 1),
            None,
            4,
            32,
        )
    lin = nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        QuantLinear.from_float(lin, 8, None)
    ql = QuantLinear.from_float(nn.Linear(64, 4), 8, 32)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        ql(torch.randn(2, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(\.\.\., 64\)"):
        ql(torch.randn(2, 63))
    with pytest.raises(TypeError, match="handler"):
        quantize_(nn.Linear(64, 4), QuantConfig())
    with pytest.raises(ValueError, match="^0: in_features"):
        quantize_(nn.Sequential(nn.Linear(96, 4)), Int4WeightOnly(group_size=64))
