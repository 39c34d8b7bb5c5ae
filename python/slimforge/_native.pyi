# Hand-written stubs for the Rust extension; checked by `python -m mypy.stubtest slimforge._native`.
# Keep one section per area, in the order of rust/py/mod.rs.

import numpy as np
import numpy.typing as npt

__version__: str

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def built_with_cuda() -> bool: ...

# --- dedup ---

# --- quant ---

def quant_choose_qparams(
    w: npt.NDArray[np.float32], bits: int, group_size: int, symmetric: bool
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]: ...
def quant_quantize(
    w: npt.NDArray[np.float32],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.float32],
    bits: int,
    group_size: int,
) -> npt.NDArray[np.uint8]: ...
def quant_dequantize(
    q: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.float32],
    group_size: int,
) -> npt.NDArray[np.float32]: ...
def quant_dequantize_packed(
    qweight: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.float32],
    bits: int,
    group_size: int,
) -> npt.NDArray[np.float32]: ...
def quant_pack_int4(q: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]: ...
def quant_unpack_int4(packed: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]: ...
def quant_linear(
    x: npt.NDArray[np.float32],
    qweight: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None,
    bits: int,
    group_size: int,
    route: str = "auto",
) -> npt.NDArray[np.float32]: ...
def quant_linear_bf16(
    x: npt.NDArray[np.int16],
    qweight: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None,
    bits: int,
    group_size: int,
    route: str = "auto",
) -> npt.NDArray[np.float32]: ...
def quant_kernel_isa() -> str: ...
def quant_default_route() -> str: ...

# --- attention ---

# --- moe ---
