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
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["Lamb", "param_groups"]

# Parameters in these dtypes get an fp32 master copy and fp32 moments.
_LOW_PRECISION = (torch.bfloat16, torch.float16)


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
    inside the step (over every group's gradients)."""

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
        super().__init__(params, defaults)
        self.max_grad_norm = max_grad_norm

    def _clip_divisor(self) -> torch.Tensor | None:
        if self.max_grad_norm is None:
            return None
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return None
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        return (norm / self.max_grad_norm).clamp_(min=1.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        divisor = self._clip_divisor()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("Lamb does not support sparse gradients")
            beta1, beta2 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            t = group["step"]
            bc1 = 1 - beta1**t if group["bias_correction"] else 1.0
            bc2 = 1 - beta2**t if group["bias_correction"] else 1.0
            masters, grads, ms, vs = [], [], [], []
            for p in params:
                state = self.state[p]
                low = p.dtype in _LOW_PRECISION
                if not state:
                    work = torch.float32 if low else p.dtype
                    state["exp_avg"] = torch.zeros_like(p, dtype=work)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=work)
                    if low:
                        state["master"] = p.detach().float().clone()
                masters.append(state.get("master", p))
                grads.append(p.grad.float() if low else p.grad)
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
            if divisor is not None:
                grads = torch._foreach_div(grads, divisor)
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
        return loss
