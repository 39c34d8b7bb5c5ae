//! Python bindings for `crate::moe`: argument conversion, GIL release and error mapping only.
//!
//! bfloat16 tensors cross the boundary as their uint16 bits (`t.view(torch.int16).numpy()`
//! viewed as uint16), since NumPy has no bfloat16 dtype.

use half::bf16;
use half::slice::HalfBitsSliceExt;
use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::{c_slice, c_slice_mut, size_arg};
use crate::error::{try_filled, try_zeroed, Error};
use crate::moe::{self, Gate};

/// `out` must have the row width of the rows it receives (its length alone could match a
/// different width).
fn check_width(name: &str, got: usize, want: usize) -> PyResult<()> {
    if got != want {
        return Err(PyValueError::new_err(format!(
            "{name} must have {want} columns like the input rows, got {got}"
        )));
    }
    Ok(())
}

#[derive(FromPyObject)]
enum Logits<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
}

#[derive(FromPyObject)]
enum Bias<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    F64(PyReadonlyArray1<'py, f64>),
}

type RouteOutput<'py> = (Bound<'py, PyArray2<i64>>, Bound<'py, PyAny>);

fn route_typed<'py, F: moe::Real + numpy::Element>(
    py: Python<'py>,
    logits: &PyReadonlyArray2<'py, F>,
    bias: Option<&[F]>,
    top_k: usize,
    gate: Gate,
    normalize: bool,
) -> PyResult<RouteOutput<'py>> {
    let shape = logits.shape();
    let (t, e) = (shape[0], shape[1]);
    let data = c_slice(logits, "logits")?;
    // Before sizing the outputs: top_k <= e, so t * top_k <= the logits' length.
    moe::route::check_route_args(e, top_k)?;
    let (idx, w) = py.detach(|| -> Result<_, Error> {
        let mut idx = try_zeroed::<i64>(t * top_k, "the routing indices")?;
        let mut w = try_filled(t * top_k, F::ZERO, "the routing weights")?;
        moe::route(data, e, top_k, gate, bias, normalize, &mut idx, &mut w)?;
        Ok((idx, w))
    })?;
    let shape_err = |e: numpy::ndarray::ShapeError| Error::runtime(e.to_string());
    let idx = Array2::from_shape_vec((t, top_k), idx).map_err(shape_err)?;
    let w = Array2::from_shape_vec((t, top_k), w).map_err(shape_err)?;
    Ok((idx.into_pyarray(py), w.into_pyarray(py).into_any()))
}

/// Top-k routing: returns `(idx [T, k] int64, weights [T, k])` from `logits [T, E]` (f32/f64).
#[pyfunction]
#[pyo3(signature = (logits, top_k, router = "softmax", bias = None, normalize = true))]
fn moe_route<'py>(
    py: Python<'py>,
    logits: Logits<'py>,
    top_k: &Bound<'py, PyAny>,
    router: &str,
    bias: Option<Bias<'py>>,
    normalize: bool,
) -> PyResult<RouteOutput<'py>> {
    let top_k = size_arg(top_k, "top_k")?;
    let gate = Gate::parse(router)?;
    match (logits, bias) {
        (Logits::F32(l), None) => route_typed(py, &l, None, top_k, gate, normalize),
        (Logits::F64(l), None) => route_typed(py, &l, None, top_k, gate, normalize),
        (Logits::F32(l), Some(Bias::F32(b))) => {
            let b = c_slice(&b, "bias")?;
            route_typed(py, &l, Some(b), top_k, gate, normalize)
        }
        (Logits::F64(l), Some(Bias::F64(b))) => {
            let b = c_slice(&b, "bias")?;
            route_typed(py, &l, Some(b), top_k, gate, normalize)
        }
        _ => Err(PyTypeError::new_err(
            "bias must have the same dtype as logits",
        )),
    }
}

type PlanOutput<'py> = (
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray2<i64>>,
    usize,
);

/// Dispatch plan for `idx [T, k]`: `(routed, counts, offsets, token_of, slot_of, pos, dropped)`.
#[pyfunction]
#[pyo3(signature = (idx, num_experts, capacity = None, padded = false))]
fn moe_dispatch_plan<'py>(
    py: Python<'py>,
    idx: PyReadonlyArray2<'py, i64>,
    num_experts: &Bound<'py, PyAny>,
    capacity: Option<&Bound<'py, PyAny>>,
    padded: bool,
) -> PyResult<PlanOutput<'py>> {
    let num_experts = size_arg(num_experts, "num_experts")?;
    let capacity = capacity.map(|c| size_arg(c, "capacity")).transpose()?;
    let (t, k) = (idx.shape()[0], idx.shape()[1]);
    let data = c_slice(&idx, "idx")?;
    let plan = py.detach(|| moe::dispatch_plan(data, k, num_experts, capacity, padded))?;
    let pos =
        Array2::from_shape_vec((t, k), plan.pos).map_err(|e| Error::runtime(e.to_string()))?;
    Ok((
        PyArray1::from_vec(py, plan.routed),
        PyArray1::from_vec(py, plan.counts),
        PyArray1::from_vec(py, plan.offsets),
        PyArray1::from_vec(py, plan.token_of),
        PyArray1::from_vec(py, plan.slot_of),
        pos.into_pyarray(py),
        plan.dropped,
    ))
}

