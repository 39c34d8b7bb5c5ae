"""RTN, GPTQ, AWQ and QAT end to end on the library's own GPT (`slimforge.models.GPT`)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.models import GPT, GPTConfig
from slimforge.quant import (
    Int4WeightOnly,
    Int8WeightOnly,
    QuantLinear,
    load_quantized,
    quantize_,
    save_quantized,
)
from slimforge.quant.awq import AWQ, quantize_awq
from slimforge.quant.calibrate import InputTransformedLinear
from slimforge.quant.gptq import GPTQ, quantize_gptq
from slimforge.quant.qat import FakeQuantLinear, QATConfig, convert, prepare_qat

CONFIG = GPTConfig(vocab_size=256, block_size=32, n_layer=2, n_head=2, n_embd=64)
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def block_linears(mod: nn.Module, name: str) -> bool:
    return isinstance(mod, nn.Linear) and name.startswith("blocks.")


def tiny_gpt() -> GPT:
    """A random GPT with a few salient residual channels (what makes RTN lose accuracy)."""
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    with torch.no_grad():
        for blk in model.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.weight[:4] = 10.0
    return model


def tokens(seed: int, batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (batch, CONFIG.block_size), generator=g)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, x)[0]


def logit_mse(model: nn.Module, ref: torch.Tensor, x: torch.Tensor) -> float:
    return F.mse_loss(logits(model, x), ref).item()


def assert_blocks_quantized(model: GPT) -> None:
    for i in range(CONFIG.n_layer):
        for name in BLOCK_LINEARS:
            mod = model.get_submodule(f"blocks.{i}.{name}")
            inner = mod.inner if isinstance(mod, InputTransformedLinear) else mod
            assert isinstance(inner, QuantLinear), (i, name, type(mod).__name__)
    # The tied LM head is outside the blocks: untouched and still tied.
    assert type(model.lm_head) is nn.Linear
    assert model.lm_head.weight is model.tok_emb.weight


def test_rtn_int8_and_int4_on_gpt() -> None:
    model = tiny_gpt()
    x = tokens(1)
    ref = logits(model, x)
    errs = {}
    for name, cfg in (("int8", Int8WeightOnly()), ("int4", Int4WeightOnly(group_size=32))):
        m = quantize_(copy.deepcopy(model), cfg, block_linears)
        assert_blocks_quantized(m)
        errs[name] = logit_mse(m, ref, x)
    assert 0 < errs["int8"] < errs["int4"], errs


def test_gptq_and_awq_on_gpt_beat_rtn() -> None:
    model = tiny_gpt()
    calib = [tokens(10 + i) for i in range(4)]
    x = tokens(1)
    ref = logits(model, x)
    rtn = logit_mse(quantize_(copy.deepcopy(model), Int4WeightOnly(32), block_linears), ref, x)

    gptq = copy.deepcopy(model)
    res = quantize_gptq(gptq, GPTQ(group_size=32), calib, block_linears, progress=False)
    assert sorted(res) == sorted(f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS)
    assert_blocks_quantized(gptq)
    gptq_err = logit_mse(gptq, ref, x)

    awq = copy.deepcopy(model)
    norm_before = awq.blocks[0].norm1.weight.detach().clone()
    quantize_awq(awq, AWQ(group_size=32), calib, block_linears, progress=False)
    assert_blocks_quantized(awq)
    blk = awq.blocks[0]
    # qkv and fc read an RMSNorm output: AWQ's scale is folded into the norm weight; the
    # projections read the attention output / GELU output, so they keep a pre_scale.
    assert isinstance(blk.attn.qkv, QuantLinear) and isinstance(blk.mlp.fc, QuantLinear)
    assert not torch.equal(blk.norm1.weight.detach(), norm_before)
    assert isinstance(blk.attn.proj, InputTransformedLinear)
    assert blk.attn.proj.pre_scale is not None
    awq_err = logit_mse(awq, ref, x)
    assert gptq_err < rtn and awq_err < rtn, (gptq_err, awq_err, rtn)


def test_gptq_gpt_save_load_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_gpt()
    quantize_gptq(model, GPTQ(group_size=32), [tokens(3)], block_linears, progress=False)
    x = tokens(1)
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(lambda: GPT(CONFIG).eval(), tmp_path / "ckpt")
    assert_blocks_quantized(loaded)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_qat_on_gpt_trains_and_converts_to_the_same_function() -> None:
    teacher = tiny_gpt()
    student = prepare_qat(copy.deepcopy(teacher), QATConfig(4, 32), filter_fn=block_linears)
    fq = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
    assert len(fq) == CONFIG.n_layer * len(BLOCK_LINEARS)
    assert type(student.lm_head) is nn.Linear
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    x = tokens(5)
    before = [m.weight.detach().clone() for m in fq]
    student.train()
    for _ in range(3):
        t_logp = F.log_softmax(logits(teacher, x), -1)
        s_logp = F.log_softmax(student(x, x)[0], -1)
        loss = F.kl_div(
            s_logp.flatten(0, 1), t_logp.flatten(0, 1), log_target=True, reduction="batchmean"
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    student.eval()
    assert any(not torch.equal(m.weight, b) for m, b in zip(fq, before, strict=True))
    fake = logits(student, x)
    convert(student)
    assert_blocks_quantized(student)
    torch.testing.assert_close(logits(student, x), fake, atol=1e-4, rtol=1e-4)


def test_awq_clips_only_value_rows_of_fused_qkv() -> None:
    model = tiny_gpt()
    names = ("blocks.0.attn.qkv", "blocks.0.mlp.fc")
    calib = [tokens(20 + i) for i in range(2)]
    runs = {}
    for clip in (False, True):
        m = copy.deepcopy(model)
        runs[clip] = quantize_awq(
            m, AWQ(group_size=32, clip=clip), calib, lambda mod, n: n in names, progress=False
        )
    # Same inputs and scales; in qkv ([q; k; v] rows) the clip search may change only the value
    # rows (query/key errors are amplified by the softmax); fc is clipped throughout.
    c = model.config.n_embd
    qkv_clip, qkv_plain = runs[True][names[0]], runs[False][names[0]]
    assert torch.equal(qkv_clip.input_scale, qkv_plain.input_scale)
    assert torch.equal(qkv_clip.q[: 2 * c], qkv_plain.q[: 2 * c])
    assert not torch.equal(qkv_clip.q[2 * c :], qkv_plain.q[2 * c :])
    assert not torch.equal(runs[True][names[1]].q, runs[False][names[1]].q)
