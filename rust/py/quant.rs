//! Python bindings for `crate::quant`: argument conversion, GIL release and error mapping only.

use numpy::{
    IntoPyArray, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::{c_slice, c_slice_mut, size_arg};
use crate::error::checked_mul;
use crate::quant::gemv::{self, QuantWeight, Route};
use crate::quant::{affine, gptq, pack};

fn slice<'a, T: numpy::Element>(name: &str, a: &'a PyReadonlyArray2<'_, T>) -> PyResult<&'a [T]> {
    c_slice(a, name)
}

/// A bit width: an int; values outside `u32` are a `ValueError` (the kernels then reject all
/// but the widths they run).
fn bits_arg(obj: &Bound<'_, PyAny>) -> PyResult<u32> {
    let b = size_arg(obj, "bits")?;
    u32::try_from(b).map_err(|_| PyValueError::new_err(format!("bits must be 4 or 8, got {b}")))
}

fn dims<T: numpy::Element>(a: &PyReadonlyArray2<'_, T>) -> (usize, usize) {
    let s = a.shape();
    (s[0], s[1])
}

fn to_2d<'py, T: numpy::Element>(
    py: Python<'py>,
    v: Vec<T>,
    rows: usize,
    cols: usize,
) -> PyResult<Bound<'py, PyArray2<T>>> {
    v.into_pyarray(py).reshape([rows, cols])
}

type Params<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<f32>>);

/// Per-group scales and zero points of a float32 `(out, in)` weight.
#[pyfunction]
fn quant_choose_qparams<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    bits: &Bound<'py, PyAny>,
    group_size: &Bound<'py, PyAny>,
    symmetric: bool,
) -> PyResult<Params<'py>> {
    let (bits, group_size) = (bits_arg(bits)?, size_arg(group_size, "group_size")?);
    let (rows, cols) = dims(&w);
    let ws = slice("w", &w)?;
    let (s, z) =
        py.detach(|| affine::choose_qparams(ws, rows, cols, bits, group_size, symmetric))?;
    let ng = cols / group_size;
    Ok((to_2d(py, s, rows, ng)?, to_2d(py, z, rows, ng)?))
}

/// Unpacked uint8 codes `(out, in)` of a float32 weight.
#[pyfunction]
fn quant_quantize<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    scales: PyReadonlyArray2<'py, f32>,
    zeros: PyReadonlyArray2<'py, f32>,
    bits: &Bound<'py, PyAny>,
    group_size: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let (bits, group_size) = (bits_arg(bits)?, size_arg(group_size, "group_size")?);
    let (rows, cols) = dims(&w);
    let (ws, ss, zs) = (
        slice("w", &w)?,
        slice("scales", &scales)?,
        slice("zeros", &zeros)?,
    );
    let q = py.detach(|| affine::quantize(ws, rows, cols, ss, zs, bits, group_size))?;
    to_2d(py, q, rows, cols)
}

/// Float32 `(out, in)` from unpacked uint8 codes.
#[pyfunction]
fn quant_dequantize<'py>(
    py: Python<'py>,
    q: PyReadonlyArray2<'py, u8>,
    scales: PyReadonlyArray2<'py, f32>,
    zeros: PyReadonlyArray2<'py, f32>,
    group_size: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let group_size = size_arg(group_size, "group_size")?;
    let (rows, cols) = dims(&q);
    let (qs, ss, zs) = (
        slice("q", &q)?,
        slice("scales", &scales)?,
        slice("zeros", &zeros)?,
    );
    let w = py.detach(|| affine::dequantize(qs, rows, cols, ss, zs, group_size))?;
    to_2d(py, w, rows, cols)
}

pub(super) fn in_features(bits: u32, cols: usize) -> PyResult<usize> {
    match bits {
        8 => Ok(cols),
        4 => Ok(checked_mul("in_features (2 * packed columns)", cols, 2)?),
        _ => Err(PyValueError::new_err(format!(
            "bits must be 4 or 8, got {bits}"
        ))),
    }
}

