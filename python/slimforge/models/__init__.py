"""Small reference models built from slimforge's layers."""

from slimforge.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
