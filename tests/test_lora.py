"""Tests for slimforge.lora: LoraLinear on float and quantized bases (merge / unmerge / delta,
DoRA, PiSSA, dropout), the model verbs (apply_lora, set_adapter, disable_adapters, counts,
merge_and_unload with RTN and GPTQ re-quantization), training through the Trainer, the adapter
files (own round trips, malformed files) and the `slimforge lora` command.
(peft interop: tests/test_lora_peft.py.)"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from slimforge.lora import (
    LoraConfig,
    LoraLinear,
    apply_lora,
    base_weight,
    delete_adapter,
    disable_adapters,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    parameter_counts,
    save_adapter,
    set_adapter,
    trainable_parameters,
    unmerge_lora,
)
from slimforge.models import GPT, GPTConfig, LlamaConfig, LlamaForCausalLM
from slimforge.quant import InputTransformedLinear, Int4WeightOnly, QuantLinear, quantize_
from slimforge.train import TrainConfig, Trainer

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY = LlamaConfig(
    vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
    num_kv_heads=2, max_seq_len=64, attn_impl="sdpa",
)  # fmt: skip


def tiny_llama(seed: int = 0, **changes: object) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(TINY.replace(**changes)).eval()


def randomize(model: nn.Module, scale: float = 0.1, seed: int = 1) -> None:
    """Gives every adapter parameter a random non-zero value (B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for d in (layer.lora_A, layer.lora_B):
                for p in d.values():
                    p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
            for p in layer.lora_magnitude.values():
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g).to(p.dtype))


def float_bound(x: torch.Tensor, weights: list[torch.Tensor], eps: float, n: int) -> torch.Tensor:
    """An elementwise bound on the rounding difference of two float evaluations of the same
    product: (n + 4) * eps * |x| @ sum |W|^T, in float64."""
    mag = sum(w.double().abs() for w in weights)
    return (n + 4) * eps * (x.double().abs().reshape(-1, x.shape[-1]) @ mag.T) + 1e-30


# ------------------------------------------------------------------------------- config


def test_config_validates_and_round_trips() -> None:
    cfg = LoraConfig(r=4, alpha=16, target_modules=["q_proj", "v_proj"], rslora=True)
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert cfg.scaling == 16 / 2
    assert LoraConfig(r=4, alpha=16).scaling == 4
    assert LoraConfig.from_dict(cfg.to_dict()) == cfg
    allin = LoraConfig(target_modules="all-linear")
    assert LoraConfig.from_dict(allin.to_dict()) == allin
    assert LoraConfig(target_modules="q_proj").target_modules == ("q_proj",)
    for bad in (
        {"r": 0}, {"r": 2.5}, {"alpha": 0}, {"alpha": float("nan")}, {"dropout": 1.0},
        {"dropout": -0.1}, {"init": "loftq"}, {"target_modules": ()}, {"target_modules": [""]},
    ):  # fmt: skip
        with pytest.raises(ValueError):
            LoraConfig(**bad)  # type: ignore[arg-type]


# ------------------------------------------------------------------- LoraLinear, float base

DTYPES = {torch.float64: 2.0**-52, torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8}


