# Hand-written stubs for the Rust extension; checked by `python -m mypy.stubtest slimforge._native`.
# Keep one section per area, in the order of rust/py/mod.rs.

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from numpy.typing import NDArray

__version__: str

def get_num_threads() -> int: ...
def set_num_threads(n: int) -> None: ...
def built_with_cuda() -> bool: ...

# --- dedup ---

def signatures(
    texts: Sequence[str | bytes],
    num_perm: int = 128,
    ngram: int = 5,
    tokenizer: str = "word",
    seed: int = 1,
    errors: str = "strict",
) -> npt.NDArray[np.uint32]: ...
def exact_hashes(
    texts: Sequence[str | bytes], errors: str = "strict"
) -> npt.NDArray[np.uint64]: ...
def band_hashes(
    signatures: npt.NDArray[np.uint32], bands: int, rows: int
) -> npt.NDArray[np.uint64]: ...
def candidate_pairs(
    band_hashes: npt.NDArray[np.uint64], max_bucket: int | None = None
) -> npt.NDArray[np.int64]: ...
def estimate_jaccard_pairs(
    signatures: npt.NDArray[np.uint32], pairs: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]: ...
def exact_jaccard_pairs(
    texts: Sequence[str | bytes],
    pairs: npt.NDArray[np.int64],
    ngram: int = 5,
    tokenizer: str = "word",
    errors: str = "strict",
) -> npt.NDArray[np.float64]: ...
def connected_components(n: int, pairs: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]: ...
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
    signatures: npt.NDArray[np.uint32],
    keys: npt.NDArray[np.int64] | Sequence[str],
) -> None: ...
def lsh_index_load(
    path: str | os.PathLike[str],
) -> tuple[float, int, int, int, npt.NDArray[np.uint32], npt.NDArray[np.int64] | list[str]]: ...

from typing import final  # noqa: E402

@final
class CandidateBuckets:
    def __new__(cls, band_hashes: npt.NDArray[np.uint64], max_bucket: int) -> CandidateBuckets: ...
    def __len__(self) -> int: ...
    def rows(self) -> npt.NDArray[np.int64]: ...
    def largest(self) -> int: ...
    def units_left(self) -> int: ...
    def next_piece(
        self, max_units: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]] | None: ...

@final
class JsonlBatchReader:
    def __new__(
        cls,
        path: str | os.PathLike[str],
        field: str = "text",
        batch_size: int = 8192,
        stop_at_reject: bool = False,
        with_raw: bool = False,
        max_line_bytes: int = ...,  # 64 MiB (DEFAULT_MAX_LINE_BYTES)
    ) -> JsonlBatchReader: ...
    def next_batch(
        self,
    ) -> (
        tuple[
            list[bytes],
            npt.NDArray[np.int64],
            list[tuple[int, str, bytes]],
            int,
            int,
            list[bytes] | None,
            tuple[int, str] | None,
        ]
        | None
    ): ...

@final
class JsonlKeptWriter:
    def __new__(
        cls, output: str | os.PathLike[str], gzip: bool, clusters: str | os.PathLike[str]
    ) -> JsonlKeptWriter: ...
    def open_input(
        self,
        path: str | os.PathLike[str],
        field: str,
        display: str,
        max_line_bytes: int = ...,  # 64 MiB (DEFAULT_MAX_LINE_BYTES)
    ) -> None: ...
    def step(
        self,
        keep: npt.NDArray[np.bool_],
        cluster: npt.NDArray[np.int64],
        max_lines: int = 65536,
    ) -> int | None: ...
    def finish(self) -> int: ...

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
def quant_gptq_block(
    w: npt.NDArray[np.float32],
    hinv: npt.NDArray[np.float32],
    bits: int,
    group_size: int,
    symmetric: bool,
) -> tuple[
    npt.NDArray[np.uint8],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
]: ...
def quant_default_route(bits: int) -> str: ...

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

# One decode step: qkv (batch, (heads_q + 2 heads_kv) * head_dim) float32 stacked [q; k; v];
# k_cache / v_cache (batch, heads_kv, capacity, head_dim) float32, written in place at position
# lengths[b] (int64, batch); cos / sin (positions, head_dim // 2) float32 rotary tables or None.
# Returns the attention output (batch, heads_q * head_dim) float32.
def attention_decode_step(
    qkv: npt.NDArray[np.float32],
    k_cache: npt.NDArray[np.float32],
    v_cache: npt.NDArray[np.float32],
    lengths: npt.NDArray[np.int64],
    heads_q: int,
    cos: npt.NDArray[np.float32] | None,
    sin: npt.NDArray[np.float32] | None,
    softmax_scale: float,
) -> npt.NDArray[np.float32]: ...

# --- models ---
_Proj = tuple[
    npt.NDArray[np.uint8],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32] | None,
    int,
    int,
    str,
]

@final
class LlamaStackDecoder:
    def __new__(
        cls,
        blocks: Sequence[
            tuple[npt.NDArray[np.float32], _Proj, _Proj, npt.NDArray[np.float32], _Proj, _Proj]
        ],
        final_norm: npt.NDArray[np.float32],
        heads_q: int,
        heads_kv: int,
        head_dim: int,
        eps: float,
    ) -> LlamaStackDecoder: ...
    @property
    def num_layers(self) -> int: ...
    def step(
        self,
        x: npt.NDArray[np.float32],
        k_cache: npt.NDArray[np.float32],
        v_cache: npt.NDArray[np.float32],
        lengths: npt.NDArray[np.int64],
        cos: npt.NDArray[np.float32] | None,
        sin: npt.NDArray[np.float32] | None,
        softmax_scale: float,
    ) -> None: ...

