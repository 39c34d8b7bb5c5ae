#!/usr/bin/env bash
# GPU check of slimforge's CUDA kernels, in two steps:
#   bash scripts/gpu_check.sh          # on a build machine: dist/slimforge-*-abi3-*.whl with the cuda feature
#   bash scripts/gpu_check.sh --run    # on the GPU machine (copy the repo with dist/ there first):
#                                      # installs the wheel, runs `pytest -m cuda tests/` and the CUDA
#                                      # benchmark, and writes logs under $OUT (default ./gpu-check-out)
# The GPU machine needs python3 with a CUDA build of torch, pytest and hypothesis (no network is used:
# missing wheels can be put in ./.whl and are installed from there). NVRTC comes with torch's wheels.
# PYTHON=... picks the interpreter (default python3); DRY_RUN=1 runs the steps without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" != "--run" ]; then
    MATURIN="${MATURIN:-}"
    for m in .venv/bin/maturin "$(command -v maturin || true)"; do
        if [ -z "$MATURIN" ] && [ -n "$m" ] && [ -x "$m" ]; then MATURIN="$m"; fi
    done
    [ -n "$MATURIN" ] || { echo "maturin not found: pip install maturin" >&2; exit 1; }
    PYO3_PYTHON="${PYO3_PYTHON:-$(dirname "$MATURIN")/python}"
    export PYO3_PYTHON
    rm -f dist/slimforge-*.whl
    "$MATURIN" build --release -o dist --features python,cuda --compatibility linux
    ls -l dist/slimforge-*.whl
    echo "next: copy this repo (with dist/) to the GPU machine and run: bash scripts/gpu_check.sh --run"
    exit 0
fi

OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
log() { echo "[gpu_check] $*" | tee -a "$OUT/summary.txt"; }
: > "$OUT/summary.txt"

"$PY" -c "import torch" 2> /dev/null || { log "$PY cannot import torch: set PYTHON to one that can"; exit 2; }
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # DRY_RUN=1 exercises the script on a machine without a GPU (the GPU tests then skip).
    [ "${DRY_RUN:-0}" = 1 ] || { log "torch sees no CUDA device with $PY: nothing to check"; exit 2; }
    log "dry run: torch sees no CUDA device"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true

WHEEL="$(ls -t dist/slimforge-*abi3*.whl 2>/dev/null | head -n 1 || true)"
[ -n "$WHEEL" ] || { log "no wheel in dist/: run 'bash scripts/gpu_check.sh' on a build machine first"; exit 2; }
SITE="${TMPDIR:-/tmp}/slimforge-gpu-site"
rm -rf "$SITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEEL"
if [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
fi
export PYTHONPATH="$SITE"
export PYTHONUNBUFFERED=1
"$PY" -c "import pytest, hypothesis, numpy, tqdm" \
    || { log "missing test dependencies (pytest, hypothesis, numpy, tqdm): put their wheels in .whl/"; exit 2; }

set +e
"$PY" - <<'PY' 2>&1 | tee -a "$OUT/summary.txt"
import torch
import slimforge
from slimforge import _cuda, _native

print("slimforge", slimforge.__version__, "from", slimforge.__file__)
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print("torch", torch.__version__, "CUDA", torch.version.cuda, "GPU", gpu)
print("built_with_cuda", _native.built_with_cuda(), "nvrtc dir", _cuda.preload_nvrtc())
print("cuda_available", _cuda.cuda_available(), _cuda.cuda_unavailable_reason() or "")
if _cuda.cuda_available():
    print("nvrtc", _native.cuda_nvrtc_version(), "arch", _native.cuda_device_arch(torch.cuda.current_device()))
PY

set +e
timeout 330 "$PY" -m pytest -m cuda tests/ -q -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUT/pytest.xml" 2>&1 | tee "$OUT/pytest.log"
TEST_RC=${PIPESTATUS[0]}
log "pytest -m cuda exit code: $TEST_RC"
timeout 150 "$PY" benches/python/cuda_bench.py ${BENCH_ARGS:---quick} --json "$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench.log"
log "benchmark exit code: ${PIPESTATUS[0]}"
exit "$TEST_RC"
