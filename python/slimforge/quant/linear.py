"""Weight-only quantized modules: ``QuantLinear`` and ``QuantEmbedding``.

Both hold the documented layout as buffers (``qweight`` uint8, ``scales``/``zeros`` float32,
see :mod:`slimforge.quant.primitives`). On CPU, ``QuantLinear`` runs the fused Rust
dequantize-and-multiply kernels for up to ``FUSED_MAX_TOKENS`` rows (``FUSED_MAX_TOKENS_FLOAT``
on the float route). On CUDA, up to 8 rows run the fused GEMV kernel compiled by NVRTC
(:func:`slimforge._cuda.quant_linear_cuda`) when the CUDA backend is usable. Larger batches, and
layouts or devices the kernels do not take, dequantize the weight and call
``torch.nn.functional.linear``. Under ``torch.compile`` the forward is the custom op
``slimforge::quant_linear`` (same kernels, with a fake kernel and input-only autograd).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimforge import _cuda, _native
from slimforge.quant.primitives import (
    check_bits,
    choose_qparams,
    pack_int4,
    quantize_affine,
    resolve_group_size,
)

__all__ = [
    "FUSED_MAX_TOKENS",
    "FUSED_MAX_TOKENS_FLOAT",
    "QuantEmbedding",
    "QuantLinear",
    "dequantize_packed",
    "fuse_quant_linears",
]

#: Batches of at most this many rows use the fused int8-activation kernel; larger ones
#: dequantize + matmul (crossover measured with benches/python/quant_gemv.py, see docs/quant.md).
FUSED_MAX_TOKENS = 64
#: The same limit for the float route, whose cost grows faster with the batch.
FUSED_MAX_TOKENS_FLOAT = 32

_ACT_DTYPES = (torch.float32, torch.bfloat16)
_ROUTES = ("auto", "float", "int8")


def _unpack_torch(packed: torch.Tensor) -> torch.Tensor:
    """Nibble unpack with torch ops (any device): ``(..., n)`` -> ``(..., 2n)``."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def dequantize_packed(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """Float32 weight ``(out, in)`` from packed ``qweight`` (Rust on CPU, torch ops elsewhere)."""
    if qweight.device.type == "cpu":
        w = _native.quant_dequantize_packed(
            qweight.contiguous().numpy(),
            scales.contiguous().numpy(),
            zeros.contiguous().numpy(),
            bits,
            group_size,
        )
        return torch.from_numpy(w)
    q = _unpack_torch(qweight) if bits == 4 else qweight
    out, k = q.shape
    qf = q.to(torch.float32).reshape(out, k // group_size, group_size)
    return ((qf - zeros.unsqueeze(-1)) * scales.unsqueeze(-1)).reshape(out, k)


def _use_cuda_gemv(
    x: torch.Tensor,
    m: int,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> bool:
    """Decode-size CUDA calls run the fused kernel; larger batches dequantize once and use
    cuBLAS (the weight read is then amortised over the tokens)."""
    if not (x.is_cuda and 0 < m <= _cuda.QUANT_GEMV_MAX_TOKENS):
        return False
    bufs = [qweight, scales, zeros]
    if bias is not None:
        bufs.append(bias)
    return (
        all(t.device == x.device for t in bufs)
        and qweight.data_ptr() % 4 == 0  # the kernel reads 32-bit words
        and _cuda.quant_gemv_supported(bits, x.shape[-1], group_size)
        and _cuda.cuda_available()
    )


def _fused_max_tokens(bits: int, route: str) -> int:
    # As QuantLinear.fused_max_tokens, from the layout instead of the module.
    route = _native.quant_default_route(bits) if route == "auto" else route
    return FUSED_MAX_TOKENS if route == "int8" else FUSED_MAX_TOKENS_FLOAT


def _fused_cpu(
    x: torch.Tensor,
    x2: torch.Tensor,
    native: tuple[Any, Any, Any, Any],
    bits: int,
    group_size: int,
    route: str,
) -> torch.Tensor:
    """The fused Rust kernel on the 2-D rows ``x2`` of ``x``; ``native``: NumPy views of
    ``(qweight, scales, zeros, bias)``."""
    args = (*native, bits, group_size, route)
    xc = x2.contiguous()
    if x.dtype == torch.bfloat16:
        y = _native.quant_linear_bf16(xc.view(torch.int16).numpy(), *args)
    else:
        y = _native.quant_linear(xc.numpy(), *args)
    y_t = torch.from_numpy(y)
    return y_t if x.dtype == torch.float32 else y_t.to(x.dtype)


def _unfused(
    x: torch.Tensor,
    x2: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """The CUDA GEMV kernel, or dequantize + ``F.linear``, on the 2-D rows ``x2`` of ``x``."""
    if _use_cuda_gemv(x, x2.shape[0], qweight, scales, zeros, bias, bits, group_size):
        return _cuda.quant_linear_cuda(x2, qweight, scales, zeros, bias, bits, group_size)
    w = dequantize_packed(qweight, scales, zeros, bits, group_size).to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)
    return F.linear(x2, w, b)


def _linear_forward(x: torch.Tensor, module: QuantLinear) -> torch.Tensor:
    """Eager forward (no autograd) with the module's cached NumPy views; no op dispatch."""
    # Decode calls are a few microseconds of kernel: skip the tensor ops they do not need.
    x2 = x if x.dim() == 2 else x.reshape(-1, module.in_features)
    if x2.requires_grad:
        x2 = x2.detach()
    if x.is_cpu and x2.shape[0] <= module.fused_max_tokens():
        native = module._native_weight()
        y_t = _fused_cpu(x, x2, native, module.bits, module.group_size, module.route)
    else:
        bufs = (module.qweight, module.scales, module.zeros, module.bias)
        y_t = _unfused(x, x2, *bufs, module.bits, module.group_size)
    return y_t if x.dim() == 2 else y_t.reshape(*x.shape[:-1], module.out_features)


