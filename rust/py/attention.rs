//! Python bindings for `crate::attention`: dtype dispatch, shape checks, GIL release.

use half::bf16;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::{c_slice, size_arg};
use crate::attention::{self, Options, Shape};

/// The element type of a call, read from the dtype of q.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    F64,
    /// bfloat16, passed as its uint16 bit pattern.
    Bf16,
}

fn dtype_of(a: &Bound<'_, PyAny>, name: &str) -> PyResult<Dtype> {
    if a.cast::<PyArrayDyn<f32>>().is_ok() {
        Ok(Dtype::F32)
    } else if a.cast::<PyArrayDyn<f64>>().is_ok() {
        Ok(Dtype::F64)
    } else if a.cast::<PyArrayDyn<u16>>().is_ok() {
        Ok(Dtype::Bf16)
    } else {
        Err(PyTypeError::new_err(format!(
            "{name} must be a numpy array of float32, float64 or uint16 (bfloat16 bits), got {}",
            a.get_type().name()?
        )))
    }
}

/// A C-contiguous array's shape and data, copied into nothing (`TypeError` for another dtype or
/// another memory order).
fn view<'py, T: numpy::Element>(
    a: &Bound<'py, PyAny>,
    name: &str,
) -> PyResult<(Vec<usize>, numpy::PyReadonlyArrayDyn<'py, T>)> {
    let arr = a
        .cast::<PyArrayDyn<T>>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must have the same dtype as q")))?;
    let ro = arr
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name} cannot be read: {e}")))?;
    c_slice(&ro, name)?;
    Ok((arr.shape().to_vec(), ro))
}

/// A window bound: -1 (unbounded) or >= 0. Bounds past `i64::MAX` saturate (the kernels clamp
/// them to the sequence lengths anyway); other negatives are rejected by the kernel's checks.
fn window_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<i64> {
    match obj.extract::<i64>() {
        Ok(v) => Ok(v),
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
            if obj.gt(0i32)? {
                Ok(i64::MAX)
            } else {
                Err(PyValueError::new_err(format!(
                    "{name} must be -1 (unbounded) or >= 0, got {obj}"
                )))
            }
        }
        Err(_) => Err(PyTypeError::new_err(format!(
            "{name} must be an int, got {}",
            obj.get_type().name()?
        ))),
    }
}

struct Problem {
    shape: Shape,
    q_dims: Vec<usize>,
    k_dims: Vec<usize>,
    lse_dims: Vec<usize>,
}

fn problem(
    q_dims: &[usize],
    k_dims: &[usize],
    v_dims: &[usize],
    cu_seqlens_q: Option<&PyReadonlyArray1<'_, i32>>,
    cu_seqlens_k: Option<&PyReadonlyArray1<'_, i32>>,
) -> PyResult<Problem> {
    if k_dims != v_dims {
        return Err(PyValueError::new_err(format!(
            "k and v must have the same shape, got {k_dims:?} and {v_dims:?}"
        )));
    }
    match (cu_seqlens_q, cu_seqlens_k) {
        (None, None) => {
            let ([b, nq, hq, d], [bk, nk, hkv, dk]) = (q_dims, k_dims) else {
                return Err(PyValueError::new_err(format!(
                    "without cu_seqlens, q and k must be 4-D (batch, seqlen, heads, head_dim), got {q_dims:?} and {k_dims:?}"
                )));
            };
            if b != bk || d != dk {
                return Err(PyValueError::new_err(format!(
                    "q {q_dims:?} and k {k_dims:?} disagree on batch or head_dim"
                )));
            }
            let shape = Shape::batched(*b, *nq, *nk, *hq, *hkv, *d)?;
            Ok(Problem {
                shape,
                q_dims: q_dims.to_vec(),
                k_dims: k_dims.to_vec(),
                lse_dims: vec![*b, *hq, *nq],
            })
        }
        (Some(cq), Some(ck)) => {
            let ([tq, hq, d], [tk, hkv, dk]) = (q_dims, k_dims) else {
                return Err(PyValueError::new_err(format!(
                    "with cu_seqlens, q and k must be 3-D (total, heads, head_dim), got {q_dims:?} and {k_dims:?}"
                )));
            };
            if d != dk {
                return Err(PyValueError::new_err(format!(
                    "q {q_dims:?} and k {k_dims:?} disagree on head_dim"
                )));
            }
            let shape = Shape::packed(
                c_slice(cq, "cu_seqlens_q")?,
                c_slice(ck, "cu_seqlens_k")?,
                *hq,
                *hkv,
                *d,
            )?;
            if shape.total_q() != *tq || shape.total_k() != *tk {
                return Err(PyValueError::new_err(format!(
                    "cu_seqlens end at {} (q) and {} (k), but q has {tq} and k has {tk} tokens",
                    shape.total_q(),
                    shape.total_k()
                )));
            }
            Ok(Problem {
                shape,
                q_dims: q_dims.to_vec(),
                k_dims: k_dims.to_vec(),
                lse_dims: vec![*hq, *tq],
            })
        }
        _ => Err(PyValueError::new_err(
            "give both cu_seqlens_q and cu_seqlens_k, or neither",
        )),
    }
}