@given(
    in_f=st.integers(1, 48),
    out_f=st.integers(1, 48),
    rows=st.integers(1, 20),
    r=st.integers(1, 8),
    dtype=st.sampled_from(list(DTYPES)),
    bias=st.booleans(),
    dropout=st.sampled_from([0.0, 0.3]),
    dora=st.booleans(),
    rslora=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(
    in_f=1,
    out_f=26,
    rows=16,
    r=8,
    dtype=torch.bfloat16,
    bias=False,
    dropout=0.0,
    dora=True,
    rslora=False,
    seed=9,
)  # near-cancelling DoRA rows in bfloat16
def test_merged_equals_unmerged_and_unmerge_restores(
    in_f: int, out_f: int, rows: int, r: int, dtype: torch.dtype, bias: bool, dropout: float,
    dora: bool, rslora: bool, seed: int,
) -> None:  # fmt: skip
    torch.manual_seed(seed)
    base = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    original_weight = base.weight.detach().clone()
    cfg = LoraConfig(r=r, alpha=2 * r, dropout=dropout, use_dora=dora, rslora=rslora)
    layer = LoraLinear(base, "a", cfg).eval()
    randomize(layer, scale=0.3, seed=seed)
    x = torch.randn(rows, in_f).to(dtype)
    unmerged = layer(x)
    with torch.no_grad():
        base_out = layer.base_layer(x).reshape(-1, out_f)  # before the merge changes it
    delta = layer.delta_weight("a")
    assert layer.merge_() is None
    assert layer.merged_adapters == ["a"]
    merged = layer(x)
    w_merged = layer.base_layer.weight.detach()
    eps = DTYPES[dtype]
    assert (w_merged.double() - (original_weight.double() + delta.double())).abs().max() <= (
        2 * eps * (original_weight.double().abs() + delta.double().abs()).max() + 1e-30
    )
    lw = cfg.scaling * layer.lora_B["a"].detach().float() @ layer.lora_A["a"].detach().float()
    parts = [original_weight, delta, w_merged, lw]
    bound = float_bound(x, parts, eps, in_f if dtype != torch.bfloat16 else 4)
    # DoRA rescales the base output minus its bias: rounding of y and of the bias, times the
    # largest row factor m / ||W + s B A||. Unmerged, it adds (factor - 1) * base output to the
    # base output (peft's formula), so the rounding of the base output itself counts too: where
    # the factor is small the two nearly cancel (a 1-input layer in bfloat16 showed it).
    f = w_merged.double().norm(dim=1) / (original_weight.double() + lw.double()).norm(dim=1)
    f = float(f.nan_to_num(1.0).max()) if dora else 0.0
    b = base.bias.detach().double().abs() if bias else torch.zeros(out_f, dtype=torch.float64)
    base_mag = base_out.double().abs() if dora else torch.zeros_like(b)
    bound = bound + 8 * eps * (1 + f) * (unmerged.detach().double().abs() + b + base_mag)
    diff = (merged.detach().double() - unmerged.detach().double()).reshape(-1, out_f).abs()
    assert (diff <= bound).all(), float((diff - bound).max())
    layer.unmerge_()
    assert layer.base_layer is base and torch.equal(base.weight, original_weight)
    assert layer.merged_adapters == []
    assert torch.equal(layer(x), unmerged)
    if dropout:  # dropout reaches the adapter only: with B = 0 the output is the base's
        layer.train()
        with torch.no_grad():
            layer.lora_B["a"].zero_()
        if not dora:
            assert torch.equal(layer(x), base(x))


def test_dropout_is_active_only_in_training() -> None:
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(32, 16), "a", LoraConfig(r=4, dropout=0.5))
    randomize(layer)
    x = torch.randn(64, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@given(
    out_f=st.integers(1, 40),
    in_mult=st.sampled_from([1, 2, 3]),
    rows=st.sampled_from([1, 7, 70]),  # the fused kernel, and the dequantize path past 64 rows
    r=st.integers(1, 6),
    bits=st.sampled_from([4, 8]),
    group=st.sampled_from([32, None]),
    dora=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_qlora_merge_requantizes_within_the_rounding_bound(
    out_f: int, in_mult: int, rows: int, r: int, bits: int, group: int | None, dora: bool,
    seed: int,
) -> None:  # fmt: skip
    torch.manual_seed(seed)
    in_f = 32 * in_mult
    base = QuantLinear.from_float(nn.Linear(in_f, out_f), bits=bits, group_size=group)
    base.route = "float"  # the float32 kernel: differences below are the merge's alone
    layer = LoraLinear(base, "a", LoraConfig(r=r, alpha=r, use_dora=dora)).eval()
    randomize(layer, scale=0.3, seed=seed)
    x = torch.randn(rows, in_f)
    unmerged = layer(x)
    old = base.dequantize()
    merged_float = old + layer.delta_weight("a")
    eps = DTYPES[torch.float32]
    # requantize=None: a float32 nn.Linear holding W + delta
    assert layer.merge_(requantize=None) is None
    assert type(layer.base_layer) is nn.Linear
    assert torch.equal(layer.base_layer.weight, merged_float)
    bound = float_bound(x, [old, merged_float, merged_float - old], eps, in_f)
    assert ((layer(x).double() - unmerged.double()).abs() <= bound).all()
    layer.unmerge_()
    assert layer.base_layer is base
    # requantize="rtn": the same bits and group size, every weight within half a step
    err = layer.merge_(requantize="rtn")
    new = layer.base_layer
    assert isinstance(new, QuantLinear) and (new.bits, new.group_size) == (bits, base.group_size)
    assert err is not None and 0 <= err.weight_error < 0.2 and err.delta_error >= 0
    step = new.scales.repeat_interleave(new.group_size, dim=1)
    assert ((new.dequantize() - merged_float).abs() <= step / 2 * (1 + 1e-5) + 1e-6).all()
    half_step = (x.double().abs() @ (step.double() / 2).T) * (1 + 1e-5)
    bound = bound + half_step
    assert ((layer(x).double() - unmerged.double()).abs() <= bound).all()
    layer.unmerge_()
    assert layer.base_layer is base
    assert torch.equal(layer(x), unmerged)


@pytest.mark.parametrize("rows", [5, 100])
def test_qlora_gradients_match_a_float_base_with_the_dequantized_weight(rows: int) -> None:
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(64, 48), bits=4, group_size=32)
    q.route = "float"
    ref_base = nn.Linear(64, 48)
    with torch.no_grad():
        ref_base.weight.copy_(q.dequantize())
        ref_base.bias.copy_(q.bias)
    ref_base.requires_grad_(False)
    cfg = LoraConfig(r=4, alpha=8)
    layers = [LoraLinear(q, "a", cfg), LoraLinear(ref_base, "a", cfg)]
    randomize(layers[0])
    layers[1].load_state_dict(layers[0].state_dict(), strict=False)
    with torch.no_grad():
        for d in ("lora_A", "lora_B"):
            getattr(layers[1], d)["a"].copy_(getattr(layers[0], d)["a"])
    grads = []
    x0 = torch.randn(rows, 64)
    for layer in layers:
        x = x0.clone().requires_grad_(True)
        (layer(x) ** 2).sum().backward()
        grads.append([x.grad, layer.lora_A["a"].grad, layer.lora_B["a"].grad])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert q.qweight.grad is None


def test_input_transformed_base_weight_and_merge() -> None:
    torch.manual_seed(0)
    inner = QuantLinear.from_float(nn.Linear(64, 16), bits=4, group_size=32)
    perm = torch.randperm(64)
    base = InputTransformedLinear(inner, perm=perm, pre_scale=torch.rand(64) + 0.5)
    base.inner.route = "float"
    x = torch.randn(3, 64)
    w = base_weight(base)
    torch.testing.assert_close(base(x), x @ w.T + inner.bias, rtol=1e-5, atol=1e-5)
    layer = LoraLinear(base, "a", LoraConfig(r=2)).eval()
    randomize(layer)
    y = layer(x)
    err = layer.merge_()
    assert isinstance(layer.base_layer, QuantLinear) and err is not None
    layer.unmerge_()
    assert layer.base_layer is base and torch.equal(layer(x), y)


def test_pissa_keeps_the_output_and_refuses_quantized_bases() -> None:
    torch.manual_seed(0)
    base = nn.Linear(32, 24)
    w0 = base.weight.detach().clone()
    x = torch.randn(4, 32)
    y0 = base(x)
    layer = LoraLinear(base, "a", LoraConfig(r=4, alpha=8, init="pissa"))
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    u, s, vh = torch.linalg.svd(w0)
    top = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close(w0 - base.weight.detach(), top, rtol=1e-4, atol=1e-5)
    q = QuantLinear.from_float(nn.Linear(32, 24), bits=4, group_size=32)
    with pytest.raises(ValueError, match="PiSSA needs a float base"):
        LoraLinear(q, "a", LoraConfig(init="pissa"))
    with pytest.raises(ValueError, match="r <= min"):
        LoraLinear(nn.Linear(4, 3), "a", LoraConfig(r=4, init="pissa"))


def test_layer_errors() -> None:
    with pytest.raises(TypeError, match="base_layer must be"):
        LoraLinear(nn.Conv1d(2, 2, 1))  # type: ignore[arg-type]
    layer = LoraLinear(nn.Linear(8, 8), "a", LoraConfig(r=2))
    with pytest.raises(ValueError, match="already exists"):
        layer.add_adapter("a", LoraConfig(r=2))
    with pytest.raises(ValueError, match="without dots"):
        layer.add_adapter("a.b", LoraConfig(r=2))
    with pytest.raises(ValueError, match="no adapter"):
        layer.delta_weight("b")
    with pytest.raises(ValueError, match="requantize"):
        layer.merge_(requantize="gptq")
    layer.merge_()
    with pytest.raises(ValueError, match="unmerge_"):
        layer.add_adapter("b", LoraConfig(r=2))
    with pytest.raises(AttributeError, match="weight"):
        _ = LoraLinear(QuantLinear(32, 8, group_size=32)).weight


# ------------------------------------------------------------------------- model verbs


def test_apply_lora_wraps_targets_freezes_the_rest_and_counts() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 16))
    y0 = model(ids).logits
    apply_lora(model, LoraConfig(r=4, target_modules=LINEARS))
    names = [n for n, _ in lora_layers(model)]
    assert len(names) == 2 * 7 and "layers.1.mlp.down_proj" in names
    torch.testing.assert_close(model(ids).logits, y0)  # B = 0: the base model's output
    h, i = TINY.hidden_size, TINY.intermediate_size
    kv = TINY.num_kv_heads * TINY.head_dim
    per_layer = 4 * ((h + h) + (h + kv) * 2 + (h + h) + 2 * (h + i) + (i + h))
    trainable, total = parameter_counts(model)
    assert trainable == 2 * per_layer
    assert total == sum(p.numel() for p in model.parameters())
    assert {id(p) for p in trainable_parameters(model)} == {
        id(p) for _, lay in lora_layers(model) for p in (*lay.lora_A.values(), *lay.lora_B.values())
    }
    with pytest.raises(ValueError, match="already has an adapter"):
        apply_lora(model, LoraConfig(r=4), "default")
    with pytest.raises(ValueError, match="no linear module matches"):
        apply_lora(model, LoraConfig(target_modules=("nope",)), "other")


