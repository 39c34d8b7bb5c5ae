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
# Arrays are C-contiguous numpy arrays of float32, float64, or uint16 holding bfloat16 bits (all of
# one dtype). Without cu_seqlens: q (batch, seqlen_q, heads_q, head_dim), k/v (batch, seqlen_k,
# heads_kv, head_dim), lse (batch, heads_q, seqlen_q). With cu_seqlens_q/_k (int32, batch + 1):
# q (total_q, heads_q, head_dim), k/v (total_k, heads_kv, head_dim), lse (heads_q, total_q).
# lse is float64 for float64 inputs, float32 otherwise.

ATTENTION_MAX_HEAD_DIM: int

def flash_attn_fwd(
    q: npt.NDArray[Any],
    k: npt.NDArray[Any],
    v: npt.NDArray[Any],
    cu_seqlens_q: npt.NDArray[np.int32] | None,
    cu_seqlens_k: npt.NDArray[np.int32] | None,
    causal: bool,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    softcap: float,
    num_global: int,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]: ...
def flash_attn_bwd(
    dout: npt.NDArray[Any],
    q: npt.NDArray[Any],
    k: npt.NDArray[Any],
    v: npt.NDArray[Any],
    out: npt.NDArray[Any],
    lse: npt.NDArray[Any],
    cu_seqlens_q: npt.NDArray[np.int32] | None,
    cu_seqlens_k: npt.NDArray[np.int32] | None,
    causal: bool,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    softcap: float,
    num_global: int,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]: ...

# --- moe ---
