"""Token windows for language modelling: random training windows and evaluation windows.

Tokens are a 1-D int64 tensor (byte-level corpora: :func:`byte_tokens`). A window of ``length``
tokens gives ``length - 1`` next-token predictions under the causal-LM protocol
(``model(w, labels=w)``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["byte_tokens", "chunk_windows", "random_windows", "spaced_windows"]


def byte_tokens(data: bytes) -> torch.Tensor:
    """UTF-8 bytes as a 1-D int64 tensor of byte values (vocabulary 256)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def _check_tokens(tokens: torch.Tensor, length: int) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError("tokens must be an int64 tensor")
    tokens = tokens.reshape(-1)
    if length < 2:
        raise ValueError(f"a window needs at least 2 tokens, got length {length}")
    if tokens.numel() < length:
        raise ValueError(f"{tokens.numel()} tokens are fewer than one window of {length}")
    return tokens


def random_windows(
    tokens: torch.Tensor, length: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Batches ``(batch_size, length)`` of windows starting at uniformly random offsets,
    forever (seeded by ``generator``)."""
    tokens = _check_tokens(tokens, length)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    offsets = torch.arange(length)
    while True:
        start = torch.randint(0, tokens.numel() - length + 1, (batch_size, 1), generator=generator)
        yield tokens[start + offsets]


def spaced_windows(tokens: torch.Tensor, length: int, n: int) -> torch.Tensor:
    """``(n, length)`` windows at evenly spaced offsets over ``tokens`` (a fixed evaluation
    set that covers the whole text)."""
    tokens = _check_tokens(tokens, length)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    stride = (tokens.numel() - length) // n if n > 1 else 0
    starts = torch.arange(n) * stride
    return tokens[starts[:, None] + torch.arange(length)]


def chunk_windows(tokens: torch.Tensor, length: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``length`` tokens; the last one is shorter when
    ``length`` does not divide the text, and dropped below 2 tokens. Every token but the first
    of each window is predicted once."""
    tokens = tokens.reshape(-1)
    if length < 2:
        raise ValueError(f"a window needs at least 2 tokens, got length {length}")
    out = [tokens[s : s + length] for s in range(0, tokens.numel(), length)]
    return [w for w in out if w.numel() >= 2]
