"""Optimizers: LAMB for large-batch training (with timm's defaults and flags)."""

from slimforge._optional import require

require("torch", "slimforge.optim")

from slimforge.optim.lamb import Lamb, param_groups

__all__ = ["Lamb", "param_groups"]
