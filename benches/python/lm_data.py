"""The bundled byte-level LM corpus as tensors, and random training windows over it.

Shared by the benchmarks that train `slimforge.models.GPT` (`moe_lm.py`, `quant_quality_gpt.py`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from slimforge.data import lm_splits


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).long()


def lm_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """`slimforge.data.lm_splits()` as int64 byte tensors: (train, validation)."""
    train_bytes, val_bytes = lm_splits()
    return _bytes_tensor(train_bytes), _bytes_tensor(val_bytes)


def random_windows(
    data: torch.Tensor, block: int, batch: int, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) pairs of `batch` random windows of `block` bytes (y is x shifted by one), forever."""
    while True:
        start = torch.randint(0, data.numel() - block - 1, (batch,), generator=gen)
        rows = torch.stack([data[s : s + block + 1] for s in start.tolist()])
        yield rows[:, :-1], rows[:, 1:]
