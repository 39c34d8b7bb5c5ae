"""LoRA and QLoRA adapters, in peft's file format, on float and INT4/INT8 bases.

    apply_lora(model, LoraConfig(r=8, alpha=16, target_modules=("q_proj", "v_proj")))
    Trainer(model, tokens, config=TrainConfig(...)).fit()   # only the adapters train
    save_adapter(model, "adapter")                          # peft's adapter directory
    merge_and_unload(model, requantize="rtn")               # fold in, re-quantize INT4 bases

See docs/lora.md.
"""

from slimforge._optional import require

require("torch", "slimforge.lora")

from slimforge.lora.config import INITS, LoraConfig
from slimforge.lora.layer import BASE_TYPES, LoraLinear, RequantError, base_weight
from slimforge.lora.model import (
    apply_lora,
    delete_adapter,
    disable_adapters,
    lora_layers,
    merge_and_unload,
    merge_lora,
    parameter_counts,
    set_adapter,
    trainable_parameters,
    unmerge_lora,
)
from slimforge.lora.peft_format import (
    hf_state_dict,
    load_adapter,
    module_name_from_peft,
    peft_module_name,
    save_adapter,
)

__all__ = [
    "BASE_TYPES",
    "INITS",
    "LoraConfig",
    "LoraLinear",
    "RequantError",
    "apply_lora",
    "base_weight",
    "delete_adapter",
    "disable_adapters",
    "hf_state_dict",
    "load_adapter",
    "lora_layers",
    "merge_and_unload",
    "merge_lora",
    "module_name_from_peft",
    "parameter_counts",
    "peft_module_name",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge_lora",
]
