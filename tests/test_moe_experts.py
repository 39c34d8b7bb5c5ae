"""The MoE expert function (`ExpertMLP`), the device-side routing and plan, and the proof that
the CUDA code path of the layer's forward and backward never reads device data on the host."""

from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from slimforge import _native
from slimforge.moe import MoE, _experts, _ops, moe_reference, route_topk
from slimforge.moe._experts import chunk_pieces, expert_mlp
from slimforge.moe.layer import grouped_mm_available, resolve_expert_impl
from slimforge.moe.reference import expert_activation

ACTS = ["swiglu", "gelu", "relu", "silu"]


def loop_experts(xs, w_in, w_out, offsets, activation):
    """Plain autograd per-expert loop over the same row blocks (the reference)."""
    outs = [
        expert_activation(xs[lo:hi] @ w_in[e], activation) @ w_out[e]
        for e, (lo, hi) in enumerate(zip(offsets, offsets[1:], strict=False))
    ]
    return torch.cat(outs) if outs else xs.new_zeros((0, w_out.shape[2]))


def grads_of(fn, tensors, g):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    (y * g).sum().backward()
    return y.detach(), [t.grad for t in leaves]


@given(
    sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    d=st.integers(1, 10),
    h=st.integers(1, 10),
    activation=st.sampled_from(ACTS),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    chunk_bytes=st.sampled_from([1, 40, 200, 16 << 20]),
    seed=st.integers(0, 2**31),
)
def test_expert_mlp_matches_loop(sizes, d, h, activation, dtype, chunk_bytes, seed):
    # Small chunk limits cut experts into row tiles (the accumulating weight-gradient GEMMs).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_experts, "CHUNK_BYTES", chunk_bytes)
        check_expert_mlp(sizes, d, h, activation, dtype, seed)


