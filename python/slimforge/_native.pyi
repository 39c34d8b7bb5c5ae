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
