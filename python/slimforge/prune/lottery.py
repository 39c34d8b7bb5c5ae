"""Lottery tickets: iterative magnitude pruning with rewinding (Frankle & Carbin, 2019).

    ticket = LotteryTicket(model, rate=0.2)       # snapshot the rewind point (theta_0) now
    history = ticket.run(train, rounds=7)         # train, prune 20 % of what is left, rewind; ...
    # the model is now the ticket (masks on, weights rewound) trained once more by `train`

``train(model)`` is any training function (a `slimforge.train.Trainer` run with
``callbacks=[MaskCallback()]``, or a loop of your own that calls ``apply_masks`` after each
optimizer step) and may return a metric, which ``run`` records per round. Pruning is global
magnitude over the selected weights (open_lth's ``sparse_global``): each round prunes ``rate``
of the weights still there, so after ``r`` rounds ``1 - (1 - rate)^r`` are gone. Rewinding
resets every parameter (masked ones to zero) to the snapshot: theta_0 by default, or theta_k
("late resetting") when the snapshot is retaken with :meth:`set_rewind_point` after ``k`` steps.
:meth:`reinitialize` gives the random-reinitialisation control: the same masks on fresh weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimforge.nn.surgery import ModuleFilter, all_of, select_modules
from slimforge.prune.masks import _mask, _weight, apply_masks, attach_mask
from slimforge.prune.primitives import check_amount, global_masks

__all__ = ["LotteryRound", "LotteryTicket"]

_PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LotteryRound:
    """One round of :meth:`LotteryTicket.run`: the sparsity the model was trained at and what
    ``train`` returned."""

    round: int
    sparsity: float
    metric: Any


class LotteryTicket:
    """Iterative magnitude pruning with rewinding over the weights of ``model``'s linear and conv
    layers (``filter_fn`` narrows them). The rewind point is taken at construction."""

    def __init__(
        self, model: nn.Module, rate: float = 0.2, filter_fn: ModuleFilter | None = None
    ) -> None:
        self.model = model
        self.rate = check_amount(rate, "rate")
        if self.rate == 0:
            raise ValueError("rate must be positive")
        pick = all_of(lambda m, n: isinstance(m, _PRUNABLE), filter_fn)
        self.names = [n for n, _ in select_modules(model, pick)]
        if not self.names:
            raise ValueError("no linear or conv layer selected")
        self.rounds_done = 0
        self._rewind: dict[str, torch.Tensor] = {}
        self.set_rewind_point()

    def _modules(self) -> list[nn.Module]:
        return [self.model.get_submodule(n) for n in self.names]

    def set_rewind_point(self) -> None:
        """Snapshot every parameter and buffer of the model as the point to rewind to."""
        self._rewind = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @property
    def sparsity(self) -> float:
        """Fraction of the selected weights that are pruned."""
        mods = self._modules()
        total = sum(_weight(m).numel() for m in mods)
        zeros = sum(int((~_mask(m)).sum()) for m in mods if hasattr(m, "weight_mask"))
        return zeros / total

    def target_sparsity(self, rounds: int) -> float:
        """Sparsity after ``rounds`` rounds: ``1 - (1 - rate)^rounds``."""
        return 1.0 - (1.0 - self.rate) ** rounds

    def prune(self) -> float:
        """Prunes ``rate`` of the remaining selected weights by global magnitude (pruned ones
        stay pruned), then rewinds. Returns the new sparsity."""
        self.rounds_done += 1
        mods = self._modules()
        masks = global_masks([_weight(m) for m in mods], self.target_sparsity(self.rounds_done))
        for m, k in zip(mods, masks, strict=True):
            attach_mask(m, k)
        self.rewind()
        return self.sparsity

    def rewind(self) -> None:
        """Resets the parameters to the rewind point, keeping the masks (pruned weights zero)."""
        state = self.model.state_dict()
        with torch.no_grad():
            for k, v in self._rewind.items():
                if k in state:
                    state[k].copy_(v)
        apply_masks(self.model)

    def reinitialize(self, seed: int, init: Callable[[nn.Module], None] | None = None) -> None:
        """The random-reinitialisation control: fresh weights (``init(module)`` for each
        selected module, default ``module.reset_parameters()``, under ``torch.manual_seed``),
        the same masks."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for m in self._modules():
                if init is not None:
                    init(m)
                else:
                    m.reset_parameters()  # type: ignore[operator]
        apply_masks(self.model)

    def run(self, train: Callable[[nn.Module], Any], rounds: int) -> list[LotteryRound]:
        """``rounds`` times: ``train(model)``, :meth:`prune` (and rewind); then trains the
        ticket once more. Returns one record per training run (``rounds + 1``)."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        history = []
        for r in range(rounds + 1):
            sparsity = self.sparsity if self.rounds_done else 0.0
            metric = train(self.model)
            apply_masks(self.model)
            history.append(LotteryRound(r, sparsity, metric))
            if r < rounds:
                self.prune()
        return history
