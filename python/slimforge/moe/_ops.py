"""Routing, dispatch plans and the permute / combine autograd functions behind `MoE`.

CPU tensors run the Rust kernels of `slimforge._native`; CUDA tensors run the kernels of
`slimforge._cuda` (imported on first use). Gather (`permute`) and scatter (`combine`) are each
other's adjoints, so each one's backward is the other kernel.

Each kernel is also a torch custom op with a fake kernel (`slimforge::moe_route`,
`moe_dispatch_plan`, `moe_permute_rows`, `moe_combine_rows`, `moe_rowdot`, and the
differentiable `moe_permute` / `moe_combine`). `route_topk`, `dispatch_plan`, `permute` and
`combine` call the ops while `torch.compile` traces them, and the kernels directly (no op
dispatch, which costs ~10 us a call) in eager mode. The dropless, unpadded plan has static
shapes (`T * k` rows); with a capacity or padding the row count is data-dependent (an unbacked
size under torch.compile).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from slimforge import _native

ROW_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
ROUTERS = ("softmax", "sigmoid")
#: Most experts a dispatch plan may have (2^20; the Rust core rejects more).
MAX_EXPERTS = int(_native.MOE_MAX_EXPERTS)


def _count(name: str, value: Any) -> int:
    """``value`` as an int (``operator.index``: no floats, no silent truncation), else TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool")
    if isinstance(value, int):  # the common case, and what torch.compile traces
        return value
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of routing weights and of accumulation for rows of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _np_rows(t: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a contiguous CPU tensor; bfloat16 as its uint16 bits."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, dim], got shape {tuple(t.shape)}")
    if t.dtype not in ROW_DTYPES:
        raise TypeError(f"{name} must be float32, float64 or bfloat16, got {t.dtype}")


def _cuda_ops() -> Any:
    try:
        from slimforge import _cuda
    except ImportError as e:
        raise RuntimeError(
            "MoE permute/combine on CUDA tensors needs slimforge._cuda, which is not available "
            "in this build; move the tensors to the CPU or install a CUDA-enabled slimforge"
        ) from e
    if not _cuda.cuda_available():
        raise RuntimeError(
            "slimforge._cuda is present but reports no usable CUDA device/driver/NVRTC"
        )
    return _cuda


def _device_path(t: torch.Tensor) -> bool:
    """Whether work on `t` stays on its device (torch ops and `slimforge._cuda` kernels, no host
    round trip) rather than going to the Rust host kernels: true for CUDA tensors."""
    return t.device.type != "cpu"


def _check_device(t: torch.Tensor) -> None:
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"MoE kernels run on CPU or CUDA tensors, got device {t.device}")


# --- raw kernels (no autograd) -------------------------------------------------------------


def permute_rows(
    x: torch.Tensor, token_of: torch.Tensor, row_scale: torch.Tensor | None = None
) -> torch.Tensor:
    """`out[i] = row_scale[i] * x[token_of[i]]`, zero rows where `token_of[i] == -1`.

    x: (T, D) float32/float64/bfloat16; token_of: (rows,) int64; row_scale: (rows,) float32
    (float64 for float64 x). Returns (rows, D) in x's dtype.
    """
    _check_rows("x", x)
    _check_device(x)
    if _device_path(x) and not (x.is_cuda and x.dtype != torch.float64):
        # The CUDA kernels cover float32/bfloat16/float16; float64 (tests) uses torch indexing.
        padded = torch.cat([x, x.new_zeros((1, x.shape[1]))])
        out = padded[torch.where(token_of < 0, x.shape[0], token_of)]
        return out if row_scale is None else out * row_scale[:, None]
    if x.is_cuda:
        cuda = _cuda_ops()
        pad = token_of < 0
        out = cuda.moe_permute_cuda(x.contiguous(), token_of.clamp(min=0).contiguous())
        if row_scale is not None:
            out = (out.to(row_scale.dtype) * row_scale[:, None]).to(x.dtype)
        return out.masked_fill(pad[:, None], 0)
    out = torch.empty((token_of.shape[0], x.shape[1]), dtype=x.dtype)
    scale = None if row_scale is None else row_scale.detach().contiguous().numpy()
    _native.moe_permute(
        _np_rows(x.contiguous()), token_of.contiguous().numpy(), _np_rows(out), scale
    )
    return out


