"""Shared building blocks: module surgery (select and swap submodules in place)."""

from slimforge._optional import require

require("torch", "slimforge.nn")

from slimforge.nn.surgery import (
    ModuleFilter,
    all_of,
    module_filter,
    replace_modules,
    select_modules,
    set_submodule,
)

__all__ = [
    "ModuleFilter",
    "all_of",
    "module_filter",
    "replace_modules",
    "select_modules",
    "set_submodule",
]