#[derive(FromPyObject)]
enum Rows<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
    Bf16(PyReadonlyArray2<'py, u16>),
}

#[derive(FromPyObject)]
enum RowsOut<'py> {
    F32(PyReadwriteArray2<'py, f32>),
    F64(PyReadwriteArray2<'py, f64>),
    Bf16(PyReadwriteArray2<'py, u16>),
}

#[derive(FromPyObject)]
enum Scale<'py> {
    F32(PyReadonlyArray1<'py, f32>),
    F64(PyReadonlyArray1<'py, f64>),
}

#[derive(FromPyObject)]
enum Weights<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F64(PyReadonlyArray2<'py, f64>),
}

fn dtype_error(what: &str) -> PyErr {
    PyTypeError::new_err(format!(
        "{what}: rows must be float32, float64 or bfloat16 (as uint16 bits) and match; weights \
         must be float64 for float64 rows and float32 otherwise"
    ))
}

/// `out[i] = row_scale[i] * x[token_of[i]]` (zero rows where `token_of[i] == -1`).
#[pyfunction]
#[pyo3(signature = (x, token_of, out, row_scale = None))]
fn moe_permute<'py>(
    py: Python<'py>,
    x: Rows<'py>,
    token_of: PyReadonlyArray1<'py, i64>,
    out: RowsOut<'py>,
    row_scale: Option<Scale<'py>>,
) -> PyResult<()> {
    let token_of = c_slice(&token_of, "token_of")?;
    match (x, out, row_scale) {
        (Rows::F32(x), RowsOut::F32(mut o), s) => {
            let s = match &s {
                None => None,
                Some(Scale::F32(s)) => Some(c_slice(s, "row_scale")?),
                Some(_) => return Err(dtype_error("moe_permute")),
            };
            let d = x.shape()[1];
            check_width("out", o.shape()[1], d)?;
            let xs = c_slice(&x, "x")?;
            let os = c_slice_mut(&mut o, "out")?;
            py.detach(|| moe::permute(xs, d, token_of, s, os))?;
        }
        (Rows::Bf16(x), RowsOut::Bf16(mut o), s) => {
            let s = match &s {
                None => None,
                Some(Scale::F32(s)) => Some(c_slice(s, "row_scale")?),
                Some(_) => return Err(dtype_error("moe_permute")),
            };
            let d = x.shape()[1];
            check_width("out", o.shape()[1], d)?;
            let xs: &[bf16] = c_slice(&x, "x")?.reinterpret_cast();
            let os: &mut [bf16] = c_slice_mut(&mut o, "out")?.reinterpret_cast_mut();
            py.detach(|| moe::permute(xs, d, token_of, s, os))?;
        }
        (Rows::F64(x), RowsOut::F64(mut o), s) => {
            let s = match &s {
                None => None,
                Some(Scale::F64(s)) => Some(c_slice(s, "row_scale")?),
                Some(_) => return Err(dtype_error("moe_permute")),
            };
            let d = x.shape()[1];
            check_width("out", o.shape()[1], d)?;
            let xs = c_slice(&x, "x")?;
            let os = c_slice_mut(&mut o, "out")?;
            py.detach(|| moe::permute(xs, d, token_of, s, os))?;
        }
        _ => return Err(dtype_error("moe_permute")),
    }
    Ok(())
}

/// `out[t] = sum_s weights[t, s] * ys[pos[t, s]]`, skipping `pos == -1`; unit weights if None.
#[pyfunction]
#[pyo3(signature = (ys, pos, out, weights = None))]
fn moe_combine<'py>(
    py: Python<'py>,
    ys: Rows<'py>,
    pos: PyReadonlyArray2<'py, i64>,
    out: RowsOut<'py>,
    weights: Option<Weights<'py>>,
) -> PyResult<()> {
    let k = pos.shape()[1];
    let pos = c_slice(&pos, "pos")?;
    match (ys, out, weights) {
        (Rows::F32(y), RowsOut::F32(mut o), w) => {
            let w = match &w {
                None => None,
                Some(Weights::F32(w)) => Some(c_slice(w, "weights")?),
                Some(_) => return Err(dtype_error("moe_combine")),
            };
            let d = y.shape()[1];
            check_width("out", o.shape()[1], d)?;
            let ys = c_slice(&y, "ys")?;
            let os = c_slice_mut(&mut o, "out")?;
            py.detach(|| moe::combine(ys, d, pos, k, w, os))?;
        }
        (Rows::Bf16(y), RowsOut::Bf16(mut o), w) => {
            let w = match &w {
                None => None,
                Some(Weights::F32(w)) => Some(c_slice(w, "weights")?),
                Some(_) => return Err(dtype_error("moe_combine")),
            };
            let d = y.shape()[1];
            check_width("out", o.shape()[1], d)?;
            let ys: &[bf16] = c_slice(&y, "ys")?.reinterpret_cast();
            let os: &mut [bf16] = c_slice_mut(&mut o, "out")?.reinterpret_cast_mut();
            py.detach(|| moe::combine(ys, d, pos, k, w, os))?;
        }
        (Rows::F64(y), RowsOut::F64(mut o), w) => {
            let w = match &w {
                None => None,
                Some(Weights::F64(w)) => Some(c_slice(w, "weights")?),
                Some(_) => return Err(dtype_error("moe_combine")),
            };
            let d = y.shape()[1];
            check_width("out", o.shape()[1], d)?;
            let ys = c_slice(&y, "ys")?;
            let os = c_slice_mut(&mut o, "out")?;
            py.detach(|| moe::combine(ys, d, pos, k, w, os))?;
        }
        _ => return Err(dtype_error("moe_combine")),
    }
    Ok(())
}

fn rowdot_typed<'py, T: moe::Element>(
    py: Python<'py>,
    dy: &[T],
    ys: &[T],
    dim: usize,
    pos: &[i64],
    top_k: usize,
) -> PyResult<Array2<T::Acc>> {
    let t = pos.len() / top_k.max(1);
    let out = py.detach(|| -> Result<_, Error> {
        let mut out = try_filled(pos.len(), T::Acc::default(), "the row dot products")?;
        moe::rowdot(dy, ys, dim, pos, top_k, &mut out)?;
        Ok(out)
    })?;
    Ok(Array2::from_shape_vec((t, top_k), out).map_err(|e| Error::runtime(e.to_string()))?)
}