def combine_rows(
    ys: torch.Tensor, pos: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """`out[t] = sum_s weights[t, s] * ys[pos[t, s]]`, skipping `pos == -1` (unit weights if None).

    ys: (rows, D); pos: (T, k) int64; weights: (T, k) float32 (float64 for float64 ys).
    Returns (T, D) in ys's dtype.
    """
    _check_rows("ys", ys)
    _check_device(ys)
    if _device_path(ys) and not (ys.is_cuda and ys.dtype != torch.float64):
        padded = torch.cat([ys, ys.new_zeros((1, ys.shape[1]))])
        picked = padded[torch.where(pos < 0, ys.shape[0], pos)]
        return picked.sum(1) if weights is None else (picked * weights[..., None]).sum(1)
    if ys.is_cuda:
        cuda = _cuda_ops()
        w = (
            torch.ones(pos.shape, dtype=acc_dtype(ys.dtype), device=ys.device)
            if weights is None
            else weights
        )
        if ys.shape[0] == 0:
            return ys.new_zeros((pos.shape[0], ys.shape[1]))
        keep = pos >= 0
        return cuda.moe_combine_cuda(
            ys.contiguous(), pos.clamp(min=0).contiguous(), (w * keep).contiguous()
        )
    out = torch.empty((pos.shape[0], ys.shape[1]), dtype=ys.dtype)
    w = None if weights is None else weights.detach().contiguous().numpy()
    _native.moe_combine(_np_rows(ys.contiguous()), pos.contiguous().numpy(), _np_rows(out), w)
    return out


def rowdot_rows(dy: torch.Tensor, ys: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """`out[t, s] = <dy[t], ys[pos[t, s]]>` (0 where `pos == -1`), in the accumulation dtype."""
    if _device_path(dy):
        acc = acc_dtype(dy.dtype)
        if ys.shape[0] == 0:
            return torch.zeros(pos.shape, dtype=acc, device=dy.device)
        picked = ys[pos.clamp(min=0)].to(acc)
        return (dy.to(acc)[:, None, :] * picked).sum(-1) * (pos >= 0)
    out = _native.moe_rowdot(_np_rows(dy.contiguous()), _np_rows(ys.contiguous()), pos.numpy())
    return torch.from_numpy(out)


# --- routing and plans ---------------------------------------------------------------------


def route_topk(
    logits: torch.Tensor,
    top_k: int,
    router: str = "softmax",
    bias: torch.Tensor | None = None,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick `top_k` experts per token from router logits (no autograd).

    logits: (T, E), any float dtype (scored in float32, or float64 for float64 logits).
    router: "softmax" (Mixtral: softmax, top-k, renormalise) or "sigmoid" (DeepSeek-V3).
    bias: (E,) added to the scores for the selection only. Ties go to the lower expert index.
    Returns idx (T, k) int64, best first, and weights (T, k) in the scoring dtype, on logits'
    device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [tokens, experts], got shape {tuple(logits.shape)}")
    if router not in ROUTERS:
        raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
    num_experts = logits.shape[1]
    top_k = _count("top_k", top_k)
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts} (the number of experts), got {top_k}")
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(f"bias must have shape ({num_experts},), got {tuple(bias.shape)}")
    if _device_path(logits):
        return _route_device(logits, top_k, router, bias, renormalize)
    if torch.compiler.is_compiling():
        return torch.ops.slimforge.moe_route(logits, top_k, router, bias, renormalize)
    return _route_host(logits, top_k, router, bias, renormalize)


def _route_device(
    logits: Tensor, top_k: int, router: str, bias: Tensor | None, renormalize: bool
) -> tuple[Tensor, Tensor]:
    """`route_topk` with torch ops on logits' device: no host round trip, no sync (NaN logits
    are not detected here)."""
    dtype = acc_dtype(logits.dtype)
    scores = logits.detach().to(dtype)
    scores = scores.softmax(-1) if router == "softmax" else scores.sigmoid()
    select = scores if bias is None else scores + bias.detach().to(dtype)
    # A stable descending sort sends ties to the lower expert index, as the Rust router does.
    idx = torch.sort(select, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = scores.gather(1, idx)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    return idx, weights


def _route_host(
    logits: Tensor, top_k: int, router: str, bias: Tensor | None, renormalize: bool
) -> tuple[Tensor, Tensor]:
    dtype = acc_dtype(logits.dtype)
    scores = logits.detach().to(device="cpu", dtype=dtype).contiguous()
    b = None if bias is None else bias.detach().to(device="cpu", dtype=dtype).contiguous().numpy()
    idx, w = _native.moe_route(scores.numpy(), top_k, router, b, renormalize)
    return (
        torch.from_numpy(idx).to(logits.device),
        torch.from_numpy(w).to(logits.device),
    )


@dataclass(frozen=True)
class DispatchPlan:
    """Where each token slot goes in expert order (see `dispatch_plan`).

    Slot `a = t * k + s` is token t's s-th choice. Expert e's rows are
    `offsets[e] : offsets[e] + counts[e]`, in token order.
    """

    routed: torch.Tensor  # (E,) int64: slots that chose each expert, before the capacity cut
    counts: torch.Tensor  # (E,) int64: slots kept per expert
    offsets: torch.Tensor  # (E + 1,) int64: first row of each expert's block; total rows last
    token_of: torch.Tensor  # (rows,) int64: token of each row, -1 for padding rows
    slot_of: torch.Tensor  # (rows,) int64: slot of each row, -1 for padding rows
    pos: torch.Tensor  # (T, k) int64: row of each slot, -1 if dropped
    # number of dropped slots (a 0-dim int64 tensor under torch.compile and in plans built on
    # a CUDA device: no host sync)
    dropped: int
    padded: bool  # every expert has offsets[1] rows (for a [E, rows, D] batched matmul)

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_rows(self) -> int:
        # Not int(): under torch.compile this is a symbolic (possibly unbacked) size.
        return self.token_of.shape[0]

    def to(self, device: torch.device | str) -> DispatchPlan:
        """The same plan with its index tensors on `device`."""
        move = {
            name: getattr(self, name).to(device)
            for name in ("routed", "counts", "offsets", "token_of", "slot_of", "pos")
        }
        return DispatchPlan(**move, dropped=self.dropped, padded=self.padded)


def dispatch_plan(
    idx: torch.Tensor, num_experts: int, capacity: int | None = None, padded: bool = False
) -> DispatchPlan:
    """Stable counting sort of the slots of `idx` (T, k) by expert, O(T * k).

    capacity: each expert keeps its first `capacity` slots in token order; the rest are dropped
    (pos = -1) and contribute zero. padded: every expert gets max(counts) rows, padding rows
    marked -1, so expert inputs reshape to (E, rows, D).

    CPU ids go to the Rust kernel. CUDA ids stay on the device (torch ops, no host sync) when
    the plan's size is known without reading the ids: dropless and unpadded (T * k rows), or
    padded with a capacity (every expert then gets min(capacity, T * k) rows instead of
    max(counts)). The other two cases build the plan on the host (one round trip).
    """
    if idx.dim() != 2:
        raise ValueError(f"idx must be 2-D [tokens, top_k], got shape {tuple(idx.shape)}")
    num_experts = _count("num_experts", num_experts)
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in 1..{MAX_EXPERTS}, got {num_experts}")
    if capacity is not None:
        capacity = _count("capacity", capacity)
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0 or None, got {capacity}")
        # No expert receives more than every slot: larger capacities mean the same (and fit int64).
        capacity = min(capacity, 2**62)
    if _device_path(idx) and (capacity is None) != padded:
        return _dispatch_plan_device(idx, num_experts, capacity)
    if torch.compiler.is_compiling():
        routed, counts, offsets, token_of, slot_of, pos = torch.ops.slimforge.moe_dispatch_plan(
            idx, num_experts, capacity, padded
        )
        return DispatchPlan(
            routed=routed,
            counts=counts,
            offsets=offsets,
            token_of=token_of,
            slot_of=slot_of,
            pos=pos,
            dropped=(routed - counts).sum(),  # type: ignore[arg-type]
            padded=padded,
        )
    return _dispatch_plan_host(idx, num_experts, capacity, padded)


def _dispatch_plan_device(idx: Tensor, num_experts: int, capacity: int | None) -> DispatchPlan:
    """`dispatch_plan` with torch ops on idx's device, every shape fixed by T, k, E and the
    capacity (no host sync, so CUDA graphs and torch.compile can take it).

    Dropless: the same plan as the host's. With a capacity, every expert gets a block of
    min(capacity, T * k) rows (padded=True): its kept slots first, in token order, then
    padding rows (token_of = -1).
    """
    num_tokens, top_k = idx.shape
    slots = num_tokens * top_k
    device = idx.device
    flat = idx.reshape(-1).to(torch.int64)
    expert, order = torch.sort(flat, stable=True)  # slots by expert, token order within one
    routed = torch.zeros(num_experts, dtype=torch.int64, device=device)
    routed.scatter_add_(0, flat, torch.ones_like(flat))
    zero = routed.new_zeros(1)
    if capacity is None:
        row = torch.arange(slots, device=device)
        pos = torch.empty_like(row).scatter_(0, order, row).view(num_tokens, top_k)
        return DispatchPlan(
            routed=routed,
            counts=routed,
            offsets=torch.cat([zero, routed.cumsum(0)]),
            token_of=order // top_k,
            slot_of=order,
            pos=pos,
            dropped=zero[0],  # type: ignore[arg-type]
            padded=False,
        )
    block = min(capacity, slots)
    rows = num_experts * block
    start = torch.cat([zero, routed.cumsum(0)[:-1]])
    rank = torch.arange(slots, device=device) - start[expert]
    # Dropped slots are written to one extra row past the end, which is cut off.
    dest = torch.where(rank < block, expert * block + rank, rows)
    token_of = torch.full((rows + 1,), -1, dtype=torch.int64, device=device)
    slot_of = torch.full_like(token_of, -1)
    token_of.scatter_(0, dest, order // top_k)
    slot_of.scatter_(0, dest, order)
    pos = torch.empty_like(flat).scatter_(0, order, torch.where(dest < rows, dest, -1))
    counts = routed.clamp(max=block)
    return DispatchPlan(
        routed=routed,
        counts=counts,
        offsets=torch.arange(num_experts + 1, device=device) * block,
        token_of=token_of[:rows],
        slot_of=slot_of[:rows],
        pos=pos.view(num_tokens, top_k),
        dropped=(routed - counts).sum(),  # type: ignore[arg-type]
        padded=True,
    )


def _dispatch_plan_host(
    idx: Tensor, num_experts: int, capacity: int | None, padded: bool
) -> DispatchPlan:
    host = idx.detach().to(device="cpu", dtype=torch.int64).contiguous()
    routed, counts, offsets, token_of, slot_of, pos, dropped = _native.moe_dispatch_plan(
        host.numpy(), num_experts, capacity, padded
    )
    plan = DispatchPlan(
        routed=torch.from_numpy(routed),
        counts=torch.from_numpy(counts),
        offsets=torch.from_numpy(offsets),
        token_of=torch.from_numpy(token_of),
        slot_of=torch.from_numpy(slot_of),
        pos=torch.from_numpy(pos),
        dropped=dropped,
        padded=padded,
    )
    return plan if idx.device.type == "cpu" else plan.to(idx.device)


# --- autograd functions --------------------------------------------------------------------


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, token_of: torch.Tensor, pos: torch.Tensor) -> Any:
        ctx.save_for_backward(pos)
        return permute_rows(x, token_of)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dxs: torch.Tensor) -> Any:
        (pos,) = ctx.saved_tensors
        return combine_rows(dxs.contiguous(), pos), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        ys: torch.Tensor,
        weights: torch.Tensor,
        token_of: torch.Tensor,
        slot_of: torch.Tensor,
        pos: torch.Tensor,
    ) -> Any:
        ctx.save_for_backward(ys, weights, token_of, slot_of, pos)
        return combine_rows(ys, pos, weights)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> Any:
        ys, weights, token_of, slot_of, pos = ctx.saved_tensors
        dy = dy.contiguous()
        dys = dweights = None
        if ctx.needs_input_grad[0]:
            # Padding rows (token_of = -1) come out zero whatever their scale.
            scale = weights.reshape(-1)[slot_of.clamp(min=0)]
            dys = permute_rows(dy, token_of, scale)
        if ctx.needs_input_grad[1]:
            dweights = rowdot_rows(dy, ys, pos)
        return dys, dweights, None, None, None


def permute(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Gather tokens into expert order: `xs[i] = x[plan.token_of[i]]` (differentiable in x).

    x: (T, D) float32/float64/bfloat16. Returns (plan.num_rows, D).
    """
    if x.dim() != 2 or x.shape[0] != plan.pos.shape[0]:
        raise ValueError(
            f"x must be [{plan.pos.shape[0]}, dim] to match the plan, got {tuple(x.shape)}"
        )
    if torch.compiler.is_compiling():
        return torch.ops.slimforge.moe_permute(x, plan.token_of, plan.pos)
    return _Permute.apply(x, plan.token_of, plan.pos)


def combine(ys: torch.Tensor, weights: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weighted reduce back to tokens: `y[t] = sum_s weights[t, s] * ys[plan.pos[t, s]]`.

    Differentiable in ys and weights (`dweights[t, s] = <dy[t], ys[pos[t, s]]>`); dropped
    slots contribute zero. ys: (plan.num_rows, D); weights: (T, k), cast to float32 (float64
    for float64 ys). Returns (T, D) in ys's dtype.
    """
    if ys.dim() != 2 or ys.shape[0] != plan.num_rows:
        raise ValueError(
            f"ys must be [{plan.num_rows}, dim] to match the plan, got {tuple(ys.shape)}"
        )
    if weights.shape != plan.pos.shape:
        raise ValueError(
            f"weights must have shape {tuple(plan.pos.shape)}, got {tuple(weights.shape)}"
        )
    w = weights.to(acc_dtype(ys.dtype))
    if torch.compiler.is_compiling():
        return torch.ops.slimforge.moe_combine(ys, w, plan.token_of, plan.slot_of, plan.pos)
    return _Combine.apply(ys, w, plan.token_of, plan.slot_of, plan.pos)


# --- torch custom ops (what torch.compile traces) ------------------------------------------


@torch.library.custom_op("slimforge::moe_route", mutates_args=())
def _route_op(
    logits: Tensor, top_k: int, router: str, bias: Tensor | None, renormalize: bool
) -> tuple[Tensor, Tensor]:
    """`route_topk` without argument checks: idx (T, k) int64 and weights (T, k)."""
    return _route_host(logits, top_k, router, bias, renormalize)


@_route_op.register_fake
def _(logits, top_k, router, bias, renormalize):
    shape = (logits.shape[0], top_k)
    idx = logits.new_empty(shape, dtype=torch.int64)
    return idx, logits.new_empty(shape, dtype=acc_dtype(logits.dtype))


@torch.library.custom_op("slimforge::moe_dispatch_plan", mutates_args=())
def _dispatch_plan_op(
    idx: Tensor, num_experts: int, capacity: int | None, padded: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """`dispatch_plan` as tensors: routed, counts, offsets, token_of, slot_of, pos."""
    p = _dispatch_plan_host(idx, num_experts, capacity, padded)
    return p.routed, p.counts, p.offsets, p.token_of, p.slot_of, p.pos


@_dispatch_plan_op.register_fake
def _(idx, num_experts, capacity, padded):
    if capacity is None and not padded:
        rows = idx.shape[0] * idx.shape[1]  # dropless: every slot gets one row
    else:
        rows = torch.library.get_ctx().new_dynamic_size()
    i64 = torch.int64
    return (
        idx.new_empty((num_experts,), dtype=i64),
        idx.new_empty((num_experts,), dtype=i64),
        idx.new_empty((num_experts + 1,), dtype=i64),
        idx.new_empty((rows,), dtype=i64),
        idx.new_empty((rows,), dtype=i64),
        idx.new_empty(tuple(idx.shape), dtype=i64),
    )


@torch.library.custom_op("slimforge::moe_permute_rows", mutates_args=())
def _permute_rows_op(x: Tensor, token_of: Tensor, row_scale: Tensor | None) -> Tensor:
    """`permute_rows` (no autograd)."""
    return permute_rows(x, token_of, row_scale)


@_permute_rows_op.register_fake
def _(x, token_of, row_scale):
    return x.new_empty((token_of.shape[0], x.shape[1]))


@torch.library.custom_op("slimforge::moe_combine_rows", mutates_args=())
def _combine_rows_op(ys: Tensor, pos: Tensor, weights: Tensor | None) -> Tensor:
    """`combine_rows` (no autograd)."""
    return combine_rows(ys, pos, weights)


@_combine_rows_op.register_fake
def _(ys, pos, weights):
    return ys.new_empty((pos.shape[0], ys.shape[1]))


@torch.library.custom_op("slimforge::moe_rowdot", mutates_args=())
def _rowdot_op(dy: Tensor, ys: Tensor, pos: Tensor) -> Tensor:
    """`rowdot_rows` (no autograd)."""
    return rowdot_rows(dy, ys, pos)


@_rowdot_op.register_fake
def _(dy, ys, pos):
    return dy.new_empty(tuple(pos.shape), dtype=acc_dtype(dy.dtype))


@torch.library.custom_op("slimforge::moe_permute", mutates_args=())
def _permute_op(x: Tensor, token_of: Tensor, pos: Tensor) -> Tensor:
    """`permute`: rows `x[token_of]`, differentiable in x (pos is the inverse map, for backward)."""
    return permute_rows(x, token_of)


@_permute_op.register_fake
def _(x, token_of, pos):
    return x.new_empty((token_of.shape[0], x.shape[1]))


def _permute_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(inputs[2])


def _permute_backward(ctx: Any, dxs: Tensor) -> tuple[Tensor | None, None, None]:
    (pos,) = ctx.saved_tensors
    return torch.ops.slimforge.moe_combine_rows(dxs.contiguous(), pos, None), None, None


torch.library.register_autograd(
    "slimforge::moe_permute", _permute_backward, setup_context=_permute_setup
)


@torch.library.custom_op("slimforge::moe_combine", mutates_args=())
def _combine_op(
    ys: Tensor, weights: Tensor, token_of: Tensor, slot_of: Tensor, pos: Tensor
) -> Tensor:
    """`combine`: weights in the accumulation dtype; differentiable in ys and weights."""
    return combine_rows(ys, pos, weights)


@_combine_op.register_fake
def _(ys, weights, token_of, slot_of, pos):
    return ys.new_empty((pos.shape[0], ys.shape[1]))


def _combine_setup(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    ys, weights, token_of, slot_of, pos = ctx.saved_tensors
    dy = dy.contiguous()
    dys = dweights = None
    if ctx.needs_input_grad[0]:
        # Padding rows (token_of = -1) come out zero whatever their scale.
        scale = weights.reshape(-1)[slot_of.clamp(min=0)]
        dys = torch.ops.slimforge.moe_permute_rows(dy, token_of, scale)
    if ctx.needs_input_grad[1]:
        dweights = torch.ops.slimforge.moe_rowdot(dy, ys, pos)
    return dys, dweights, None, None, None


torch.library.register_autograd(
    "slimforge::moe_combine", _combine_backward, setup_context=_combine_setup
)
