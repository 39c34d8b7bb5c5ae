# Hand-written stubs for the Rust extension; checked by `python -m mypy.stubtest slimforge._native`.
# Keep one section per area, in the order of rust/py/mod.rs.

__version__: str

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def built_with_cuda() -> bool: ...

# --- dedup ---

# --- quant ---

# --- attention ---

# --- moe ---
