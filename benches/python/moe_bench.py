"""MoE layer vs transformers' Mixtral block, the plain per-expert nn.Linear loop and the GEMM
floor, forward + backward, on CPU.

    PYTHONPATH=python python benches/python/moe_bench.py [--quick] [--threads 1,2] [--reps N]

For each size, dtype and thread count the engines take turns (best of --reps):

- slimforge `MoE` with `expert_impl="auto"` (and "segments" / "grouped_mm", the rules' evidence);
- transformers' current `MixtralSparseMoeBlock` with the experts implementation its models pick
  by default ("grouped_mm" where torch has it), weights copied from the slimforge layer;
- the per-expert loop written the plain way: one `nn.Linear` per expert projection (gate, up,
  down) and `torch.where` + `index_add_`, as transformers 4.x's `MixtralSparseMoeBlock` with
  `MixtralBlockSparseTop2MLP` did, weights copied too;
- the GEMM floor: the same expert matmuls (two forward, four backward per expert, on the row
  counts of the same routing) into preallocated outputs, with no routing, activation or data
  movement; and "experts alone": the layer's expert function (`expert_mlp`: GEMMs, activation,
  fresh outputs and weight gradients) forward + backward on the same rows.

All three layers' outputs are checked equal before timing. The table gives milliseconds, the
layer's time over the floor, its speed-up over the faster baseline and the share of routing +
dispatch plan + permute + combine (forward and backward, timed on their own) in the layer.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import slimforge
from slimforge.bench import CPU, WALL, Clock, best_times
from slimforge.moe import MoE, combine, dispatch_plan, permute, route_topk
from slimforge.moe._experts import expert_mlp
from slimforge.moe.layer import grouped_mm_available


class LinearLoopMoE(nn.Module):
    """transformers 4.x's Mixtral block: one `nn.Linear` per expert projection, plain loop."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype):
        super().__init__()
        self.top_k, self.num_experts = top_k, num_experts
        self.gate = nn.Linear(dim, num_experts, bias=False, dtype=dtype)
        self.w1 = nn.ModuleList(
            nn.Linear(dim, hidden, bias=False, dtype=dtype) for _ in range(num_experts)
        )
        self.w3 = nn.ModuleList(
            nn.Linear(dim, hidden, bias=False, dtype=dtype) for _ in range(num_experts)
        )
        self.w2 = nn.ModuleList(
            nn.Linear(hidden, dim, bias=False, dtype=dtype) for _ in range(num_experts)
        )

    @torch.no_grad()
    def load_from(self, m: MoE) -> LinearLoopMoE:
        h = m.hidden
        self.gate.weight.copy_(m.router.weight)
        for e in range(self.num_experts):
            self.w1[e].weight.copy_(m.w_in[e, :, :h].t())
            self.w3[e].weight.copy_(m.w_in[e, :, h:].t())
            self.w2[e].weight.copy_(m.w_out[e].t())
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        weights = F.softmax(logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            slot, token = torch.where(mask[e].squeeze(0))
            xe = x[token]
            ye = self.w2[e](F.silu(self.w1[e](xe)) * self.w3[e](xe)) * weights[token, slot, None]
            out.index_add_(0, token, ye.to(x.dtype))
        return out


def hf_block(m: MoE, dtype: torch.dtype) -> nn.Module:
    """transformers' `MixtralSparseMoeBlock` with `m`'s weights and its models' default experts."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = MixtralConfig(
        hidden_size=m.dim,
        intermediate_size=m.hidden,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
    )
    # What `PreTrainedModel.get_correct_experts_implementation` picks when none is requested.
    cfg._experts_implementation = "grouped_mm" if hasattr(torch, "_grouped_mm") else "eager"
    block = MixtralSparseMoeBlock(cfg).to(dtype)
    with torch.no_grad():
        block.gate.weight.copy_(m.router.weight)
        block.experts.gate_up_proj.copy_(m.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(m.w_out.transpose(1, 2))
    return block


def fwd_bwd(module: nn.Module, x: torch.Tensor, g: torch.Tensor, batch: bool) -> Callable[[], None]:
    def run() -> None:
        module.zero_grad(set_to_none=True)
        xx = x.detach().requires_grad_()
        y = module(xx[None] if batch else xx)
        (y.reshape(g.shape) * g).sum().backward()

    return run


def gemm_floor(m: MoE, counts: list[int], dtype: torch.dtype) -> Callable[[], None]:
    """The layer's expert matmuls alone, forward and backward, into preallocated outputs."""
    d, h_in, h = m.dim, m.w_in.shape[2], m.hidden
    rows = sum(counts)
    xs, dys = torch.randn(rows, d, dtype=dtype), torch.randn(rows, d, dtype=dtype)
    hid, act, dact = (torch.randn(rows, w, dtype=dtype) for w in (h_in, h, h))
    dhid, ys, dxs = torch.empty(rows, h_in, dtype=dtype), torch.empty_like(xs), torch.empty_like(xs)
    w_in, w_out = m.w_in.detach(), m.w_out.detach()
    dw_in, dw_out = torch.empty_like(w_in), torch.empty_like(w_out)
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)

    def run() -> None:
        for e, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
            torch.mm(xs[lo:hi], w_in[e], out=dhid[lo:hi])
            torch.mm(act[lo:hi], w_out[e], out=ys[lo:hi])
            torch.mm(act[lo:hi].t(), dys[lo:hi], out=dw_out[e])
            torch.mm(dys[lo:hi], w_out[e].t(), out=dact[lo:hi])
            torch.mm(xs[lo:hi].t(), hid[lo:hi], out=dw_in[e])
            torch.mm(hid[lo:hi], w_in[e].t(), out=dxs[lo:hi])

    return run


