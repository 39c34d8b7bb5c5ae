"""Optional dependencies: which extra of the wheel brings each one.

The core install (`pip install slimforge`) brings only numpy and tqdm: dedup and the command
line work with that. Areas that need more call `require` when imported, so a missing package is
one clear ImportError that names the extra to install, not a bare "No module named ...".
"""

from __future__ import annotations

import importlib.util

# module -> the extra that installs it (see [project.optional-dependencies] in pyproject.toml)
EXTRAS = {
    "torch": "torch",
    "safetensors": "torch",
    "tokenizers": "llm",
    "pyarrow": "parquet",
    "peft": "lora",
    "matplotlib": "plots",
    "ray": "ray",
    "onnx": "vision",
    "onnxruntime": "vision",
    "skimage": "vision",
    "sklearn": "vision",
}


def require(module: str, feature: str) -> None:
    """Raise ImportError naming the extra that provides `module` when it is not installed."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # blocked (sys.modules[module] = None) or broken
        found = False
    if not found:
        extra = EXTRAS.get(module, "all")
        raise ImportError(
            f"{feature} needs the optional dependency {module!r}, which is not installed: "
            f"pip install 'slimforge[{extra}]'",
            name=module,
        )
