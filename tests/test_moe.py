"""MoE routing, dispatch, kernels, layer and expert parallelism against plain PyTorch references."""

from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from slimforge.moe import (
    ExpertParallelMoE,
    MoE,
    combine,
    dispatch_plan,
    moe_reference,
    permute,
    route_topk,
)
from slimforge.moe._ops import combine_rows, permute_rows, rowdot_rows
from slimforge.moe.layer import grouped_mm_available

# --- routing -------------------------------------------------------------------------------


def torch_route(logits, k, router="softmax", bias=None, renormalize=True):
    scores = logits.softmax(-1) if router == "softmax" else logits.sigmoid()
    select = scores if bias is None else scores + bias
    _, idx = torch.topk(select, k, dim=-1)
    w = scores.gather(1, idx)
    if renormalize:
        w = w / w.sum(-1, keepdim=True)
    return idx, w


@given(
    t=st.integers(0, 40),
    e=st.integers(1, 12),
    data=st.data(),
    router=st.sampled_from(["softmax", "sigmoid"]),
    with_bias=st.booleans(),
    renormalize=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31),
)
def test_route_matches_torch(t, e, data, router, with_bias, renormalize, dtype, seed):
    k = data.draw(st.integers(1, e))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g, dtype=dtype) * 3
    bias = torch.randn(e, generator=g, dtype=dtype) if with_bias else None
    idx, w = route_topk(logits, k, router, bias, renormalize)
    ridx, rw = torch_route(logits, k, router, bias, renormalize)
    assert idx.dtype == torch.int64 and w.dtype == dtype
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


def test_route_ties_go_to_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    idx, w = route_topk(logits, 2)
    assert idx.tolist() == [[1, 2], [0, 1]]
    torch.testing.assert_close(w, torch.full((2, 2), 0.5))


def test_route_bias_selects_but_does_not_weight():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    idx, w = route_topk(logits, 1, "sigmoid", torch.tensor([5.0, 0.0, 0.0]), renormalize=False)
    assert idx.tolist() == [[0]]
    torch.testing.assert_close(w, torch.tensor([[0.5]]))


def test_route_rejects_bad_input():
    with pytest.raises(ValueError, match="top_k"):
        route_topk(torch.zeros(3, 4), 5)
    with pytest.raises(ValueError, match="NaN"):
        route_topk(torch.full((2, 4), float("nan")), 2)
    with pytest.raises(ValueError, match="router"):
        route_topk(torch.zeros(3, 4), 2, router="relu")
    with pytest.raises(ValueError, match="bias"):
        route_topk(torch.zeros(3, 4), 2, bias=torch.zeros(3))


# --- dispatch plan -------------------------------------------------------------------------


def random_idx(t, k, e, seed):
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(e, generator=g)[:k] for _ in range(t)]
    return torch.stack(rows) if rows else torch.empty((0, k), dtype=torch.int64)


