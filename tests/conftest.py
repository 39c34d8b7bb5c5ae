"""Shared pytest configuration: hypothesis profiles and asset lookup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def asset_dir() -> Path:
    """Where scripts/fetch_assets.py put the sha256-pinned assets."""
    return Path(os.environ.get("SLIMFORGE_ASSETS", Path.home() / ".cache" / "slimforge" / "assets"))


@pytest.fixture(scope="session")
def assets() -> Path:
    d = asset_dir()
    if not (d / "MANIFEST.ok").exists():
        pytest.skip(f"assets not fetched into {d}: run `make assets`")
    return d
