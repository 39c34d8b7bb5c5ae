//! Python bindings for `crate::cuda` (feature `cuda`). Always registered so the module's surface
//! does not depend on the build; without the feature every function raises RuntimeError.
//!
//! The launchers take raw device pointers (`tensor.data_ptr()`) and PyTorch's raw stream
//! (`torch.cuda.current_stream().cuda_stream`); `slimforge._cuda` validates the tensors and owns
//! the memory. Arguments are keyword-only so a call cannot silently swap two pointers.
#![cfg_attr(
    not(feature = "cuda"),
    allow(unused_variables, clippy::too_many_arguments)
)]

use std::collections::BTreeMap;

use pyo3::prelude::*;

#[cfg(feature = "cuda")]
use crate::cuda;
#[cfg(not(feature = "cuda"))]
use crate::error::Error;

#[cfg(not(feature = "cuda"))]
fn not_built() -> PyErr {
    Error::runtime(
        "slimforge was built without the `cuda` feature: rebuild with `--features python,cuda`",
    )
    .into()
}

/// NVRTC's (major, minor) version; RuntimeError if NVRTC cannot be loaded.
#[pyfunction]
fn cuda_nvrtc_version(py: Python<'_>) -> PyResult<(i32, i32)> {
    #[cfg(feature = "cuda")]
    return Ok(py.detach(cuda::nvrtc_version)?);
    #[cfg(not(feature = "cuda"))]
    Err(not_built())
}

/// `sm_XY` of CUDA device `device` (retains its primary context); RuntimeError without a driver.
#[pyfunction]
fn cuda_device_arch(py: Python<'_>, device: usize) -> PyResult<String> {
    #[cfg(feature = "cuda")]
    return Ok(py.detach(|| cuda::device_arch(device))?);
    #[cfg(not(feature = "cuda"))]
    Err(not_built())
}

/// Compiles every kernel for `arch` ('compute_XY': PTX, 'sm_XY': cubin); no GPU needed.
/// Returns {module description: image size in bytes}.
#[pyfunction]
fn cuda_compile_check(py: Python<'_>, arch: String) -> PyResult<BTreeMap<String, usize>> {
    #[cfg(feature = "cuda")]
    return Ok(py
        .detach(|| cuda::compile_check(&arch))?
        .into_iter()
        .collect());
    #[cfg(not(feature = "cuda"))]
    Err(not_built())
}

#[cfg(feature = "cuda")]
fn elem(dtype: &str) -> PyResult<cuda::ElemType> {
    Ok(cuda::ElemType::parse(dtype)?)
}