@given(
    t=st.integers(0, 60),
    e=st.integers(1, 9),
    data=st.data(),
    capacity=st.one_of(st.none(), st.integers(0, 20)),
    padded=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_dispatch_plan_properties(t, e, data, capacity, padded, seed):
    k = data.draw(st.integers(1, e))
    idx = random_idx(t, k, e, seed)
    plan = dispatch_plan(idx, e, capacity, padded)
    flat = idx.reshape(-1).tolist()
    routed = np.bincount(np.array(flat, dtype=np.int64), minlength=e)
    assert plan.routed.tolist() == routed.tolist()
    cap = capacity if capacity is not None else t * k
    assert plan.counts.tolist() == np.minimum(routed, cap).tolist()
    assert plan.dropped == int((routed - np.minimum(routed, cap)).sum())
    offsets = plan.offsets.tolist()
    assert offsets[0] == 0 and offsets[-1] == plan.num_rows
    width = max(plan.counts.tolist(), default=0)
    for x in range(e):
        size = width if padded else plan.counts[x].item()
        assert offsets[x + 1] - offsets[x] == size
        rows = slice(offsets[x], offsets[x] + plan.counts[x].item())
        slots = plan.slot_of[rows].tolist()
        # Stable: the expert's slots in increasing slot (= token) order, the first `cap` of them.
        expected = [a for a, ex in enumerate(flat) if ex == x][:cap]
        assert slots == expected
        assert plan.token_of[rows].tolist() == [a // k for a in expected]
        assert (plan.token_of[offsets[x] + plan.counts[x].item() : offsets[x + 1]] == -1).all()
    for a, p in enumerate(plan.pos.reshape(-1).tolist()):
        if p >= 0:
            assert plan.slot_of[p] == a
        else:
            assert a not in plan.slot_of.tolist()


def test_dispatch_plan_capacity_example():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    plan = dispatch_plan(idx, 3, capacity=2)
    assert plan.pos.tolist() == [[0, 2], [1, 4], [-1, 3], [-1, -1]]
    assert plan.dropped == 3


def test_dispatch_plan_rejects_bad_ids():
    with pytest.raises(ValueError, match="expert ids"):
        dispatch_plan(torch.tensor([[0, 3]]), 3)
    with pytest.raises(ValueError, match="capacity"):
        dispatch_plan(torch.tensor([[0, 1]]), 3, capacity=-1)


# --- kernels -------------------------------------------------------------------------------


@given(
    t=st.integers(0, 30),
    d=st.integers(1, 20),
    k=st.integers(1, 4),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    seed=st.integers(0, 2**31),
)
def test_kernels_match_indexing(t, d, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    rows = int(torch.randint(0, 40, (), generator=g))
    x = torch.randn(t, d, generator=g).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    token_of = torch.randint(-1, t, (rows,), generator=g)
    scale = torch.randn(rows, generator=g, dtype=acc)
    # Row -1 of a zero-padded copy stands for "no token".
    ref = torch.cat([x.to(acc), torch.zeros(1, d, dtype=acc)])[token_of]
    assert torch.equal(permute_rows(x, token_of), ref.to(dtype))
    torch.testing.assert_close(
        permute_rows(x, token_of, scale), (ref * scale[:, None]).to(dtype), rtol=1e-2, atol=1e-6
    )
    ys = torch.randn(rows, d, generator=g).to(dtype)
    pos = torch.randint(-1, rows, (t, k), generator=g)
    w = torch.randn(t, k, generator=g, dtype=acc)
    picked = torch.cat([ys.to(acc), torch.zeros(1, d, dtype=acc)])[pos]
    ref_y = (picked * w[..., None]).sum(1)
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(combine_rows(ys, pos, w), ref_y.to(dtype), **tol)
    torch.testing.assert_close(combine_rows(ys, pos), picked.sum(1).to(dtype), **tol)
    dy = torch.randn(t, d, generator=g).to(dtype)
    ref_dw = (dy.to(acc)[:, None, :] * picked).sum(-1)
    torch.testing.assert_close(rowdot_rows(dy, ys, pos), ref_dw, **tol)


def test_kernels_reject_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="token_of"):
        permute_rows(x, torch.tensor([0, 4]))
    with pytest.raises(TypeError):
        permute_rows(x.to(torch.int32), torch.tensor([0]))
    with pytest.raises(ValueError, match="pos"):
        combine_rows(x, torch.tensor([[0, 9]]), torch.ones(1, 2))
    with pytest.raises(TypeError, match="weights"):
        combine_rows(x, torch.tensor([[0, 1]]), torch.ones(1, 2, dtype=torch.float64))


def test_permute_combine_gradcheck():
    g = torch.Generator().manual_seed(0)
    t, k, e, d = 7, 2, 4, 3
    idx = random_idx(t, k, e, 1)
    for capacity in (None, 2):
        plan = dispatch_plan(idx, e, capacity)
        x = torch.randn(t, d, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, plan=plan: permute(x, plan), (x,))
        ys = torch.randn(plan.num_rows, d, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(t, k, generator=g, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda ys, w, plan=plan: combine(ys, w, plan), (ys, w))


# --- the layer against the HF-Mixtral-style loop -------------------------------------------


def reference_outputs(m: MoE, x: torch.Tensor, g: torch.Tensor):
    xr = x.detach().clone().requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in (m.router.weight, m.w_in, m.w_out)]
    y = moe_reference(
        xr,
        *params,
        m.top_k,
        capacity=m.capacity(x.shape[0]),
        activation=m.activation,
        router=m.router_kind,
        bias=m.expert_bias,
        renormalize=m.renormalize,
    )
    (y * g).sum().backward()
    return y.detach(), [xr.grad, *(p.grad for p in params)]


def layer_outputs(m: MoE, x: torch.Tensor, g: torch.Tensor):
    x = x.detach().clone().requires_grad_()
    m.zero_grad()
    y = m(x)
    (y * g).sum().backward()
    return y.detach(), [x.grad, m.router.weight.grad, m.w_in.grad, m.w_out.grad]


@given(
    t=st.integers(1, 48),
    d=st.integers(1, 12),
    h=st.integers(1, 12),
    e=st.integers(1, 8),
    data=st.data(),
    capacity_factor=st.one_of(st.none(), st.floats(0.2, 2.0)),
    impl=st.sampled_from(["segments", "bmm"]),
    activation=st.sampled_from(["swiglu", "gelu"]),
    seed=st.integers(0, 2**31),
)
def test_layer_matches_reference_float64(t, d, h, e, data, capacity_factor, impl, activation, seed):
    k = data.draw(st.integers(1, min(4, e)))
    torch.manual_seed(seed)
    m = MoE(
        d,
        h,
        e,
        k,
        capacity_factor=capacity_factor,
        activation=activation,
        expert_impl=impl,
        dtype=torch.float64,
    )
    x = torch.randn(t, d, dtype=torch.float64)
    g = torch.randn(t, d, dtype=torch.float64)
    y, grads = layer_outputs(m, x, g)
    ry, rgrads = reference_outputs(m, x, g)
    torch.testing.assert_close(y, ry, rtol=1e-10, atol=1e-12)
    for name, a, b in zip(["x", "router", "w_in", "w_out"], grads, rgrads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_layer_gradients_are_not_trivial(router):
    torch.manual_seed(0)
    m = MoE(8, 16, 4, 2, router=router, dtype=torch.float64)
    if m.expert_bias is not None:
        m.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1], dtype=torch.float64))
    x = torch.randn(20, 8, dtype=torch.float64)
    g = torch.randn(20, 8, dtype=torch.float64)
    y, grads = layer_outputs(m, x, g)
    ry, rgrads = reference_outputs(m, x, g)
    torch.testing.assert_close(y, ry)
    for a, b in zip(grads, rgrads, strict=True):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not grouped_mm_available(torch.float32), reason="no torch._grouped_mm")