def experts_alone(m: MoE, counts: list[int], dtype: torch.dtype) -> Callable[[], None]:
    """The layer's expert stage alone (`expert_mlp`, forward + backward) on the same rows."""
    rows = sum(counts)
    xs, dys = torch.randn(rows, m.dim, dtype=dtype), torch.randn(rows, m.dim, dtype=dtype)
    w_in = m.w_in.detach().clone().requires_grad_()
    w_out = m.w_out.detach().clone().requires_grad_()
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)

    def run() -> None:
        w_in.grad = w_out.grad = None
        xx = xs.detach().requires_grad_()
        expert_mlp(xx, w_in, w_out, offsets, m.activation).backward(dys)

    return run


def movement(m: MoE, x: torch.Tensor, g: torch.Tensor) -> dict[str, Callable[[], None]]:
    """Routing, plan, permute and combine (forward + backward) of the layer, one by one."""
    with torch.no_grad():
        idx, _ = route_topk(m.router(x).float(), m.top_k)
        plan = dispatch_plan(idx, m.num_experts)
        xs = permute(x, plan)
    weights = torch.rand(idx.shape)

    def route() -> None:
        with torch.no_grad():
            m.route(x)

    def permute_fb() -> None:
        xx = x.detach().requires_grad_()
        permute(xx, plan).backward(xs)

    def combine_fb() -> None:
        ys = xs.detach().requires_grad_()
        w = weights.detach().requires_grad_()
        combine(ys, w, plan).backward(g)

    return {
        "route": route,
        "plan": lambda: dispatch_plan(idx, m.num_experts),
        "permute": permute_fb,
        "combine": combine_fb,
    }


