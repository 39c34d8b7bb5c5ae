"""`Trainer`: a small, dependable training loop for models of the causal-LM protocol."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from slimforge.config import Config
from slimforge.data.windows import random_windows, spaced_windows
from slimforge.eval import LMEval, evaluate_lm

__all__ = ["TrainConfig", "TrainResult", "Trainer", "distillation_loss", "warmup_cosine"]

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning-rate multiplier: linear warm-up over ``warmup`` steps, then cosine decay from 1
    to ``min_ratio`` at ``total`` steps (nanoGPT's schedule)."""
    if total <= 0:
        raise ValueError(f"total must be positive, got {total}")
    ramp = min(1.0, (step + 1) / max(1, warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return ramp * (min_ratio + (1 - min_ratio) * cosine)


@dataclass(frozen=True)
class TrainConfig(Config):
    """steps, batch_size, seq_len (tokens per window), lr (peak), warmup_steps (default
    steps // 20), min_lr_ratio (final lr / peak), AdamW's weight_decay and betas, grad_clip
    (global norm; None: off), eval_every (steps; 0: at the end only), eval_windows (evaluation
    windows drawn evenly from 1-D eval tokens), seed (window sampling)."""

    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    eval_every: int = 0
    eval_windows: int = 128
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_windows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or None, got {self.grad_clip}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0, got {self.eval_every}")
        object.__setattr__(self, "betas", tuple(self.betas))

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 20)


@dataclass
class TrainResult:
    """losses: training loss per step; evals: (step, LMEval) pairs; tokens: tokens trained on;
    train_seconds: time in forward/backward/step (evaluation excluded)."""

    losses: list[float] = field(default_factory=list)
    evals: list[tuple[int, LMEval]] = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else float("nan")

    @property
    def final_eval(self) -> LMEval | None:
        return self.evals[-1][1] if self.evals else None


def default_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss: ``model(batch, labels=batch).loss``."""
    loss = model(batch, labels=batch).loss
    if loss is None:
        raise ValueError("the model returned no loss for labels: is it a causal LM?")
    return loss


def distillation_loss(teacher: nn.Module, temperature: float = 1.0) -> LossFn:
    """A ``loss_fn`` distilling ``teacher`` into the trained model: KL(teacher || student) of
    the next-token distributions at ``temperature``, scaled by T^2 (Hinton et al.), mean over
    positions. The teacher runs without gradients in eval mode."""
    import torch.nn.functional as F

    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    teacher.eval()

    def loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher(batch).logits.float()
        s_logits = model(batch).logits.float()
        t = F.log_softmax(t_logits / temperature, -1).flatten(0, -2)
        s = F.log_softmax(s_logits / temperature, -1).flatten(0, -2)
        kl = F.kl_div(s, t, log_target=True, reduction="batchmean")
        return kl * temperature**2

    return loss


class Trainer:
    """Trains ``model`` on ``train_data`` with AdamW and a warm-up + cosine schedule.

    train_data: 1-D token tensor (random windows of ``seq_len`` are drawn, seeded) or an
        iterable of ``(batch, seqlen)`` id batches (cycled).
    eval_data: 1-D token tensor (``eval_windows`` evenly spaced windows), an ``(n, length)``
        tensor of windows, or None.
    loss_fn: ``loss_fn(model, batch) -> scalar``; default the causal-LM loss.
    params: the parameters to train (default: every parameter that requires grad).
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: torch.Tensor | Iterable[torch.Tensor],
        eval_data: torch.Tensor | None = None,
        config: TrainConfig | None = None,
        *,
        loss_fn: LossFn | None = None,
        params: Iterable[nn.Parameter] | None = None,
    ) -> None:
        self.model = model
        self.config = config or TrainConfig()
        self.loss_fn = loss_fn or default_loss
        self._train_data = train_data
        self.eval_windows = self._eval_windows(eval_data)
        trainable = [p for p in (params if params is not None else model.parameters())]
        trainable = [p for p in trainable if p.requires_grad]
        if not trainable:
            raise ValueError("no trainable parameters")
        c = self.config
        self.optimizer = torch.optim.AdamW(
            trainable, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay
        )
        self._params = trainable

    def _eval_windows(self, data: torch.Tensor | None) -> torch.Tensor | None:
        if data is None:
            return None
        if data.dim() == 2:
            return data
        return spaced_windows(data, self.config.seq_len, self.config.eval_windows)

    def _batches(self) -> Iterator[torch.Tensor]:
        data = self._train_data
        c = self.config
        if isinstance(data, torch.Tensor) and data.dim() == 1:
            gen = torch.Generator().manual_seed(c.seed)
            return random_windows(data, c.seq_len, c.batch_size, gen)

        def cycle() -> Iterator[torch.Tensor]:
            while True:
                empty = True
                for b in data:  # type: ignore[union-attr]
                    empty = False
                    yield b
                if empty:
                    raise ValueError("train_data yielded no batches")

        return cycle()

    def evaluate(self) -> LMEval:
        """Evaluation NLL of the model on the evaluation windows."""
        if self.eval_windows is None:
            raise ValueError("no eval_data was given")
        return evaluate_lm(self.model, self.eval_windows, batch_size=self.config.batch_size)

    def fit(self) -> TrainResult:
        """Runs ``config.steps`` optimizer steps; evaluates every ``eval_every`` steps and at
        the end when eval data was given. Returns the losses, evaluations and throughput."""
        from tqdm.auto import tqdm

        c = self.config
        result = TrainResult()
        batches = self._batches()
        self.model.train()
        bar = tqdm(range(c.steps), desc="train", disable=not c.progress, unit="step")
        for step in bar:
            if c.eval_every and step % c.eval_every == 0 and self.eval_windows is not None:
                result.evals.append((step, self.evaluate()))
                self.model.train()
            mult = warmup_cosine(step, c.steps, c.warmup, c.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = c.lr * mult
            batch = next(batches)
            start = time.perf_counter()
            loss = self.loss_fn(self.model, batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {float(loss)} at step {step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if c.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self._params, c.grad_clip)
            self.optimizer.step()
            result.train_seconds += time.perf_counter() - start
            result.tokens += batch.numel()
            result.losses.append(float(loss.detach()))
            if step % 50 == 0:
                bar.set_postfix(loss=f"{result.losses[-1]:.4f}")
                logger.debug("step %d loss %.4f lr %.3g", step, result.losses[-1], c.lr * mult)
        if self.eval_windows is not None:
            result.evals.append((c.steps, self.evaluate()))
        self.model.eval()
        return result