def _numpy_view(t: torch.Tensor | None) -> Any:
    # ~1 us for a contiguous buffer (what the layer holds); no detach() unless needed.
    if t is None:
        return None
    return (t.detach() if t.requires_grad else t).contiguous().numpy()


def _linear_impl(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    route: str,
) -> torch.Tensor:
    """`_linear_forward` on the buffers themselves (the body of ``slimforge::quant_linear``)."""
    x2 = x.reshape(-1, x.shape[-1]).detach()
    if x.is_cpu and x2.shape[0] <= _fused_max_tokens(bits, route):
        native = tuple(_numpy_view(t) for t in (qweight, scales, zeros, bias))
        y_t = _fused_cpu(x, x2, native, bits, group_size, route)  # type: ignore[arg-type]
    else:
        y_t = _unfused(x, x2, qweight, scales, zeros, bias, bits, group_size)
    return y_t.reshape(*x.shape[:-1], qweight.shape[0])


# --- torch custom ops (what torch.compile traces) -------------------------------------------


@torch.library.custom_op("slimforge::quant_dequantize", mutates_args=())
def quant_dequantize_op(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """Float32 weight ``(out, in)`` from the packed layout (:func:`dequantize_packed`)."""
    return dequantize_packed(qweight.detach(), scales.detach(), zeros.detach(), bits, group_size)


@quant_dequantize_op.register_fake
def _(qweight, scales, zeros, bits, group_size):
    cols = qweight.shape[1] * 2 if bits == 4 else qweight.shape[1]
    return qweight.new_empty((qweight.shape[0], cols), dtype=torch.float32)


@torch.library.custom_op("slimforge::quant_linear", mutates_args=())
def quant_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    route: str,
) -> torch.Tensor:
    """``x (..., in)`` times the dequantized weight, plus bias: ``(..., out)`` in x's dtype."""
    return _linear_impl(x, qweight, scales, zeros, bias, bits, group_size, route)


@quant_linear_op.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size, route):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _quant_linear_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, qweight, scales, zeros, _, bits, group_size, _ = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.layout = (bits, group_size)


def _quant_linear_backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    # Frozen quantized weight: gradients flow to the input only.
    dx = None
    if ctx.needs_input_grad[0]:
        qweight, scales, zeros = ctx.saved_tensors
        w = torch.ops.slimforge.quant_dequantize(qweight, scales, zeros, *ctx.layout)
        dx = torch.matmul(grad, w.to(grad.dtype))
    return dx, None, None, None, None, None, None, None


torch.library.register_autograd(
    "slimforge::quant_linear", _quant_linear_backward, setup_context=_quant_linear_setup
)


def _keep_float32(module: nn.Module, names: tuple[str, ...]) -> None:
    # model.half() / .bfloat16() must not change the quantization parameters' layout
    for name in names:
        t = module._buffers.get(name)
        if t is not None and t.dtype != torch.float32:
            module._buffers[name] = t.to(torch.float32)


