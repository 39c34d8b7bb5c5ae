"""Token windows for language modelling: random training windows and evaluation windows.

Tokens are a 1-D int64 tensor (byte-level corpora: :func:`byte_tokens`) or a 1-D NumPy array
of unsigned ids, such as a memory-mapped token file (:class:`slimforge.data.tokens.TokenFile`),
of which only the drawn windows are read. A window of ``length`` tokens gives ``length - 1``
next-token predictions under the causal-LM protocol (``model(w, labels=w)``); windows come out
as int64 tensors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from slimforge._optional import require

require("torch", "slimforge.data.windows")

import torch  # noqa: E402

__all__ = ["byte_tokens", "chunk_windows", "file_tokens", "random_windows", "spaced_windows"]


def byte_tokens(data: bytes) -> torch.Tensor:
    """UTF-8 bytes as a 1-D int64 tensor of byte values (vocabulary 256)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def file_tokens(path: Any) -> torch.Tensor:
    """All ids of the token file ``path`` (``.bin`` + ``.json``, see
    :class:`slimforge.data.tokens.TokenFile`) as a 1-D int64 tensor, read into memory."""
    from slimforge.data.tokens import TokenFile

    return torch.from_numpy(np.asarray(TokenFile(path).tokens, dtype=np.int64))


Tokens = torch.Tensor | np.ndarray


def _check_tokens(tokens: Any, length: int) -> Tokens:
    if hasattr(tokens, "tokens") and isinstance(tokens.tokens, np.ndarray):
        tokens = tokens.tokens  # a TokenFile
    if isinstance(tokens, np.ndarray):
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"token arrays must hold integers, got {tokens.dtype}")
    elif not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError("tokens must be an int64 tensor or an integer NumPy array")
    tokens = tokens.reshape(-1)
    if length < 2:
        raise ValueError(f"a window needs at least 2 tokens, got length {length}")
    if tokens.shape[0] < length:
        raise ValueError(f"{tokens.shape[0]} tokens are fewer than one window of {length}")
    return tokens


def _gather(tokens: Tokens, index: torch.Tensor) -> torch.Tensor:
    """``tokens[index]`` as an int64 tensor (NumPy arrays: only those entries are read)."""
    if isinstance(tokens, np.ndarray):
        return torch.from_numpy(np.asarray(tokens[index.numpy()], dtype=np.int64))
    return tokens[index].long()


def random_windows(
    tokens: Tokens, length: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Batches ``(batch_size, length)`` int64 of windows starting at uniformly random offsets,
    forever (seeded by ``generator``: saving its state saves the position in the stream)."""
    tokens = _check_tokens(tokens, length)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    offsets = torch.arange(length)
    while True:
        start = torch.randint(0, tokens.shape[0] - length + 1, (batch_size, 1), generator=generator)
        yield _gather(tokens, start + offsets)


def spaced_windows(tokens: Tokens, length: int, n: int) -> torch.Tensor:
    """``(n, length)`` int64 windows at evenly spaced offsets over ``tokens`` (a fixed
    evaluation set that covers the whole text)."""
    tokens = _check_tokens(tokens, length)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    stride = (tokens.shape[0] - length) // n if n > 1 else 0
    starts = torch.arange(n) * stride
    return _gather(tokens, starts[:, None] + torch.arange(length))


def chunk_windows(tokens: torch.Tensor, length: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``length`` tokens; the last one is shorter when
    ``length`` does not divide the text, and dropped below 2 tokens. Every token but the first
    of each window is predicted once."""
    tokens = tokens.reshape(-1)
    if length < 2:
        raise ValueError(f"a window needs at least 2 tokens, got length {length}")
    out = [tokens[s : s + length] for s in range(0, tokens.numel(), length)]
    return [w for w in out if w.numel() >= 2]
