"""`Distiller`: a student trained on a frozen teacher's outputs, on the shared `Trainer`.

d = Distiller(student, teacher, train_tokens, val_tokens,
              DistillConfig(temperature=1.0, alpha=0.5),
              TrainConfig(steps=300, lr=2e-3), out_dir="runs/student")
result = d.fit()
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimforge.config import Config
from slimforge.distill.losses import DIVERGENCES, attention_loss, hidden_loss, kd_loss, topk_kd_loss
from slimforge.distill.student import AttentionCapture, layer_map, spec_of
from slimforge.train import Callback, TrainConfig, Trainer, TrainResult

__all__ = ["DistillConfig", "Distiller", "logits_of"]

TASKS = ("lm", "classify")


@dataclass(frozen=True)
class DistillConfig(Config):
    """temperature (softening T), alpha (weight of the soft term; ``1 - alpha`` on the hard
    labels), divergence ("forward" KL, "reverse" KL or "jsd" with ``beta``), hidden_weight
    (hidden-state loss on paired blocks, ``hidden_kind`` "mse" or "cosine"; 0: off),
    attention_weight (attention-map KL on the last paired blocks; 0: off), teacher_precision
    ("fp32" or "bf16": the teacher's forward under bf16 autocast).

    The defaults (T = 1, half soft and half hard targets) are the best of the settings measured
    for byte-level GPT students in docs/benchmarks.md; T = 2 with a short training budget did
    worse than no teacher there."""

    temperature: float = 1.0
    alpha: float = 0.5
    divergence: str = "forward"
    beta: float = 0.5
    hidden_weight: float = 0.0
    hidden_kind: str = "mse"
    attention_weight: float = 0.0
    teacher_precision: str = "fp32"

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")
        for name in ("hidden_weight", "attention_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden_kind not in ("mse", "cosine"):
            raise ValueError(f"hidden_kind must be 'mse' or 'cosine', got {self.hidden_kind!r}")
        if self.teacher_precision not in ("fp32", "bf16"):
            raise ValueError(
                f"teacher_precision must be 'fp32' or 'bf16', got {self.teacher_precision!r}"
            )


def logits_of(output: Any) -> Tensor:
    """The logits of a model output: ``.logits`` when present, else the tensor itself."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned a {type(output).__name__}, not logits")
    return logits


class _WithProjections(nn.Module):
    """The student plus the learned projections of its hidden states (trained and saved with
    it); forwards to the student."""

    def __init__(self, student: nn.Module, projections: nn.ModuleList) -> None:
        super().__init__()
        self.student = student
        self.projections = projections

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)


class _CloseHooks(Callback):
    def __init__(self, hooks: list[Any]) -> None:
        self.hooks = hooks

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        for h in self.hooks:
            h.close()


