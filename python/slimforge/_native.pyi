# Hand-written stubs for the Rust extension; checked by `python -m mypy.stubtest slimforge._native`.
# Keep one section per area, in the order of rust/py/mod.rs.

from typing import Any

import numpy as np
import numpy.typing as npt

__version__: str

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def built_with_cuda() -> bool: ...

# --- dedup ---

# --- quant ---

# --- attention ---

# --- moe ---
# bfloat16 rows cross as their uint16 bits; weights/scales are float64 for float64 rows, else float32.

def moe_route(
    logits: npt.NDArray[np.float32] | npt.NDArray[np.float64],
    top_k: int,
    router: str = "softmax",
    bias: npt.NDArray[np.float32] | npt.NDArray[np.float64] | None = None,
    normalize: bool = True,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32] | npt.NDArray[np.float64]]: ...
def moe_dispatch_plan(
    idx: npt.NDArray[np.int64],
    num_experts: int,
    capacity: int | None = None,
    padded: bool = False,
) -> tuple[
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    npt.NDArray[np.int64],
    int,
]: ...
def moe_permute(
    x: npt.NDArray[Any],
    token_of: npt.NDArray[np.int64],
    out: npt.NDArray[Any],
    row_scale: npt.NDArray[np.float32] | npt.NDArray[np.float64] | None = None,
) -> None: ...
def moe_combine(
    ys: npt.NDArray[Any],
    pos: npt.NDArray[np.int64],
    out: npt.NDArray[Any],
    weights: npt.NDArray[np.float32] | npt.NDArray[np.float64] | None = None,
) -> None: ...
def moe_rowdot(
    dy: npt.NDArray[Any], ys: npt.NDArray[Any], pos: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32] | npt.NDArray[np.float64]: ...
