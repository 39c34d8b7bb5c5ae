"""The causal-LM protocol every model of the library follows.

    out = model(input_ids, labels=None)   # input_ids: (batch, seqlen) int64
    out.logits                            # (batch, seqlen, vocab): every position
    out.loss                              # next-token cross-entropy (+ auxiliary losses) or None

``labels`` follow Hugging Face's convention: the same ids as the input (the model shifts them, so
position t is scored on ``labels[t + 1]``), with -100 marking positions to ignore. ``aux_loss``
holds the part of ``loss`` that is not cross-entropy (MoE load balancing), so the language-model
loss alone is ``loss - aux_loss``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["IGNORE_INDEX", "CausalLMOutput", "causal_lm_loss", "tied_logits"]

#: Label value excluded from the loss (padding, prompts).
IGNORE_INDEX = -100


class CausalLMOutput(NamedTuple):
    """logits ``(batch, seqlen, vocab)``; loss: scalar or None without labels; aux_loss: the
    auxiliary part of ``loss`` (None when the model has none or no labels were given)."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy: ``logits[:, t]`` scored on ``labels[:, t + 1]``, labels
    equal to -100 ignored; computed in float32."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape {tuple(logits.shape[:-1])} (like input_ids), "
            f"got {tuple(labels.shape)}"
        )
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    return F.cross_entropy(shifted, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def tied_logits(hidden: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
    """Output logits through a tied embedding table: ``hidden @ E^T`` for an ``nn.Embedding``,
    or the embedding module's own ``linear`` (a quantized table runs its quantized matmul)."""
    if isinstance(embedding, nn.Embedding):
        return F.linear(hidden, embedding.weight)
    linear = getattr(embedding, "linear", None)
    if linear is None:
        raise TypeError(
            f"a tied head needs an nn.Embedding or a module with .linear(x), got "
            f"{type(embedding).__name__}"
        )
    return linear(hidden)


def check_input_ids(input_ids: torch.Tensor, max_seq_len: int | None = None) -> None:
    """ValueError unless ``input_ids`` is ``(batch, seqlen)`` int32/int64 within the length."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(
            f"input_ids must be (batch, seqlen) int64; got {tuple(input_ids.shape)} "
            f"{input_ids.dtype}"
        )
    if max_seq_len is not None and input_ids.shape[1] > max_seq_len:
        raise ValueError(f"sequence length {input_ids.shape[1]} exceeds max_seq_len {max_seq_len}")
