"""Expert parallelism: experts sharded over the ranks of a `torch.distributed` group.

Every rank holds the (replicated) router and `num_experts / world_size` experts; rank r owns
experts `r * E_local : (r + 1) * E_local`. Each rank routes its own tokens, sends every expert's
rows to the rank that owns it with `all_to_all_single` (counts first, then rows), runs its local
experts and sends the results back. The exchange is an autograd function whose backward is the
same exchange with the splits swapped, so gradients flow to every rank's tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from slimforge.moe._ops import DispatchPlan, _Permute
from slimforge.moe.layer import MoE, run_experts


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any
    ) -> Any:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(
    x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Any = None
) -> torch.Tensor:
    """Differentiable `all_to_all_single` over rows: sends `in_splits[r]` rows to rank r and
    receives `out_splits[r]` rows from rank r; backward runs the exchange in reverse."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _reorder(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Differentiable row permutation `x[order]` through the Rust gather / reduce pair."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return _Permute.apply(x, order, inverse[:, None])


class ExpertParallelMoE(MoE):
    """`MoE` whose experts are sharded across the ranks of `ep_group` (default: the world).

    Same arguments as `MoE`; `num_experts` must be a multiple of the group size. `w_in` / `w_out`
    hold only this rank's experts. The router is replicated: average or sum its gradients
    across ranks like any data-parallel parameter. Capacity (if any) is applied per rank to the
    rank's own tokens. The "bmm" expert implementation is not used here ("segments" instead).
    Auxiliary losses and `last_load` describe this rank's tokens; `update_bias` uses the load
    summed over the group.
    """

    def __init__(self, *args: Any, ep_group: Any = None, **kwargs: Any) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs an initialised torch.distributed group")
        self.ep_group = ep_group
        self.world_size = dist.get_world_size(ep_group)
        self.rank = dist.get_rank(ep_group)
        super().__init__(*args, **kwargs)

    def _num_local_experts(self) -> int:
        if self.num_experts % self.world_size:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be a multiple of the expert-parallel "
                f"group size ({self.world_size})"
            )
        return self.num_experts // self.world_size

    @classmethod
    def from_moe(cls, moe: MoE, ep_group: Any = None) -> ExpertParallelMoE:
        """This rank's shard of a full `MoE` (same hyper-parameters, router and experts)."""
        layer = cls(
            moe.dim,
            moe.hidden,
            moe.num_experts,
            moe.top_k,
            moe.capacity_factor,
            moe.router_kind,
            moe.aux_loss_coef,
            moe.z_loss_coef,
            moe.activation,
            renormalize=moe.renormalize,
            expert_impl=moe.expert_impl,
            ep_group=ep_group,
            device=moe.w_in.device,
            dtype=moe.w_in.dtype,
        )
        local = layer.w_in.shape[0]
        mine = slice(layer.rank * local, (layer.rank + 1) * local)
        with torch.no_grad():
            layer.router.weight.copy_(moe.router.weight)
            layer.w_in.copy_(moe.w_in[mine])
            layer.w_out.copy_(moe.w_out[mine])
            if moe.expert_bias is not None and layer.expert_bias is not None:
                layer.expert_bias.copy_(moe.expert_bias)
        return layer

    def _padded(self, impl: str) -> bool:
        return False

    def _experts(self, xs: torch.Tensor, plan: DispatchPlan, impl: str) -> torch.Tensor:
        world, local = self.world_size, self.w_in.shape[0]
        send = plan.counts.view(world, local)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.ep_group)
        in_splits = send.sum(1).tolist()
        out_splits = recv.sum(1).tolist()
        received = all_to_all(xs, out_splits, in_splits, self.ep_group)
        # Received rows are grouped (source rank, local expert); experts need (expert, source).
        blocks = recv.reshape(-1)
        starts = torch.cumsum(blocks, 0) - blocks
        by_expert = torch.arange(world * local).view(world, local).t().reshape(-1)
        sizes, firsts = blocks[by_expert], starts[by_expert]
        order = torch.repeat_interleave(firsts - torch.cumsum(sizes, 0) + sizes, sizes)
        order += torch.arange(int(sizes.sum()), device=order.device)
        expert_rows = _reorder(received, order)
        counts = recv.sum(0)
        offsets = [0, *torch.cumsum(counts, 0).tolist()]
        impl = "segments" if impl == "bmm" else impl
        outs = run_experts(
            expert_rows, self.w_in, self.w_out, offsets, False, impl, self.activation
        )
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        back = _reorder(outs, inverse)
        return all_to_all(back, in_splits, out_splits, self.ep_group)

    def _global_tokens_per_expert(self) -> torch.Tensor:
        load = super()._global_tokens_per_expert().clone()
        dist.all_reduce(load, group=self.ep_group)
        return load
