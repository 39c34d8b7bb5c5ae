"""torch.compile(fullgraph=True) of `QuantLinear` and `MoE` against eager, and opcheck of their
custom ops (`slimforge::quant_*`, `slimforge::moe_*`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import slimforge.moe._ops  # noqa: F401  (registers the slimforge::moe_* ops)
import slimforge.quant.linear  # noqa: F401  (registers the slimforge::quant_* ops)
from slimforge.moe import MoE
from slimforge.moe.layer import grouped_mm_available
from slimforge.quant import QuantLinear

ops = torch.ops.slimforge
LAYOUTS = [(4, 32), (4, 128), (8, None)]  # INT4 g32, INT4 g128, INT8 per-channel
SHAPES = [(1, 256), (2, 64, 256)]  # 1 row: fused kernel; 128 rows: dequantize + matmul


def _quant_layers() -> list[QuantLinear]:
    torch.manual_seed(0)
    return [QuantLinear.from_float(nn.Linear(256, 48), bits, g) for bits, g in LAYOUTS]


# --- QuantLinear ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_compiled_matches_eager(dtype):
    layers = nn.ModuleList(_quant_layers())
    assert all(1 <= layer.fused_max_tokens() < 128 for layer in layers)
    cases = [(layer, shape) for layer in layers for shape in SHAPES]

    def fn(xs):
        return [layer(x) for (layer, _), x in zip(cases, xs, strict=True)]

    compiled = torch.compile(fn, fullgraph=True)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(shape, generator=g).to(dtype) for _, shape in cases]
    grads = [torch.randn((*shape[:-1], 48), generator=g).to(dtype) for _, shape in cases]

    def run(f):
        leaves = [x.clone().requires_grad_() for x in xs]
        ys = f(leaves)
        torch.autograd.backward(ys, grads)
        return ys, [x.grad for x in leaves]

    want_y, want_dx = run(fn)
    got_y, got_dx = run(compiled)
    for got, want in zip(got_y + got_dx, want_y + want_dx, strict=True):
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        # The compiled graph runs the same kernels: equal up to rounding.
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # No-grad inference through the compiled function (the decode path of generation).
    with torch.no_grad():
        for got, want in zip(compiled(xs), want_y, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_quant_ops_opcheck():
    g = torch.Generator().manual_seed(2)
    for layer in _quant_layers():
        bufs = (layer.qweight, layer.scales, layer.zeros)
        for dtype in (torch.float32, torch.bfloat16):
            for shape, bias in (((3, 256), layer.bias), ((2, 40, 256), None)):
                x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
                args = (x, *bufs, bias, layer.bits, layer.group_size, layer.route)
                torch.library.opcheck(ops.quant_linear.default, args)
        torch.library.opcheck(ops.quant_dequantize.default, (*bufs, layer.bits, layer.group_size))


# --- MoE -----------------------------------------------------------------------------------


def _moe_run(module, fn, x, g):
    module.zero_grad(set_to_none=True)
    xx = x.detach().requires_grad_()
    y = fn(xx)
    ((y * g).sum() + module.aux_loss).backward()
    params = (module.w_in, module.w_out, module.router.weight)
    return [y.detach(), module.aux_loss.detach(), xx.grad, *(p.grad for p in params)]


@pytest.mark.skipif(not grouped_mm_available(torch.float32), reason="no torch._grouped_mm")
@pytest.mark.parametrize(
    "capacity_factor,router", [(None, "softmax"), (0.7, "sigmoid")], ids=["dropless", "capacity"]
)
def test_moe_compiled_matches_eager(capacity_factor, router):
    torch.manual_seed(3)
    m = MoE(16, 24, num_experts=4, top_k=2, capacity_factor=capacity_factor, router=router)
    # "auto" runs "segments" in eager mode on the CPU and "grouped_mm" while torch.compile traces.
    assert m._impl(torch.empty(0, 16)) == "segments"
    if router == "sigmoid":
        m.expert_bias.copy_(torch.randn(4) * 0.1)
    x = torch.randn(3, 5, 16)
    g = torch.randn(3, 5, 16)
    want = _moe_run(m, m, x, g)
    want_stats = m.last_losses, m.last_load
    compiled = torch.compile(m, fullgraph=True)
    got = _moe_run(m, compiled, x, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert m.last_losses == pytest.approx(want_stats[0], rel=1e-5)
    load, want_load = m.last_load, want_stats[1]
    assert load is not None and want_load is not None
    assert torch.equal(load.tokens_per_expert, want_load.tokens_per_expert)
    assert torch.equal(load.kept_per_expert, want_load.kept_per_expert)
    assert load.dropped == want_load.dropped and isinstance(load.dropped, int)
    assert (load.dropped > 0) == (capacity_factor is not None)


@pytest.mark.parametrize("impl", ["segments", "bmm"])
def test_moe_host_offset_impls_compile_with_graph_breaks(impl):
    # Documented: these read the expert offsets on the host, so fullgraph=True is not possible.
    torch.manual_seed(4)
    m = MoE(16, 24, num_experts=4, top_k=2, expert_impl=impl)
    x, g = torch.randn(15, 16), torch.randn(15, 16)
    want = _moe_run(m, m, x, g)
    got = _moe_run(m, torch.compile(m), x, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_moe_ops_opcheck():
    g = torch.Generator().manual_seed(5)
    t, e, k, d = 7, 5, 2, 8
    logits = torch.randn(t, e, generator=g)
    for router, bias in (("softmax", None), ("sigmoid", torch.randn(e, generator=g))):
        torch.library.opcheck(ops.moe_route.default, (logits, k, router, bias, True))
    idx, _ = ops.moe_route(logits, k, "softmax", None, True)
    for capacity, padded in ((None, False), (2, False), (None, True)):
        torch.library.opcheck(ops.moe_dispatch_plan.default, (idx, e, capacity, padded))
    _, _, _, token_of, slot_of, pos = ops.moe_dispatch_plan(idx, e, 2, False)  # with drops
    assert bool((pos < 0).any())
    rows = token_of.shape[0]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        x = torch.randn(t, d, generator=g).to(dtype)
        ys = torch.randn(rows, d, generator=g).to(dtype)
        dy = torch.randn(t, d, generator=g).to(dtype)
        scale = torch.rand(rows, generator=g).to(acc)
        weights = torch.rand(t, k, generator=g).to(acc)
        torch.library.opcheck(ops.moe_permute_rows.default, (x, token_of, scale))
        torch.library.opcheck(ops.moe_combine_rows.default, (ys, pos, weights))
        torch.library.opcheck(ops.moe_rowdot.default, (dy, ys, pos))
        if dtype == torch.bfloat16:
            continue  # the differentiable ops' gradients are checked in float32 / float64
        xg, ysg, wg = (a.clone().requires_grad_() for a in (x, ys, weights))
        torch.library.opcheck(ops.moe_permute.default, (xg, token_of, pos))
        torch.library.opcheck(ops.moe_combine.default, (ysg, wg, token_of, slot_of, pos))


def test_moe_differentiable_ops_gradcheck():
    g = torch.Generator().manual_seed(6)
    idx, _ = ops.moe_route(torch.randn(6, 4, generator=g), 2, "softmax", None, True)
    _, _, _, token_of, slot_of, pos = ops.moe_dispatch_plan(idx, 4, 2, False)
    x = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    ys = torch.randn(token_of.shape[0], 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ops.moe_permute(x, token_of, pos), (x,))
    assert torch.autograd.gradcheck(
        lambda ys, w: ops.moe_combine(ys, w, token_of, slot_of, pos), (ys, w)
    )


def test_gpt_with_moe_flash_attention_and_int4_linears_compiles_fullgraph() -> None:
    """The whole model: MoE MLPs, slimforge's flash attention, INT4 attention projections and
    an INT8 tied head, under torch.compile(fullgraph=True), forward and backward as eager."""
    from slimforge.models import GPT, GPTConfig
    from slimforge.nn import module_filter
    from slimforge.quant import Int4WeightOnly, Int8WeightOnly, quantize_

    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=64, max_seq_len=16, num_layers=2, num_heads=2, hidden_size=64,
        mlp="moe", num_experts=4, top_k=2, position="rope",
    )  # fmt: skip
    model = GPT(cfg)
    quantize_(model, Int4WeightOnly(group_size=32), filter_fn=module_filter(include="*.attn.*"))
    quantize_(model, Int8WeightOnly(), filter_fn=module_filter(types=torch.nn.Embedding))
    # The default CPU route rounds activations to int8, a step function: inductor's reordered
    # float ops (1e-7 apart) can flip a rounding there. The float route compares tightly.
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.route = "float"
    ids = torch.randint(0, 64, (2, 16))
    eager = model(ids, labels=ids)
    eager.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any("w_in" in n for n in grads)  # experts train through the quantized attention
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(ids, labels=ids)
    torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, eager.loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=n)
