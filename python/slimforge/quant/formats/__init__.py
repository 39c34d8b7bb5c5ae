"""Interchange formats for quantized weights: GPTQ checkpoints and GGUF files."""

from slimforge.quant.formats.gguf import GGUFFile, dequantize_gguf_tensor, read_gguf
from slimforge.quant.formats.gptq_layout import export_gptq, import_gptq

__all__ = ["GGUFFile", "dequantize_gguf_tensor", "export_gptq", "import_gptq", "read_gguf"]
