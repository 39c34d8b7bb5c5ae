"""``InputTransformedLinear``: a quantized linear behind an input permutation and/or scale.

GPTQ with act-order and dynamic groups keeps the weight in processing order and permutes the
input once per call; AWQ scales that could not be folded into a norm divide the input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["InputTransformedLinear"]


class InputTransformedLinear(nn.Module):
    """``inner(x[..., perm] / pre_scale)``: act-order permutation and/or AWQ input scales.

    ``perm``: (in,) int64 or None — the inner linear's column j reads input feature ``perm[j]``.
    ``pre_scale``: (in,) float32 or None — applied after the permutation (in inner order).
    """

    def __init__(
        self,
        inner: nn.Module,
        perm: torch.Tensor | None = None,
        pre_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("perm", None if perm is None else perm.long())
        self.register_buffer("pre_scale", None if pre_scale is None else pre_scale.float())

    def quant_spec(self) -> dict[str, Any]:
        """Constructor arguments, for :mod:`slimforge.quant.serialization`."""
        inner_spec = getattr(self.inner, "quant_spec", None)
        if inner_spec is None:
            raise TypeError(f"cannot save a wrapped {type(self.inner).__name__}")
        return {
            "inner": {"type": type(self.inner).__name__, **inner_spec()},
            "in_features": int(self.inner.in_features),
            "perm": self.perm is not None,
            "pre_scale": self.pre_scale is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> InputTransformedLinear:
        from slimforge.quant.serialization import module_from_spec

        n = int(spec["in_features"])
        return cls(
            module_from_spec(spec["inner"]),
            perm=torch.zeros(n, dtype=torch.long) if spec["perm"] else None,
            pre_scale=torch.ones(n) if spec["pre_scale"] else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.pre_scale is not None:
            x = x / self.pre_scale.to(x.dtype)
        return self.inner(x)
