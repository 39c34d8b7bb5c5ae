"""Cached teacher targets: the teacher's top-k logits per position, computed once and written to
one file, so several students distil without re-running the teacher.

    cache_teacher_targets(teacher, windows, "teacher-top32.safetensors", k=32)
    targets = TeacherTargets("teacher-top32.safetensors", batch_size=16)
    Distiller(student, None, targets, val_tokens, ...).fit()
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from slimforge.distill.distiller import logits_of

__all__ = ["TeacherTargets", "cache_teacher_targets"]


@torch.no_grad()
def cache_teacher_targets(
    teacher: nn.Module,
    windows: Tensor,
    path: str | os.PathLike[str],
    k: int = 32,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Runs ``teacher`` over ``windows`` (``(n, length)`` token ids) and writes, atomically,
    the windows, the top-``k`` logits (fp16) and their ids of every position to ``path``
    (safetensors, with the teacher's class name and k in the metadata)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from slimforge.io import atomic_path

    if windows.dim() != 2 or windows.dtype not in (torch.int64, torch.int32):
        raise ValueError("windows must be an (n, length) integer tensor")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    was_training = teacher.training
    teacher.eval()
    values, indices = [], []
    try:
        for start in tqdm(
            range(0, len(windows), batch_size), desc="teacher targets", disable=not progress
        ):
            logits = logits_of(teacher(windows[start : start + batch_size].long())).float()
            if k > logits.shape[-1]:
                raise ValueError(f"k={k} exceeds the vocabulary ({logits.shape[-1]})")
            v, i = logits.topk(k, dim=-1)
            values.append(v.half())
            indices.append(i.int())
    finally:
        teacher.train(was_training)
    tensors = {
        "ids": windows.long().contiguous(),
        "top_logits": torch.cat(values).contiguous(),
        "top_ids": torch.cat(indices).contiguous(),
    }
    meta = {"teacher": type(teacher).__name__, "k": str(k)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return Path(path)


class TeacherTargets(Sequence[tuple[Tensor, Tensor, Tensor]]):
    """The batches of a targets file, as ``(ids, top_logits, top_ids)`` tuples of
    ``batch_size`` windows (the last batch may be smaller); train data for a
    :class:`~slimforge.distill.Distiller` without a teacher."""

    def __init__(self, path: str | os.PathLike[str], batch_size: int = 16) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path = Path(path)
        t = load_file(str(self.path))
        missing = {"ids", "top_logits", "top_ids"} - set(t)
        if missing:
            raise ValueError(f"{self.path}: not a teacher-targets file (missing {sorted(missing)})")
        with safe_open(str(self.path), "pt") as f:
            self.metadata = dict(f.metadata() or {})
        self.ids, self.top_logits, self.top_ids = t["ids"], t["top_logits"], t["top_ids"]
        self.batch_size = batch_size

    @property
    def k(self) -> int:
        return int(self.top_ids.shape[-1])

    def __len__(self) -> int:
        return -(-len(self.ids) // self.batch_size)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        s = slice(index * self.batch_size, (index + 1) * self.batch_size)
        return self.ids[s], self.top_logits[s], self.top_ids[s].long()

    def __repr__(self) -> str:
        info = json.dumps(self.metadata)
        return f"TeacherTargets({self.path}, windows={len(self.ids)}, k={self.k}, {info})"