def _width(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    w = getattr(cfg, "hidden_size", None)
    if w is None:
        raise ValueError("hidden-state distillation needs the model config's hidden_size")
    return int(w)


class Distiller:
    """Trains ``student`` to match ``teacher`` with the :class:`~slimforge.train.Trainer`.

    teacher: frozen (eval mode, no gradients; its parameters are not modified), or None with
        cached ``targets`` (:class:`~slimforge.distill.targets.TeacherTargets`) as train data.
    train_data / eval_data: as for the Trainer; for ``task="lm"`` token streams or id batches
        (the hard label of each position is the next token), for ``task="classify"``
        ``(inputs, labels)`` batches (evaluation then is the caller's).
    config: the :class:`DistillConfig`; train_config: the Trainer's :class:`TrainConfig`.
    layer_pairs: (student block, teacher block) pairs for the hidden-state loss (default
        :func:`~slimforge.distill.student.layer_map`); projections are learned where the widths
        differ (saved with the student in checkpoints, as ``student.`` / ``projections.``).
    Other keyword arguments (out_dir, callbacks, params, optimizer) go to the Trainer.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        train_data: Any,
        eval_data: Any = None,
        config: DistillConfig | None = None,
        train_config: TrainConfig | None = None,
        *,
        task: str = "lm",
        layer_pairs: Sequence[tuple[int, int]] | None = None,
        out_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
        **trainer_kwargs: Any,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if student is teacher:
            raise ValueError("student and teacher are the same module: copy it (init_student)")
        self.config = c = config or DistillConfig()
        self.student, self.teacher, self.task = student, teacher, task
        from slimforge.distill.targets import TeacherTargets

        self.cached = isinstance(train_data, TeacherTargets)
        if teacher is None and not self.cached:
            raise ValueError("give a teacher, or TeacherTargets as train_data")
        if self.cached and (c.hidden_weight or c.attention_weight):
            raise ValueError("cached teacher targets hold logits only: no hidden/attention loss")
        if teacher is not None:
            teacher.eval()
        self._hooks: list[Any] = []
        trained: nn.Module = student
        self.pairs: list[tuple[int, int]] = []
        if c.hidden_weight or c.attention_weight:
            assert teacher is not None
            s_spec = spec_of(student, "hidden-state distillation")
            t_spec = spec_of(teacher, "hidden-state distillation")
            ns, nt = len(s_spec.block_list(student)), len(t_spec.block_list(teacher))
            self.pairs = list(layer_pairs) if layer_pairs is not None else layer_map(ns, nt)
            for i, j in self.pairs:
                if not (0 <= i < ns and 0 <= j < nt):
                    raise ValueError(f"layer pair ({i}, {j}) out of range ({ns}, {nt} blocks)")
        if c.hidden_weight:
            from slimforge.calibration import FeatureCapture

            assert teacher is not None
            self._s_feats = FeatureCapture(
                student, [s_spec.block_prefix(i)[:-1] for i, _ in self.pairs]
            )
            self._t_feats = FeatureCapture(
                teacher, [t_spec.block_prefix(j)[:-1] for _, j in self.pairs], detach=True
            )
            self._hooks += [self._s_feats, self._t_feats]
            ws, wt = _width(student), _width(teacher)
            self.projections = nn.ModuleList(
                nn.Linear(ws, wt, bias=False) if ws != wt else nn.Identity() for _ in self.pairs
            )
            if ws != wt:
                trained = _WithProjections(student, self.projections)
        if c.attention_weight:
            assert teacher is not None
            i, j = self.pairs[-1]
            self._s_attn = AttentionCapture(student, i)
            self._t_attn = AttentionCapture(teacher, j)
            self._hooks += [self._s_attn, self._t_attn]
        self.trainer = Trainer(
            trained,
            train_data,
            eval_data,
            train_config,
            loss_fn=self._loss,
            out_dir=out_dir,
            callbacks=[*callbacks, _CloseHooks(self._hooks)],
            **trainer_kwargs,
        )

    def _teacher_context(self) -> contextlib.AbstractContextManager[Any]:
        if self.config.teacher_precision == "bf16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _loss(self, model: nn.Module, batch: Any) -> Tensor:
        c = self.config
        if self.cached:
            ids, top_logits, top_ids = batch
            s = logits_of(model(ids))
            soft = topk_kd_loss(
                s[:, :-1], top_logits[:, :-1], top_ids[:, :-1], temperature=c.temperature
            )
            loss = c.alpha * soft
            if c.alpha < 1:
                hard = F.cross_entropy(s[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
                loss = loss + (1 - c.alpha) * hard
            return loss
        assert self.teacher is not None
        if self.task == "lm":
            inputs, labels = batch, batch[:, 1:]
        else:
            inputs, labels = batch
        with torch.no_grad(), self._teacher_context():
            t = logits_of(self.teacher(inputs)).float()
        s = logits_of(model(inputs))
        if self.task == "lm":
            s, t = s[:, :-1], t[:, :-1]
        loss = kd_loss(
            s, t, labels, temperature=c.temperature, alpha=c.alpha, kind=c.divergence, beta=c.beta
        )
        if c.hidden_weight:
            s_spec = spec_of(self.student, "hidden-state distillation")
            t_spec = spec_of(self.teacher, "hidden-state distillation")
            h = sum(
                hidden_loss(
                    self._s_feats[s_spec.block_prefix(i)[:-1]],
                    self._t_feats[t_spec.block_prefix(j)[:-1]].float(),
                    c.hidden_kind,
                    proj,
                )
                for (i, j), proj in zip(self.pairs, self.projections, strict=True)
            )
            loss = loss + c.hidden_weight * h / len(self.pairs)
        if c.attention_weight:
            loss = loss + c.attention_weight * attention_loss(
                self._s_attn.log_probs(), self._t_attn.log_probs().detach()
            )
        return loss

    def fit(self, resume: bool = False) -> TrainResult:
        """Runs the Trainer (``resume``: from the newest checkpoint in out_dir)."""
        try:
            return self.trainer.fit(resume=resume)
        finally:
            for h in self._hooks:
                h.close()
