"""`LoraConfig`: the frozen configuration of one LoRA adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass

from slimforge.config import Config

__all__ = ["INITS", "LoraConfig"]

#: A's initialisation: "gaussian" (N(0, 1/r), peft's "gaussian"), "kaiming" (nn.Linear's
#: default, peft's ``init_lora_weights=True``), both with B = 0; "pissa": the principal singular
#: directions of the base weight, which keeps their residual.
INITS = ("gaussian", "kaiming", "pissa")


@dataclass(frozen=True)
class LoraConfig(Config):
    """One adapter's shape and behaviour.

    r: rank. alpha: the adapter's output is scaled by ``alpha / r`` (``alpha / sqrt(r)`` with
    ``rslora``). dropout: on the adapter's input only, while training. target_modules: name
    patterns of the linears to adapt (a bare word matches the last name component, as peft's
    ``target_modules``; globs match the whole dotted name), or ``"all-linear"`` (every
    linear except the output head). exclude_modules: patterns left out. use_dora: DoRA (a
    learned per-row magnitude over the normalised adapted weight). init: one of ``INITS``.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str = ("q_proj", "v_proj")
    exclude_modules: tuple[str, ...] = ()
    rslora: bool = False
    use_dora: bool = False
    init: str = "gaussian"

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        targets = self.target_modules
        if isinstance(targets, str):
            if targets != "all-linear":
                targets = (targets,)
        else:
            targets = tuple(targets)
            if not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    f"target_modules must be non-empty name patterns or 'all-linear', got {targets!r}"
                )
        excludes = tuple(self.exclude_modules)
        if not all(isinstance(t, str) and t for t in excludes):
            raise ValueError(f"exclude_modules must be name patterns, got {excludes!r}")
        object.__setattr__(self, "target_modules", targets)
        object.__setattr__(self, "exclude_modules", excludes)
        object.__setattr__(self, "alpha", float(self.alpha))

    @property
    def scaling(self) -> float:
        """The factor on the adapter's output: ``alpha / r``, or ``alpha / sqrt(r)`` (rsLoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)