class _QuantLinearFunction(torch.autograd.Function):
    """Frozen quantized weight: gradients flow to the input only (eager; torch.compile traces
    ``slimforge::quant_linear`` and its registered autograd instead)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, module: QuantLinear
    ) -> torch.Tensor:
        ctx.module = module
        return _linear_forward(x, module)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        module: QuantLinear = ctx.module
        w = module.dequantize().to(grad_out.dtype)
        g2 = grad_out.reshape(-1, module.out_features)
        return (g2 @ w).reshape(*grad_out.shape[:-1], module.in_features), None


def _bad_values(where: str, name: str, t: torch.Tensor, ok: torch.Tensor, rule: str) -> None:
    """ValueError naming the first element of ``t`` where ``ok`` is False, if any."""
    if bool(ok.all()):
        return
    bad = (~ok).nonzero()
    idx = tuple(int(i) for i in bad[0])
    raise ValueError(
        f"{where}: {name} must be {rule}; {bad.shape[0]} of {t.numel()} values are not "
        f"(e.g. {t[idx].item()!r} at {list(idx)})"
    )


def _check_quant_buffers(
    where: str,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    rows: int,
    in_features: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> None:
    """Checks loaded buffers against the documented layout: dtypes and shapes (so codes are
    below ``2**bits``), scales finite and positive, zero points integers in
    ``[0, 2**bits - 1]`` and a finite bias; raises ``ValueError`` starting with ``where``.
    Temporary memory: a few copies of ``scales`` / ``zeros``, none of ``qweight``."""
    cols = in_features if bits == 8 else in_features // 2
    ng = in_features // group_size
    want: dict[str, tuple[torch.Tensor, torch.dtype, tuple[int, ...]]] = {
        "qweight": (qweight, torch.uint8, (rows, cols)),
        "scales": (scales, torch.float32, (rows, ng)),
        "zeros": (zeros, torch.float32, (rows, ng)),
    }
    if bias is not None:
        want["bias"] = (bias, torch.float32, (rows,))
    for name, (t, dtype, shape) in want.items():
        if t.dtype != dtype or tuple(t.shape) != shape:
            raise ValueError(
                f"{where}: {name} must be {dtype} {list(shape)}, got {t.dtype} {list(t.shape)}"
            )
    qmax = 2**bits - 1
    _bad_values(where, "scales", scales, torch.isfinite(scales) & (scales > 0), "finite and > 0")
    zeros_ok = torch.isfinite(zeros) & (zeros == zeros.round()) & (zeros >= 0) & (zeros <= qmax)
    _bad_values(where, "zeros", zeros, zeros_ok, f"integers in [0, {qmax}]")
    # Codes: a uint8 qweight holds only codes below 2**bits (one per byte for INT8, two nibbles
    # for INT4), so the dtype check above covers them without a pass over the weight.
    if bias is not None:
        _bad_values(where, "bias", bias, torch.isfinite(bias), "finite")


class QuantLinear(nn.Module):
    """Linear layer with a frozen INT8 or INT4 weight (weight-only quantization).

    Buffers: ``qweight`` uint8 ``(out, in)`` (INT8) or ``(out, in // 2)`` (INT4, element ``2j``
    in the low nibble), ``scales`` and ``zeros`` float32 ``(out, in // group_size)``, optional
    ``bias`` float32 ``(out,)``. ``forward`` takes ``(..., in)`` float32 or bfloat16 input and
    returns ``(..., out)`` in the input dtype; gradients reach the input, never the weight.

    ``route`` picks the CPU kernel: ``"float"`` (codes dequantized in registers, float32
    accumulation), ``"int8"`` (activations quantized to int8 per 32 inputs, integer dot
    products; faster, adds error at most ``sum |w| * absmax(block) / 254`` per output) or
    ``"auto"`` (the faster on this CPU, ``"int8"`` except for INT8 weights on AVX-512 without
    VNNI; see docs/quant.md).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int | None = 128,
        bias: bool = True,
        route: str = "auto",
    ) -> None:
        super().__init__()
        check_bits(bits)
        g = resolve_group_size(group_size, in_features)
        if bits == 4 and in_features % 2 != 0:
            raise ValueError(f"INT4 needs an even in_features, got {in_features}")
        if route not in _ROUTES:
            raise ValueError(f"route must be one of {_ROUTES}, got {route!r}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = int(bits)
        self.group_size = g
        self.route = route
        cols = in_features if bits == 8 else in_features // 2
        ng = in_features // g
        self.register_buffer("qweight", torch.zeros(out_features, cols, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, ng, dtype=torch.float32))
        self.register_buffer("zeros", torch.zeros(out_features, ng, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        bits: int = 4,
        group_size: int | None = 128,
        symmetric: bool = False,
        no_clip: bool = False,
    ) -> QuantLinear:
        """Round-to-nearest quantization of an ``nn.Linear`` (min-max, or absmax if symmetric;
        ``no_clip``: symmetric scale that never clips, see :func:`choose_qparams`)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        g = resolve_group_size(group_size, linear.in_features)
        scales, zeros = choose_qparams(w, bits, g, symmetric, no_clip=no_clip)
        q = quantize_affine(w, scales, zeros, bits, g)
        return cls.from_quantized(q, scales, zeros, linear.bias, bits, g)

    @classmethod
    def from_quantized(
        cls,
        q_codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None,
        bits: int,
        group_size: int | None,
    ) -> QuantLinear:
        """Builds a layer from unpacked uint8 codes ``(out, in)`` and float32 parameters
        ``(out, in // group_size)`` (as produced by GPTQ/AWQ)."""
        if not isinstance(q_codes, torch.Tensor) or q_codes.dtype != torch.uint8:
            raise TypeError(
                f"q_codes must be a uint8 tensor, got {getattr(q_codes, 'dtype', q_codes)}"
            )
        if q_codes.dim() != 2:
            raise ValueError(f"q_codes must be (out, in), got shape {tuple(q_codes.shape)}")
        out, k = q_codes.shape
        layer = cls(k, out, bits, group_size, bias=bias is not None)
        ng = k // layer.group_size
        for name, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (out, ng):
                raise ValueError(f"{name} must have shape {(out, ng)}, got {tuple(t.shape)}")
        if q_codes.numel() and int(q_codes.max()) >= 2**bits:
            raise ValueError(f"codes must be < {2**bits} for {bits}-bit, got {int(q_codes.max())}")
        q = q_codes.detach().cpu()
        layer.qweight.copy_(pack_int4(q) if bits == 4 else q)
        layer.scales.copy_(scales.detach().to("cpu", torch.float32))
        layer.zeros.copy_(zeros.detach().to("cpu", torch.float32))
        if bias is not None and layer.bias is not None:
            if tuple(bias.shape) != (out,):
                raise ValueError(f"bias must have shape {(out,)}, got {tuple(bias.shape)}")
            layer.bias.copy_(bias.detach().to("cpu", torch.float32))
        return layer

    def dequantize(self) -> torch.Tensor:
        """Float32 weight ``(out, in)``."""
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    _BUFFERS = ("qweight", "scales", "zeros", "bias")

    def fused_max_tokens(self) -> int:
        """Largest batch (rows) that runs the fused CPU kernel for this layer's route."""
        route = _native.quant_default_route(self.bits) if self.route == "auto" else self.route
        return FUSED_MAX_TOKENS if route == "int8" else FUSED_MAX_TOKENS_FLOAT

    def _native_weight(self) -> tuple[Any, Any, Any, Any]:
        """NumPy views of the buffers for the kernels, cached (they share the buffers' memory)."""
        cached = self.__dict__.get("_np_views")
        if cached is not None:
            return cached
        ts = [getattr(self, name) for name in self._BUFFERS]
        views = tuple(None if t is None else t.contiguous().numpy() for t in ts)
        if all(t is None or t.is_contiguous() for t in ts):
            self.__dict__["_np_views"] = views
        return views  # type: ignore[return-value]

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        self.__dict__.pop("_np_views", None)
        super()._apply(fn, recurse)
        _keep_float32(self, ("scales", "zeros", "bias"))
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._BUFFERS:
            self.__dict__.pop("_np_views", None)
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _ACT_DTYPES:
            raise TypeError(f"QuantLinear takes float32 or bfloat16 input, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input must be (..., {self.in_features}), got shape {tuple(x.shape)}")
        if torch.compiler.is_compiling():
            # One opaque op with a fake kernel and autograd, for torch.compile. Eager calls skip
            # the op dispatch (~8 us on decode-size calls) and use the cached NumPy views.
            return torch.ops.slimforge.quant_linear(
                x,
                self.qweight,
                self.scales,
                self.zeros,
                self.bias,
                self.bits,
                self.group_size,
                self.route,
            )
        if x.requires_grad and torch.is_grad_enabled():
            return _QuantLinearFunction.apply(x, self)
        return _linear_forward(x, self)

    def quant_spec(self) -> dict[str, Any]:
        """Constructor arguments, for :mod:`slimforge.quant.serialization`."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "bias": self.bias is not None,
        }

    def check_buffers(self, where: str = "QuantLinear") -> None:
        """Validates the buffers (after loading an untrusted checkpoint); see
        :func:`_check_quant_buffers`."""
        _check_quant_buffers(
            where,
            self.qweight,
            self.scales,
            self.zeros,
            self.bits,
            self.out_features,
            self.in_features,
            self.group_size,
            self.bias,
        )

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> QuantLinear:
        return cls(
            int(spec["in_features"]),
            int(spec["out_features"]),
            int(spec["bits"]),
            int(spec["group_size"]),
            bias=bool(spec["bias"]),
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )


class QuantEmbedding(nn.Module):
    """Embedding table with INT8 (or INT4) rows, dequantized on lookup; output float32.

    Buffers as :class:`QuantLinear` with ``(num_embeddings, embedding_dim)`` as ``(out, in)``.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int = 8,
        group_size: int | None = None,
        padding_idx: int | None = None,
    ) -> None:
        super().__init__()
        check_bits(bits)
        g = resolve_group_size(group_size, embedding_dim)
        if bits == 4 and embedding_dim % 2 != 0:
            raise ValueError(f"INT4 needs an even embedding_dim, got {embedding_dim}")
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        self.bits = int(bits)
        self.group_size = g
        self.padding_idx = padding_idx
        cols = embedding_dim if bits == 8 else embedding_dim // 2
        ng = embedding_dim // g
        self.register_buffer("qweight", torch.zeros(num_embeddings, cols, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(num_embeddings, ng, dtype=torch.float32))
        self.register_buffer("zeros", torch.zeros(num_embeddings, ng, dtype=torch.float32))

    @classmethod
    def from_float(
        cls,
        embedding: nn.Embedding,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        no_clip: bool = False,
    ) -> QuantEmbedding:
        """Round-to-nearest quantization of an ``nn.Embedding`` (rows are output channels;
        ``no_clip`` as in :meth:`QuantLinear.from_float`)."""
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"expected an nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None or embedding.sparse:
            raise ValueError("QuantEmbedding does not support max_norm or sparse embeddings")
        w = embedding.weight.detach()
        layer = cls(
            embedding.num_embeddings,
            embedding.embedding_dim,
            bits,
            group_size,
            embedding.padding_idx,
        )
        scales, zeros = choose_qparams(w, bits, layer.group_size, symmetric, no_clip=no_clip)
        q = quantize_affine(w, scales, zeros, bits, layer.group_size).cpu()
        layer.qweight.copy_(pack_int4(q) if bits == 4 else q)
        layer.scales.copy_(scales.cpu())
        layer.zeros.copy_(zeros.cpu())
        return layer

    def _apply(self, fn: Any, recurse: bool = True) -> QuantEmbedding:
        super()._apply(fn, recurse)
        _keep_float32(self, ("scales", "zeros"))
        return self

    def dequantize(self) -> torch.Tensor:
        """Float32 table ``(num_embeddings, embedding_dim)``."""
        return dequantize_packed(self.qweight, self.scales, self.zeros, self.bits, self.group_size)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x (..., embedding_dim) @ table^T``: logits of a head tied to this table, through the
        quantized matmul (the table's rows are the output channels); float32 or bfloat16 x."""
        if x.dtype not in _ACT_DTYPES:
            raise TypeError(f"QuantEmbedding.linear takes float32 or bfloat16, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.embedding_dim:
            raise ValueError(f"input must be (..., {self.embedding_dim}), got {tuple(x.shape)}")
        return torch.ops.slimforge.quant_linear(
            x, self.qweight, self.scales, self.zeros, None, self.bits, self.group_size, "auto"
        )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
        rows = self.qweight[indices]
        q = _unpack_torch(rows) if self.bits == 4 else rows
        shape = (*indices.shape, self.embedding_dim // self.group_size, self.group_size)
        qf = q.to(torch.float32).reshape(shape)
        w = (qf - self.zeros[indices].unsqueeze(-1)) * self.scales[indices].unsqueeze(-1)
        return w.reshape(*indices.shape, self.embedding_dim)

    def quant_spec(self) -> dict[str, Any]:
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "bits": self.bits,
            "group_size": self.group_size,
            "padding_idx": self.padding_idx,
        }

    def check_buffers(self, where: str = "QuantEmbedding") -> None:
        """Validates the buffers (after loading an untrusted checkpoint); see
        :func:`_check_quant_buffers`."""
        _check_quant_buffers(
            where,
            self.qweight,
            self.scales,
            self.zeros,
            self.bits,
            self.num_embeddings,
            self.embedding_dim,
            self.group_size,
        )

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> QuantEmbedding:
        return cls(
            int(spec["num_embeddings"]),
            int(spec["embedding_dim"]),
            int(spec["bits"]),
            int(spec["group_size"]),
            spec.get("padding_idx"),
        )

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
            f"group_size={self.group_size}"
        )


# --- decode helpers ---------------------------------------------------------------------------


class FusedQuantLinear:
    """Several quantized linears that read one input (q/k/v, gate/up) as one kernel call.

    Their buffers are stacked along the output rows once (a copy of the packed weights, taken
    when the fusion is built: build it again after changing the layers), so a decode step streams
    them in one trip through the fused kernel, and the thread pool is woken once instead of once
    per layer. ``__call__(x (m, in)) -> (m, sum of out_features)``, float32 on the CPU; other
    inputs (bfloat16, CUDA, more than the fused kernel's rows) call the layers one by one and
    concatenate, so the result never depends on which path ran beyond kernel rounding.
    """

    def __init__(self, layers: list[nn.Module], inner: list[QuantLinear]) -> None:
        self.layers = layers
        first = inner[0]
        self.bits, self.group_size, self.route = first.bits, first.group_size, first.route
        self.in_features = first.in_features
        self.out_features = sum(m.out_features for m in inner)
        self.max_tokens = first.fused_max_tokens()
        wrapper = layers[0]
        self.perm = getattr(wrapper, "perm", None)
        self.pre_scale = getattr(wrapper, "pre_scale", None)
        biases = [m.bias for m in inner]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat(
                [
                    torch.zeros(m.out_features) if b is None else b
                    for m, b in zip(inner, biases, strict=False)
                ]
            )
        self.native = tuple(
            None if t is None else t.contiguous().numpy()
            for t in (
                torch.cat([m.qweight for m in inner]),
                torch.cat([m.scales for m in inner]),
                torch.cat([m.zeros for m in inner]),
                bias,
            )
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not (x.dtype == torch.float32 and x.is_cpu and x.dim() == 2):
            return torch.cat([m(x) for m in self.layers], dim=-1)
        if x.shape[0] > self.max_tokens:
            return torch.cat([m(x) for m in self.layers], dim=-1)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        if self.pre_scale is not None:
            x = x / self.pre_scale
        y = _native.quant_linear(
            x.detach().contiguous().numpy(), *self.native, self.bits, self.group_size, self.route
        )
        return torch.from_numpy(y)


def fuse_quant_linears(layers: list[nn.Module]) -> FusedQuantLinear | None:
    """A `FusedQuantLinear` over ``layers`` when they can share one kernel call, else None.

    They can when each is a CPU `QuantLinear` (or each an ``InputTransformedLinear`` around one,
    all with the same ``perm`` and ``pre_scale``: GPTQ's act-order quantizes q/k/v and gate/up
    together, so they share it) of one input size, bit width, group size and route.
    """
    from slimforge.quant.transformed import InputTransformedLinear

    if not layers:
        return None
    inner: list[QuantLinear] = []
    for m in layers:
        if type(m) is InputTransformedLinear:
            first = layers[0]
            if not isinstance(first, InputTransformedLinear):
                return None
            for name in ("perm", "pre_scale"):
                a, b = getattr(m, name), getattr(first, name)
                if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                    return None
            m = m.inner
        elif isinstance(layers[0], InputTransformedLinear):
            return None
        if type(m) is not QuantLinear or not m.qweight.is_cpu:
            return None
        inner.append(m)
    key = {(m.in_features, m.bits, m.group_size, m.route) for m in inner}
    if len(key) != 1:
        return None
    return FusedQuantLinear(list(layers), inner)
