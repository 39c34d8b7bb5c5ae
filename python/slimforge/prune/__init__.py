"""Pruning and sparsity: masks where masks are wanted, smaller dense models where speed is.

- Unstructured and N:M with masks: ``prune_(model, Magnitude(0.5))``, ``NM(2, 4)``,
  ``Wanda(0.5)`` / ``Wanda(n=2, m=4)``, ``SparseGPT(0.5)`` / ``SparseGPT(n=2, m=4)`` (calibrated
  on the shared block-by-block driver); masks survive training (:class:`MaskCallback`,
  :func:`apply_masks`), :func:`make_permanent` bakes them in, :func:`sparsity_report` counts.
- 2:4 compressed storage with INT8 / INT4 values and a CPU kernel: :class:`Sparse24Linear`,
  :func:`to_sparse24`.
- Structured: :func:`prune_structured` with :class:`MLPNeurons`, :class:`AttentionHeads`
  (GQA-aware), :class:`Blocks`, and for CNNs :class:`ExpansionChannels` (BatchNorm-aware): a
  smaller dense model.
- Lottery tickets: :class:`LotteryTicket` (iterative magnitude pruning with rewinding).
- Primitives: :func:`global_masks`, :func:`row_masks`, :func:`nm_masks`, :func:`group_norms`,
  :func:`sparsegpt_prune_weight`; plain PyTorch references in :mod:`slimforge.prune.reference`.

See docs/prune.md.
"""

from slimforge._optional import require

require("torch", "slimforge.prune")

from slimforge.prune.api import NM, Magnitude, PruneConfig, SparseGPT, Wanda, prune_
from slimforge.prune.lottery import LotteryRound, LotteryTicket
from slimforge.prune.masks import (
    LayerSparsity,
    MaskCallback,
    SparsityReport,
    apply_masks,
    attach_mask,
    make_permanent,
    masked_modules,
    sparsity_report,
)
from slimforge.prune.primitives import (
    global_masks,
    global_threshold,
    group_norms,
    nm_masks,
    row_masks,
)
from slimforge.prune.sparse24 import Sparse24Linear, is_24_sparse, to_sparse24
from slimforge.prune.sparsegpt import SparseGPTResult, sparsegpt_prune_weight
from slimforge.prune.structured import (
    AttentionHeads,
    Blocks,
    ExpansionChannels,
    MLPNeurons,
    StructuredResult,
    prune_structured,
)

__all__ = [
    "NM",
    "AttentionHeads",
    "Blocks",
    "ExpansionChannels",
    "LayerSparsity",
    "LotteryRound",
    "LotteryTicket",
    "MLPNeurons",
    "Magnitude",
    "MaskCallback",
    "PruneConfig",
    "Sparse24Linear",
    "SparseGPT",
    "SparseGPTResult",
    "SparsityReport",
    "StructuredResult",
    "Wanda",
    "apply_masks",
    "attach_mask",
    "global_masks",
    "global_threshold",
    "group_norms",
    "is_24_sparse",
    "make_permanent",
    "masked_modules",
    "nm_masks",
    "prune_",
    "prune_structured",
    "row_masks",
    "sparsegpt_prune_weight",
    "sparsity_report",
    "to_sparse24",
]