def test_all_linear_skips_the_output_head_and_globs_work() -> None:
    model = tiny_llama(tie_embeddings=False)
    apply_lora(model, LoraConfig(target_modules="all-linear", exclude_modules=("layers.0.*",)))
    names = [n for n, _ in lora_layers(model)]
    assert len(names) == 7 and all(n.startswith("layers.1.") for n in names)
    assert isinstance(model.lm_head, nn.Linear)
    gpt = GPT(GPTConfig(num_layers=2, hidden_size=32))
    apply_lora(gpt, LoraConfig(target_modules=("blocks.*.attn.qkv", "fc")))
    assert [n for n, _ in lora_layers(gpt)] == [
        "blocks.0.attn.qkv", "blocks.0.mlp.fc", "blocks.1.attn.qkv", "blocks.1.mlp.fc",
    ]  # fmt: skip


def test_named_adapters_set_disable_delete() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 12))
    base_out = model(ids).logits
    apply_lora(model, LoraConfig(r=2, target_modules=("q_proj", "v_proj")), "a")
    randomize(model, seed=1)
    out_a = model(ids).logits
    apply_lora(model, LoraConfig(r=3, target_modules=("v_proj", "down_proj")), "b")
    randomize(model, seed=2)  # changes a's A too: recompute below
    layer = model.get_submodule("layers.0.self_attn.v_proj")
    assert layer.adapters == ["a", "b"] and layer.active_adapters == ["b"]
    assert not any(p.requires_grad for p in (layer.lora_A["a"], layer.lora_B["a"]))
    set_adapter(model, "a")
    out_a = model(ids).logits
    assert all(p.requires_grad for p in (layer.lora_A["a"], layer.lora_B["a"]))
    assert not layer.lora_A["b"].requires_grad
    set_adapter(model, "b")
    out_b = model(ids).logits
    set_adapter(model, ["a", "b"])
    out_ab = model(ids).logits
    assert not torch.allclose(out_ab, out_a) and not torch.allclose(out_ab, out_b)
    # The adapters add up: (ab - base) vs (a - base) + (b - base) at the level of one layer.
    x = torch.randn(3, 64)
    y_ab = layer(x)
    with disable_adapters(model):
        y0 = layer(x)
        torch.testing.assert_close(model(ids).logits, base_out)
    set_adapter(model, "a")
    y_a = layer(x)
    set_adapter(model, "b")
    y_b = layer(x)
    torch.testing.assert_close(y_ab - y0, (y_a - y0) + (y_b - y0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no adapters"):
        set_adapter(model, "c")
    delete_adapter(model, "b")
    assert isinstance(model.layers[0].mlp.down_proj, nn.Linear)  # b was its only adapter
    assert model.get_submodule("layers.0.self_attn.v_proj").adapters == ["a"]


def test_merge_lora_and_disable_on_merged_model() -> None:
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 12))
    base_out = model(ids).logits
    apply_lora(model, LoraConfig(r=4, target_modules=LINEARS, use_dora=True))
    randomize(model)
    out = model(ids).logits
    assert merge_lora(model) == {}
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-4, atol=1e-4)
    with disable_adapters(model):
        torch.testing.assert_close(model(ids).logits, base_out)
    with pytest.raises(ValueError, match="merged"):
        apply_lora(model, LoraConfig(r=2), "other")
    unmerge_lora(model)
    assert torch.equal(model(ids).logits, out)