@pytest.mark.parametrize("capacity_factor", [None, 0.7])
def test_grouped_mm_float32_matches_float64_reference(capacity_factor):
    torch.manual_seed(1)
    m = MoE(32, 48, 8, 2, capacity_factor=capacity_factor, expert_impl="grouped_mm")
    x, g = torch.randn(64, 32), torch.randn(64, 32)
    y, grads = layer_outputs(m, x, g)
    m64 = m.double()
    ry, rgrads = reference_outputs(m64, x.double(), g.double())
    torch.testing.assert_close(y.double(), ry, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, rgrads, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)


@pytest.fixture
def one_thread():
    """Tiny ops in a tight loop: torch's OpenMP barriers dominate on a busy host."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_layer_gradcheck(capacity_factor, router, one_thread):
    torch.manual_seed(2)
    m = MoE(4, 5, 4, 2, capacity_factor=capacity_factor, router=router, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    params = (m.router.weight, m.w_in, m.w_out)

    def f(x, wr, wi, wo):
        return torch.func.functional_call(m, {"router.weight": wr, "w_in": wi, "w_out": wo}, (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_bf16_forward_close_to_fp32():
    torch.manual_seed(3)
    m = MoE(64, 96, 8, 2)
    x = torch.randn(128, 64)
    y32 = m(x)
    idx32 = route_topk(m.router(x), 2)[0]
    mb = MoE(64, 96, 8, 2, dtype=torch.bfloat16)
    mb.load_state_dict(m.state_dict())
    xb = x.bfloat16()
    yb = mb(xb)
    assert yb.dtype == torch.bfloat16
    # Compare only tokens whose routing did not flip under bf16 rounding of the router.
    same = (route_topk(mb.router(xb), 2)[0] == idx32).all(-1)
    assert same.float().mean() > 0.8
    err = (yb.float() - y32)[same].abs().max()
    assert err < 0.03 * y32.abs().max()
    yb.float().sum().backward()
    assert mb.w_in.grad is not None and mb.w_in.grad.dtype == torch.bfloat16


# --- auxiliary losses, load and bias -------------------------------------------------------


def test_aux_losses_and_load():
    torch.manual_seed(4)
    m = MoE(8, 8, 4, 2, capacity_factor=0.5, aux_loss_coef=0.1, z_loss_coef=0.01)
    x = torch.randn(30, 8)
    m(x)
    logits = m.router(x)
    probs = logits.softmax(-1)
    idx = torch.topk(probs, 2).indices
    frac = torch.bincount(idx.reshape(-1), minlength=4).float() / 60
    balance = 4 * (frac * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).square().mean()
    assert m.aux_loss is not None
    torch.testing.assert_close(m.aux_loss, 0.1 * balance + 0.01 * z)
    load = m.last_load
    assert load is not None
    assert load.tokens_per_expert.tolist() == torch.bincount(idx.reshape(-1), minlength=4).tolist()
    cap = math.ceil(0.5 * 30 * 2 / 4)
    assert load.kept_per_expert.tolist() == load.tokens_per_expert.clamp(max=cap).tolist()
    assert load.dropped == int((load.tokens_per_expert - load.kept_per_expert).sum())
    m.zero_grad()
    m.aux_loss.backward()
    assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0


def test_update_bias_favours_underloaded_experts():
    torch.manual_seed(5)
    m = MoE(8, 8, 4, 1, router="sigmoid")
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] = 1.0
    x = torch.randn(40, 8).abs()
    m(x)
    assert m.last_load is not None and m.last_load.tokens_per_expert[0] == 40
    assert m.expert_bias is not None
    m.update_bias(0.01)
    torch.testing.assert_close(m.expert_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    with pytest.raises(ValueError, match="sigmoid"):
        MoE(8, 8, 4, 1).update_bias(0.1)


def test_layer_validates_arguments():
    with pytest.raises(ValueError, match="top_k"):
        MoE(8, 8, 4, 5)
    with pytest.raises(ValueError, match="router"):
        MoE(8, 8, router="gumbel")
    with pytest.raises(ValueError, match="activation"):
        MoE(8, 8, activation="tanh")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(8, 8, capacity_factor=0)
    m = MoE(8, 8)
    with pytest.raises(ValueError, match="expected input"):
        m(torch.randn(3, 7))
    with pytest.raises(TypeError, match="dtype"):
        m(torch.randn(3, 8, dtype=torch.float64))


def test_layer_keeps_leading_shape_and_handles_no_tokens():
    m = MoE(8, 8, 4, 2)
    assert m(torch.randn(2, 3, 8)).shape == (2, 3, 8)
    y = m(torch.randn(0, 8))
    assert y.shape == (0, 8)


# --- CUDA routing of the kernels -----------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_layer_on_cuda_matches_cpu():
    try:
        from slimforge import _cuda  # noqa: F401
    except ImportError:
        pytest.skip("slimforge._cuda not built")
    torch.manual_seed(6)
    m = MoE(32, 64, 8, 2)
    x, g = torch.randn(50, 32), torch.randn(50, 32)
    y, grads = layer_outputs(m, x, g)
    mc = MoE(32, 64, 8, 2, device="cuda")
    mc.load_state_dict(m.state_dict())
    yc, gc = layer_outputs(mc, x.cuda(), g.cuda())
    torch.testing.assert_close(yc.cpu(), y, rtol=1e-4, atol=1e-4)
    for a, b in zip(gc, grads, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-3, atol=1e-3)


# --- expert parallelism over gloo ----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ep_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for router, t_total in (("softmax", 41), ("sigmoid", 16)):
            torch.manual_seed(7)
            full = MoE(6, 10, 4, 2, router=router, dtype=torch.float64)
            x = torch.randn(t_total, 6, dtype=torch.float64)
            g = torch.randn(t_total, 6, dtype=torch.float64)
            ry, rgrads = layer_outputs(full, x, g)
            # Uneven split: rank 0 takes more tokens than rank 1.
            cut = t_total // 2 + 3
            mine = slice(0, cut) if rank == 0 else slice(cut, t_total)
            ep = ExpertParallelMoE.from_moe(full)
            assert ep.w_in.shape[0] == 2
            y, grads = layer_outputs(ep, x[mine], g[mine])
            torch.testing.assert_close(y, ry[mine])
            torch.testing.assert_close(grads[0], rgrads[0][mine])
            router_grad = grads[1].clone()
            dist.all_reduce(router_grad)
            torch.testing.assert_close(router_grad, rgrads[1])
            experts = slice(2 * rank, 2 * rank + 2)
            torch.testing.assert_close(grads[2], rgrads[2][experts])
            torch.testing.assert_close(grads[3], rgrads[3][experts])
            if router == "sigmoid":
                full.update_bias(0.1)
                ep.update_bias(0.1)
                assert ep.expert_bias is not None and full.expert_bias is not None
                torch.testing.assert_close(ep.expert_bias, full.expert_bias)
    finally:
        dist.destroy_process_group()


def test_expert_parallel_two_ranks_match_one_rank():
    import torch.multiprocessing as mp

    mp.spawn(_ep_worker, args=(2, _free_port()), nprocs=2, join=True)


@pytest.mark.parametrize("dims", [(5, 7), (16, 8), (24, 12)])
def test_auto_impl_handles_any_width_in_float32(dims):
    d, h = dims
    torch.manual_seed(8)
    m = MoE(d, h, 4, 2)
    x, g = torch.randn(21, d), torch.randn(21, d)
    y, grads = layer_outputs(m, x, g)
    ry, rgrads = reference_outputs(m.double(), x.double(), g.double())
    torch.testing.assert_close(y.double(), ry, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, rgrads, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4)
    if d % 4:
        with pytest.raises(ValueError, match="aligned"):
            MoE(d, h, 4, 2, expert_impl="grouped_mm")(x)