/// Float32 `(out, in)` from a packed `qweight` (`(out, in)` INT8 or `(out, in / 2)` INT4).
#[pyfunction]
fn quant_dequantize_packed<'py>(
    py: Python<'py>,
    qweight: PyReadonlyArray2<'py, u8>,
    scales: PyReadonlyArray2<'py, f32>,
    zeros: PyReadonlyArray2<'py, f32>,
    bits: &Bound<'py, PyAny>,
    group_size: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (bits, group_size) = (bits_arg(bits)?, size_arg(group_size, "group_size")?);
    let (rows, cols) = dims(&qweight);
    let k = in_features(bits, cols)?;
    let (qs, ss, zs) = (
        slice("qweight", &qweight)?,
        slice("scales", &scales)?,
        slice("zeros", &zeros)?,
    );
    let w = py.detach(|| affine::dequantize_packed(qs, rows, k, ss, zs, bits, group_size))?;
    to_2d(py, w, rows, k)
}

/// Packs `(rows, cols)` codes in [0, 15] into `(rows, cols / 2)` bytes, low nibble first.
#[pyfunction]
fn quant_pack_int4<'py>(
    py: Python<'py>,
    q: PyReadonlyArray2<'py, u8>,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let (rows, cols) = dims(&q);
    if cols % 2 != 0 {
        return Err(PyValueError::new_err(format!(
            "pack_int4 needs an even last dimension, got {cols}"
        )));
    }
    let qs = slice("q", &q)?;
    let p = py.detach(|| pack::pack_int4(qs))?;
    to_2d(py, p, rows, cols / 2)
}

/// Unpacks `(rows, cols)` bytes into `(rows, 2 * cols)` codes.
#[pyfunction]
fn quant_unpack_int4<'py>(
    py: Python<'py>,
    packed: PyReadonlyArray2<'py, u8>,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let (rows, cols) = dims(&packed);
    let ps = slice("packed", &packed)?;
    let q = py.detach(|| pack::try_unpack_int4(ps))?;
    to_2d(py, q, rows, checked_mul("unpacked columns", cols, 2)?)
}

pub(super) fn parse_route(route: &str, bits: u32) -> PyResult<Route> {
    match route {
        "auto" => Ok(gemv::default_route(bits)),
        "float" => Ok(Route::Float),
        "int8" => Ok(Route::Int8Activations),
        _ => Err(PyValueError::new_err(format!(
            "route must be 'auto', 'float' or 'int8', got {route:?}"
        ))),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_linear<'py>(
    py: Python<'py>,
    x: Vec<f32>,
    m: usize,
    qweight: &PyReadonlyArray2<'py, u8>,
    scales: &PyReadonlyArray2<'py, f32>,
    zeros: &PyReadonlyArray2<'py, f32>,
    bias: Option<&PyReadonlyArray1<'py, f32>>,
    bits: u32,
    group_size: usize,
    route: &str,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let route = parse_route(route, bits)?;
    let (n, cols) = dims(qweight);
    let k = in_features(bits, cols)?;
    // The output is m x n: both are array dimensions, but their product need not fit.
    checked_mul("the output's elements (x rows * out_features)", m, n)?;
    let b = match bias {
        Some(b) => Some(c_slice(b, "bias")?),
        None => None,
    };
    let w = QuantWeight {
        qweight: slice("qweight", qweight)?,
        scales: slice("scales", scales)?,
        zeros: slice("zeros", zeros)?,
        out_features: n,
        in_features: k,
        bits,
        group_size,
    };
    let y = py.detach(|| gemv::linear(&x, m, &w, b, route))?;
    to_2d(py, y, m, n)
}

fn check_x_cols(cols: usize, qcols: usize, bits: u32) -> PyResult<()> {
    let k = in_features(bits, qcols)?;
    if cols != k {
        return Err(PyValueError::new_err(format!(
            "x has {cols} features, the weight expects {k}"
        )));
    }
    Ok(())
}

/// `x @ dequant(W).T + bias` for float32 `x` `(m, in)`; returns float32 `(m, out)`.
#[pyfunction]
#[pyo3(signature = (x, qweight, scales, zeros, bias, bits, group_size, route = "auto"))]
#[allow(clippy::too_many_arguments)]
fn quant_linear<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    qweight: PyReadonlyArray2<'py, u8>,
    scales: PyReadonlyArray2<'py, f32>,
    zeros: PyReadonlyArray2<'py, f32>,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    bits: &Bound<'py, PyAny>,
    group_size: &Bound<'py, PyAny>,
    route: &str,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (bits, group_size) = (bits_arg(bits)?, size_arg(group_size, "group_size")?);
    let (m, k) = dims(&x);
    check_x_cols(k, dims(&qweight).1, bits)?;
    let xv = slice("x", &x)?.to_vec();
    run_linear(
        py,
        xv,
        m,
        &qweight,
        &scales,
        &zeros,
        bias.as_ref(),
        bits,
        group_size,
        route,
    )
}

