#!/usr/bin/env bash
# Fast in-place build of the extension for development: python/slimforge/_native.abi3.so.
# Use with PYTHONPATH=python (or the editable install made by `make build`).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYO3_PYTHON="${PYO3_PYTHON:-$(pwd)/.venv/bin/python}"
[ -x "$PYO3_PYTHON" ] || PYO3_PYTHON=/work/main/.venv/bin/python
cargo build --profile dev-release --features python,cuda,pyo3/extension-module "$@"
cp "${CARGO_TARGET_DIR:-target}/dev-release/lib_native.so" python/slimforge/_native.abi3.so
