"""Weight-only INT8/INT4 quantization: primitives, ``QuantLinear``, ``quantize_``, GPTQ, AWQ,
QAT and save/load.

Layout: codes ``q`` (uint8, ``[0, 2**bits - 1]``), float32 ``scales`` and integer-valued
``zeros`` per group, ``w ~= (q - zero) * scale``; INT4 packs element ``2j`` in the low nibble.
See docs/quant.md.
"""

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

__all__ = [
    "AWQ",
    "GPTQ",
    "FakeQuantLinear",
    "Int4WeightOnly",
    "Int8WeightOnly",
    "QATConfig",
    "QuantConfig",
    "QuantEmbedding",
    "QuantLinear",
    "choose_qparams",
    "convert",
    "dequantize_affine",
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
