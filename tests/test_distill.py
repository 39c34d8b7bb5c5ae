"""slimforge.distill: losses against direct formulas, feature hooks, init_student, Distiller."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from slimforge.calibration import FeatureCapture
from slimforge.distill import (
    AttentionCapture,
    DistillConfig,
    Distiller,
    TeacherTargets,
    attention_loss,
    attention_probs,
    cache_teacher_targets,
    divergence,
    hidden_loss,
    init_student,
    kd_loss,
    layer_map,
    topk_kd_loss,
)
from slimforge.eval import evaluate_lm
from slimforge.models import GPT, GPTConfig
from slimforge.train import TrainConfig


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference_kd(s, t, labels, temperature, alpha, kind, beta, mask):
    """Hinton's loss written out per position in float64 NumPy."""
    s = s.double().numpy()
    t = t.double().numpy()
    ps, pt = _softmax(s / temperature), _softmax(t / temperature)
    if kind == "forward":
        d = (pt * (np.log(pt) - np.log(ps))).sum(-1)
    elif kind == "reverse":
        d = (ps * (np.log(ps) - np.log(pt))).sum(-1)
    else:
        m = beta * pt + (1 - beta) * ps
        d = beta * (pt * np.log(pt / m)).sum(-1) + (1 - beta) * (ps * np.log(ps / m)).sum(-1)
    keep = np.ones(d.shape, bool) if mask is None else mask.numpy()
    soft = (d * keep).sum() / max(keep.sum(), 1)
    logp = np.log(_softmax(s))
    ce = -np.take_along_axis(logp, labels.numpy()[..., None], -1)[..., 0]
    hard = (ce * keep).sum() / max(keep.sum(), 1)
    return alpha * temperature**2 * soft + (1 - alpha) * hard


@given(
    shape=st.sampled_from([(3, 5), (2, 4, 7), (1, 1, 2), (2, 3, 33)]),
    temperature=st.floats(0.5, 8.0),
    alpha=st.floats(0.0, 1.0),
    kind=st.sampled_from(["forward", "reverse", "jsd"]),
    beta=st.floats(0.1, 0.9),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_kd_loss_matches_formula(shape, temperature, alpha, kind, beta, masked, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * 3
    t = torch.randn(shape, generator=g) * 3
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    mask = torch.rand(shape[:-1], generator=g) > 0.3 if masked else None
    if mask is not None and not mask.any():
        mask.view(-1)[0] = True
    got = kd_loss(
        s, t, labels, temperature=temperature, alpha=alpha, kind=kind, beta=beta, mask=mask
    )
    want = _reference_kd(s, t, labels, temperature, alpha, kind, beta, mask)
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-5)


def test_kd_loss_gradient_and_zero_at_match():
    s = torch.randn(4, 10, requires_grad=True)
    loss = kd_loss(s, s.detach().clone(), alpha=1.0, temperature=3.0)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    kd_loss(s, torch.randn(4, 10), alpha=1.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # ignore_index drops positions from the hard term.
    labels = torch.tensor([1, -100, 2, -100])
    full = kd_loss(s, s.detach(), labels, alpha=0.0)
    kept = F.cross_entropy(s[[0, 2]], labels[[0, 2]])
    assert float(full) == pytest.approx(float(kept), rel=1e-6)


def test_divergence_jsd_limits_and_symmetry():
    a = F.log_softmax(torch.randn(5, 9), -1)
    b = F.log_softmax(torch.randn(5, 9), -1)
    # beta = 0.5 is the symmetric Jensen-Shannon divergence, bounded by log 2.
    j_ab, j_ba = divergence(a, b, "jsd", 0.5), divergence(b, a, "jsd", 0.5)
    torch.testing.assert_close(j_ab, j_ba)
    assert (j_ab <= math.log(2) + 1e-6).all() and (j_ab >= 0).all()
    torch.testing.assert_close(divergence(a, b, "forward"), divergence(b, a, "reverse"))


@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 6),
    vocab=st.integers(2, 40),
    k=st.integers(1, 40),
    temperature=st.floats(0.5, 4.0),
    seed=st.integers(0, 2**16),
)
def test_topk_kd_loss_formula_and_full_k(batch, length, vocab, k, temperature, seed):
    k = min(k, vocab)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, length, vocab, generator=g)
    t = torch.randn(batch, length, vocab, generator=g)
    tv, ti = t.topk(k, -1)
    got = topk_kd_loss(s, tv, ti, temperature=temperature)
    p = F.softmax(tv / temperature, -1)
    q = F.log_softmax(s / temperature, -1).gather(-1, ti)
    want = temperature**2 * (p * (p.log() - q)).sum(-1).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-4, abs=1e-6)
    if k == vocab:  # the whole vocabulary: exactly the forward KL of kd_loss
        full = kd_loss(s, t, temperature=temperature, alpha=1.0)
        assert float(got) == pytest.approx(float(full), rel=1e-4, abs=1e-6)


