"""`LoraLinear`: a frozen linear (float or quantized) plus named low-rank adapters.

``y = base(x) + sum_a s_a * B_a A_a dropout(x)`` over the active adapters ``a`` that are not
merged, with ``s_a = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA). The base is an ``nn.Linear``,
a ``QuantLinear`` (QLoRA: INT4/INT8 codes stay frozen, gradients reach the adapters and the
input through it) or a GPTQ / AWQ ``InputTransformedLinear``. DoRA adapters scale each output
row: ``y = bias + m / ||W + s B A||_row * (W x + s B A x)``, the norm detached as in the DoRA
paper and peft.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimforge.lora.config import LoraConfig
from slimforge.quant.linear import QuantLinear
from slimforge.quant.primitives import choose_qparams, quantize_affine
from slimforge.quant.transformed import InputTransformedLinear

__all__ = [
    "BASE_TYPES",
    "LoraLinear",
    "RequantError",
    "base_bias",
    "base_weight",
    "is_quantized_base",
]

#: The module types a LoRA adapter can wrap.
BASE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, QuantLinear, InputTransformedLinear)
REQUANTIZE = ("rtn", None)


def _features(base: nn.Module) -> tuple[int, int]:
    inner = base.inner if isinstance(base, InputTransformedLinear) else base
    return int(inner.in_features), int(inner.out_features)  # type: ignore[arg-type]


def is_quantized_base(base: nn.Module) -> bool:
    """True for a ``QuantLinear`` or an ``InputTransformedLinear`` around one."""
    return isinstance(base, (QuantLinear, InputTransformedLinear))


def base_weight(base: nn.Module) -> torch.Tensor:
    """The dense weight ``(out, in)`` the base layer multiplies its input by, detached: an
    ``nn.Linear``'s own weight (its dtype), else float32 dequantized codes (for an
    ``InputTransformedLinear``, in input order and divided by ``pre_scale``)."""
    if isinstance(base, nn.Linear):
        return base.weight.detach()
    if isinstance(base, QuantLinear):
        return base.dequantize()
    if isinstance(base, InputTransformedLinear):
        if not isinstance(base.inner, QuantLinear):
            raise TypeError(f"cannot read the weight of a wrapped {type(base.inner).__name__}")
        w = base.inner.dequantize()
        pre_scale, perm = base.pre_scale, base.perm
        if isinstance(pre_scale, torch.Tensor):
            w = w / pre_scale.to(w.device)
        if isinstance(perm, torch.Tensor):
            dense = torch.empty_like(w)
            dense[:, perm] = w
            w = dense
        return w
    raise TypeError(f"not a linear base layer: {type(base).__name__}")


def base_bias(base: nn.Module) -> torch.Tensor | None:
    """The base layer's bias (``None`` when it has none), detached."""
    inner = base.inner if isinstance(base, InputTransformedLinear) else base
    b = getattr(inner, "bias", None)
    return None if b is None else b.detach()


@dataclass(frozen=True)
class RequantError:
    """What re-quantizing a merged weight lost, for one layer.

    weight_error: ``||Q(W') - W'||_F / ||W'||_F``, W' the merged float weight.
    delta_error: ``||(Q(W') - W) - D||_F / ||D||_F``, W the weight before merging and D the
    adapters' change: the share of the fine-tuning the quantized layer does not carry (0 is
    perfect, 1 means the quantized layer is as far from W' as the unmerged base).
    """

    weight_error: float
    delta_error: float


def requantize_error(
    q_weight: torch.Tensor, merged: torch.Tensor, old: torch.Tensor
) -> RequantError:
    """`RequantError` of the re-quantized weight ``q_weight`` against the merged float weight
    ``merged`` and the pre-merge weight ``old`` (all ``(out, in)``)."""
    q, m, w = q_weight.double(), merged.double(), old.double()
    delta = m - w
    dn = float(delta.norm())
    return RequantError(
        weight_error=float((q - m).norm()) / max(float(m.norm()), 1e-30),
        delta_error=float(((q - w) - delta).norm()) / dn if dn > 0 else 0.0,
    )


