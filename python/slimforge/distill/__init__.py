"""Knowledge distillation: a small student trained on a teacher's outputs.

    from slimforge.distill import Distiller, DistillConfig, init_student, kd_loss

    student = init_student(teacher)                 # every other block, like DistilBERT
    Distiller(student, teacher, train_tokens, val_tokens,
              DistillConfig(temperature=1.0, alpha=0.5),
              TrainConfig(steps=300)).fit()

Losses (:mod:`slimforge.distill.losses`): Hinton's soft-target loss with forward, reverse or
generalized Jensen-Shannon divergence, hidden-state and attention-map losses. Features come from
the shared capture hooks (:class:`slimforge.calibration.FeatureCapture`) and block positions from
the model spec; cached top-k teacher targets (:mod:`slimforge.distill.targets`) let several
students learn from one teacher pass. Classifiers distil with ``task="classify"``.
"""

from slimforge._optional import require

require("torch", "slimforge.distill")

from slimforge.distill.distiller import DistillConfig, Distiller, logits_of
from slimforge.distill.losses import (
    DIVERGENCES,
    attention_loss,
    attention_probs,
    divergence,
    hidden_loss,
    kd_loss,
    topk_kd_loss,
)
from slimforge.distill.student import AttentionCapture, init_student, layer_map
from slimforge.distill.targets import TeacherTargets, cache_teacher_targets

__all__ = [
    "DIVERGENCES",
    "AttentionCapture",
    "DistillConfig",
    "Distiller",
    "TeacherTargets",
    "attention_loss",
    "attention_probs",
    "cache_teacher_targets",
    "divergence",
    "hidden_loss",
    "init_student",
    "kd_loss",
    "layer_map",
    "logits_of",
    "topk_kd_loss",
]