@given(
    shape=st.sampled_from([(4, 8), (2, 3, 16), (1, 5, 3)]),
    kind=st.sampled_from(["mse", "cosine"]),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hidden_loss_matches_formula(shape, kind, masked, seed):
    g = torch.Generator().manual_seed(seed)
    h, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = torch.rand(shape[:-1], generator=g) > 0.4 if masked else None
    got = hidden_loss(h, t, kind, mask=mask)
    hn, tn = h.double().numpy(), t.double().numpy()
    if kind == "mse":
        per = ((hn - tn) ** 2).mean(-1)
    else:
        per = 1 - (hn * tn).sum(-1) / (np.linalg.norm(hn, axis=-1) * np.linalg.norm(tn, axis=-1))
    keep = np.ones(per.shape, bool) if mask is None else mask.numpy()
    want = (per * keep).sum() / max(keep.sum(), 1)
    assert float(got) == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_hidden_loss_projection_and_errors():
    proj = nn.Linear(4, 6, bias=False)
    h, t = torch.randn(3, 4), torch.randn(3, 6)
    torch.testing.assert_close(hidden_loss(h, t, projection=proj), F.mse_loss(proj(h), t))
    with pytest.raises(ValueError, match="projection"):
        hidden_loss(h, t)
    with pytest.raises(ValueError, match="kind"):
        hidden_loss(t, t, kind="l1")


def test_attention_probs_and_loss():
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    logp = attention_probs(q, k)
    kk = k.repeat_interleave(2, 1)
    scores = q @ kk.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(logp.exp(), scores.softmax(-1))
    assert float(attention_loss(logp, logp)) == pytest.approx(0.0, abs=1e-6)
    other = attention_probs(torch.randn(2, 4, 5, 8), k)
    p = logp.exp()
    keep = p > 0  # the formula over the allowed (past) positions only
    want = torch.where(keep, p * (logp - other), torch.zeros(())).sum(-1).mean()
    assert float(attention_loss(other, logp)) == pytest.approx(float(want), rel=1e-5)
    # Different head counts: head-averaged maps.
    assert torch.isfinite(attention_loss(other[:, :2], logp))


def _gpt(layers=4, hidden=32, heads=4, position="learned", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(
        num_layers=layers, hidden_size=hidden, num_heads=heads, position=position,
        max_seq_len=32, **kw,
    )  # fmt: skip
    return GPT(cfg)


@pytest.mark.parametrize("position", ["learned", "rope"])
@pytest.mark.parametrize("kv_heads", [None, 2])
def test_attention_capture_reproduces_the_attention_output(position, kv_heads):
    """The captured maps times the values give what the model's attention computed."""
    model = _gpt(position=position, num_kv_heads=kv_heads).eval()
    ids = torch.randint(0, 256, (2, 12))
    c = model.config
    with (
        AttentionCapture(model, 1) as cap,
        FeatureCapture(model, ["blocks.1.attn.qkv", "blocks.1.attn.proj"], what="input") as inp,
    ):
        out_qkv = FeatureCapture(model, ["blocks.1.attn.qkv"])
        model(ids)
        probs = cap.log_probs().exp()
        qkv = out_qkv["blocks.1.attn.qkv"]
        out_qkv.close()
        attn_out = inp["blocks.1.attn.proj"]
    hq, hkv, d = c.num_heads, c.kv_heads, c.head_dim
    v = qkv[..., (hq + hkv) * d :].reshape(2, 12, hkv, d).transpose(1, 2)
    v = v.repeat_interleave(hq // hkv, 1)
    got = (probs @ v).transpose(1, 2).reshape(2, 12, hq * d)
    torch.testing.assert_close(got, attn_out, rtol=1e-4, atol=1e-5)


def test_init_student_copies_the_chosen_blocks():
    teacher = _gpt(layers=6)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = init_student(teacher)
    assert student.config.num_layers == 3 and student.distilled_from == [0, 2, 4]
    for i, j in enumerate([0, 2, 4]):
        for (n1, p1), (n2, p2) in zip(
            student.blocks[i].named_parameters(), teacher.blocks[j].named_parameters(), strict=True
        ):
            assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    torch.testing.assert_close(student.tok_emb.weight, teacher.tok_emb.weight)
    for k, v in teacher.state_dict().items():  # the teacher is untouched
        assert torch.equal(v, before[k])
    assert len(teacher.blocks) == 6
    assert init_student(teacher, keep_layers=2).distilled_from == [0, 5]
    assert init_student(teacher, keep_layers=[1, 3]).distilled_from == [1, 3]
    ids = torch.randint(0, 256, (1, 5))
    assert student(ids).logits.shape == (1, 5, 256)
    assert student.generate(ids, max_new_tokens=3).shape == (1, 8)
    for bad in ([], [0, 0], [6], "half", 0, 7):
        with pytest.raises(ValueError):
            init_student(teacher, keep_layers=bad)
    with pytest.raises(ValueError, match="spec"):
        init_student(nn.Linear(2, 2))


def test_init_student_hugging_face_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    teacher = transformers.LlamaForCausalLM(cfg).eval()
    student = init_student(teacher)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    assert [b.self_attn.layer_idx for b in student.model.layers] == [0, 1]
    ids = torch.randint(0, 64, (1, 6))
    assert student(ids).logits.shape == (1, 6, 64)
    out = student.generate(ids, max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 8)


def test_layer_map():
    assert layer_map(2, 4) == [(0, 1), (1, 3)]
    assert layer_map(3, 6) == [(0, 1), (1, 3), (2, 5)]
    assert layer_map(1, 5) == [(0, 4)]
    assert layer_map(4, 4) == [(i, i) for i in range(4)]


def _kl_to_teacher(student, teacher, windows):
    with torch.no_grad():
        s = F.log_softmax(student(windows).logits, -1)
        t = F.log_softmax(teacher(windows).logits, -1)
    return float((t.exp() * (t - s)).sum(-1).mean())


def test_distiller_brings_the_student_toward_the_teacher():
    teacher = _gpt(layers=4, seed=1).eval()
    with torch.no_grad():  # a teacher with a sharp, learnable preference
        teacher.tok_emb.weight.mul_(20)
    student = _gpt(layers=2, hidden=16, heads=2, seed=2)
    data = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
    windows = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(1))
    before = _kl_to_teacher(student, teacher, windows)
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=16, lr=1e-2, progress=False)
    dcfg = DistillConfig(alpha=1.0, temperature=1.0, hidden_weight=0.5, attention_weight=0.1)
    result = Distiller(student, teacher, data, None, dcfg, cfg).fit()
    after = _kl_to_teacher(student, teacher, windows)
    assert len(result.losses) == 40 and all(math.isfinite(x) for x in result.losses)
    assert after < 0.8 * before
    # The teacher was frozen: no gradients reached it and it stayed in eval mode.
    assert all(p.grad is None for p in teacher.parameters()) and not teacher.training


def test_distiller_projections_are_trained_and_saved(tmp_path):
    teacher, student = _gpt(layers=2, hidden=32), _gpt(layers=2, hidden=16, heads=2, seed=3)
    data = torch.randint(0, 256, (2000,))
    d = Distiller(
        student, teacher, data, data[:500],
        DistillConfig(hidden_weight=1.0, hidden_kind="cosine"),
        TrainConfig(steps=3, batch_size=2, seq_len=16, progress=False, eval_windows=2),
        out_dir=tmp_path,
    )  # fmt: skip
    w0 = d.projections[0].weight.detach().clone()
    result = d.fit()
    assert not torch.equal(w0, d.projections[0].weight)
    assert result.final_eval is not None and math.isfinite(result.final_eval.nll)
    from safetensors import safe_open

    from slimforge.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "projections.0.weight" in keys and "student.tok_emb.weight" in keys


def test_cached_targets_match_the_live_teacher(tmp_path):
    teacher = _gpt(layers=2, seed=4)
    windows = torch.randint(0, 256, (6, 16))
    path = cache_teacher_targets(teacher, windows, tmp_path / "t.safetensors", k=256, batch_size=4)
    targets = TeacherTargets(path, batch_size=3)
    assert len(targets) == 2 and targets.k == 256 and targets.metadata["teacher"] == "GPT"
    ids, top_logits, top_ids = targets[0]
    torch.testing.assert_close(ids, windows[:3])
    student = _gpt(layers=1, seed=5)
    live = Distiller(student, teacher, [windows[:3]], None, DistillConfig(alpha=0.7))
    cached = Distiller(student, None, targets, None, DistillConfig(alpha=0.7))
    with torch.no_grad():
        a = live._loss(student, windows[:3])
        b = cached._loss(student, targets[0])
    # top-256 of a 256-token vocabulary is the whole distribution (logits rounded to fp16).
    assert float(a) == pytest.approx(float(b), rel=2e-3)
    result = Distiller(
        student, None, targets, windows,
        train_config=TrainConfig(steps=2, batch_size=3, seq_len=16, progress=False),
    ).fit()  # fmt: skip
    assert len(result.losses) == 2 and result.final_eval is not None
    with pytest.raises(ValueError, match="hidden"):
        Distiller(student, None, targets, None, DistillConfig(hidden_weight=1.0))
    with pytest.raises(ValueError, match="teacher"):
        Distiller(student, None, [windows], None)


def test_distiller_classifier_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(teacher.parameters(), 1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(teacher(x[:1400]), y[:1400]).backward()
        opt.step()
    student = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    batches = [(x[i : i + 100], y[i : i + 100]) for i in range(0, 1400, 100)]
    Distiller(
        student, teacher, batches, None, DistillConfig(temperature=4.0, alpha=0.9),
        TrainConfig(steps=150, lr=1e-2, progress=False), task="classify",
    ).fit()  # fmt: skip
    with torch.no_grad():
        agree = (student(x[1400:]).argmax(-1) == teacher(x[1400:]).argmax(-1)).float().mean()
        acc = (student(x[1400:]).argmax(-1) == y[1400:]).float().mean()
    assert agree > 0.75 and acc > 0.75  # an untrained student agrees about 10 % of the time


def test_config_and_argument_errors():
    for bad in (
        {"temperature": 0},
        {"alpha": 1.5},
        {"divergence": "l2"},
        {"beta": 1.0},
        {"hidden_weight": -1},
        {"hidden_kind": "l1"},
        {"teacher_precision": "fp8"},
    ):
        with pytest.raises(ValueError):
            DistillConfig(**bad)
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, temperature=-1, alpha=1.0)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(s, s, alpha=0.5)
    with pytest.raises(ValueError, match="shape"):
        kd_loss(s, torch.randn(2, 6), alpha=1.0)
    m = _gpt(layers=1)
    with pytest.raises(ValueError, match="same module"):
        Distiller(m, m, torch.zeros(100, dtype=torch.long))
    with pytest.raises(ValueError, match="task"):
        Distiller(_gpt(layers=1), m, torch.zeros(100, dtype=torch.long), task="seq2seq")


def test_evaluate_after_distillation_is_plain_lm_eval():
    """The distilled student is an ordinary causal LM for the evaluation helpers."""
    teacher, student = _gpt(layers=2), init_student(_gpt(layers=2))
    data = torch.randint(0, 256, (1000,))
    Distiller(
        student, teacher, data, None,
        train_config=TrainConfig(steps=2, batch_size=2, seq_len=16, progress=False),
    ).fit()  # fmt: skip
    ev = evaluate_lm(student, data[:160].view(10, 16))
    assert math.isfinite(ev.nll) and ev.tokens == 150
