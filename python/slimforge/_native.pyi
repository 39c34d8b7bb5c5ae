# Hand-written stubs for the Rust extension; checked by `python -m mypy.stubtest slimforge._native`.
# Keep one section per area, in the order of rust/py/mod.rs.

__version__: str

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def built_with_cuda() -> bool: ...

# --- dedup ---

# --- quant ---

import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

def quant_choose_qparams(
    w: NDArray[np.float32], bits: int, group_size: int, symmetric: bool
) -> tuple[NDArray[np.float32], NDArray[np.float32]]: ...
def quant_quantize(
    w: NDArray[np.float32],
    scales: NDArray[np.float32],
    zeros: NDArray[np.float32],
    bits: int,
    group_size: int,
) -> NDArray[np.uint8]: ...
def quant_dequantize(
    q: NDArray[np.uint8],
    scales: NDArray[np.float32],
    zeros: NDArray[np.float32],
    group_size: int,
) -> NDArray[np.float32]: ...
def quant_dequantize_packed(
    qweight: NDArray[np.uint8],
    scales: NDArray[np.float32],
    zeros: NDArray[np.float32],
    bits: int,
    group_size: int,
) -> NDArray[np.float32]: ...
def quant_pack_int4(q: NDArray[np.uint8]) -> NDArray[np.uint8]: ...
def quant_unpack_int4(packed: NDArray[np.uint8]) -> NDArray[np.uint8]: ...
def quant_linear(
    x: NDArray[np.float32],
    qweight: NDArray[np.uint8],
    scales: NDArray[np.float32],
    zeros: NDArray[np.float32],
    bias: NDArray[np.float32] | None,
    bits: int,
    group_size: int,
    route: str = "auto",
) -> NDArray[np.float32]: ...
def quant_linear_bf16(
    x: NDArray[np.int16],
    qweight: NDArray[np.uint8],
    scales: NDArray[np.float32],
    zeros: NDArray[np.float32],
    bias: NDArray[np.float32] | None,
    bits: int,
    group_size: int,
    route: str = "auto",
) -> NDArray[np.float32]: ...
def quant_kernel_isa() -> str: ...
def quant_default_route() -> str: ...

# --- attention ---

# --- moe ---
