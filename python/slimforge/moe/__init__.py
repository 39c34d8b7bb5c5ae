"""Mixture-of-Experts: top-k routing, sort-based dispatch, grouped experts, expert parallelism.

`MoE` is the layer; `route_topk`, `dispatch_plan`, `permute` and `combine` are the primitives
it is built from (Rust kernels on CPU, `slimforge._cuda` kernels on CUDA);
`ExpertParallelMoE` shards the experts over a `torch.distributed` group; `moe_reference` is
the plain per-expert loop used as the correctness oracle.
"""

from slimforge._optional import require

require("torch", "slimforge.moe")

from slimforge.moe._ops import DispatchPlan, combine, dispatch_plan, permute, route_topk
from slimforge.moe.layer import MoE, MoELoad
from slimforge.moe.parallel import ExpertParallelMoE
from slimforge.moe.reference import moe_reference

__all__ = [
    "DispatchPlan",
    "ExpertParallelMoE",
    "MoE",
    "MoELoad",
    "combine",
    "dispatch_plan",
    "moe_reference",
    "permute",
    "route_topk",
]
