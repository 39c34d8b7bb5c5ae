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

    def check_buffers(self, where: str = "InputTransformedLinear") -> None:
        """Validates the buffers (after loading an untrusted checkpoint): ``perm`` a
        permutation of ``range(in)``, ``pre_scale`` finite and positive; then the inner
        module's own ``check_buffers``. Raises ``ValueError`` starting with ``where``."""
        n = int(self.inner.in_features)  # type: ignore[arg-type]
        p = self._buffers.get("perm")
        if p is not None:
            if p.dtype != torch.int64 or tuple(p.shape) != (n,):
                raise ValueError(
                    f"{where}: perm must be torch.int64 [{n}], got {p.dtype} {list(p.shape)}"
                )
            if n and (int(p.min()) < 0 or int(p.max()) >= n or p.unique().numel() != n):
                raise ValueError(f"{where}: perm is not a permutation of range({n})")
        s = self._buffers.get("pre_scale")
        if s is not None:
            if s.dtype != torch.float32 or tuple(s.shape) != (n,):
                raise ValueError(
                    f"{where}: pre_scale must be torch.float32 [{n}], got {s.dtype} {list(s.shape)}"
                )
            ok = torch.isfinite(s) & (s > 0)
            if not bool(ok.all()):
                i = int((~ok).nonzero()[0, 0])
                raise ValueError(
                    f"{where}: pre_scale must be finite and > 0, got {s[i].item()!r} at {i}"
                )
        check = getattr(self.inner, "check_buffers", None)
        if callable(check):
            check(f"{where} (inner)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.pre_scale is not None:
            x = x / self.pre_scale.to(x.dtype)
        return self.inner(x)
