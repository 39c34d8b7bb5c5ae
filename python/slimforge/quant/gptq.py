"""GPTQ: error-compensating post-training weight quantization (Frantar et al., 2022).

Follows IST-DASLab ``gptq.py``: H = 2 X X^T / n as a running mean over calibration tokens;
dead inputs (H_ii = 0) get H_ii = 1 and a zero weight column; damping ``damp * mean(diag H)``
retried with +0.01 per Cholesky failure; Hinv = upper Cholesky factor of H^-1; columns quantized
one by one with the error spread over the remaining columns, lazily in blocks of ``block_size``
columns. Inside a block the column loop runs in Rust (``_native.quant_gptq_block``: rows in
parallel, each row's block and the block of Hinv in cache), the update of the later columns is one
GEMM per block; float64, static groups and odd group sizes use the same loop in torch ops.

Groups and act-order: with ``act_order=True`` columns are processed by decreasing H_ii.

- ``static_groups=False`` (default): a group is ``group_size`` consecutive columns *in processing
  order*, its scale and zero fitted on the already error-corrected columns when the group starts.
  The group of input column k is ``g_idx[k]`` (the GPTQ checkpoint field). Since the groups are
  contiguous in processing order, the module keeps the weight in that order and permutes the input
  once per call (``InputTransformedLinear.perm``) instead of gathering ``g_idx`` per weight.
- ``static_groups=True``: groups are the natural contiguous column ranges, fitted once on the
  original weight before any update; no permutation is needed at inference.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from slimforge import _native
from slimforge.calibration import (
    Batch,
    HessianObserver,
    LinearGroup,
    all_finite,
    run_sequential,
)
from slimforge.nn.surgery import ModuleFilter, set_submodule
from slimforge.quant.api import QuantConfig, register_quantize_handler
from slimforge.quant.linear import QuantLinear
from slimforge.quant.primitives import group_qparams, quantize_codes, resolve_group_size
from slimforge.quant.transformed import InputTransformedLinear

__all__ = ["GPTQ", "GPTQResult", "gptq_quantize_weight", "quantize_gptq"]


@dataclass(frozen=True)
class GPTQ(QuantConfig):
    """GPTQ configuration (``quantize_(model, GPTQ(), calibration=batches)``).

    bits: 4 or 8. group_size: 32, 64, 128 or None/-1 (per-channel). damp: initial fraction of
    mean(diag H) added to the diagonal. act_order: process columns by decreasing H_ii.
    symmetric: absmax scale, mid-range zero. block_size: columns per lazy update.
    static_groups: fit groups on the original weight (see module docstring). max_damp_retries:
    Cholesky retries, each adding 0.01 to ``damp``.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    static_groups: bool = False
    max_damp_retries: int = 10

    needs_calibration: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp must be in [0, 1); got {self.damp}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive; got {self.block_size}")
        if self.max_damp_retries < 0:
            raise ValueError(f"max_damp_retries must be >= 0; got {self.max_damp_retries}")


@dataclass
class GPTQResult:
    """Quantized weight in the original column order.

    q: (out, in) uint8 codes in [0, 2^bits-1]. scales, zeros: (out, n_groups) float32, zeros
    integer-valued; w = (q - zeros[:, g_idx]) * scales[:, g_idx]. g_idx: (in,) int32 group of
    each input column. perm: (in,) int64 processing order when groups follow it (act-order with
    dynamic groups), else None. damp: the damping fraction that made H positive definite.
    """

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    perm: torch.Tensor | None
    bits: int
    group_size: int
    damp: float

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32 weight."""
        g = self.g_idx.long()
        return (self.q.float() - self.zeros[:, g]) * self.scales[:, g]

    def state(self, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor | int | None]:
        """The dict ``slimforge.quant.formats.gptq_layout.export_gptq`` takes."""
        return {
            "q": self.q,
            "scales": self.scales,
            "zeros": self.zeros,
            "g_idx": self.g_idx,
            "bias": bias,
            "bits": self.bits,
            "group_size": self.group_size,
        }

    def to_module(self, bias: torch.Tensor | None = None) -> nn.Module:
        """A ``QuantLinear`` (wrapped with the input permutation when groups need it)."""
        b = None if bias is None else bias.detach()
        if self.perm is None:
            return QuantLinear.from_quantized(
                self.q, self.scales, self.zeros, b, self.bits, self.group_size
            )
        inner = QuantLinear.from_quantized(
            self.q[:, self.perm], self.scales, self.zeros, b, self.bits, self.group_size
        )
        return InputTransformedLinear(inner, perm=self.perm)


def _inverse_cholesky(h: torch.Tensor, damp: float, retries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + d * mean(diag H) * I)^-1, raising d by 0.01 on failure."""
    n = h.shape[0]
    mean_diag = torch.diagonal(h).mean()
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    for attempt in range(retries + 1):
        d = damp + 0.01 * attempt
        chol, info = torch.linalg.cholesky_ex(h + d * mean_diag * eye)
        if int(info) == 0:
            hinv_upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0 and all_finite(hinv_upper):
                return hinv_upper, d
    raise RuntimeError(
        f"GPTQ: the Hessian is not positive definite even with damping {damp + 0.01 * retries:.3g} "
        f"x mean(diag H) after {retries} retries; the calibration data may be degenerate "
        "(too few samples or repeated rows): add data or raise GPTQ.damp"
    )


