"""LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes"): Adam's moments with a layer-wise trust ratio, so very large batches keep converging.

For each parameter tensor ``w`` with gradient ``g`` (after the optional global-norm clipping
``g <- g / max(1, ||g_all|| / max_grad_norm)``):

    m <- beta1 m + (1 - beta1) g        (grad_averaging; else m <- beta1 m + g)
    v <- beta2 v + (1 - beta2) g^2
    u  = (m / bc1) / (sqrt(v / bc2) + eps) + weight_decay * w     (bc = 1 - beta^t, or 1)
    r  = ||w|| / ||u||    (1 when either norm is 0; min(r, 1) with trust_clip)
    w <- w - lr * r * u   (r = 1 for tensors with weight_decay 0 unless always_adapt)

The defaults and the flags are timm's ``Lamb`` (tested against it); put biases and norms in a
group with ``weight_decay=0`` (:func:`param_groups`) to exclude them from decay and adaptation.
Parameters in bf16 / fp16 keep an fp32 master copy in the optimizer state.

Two implementations share one state layout (``exp_avg``, ``exp_avg_sq`` and, for bf16 / fp16
parameters, ``master``, all fp32 and contiguous), so a state dict saved from one loads into the
other:

* fused (the default for CPU float32 / bfloat16 / float16 parameters): one native call per
  parameter group and dtype does the whole update in two passes over memory (one without trust
  ratio adaptation), plus one pass over the gradients for the global norm; it runs in
  slimforge's thread pool (:func:`slimforge.set_num_threads`), and its results do not depend on
  the number of threads;
* ``torch._foreach_*`` ops for everything else (CUDA tensors, float64), or for every tensor with
  ``fused=False``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from slimforge import _native

__all__ = ["Lamb", "param_groups"]

# Parameters in these dtypes get an fp32 master copy and fp32 moments.
_LOW_PRECISION = (torch.bfloat16, torch.float16)
# What the fused kernel takes (CPU tensors): the dtype names of `_native.lamb_step`.
_NATIVE_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")


def _grad(p: torch.Tensor) -> torch.Tensor:
    assert p.grad is not None
    return p.grad


def _np(t: torch.Tensor) -> np.ndarray:
    """A zero-copy NumPy view of a CPU tensor; bf16 / fp16 as their uint16 bits."""
    t = t.detach()
    return (t if t.dtype == torch.float32 else t.view(torch.uint16)).numpy()


def param_groups(
    model: nn.Module,
    weight_decay: float = 0.01,
    no_decay: Callable[[str, nn.Parameter], bool] | None = None,
) -> list[dict[str, Any]]:
    """Two groups: decayed (and adapted) weights, and ``weight_decay=0`` for biases, norms and
    other 1-D parameters (``no_decay(name, p)`` overrides the rule)."""
    rule = no_decay or (lambda name, p: p.ndim < 2)
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if rule(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": keep, "weight_decay": 0.0},
    ]


class Lamb(torch.optim.Optimizer):
    """LAMB with timm's defaults: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
    bias_correction=True, grad_averaging=True, max_grad_norm=1.0, trust_clip=False,
    always_adapt=False``. ``max_grad_norm=None`` disables the global gradient clipping done
    inside the step (over every group's gradients).

    ``fused``: ``None`` (default) runs the native kernel for CPU float32 / bfloat16 / float16
    parameters and torch's foreach ops for the others; ``True`` requires every parameter to be
    such a tensor (``ValueError`` otherwise); ``False`` always uses the foreach ops."""

    fused: bool | None = None  # also for optimizers pickled before the argument existed

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        grad_averaging: bool = True,
        max_grad_norm: float | None = 1.0,
        trust_clip: bool = False,
        always_adapt: bool = False,
        fused: bool | None = None,
    ) -> None:
        if not (lr >= 0 and eps >= 0 and weight_decay >= 0):
            raise ValueError(
                f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}"
            )
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        defaults = dict(
            lr=lr, bias_correction=bias_correction, betas=tuple(betas), eps=eps,
            weight_decay=weight_decay, grad_averaging=grad_averaging, trust_clip=trust_clip,
            always_adapt=always_adapt,
        )  # fmt: skip
        self.fused = fused
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer pickles (and deep-copies) only defaults, state and param_groups.
        state = super().__getstate__()
        return {**state, "max_grad_norm": self.max_grad_norm, "fused": self.fused}

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        if self.fused:
            for p in self.param_groups[-1]["params"]:
                self._fusable(p)

    def _fusable(self, p: torch.Tensor) -> bool:
        if self.fused is False:
            return False
        ok = p.device.type == "cpu" and p.dtype in _NATIVE_DTYPES
        if self.fused and not ok:
            raise ValueError(
                "Lamb(fused=True) updates CPU float32 / bfloat16 / float16 parameters, got a "
                f"{p.dtype} parameter on {p.device} (use fused=None or False)"
            )
        return ok

    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            low = p.dtype in _LOW_PRECISION
            work = torch.float32 if low else p.dtype
            contiguous = torch.contiguous_format
            state["exp_avg"] = torch.zeros_like(p, dtype=work, memory_format=contiguous)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=work, memory_format=contiguous)
            if low:
                state["master"] = p.detach().to(torch.float32, memory_format=contiguous, copy=True)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating-point state to the parameter's dtype: restore the fp32 moments and
        # master of bf16 / fp16 parameters from the saved tensors.
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params, strict=False):
            if p.dtype in _LOW_PRECISION and pid in saved:
                for key in _STATE_KEYS:
                    value = saved[pid].get(key)
                    if isinstance(value, torch.Tensor):
                        self.state[p][key] = value.to(
                            device=p.device, dtype=torch.float32, copy=True,
                            memory_format=torch.contiguous_format,
                        )  # fmt: skip

    def _clip_divisor(self, params: list[torch.Tensor]) -> torch.Tensor | float | None:
        """``max(1, ||g_all|| / max_grad_norm)``: a float from the native kernel when every
        parameter takes the fused path, else a tensor (no device sync)."""
        if self.max_grad_norm is None or not params:
            return None
        if all(self._fusable(p) for p in params):
            return self._native_clip_divisor(params)
        return self._torch_clip_divisor(params)

    def _native_clip_divisor(self, params: list[torch.Tensor]) -> torch.Tensor | float:
        """The global norm accumulated in float64 (deterministic, any thread count)."""
        assert self.max_grad_norm is not None
        buckets: dict[torch.dtype, list[np.ndarray]] = {}
        for p in params:
            buckets.setdefault(p.dtype, []).append(_np(_grad(p).contiguous()))
        total = sum(
            _native.lamb_grad_sq_norm(arrays, _NATIVE_DTYPES[dtype])
            for dtype, arrays in buckets.items()
        )
        # Rounded and divided in float32 like timm's `(norm / max_grad_norm).clamp_(min=1.0)`;
        # NaN / inf propagate, as with torch.clamp.
        d = float(np.float32(math.sqrt(total)) / np.float32(self.max_grad_norm))
        return 1.0 if d < 1.0 else d

    def _torch_clip_divisor(self, params: list[torch.Tensor]) -> torch.Tensor | float:
        """timm's formula: float32 norms per tensor, then the norm of those."""
        assert self.max_grad_norm is not None
        grads = [_grad(p) for p in params]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return (norm / self.max_grad_norm).clamp_(min=1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if any(_grad(p).is_sparse for p in with_grad):
            raise RuntimeError("Lamb does not support sparse gradients")
        divisor = self._clip_divisor(with_grad)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            t = group["step"]
            bc1 = 1 - beta1**t if group["bias_correction"] else 1.0
            bc2 = 1 - beta2**t if group["bias_correction"] else 1.0
            fused = [p for p in params if self._fusable(p)]
            rest = [p for p in params if not self._fusable(p)]
            if fused:
                self._fused_update(group, fused, divisor, bc1, bc2)
            if rest:
                self._foreach_update(group, rest, divisor, bc1, bc2)
        return loss

    def _fused_update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        divisor: torch.Tensor | float | None,
        bc1: float,
        bc2: float,
    ) -> None:
        beta1, beta2 = group["betas"]
        hyper = dict(
            lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], bias_correction1=bc1, bias_correction2=bc2,
            grad_averaging=group["grad_averaging"], trust_clip=group["trust_clip"],
            always_adapt=group["always_adapt"],
            clip_divisor=1.0 if divisor is None else float(divisor),
        )  # fmt: skip
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        for dtype, ps in by_dtype.items():
            low = dtype in _LOW_PRECISION
            masters, grads, ms, vs, halves = [], [], [], [], []
            copies: list[tuple[torch.Tensor, torch.Tensor]] = []
            for p in ps:
                state = self._state(p)
                for key in _STATE_KEYS:  # e.g. a state dict saved with other strides
                    value = state.get(key)
                    if value is not None and not (
                        value.dtype == torch.float32 and value.is_contiguous()
                    ):
                        state[key] = value.to(torch.float32).contiguous()
                if low:
                    master = state["master"]
                    halves.append(_np(p) if p.is_contiguous() else None)
                    if not p.is_contiguous():
                        copies.append((p, master))
                elif p.is_contiguous():
                    master = p
                else:
                    master = p.contiguous()
                    copies.append((p, master))
                masters.append(_np(master))
                grads.append(_np(_grad(p).contiguous()))
                ms.append(_np(state["exp_avg"]))
                vs.append(_np(state["exp_avg_sq"]))
            _native.lamb_step(
                masters, grads, ms, vs, dtype=_NATIVE_DTYPES[dtype],
                half_params=halves if low else None, **hyper,
            )  # fmt: skip
            for p, src in copies:
                p.copy_(src)
            # The kernel wrote through NumPy views: tell autograd the parameters changed.
            torch.autograd.graph.increment_version(ps)

    def _foreach_update(
        self,
        group: dict[str, Any],
        params: list[torch.Tensor],
        divisor: torch.Tensor | float | None,
        bc1: float,
        bc2: float,
    ) -> None:
        beta1, beta2 = group["betas"]
        masters: list[torch.Tensor] = []
        grads: list[torch.Tensor] = []
        ms: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        for p in params:
            state = self._state(p)
            low = p.dtype in _LOW_PRECISION
            masters.append(state.get("master", p))
            grads.append(_grad(p).float() if low else _grad(p))
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
        if divisor is not None:
            grads = list(torch._foreach_div(grads, divisor))  # type: ignore[arg-type]
        if group["grad_averaging"]:
            torch._foreach_lerp_(ms, grads, 1 - beta1)
        else:
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, grads)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2**0.5)
        torch._foreach_add_(denom, group["eps"])
        updates = torch._foreach_div(ms, bc1)
        torch._foreach_div_(updates, denom)
        wd = group["weight_decay"]
        if wd != 0:
            torch._foreach_add_(updates, masters, alpha=wd)
        if wd != 0 or group["always_adapt"]:
            w_norms = torch._foreach_norm(masters)
            u_norms = torch._foreach_norm(updates)
            for u, wn, un in zip(updates, w_norms, u_norms, strict=True):
                ratio = torch.where((wn > 0) & (un > 0), wn / un, torch.ones_like(wn))
                if group["trust_clip"]:
                    ratio = ratio.clamp(max=1.0)
                u.mul_(ratio)
        torch._foreach_add_(masters, updates, alpha=-group["lr"])
        for p, master in zip(params, masters, strict=True):
            if master is not p:
                p.copy_(master)