def _rtn_like(base: nn.Module, weight: torch.Tensor, symmetric: bool) -> QuantLinear:
    """A ``QuantLinear`` of ``weight`` with the bits, group size, route and bias of ``base``."""
    inner = base.inner if isinstance(base, InputTransformedLinear) else base
    assert isinstance(inner, QuantLinear)
    w = weight.detach().float().cpu()
    scales, zeros = choose_qparams(w, inner.bits, inner.group_size, symmetric)
    q = quantize_affine(w, scales, zeros, inner.bits, inner.group_size)
    new = QuantLinear.from_quantized(q, scales, zeros, inner.bias, inner.bits, inner.group_size)
    new.route = inner.route
    return new.to(inner.qweight.device)


def _float_linear(base: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` and sharing ``base``'s bias (float bases) or holding a
    float32 copy of it (quantized bases)."""
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=False, device="meta")
    if isinstance(base, nn.Linear):
        new.weight = nn.Parameter(
            weight.to(base.weight.dtype), requires_grad=base.weight.requires_grad
        )
        new.bias = base.bias
    else:
        new.weight = nn.Parameter(weight.float(), requires_grad=False)
        b = base_bias(base)
        bias = None if b is None else nn.Parameter(b.float().clone(), requires_grad=False)
        new.bias = bias  # type: ignore[assignment]  # nn.Linear's bias may be None
    return new


class LoraLinear(nn.Module):
    """A base linear layer with named LoRA adapters.

    ``base_layer``: an ``nn.Linear``, ``QuantLinear`` or ``InputTransformedLinear`` (kept frozen
    by `apply_lora`). Adapter ``a`` holds ``lora_A[a]`` ``(r, in)`` and ``lora_B[a]``
    ``(out, r)`` (float bases: the base weight's dtype; quantized bases: float32) and, for DoRA,
    ``lora_magnitude[a]`` ``(out,)``. ``forward`` takes ``(..., in)`` and returns ``(..., out)``.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        config: LoraConfig | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, BASE_TYPES):
            names = ", ".join(t.__name__ for t in BASE_TYPES)
            raise TypeError(f"base_layer must be one of {names}, got {type(base_layer).__name__}")
        if isinstance(base_layer, InputTransformedLinear) and not isinstance(
            base_layer.inner, QuantLinear
        ):
            raise TypeError(
                f"cannot adapt an InputTransformedLinear around a {type(base_layer.inner).__name__}"
            )
        self.base_layer = base_layer
        self.in_features, self.out_features = _features(base_layer)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_magnitude = nn.ParameterDict()
        self.configs: dict[str, LoraConfig] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.train(base_layer.training)  # a wrapper put into an eval model stays in eval mode
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.active_adapters = [adapter_name]

    # ------------------------------------------------------------------ adapters

    @property
    def adapters(self) -> list[str]:
        """Every adapter's name, in the order they were added."""
        return list(self.configs)

    @property
    def original_base(self) -> nn.Module:
        """The base layer without any merged adapter (``base_layer`` unless merged)."""
        stash = self.__dict__.get("_unmerged_base")
        return self.base_layer if stash is None else stash

    @property
    def weight(self) -> torch.Tensor:
        """The base ``nn.Linear``'s weight (AttributeError for a quantized base)."""
        w = getattr(self.base_layer, "weight", None)
        if w is None:
            raise AttributeError(f"the {type(self.base_layer).__name__} base has no float weight")
        return w

    def _adapter_dtype(self) -> torch.dtype:
        base = self.original_base
        return base.weight.dtype if isinstance(base, nn.Linear) else torch.float32

    def _device(self) -> torch.device:
        base = self.original_base
        if isinstance(base, nn.Linear):
            return base.weight.device
        inner = base.inner if isinstance(base, InputTransformedLinear) else base
        assert isinstance(inner, QuantLinear)
        return inner.qweight.device

    def add_adapter(self, name: str, config: LoraConfig) -> None:
        """Adds adapter ``name`` (not activated): B = 0 and A from ``config.init``, or PiSSA,
        which moves the top-``r`` singular directions of the base weight into the adapter and
        leaves their residual in the (float) base."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"adapter names are non-empty strings without dots, got {name!r}")
        if name in self.configs:
            raise ValueError(f"adapter {name!r} already exists")
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
        if self.merged_adapters:
            raise ValueError("cannot add an adapter to a merged layer: unmerge_() first")
        r, dtype, device = config.r, self._adapter_dtype(), self._device()
        if config.init == "pissa" and not isinstance(self.base_layer, nn.Linear):
            raise ValueError(
                "PiSSA needs a float base (it rewrites the base weight): apply it to the float "
                "model, then quantize the base layers with quantize_ (QPiSSA)"
            )
        if config.init == "pissa" and r > min(self.in_features, self.out_features):
            raise ValueError(
                f"PiSSA needs r <= min(in, out) = {min(self.in_features, self.out_features)}, got {r}"
            )
        if not dtype.is_floating_point:
            raise TypeError(f"the base weight must be floating point, got {dtype}")
        scaling = config.scaling
        a = torch.empty(r, self.in_features, dtype=dtype, device=device)
        b = torch.zeros(self.out_features, r, dtype=dtype, device=device)
        if config.init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        elif config.init == "kaiming":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:  # pissa: W = U S V^T; B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T, as peft
            assert isinstance(self.base_layer, nn.Linear)
            w = self.base_layer.weight
            u, sv, vh = torch.linalg.svd(w.detach().float(), full_matrices=False)
            sr = sv[:r] / scaling
            a32 = torch.diag(torch.sqrt(sr)) @ vh[:r]
            b32 = u[:, :r] @ torch.diag(torch.sqrt(sr))
            residual = w.detach().float() - scaling * b32 @ a32
            w.data = residual.to(w.dtype)
            a, b = a32.to(dtype), b32.to(dtype)
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.configs[name] = config
        self.scaling[name] = scaling
        if config.use_dora:
            dt = self._compute_dtype()
            w = base_weight(self.base_layer).to(dt)
            lw = b.to(dt) @ a.to(dt)
            norm = torch.linalg.norm(w + scaling * lw, dim=1)
            self.lora_magnitude[name] = nn.Parameter(norm.to(dtype))

    def delete_adapter(self, name: str) -> None:
        """Removes adapter ``name`` (a PiSSA adapter's residual stays in the base)."""
        if name not in self.configs:
            raise ValueError(f"no adapter {name!r}; adapters: {self.adapters}")
        if self.merged_adapters:
            raise ValueError("cannot delete an adapter of a merged layer: unmerge_() first")
        for d in (self.lora_A, self.lora_B, self.lora_magnitude):
            if name in d:
                del d[name]
        del self.configs[name], self.scaling[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        """Makes ``names`` (those this layer has) the active adapters."""
        if self.merged_adapters and set(names) != set(self.merged_adapters):
            raise ValueError(
                "cannot change the active adapters of a merged layer: unmerge_() first"
            )
        self.active_adapters = [n for n in names if n in self.configs]

    # ------------------------------------------------------------------ weights

    def _compute_dtype(self) -> torch.dtype:
        # float32 at least; float64 adapters keep float64
        return torch.promote_types(self._adapter_dtype(), torch.float32)

    def delta_weight(self, name: str) -> torch.Tensor:
        """What merging adapter ``name`` adds to the (unmerged) base weight, ``(out, in)`` in
        float32 (float64 for float64 adapters): ``s B A`` for LoRA,
        ``(m / ||W + s B A||_row) (W + s B A) - W`` for DoRA."""
        if name not in self.configs:
            raise ValueError(f"no adapter {name!r}; adapters: {self.adapters}")
        s, dt = self.scaling[name], self._compute_dtype()
        lw = s * (self.lora_B[name].detach().to(dt) @ self.lora_A[name].detach().to(dt))
        if name not in self.lora_magnitude:
            return lw
        w = base_weight(self.original_base).to(dt)
        adapted = w + lw
        factor = self.lora_magnitude[name].detach().to(dt) / torch.linalg.norm(adapted, dim=1)
        return factor[:, None] * adapted - w

    def merge_(
        self,
        names: list[str] | None = None,
        *,
        requantize: str | None = "rtn",
        symmetric: bool = False,
    ) -> RequantError | None:
        """Folds adapters ``names`` (default: the active ones not merged yet) into the base.

        The merged base is a new module; the original is kept aside, so ``unmerge_()`` restores
        it bit for bit (memory: one more copy of this layer's base while merged). A float base
        gets ``W + sum of delta_weight`` in its dtype. A quantized base is re-quantized by
        round-to-nearest with its bits and group size (``requantize="rtn"``, asymmetric unless
        ``symmetric``) and the `RequantError` is returned; ``requantize=None`` merges it into a
        float32 ``nn.Linear`` instead. Returns None for float bases.
        """
        if requantize not in REQUANTIZE:
            raise ValueError(f"requantize must be one of {REQUANTIZE}, got {requantize!r}")
        todo = [n for n in self.active_adapters if n not in self.merged_adapters]
        if names is not None:
            unknown = [n for n in names if n not in self.configs]
            if unknown:
                raise ValueError(f"no adapters {unknown}; adapters: {self.adapters}")
            todo = [n for n in names if n not in self.merged_adapters]
        if not todo:
            return None
        original = self.original_base
        merged_names = self.merged_adapters + todo
        old = base_weight(original).to(self._compute_dtype())
        merged = old.clone()
        for n in merged_names:
            merged += self.delta_weight(n).to(merged.device)
        error = None
        new: nn.Module
        if isinstance(original, nn.Linear) or requantize is None:
            new = _float_linear(original, merged)
        else:
            quant = _rtn_like(original, merged, symmetric)
            error = requantize_error(quant.dequantize(), merged, old)
            new = quant
        self.__dict__["_unmerged_base"] = original
        self.base_layer = new
        self.merged_adapters = merged_names
        return error

    def unmerge_(self) -> None:
        """Restores the base layer as it was before `merge_` (bit for bit)."""
        stash = self.__dict__.pop("_unmerged_base", None)
        if stash is not None:
            self.base_layer = stash
        self.merged_adapters = []

    def _apply(self, fn: Any, recurse: bool = True) -> LoraLinear:
        stash = self.__dict__.get("_unmerged_base")
        if stash is not None:
            stash._apply(fn, recurse)
        return super()._apply(fn, recurse)  # type: ignore[return-value]

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.original_base(x)
        result = self.base_layer(x)
        todo = [n for n in self.active_adapters if n not in self.merged_adapters]
        if not todo:
            return result
        base_out = result
        for name in todo:
            a, b, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
            h = x if x.dtype == a.dtype else x.to(a.dtype)
            p = self.configs[name].dropout
            dropped = p > 0 and self.training
            if dropped:
                h = F.dropout(h, p, training=True)
            if name in self.lora_magnitude:
                result = result + self._dora(h, name, base_out, dropped).to(result.dtype)
            else:
                result = _add_low_rank(result, h, a, b, s)
        return result

    def _dora(
        self, h: torch.Tensor, name: str, base_out: torch.Tensor, dropped: bool
    ) -> torch.Tensor:
        """DoRA's addition to the base output (peft's ``DoraLinearLayer.forward``)."""
        a, b, s = self.lora_A[name], self.lora_B[name], self.scaling[name]
        w = base_weight(self.base_layer).to(h.dtype)
        lw = b @ a
        norm = torch.linalg.norm(w + s * lw.detach(), dim=1).detach()
        factor = self.lora_magnitude[name] / norm
        lora_out = F.linear(F.linear(h, a), b)
        if dropped:
            plain = F.linear(h, w)
        else:
            bias = base_bias(self.base_layer)
            plain = base_out.to(h.dtype) if bias is None else (base_out - bias).to(h.dtype)
        return (factor - 1) * plain + factor * lora_out * s

    def extra_repr(self) -> str:
        parts = [f"in_features={self.in_features}, out_features={self.out_features}"]
        for n, c in self.configs.items():
            kind = "dora" if c.use_dora else "lora"
            parts.append(f"{n}: {kind} r={self.lora_A[n].shape[0]} scaling={self.scaling[n]:g}")
        if self.merged_adapters:
            parts.append(f"merged={self.merged_adapters}")
        return ", ".join(parts)


def _add_low_rank(
    result: torch.Tensor, h: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float
) -> torch.Tensor:
    """``result + s * (h A^T) B^T`` with the scaling and the sum inside one GEMM (addmm)."""
    lead = result.shape[:-1]
    out = result.shape[-1]
    xa = h.reshape(-1, h.shape[-1]) @ a.t()
    r2 = result.reshape(-1, out)
    if r2.dtype != xa.dtype and not torch.is_autocast_enabled(r2.device.type):
        y = torch.addmm(r2.to(xa.dtype), xa, b.t(), alpha=s).to(result.dtype)
    else:
        y = torch.addmm(r2, xa, b.t(), alpha=s)
    return y.reshape(*lead, out)