def check_expert_mlp(sizes, d, h, activation, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    e, rows = len(sizes), sum(sizes)
    h_in = 2 * h if activation == "swiglu" else h
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    xs = torch.randn(rows, d, generator=g, dtype=torch.float64)
    w_in = torch.randn(e, d, h_in, generator=g, dtype=torch.float64) / d**0.5
    w_out = torch.randn(e, h, d, generator=g, dtype=torch.float64) / h**0.5
    dy = torch.randn(rows, d, generator=g, dtype=torch.float64)
    ref, ref_grads = grads_of(
        lambda *t: loop_experts(*t, offsets, activation), (xs, w_in, w_out), dy
    )
    cast = [t.to(dtype) for t in (xs, w_in, w_out)]
    got, got_grads = grads_of(lambda *t: expert_mlp(*t, offsets, activation), cast, dy.to(dtype))
    assert got.dtype == dtype
    if dtype == torch.bfloat16:
        # Bound the error by twice that of the plain loop run in bf16 itself (rounding can
        # flip a relu or a near-zero pre-activation for both alike).
        low, low_grads = grads_of(
            lambda *t: loop_experts(*t, offsets, activation), cast, dy.to(dtype)
        )
        for a, b, r in zip([got, *got_grads], [low, *low_grads], [ref, *ref_grads], strict=True):
            if r.numel():
                ours = float((a.double() - r).abs().max())
                plain = float((b.double() - r).abs().max())
                assert ours <= 2 * plain + 1e-2 * max(1.0, float(r.abs().max()))
        return
    tol = {
        torch.float64: {"rtol": 1e-10, "atol": 1e-12},
        torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    }[dtype]
    torch.testing.assert_close(got.double(), ref, **tol)
    for name, a, b in zip(["xs", "w_in", "w_out"], got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda s, n=name: f"{n}: {s}")


@pytest.mark.skipif(not _experts.grouped_mm_available(torch.float32), reason="no _grouped_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ACTS)
def test_expert_mlp_grouped_path_matches_mm_path(dtype, activation, monkeypatch):
    # Aligned widths and one chunk: the grouped GEMM path; then the per-expert torch.mm path.
    g = torch.Generator().manual_seed(1)
    offsets = [0, 9, 9, 30, 31, 40]
    h_in = 32 if activation == "swiglu" else 16
    xs = torch.randn(40, 16, generator=g).to(dtype)
    w_in = (torch.randn(5, 16, h_in, generator=g) / 4).to(dtype)
    w_out = (torch.randn(5, 16, 16, generator=g) / 4).to(dtype)
    dy = torch.randn(40, 16, generator=g).to(dtype)
    fn = lambda *t: expert_mlp(*t, offsets, activation)  # noqa: E731
    grouped = grads_of(fn, (xs, w_in, w_out), dy)
    monkeypatch.setattr(_experts, "grouped_mm_available", lambda *a: False)
    looped = grads_of(fn, (xs, w_in, w_out), dy)
    ref = grads_of(lambda *t: loop_experts(*t, offsets, activation), (xs, w_in, w_out), dy)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got in (grouped, looped):
        torch.testing.assert_close(got[0], ref[0], **tol)
        for a, b in zip(got[1], ref[1], strict=True):
            torch.testing.assert_close(a, b, **tol)


@given(
    sizes=st.lists(st.integers(0, 50), min_size=1, max_size=8),
    row_bytes=st.integers(1, 64),
    chunk_bytes=st.integers(1, 1000),
)
def test_chunk_pieces_cover_every_row_once_in_order(sizes, row_bytes, chunk_bytes):
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    limit = max(1, chunk_bytes // row_bytes)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_experts, "CHUNK_BYTES", chunk_bytes)
        chunks = chunk_pieces(offsets, row_bytes)
    pieces = [p for c in chunks for p in c]
    assert [lo for _, lo, _ in pieces] == sorted(lo for _, lo, _ in pieces)
    covered = [r for _, lo, hi in pieces for r in range(lo, hi)]
    assert covered == list(range(offsets[-1]))
    for e, lo, hi in pieces:
        assert offsets[e] <= lo < hi <= offsets[e + 1]
    for c in chunks:
        assert c[-1][2] - c[0][1] <= limit or len(c) == 1
        assert all(a[2] == b[1] for a, b in zip(c, c[1:], strict=False))  # contiguous rows


def test_expert_mlp_gradcheck_with_split_experts(monkeypatch):
    monkeypatch.setattr(_experts, "CHUNK_BYTES", 3 * 8 * 6)  # 3 rows of float64 (2H = 6)
    g = torch.Generator().manual_seed(0)
    offsets = [0, 7, 7, 9]
    xs = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w_out = torch.randn(3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: expert_mlp(a, b, c, offsets, "swiglu"), (xs, w_in, w_out)
    )


def test_expert_mlp_rejects_bad_offsets():
    xs, w_in, w_out = torch.randn(5, 4), torch.randn(2, 4, 6), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="offsets"):
        expert_mlp(xs, w_in, w_out, [0, 2, 4], "swiglu")
    with pytest.raises(ValueError, match="offsets"):
        expert_mlp(xs, w_in, w_out, [0, 5], "swiglu")


@given(
    t=st.integers(1, 40),
    e=st.integers(1, 10),
    data=st.data(),
    capacity_factor=st.one_of(st.none(), st.floats(0.3, 1.5)),
    activation=st.sampled_from(ACTS),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31),
)
def test_layer_segments_matches_float64_reference(
    t, e, data, capacity_factor, activation, dtype, seed
):
    k = data.draw(st.integers(1, min(4, e)))
    torch.manual_seed(seed)
    m = MoE(8, 12, e, k, capacity_factor=capacity_factor, activation=activation)
    m64 = MoE(8, 12, e, k, capacity_factor=capacity_factor, activation=activation)
    m64.load_state_dict(m.state_dict())
    m64.double()
    m.to(dtype)
    x = torch.randn(t, 8)
    xr = x.to(dtype).double()  # the same rounded input for both
    # Routing decisions follow the layer's own router (bf16 logits can tie differently).
    idx = route_topk(m.router(x.to(dtype)).float(), k)[0]
    ref_idx = route_topk(m64.router(xr), k)[0]
    same = (idx == ref_idx).all(-1)
    # With a capacity a flipped token shifts which later slots are dropped.
    assume(capacity_factor is None or bool(same.all()))
    y = m(x.to(dtype))
    ref = moe_reference(xr, m64.router.weight, m64.w_in, m64.w_out, k, m64.capacity(t), activation)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 0.1, "atol": 0.05}
    torch.testing.assert_close(y.double()[same], ref[same], **tol)