def _native_block(cfg: GPTQ, gs: int, w: torch.Tensor) -> int | None:
    """Block size for the Rust column loop, or None where it does not apply (it fits dynamic
    groups that start at block starts, on float32 CPU tensors)."""
    if w.dtype != torch.float32 or w.device.type != "cpu" or cfg.static_groups:
        return None
    if cfg.block_size % gs == 0:
        return cfg.block_size
    if gs % cfg.block_size == 0 and gs <= 1024:
        return gs  # one group per block: same result, larger triangle per block
    return None


def _column_loop_native(
    w_all: torch.Tensor, hinv: torch.Tensor, cfg: GPTQ, gs: int, block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The column loop with the Rust kernel (one call per block, rows in parallel) and the
    lazy update of later columns as one GEMM per block. w_all (out, in) is updated in place.
    Returns codes (out, in) uint8 and scales, zeros (out, n_groups), in processing order."""
    out_f, in_f = w_all.shape
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    scales = torch.empty(out_f, in_f // gs)
    zeros = torch.empty_like(scales)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        wb = w_all[:, i1:i2].clone()  # the kernel updates it in place; never a view of w_all
        hb = hinv[i1:i2, i1:i2].contiguous()
        c, e, sc, ze = _native.quant_gptq_block(wb.numpy(), hb.numpy(), cfg.bits, gs, cfg.symmetric)
        codes[:, i1:i2] = torch.from_numpy(c)
        scales[:, i1 // gs : i2 // gs] = torch.from_numpy(sc)
        zeros[:, i1 // gs : i2 // gs] = torch.from_numpy(ze)
        if i2 < in_f:
            w_all[:, i2:].addmm_(torch.from_numpy(e), hinv[i1:i2, i2:], alpha=-1)
    return codes, scales, zeros


def _column_loop_torch(
    w_all: torch.Tensor,
    hinv: torch.Tensor,
    cfg: GPTQ,
    gs: int,
    perm: torch.Tensor,
    s_cols: torch.Tensor | None,
    z_cols: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The column loop with torch vector ops (any dtype/device, static groups, any group size).
    s_cols/z_cols: (n_groups, out) static parameters, or None. Returns as _column_loop_native."""
    out_f, in_f = w_all.shape
    bits = cfg.bits
    n_groups = in_f // gs
    dtype = w_all.dtype
    # Work on W^T (in, out) so each column is a contiguous row and updates are BLAS ger/gemm.
    wt = w_all.T.contiguous()
    codes_t = torch.zeros_like(wt)
    scales = torch.zeros(n_groups, out_f, dtype=dtype, device=wt.device)
    zeros = torch.zeros_like(scales)
    scale = zero = torch.empty(0)
    for i1 in range(0, in_f, cfg.block_size):
        i2 = min(i1 + cfg.block_size, in_f)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if s_cols is not None and z_cols is not None:
                g = int(perm[col]) // gs
                scale, zero = s_cols[g], z_cols[g]
            elif col % gs == 0:
                end = col + gs
                if end <= i2:
                    rows = w1[i : end - i1]
                else:
                    # Columns past this block still owe the block's pending lazy updates.
                    pending = hinv[i1:col, i2:end].T @ err1[:i]
                    rows = torch.cat([w1[i:], wt[i2:end] - pending], dim=0)
                scale, zero = group_qparams(rows.T, bits, cfg.symmetric)
                scales[col // gs] = scale
                zeros[col // gs] = zero
            w = w1[i]
            q = quantize_codes(w, scale, zero, bits)
            codes_t[col] = q
            err = (w - (q - zero) * scale) / hinv1[i, i]
            w1[i:].addr_(hinv1[i, i:], err, alpha=-1)
            err1[i] = err
        wt[i2:].addmm_(hinv[i1:i2, i2:].T, err1, alpha=-1)
    return codes_t.T, scales.T, zeros.T


def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: GPTQ | None = None,
    dtype: torch.dtype = torch.float32,
    kernel: str = "auto",
) -> GPTQResult:
    """Quantize one weight (out, in) with GPTQ given its Hessian (in, in).

    ``dtype`` is the working precision (float64 for references). ``kernel``: "native" runs the
    column loop in Rust (float32 on the CPU, dynamic groups, group size dividing the block size or
    a multiple of it up to 1024), "torch" with torch vector ops (anything), "auto" the native one
    where it applies. Raises ValueError on shape mismatch or NaN/Inf, RuntimeError when damping
    cannot make H positive definite.
    """
    cfg = config or GPTQ()
    if kernel not in ("auto", "native", "torch"):
        raise ValueError(f"kernel must be 'auto', 'native' or 'torch'; got {kernel!r}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in); got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ValueError(
            f"hessian must be ({in_f}, {in_f}) for a weight with {in_f} input features; "
            f"got {tuple(hessian.shape)}"
        )
    gs = resolve_group_size(cfg.group_size, in_f)
    if not all_finite(weight):
        raise ValueError("weight contains NaN or Inf")
    if not all_finite(hessian):
        raise ValueError("hessian contains NaN or Inf (check the calibration activations)")
    bits = cfg.bits
    w_all = weight.detach().to(dtype).clone()
    h = hessian.detach().to(dtype=dtype, device=w_all.device).clone()

    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1
    w_all[:, dead] = 0

    n_groups = in_f // gs
    if cfg.static_groups:
        wg = w_all.reshape(out_f * n_groups, gs)
        s_static, z_static = group_qparams(wg, bits, cfg.symmetric)
        s_static = s_static.reshape(out_f, n_groups)
        z_static = z_static.reshape(out_f, n_groups)

    if cfg.act_order:
        perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
        w_all = w_all[:, perm]
        h = h[perm[:, None], perm]
    else:
        perm = torch.arange(in_f, device=w_all.device)

    block = _native_block(cfg, gs, w_all)
    if kernel == "native" and block is None:
        raise ValueError(
            "the native GPTQ kernel needs float32 on the CPU, dynamic groups and a group size "
            "that divides the block size (or a multiple of it up to 1024)"
        )
    hinv, damp_used = _inverse_cholesky(h, cfg.damp, cfg.max_damp_retries)
    if block is not None and kernel != "torch":
        codes, scales, zeros = _column_loop_native(w_all, hinv, cfg, gs, block)
    else:
        s_cols = z_cols = None
        if cfg.static_groups:
            s_cols, z_cols = s_static.T, z_static.T
        codes, scales, zeros = _column_loop_torch(w_all, hinv, cfg, gs, perm, s_cols, z_cols)

    inv = torch.argsort(perm)
    q_orig = codes[:, inv].to(torch.uint8)
    if cfg.static_groups:
        g_idx = torch.arange(in_f, device=w_all.device) // gs
        return GPTQResult(
            q_orig, s_static.float(), z_static.float(), g_idx.int(), None, bits, gs, damp_used
        )
    g_idx = (inv // gs).int()
    return GPTQResult(
        q_orig,
        scales.float(),
        zeros.float(),
        g_idx,
        perm.long() if cfg.act_order else None,
        bits,
        gs,
        damp_used,
    )


def quantize_gptq(
    model: nn.Module,
    config: GPTQ,
    calibration: Iterable[Batch],
    filter_fn: ModuleFilter | None = None,
    *,
    spec: Any = "auto",
    progress: bool = True,
) -> dict[str, GPTQResult]:
    """Quantize the model's linears with GPTQ, block by block, in place.

    calibration: an iterable of batches, each a Tensor (``model(batch)``), a dict of model inputs
    (``model(**batch)``) or a tuple (``model(*batch)``). Blocks are those of the model's
    :class:`~slimforge.models.spec.ModelSpec` (``spec="auto"`` finds it; a model without one is
    a single block); selected linears outside the blocks are left as they are. Inside a block,
    linears reading the same input (q/k/v) are quantized together and later ones see the
    quantized outputs of earlier ones. Selected ``nn.Linear`` modules are replaced by
    ``QuantLinear`` (wrapped in ``InputTransformedLinear`` for act-order with dynamic groups).
    Returns ``{module name: GPTQResult}``. ``quantize_(model, GPTQ(), calibration=batches)``
    is the same call.
    """
    if not isinstance(config, GPTQ):
        raise TypeError(f"config must be a GPTQ, got {type(config).__name__}")
    results: dict[str, GPTQResult] = {}

    def make_observer(lin: nn.Linear) -> HessianObserver:
        return HessianObserver(lin.in_features)

    def process(group: LinearGroup) -> None:
        # Linears of a group read the same input, so they share H: one GPTQ pass over their
        # stacked rows is exact and cuts the per-column overhead.
        weights = torch.cat([lin.weight.detach() for lin in group.modules], dim=0)
        res = gptq_quantize_weight(weights, group.observers[0].hessian, config)
        start = 0
        for name, lin in zip(group.names, group.modules, strict=True):
            rows = slice(start, start + lin.out_features)
            start += lin.out_features
            part = GPTQResult(
                res.q[rows].contiguous(),
                res.scales[rows].contiguous(),
                res.zeros[rows].contiguous(),
                res.g_idx,
                res.perm,
                res.bits,
                res.group_size,
                res.damp,
            )
            lin.weight.data.copy_(part.dequantize().to(lin.weight.dtype))
            results[name] = part

    run_sequential(
        model,
        calibration,
        make_observer,
        process,
        filter_fn,
        spec=spec,
        progress=progress,
        desc="GPTQ",
    )
    for name, res in results.items():
        lin = model.get_submodule(name)
        set_submodule(model, name, res.to_module(lin.bias))
    return results


@register_quantize_handler(GPTQ, model_level=True)
def _gptq_model(
    model: nn.Module,
    config: GPTQ,
    calibration: Iterable[Batch],
    filter_fn: ModuleFilter,
    spec: Any,
    progress: bool,
) -> nn.Module:
    quantize_gptq(model, config, calibration, filter_fn, spec=spec, progress=progress)
    return model