def test_merge_and_unload_float_int4_rtn_and_gptq() -> None:
    ids = torch.randint(0, 64, (2, 16))
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, target_modules=LINEARS))
    randomize(model, scale=0.05)
    out = model(ids).logits
    assert merge_and_unload(model) == {}
    assert not lora_layers(model) and isinstance(model.layers[0].self_attn.q_proj, nn.Linear)
    torch.testing.assert_close(model(ids).logits, out, rtol=1e-4, atol=1e-4)

    calibration = [torch.randint(0, 64, (2, 32)) for _ in range(2)]
    for method in ("rtn", "gptq"):
        qmodel = quantize_(tiny_llama(), Int4WeightOnly(group_size=32))
        apply_lora(qmodel, LoraConfig(r=4, target_modules=LINEARS))
        randomize(qmodel, scale=0.05)
        out = qmodel(ids).logits
        errors = merge_and_unload(
            qmodel, requantize=method, calibration=calibration if method == "gptq" else None
        )
        assert sorted(errors) == sorted(n for n, m in qmodel.named_modules() if n.endswith(LINEARS))
        assert all(0 < e.weight_error < 0.3 and 0 < e.delta_error < 2 for e in errors.values())
        q_proj = qmodel.layers[0].self_attn.q_proj
        assert isinstance(q_proj, (QuantLinear, InputTransformedLinear))
        with torch.no_grad():
            rel = float((qmodel(ids).logits - out).norm() / out.norm())
        assert rel < 0.2, (method, rel)
    with pytest.raises(ValueError, match="calibration"):
        merge_and_unload(tiny_llama(), requantize="gptq")