# --- moe ---
# bfloat16 rows cross as their uint16 bits; weights/scales are float64 for float64 rows, else float32.

MOE_MAX_EXPERTS: int

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

# --- optim ---
# One array per parameter tensor, C-contiguous; bfloat16 / float16 cross as their uint16 bits.

def lamb_step(
    params: Sequence[NDArray[np.float32]],
    grads: Sequence[NDArray[np.float32]] | Sequence[NDArray[np.uint16]],
    exp_avgs: Sequence[NDArray[np.float32]],
    exp_avg_sqs: Sequence[NDArray[np.float32]],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction1: float,
    bias_correction2: float,
    grad_averaging: bool,
    trust_clip: bool,
    always_adapt: bool,
    clip_divisor: float = 1.0,
    dtype: str = "float32",
    half_params: Sequence[NDArray[np.uint16] | None] | None = None,
) -> list[float]: ...
def lamb_grad_sq_norm(
    grads: Sequence[NDArray[np.float32]] | Sequence[NDArray[np.uint16]], dtype: str = "float32"
) -> float: ...
def lamb_kernel_isa() -> str: ...

# --- cuda ---
# Always present; without the `cuda` feature every function raises RuntimeError. Pointers are
# `tensor.data_ptr()`, `stream` is `torch.cuda.current_stream().cuda_stream`; use slimforge._cuda.

def cuda_nvrtc_version() -> tuple[int, int]: ...
def cuda_device_arch(device: int) -> str: ...
def cuda_compile_check(arch: str) -> dict[str, int]: ...
def cuda_attention_forward(
    *,
    device: int,
    stream: int,
    dtype: str,
    q: int,
    k: int,
    v: int,
    out: int,
    lse: int,
    cu_seqlens: int,
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    max_seqlen: int,
    causal: bool,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    softcap: float,
) -> None: ...
def cuda_attention_backward(
    *,
    device: int,
    stream: int,
    dtype: str,
    q: int,
    k: int,
    v: int,
    out: int,
    lse: int,
    dout: int,
    delta: int,
    dq: int,
    dk: int,
    dv: int,
    cu_seqlens: int,
    batch: int,
    seqlen_q: int,
    seqlen_k: int,
    heads_q: int,
    heads_kv: int,
    head_dim: int,
    max_seqlen: int,
    causal: bool,
    window_left: int,
    window_right: int,
    softmax_scale: float,
    softcap: float,
) -> None: ...
def cuda_moe_permute(
    *,
    device: int,
    stream: int,
    dtype: str,
    index_bits: int,
    x: int,
    token_of: int,
    xs: int,
    rows_out: int,
    rows_x: int,
    dim: int,
) -> None: ...
def cuda_moe_combine(
    *,
    device: int,
    stream: int,
    dtype: str,
    index_bits: int,
    ys: int,
    pos: int,
    weights: int,
    y: int,
    tokens: int,
    top_k: int,
    rows_ys: int,
    dim: int,
) -> None: ...
def cuda_quant_gemv(
    *,
    device: int,
    stream: int,
    dtype: str,
    bits: int,
    x: int,
    qweight: int,
    scales: int,
    zeros: int,
    bias: int,
    y: int,
    tokens: int,
    n: int,
    k: int,
    group_size: int,
) -> None: ...

# prune (rust/prune, rust/py/prune.rs)
def prune_select(
    tensors: Sequence[npt.NDArray[np.float32]], k: int, absolute: bool
) -> tuple[float, int]: ...
def prune_global_masks(
    tensors: Sequence[npt.NDArray[np.float32]],
    masks: Sequence[npt.NDArray[np.bool_]],
    k: int,
    absolute: bool,
) -> float: ...
def prune_row_masks(
    scores: npt.NDArray[np.float32],
    k: int,
    absolute: bool,
    scale: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.bool_]: ...
def prune_nm_masks(
    scores: npt.NDArray[np.float32],
    n: int,
    m: int,
    absolute: bool,
    scale: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.bool_]: ...
def prune_group_norms(
    w: npt.NDArray[np.float32],
    axis: int,
    group: int,
    p: int,
    scale: npt.NDArray[np.float32] | None = None,
) -> npt.NDArray[np.float32]: ...
def prune_sparse24_compress(
    codes: npt.NDArray[np.uint8], keep: npt.NDArray[np.bool_], bits: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]: ...
def prune_sparse24_decompress(
    values: npt.NDArray[np.uint8],
    meta: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.float32],
    in_features: int,
    bits: int,
    group_size: int,
) -> npt.NDArray[np.uint8]: ...
def prune_sparse24_linear(
    x: npt.NDArray[np.float32],
    values: npt.NDArray[np.uint8],
    meta: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.float32],
    zeros: npt.NDArray[np.float32],
    bias: npt.NDArray[np.float32] | None,
    bits: int,
    group_size: int,
) -> npt.NDArray[np.float32]: ...
def prune_sparsegpt_block(
    w: npt.NDArray[np.float32],
    hinv: npt.NDArray[np.float32],
    mask: npt.NDArray[np.uint8] | None,
    n: int,
    m: int,
    bits: int,
    group_size: int,
    symmetric: bool,
) -> tuple[
    npt.NDArray[np.uint8],
    npt.NDArray[np.float32],
    npt.NDArray[np.uint8],
    npt.NDArray[np.float32],
    npt.NDArray[np.float32],
]: ...
