"""Distillation losses as plain functions of tensors.

    kd_loss(student_logits, teacher_logits, labels, temperature=1.0, alpha=0.5)
    hidden_loss(student_h, teacher_h, kind="cosine", projection=proj)
    attention_loss(student_maps, teacher_maps)

Each reduces to a mean over the kept positions (``mask``) and equals its textbook formula (the
tests compare against direct implementations).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DIVERGENCES",
    "attention_loss",
    "attention_probs",
    "divergence",
    "hidden_loss",
    "kd_loss",
    "topk_kd_loss",
]

DIVERGENCES = ("forward", "reverse", "jsd")
_MASKED = -1e30  # the log-score of a masked attention entry


def _check_temperature(temperature: float) -> float:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return float(temperature)


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` (one per position) over positions where ``mask`` is true."""
    if mask is None:
        return values.mean()
    if mask.shape != values.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, positions are {tuple(values.shape)}")
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def divergence(
    student_logp: Tensor, teacher_logp: Tensor, kind: str = "forward", beta: float = 0.5
) -> Tensor:
    """Per-position divergence between two log-distributions over the last dimension.

    forward: KL(teacher || student), the classic distillation target (mode covering);
    reverse: KL(student || teacher) (mode seeking, MiniLLM);
    jsd: the generalized Jensen-Shannon divergence of GKD,
    ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)`` with ``m = beta p_t + (1 - beta) p_s``.
    """
    if kind == "forward":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {beta}")
        log_m = torch.logsumexp(
            torch.stack([teacher_logp + math.log(beta), student_logp + math.log1p(-beta)]), 0
        )
        kl_t = (teacher_logp.exp() * (teacher_logp - log_m)).sum(-1)
        kl_s = (student_logp.exp() * (student_logp - log_m)).sum(-1)
        return beta * kl_t + (1.0 - beta) * kl_s
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    kind: str = "forward",
    beta: float = 0.5,
    mask: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Hinton's distillation loss:
    ``alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, labels)``.

    student_logits / teacher_logits: ``(..., classes)`` aligned position by position (for a causal
    LM, the logits of the same input); labels: ``(...)`` class ids for the hard-label term
    (``ignore_index`` skipped), required when ``alpha < 1``; D: ``kind`` (see :func:`divergence`)
    between the temperature-softened distributions; T^2 keeps the soft term's gradient scale
    independent of T; mask: ``(...)`` positions that count (both terms).
    """
    t = _check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    s = F.log_softmax(student_logits.float() / t, -1)
    te = F.log_softmax(teacher_logits.float() / t, -1)
    loss = alpha * t * t * _masked_mean(divergence(s, te, kind, beta), mask)
    if alpha < 1.0:
        if labels is None:
            raise ValueError("labels are needed for the hard-label term (alpha < 1)")
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)}, expected "
                f"{tuple(student_logits.shape[:-1])}"
            )
        ce = F.cross_entropy(
            student_logits.float().reshape(-1, student_logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=ignore_index,
            reduction="none",
        ).view(labels.shape)
        keep = labels != ignore_index
        if mask is not None:
            keep = keep & mask.bool()
        loss = loss + (1.0 - alpha) * _masked_mean(ce, keep)
    return loss


def topk_kd_loss(
    student_logits: Tensor,
    teacher_topk_logits: Tensor,
    teacher_topk_ids: Tensor,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Forward KL against a teacher stored as its top-k logits per position (cached targets):
    the teacher's softened distribution renormalised over its k ids, the student's full
    softened distribution read at those ids, scaled by T^2.
    ``T^2 * sum_k p_t,k (log p_t,k - log q_s,k)``, mean over positions."""
    t = _check_temperature(temperature)
    if teacher_topk_logits.shape != teacher_topk_ids.shape:
        raise ValueError("teacher top-k logits and ids differ in shape")
    if teacher_topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher targets cover positions {tuple(teacher_topk_ids.shape[:-1])}, the student "
            f"logits {tuple(student_logits.shape[:-1])}"
        )
    s = F.log_softmax(student_logits.float() / t, -1).gather(-1, teacher_topk_ids.long())
    p = F.log_softmax(teacher_topk_logits.float() / t, -1)
    per_pos = (p.exp() * (p - s)).sum(-1)
    return t * t * _masked_mean(per_pos, mask)


def hidden_loss(
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    kind: str = "mse",
    projection: nn.Module | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Distance between hidden states ``(..., width)``: ``mse`` (mean squared error over the
    width) or ``cosine`` (1 - cosine similarity), mean over positions. ``projection`` maps the
    student's width to the teacher's first (a learned ``nn.Linear`` when the widths differ)."""
    h = projection(student_hidden) if projection is not None else student_hidden
    if h.shape != teacher_hidden.shape:
        raise ValueError(
            f"student hidden states {tuple(h.shape)} and teacher's {tuple(teacher_hidden.shape)} "
            "differ: give a projection when the widths differ"
        )
    h, g = h.float(), teacher_hidden.float()
    if kind == "mse":
        per_pos = (h - g).pow(2).mean(-1)
    elif kind == "cosine":
        per_pos = 1.0 - F.cosine_similarity(h, g, dim=-1)
    else:
        raise ValueError(f"kind must be 'mse' or 'cosine', got {kind!r}")
    return _masked_mean(per_pos, mask)


def attention_probs(q: Tensor, k: Tensor, causal: bool = True) -> Tensor:
    """Attention distributions ``softmax(q k^T / sqrt(d))`` of ``q, k: (B, H, T, D)`` as log
    probabilities ``(B, H, T, T)``. With ``causal``, future positions get probability 0 and a
    large finite negative log probability (not -inf, so that gradients through head averages
    stay finite). Key heads fewer than query heads (GQA) are repeated."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("q and k must be (batch, heads, tokens, head_dim)")
    if q.shape[1] != k.shape[1]:
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"{q.shape[1]} query heads are not a multiple of {k.shape[1]}")
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        n = scores.shape[-1]
        future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
        scores = scores.masked_fill(future, _MASKED)
    return F.log_softmax(scores, -1)


def attention_loss(student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
    """KL(teacher || student) between attention distributions ``(B, H, T, T)`` (log
    probabilities, e.g. from :func:`attention_probs`), mean over batch, heads and query rows
    (MiniLM's attention transfer). With different head counts the maps are averaged over heads
    first."""
    if student_logp.shape[1] != teacher_logp.shape[1]:
        n_s, n_t = student_logp.shape[1], teacher_logp.shape[1]
        student_logp = torch.logsumexp(student_logp, 1, keepdim=True) - math.log(n_s)
        teacher_logp = torch.logsumexp(teacher_logp, 1, keepdim=True) - math.log(n_t)
    if student_logp.shape != teacher_logp.shape:
        raise ValueError(
            f"attention maps differ: {tuple(student_logp.shape)} vs {tuple(teacher_logp.shape)}"
        )
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1).mean()