fn to_array<'py, T: numpy::Element>(
    py: Python<'py>,
    data: Vec<T>,
    dims: &[usize],
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, data)
        .reshape(dims.to_vec())?
        .into_any())
}

fn bits(x: Vec<bf16>) -> Vec<u16> {
    x.into_iter().map(bf16::to_bits).collect()
}

fn as_bf16(x: &[u16]) -> &[bf16] {
    // SAFETY: bf16 is a transparent wrapper around u16 (same size and alignment).
    unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<bf16>(), x.len()) }
}

fn options(
    causal: bool,
    window_left: &Bound<'_, PyAny>,
    window_right: &Bound<'_, PyAny>,
    softmax_scale: f64,
    softcap: f64,
    num_global: &Bound<'_, PyAny>,
) -> PyResult<Options> {
    Ok(Options {
        softmax_scale,
        softcap,
        causal,
        window_left: window_arg(window_left, "window_left")?,
        window_right: window_arg(window_right, "window_right")?,
        num_global: size_arg(num_global, "num_global")?,
    })
}

/// Tiled attention forward on the CPU. See `slimforge._native.pyi`.
#[pyfunction]
#[pyo3(signature = (q, k, v, cu_seqlens_q, cu_seqlens_k, causal, window_left, window_right, softmax_scale, softcap, num_global))]
#[allow(clippy::too_many_arguments)]
fn flash_attn_fwd<'py>(
    py: Python<'py>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    cu_seqlens_q: Option<PyReadonlyArray1<'py, i32>>,
    cu_seqlens_k: Option<PyReadonlyArray1<'py, i32>>,
    causal: bool,
    window_left: &Bound<'py, PyAny>,
    window_right: &Bound<'py, PyAny>,
    softmax_scale: f64,
    softcap: f64,
    num_global: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    let opts = options(
        causal,
        window_left,
        window_right,
        softmax_scale,
        softcap,
        num_global,
    )?;
    macro_rules! run {
        ($t:ty, $conv:expr, $back:expr) => {{
            let (qd, qa) = view::<$t>(q, "q")?;
            let (kd, ka) = view::<$t>(k, "k")?;
            let (vd, va) = view::<$t>(v, "v")?;
            let p = problem(&qd, &kd, &vd, cu_seqlens_q.as_ref(), cu_seqlens_k.as_ref())?;
            let (qs, ks, vs) = (c_slice(&qa, "q")?, c_slice(&ka, "k")?, c_slice(&va, "v")?);
            let (out, lse) =
                py.detach(|| attention::forward($conv(qs), $conv(ks), $conv(vs), &p.shape, &opts))?;
            let out = to_array(py, $back(out), &p.q_dims)?;
            let lse = to_array(py, lse, &p.lse_dims)?;
            PyTuple::new(py, [out, lse])
        }};
    }
    match dtype_of(q, "q")? {
        Dtype::F32 => run!(f32, |x| x, |x| x),
        Dtype::F64 => run!(f64, |x| x, |x| x),
        Dtype::Bf16 => run!(u16, as_bf16, bits),
    }
}

