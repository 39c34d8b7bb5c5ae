"""The public quantization verbs on the real pretrained model (SmolLM2-135M from its GGUF,
cut to its first blocks to keep the run short): ``quantize_`` with INT8 (embedding table and
tied head included), INT4, GPTQ and AWQ from calibration windows, ``prepare_qat`` +
``convert``, as a user calls them."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimforge.data.windows import chunk_windows
from slimforge.eval import evaluate_lm
from slimforge.models import ByteLevelBPETokenizer, LlamaForCausalLM
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
    prepare_qat,
    quantize_,
)
from slimforge.train import TrainConfig, Trainer, distillation_loss

pytestmark = pytest.mark.assets
LAYERS = 3
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def smol(smollm2_gguf_path: Path) -> tuple[LlamaForCausalLM, torch.Tensor, torch.Tensor]:
    """(model with the first LAYERS blocks, evaluation ids, calibration ids)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_gguf(smollm2_gguf_path, num_layers=LAYERS)
    tok = ByteLevelBPETokenizer.from_gguf(smollm2_gguf_path)
    licences = Path("/usr/share/common-licenses")
    eval_ids = torch.tensor(tok.encode((licences / "Apache-2.0").read_text())[:512])
    calib_ids = torch.tensor(tok.encode((licences / "GPL-3").read_text())[:1024])
    return model, eval_ids, calib_ids


def _quantized(layer: nn.Module) -> bool:
    inner = layer.inner if isinstance(layer, InputTransformedLinear) else layer
    return isinstance(inner, QuantLinear)


def _logit_mse(model: nn.Module, ref: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return F.mse_loss(model(ids[None]).logits, ref(ids[None]).logits).item()


def test_int8_with_the_embedding_table_and_tied_head(smol) -> None:
    model, eval_ids, _ = smol
    windows = chunk_windows(eval_ids, 256)
    base = evaluate_lm(model, windows).perplexity
    q = quantize_(copy.deepcopy(model), Int8WeightOnly())
    assert isinstance(q.embed_tokens, QuantEmbedding)  # the tied head runs on the INT8 table
    assert all(_quantized(q.layers[i].get_submodule(p)) for i in range(LAYERS) for p in (
        "self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"))  # fmt: skip
    ppl = evaluate_lm(q, windows).perplexity
    assert abs(ppl / base - 1) < 0.02, (ppl, base)


def test_gptq_and_awq_beat_int4_rtn(smol) -> None:
    model, eval_ids, calib_ids = smol
    calib = chunk_windows(calib_ids, 256)  # four 256-token windows, each run as model(window)
    calib = [w[None] for w in calib]
    ids = eval_ids[:256]
    rtn = quantize_(copy.deepcopy(model), Int4WeightOnly(group_size=64))
    assert type(rtn.embed_tokens) is nn.Embedding  # INT4 leaves the table alone
    rtn_err = _logit_mse(rtn, model, ids)
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_(copy.deepcopy(model), GPTQ(group_size=64))
    gptq = quantize_(copy.deepcopy(model), GPTQ(group_size=64), calibration=calib, progress=False)
    awq = quantize_(copy.deepcopy(model), AWQ(group_size=64), calibration=calib, progress=False)
    for q in (gptq, awq):
        assert all(
            _quantized(q.layers[i].get_submodule(f"{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}"))
            for i in range(LAYERS)
            for n in LINEARS
        )
        assert type(q.embed_tokens) is nn.Embedding
    # AWQ folded its q/k/v and gate/up scales into the two RMSNorms (the spec names them).
    assert not torch.equal(
        awq.layers[0].input_layernorm.weight, model.layers[0].input_layernorm.weight
    )
    gptq_err, awq_err = _logit_mse(gptq, model, ids), _logit_mse(awq, model, ids)
    assert gptq_err < rtn_err and awq_err < rtn_err, (gptq_err, awq_err, rtn_err)


def test_qat_prepare_train_convert(smol) -> None:
    model, eval_ids, calib_ids = smol
    student = prepare_qat(copy.deepcopy(model), QATConfig(bits=4, group_size=64))
    assert sum(isinstance(m, FakeQuantLinear) for m in student.modules()) == LAYERS * 7
    student.embed_tokens.weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=128, lr=1e-5, weight_decay=0.0,
                      warmup_steps=0, progress=False)  # fmt: skip
    res = Trainer(
        student, calib_ids, None, cfg, loss_fn=distillation_loss(model), params=params
    ).fit()
    assert all(torch.isfinite(torch.tensor(res.losses)))
    student.eval()
    with torch.no_grad():
        fake = student(eval_ids[:128][None]).logits
    convert(student)
    assert not any(isinstance(m, FakeQuantLinear) for m in student.modules())
    with torch.no_grad():
        torch.testing.assert_close(student(eval_ids[:128][None]).logits, fake, atol=2e-3, rtol=1e-3)