def bench(
    name: str,
    t: int,
    d: int,
    h: int,
    e: int,
    k: int,
    dtype: torch.dtype,
    reps: int,
    threads: int,
    clock: Clock = WALL,
) -> str:
    torch.manual_seed(0)
    m = MoE(d, h, e, k, dtype=dtype)
    x, g = torch.randn(t, d).to(dtype), torch.randn(t, d).to(dtype)
    hf = hf_block(m, dtype)
    loop = LinearLoopMoE(d, h, e, k, dtype).load_from(m)
    with torch.no_grad():
        y = m(x)
        tol = (
            {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
        )
        # bf16 router logits can tie; ties may break differently, so compare the tokens that
        # every engine routes alike (all of them in fp32).
        mine = m.route(x)[1].sort(-1).values
        theirs = torch.topk(m.router(x).float().softmax(-1), k).indices.sort(-1).values
        same = (mine == theirs).all(-1)
        assert same.float().mean() > 0.9, "routing differs from transformers' on > 10 % of tokens"
        torch.testing.assert_close(hf(x[None])[0][same], y[same], **tol)
        torch.testing.assert_close(loop(x)[same], y[same], **tol)
    counts = m.last_load.kept_per_expert.tolist() if m.last_load is not None else []
    impls = ["segments"] + (["grouped_mm"] if grouped_mm_available(dtype, (d, 2 * h, h)) else [])
    layers = {}
    for impl in impls:
        mi = MoE(d, h, e, k, dtype=dtype, expert_impl=impl)
        mi.load_state_dict(m.state_dict())
        layers[impl] = fwd_bwd(mi, x, g, False)
    fns = {
        "auto": fwd_bwd(m, x, g, False),
        **layers,
        "hf": fwd_bwd(hf, x, g, True),
        "loop": fwd_bwd(loop, x, g, False),
        "floor": gemm_floor(m, counts, dtype),
        "experts": experts_alone(m, counts, dtype),
    }
    res = best_times(fns, reps, clock=clock)
    moved = sum(best_times(movement(m, x, g), reps, clock=clock).values())
    base = min(res["hf"], res["loop"])
    dt = str(dtype).replace("torch.", "")
    ms = {key: f"{v * 1e3:.1f}" for key, v in res.items()}
    gm = ms.get("grouped_mm", "-")
    return (
        f"| {name} T={t} D={d} H={h} E={e} k={k} | {dt} | {threads} | {ms['floor']} | "
        f"{ms['experts']} | "
        f"{ms['auto']} ({res['auto'] / res['floor']:.2f}x) | {ms['segments']} | {gm} | "
        f"{ms['hf']} | {ms['loop']} | {base / res['auto']:.2f}x | "
        f"{100 * moved / res['auto']:.1f} % |"
    )


HEADER = (
    "| size | dtype | threads | GEMM floor ms | experts alone ms | slimforge auto ms (/ floor) | "
    "segments ms | grouped_mm ms | transformers MixtralSparseMoeBlock ms | nn.Linear loop ms | "
    "auto vs faster baseline | routing + dispatch + combine |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--reps", type=int, default=None, help="turns per engine (best is kept)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="cpu: this process's CPU time, which waiting for a core on a busy host does not "
        "inflate (meaningful with --threads 1 only)",
    )
    args = ap.parse_args()
    if args.quick:
        sizes = [("mixtral-like", 512, 128, 352, 8, 2), ("fine-grained", 256, 128, 64, 64, 6)]
        reps = args.reps or 2
    else:
        sizes = [
            ("mixtral-like", 4096, 512, 1408, 8, 2),
            ("fine-grained", 512, 512, 256, 64, 6),
            ("fine-grained", 1024, 512, 256, 64, 6),
        ]
        reps = args.reps or 5
    clock = CPU if args.clock == "cpu" else WALL
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {args.clock} clock, load average {load:.2f} at start\n")
    print(HEADER, flush=True)
    for threads in (int(v) for v in args.threads.split(",")):
        torch.set_num_threads(threads)
        slimforge.set_num_threads(threads)
        for dtype in (getattr(torch, v) for v in args.dtypes.split(",")):
            for size in sizes:
                row = bench(*size, dtype=dtype, reps=reps, threads=threads, clock=clock)
                print(row, flush=True)
    if hasattr(os, "getloadavg"):
        print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
