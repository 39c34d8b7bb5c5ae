"""The public quantization verbs end to end on the library's own GPT: ``quantize_`` with
INT8, INT4, GPTQ and AWQ (calibration batches in, embeddings included where the config takes
them), ``prepare_qat`` + ``convert``, save and load."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimforge.models import GPT, GPTConfig
from slimforge.nn import module_filter
from slimforge.quant import (
    AWQ,
    GPTQ,
    FakeQuantLinear,
    InputTransformedLinear,
    Int4WeightOnly,
    Int8WeightOnly,
    QATConfig,
    QuantEmbedding,
    QuantLinear,
    convert,
    load_quantized,
    prepare_qat,
    quantize_,
    save_quantized,
)
from slimforge.quant.awq import quantize_awq

CONFIG = GPTConfig(vocab_size=256, max_seq_len=32, num_layers=2, num_heads=2, hidden_size=64)
BLOCK_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")


def tiny_gpt(**kw) -> GPT:
    """A random GPT with a few salient residual channels (what makes RTN lose accuracy)."""
    torch.manual_seed(0)
    model = GPT(CONFIG.replace(**kw)).eval()
    with torch.no_grad():
        for blk in model.blocks:
            for norm in (blk.norm1, blk.norm2):
                norm.weight[:4] = 10.0
    return model


def tokens(seed: int, batch: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, CONFIG.vocab_size, (batch, CONFIG.max_seq_len), generator=g)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def logit_mse(model: nn.Module, ref: torch.Tensor, x: torch.Tensor) -> float:
    return F.mse_loss(logits(model, x), ref).item()


def assert_blocks_quantized(model: GPT) -> None:
    for i in range(CONFIG.num_layers):
        for name in BLOCK_LINEARS:
            mod = model.get_submodule(f"blocks.{i}.{name}")
            inner = mod.inner if isinstance(mod, InputTransformedLinear) else mod
            assert isinstance(inner, QuantLinear), (i, name, type(mod).__name__)


def test_rtn_int8_with_embeddings_and_int4_on_gpt() -> None:
    model = tiny_gpt()
    x = tokens(1)
    ref = logits(model, x)
    int8 = quantize_(copy.deepcopy(model), Int8WeightOnly())
    assert_blocks_quantized(int8)
    # INT8 takes the embedding tables too; the tied head then runs on the quantized table.
    assert isinstance(int8.tok_emb, QuantEmbedding) and isinstance(int8.pos_emb, QuantEmbedding)
    int4 = quantize_(copy.deepcopy(model), Int4WeightOnly(group_size=32))
    assert_blocks_quantized(int4)
    assert type(int4.tok_emb) is nn.Embedding  # INT4 leaves tables alone
    errs = {"int8": logit_mse(int8, ref, x), "int4": logit_mse(int4, ref, x)}
    assert 0 < errs["int8"] < errs["int4"], errs
    # A name filter narrows the selection.
    only_mlp = quantize_(
        copy.deepcopy(model), Int8WeightOnly(), filter_fn=module_filter(include="*.mlp.*")
    )
    assert isinstance(only_mlp.blocks[0].mlp.fc, QuantLinear)
    assert type(only_mlp.blocks[0].attn.qkv) is nn.Linear and type(only_mlp.tok_emb) is nn.Embedding


def test_gptq_and_awq_through_quantize_beat_rtn() -> None:
    model = tiny_gpt()
    calib = [tokens(10 + i) for i in range(4)]
    x = tokens(1)
    ref = logits(model, x)
    rtn = logit_mse(quantize_(copy.deepcopy(model), Int4WeightOnly(group_size=32)), ref, x)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_(copy.deepcopy(model), GPTQ(group_size=32))
    with pytest.raises(ValueError, match="takes no calibration"):
        quantize_(copy.deepcopy(model), Int8WeightOnly(), calibration=calib)
    with pytest.raises(TypeError, match="filter_fn"):
        quantize_(copy.deepcopy(model), Int8WeightOnly(), lambda m, n: True)

    gptq = quantize_(copy.deepcopy(model), GPTQ(group_size=32), calibration=calib, progress=False)
    assert_blocks_quantized(gptq)
    assert type(gptq.tok_emb) is nn.Embedding  # GPTQ takes linears only: the tables stay
    gptq_err = logit_mse(gptq, ref, x)

    awq = copy.deepcopy(model)
    norm_before = awq.blocks[0].norm1.weight.detach().clone()
    quantize_(awq, AWQ(group_size=32), calibration=calib, progress=False)
    assert_blocks_quantized(awq)
    blk = awq.blocks[0]
    # qkv and fc read an RMSNorm output (the spec says which): AWQ's scale is folded into the
    # norm weight; the projections read the attention / GELU output, so they keep a pre_scale.
    assert isinstance(blk.attn.qkv, QuantLinear) and isinstance(blk.mlp.fc, QuantLinear)
    assert not torch.equal(blk.norm1.weight.detach(), norm_before)
    assert isinstance(blk.attn.proj, InputTransformedLinear)
    assert blk.attn.proj.pre_scale is not None
    awq_err = logit_mse(awq, ref, x)
    assert gptq_err < rtn and awq_err < rtn, (gptq_err, awq_err, rtn)


def test_gptq_on_a_moe_gpt_leaves_the_experts_and_quantizes_attention() -> None:
    model = tiny_gpt(mlp="moe", num_experts=4, top_k=2)
    calib = [tokens(30 + i) for i in range(2)]
    quantize_(model, GPTQ(group_size=32), calibration=calib, progress=False)
    for blk in model.blocks:
        assert isinstance(blk.attn.proj, QuantLinear | InputTransformedLinear)
        assert type(blk.mlp.router) is nn.Linear  # the spec keeps routers in float
    assert torch.isfinite(logits(model, tokens(1))).all()


def test_gptq_gpt_save_load_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_gpt()
    quantize_(model, GPTQ(group_size=32), calibration=[tokens(3)], progress=False)
    quantize_(model, Int8WeightOnly(), filter_fn=module_filter(types=nn.Embedding))
    x = tokens(1)
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(lambda: GPT(CONFIG).eval(), tmp_path / "ckpt")
    assert_blocks_quantized(loaded)
    assert isinstance(loaded.tok_emb, QuantEmbedding)
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_qat_on_gpt_trains_and_converts_to_the_same_function() -> None:
    teacher = tiny_gpt()
    student = prepare_qat(copy.deepcopy(teacher), QATConfig(bits=4, group_size=32))
    fq = [m for m in student.modules() if isinstance(m, FakeQuantLinear)]
    assert len(fq) == CONFIG.num_layers * len(BLOCK_LINEARS)
    same_verb = quantize_(copy.deepcopy(teacher), QATConfig(bits=4, group_size=32))
    assert sum(isinstance(m, FakeQuantLinear) for m in same_verb.modules()) == len(fq)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    x = tokens(5)
    before = [m.weight.detach().clone() for m in fq]
    student.train()
    for _ in range(3):
        t_logp = F.log_softmax(logits(teacher, x), -1)
        s_logp = F.log_softmax(student(x).logits, -1)
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
    model = tiny_gpt(num_heads=4, num_kv_heads=2)  # GQA: q 64 rows, k and v 32 each
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
    qk = 64 + 32
    qkv_clip, qkv_plain = runs[True][names[0]], runs[False][names[0]]
    assert torch.equal(qkv_clip.input_scale, qkv_plain.input_scale)
    assert torch.equal(qkv_clip.q[:qk], qkv_plain.q[:qk])
    assert not torch.equal(qkv_clip.q[qk:], qkv_plain.q[qk:])
    assert not torch.equal(runs[True][names[1]].q, runs[False][names[1]].q)
