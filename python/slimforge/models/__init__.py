"""Small reference models built from slimforge's layers."""

from slimforge.models.gpt import GPT, GPTConfig
from slimforge.models.llama import ByteLevelBPETokenizer, LlamaForCausalLM

__all__ = ["GPT", "ByteLevelBPETokenizer", "GPTConfig", "LlamaForCausalLM"]