/// `out[t, s] = <dy[t], ys[pos[t, s]]>` (0 where `pos == -1`); float64 for float64 rows, else float32.
#[pyfunction]
fn moe_rowdot<'py>(
    py: Python<'py>,
    dy: Rows<'py>,
    ys: Rows<'py>,
    pos: PyReadonlyArray2<'py, i64>,
) -> PyResult<Bound<'py, PyAny>> {
    let k = pos.shape()[1];
    let pos = c_slice(&pos, "pos")?;
    Ok(match (dy, ys) {
        (Rows::F32(g), Rows::F32(y)) => {
            let d = g.shape()[1];
            check_width("ys", y.shape()[1], d)?;
            let (g, y) = (c_slice(&g, "dy")?, c_slice(&y, "ys")?);
            rowdot_typed(py, g, y, d, pos, k)?
                .into_pyarray(py)
                .into_any()
        }
        (Rows::Bf16(g), Rows::Bf16(y)) => {
            let d = g.shape()[1];
            check_width("ys", y.shape()[1], d)?;
            let g: &[bf16] = c_slice(&g, "dy")?.reinterpret_cast();
            let y: &[bf16] = c_slice(&y, "ys")?.reinterpret_cast();
            rowdot_typed(py, g, y, d, pos, k)?
                .into_pyarray(py)
                .into_any()
        }
        (Rows::F64(g), Rows::F64(y)) => {
            let d = g.shape()[1];
            check_width("ys", y.shape()[1], d)?;
            let (g, y) = (c_slice(&g, "dy")?, c_slice(&y, "ys")?);
            rowdot_typed(py, g, y, d, pos, k)?
                .into_pyarray(py)
                .into_any()
        }
        _ => return Err(dtype_error("moe_rowdot")),
    })
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(moe_route, m)?)?;
    m.add_function(wrap_pyfunction!(moe_dispatch_plan, m)?)?;
    m.add_function(wrap_pyfunction!(moe_permute, m)?)?;
    m.add_function(wrap_pyfunction!(moe_combine, m)?)?;
    m.add_function(wrap_pyfunction!(moe_rowdot, m)?)?;
    m.add("MOE_MAX_EXPERTS", moe::dispatch::MAX_EXPERTS)?;
    Ok(())
}
