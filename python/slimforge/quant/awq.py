"""AWQ: activation-aware weight quantization (Lin et al., 2023; mit-han-lab/llm-awq).

Per group of linears that read the same input (q/k/v, gate/up, ...):

1. Scale search: x_mean = mean |x| per input channel; for r = i / n_grid (i < n_grid),
   AutoAWQ's "duo" scales s = x_mean^r / w_mean^(1-r) with w_mean the mean over rows of
   |w| / (its group's max |w|) (``scales="duo"``, the default), or llm-awq's s = x_mean^r
   (``scales="activation"``), or both families (``scales="both"``); s /= sqrt(max s * min s);
   loss = MSE of the group's outputs ``x W^T`` against ``x (Q(W diag(s)) diag(s)^-1)^T``; keep the
   best s. s = 1 (plain RTN) is always a candidate, so the chosen s never does worse than RTN on
   the calibration rows.
2. Clip search (``clip=True``): per output row and group, the clip threshold
   max|w| * (1 - i/20), i < 10, minimising the group-local output MSE; skipped for the query/key
   projections the model's spec names (their error is amplified by the softmax); a fused q/k/v
   projection has only its value rows clipped, as a separate ``v_proj`` would be.
3. Fold: W <- W diag(s). When the group's input is the output of the norm the spec names for it
   (confirmed by tensor identity during calibration), the norm's weight (and bias) are divided
   by s, which is free at inference. Otherwise the scale stays in the module as a ``pre_scale``
   buffer of ``InputTransformedLinear`` that divides the input by s (one elementwise op per call).

The quantizer is the library's one affine quantizer (``slimforge.quant.primitives``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from slimforge.calibration import Batch, InputStats, LinearGroup, run_sequential
from slimforge.models.spec import BlockSpec
from slimforge.nn.surgery import ModuleFilter, set_submodule
from slimforge.quant.api import QuantConfig, register_quantize_handler
from slimforge.quant.linear import QuantLinear
from slimforge.quant.primitives import fake_quantize_affine, resolve_group_size
from slimforge.quant.transformed import InputTransformedLinear

__all__ = ["AWQ", "AWQResult", "awq_clip", "awq_search_scale", "quantize_awq"]

_SCALE_FAMILIES = ("activation", "duo", "both")


@dataclass(frozen=True)
class AWQ(QuantConfig):
    """AWQ configuration (``quantize_(model, AWQ(), calibration=batches)``).

    bits, group_size: as RTN (4 or 8; 32, 64, 128 or None). n_grid: scale exponents tried.
    scales: candidate family, "duo" (x_mean^r / w_mean^(1-r), AutoAWQ's default, and ours),
    "activation" (x_mean^r, llm-awq) or "both" (2 * n_grid candidates). clip: run the clip
    search. symmetric: zero fixed at 2^(bits-1). max_rows: calibration rows kept per group for
    the searches. clip_rows: rows used by the clip search (its cost hardly depends on them: it
    works on per-group Gram matrices). fold_norms: fold scales into a
    preceding LayerNorm/RMSNorm when the input comes straight from one.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    n_grid: int = 20
    clip: bool = True
    max_rows: int = 4096
    clip_rows: int = 4096
    fold_norms: bool = True
    scales: str = "duo"

    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scales not in _SCALE_FAMILIES:
            raise ValueError(f"scales must be one of {_SCALE_FAMILIES}; got {self.scales!r}")
        if self.n_grid < 1:
            raise ValueError(f"n_grid must be >= 1; got {self.n_grid}")
        if self.max_rows < 1 or self.clip_rows < 1:
            raise ValueError("max_rows and clip_rows must be >= 1")


@dataclass
class AWQResult:
    """q: (out, in) uint8 codes of W diag(s) (clipped); scales, zeros: (out, in//gs) float32;
    pre_scale: (in,) float32 the input is divided by, or None when folded into a norm;
    input_scale: the searched s (always set), loss_rtn / loss: calibration output MSE at s = 1
    and at the chosen s."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    pre_scale: torch.Tensor | None
    input_scale: torch.Tensor
    bits: int
    group_size: int
    loss_rtn: float
    loss: float

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32 weight in the original input space (scale undone)."""
        g = torch.arange(self.q.shape[1], device=self.q.device) // self.group_size
        w = (self.q.float() - self.zeros[:, g]) * self.scales[:, g]
        return w / self.input_scale

    def to_module(self, bias: torch.Tensor | None = None) -> nn.Module:
        b = None if bias is None else bias.detach()
        inner = QuantLinear.from_quantized(
            self.q, self.scales, self.zeros, b, self.bits, self.group_size
        )
        if self.pre_scale is None:
            return inner
        return InputTransformedLinear(inner, pre_scale=self.pre_scale)


def awq_search_scale(
    weights: list[torch.Tensor], x: torch.Tensor, x_mean: torch.Tensor, config: AWQ
) -> tuple[torch.Tensor, float, float]:
    """Best per-input-channel scale for linears sharing input ``x`` (n, in).

    weights: list of (out_i, in). x_mean: (in,) mean |x|. Returns (s (in,) float32,
    loss at s = 1, loss at s).
    """
    w = torch.cat([wi.detach().float() for wi in weights], dim=0)
    if x.shape[-1] != w.shape[1] or x_mean.shape != (w.shape[1],):
        raise ValueError(
            f"inputs have {x.shape[-1]} features (mean {tuple(x_mean.shape)}), "
            f"weights expect {w.shape[1]}"
        )
    x = x.float()
    n_rows, in_f = x.shape
    gs = resolve_group_size(config.group_size, in_f)
    # mean((x (W - Wq)^T)^2) = tr(D G D^T) / (n out) with G = x^T x: cheaper when n > in.
    gram = x.T @ x if n_rows > in_f else None

    def loss_of(s: torch.Tensor) -> float:
        wq = fake_quantize_affine(w * s, config.bits, gs, config.symmetric)[0] / s
        diff = w - wq
        if gram is not None:
            return float(((diff @ gram) * diff).sum()) / (n_rows * w.shape[0])
        return float(((x @ diff.T) ** 2).mean())

    x_mean = x_mean.float()
    w_mean = None
    if config.scales != "activation":
        wg = w.abs().reshape(w.shape[0], -1, gs)
        w_mean = (wg / (wg.amax(dim=-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(dim=0)
    best_s = torch.ones_like(x_mean)
    best_loss = loss_rtn = loss_of(best_s)
    for i in range(config.n_grid):
        r = i / config.n_grid
        xr = x_mean.pow(r)
        cands = []
        if config.scales != "duo" and i > 0:  # i = 0 is s = 1, scored above
            cands.append(xr)
        if w_mean is not None:
            cands.append(xr / (w_mean.pow(1 - r) + 1e-4))
        for s in cands:
            s = s.clamp(min=1e-4)
            s = s / torch.sqrt(s.max() * s.min())
            loss = loss_of(s)
            if loss < best_loss:
                best_loss, best_s = loss, s
    if not math.isfinite(best_loss):
        raise ValueError(
            "AWQ scale search produced a non-finite loss (NaN/Inf in inputs or weights)"
        )
    return best_s, loss_rtn, best_loss


def awq_clip(
    w: torch.Tensor, x: torch.Tensor, config: AWQ, n_grid: int = 20, max_shrink: float = 0.5
) -> torch.Tensor:
    """Clip each (row, group) of ``w`` (out, in) to the threshold minimising the group-local output
    MSE on ``x`` (n, in): thresholds max|w| * (1 - i/n_grid), i < max_shrink * n_grid.

    The group-local MSE of a row's group g, mean over rows of x of (x_g . (q_g - w_g))^2, equals
    d^T G_g d / n with d = q_g - w_g and G_g = x_g^T x_g, so each threshold costs one
    (group, group) product per row and group instead of one pass over the calibration rows.
    """
    out_f, in_f = w.shape
    gs = resolve_group_size(config.group_size, in_f)
    ng = in_f // gs
    x = x.float()
    if x.shape[0] > config.clip_rows:
        x = x[:: x.shape[0] // config.clip_rows][: config.clip_rows]
    xg = x.reshape(x.shape[0], ng, gs).transpose(0, 1)  # (ng, n, gs)
    gram = (xg.transpose(1, 2) @ xg) / x.shape[0]  # (ng, gs, gs)
    w = w.detach().float()
    clipped = torch.empty_like(w)
    # Rows per chunk so the (groups, rows, group_size) temporaries stay near 16M elements.
    chunk = max(1, (1 << 24) // in_f)
    for r0 in range(0, out_f, chunk):
        wc = w[r0 : r0 + chunk].reshape(-1, ng, gs)
        amax = wc.abs().amax(dim=-1, keepdim=True)
        best_err = torch.full(wc.shape[:2], math.inf, device=w.device)
        best_max = amax.clone()
        for i in range(int(max_shrink * n_grid)):
            mx = amax * (1 - i / n_grid)
            cur = torch.maximum(torch.minimum(wc, mx), -mx).reshape(-1, in_f)
            deq = fake_quantize_affine(cur, config.bits, gs, config.symmetric)[0]
            deq = deq.reshape(-1, ng, gs)
            d = (deq - wc).transpose(0, 1)  # (ng, rows, gs)
            err = ((d @ gram) * d).sum(dim=-1).T  # (rows, ng)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], mx, best_max)
        clipped[r0 : r0 + chunk] = torch.maximum(torch.minimum(wc, best_max), -best_max).reshape(
            -1, in_f
        )
    return clipped


def _quantize_group(
    weights: list[torch.Tensor],
    clip_rows: list[slice | None],
    x: torch.Tensor,
    x_mean: torch.Tensor,
    config: AWQ,
    folded: bool,
) -> list[AWQResult]:
    """AWQ of linears sharing input ``x``: one searched scale, then per linear the clip search
    on ``clip_rows`` (None: no clipping) and the quantization."""
    s, loss_rtn, loss = awq_search_scale(weights, x, x_mean, config)
    results = []
    for w, rows in zip(weights, clip_rows, strict=True):
        gs = resolve_group_size(config.group_size, w.shape[1])
        ws = w.detach().float() * s
        if config.clip and rows is not None:
            ws[rows] = awq_clip(ws[rows], x / s, config)
        _, q, scales, zeros = fake_quantize_affine(ws, config.bits, gs, config.symmetric)
        results.append(
            AWQResult(
                q,
                scales.float(),
                zeros.float(),
                None if folded else s.clone(),
                s.clone(),
                config.bits,
                gs,
                loss_rtn,
                loss,
            )
        )
    return results


def _clip_rows(block: BlockSpec | None, local_name: str, lin: nn.Linear) -> slice | None:
    """Rows the clip search may change, as the block's spec says (all rows without a spec)."""
    if block is None:
        return slice(None)
    return block.clip_rows(local_name, lin.out_features)


def quantize_awq(
    model: nn.Module,
    config: AWQ,
    calibration: Iterable[Batch],
    filter_fn: ModuleFilter | None = None,
    *,
    spec: Any = "auto",
    progress: bool = True,
) -> dict[str, AWQResult]:
    """Quantize the model's linears with AWQ, block by block, in place.

    Calibration and block handling as :func:`slimforge.quant.gptq.quantize_gptq`. The model's
    spec says which norm feeds each group (the scale is folded into it) and which projections
    compute queries and keys (not clipped); without a spec every scale stays in its module and
    every row may be clipped. Selected linears become ``QuantLinear`` (wrapped in
    ``InputTransformedLinear`` when the scale could not be folded into a norm). Returns
    ``{module name: AWQResult}``. ``quantize_(model, AWQ(), calibration=batches)`` is the same.
    """
    if not isinstance(config, AWQ):
        raise TypeError(f"config must be an AWQ, got {type(config).__name__}")
    results: dict[str, AWQResult] = {}

    def make_observer(lin: nn.Linear) -> InputStats:
        return InputStats(lin.in_features, config.max_rows)

    def process(group: LinearGroup) -> None:
        stats = group.observers[0]
        norm = group.producer if config.fold_norms else None
        if norm is not None and getattr(norm, "weight", None) is None:
            norm = None
        if norm is not None and norm.weight.shape != (group.modules[0].in_features,):
            norm = None
        rows = [
            _clip_rows(group.block, n, m)
            for n, m in zip(group.local_names, group.modules, strict=True)
        ]
        res = _quantize_group(
            [m.weight for m in group.modules],
            rows,
            stats.samples(),
            stats.mean_abs,
            config,
            folded=norm is not None,
        )
        for name, lin, r in zip(group.names, group.modules, res, strict=True):
            deq = r.dequantize()
            if norm is not None:
                deq = deq * r.input_scale  # the norm now carries 1/s
            lin.weight.data.copy_(deq.to(lin.weight.dtype))
            results[name] = r
        if norm is not None:
            s = res[0].input_scale
            norm.weight.data.div_(s.to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.data.div_(s.to(norm.bias.dtype))

    run_sequential(
        model,
        calibration,
        make_observer,
        process,
        filter_fn,
        spec=spec,
        progress=progress,
        desc="AWQ",
        find_producers=config.fold_norms,
    )
    for name, r in results.items():
        lin = model.get_submodule(name)
        set_submodule(model, name, r.to_module(lin.bias))
    return results


@register_quantize_handler(AWQ, model_level=True)
def _awq_model(
    model: nn.Module,
    config: AWQ,
    calibration: Iterable[Batch],
    filter_fn: ModuleFilter,
    spec: Any,
    progress: bool,
) -> nn.Module:
    quantize_awq(model, config, calibration, filter_fn, spec=spec, progress=progress)
    return model
