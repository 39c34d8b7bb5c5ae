//! INT8/INT4 quantization: affine quantize/dequantize, nibble packing, fused dequant-matmul, GPTQ.
