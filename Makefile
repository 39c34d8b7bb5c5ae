# The verbs people type. Every target bootstraps .venv and the native build idempotently.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-stamp
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)
ASSETS ?= $(HOME)/.cache/slimforge/assets
export SLIMFORGE_ASSETS := $(ASSETS)

.PHONY: demo test test-rust test-python lint build assets bench bench-quick gpu-check gpu-check-run clean \
	fuzz wheel wheel-check

$(STAMP): requirements-dev.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	@touch $@

# Editable install of the Rust extension (release profile; cargo makes it incremental).
build: $(STAMP)
	$(VENV)/bin/maturin develop --release -q

assets: $(STAMP)
	$(PY) scripts/fetch_assets.py --cache $(ASSETS)

demo: build
	$(VENV)/bin/slimforge demo

lint: $(STAMP)
	cargo fmt --all --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --all-targets --features cuda -- -D warnings
	$(VENV)/bin/ruff check python tests benches scripts
	$(VENV)/bin/ruff format --check python tests benches scripts

test-rust:
	cargo test --profile dev-release

test-python: build assets
	$(PY) -m mypy.stubtest slimforge._native --allowlist stubtest-allowlist.txt
	@$(PY) -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating as a failure"; exit 1; fi; \
	  exit $$rc

test: lint test-rust test-python wheel-check

# The abi3 wheel (cuda feature on: one wheel for CPU and GPU machines) and the sdist, in dist/.
wheel: $(STAMP)
	rm -f dist/slimforge-*.whl dist/slimforge-*.tar.gz
	$(VENV)/bin/maturin build --release --strip -o dist
	$(VENV)/bin/maturin sdist -o dist
	@ls -l dist

# The wheel as a user gets it: fresh venvs, no dev dependencies, from outside the tree
# (docs/release.md). WHEEL_CHECK_TORCH=0 skips the second venv with torch and the examples.
WHEEL_CHECK_TORCH ?= 1
wheel-check: wheel assets
	$(PY) scripts/check_wheel.py dist/slimforge-*.whl $(if $(filter 1,$(WHEEL_CHECK_TORCH)),--torch)

BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt
	@touch $@

# Side-by-side benchmarks with their peers (minutes to an hour on 2 cores; see docs/benchmarks.md).
# `make bench-quick` runs every Python bench in its --quick mode (a few minutes).
PY_BENCHES := dedup_bench dedup_verify quant_gemv gptq_bench quant_quality gguf_dequant \
	attention_bench moe_bench moe_lm gpt_train dedup_templated train_engine lamb_bench distill_bench
bench: build assets $(BENCH_STAMP)
	cargo bench
	@for b in $(PY_BENCHES); do echo "== $$b"; $(PY) benches/python/$$b.py || exit 1; done

bench-quick: build assets $(BENCH_STAMP)
	@for b in $(PY_BENCHES); do echo "== $$b --quick"; $(PY) benches/python/$$b.py --quick || exit 1; done

# Coverage-guided fuzzing of the Rust parsers of untrusted files (cargo-fuzz: libFuzzer with
# AddressSanitizer), FUZZ_SECONDS per target; not part of `make test`. It needs nightly rustc
# flags: the installed nightly toolchain when there is one, else stable with RUSTC_BOOTSTRAP=1.
# New inputs go to target/fuzz-corpus/<target>; fuzz/corpus/<target> is the seed corpus (kept
# in the repo); a crash is saved under fuzz/artifacts/<target>/ and fails the target.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= lsh_index jsonl
fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@if rustup run nightly rustc --version >/dev/null 2>&1; then tc=+nightly; boot=0; \
	  else tc=; boot=1; fi; \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p target/fuzz-corpus/$$t; \
	  echo "== cargo fuzz run $$t for $(FUZZ_SECONDS) s ($${tc:-stable with RUSTC_BOOTSTRAP=1})"; \
	  if [ $$boot = 1 ]; then export RUSTC_BOOTSTRAP=1; fi; \
	  cargo $$tc fuzz run --fuzz-dir fuzz $$t target/fuzz-corpus/$$t fuzz/corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 -timeout=10 || exit 1; \
	done

gpu-check:
	bash scripts/gpu_check.sh

gpu-check-run:
	bash scripts/gpu_check.sh --run

clean:
	cargo clean
	rm -rf $(VENV) dist
