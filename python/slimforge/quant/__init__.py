"""Weight-only INT8/INT4 quantization: primitives, ``QuantLinear``, one verb ``quantize_``
(round-to-nearest, GPTQ, AWQ, the QAT prepare step), ``convert`` and save/load.

    quantize_(model, Int8WeightOnly())
    quantize_(model, GPTQ(bits=4, group_size=128), calibration=batches)

Layout: codes ``q`` (uint8, ``[0, 2**bits - 1]``), float32 ``scales`` and integer-valued
``zeros`` per group, ``w ~= (q - zero) * scale``; INT4 packs element ``2j`` in the low nibble.
See docs/quant.md.
"""

from slimforge._optional import require

require("torch", "slimforge.quant")

from slimforge.quant.api import (
    Int4WeightOnly,
    Int8WeightOnly,
    QuantConfig,
    quantize_,
    register_quantize_handler,
)
from slimforge.quant.awq import AWQ, quantize_awq
from slimforge.quant.gptq import GPTQ, quantize_gptq
from slimforge.quant.linear import QuantEmbedding, QuantLinear
from slimforge.quant.primitives import (
    choose_qparams,
    dequantize_affine,
    fake_quantize_affine,
    pack_int4,
    quantize_affine,
    unpack_int4,
)
from slimforge.quant.qat import FakeQuantLinear, QATConfig, convert, prepare_qat
from slimforge.quant.serialization import (
    load_quantized,
    register_quantized_module,
    save_quantized,
)
from slimforge.quant.transformed import InputTransformedLinear

__all__ = [
    "AWQ",
    "GPTQ",
    "FakeQuantLinear",
    "InputTransformedLinear",
    "Int4WeightOnly",
    "Int8WeightOnly",
    "QATConfig",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "choose_qparams",
    "convert",
    "dequantize_affine",
    "fake_quantize_affine",
    "load_quantized",
    "pack_int4",
    "prepare_qat",
    "quantize_",
    "quantize_affine",
    "quantize_awq",
    "quantize_gptq",
    "register_quantize_handler",
    "register_quantized_module",
    "save_quantized",
    "unpack_int4",
]
