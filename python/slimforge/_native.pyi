# Hand-written stubs for the Rust extension; checked by `python -m mypy.stubtest slimforge._native`.
# Keep one section per area, in the order of rust/py/mod.rs.

__version__: str

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def built_with_cuda() -> bool: ...

# --- dedup ---

import os  # noqa: E402
from collections.abc import Sequence  # noqa: E402

import numpy as np  # noqa: E402
from numpy.typing import NDArray  # noqa: E402

def signatures(
    texts: Sequence[str | bytes],
    num_perm: int = 128,
    ngram: int = 5,
    tokenizer: str = "word",
    seed: int = 1,
    errors: str = "strict",
) -> NDArray[np.uint32]: ...
def exact_hashes(texts: Sequence[str | bytes], errors: str = "strict") -> NDArray[np.uint64]: ...
def band_hashes(signatures: NDArray[np.uint32], bands: int, rows: int) -> NDArray[np.uint64]: ...
def candidate_pairs(band_hashes: NDArray[np.uint64]) -> NDArray[np.int64]: ...
def estimate_jaccard_pairs(
    signatures: NDArray[np.uint32], pairs: NDArray[np.int64]
) -> NDArray[np.float64]: ...
def exact_jaccard_pairs(
    texts: Sequence[str | bytes],
    pairs: NDArray[np.int64],
    ngram: int = 5,
    tokenizer: str = "word",
    errors: str = "strict",
) -> NDArray[np.float64]: ...
def connected_components(n: int, pairs: NDArray[np.int64]) -> NDArray[np.int64]: ...
def optimal_bands(
    threshold: float, num_perm: int = 128, fp_weight: float = 0.05, fn_weight: float = 0.95
) -> tuple[int, int]: ...
def xxh3_64(data: bytes, seed: int = 0) -> int: ...
def minhash_kernel() -> str: ...
def lsh_index_save(
    path: str | os.PathLike[str],
    threshold: float,
    bands: int,
    rows: int,
    signatures: NDArray[np.uint32],
    keys: NDArray[np.int64] | Sequence[str],
) -> None: ...
def lsh_index_load(
    path: str | os.PathLike[str],
) -> tuple[float, int, int, int, NDArray[np.uint32], NDArray[np.int64] | list[str]]: ...

# --- quant ---
# (np and NDArray are imported in the dedup section above)

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
def quant_default_route(bits: int) -> str: ...

# --- attention ---

# --- moe ---
