"""The `MoE` layer: router, sort-based dispatch, grouped expert matmuls, combine, aux losses."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from slimforge.moe._experts import expert_mlp, grouped_mm_available
from slimforge.moe._ops import (
    ROUTERS,
    DispatchPlan,
    acc_dtype,
    combine,
    dispatch_plan,
    permute,
    route_topk,
)
from slimforge.moe.reference import expert_activation

ACTIVATIONS = ("swiglu", "gelu", "relu", "silu")
EXPERT_IMPLS = ("auto", "grouped_mm", "bmm", "segments")


@dataclass(frozen=True)
class MoELoad:
    """Per-expert load of the last forward pass (on this rank's tokens)."""

    tokens_per_expert: torch.Tensor  # (E,) int64: slots routed to each expert (before capacity)
    kept_per_expert: torch.Tensor  # (E,) int64: slots each expert processed
    dropped: int  # slots dropped by the capacity


def resolve_expert_impl(
    impl: str,
    dtype: torch.dtype,
    device: torch.device,
    widths: tuple[int, ...] = (),
    *,
    capacity: bool = False,
) -> str:
    """The concrete expert-matmul strategy for `impl` ("auto" picks by device, dtype, shapes).

    widths: the row lengths of the expert matrices (dim, w_in's and w_out's input widths);
    capacity: whether the layer has a capacity. The rules (measurements: docs/benchmarks.md):
    on the CPU "segments" (one GEMM per expert block into preallocated buffers; as fast as
    `torch._grouped_mm` or faster in every measured case), or "grouped_mm" while torch.compile
    traces (tensor offsets, so one graph); on CUDA with a capacity "bmm" over the
    static capacity blocks, dropless "grouped_mm" in bfloat16 when torch has it (both keep the
    offsets on the device: no host sync), else "segments" (reads the E + 1 offsets on the host).
    """
    if impl not in EXPERT_IMPLS:
        raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {impl!r}")
    if impl == "grouped_mm" and not grouped_mm_available(dtype, widths):
        raise ValueError(
            f"expert_impl='grouped_mm' needs float32/bfloat16 and 16-byte aligned rows, got "
            f"{dtype} with widths {widths}"
        )
    if impl != "auto":
        return impl
    if device.type == "cuda":
        if capacity:
            return "bmm"
        if dtype == torch.bfloat16 and grouped_mm_available(dtype, widths):
            return "grouped_mm"
    elif torch.compiler.is_compiling() and grouped_mm_available(dtype, widths):
        # Tensor offsets: one graph (fullgraph=True) instead of a break at the host offsets.
        return "grouped_mm"
    return "segments"


def run_experts(
    xs: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    offsets: list[int] | torch.Tensor,
    padded: bool,
    impl: str,
    activation: str,
) -> torch.Tensor:
    """Expert MLPs on rows in expert order: `act(xs_e @ w_in[e]) @ w_out[e]` per expert block.

    xs: (rows, D); w_in: (E, D, H_in); w_out: (E, H, D); offsets: E + 1 row boundaries (host
    ints, or an int64 tensor). `padded` layouts (every block the same size) are required by
    "bmm". "grouped_mm" keeps tensor offsets on the device and "bmm" needs none (no host sync;
    what torch.compile and CUDA graphs need); "segments" reads them on the host (`.tolist()`,
    a graph break under torch.compile, so `fullgraph=True` fails with it).
    """
    num_experts = w_in.shape[0]
    if impl == "grouped_mm":
        if isinstance(offsets, torch.Tensor):
            ends = offsets[1:].to(device=xs.device, dtype=torch.int32)
        else:
            ends = torch.tensor(offsets[1:], dtype=torch.int32, device=xs.device)
        h = torch._grouped_mm(xs, w_in, offs=ends)
        return torch._grouped_mm(expert_activation(h, activation).contiguous(), w_out, offs=ends)
    if impl == "bmm":
        if not padded:
            raise ValueError("expert_impl='bmm' needs a padded dispatch plan")
        rows = xs.shape[0] // num_experts
        h = torch.bmm(xs.view(num_experts, rows, xs.shape[1]), w_in)
        ys = torch.bmm(expert_activation(h, activation), w_out)
        return ys.view(num_experts * rows, w_out.shape[2])
    if isinstance(offsets, torch.Tensor):
        offsets = offsets.tolist()
    if impl == "segments":
        return expert_mlp(xs, w_in, w_out, offsets, activation)
    raise ValueError(f"unknown expert implementation {impl!r}")


class MoE(nn.Module):
    """Sparse Mixture-of-Experts MLP (Mixtral / DeepSeek-V3 style), dropless or with capacity.

    Args:
        dim: model width D.
        hidden: width H of each expert's MLP.
        num_experts: E.
        top_k: experts per token (k).
        capacity_factor: None for dropless; else each expert processes at most
            ceil(capacity_factor * T * k / E) slots per call, keeping the first in token order;
            dropped slots contribute zero.
        router: "softmax" (softmax in float32, top-k, renormalised, as Mixtral) or "sigmoid"
            (DeepSeek-V3: sigmoid scores, selection shifted by the `expert_bias` buffer, which
            `update_bias` adjusts outside autograd).
        aux_loss_coef: weight alpha of the Switch load-balancing loss alpha * E * sum_e f_e * P_e,
            f_e the fraction of the T * k slots routed to e, P_e the mean router probability
            (equals alpha at perfect balance).
        z_loss_coef: weight of the ST-MoE router z-loss mean_t(logsumexp(logits_t)^2).
        activation: "swiglu" (w_in holds [gate | up], (E, D, 2H)), "gelu", "relu" or "silu".
        renormalize: make the k weights of a token sum to one.
        expert_impl: "auto", "segments" (`ExpertMLP`: one GEMM per expert block into
            preallocated buffers, activation over whole chunks of rows), "grouped_mm"
            (`torch._grouped_mm`, float32/bfloat16) or "bmm" (padded batched GEMM). "auto"
            picks by `resolve_expert_impl`: "segments" on the CPU.

    torch.compile: routing, dispatch, permute and combine are custom ops with fake kernels, and
    "grouped_mm" (what "auto" picks while torch.compile traces, for float32/bfloat16 with
    16-byte aligned widths) takes the expert offsets as a tensor, so
    `torch.compile(moe, fullgraph=True)` traces one graph, forward and backward, dropless
    (static shapes: T * k rows) or with a capacity (the row count is then an unbacked size).
    "segments" splits the rows at host offsets (`.tolist()`): it compiles only with graph
    breaks (not with `fullgraph=True`).

    CUDA: routing, the dispatch plan, permute and combine stay on the device; with "auto" the
    whole forward and backward make no host sync when dropless in bfloat16 or with a capacity
    (docs/moe.md).

    Input (..., D), output the same shape and dtype. After each forward, `aux_loss` holds the
    weighted sum of both auxiliary losses (a differentiable scalar to add to the training loss),
    `last_losses` the unweighted parts, and `last_load` a `MoELoad` (both kept as tensors and
    converted when read, so forward makes no host sync).
    """

    def __init__(
        self,
        dim: int,
        hidden: int,
        num_experts: int = 8,
        top_k: int = 2,
        capacity_factor: float | None = None,
        router: str = "softmax",
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 1e-3,
        activation: str = "swiglu",
        *,
        renormalize: bool = True,
        expert_impl: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or hidden < 1 or num_experts < 1:
            raise ValueError(
                f"dim, hidden and num_experts must be >= 1, got {dim}, {hidden}, {num_experts}"
            )
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or None, got {capacity_factor}")
        if router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {router!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if expert_impl not in EXPERT_IMPLS:
            raise ValueError(f"expert_impl must be one of {EXPERT_IMPLS}, got {expert_impl!r}")
        self.dim, self.hidden = dim, hidden
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor = capacity_factor
        self.router_kind = router
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.activation = activation
        self.renormalize = renormalize
        self.expert_impl = expert_impl
        factory = {"device": device, "dtype": dtype}
        self.router = nn.Linear(dim, num_experts, bias=False, **factory)
        local = self._num_local_experts()
        h_in = 2 * hidden if activation == "swiglu" else hidden
        self.w_in = nn.Parameter(torch.empty(local, dim, h_in, **factory))
        self.w_out = nn.Parameter(torch.empty(local, hidden, dim, **factory))
        self.expert_bias: torch.Tensor | None
        if router == "sigmoid":
            self.register_buffer("expert_bias", torch.zeros(num_experts, device=device))
        else:
            self.expert_bias = None
        self.aux_loss: torch.Tensor | None = None
        self.last_losses: dict[str, float] = {}
        self.last_load: MoELoad | None = None
        self.reset_parameters()

    def _num_local_experts(self) -> int:
        return self.num_experts

    def reset_parameters(self) -> None:
        """nn.Linear-style uniform init with bound 1/sqrt(fan_in)."""
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden), 1 / math.sqrt(self.hidden))
        self.router.reset_parameters()

    def capacity(self, num_tokens: int) -> int | None:
        """Slots each expert may process for `num_tokens` tokens (None when dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, "
            f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, "
            f"router={self.router_kind!r}, activation={self.activation!r}"
        )

    def _impl(self, x: torch.Tensor) -> str:
        widths = (self.dim, self.w_in.shape[2], self.hidden)
        return resolve_expert_impl(
            self.expert_impl, x.dtype, x.device, widths, capacity=self.capacity_factor is not None
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits (T, E) in the scoring dtype, expert ids (T, k), weights (T, k).

        The ids come from the Rust router (deterministic ties); the weights are recomputed with
        torch ops from the same scores so that they carry gradients to the router.
        """
        logits = self.router(x).to(acc_dtype(x.dtype))
        idx, _ = route_topk(
            logits, self.top_k, self.router_kind, self.expert_bias, self.renormalize
        )
        scores = logits.softmax(-1) if self.router_kind == "softmax" else logits.sigmoid()
        weights = scores.gather(1, idx)
        if self.renormalize:
            tiny = torch.finfo(weights.dtype).tiny
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(tiny)
        return logits, idx, weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"expected input (..., {self.dim}), got shape {tuple(x.shape)}")
        if x.dtype != self.w_in.dtype:
            raise TypeError(f"input dtype {x.dtype} does not match the layer's {self.w_in.dtype}")
        shape = x.shape
        x2 = x.reshape(-1, self.dim)
        num_tokens = x2.shape[0]
        logits, idx, weights = self.route(x2)
        impl = self._impl(x2)
        plan = dispatch_plan(
            idx, self.num_experts, self.capacity(num_tokens), padded=self._padded(impl)
        )
        xs = permute(x2, plan)
        ys = self._experts(xs, plan, impl)
        y = combine(ys, weights, plan)
        self._record(logits, plan, num_tokens)
        return y.reshape(shape)

    def _padded(self, impl: str) -> bool:
        return impl == "bmm"

    def _experts(self, xs: torch.Tensor, plan: DispatchPlan, impl: str) -> torch.Tensor:
        return run_experts(
            xs, self.w_in, self.w_out, plan.offsets, plan.padded, impl, self.activation
        )

    # `last_losses` / `last_load` hold tensors and become floats / ints when read, so that
    # forward makes no host sync (and no graph break under torch.compile).
    _loss_stats: dict[str, float | torch.Tensor]
    _load_stats: tuple[torch.Tensor, torch.Tensor, int | torch.Tensor] | None

    @property
    def last_losses(self) -> dict[str, float]:
        """The unweighted auxiliary losses of the last forward pass."""
        return {name: float(v) for name, v in self._loss_stats.items()}

    @last_losses.setter
    def last_losses(self, value: dict[str, float]) -> None:
        self._loss_stats = dict(value)

    @property
    def last_load(self) -> MoELoad | None:
        """The per-expert load of the last forward pass (None before the first one)."""
        if self._load_stats is None:
            return None
        routed, counts, dropped = self._load_stats
        return MoELoad(
            tokens_per_expert=routed.detach().cpu(),
            kept_per_expert=counts.detach().cpu(),
            dropped=int(dropped),
        )

    @last_load.setter
    def last_load(self, value: MoELoad | None) -> None:
        self._load_stats = (
            None
            if value is None
            else (value.tokens_per_expert, value.kept_per_expert, value.dropped)
        )

    def _record(self, logits: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> None:
        """Auxiliary losses and load statistics of this forward pass."""
        if num_tokens == 0:
            self.aux_loss = logits.sum() * 0
            self._loss_stats = {"load_balance": 0.0, "z_loss": 0.0}
        else:
            if self.router_kind == "softmax":
                probs = logits.softmax(-1)
            else:
                scores = logits.sigmoid()
                probs = scores / scores.sum(-1, keepdim=True)
            frac = plan.routed.to(probs) / (num_tokens * self.top_k)
            balance = self.num_experts * (frac * probs.mean(0)).sum()
            z_loss = torch.logsumexp(logits, -1).square().mean()
            self.aux_loss = self.aux_loss_coef * balance + self.z_loss_coef * z_loss
            self._loss_stats = {"load_balance": balance.detach(), "z_loss": z_loss.detach()}
        self._load_stats = (plan.routed.detach(), plan.counts.detach(), plan.dropped)

    def _global_tokens_per_expert(self) -> torch.Tensor:
        if self.last_load is None:
            raise RuntimeError("update_bias needs the load of a forward pass; call forward first")
        return self.last_load.tokens_per_expert

    @torch.no_grad()
    def update_bias(self, rate: float) -> None:
        """DeepSeek-V3 aux-loss-free balancing: `expert_bias += rate * sign(mean_load - load)`.

        Uses the load of the last forward pass; raises the selection score of underloaded
        experts. Only for router="sigmoid".
        """
        if self.expert_bias is None:
            raise ValueError("update_bias needs router='sigmoid' (the layer has no expert_bias)")
        load = self._global_tokens_per_expert().to(self.expert_bias)
        self.expert_bias.add_(rate * torch.sign(load.mean() - load))