# --- routing and plan on the device (torch ops) --------------------------------------------


@given(
    t=st.integers(0, 40),
    e=st.integers(1, 12),
    data=st.data(),
    router=st.sampled_from(["softmax", "sigmoid"]),
    with_bias=st.booleans(),
    renormalize=st.booleans(),
    ties=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_device_route_matches_host(t, e, data, router, with_bias, renormalize, ties, seed):
    k = data.draw(st.integers(1, e))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g) * 3
    if ties:
        logits = logits.round()  # many exact ties: both must send them to the lower index
    bias = torch.randn(e, generator=g).round() if with_bias else None
    idx, w = _ops._route_device(logits, k, router, bias, renormalize)
    ridx, rw = _ops._route_host(logits, k, router, bias, renormalize)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(w, rw, rtol=1e-6, atol=1e-7)


@given(
    t=st.integers(0, 60),
    e=st.integers(1, 9),
    data=st.data(),
    capacity=st.one_of(st.none(), st.integers(0, 20)),
    seed=st.integers(0, 2**31),
)
def test_device_plan_matches_host(t, e, data, capacity, seed):
    k = data.draw(st.integers(1, e))
    gen = torch.Generator().manual_seed(seed)
    idx = (
        torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
        if t
        else (torch.empty((0, k), dtype=torch.int64))
    )
    padded = capacity is not None  # the two layouts the device builds
    dev = _ops._dispatch_plan_device(idx, e, capacity)
    host = _ops._dispatch_plan_host(idx, e, capacity, padded)
    assert dev.padded == host.padded
    for name in ("routed", "counts"):
        assert torch.equal(getattr(dev, name), getattr(host, name)), name
    assert int(dev.dropped) == int(host.dropped)
    if capacity is None:
        for name in ("offsets", "token_of", "slot_of", "pos"):
            assert torch.equal(getattr(dev, name), getattr(host, name)), name
        return
    # Padded: every expert has min(capacity, T * k) rows; its kept slots come first, in the
    # host's order, then padding.
    block = min(capacity, t * k)
    assert dev.offsets.tolist() == [x * block for x in range(e + 1)]
    assert torch.equal(dev.pos >= 0, host.pos >= 0)
    for x in range(e):
        n = int(host.counts[x])
        h0, d0 = int(host.offsets[x]), x * block
        assert torch.equal(dev.slot_of[d0 : d0 + n], host.slot_of[h0 : h0 + n])
        assert torch.equal(dev.token_of[d0 : d0 + n], host.token_of[h0 : h0 + n])
        assert (dev.token_of[d0 + n : d0 + block] == -1).all()
    kept = dev.pos.reshape(-1) >= 0
    assert torch.equal(dev.slot_of[dev.pos.reshape(-1)[kept]], kept.nonzero().reshape(-1))


# --- the CUDA code path makes no host round trip -------------------------------------------


class HostRead(AssertionError):
    pass


def _forbid(*_args, **_kwargs):
    raise HostRead("host read inside the device code path")


@pytest.fixture
def device_path_on_cpu(monkeypatch):
    """Run the layer's CUDA code path on CPU tensors, with every host read made an error.

    `_device_path` says "device" for every tensor, so routing, plan, permute, combine and
    their backward take the code CUDA tensors take (CUDA kernels aside: the permute/combine
    kernels run as torch indexing, as they do for float64 on CUDA). Reading a tensor on the
    host (`tolist`, `item`, `cpu`, `numpy`, `bool`/`int`/`float`, or any Rust host kernel) raises.
    """
    monkeypatch.setattr(_ops, "_device_path", lambda t: True)

    @contextlib.contextmanager
    def forbid_host_reads():
        with pytest.MonkeyPatch.context() as mp:
            for name in ("tolist", "item", "cpu", "numpy", "__bool__", "__int__", "__float__"):
                mp.setattr(torch.Tensor, name, _forbid)
            for name in (
                "moe_route",
                "moe_dispatch_plan",
                "moe_permute",
                "moe_combine",
                "moe_rowdot",
            ):
                mp.setattr(_native, name, _forbid)
            yield

    return forbid_host_reads