#[pyfunction]
#[pyo3(signature = (
    *, device, stream, dtype, q, k, v, out, lse, cu_seqlens, batch, seqlen_q, seqlen_k, heads_q,
    heads_kv, head_dim, max_seqlen, causal, window_left, window_right, softmax_scale, softcap
))]
#[allow(clippy::too_many_arguments)]
fn cuda_attention_forward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    cu_seqlens: u64,
    batch: usize,
    seqlen_q: usize,
    seqlen_k: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    max_seqlen: usize,
    causal: bool,
    window_left: i64,
    window_right: i64,
    softmax_scale: f32,
    softcap: f32,
) -> PyResult<()> {
    #[cfg(feature = "cuda")]
    {
        let elem = elem(dtype)?;
        let call = cuda::AttnCall {
            device,
            stream,
            batch,
            seqlen_q,
            seqlen_k,
            heads_q,
            heads_kv,
            head_dim,
            max_seqlen,
            causal,
            window_left,
            window_right,
            softmax_scale,
            softcap,
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens,
            ..Default::default()
        };
        Ok(py.detach(|| cuda::attention_forward(&call, elem))?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(not_built())
}

#[pyfunction]
#[pyo3(signature = (
    *, device, stream, dtype, q, k, v, out, lse, dout, delta, dq, dk, dv, cu_seqlens, batch,
    seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, max_seqlen, causal, window_left, window_right,
    softmax_scale, softcap
))]
#[allow(clippy::too_many_arguments)]
fn cuda_attention_backward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    dout: u64,
    delta: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    cu_seqlens: u64,
    batch: usize,
    seqlen_q: usize,
    seqlen_k: usize,
    heads_q: usize,
    heads_kv: usize,
    head_dim: usize,
    max_seqlen: usize,
    causal: bool,
    window_left: i64,
    window_right: i64,
    softmax_scale: f32,
    softcap: f32,
) -> PyResult<()> {
    #[cfg(feature = "cuda")]
    {
        let elem = elem(dtype)?;
        let call = cuda::AttnCall {
            device,
            stream,
            batch,
            seqlen_q,
            seqlen_k,
            heads_q,
            heads_kv,
            head_dim,
            max_seqlen,
            causal,
            window_left,
            window_right,
            softmax_scale,
            softcap,
            q,
            k,
            v,
            out,
            lse,
            cu_seqlens,
            dout,
            delta,
            dq,
            dk,
            dv,
        };
        Ok(py.detach(|| cuda::attention_backward(&call, elem))?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(not_built())
}

#[pyfunction]
#[pyo3(signature = (*, device, stream, dtype, index_bits, x, token_of, xs, rows_out, rows_x, dim))]
#[allow(clippy::too_many_arguments)]
fn cuda_moe_permute(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    index_bits: u32,
    x: u64,
    token_of: u64,
    xs: u64,
    rows_out: usize,
    rows_x: usize,
    dim: usize,
) -> PyResult<()> {
    #[cfg(feature = "cuda")]
    {
        let elem = elem(dtype)?;
        let call = cuda::PermuteCall {
            device,
            stream,
            index_bits,
            rows_out,
            rows_x,
            dim,
            x,
            token_of,
            xs,
        };
        Ok(py.detach(|| cuda::moe_permute(&call, elem))?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(not_built())
}

#[pyfunction]
#[pyo3(signature = (*, device, stream, dtype, index_bits, ys, pos, weights, y, tokens, top_k, rows_ys, dim))]
#[allow(clippy::too_many_arguments)]
fn cuda_moe_combine(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    index_bits: u32,
    ys: u64,
    pos: u64,
    weights: u64,
    y: u64,
    tokens: usize,
    top_k: usize,
    rows_ys: usize,
    dim: usize,
) -> PyResult<()> {
    #[cfg(feature = "cuda")]
    {
        let elem = elem(dtype)?;
        let call = cuda::CombineCall {
            device,
            stream,
            index_bits,
            tokens,
            top_k,
            rows_ys,
            dim,
            ys,
            pos,
            weights,
            y,
        };
        Ok(py.detach(|| cuda::moe_combine(&call, elem))?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(not_built())
}

#[pyfunction]
#[pyo3(signature = (*, device, stream, dtype, bits, x, qweight, scales, zeros, bias, y, tokens, n, k, group_size))]
#[allow(clippy::too_many_arguments)]
fn cuda_quant_gemv(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    bits: u32,
    x: u64,
    qweight: u64,
    scales: u64,
    zeros: u64,
    bias: u64,
    y: u64,
    tokens: usize,
    n: usize,
    k: usize,
    group_size: usize,
) -> PyResult<()> {
    #[cfg(feature = "cuda")]
    {
        let elem = elem(dtype)?;
        let call = cuda::QuantGemvCall {
            device,
            stream,
            bits,
            tokens,
            n,
            k,
            group_size,
            x,
            qweight,
            scales,
            zeros,
            bias,
            y,
        };
        Ok(py.detach(|| cuda::quant_gemv(&call, elem))?)
    }
    #[cfg(not(feature = "cuda"))]
    Err(not_built())
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_nvrtc_version, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_device_arch, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_compile_check, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_attention_forward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_attention_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_moe_permute, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_moe_combine, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_quant_gemv, m)?)?;
    Ok(())
}
