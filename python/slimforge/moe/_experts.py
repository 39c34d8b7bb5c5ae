"""The expert MLPs of `MoE` as one autograd function: GEMMs into preallocated slices, the
activation and its backward once per chunk of rows.

Rows arrive grouped by expert (`offsets`); every GEMM reads and writes a contiguous row block of
one buffer (`torch.mm(..., out=...)`), so nothing is copied between the permute and the GEMMs,
the weight gradients land in per-expert slices of one preallocated tensor (no `cat`/`stack`),
and the elementwise work runs once per chunk (many experts' rows, under `CHUNK_BYTES`) instead
of once per expert.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_aten = torch.ops.aten


def activation_forward(h: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(a, saved)`: the activation of h and what its backward needs besides h and a.

    "swiglu" splits h (rows, 2H) into [gate | up] and returns a = silu(gate) * up with
    saved = silu(gate); the others return saved = a.
    """
    if activation == "swiglu":
        half = h.shape[1] // 2
        silu_gate = F.silu(h[:, :half])
        return torch.mul(silu_gate, h[:, half:]), silu_gate
    if activation == "gelu":
        a = F.gelu(h)
    elif activation == "relu":
        a = F.relu(h)
    elif activation == "silu":
        a = F.silu(h)
    else:
        raise ValueError(f"activation must be swiglu, gelu, relu or silu, got {activation!r}")
    return a, a


def activation_backward(
    da: torch.Tensor, h: torch.Tensor, saved: torch.Tensor, activation: str
) -> torch.Tensor:
    """dL/dh for `activation_forward` from dL/da; `da` is overwritten, h and saved are not."""
    if activation == "swiglu":
        half = h.shape[1] // 2
        gate, up = h[:, :half], h[:, half:]
        dh = torch.empty_like(h)
        torch.mul(da, saved, out=dh[:, half:])  # d up = da * silu(gate)
        da.mul_(up)  # d silu(gate)
        _aten.silu_backward.grad_input(da, gate, grad_input=dh[:, :half])
        return dh
    if activation == "gelu":
        return _aten.gelu_backward(da, h)
    if activation == "relu":
        return _aten.threshold_backward(da, h, 0)
    return _aten.silu_backward(da, h)


#: Rows of one chunk's widest buffer stay under this many bytes: glibc serves blocks below its
#: mmap threshold (at most 32 MiB) from the heap again, while larger blocks are mapped afresh,
#: and page-faulted, on every call.
CHUNK_BYTES = 16 << 20