def test_quantize_after_apply_lora_touches_the_bases_only() -> None:
    """QPiSSA: PiSSA on the float model, then INT4 residual bases under the float adapters."""
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 16))
    ref = model(ids).logits
    plain = quantize_(copy.deepcopy(model), Int4WeightOnly(group_size=32))
    apply_lora(model, LoraConfig(r=8, alpha=8, target_modules=LINEARS, init="pissa"))
    quantize_(model, Int4WeightOnly(group_size=32))
    layer = model.get_submodule("layers.0.mlp.up_proj")
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, QuantLinear)
    assert layer.lora_A["default"].dtype == torch.float32 and layer.lora_A["default"].requires_grad
    # The residual quantizes with less error than the whole weight (PiSSA's claim).
    err_qpissa = float((model(ids).logits - ref).norm())
    err_plain = float((plain(ids).logits - ref).norm())
    assert err_qpissa < err_plain


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("quantized", [False, True], ids=["lora", "qlora"])
def test_trainer_trains_only_the_adapters(quantized: bool) -> None:
    model = tiny_llama()
    if quantized:
        quantize_(model, Int4WeightOnly(group_size=32))
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=LINEARS, dropout=0.05))
    torch.manual_seed(0)
    tokens = torch.arange(64).repeat(64)  # a learnable cycle
    cfg = TrainConfig(steps=25, batch_size=4, seq_len=32, lr=1e-2, progress=False, warmup_steps=2)
    result = Trainer(model, tokens, config=cfg, params=trainable_parameters(model)).fit()
    assert result.losses[-1] < 0.8 * result.losses[0]
    after = model.state_dict()
    for k, v in frozen.items():
        parts = k.split(".")
        key = ".".join([*parts[:-1], "base_layer", parts[-1]]) if k not in after else k
        assert torch.equal(after[key], v), k