/// As `quant_linear` for bfloat16 `x` passed as its raw bits (an int16 view); returns float32.
#[pyfunction]
#[pyo3(signature = (x, qweight, scales, zeros, bias, bits, group_size, route = "auto"))]
#[allow(clippy::too_many_arguments)]
fn quant_linear_bf16<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, i16>,
    qweight: PyReadonlyArray2<'py, u8>,
    scales: PyReadonlyArray2<'py, f32>,
    zeros: PyReadonlyArray2<'py, f32>,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    bits: &Bound<'py, PyAny>,
    group_size: &Bound<'py, PyAny>,
    route: &str,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (bits, group_size) = (bits_arg(bits)?, size_arg(group_size, "group_size")?);
    let (m, k) = dims(&x);
    check_x_cols(k, dims(&qweight).1, bits)?;
    let xs = slice("x", &x)?;
    let xv: Vec<f32> = xs
        .iter()
        .map(|&b| half::bf16::from_bits(b as u16).to_f32())
        .collect();
    run_linear(
        py,
        xv,
        m,
        &qweight,
        &scales,
        &zeros,
        bias.as_ref(),
        bits,
        group_size,
        route,
    )
}

/// Instruction set the fused kernels use on this CPU.
#[pyfunction]
fn quant_kernel_isa() -> &'static str {
    gemv::detect_isa().name()
}

/// Route that `route="auto"` picks for `bits` on this CPU: "int8" or "float".
#[pyfunction]
fn quant_default_route(bits: &Bound<'_, PyAny>) -> PyResult<&'static str> {
    let bits = bits_arg(bits)?;
    Ok(match gemv::default_route(bits) {
        Route::Float => "float",
        Route::Int8Activations => "int8",
    })
}

type GptqBlock<'py> = (
    Bound<'py, PyArray2<u8>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray2<f32>>,
);

/// GPTQ's column loop over one block: `w` float32 `(rows, cols)` C-contiguous, updated in place;
/// `hinv` `(cols, cols)` upper Cholesky block. Returns `(codes u8, err f32)` `(rows, cols)` and
/// `(scales, zeros)` `(rows, cols / group_size)`.
#[pyfunction]
fn quant_gptq_block<'py>(
    py: Python<'py>,
    mut w: PyReadwriteArray2<'py, f32>,
    hinv: PyReadonlyArray2<'py, f32>,
    bits: &Bound<'py, PyAny>,
    group_size: &Bound<'py, PyAny>,
    symmetric: bool,
) -> PyResult<GptqBlock<'py>> {
    let (bits, group_size) = (bits_arg(bits)?, size_arg(group_size, "group_size")?);
    let (rows, cols) = {
        let s = w.shape();
        (s[0], s[1])
    };
    let hs = slice("hinv", &hinv)?;
    let ws = c_slice_mut(&mut w, "w")?;
    let r = py.detach(|| gptq::gptq_block(ws, rows, cols, hs, bits, group_size, symmetric))?;
    let ng = cols / group_size;
    Ok((
        to_2d(py, r.codes, rows, cols)?,
        to_2d(py, r.err, rows, cols)?,
        to_2d(py, r.scales, rows, ng)?,
        to_2d(py, r.zeros, rows, ng)?,
    ))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(quant_choose_qparams, m)?)?;
    m.add_function(wrap_pyfunction!(quant_quantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant_dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(quant_dequantize_packed, m)?)?;
    m.add_function(wrap_pyfunction!(quant_pack_int4, m)?)?;
    m.add_function(wrap_pyfunction!(quant_unpack_int4, m)?)?;
    m.add_function(wrap_pyfunction!(quant_linear, m)?)?;
    m.add_function(wrap_pyfunction!(quant_linear_bf16, m)?)?;
    m.add_function(wrap_pyfunction!(quant_kernel_isa, m)?)?;
    m.add_function(wrap_pyfunction!(quant_default_route, m)?)?;
    m.add_function(wrap_pyfunction!(quant_gptq_block, m)?)?;
    Ok(())
}