@pytest.mark.skipif(not grouped_mm_available(torch.float32), reason="no torch._grouped_mm")
@pytest.mark.parametrize(
    "capacity_factor,router,impl",
    [(None, "softmax", "grouped_mm"), (0.7, "softmax", "bmm"), (0.9, "sigmoid", "bmm")],
    ids=["dropless-grouped_mm", "capacity-bmm", "sigmoid-capacity-bmm"],
)
def test_cuda_code_path_never_reads_device_data_on_host(
    capacity_factor, router, impl, device_path_on_cpu
):
    # These are what expert_impl="auto" picks on CUDA (bf16 dropless / any capacity).
    cuda = torch.device("cuda")
    widths = (16, 48, 24)
    assert resolve_expert_impl("auto", torch.float32, cuda, widths, capacity=True) == "bmm"
    assert resolve_expert_impl("auto", torch.bfloat16, cuda, widths) == "grouped_mm"
    torch.manual_seed(9)
    m = MoE(16, 24, 8, 2, capacity_factor=capacity_factor, router=router, expert_impl=impl)
    if m.expert_bias is not None:
        m.expert_bias.copy_(torch.randn(8) * 0.1)
    x, g = torch.randn(40, 16), torch.randn(40, 16)
    want = m(x).detach()
    want_loss = m.aux_loss.detach()
    xx = x.clone().requires_grad_()
    with device_path_on_cpu():
        y = m(xx)  # forward: no host read (the fixture raises on any)
        loss = (y * g).sum() + m.aux_loss
        loss.backward()  # backward neither
    torch.testing.assert_close(y.detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.aux_loss.detach(), want_loss)
    assert xx.grad is not None and m.w_in.grad is not None and m.router.weight.grad is not None


def test_forbidding_fixture_catches_the_host_path(device_path_on_cpu, monkeypatch):
    # The same forward with the host plan (what CPU tensors use) does read on the host.
    monkeypatch.setattr(_ops, "_device_path", lambda t: False)
    m, x = MoE(16, 24, 8, 2, expert_impl="segments"), torch.randn(10, 16)
    with device_path_on_cpu(), pytest.raises(HostRead):
        m(x)


def test_auto_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    w = (16, 48, 24)
    assert resolve_expert_impl("auto", torch.float32, cpu, w) == "segments"
    assert resolve_expert_impl("auto", torch.bfloat16, cpu, w) == "segments"
    assert resolve_expert_impl("auto", torch.float32, cuda, w) == "segments"
    assert resolve_expert_impl("auto", torch.float32, cuda, w, capacity=True) == "bmm"
    if grouped_mm_available(torch.bfloat16, w):
        assert resolve_expert_impl("auto", torch.bfloat16, cuda, w) == "grouped_mm"
    assert resolve_expert_impl("segments", torch.float32, cuda, w, capacity=True) == "segments"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("capacity_factor", [None, 0.8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_layer_matches_cpu_without_sync(capacity_factor, dtype):
    try:
        from slimforge import _cuda  # noqa: F401
    except ImportError:
        pytest.skip("slimforge._cuda not built")
    torch.manual_seed(10)
    m = MoE(32, 64, 8, 2, capacity_factor=capacity_factor, dtype=dtype)
    x = torch.randn(64, 32).to(dtype)
    y = m(x)
    mc = MoE(32, 64, 8, 2, capacity_factor=capacity_factor, dtype=dtype, device="cuda")
    mc.load_state_dict(m.state_dict())
    xc = x.cuda()
    mc(xc)  # warm-up (kernel compilation)
    # "auto" is sync-free on CUDA except dropless float32 ("segments" reads the offsets).
    if mc._impl(xc) != "segments":
        torch.cuda.set_sync_debug_mode("error")
    try:
        yc = mc(xc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 5e-2, "atol": 5e-2}
    assert yc.shape == y.shape and bool(torch.isfinite(yc.float()).all())
    if capacity_factor is None:
        # Compare the tokens both devices route alike (bf16 logits may round differently).
        same = (mc.route(xc)[1].cpu() == m.route(x)[1]).all(-1)
        assert same.float().mean() > 0.9
        torch.testing.assert_close(yc.cpu().float()[same], y.float()[same], **tol)
    elif dtype == torch.float32:
        torch.testing.assert_close(yc.cpu(), y, **tol)