/// Tiled attention backward on the CPU. See `slimforge._native.pyi`.
#[pyfunction]
#[pyo3(signature = (dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, causal, window_left, window_right, softmax_scale, softcap, num_global))]
#[allow(clippy::too_many_arguments)]
fn flash_attn_bwd<'py>(
    py: Python<'py>,
    dout: &Bound<'py, PyAny>,
    q: &Bound<'py, PyAny>,
    k: &Bound<'py, PyAny>,
    v: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    lse: &Bound<'py, PyAny>,
    cu_seqlens_q: Option<PyReadonlyArray1<'py, i32>>,
    cu_seqlens_k: Option<PyReadonlyArray1<'py, i32>>,
    causal: bool,
    window_left: &Bound<'py, PyAny>,
    window_right: &Bound<'py, PyAny>,
    softmax_scale: f64,
    softcap: f64,
    num_global: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyTuple>> {
    let opts = options(
        causal,
        window_left,
        window_right,
        softmax_scale,
        softcap,
        num_global,
    )?;
    macro_rules! run {
        ($t:ty, $acc:ty, $conv:expr, $back:expr) => {{
            let (qd, qa) = view::<$t>(q, "q")?;
            let (kd, ka) = view::<$t>(k, "k")?;
            let (vd, va) = view::<$t>(v, "v")?;
            let (dod, doa) = view::<$t>(dout, "dout")?;
            let (od, oa) = view::<$t>(out, "out")?;
            let p = problem(&qd, &kd, &vd, cu_seqlens_q.as_ref(), cu_seqlens_k.as_ref())?;
            if dod != qd || od != qd {
                return Err(PyValueError::new_err(format!(
                    "dout {dod:?} and out {od:?} must have the shape of q {qd:?}"
                )));
            }
            let (ld, la) = view::<$acc>(lse, "lse").map_err(|_| {
                PyTypeError::new_err(concat!(
                    "lse must be a C-contiguous ",
                    stringify!($acc),
                    " array"
                ))
            })?;
            if ld != p.lse_dims {
                return Err(PyValueError::new_err(format!(
                    "lse must have shape {:?}, got {ld:?}",
                    p.lse_dims
                )));
            }
            let (qs, ks, vs) = (c_slice(&qa, "q")?, c_slice(&ka, "k")?, c_slice(&va, "v")?);
            let (dos, os, ls) = (
                c_slice(&doa, "dout")?,
                c_slice(&oa, "out")?,
                c_slice(&la, "lse")?,
            );
            let (dq, dk, dv) = py.detach(|| {
                attention::backward(
                    $conv(dos),
                    $conv(qs),
                    $conv(ks),
                    $conv(vs),
                    $conv(os),
                    ls,
                    &p.shape,
                    &opts,
                )
            })?;
            let dq = to_array(py, $back(dq), &p.q_dims)?;
            let dk = to_array(py, $back(dk), &p.k_dims)?;
            let dv = to_array(py, $back(dv), &p.k_dims)?;
            PyTuple::new(py, [dq, dk, dv])
        }};
    }
    match dtype_of(q, "q")? {
        Dtype::F32 => run!(f32, f32, |x| x, |x| x),
        Dtype::F64 => run!(f64, f64, |x| x, |x| x),
        Dtype::Bf16 => run!(u16, f32, as_bf16, bits),
    }
}

/// One decode step against a key/value cache (rotary, append, attend). See `slimforge._native.pyi`.
#[pyfunction]
#[pyo3(signature = (qkv, k_cache, v_cache, lengths, heads_q, cos, sin, softmax_scale))]
#[allow(clippy::too_many_arguments)]
fn attention_decode_step<'py>(
    py: Python<'py>,
    qkv: numpy::PyReadonlyArray2<'py, f32>,
    mut k_cache: numpy::PyReadwriteArray4<'py, f32>,
    mut v_cache: numpy::PyReadwriteArray4<'py, f32>,
    lengths: PyReadonlyArray1<'py, i64>,
    heads_q: &Bound<'py, PyAny>,
    cos: Option<numpy::PyReadonlyArray2<'py, f32>>,
    sin: Option<numpy::PyReadonlyArray2<'py, f32>>,
    softmax_scale: f64,
) -> PyResult<Bound<'py, PyAny>> {
    let heads_q = size_arg(heads_q, "heads_q")?;
    let kd = k_cache.shape().to_vec();
    if v_cache.shape() != kd.as_slice() {
        return Err(PyValueError::new_err(format!(
            "k_cache {kd:?} and v_cache {:?} must have one shape",
            v_cache.shape()
        )));
    }
    let [batch, heads_kv, capacity, head_dim] = [kd[0], kd[1], kd[2], kd[3]];
    let shape = attention::DecodeShape {
        batch,
        heads_q,
        heads_kv,
        head_dim,
        capacity,
    };
    if qkv.shape()[0] != batch {
        return Err(PyValueError::new_err(format!(
            "qkv has {} rows, the caches {batch} sequences",
            qkv.shape()[0]
        )));
    }
    if cos.is_some() != sin.is_some() {
        return Err(PyValueError::new_err("cos and sin go together"));
    }
    let qs = c_slice(&qkv, "qkv")?;
    let ls = c_slice(&lengths, "lengths")?;
    let cs = cos.as_ref().map(|c| c_slice(c, "cos")).transpose()?;
    let ss = sin.as_ref().map(|s| c_slice(s, "sin")).transpose()?;
    let kc = super::c_slice_mut(&mut k_cache, "k_cache")?;
    let vc = super::c_slice_mut(&mut v_cache, "v_cache")?;
    let rotary = cs.zip(ss).map(|(cos, sin)| attention::Rotary { cos, sin });
    let out =
        py.detach(|| attention::decode_step(qs, kc, vc, ls, &shape, rotary, softmax_scale as f32))?;
    to_array(py, out, &[batch, heads_q * head_dim])
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(attention_decode_step, m)?)?;
    m.add_function(wrap_pyfunction!(flash_attn_fwd, m)?)?;
    m.add_function(wrap_pyfunction!(flash_attn_bwd, m)?)?;
    m.add("ATTENTION_MAX_HEAD_DIM", attention::MAX_HEAD_DIM)?;
    Ok(())
}
