"""Models built from slimforge's layers, one causal-LM protocol and model specs.

Every causal LM follows `slimforge.models.protocol`: ``model(input_ids, labels=None)`` returns
a ``CausalLMOutput`` with every position's logits and the loss; each model declares its
structure as a `ModelSpec` (``model.spec()``, or `model_spec(model)` for Hugging Face
Llama-style modules).
"""

from slimforge._optional import require

require("torch", "slimforge.models")

from slimforge.models.gpt import GPT, GPTConfig
from slimforge.models.llama import ByteLevelBPETokenizer, LlamaConfig, LlamaForCausalLM
from slimforge.models.protocol import IGNORE_INDEX, CausalLMOutput, causal_lm_loss
from slimforge.models.spec import BlockSpec, ModelSpec, model_spec

__all__ = [
    "GPT",
    "IGNORE_INDEX",
    "BlockSpec",
    "ByteLevelBPETokenizer",
    "CausalLMOutput",
    "GPTConfig",
    "LlamaConfig",
    "LlamaForCausalLM",
    "ModelSpec",
    "causal_lm_loss",
    "model_spec",
]
