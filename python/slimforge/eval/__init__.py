"""Language-model evaluation: perplexity, bits per token and per byte, KL between models.

Every bench, test and CLI verb measures with these, over windows from
`slimforge.data.windows`, on any model of the causal-LM protocol (``model(ids).logits``).
"""

from __future__ import annotations

from slimforge._optional import require

require("torch", "slimforge.eval")
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.data.windows import chunk_windows

__all__ = [
    "LMEval",
    "evaluate_lm",
    "gap_recovered",
    "mean_kl",
    "perplexity",
    "window_logprobs",
]


@dataclass(frozen=True)
class LMEval:
    """nll: mean next-token negative log-likelihood (nats) over ``tokens`` predictions."""

    nll: float
    tokens: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    @property
    def bits_per_token(self) -> float:
        return self.nll / math.log(2)

    def bits_per_byte(self, n_bytes: int) -> float:
        """Total bits over the text's UTF-8 size (equals bits per token for byte-level models)."""
        return self.nll * self.tokens / (math.log(2) * n_bytes)


def _batches(windows: torch.Tensor | Sequence[torch.Tensor], batch_size: int):
    if isinstance(windows, torch.Tensor):
        if windows.dim() != 2:
            raise ValueError(f"windows must be (n, length), got {tuple(windows.shape)}")
        for i in range(0, windows.shape[0], batch_size):
            yield windows[i : i + batch_size]
        return
    # Variable lengths: batch runs of equal length.
    run: list[torch.Tensor] = []
    for w in windows:
        if run and (w.numel() != run[0].numel() or len(run) == batch_size):
            yield torch.stack(run)
            run = []
        run.append(w.reshape(-1))
    if run:
        yield torch.stack(run)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    windows: torch.Tensor | Sequence[torch.Tensor],
    batch_size: int = 8,
    progress: bool = False,
) -> LMEval:
    """Next-token NLL of ``model`` over ``windows`` (``(n, length)`` or a list of 1-D windows):
    each window's tokens 1.. are predicted from those before them. The model runs in eval mode
    (restored after)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for ids in tqdm(list(_batches(windows, batch_size)), disable=not progress, desc="eval"):
            logits = _logits(model, ids).float()
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                ids[:, 1:].reshape(-1),
                reduction="sum",
            )
            total += float(loss)
            count += ids[:, 1:].numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("no tokens to evaluate: windows need at least 2 tokens")
    return LMEval(total / count, count)


def perplexity(
    model: nn.Module, tokens: torch.Tensor, seq_len: int = 256, batch_size: int = 1
) -> float:
    """Perplexity of 1-D ``tokens`` over consecutive non-overlapping windows of ``seq_len``."""
    return evaluate_lm(model, chunk_windows(tokens, seq_len), batch_size).perplexity


@torch.no_grad()
def window_logprobs(
    model: nn.Module, windows: torch.Tensor | Sequence[torch.Tensor], batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities ``(predictions, vocab)`` float32 and their targets
    ``(predictions,)`` over the windows, in the order :func:`evaluate_lm` scores them (so
    ``-logp.gather(1, targets[:, None]).mean()`` is its NLL)."""
    was_training = model.training
    model.eval()
    out, targets = [], []
    try:
        for ids in _batches(windows, batch_size):
            logits = _logits(model, ids).float()
            out.append(F.log_softmax(logits[:, :-1], -1).reshape(-1, logits.shape[-1]))
            targets.append(ids[:, 1:].reshape(-1))
    finally:
        model.train(was_training)
    return torch.cat(out), torch.cat(targets)


def mean_kl(ref_logp: torch.Tensor, logp: torch.Tensor, chunk: int = 256) -> float:
    """Mean over positions of KL(p_ref || p) in nats, from log-probabilities ``(..., vocab)``.

    Unlike a perplexity difference it has no first-order term: a perturbation of the weights
    cannot lower it, so it measures the error a compression adds, not its luck on the
    held-out text. Computed ``chunk`` positions at a time (large vocabularies)."""
    ref_logp, logp = ref_logp.flatten(0, -2), logp.flatten(0, -2)
    if ref_logp.shape != logp.shape:
        raise ValueError(f"shapes differ: {tuple(ref_logp.shape)} vs {tuple(logp.shape)}")
    total = 0.0
    for i in range(0, ref_logp.shape[0], chunk):
        r, q = ref_logp[i : i + chunk].float(), logp[i : i + chunk].float()
        total += float((r.exp() * (r - q)).sum())
    return total / max(1, ref_logp.shape[0])


def gap_recovered(reference: float, baseline: float, value: float) -> float:
    """Share (percent) of the gap ``baseline - reference`` that ``value`` closes: 100 when
    ``value`` equals the reference, 0 when it equals the baseline (e.g. perplexities of the
    float model, INT4 round-to-nearest, and a better quantizer). NaN when there is no gap."""
    gap = baseline - reference
    return (baseline - value) / gap * 100.0 if gap > 0 else float("nan")