def chunk_pieces(offsets: list[int], row_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Group the expert row blocks into chunks of at most CHUNK_BYTES / row_bytes rows.

    Consecutive experts share a chunk while they fit; a larger expert is cut into equal row
    tiles. Returns per chunk its pieces (expert, first row, end row), rows ascending.
    """
    limit = max(1, CHUNK_BYTES // max(row_bytes, 1))
    chunks: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    rows = 0
    for e, (lo, hi) in enumerate(zip(offsets, offsets[1:], strict=False)):
        n = hi - lo
        if n == 0:
            continue
        if rows + n > limit and current:
            chunks.append(current)
            current, rows = [], 0
        if n > limit:
            tiles = -(-n // limit)
            cuts = [lo + n * i // tiles for i in range(tiles + 1)]
            chunks.extend([(e, a, b)] for a, b in zip(cuts, cuts[1:], strict=False))
            continue
        current.append((e, lo, hi))
        rows += n
    if current:
        chunks.append(current)
    return chunks


def grouped_mm_available(dtype: torch.dtype, widths: tuple[int, ...] = ()) -> bool:
    """Whether `torch._grouped_mm` can run expert matmuls in `dtype` on this build, for
    matrices whose rows are `widths` elements long (it needs 16-byte aligned row strides)."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16):
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return all(w * size % 16 == 0 for w in widths)


class ExpertMLP(torch.autograd.Function):
    """`ys[rows of e] = act(xs[rows of e] @ w_in[e]) @ w_out[e]` for each expert e.

    Works chunk by chunk (`chunk_pieces`): the GEMMs write into row slices of the chunk's
    buffers, the activation and its backward run once per chunk. When all rows fit one chunk
    (many small expert blocks: fine-grained experts) and `torch._grouped_mm` takes the
    shapes, its C++ loop runs the GEMMs instead of one Python-level `torch.mm` per expert.
    """

    @staticmethod
    def forward(
        ctx: Any,
        xs: torch.Tensor,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
        offsets: list[int],
        activation: str,
    ) -> torch.Tensor:
        chunks = chunk_pieces(offsets, w_in.shape[2] * xs.element_size())
        ctx.activation = activation
        widths = (xs.shape[1], w_in.shape[2], w_out.shape[1])
        if len(chunks) == 1 and xs.device.type == "cpu" and grouped_mm_available(xs.dtype, widths):
            ends = torch.tensor(offsets[1:], dtype=torch.int32)
            h = torch._grouped_mm(xs, w_in, offs=ends)
            a, keep = activation_forward(h, activation)
            ctx.save_for_backward(xs, w_in, w_out, h, a, keep, ends)
            ctx.chunks = None
            return torch._grouped_mm(a, w_out, offs=ends)
        ys = xs.new_empty((xs.shape[0], w_out.shape[2]))
        saved: list[torch.Tensor] = []
        for pieces in chunks:
            c0, c1 = pieces[0][1], pieces[-1][2]
            h = xs.new_empty((c1 - c0, w_in.shape[2]))
            for e, lo, hi in pieces:
                torch.mm(xs[lo:hi], w_in[e], out=h[lo - c0 : hi - c0])
            a, keep = activation_forward(h, activation)
            for e, lo, hi in pieces:
                torch.mm(a[lo - c0 : hi - c0], w_out[e], out=ys[lo:hi])
            saved += [h, a, keep]
        ctx.save_for_backward(xs, w_in, w_out, *saved)
        ctx.chunks = chunks
        return ys

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dys: torch.Tensor) -> Any:
        xs, w_in, w_out, *saved = ctx.saved_tensors
        need_x, need_wi, need_wo = ctx.needs_input_grad[:3]
        dys = dys.contiguous()
        if ctx.chunks is None:
            h, a, keep, ends = saved
            gmm = torch._grouped_mm
            dw_out = gmm(a.t(), dys, offs=ends) if need_wo else None
            dh = activation_backward(
                gmm(dys, w_out.transpose(1, 2), offs=ends), h, keep, ctx.activation
            )
            dw_in = gmm(xs.t(), dh, offs=ends) if need_wi else None
            dxs = gmm(dh, w_in.transpose(1, 2), offs=ends) if need_x else None
            return dxs, dw_in, dw_out, None, None
        dw_in = torch.empty_like(w_in) if need_wi else None
        dw_out = torch.empty_like(w_out) if need_wo else None
        dxs = torch.empty_like(xs) if need_x else None
        seen: set[int] = set()
        for i, pieces in enumerate(ctx.chunks):
            h, a, keep = saved[3 * i : 3 * i + 3]
            c0 = pieces[0][1]
            da = torch.empty_like(a)
            for e, lo, hi in pieces:
                if dw_out is not None:
                    if e in seen:
                        dw_out[e].addmm_(a[lo - c0 : hi - c0].t(), dys[lo:hi])
                    else:
                        torch.mm(a[lo - c0 : hi - c0].t(), dys[lo:hi], out=dw_out[e])
                torch.mm(dys[lo:hi], w_out[e].t(), out=da[lo - c0 : hi - c0])
            dh = activation_backward(da, h, keep, ctx.activation)
            for e, lo, hi in pieces:
                dr = dh[lo - c0 : hi - c0]
                if dw_in is not None:
                    if e in seen:
                        dw_in[e].addmm_(xs[lo:hi].t(), dr)
                    else:
                        torch.mm(xs[lo:hi].t(), dr, out=dw_in[e])
                if dxs is not None:
                    torch.mm(dr, w_in[e].t(), out=dxs[lo:hi])
                seen.add(e)
        for e in range(w_in.shape[0]):
            if e not in seen:
                for dw in (dw_in, dw_out):
                    if dw is not None:
                        dw[e].zero_()
        return dxs, dw_in, dw_out, None, None


def expert_mlp(
    xs: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offsets: list[int],
    activation: str,
) -> torch.Tensor:
    """Expert MLPs on rows grouped by expert, differentiable in xs, w_in and w_out.

    xs: (rows, D) contiguous; w_in: (E, D, H_in) (H_in = 2H for "swiglu", [gate | up]);
    w_out: (E, H, D); offsets: E + 1 host ints, expert e owning rows offsets[e]:offsets[e+1].
    Returns (rows, D) in xs's dtype.
    """
    if len(offsets) != w_in.shape[0] + 1 or offsets[0] != 0 or offsets[-1] != xs.shape[0]:
        raise ValueError(
            f"offsets must be {w_in.shape[0] + 1} row boundaries from 0 to {xs.shape[0]}, "
            f"got {len(offsets)} ending at {offsets[-1] if offsets else None}"
        )
    return ExpertMLP.apply(xs.contiguous(), w_in, w_out, offsets, activation)