# ------------------------------------------------------------------------ adapter files


def test_save_load_round_trip_on_gpt(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = GPTConfig(num_layers=2, hidden_size=32, attn_impl="sdpa")
    model = GPT(config).eval()
    ref_state = copy.deepcopy(model.state_dict())
    apply_lora(model, LoraConfig(r=4, alpha=6, target_modules=("qkv", "proj"), rslora=True))
    randomize(model)
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids).logits
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["proj", "qkv"] and cfg["use_rslora"] is True
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert "base_model.model.blocks.0.attn.qkv.lora_A.weight" in keys
    fresh = GPT(config).eval()
    fresh.load_state_dict(ref_state)
    loaded = load_adapter(fresh, tmp_path / "ad")
    assert (loaded.r, loaded.alpha, loaded.rslora) == (4, 6.0, True)
    assert torch.equal(fresh(ids).logits, out)
    assert not trainable_parameters(fresh)  # loaded for inference unless trainable=True


def test_save_writes_rank_and_alpha_patterns_and_regex_targets(tmp_path: Path) -> None:
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=4, alpha=8, target_modules=("layers.0.self_attn.q_proj",)))
    attn = model.layers[1].self_attn
    attn.v_proj = LoraLinear(attn.v_proj, "default", LoraConfig(r=2, alpha=3))
    randomize(model)
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"model.layers.1.self_attn.v_proj": 2}
    assert cfg["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 3}
    want = r"(model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.self_attn\.v_proj)"
    assert cfg["target_modules"] == want
    other = tiny_llama()
    load_adapter(other, tmp_path)
    assert [n for n, _ in lora_layers(other)] == [n for n, _ in lora_layers(model)]
    got = other.get_submodule("layers.1.self_attn.v_proj")
    assert got.lora_A["default"].shape == (2, 64) and got.scaling["default"] == 1.5
    ids = torch.randint(0, 64, (1, 8))
    assert torch.equal(other(ids).logits, model(ids).logits)


def _write_adapter(tmp_path: Path) -> tuple[dict, dict]:
    model = tiny_llama()
    apply_lora(model, LoraConfig(r=2, target_modules=("q_proj",)))
    save_adapter(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    return cfg, load_file(tmp_path / "adapter_model.safetensors")


KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c, t: c.update(peft_type="IA3"), "peft_type"),
        (lambda c, t: c.update(bias="all"), "bias"),
        (lambda c, t: c.update(r=0), "r must be"),
        (lambda c, t: c.update(r=3), "rank 2 in the tensors, 3"),
        (lambda c, t: c.update(init_lora_weights="olora"), "init_lora_weights"),
        (lambda c, t: c.update(modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda c, t: c.update(use_dora=True), "expected"),
        (lambda c, t: t.update({KEY + ".lora_A.weight": torch.zeros(2, 63)}), "lora_A must be"),
        (lambda c, t: t.update({KEY + ".lora_B.weight": torch.full((64, 2), math.nan)}), "NaN"),
        (lambda c, t: t.pop(KEY + ".lora_B.weight"), "expected"),
        (lambda c, t: t.update({"base_model.model.model.nope.lora_A.weight": torch.zeros(2, 64)}),
         "not in the model"),
        (lambda c, t: t.update({"model.x.weight": torch.zeros(2)}), "does not start"),
        (lambda c, t: t.update({KEY + ".lora_C.weight": torch.zeros(2)}), "not a LoRA"),
        (lambda c, t: t.update({KEY + ".lora_A.weight": torch.zeros(2, 64, dtype=torch.int32)}),
         "floating point"),
    ],
)  # fmt: skip
def test_malformed_adapters_raise_and_leave_the_model_alone(
    tmp_path: Path, mutate: object, message: str
) -> None:
    cfg, tensors = _write_adapter(tmp_path)
    mutate(cfg, tensors)  # type: ignore[operator]
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        load_adapter(model, tmp_path)
    assert not lora_layers(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_unreadable_adapter_files(tmp_path: Path) -> None:
    _write_adapter(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_adapter(tiny_llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="JSON"):
        load_adapter(tiny_llama(), tmp_path)


# ---------------------------------------------------------------------------- the CLI


def _cli(argv: list[str]) -> int:
    from slimforge.cli import main

    return main(argv)


def test_cli_fine_tunes_a_gpt_run_saves_merges_and_quantizes(tmp_path: Path) -> None:
    from slimforge.cli import main

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "ab" * 200 + str(i)}) + "\n" for i in range(40)))
    assert main(["prepare", str(docs), "-o", str(tmp_path / "data"), "-q"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(run), "--layers", "1",
                 "--hidden", "32", "--heads", "2", "--steps", "2", "--batch", "2",
                 "--seq-len", "32", "--attn", "sdpa", "-q"]) == 0  # fmt: skip
    text = tmp_path / "user.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    out = tmp_path / "lora"
    rc = _cli(["lora", "--model", str(run), "--text", str(text), "--out", str(out), "--steps",
               "3", "--batch", "2", "--seq-len", "32", "--r", "4", "--targets", "qkv,proj",
               "--int4", "--group-size", "32", "--merge", "gptq", "-q"])  # fmt: skip
    assert rc == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "merged" / "quant_config.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainable"] < summary["total"] and summary["merge"]["method"] == "gptq"
    assert summary["merge"]["layers"] and summary["eval_after"]["perplexity"] > 0


def test_cli_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "t.txt"
    text.write_text("x" * 1000)
    out = str(tmp_path / "o")
    assert _cli(["lora", "--model", str(tmp_path / "nope"), "--text", str(text), "--out", out]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
    rc = _cli(["lora", "--model", "smollm2", "--text", str(text), "--out", out,
               "--val-fraction", "0.7"])  # fmt: skip
    assert rc == 2 and "--val-fraction" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(["lora", "--model", "smollm2", "--text", str(text), "--out", out, "--int4", "--int8"])
