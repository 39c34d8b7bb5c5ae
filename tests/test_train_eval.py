"""Training loop, evaluation metrics and LM windows on models of the causal-LM protocol."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimforge.data import lm_splits
from slimforge.data.windows import byte_tokens, chunk_windows, random_windows, spaced_windows
from slimforge.eval import evaluate_lm, gap_recovered, mean_kl, perplexity, window_logprobs
from slimforge.models import GPT, CausalLMOutput, GPTConfig
from slimforge.train import TrainConfig, Trainer, distillation_loss, warmup_cosine


class Uniform(torch.nn.Module):
    def forward(self, ids: torch.Tensor) -> CausalLMOutput:
        return CausalLMOutput(torch.zeros(*ids.shape, 50))


def test_windows() -> None:
    toks = torch.arange(100)
    w = spaced_windows(toks, 10, 5)
    assert w.shape == (5, 10) and int(w[0, 0]) == 0 and int(w[-1, -1]) <= 99
    assert torch.equal(w[1], torch.arange(w[1, 0], w[1, 0] + 10))
    chunks = chunk_windows(toks, 30)
    assert [c.numel() for c in chunks] == [30, 30, 30, 10]
    assert [c.numel() for c in chunk_windows(torch.arange(31), 30)] == [30]  # 1-token tail dropped
    gen = torch.Generator().manual_seed(0)
    b = next(random_windows(toks, 8, 4, gen))
    assert b.shape == (4, 8) and torch.all(b[:, 1:] - b[:, :-1] == 1)
    assert torch.equal(byte_tokens(b"ab"), torch.tensor([97, 98]))
    with pytest.raises(ValueError, match="fewer than one window"):
        spaced_windows(toks[:5], 10, 2)
    with pytest.raises(ValueError, match="at least 2"):
        chunk_windows(toks, 1)


def test_metrics_on_a_uniform_model() -> None:
    ids = torch.arange(40) % 50
    assert perplexity(Uniform(), ids, seq_len=16) == pytest.approx(50.0)
    ev = evaluate_lm(Uniform(), chunk_windows(ids, 16))
    assert ev.tokens == 15 + 15 + 7
    assert ev.bits_per_token == pytest.approx(math.log2(50))
    assert ev.bits_per_byte(ev.tokens * 2) == pytest.approx(math.log2(50) / 2)
    logp, targets = window_logprobs(Uniform(), spaced_windows(ids, 8, 3))
    assert logp.shape == (21, 50) and targets.shape == (21,)
    assert mean_kl(logp, logp) == pytest.approx(0.0)
    assert gap_recovered(10.0, 12.0, 11.0) == pytest.approx(50.0)
    assert math.isnan(gap_recovered(10.0, 10.0, 11.0))


def test_evaluate_lm_matches_the_model_loss() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(num_layers=1, hidden_size=32, num_heads=2, max_seq_len=16)).eval()
    w = torch.randint(0, 256, (6, 16))
    with torch.no_grad():
        loss = model(w, labels=w).loss
    assert evaluate_lm(model, w, batch_size=4).nll == pytest.approx(float(loss), rel=1e-5)


def test_warmup_cosine_schedule() -> None:
    values = [warmup_cosine(s, 100, 10, 0.1) for s in range(100)]
    assert values[0] == pytest.approx(0.1 * (0.1 + 0.9 * 1.0), rel=1e-3)
    assert max(values) == pytest.approx(values[9], rel=1e-2)
    assert values[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(values[9:], values[10:], strict=False))


def test_trainer_learns_the_bundled_corpus_and_is_reproducible() -> None:
    train, val = (byte_tokens(b) for b in lm_splits())
    cfg = GPTConfig(num_layers=1, hidden_size=32, num_heads=2, max_seq_len=32)
    tc = TrainConfig(steps=40, batch_size=8, seq_len=32, lr=1e-2, eval_windows=16, progress=False)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = GPT(cfg)
        trainer = Trainer(model, train, val[:20_000], tc)
        before = trainer.evaluate().nll
        results.append(trainer.fit())
    res = results[0]
    assert len(res.losses) == 40 and res.tokens == 40 * 8 * 32 and res.tokens_per_s > 0
    assert res.final_eval is not None and res.final_eval.nll < before - 1.0
    assert results[1].losses == res.losses  # same seed, same batches, same result
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="no trainable"):
        Trainer(model.requires_grad_(False), train, None, tc)


def test_trainer_with_batches_and_a_distillation_loss() -> None:
    torch.manual_seed(1)
    cfg = GPTConfig(num_layers=1, hidden_size=32, num_heads=2, max_seq_len=16)
    teacher, student = GPT(cfg), GPT(cfg)
    batches = [torch.randint(0, 256, (4, 16)) for _ in range(3)]
    loss_fn = distillation_loss(teacher, temperature=2.0)
    with torch.no_grad():
        t = F.log_softmax(teacher(batches[0]).logits / 2, -1).flatten(0, 1)
        s = F.log_softmax(student(batches[0]).logits / 2, -1).flatten(0, 1)
        want = F.kl_div(s, t, log_target=True, reduction="batchmean") * 4
    torch.testing.assert_close(loss_fn(student, batches[0]), want)
    res = Trainer(
        student, batches, None, TrainConfig(steps=30, lr=1e-2, progress=False), loss_fn=loss_fn
    ).fit()
    assert res.losses[-1] < 0.5 * res.losses[0]
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(teacher, 0.0)
