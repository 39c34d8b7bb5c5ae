"""Students made from their teacher, and the features distillation compares.

student = init_student(teacher)                    # every other block (DistilBERT)
student = init_student(teacher, keep_layers=[0, 3, 5])
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from slimforge.config import Config
from slimforge.models.spec import ModelSpec, model_spec
from slimforge.nn.surgery import set_submodule

__all__ = ["AttentionCapture", "init_student", "layer_map", "spec_of"]


def spec_of(model: nn.Module, what: str) -> ModelSpec:
    """The model's spec, or a ValueError saying which step needs it."""
    spec = model_spec(model)
    if spec is None:
        raise ValueError(
            f"{what} needs a model with a spec (slimforge GPT / Llama, or a Hugging Face "
            f"Llama-family model); {type(model).__name__} has none"
        )
    return spec.check(model)


def _chosen_layers(n: int, keep_layers: str | int | Sequence[int]) -> list[int]:
    if isinstance(keep_layers, str):
        if keep_layers != "every_other":
            raise ValueError(
                f"keep_layers must be 'every_other', a count or a list, not {keep_layers!r}"
            )
        return list(range(0, n, 2))
    if isinstance(keep_layers, int):
        if not 1 <= keep_layers <= n:
            raise ValueError(f"keep_layers={keep_layers}: the teacher has {n} blocks")
        # Evenly spaced, always keeping the first and the last block.
        if keep_layers == 1:
            return [0]
        return sorted({round(i * (n - 1) / (keep_layers - 1)) for i in range(keep_layers)})
    chosen = [int(i) for i in keep_layers]
    if not chosen:
        raise ValueError("keep_layers is empty")
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ValueError(f"keep_layers {bad} out of range: the teacher has {n} blocks")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"keep_layers {chosen} repeats a block")
    return chosen


def init_student(
    teacher: nn.Module, keep_layers: str | int | Sequence[int] = "every_other"
) -> nn.Module:
    """A copy of ``teacher`` keeping only some of its blocks (embeddings, norms and head are
    copied whole), as DistilBERT initialised its student from every other BERT layer.

    keep_layers: ``"every_other"`` (blocks 0, 2, 4, ...), a count (evenly spaced, first and last
    kept) or the block indices in order. The student's config says its new depth
    (``num_layers``, or ``num_hidden_layers`` for Hugging Face models); ``student.distilled_from``
    lists the teacher blocks it kept. The teacher is not modified.
    """
    spec = spec_of(teacher, "init_student")
    n = len(spec.block_list(teacher))
    chosen = _chosen_layers(n, keep_layers)
    student = copy.deepcopy(teacher)
    blocks = spec.block_list(student)
    kept = nn.ModuleList(blocks[i] for i in chosen)
    set_submodule(student, spec.blocks, kept)
    for new_index, block in enumerate(kept):
        for m in block.modules():  # Hugging Face attention modules index their cache by layer
            if hasattr(m, "layer_idx"):
                m.layer_idx = new_index  # type: ignore[assignment]
    cfg = getattr(student, "config", None)
    if isinstance(cfg, Config) and hasattr(cfg, "num_layers"):
        student.config = cfg.replace(num_layers=len(chosen))  # type: ignore[assignment]
    elif cfg is not None and hasattr(cfg, "num_hidden_layers"):
        cfg = copy.deepcopy(cfg)
        cfg.num_hidden_layers = len(chosen)
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [cfg.layer_types[i] for i in chosen]
        student.config = cfg
    student.distilled_from = list(chosen)  # type: ignore[assignment]
    return student


def layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Pairs (student block, teacher block) for hidden-state losses: each student block's
    output against the teacher block at the same relative depth (the last against the last)."""
    if student_layers < 1 or teacher_layers < 1:
        raise ValueError("both models need at least one block")
    if student_layers == 1:
        return [(0, teacher_layers - 1)]
    return [
        (i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)
    ]


def _rope_theta(model: nn.Module) -> float | None:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if getattr(cfg, "position", "rope") == "rope" and hasattr(cfg, "rope_theta"):
        return float(cfg.rope_theta)
    return None


class AttentionCapture:
    """Captures one block's queries and keys on each forward pass and turns them into attention
    distributions (:func:`~slimforge.distill.losses.attention_probs`), with rotary positions
    applied as the model applies them. Works for models whose spec names a fused q/k/v
    projection or separate query and key projections.

        with AttentionCapture(model, layer=3) as cap:
            model(ids)
            logp = cap.log_probs()       # (B, heads, T, T)
    """

    def __init__(self, model: nn.Module, layer: int) -> None:
        from slimforge.calibration import FeatureCapture

        spec = spec_of(model, "attention-map distillation")
        b = spec.block
        cfg = getattr(model, "config", None)
        self.num_heads = int(getattr(cfg, "num_heads", 0) or getattr(cfg, "num_attention_heads", 0))
        kv = getattr(cfg, "num_kv_heads", None) or getattr(cfg, "num_key_value_heads", None)
        self.num_kv_heads = int(kv or self.num_heads)
        if not self.num_heads:
            raise ValueError("attention maps need the model config's number of heads")
        self.theta = _rope_theta(model)
        prefix = spec.block_prefix(layer)
        if b.fused_qkv is not None and b.qkv_rows is not None:
            self.rows: tuple[int, int] | None = (b.qkv_rows[0], b.qkv_rows[1])
            names = [prefix + b.fused_qkv]
        elif len(b.query_key) == 2:
            self.rows = None
            names = [prefix + b.query_key[0], prefix + b.query_key[1]]
        else:
            raise ValueError("the model spec names no query/key projections")
        self._names = names
        self._capture = FeatureCapture(model, names)

    def log_probs(self) -> Tensor:
        """Log attention distributions ``(B, heads, T, T)`` of the latest forward pass."""
        from slimforge.attention import apply_rotary

        if self.rows is not None:
            out = self._capture[self._names[0]]
            q, k = out[..., : self.rows[0]], out[..., self.rows[0] : self.rows[0] + self.rows[1]]
        else:
            q, k = self._capture[self._names[0]], self._capture[self._names[1]]
        b, t, _ = q.shape
        q = q.reshape(b, t, self.num_heads, -1)
        k = k.reshape(b, t, self.num_kv_heads, -1)
        if self.theta is not None:
            pos = torch.arange(t, device=q.device)
            q = apply_rotary(q, pos, self.theta)
            k = apply_rotary(k, pos, self.theta)
        from slimforge.distill.losses import attention_probs

        return attention_probs(q.transpose(1, 2), k.transpose(1, 2))

    def close(self) -> None:
        self._capture.close()

    def __enter__(self) -> AttentionCapture:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
