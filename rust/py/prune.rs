//! Python bindings for `crate::prune` (and SparseGPT's mask step of `crate::quant::gptq`):
//! argument conversion, GIL release and error mapping only.

use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyReadwriteArray1, PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::{c_slice, c_slice_mut, size_arg};
use crate::error::{try_filled, Error};
use crate::prune::sparse24::{self, Sparse24Weight};
use crate::prune::structured::{self, Axis};
use crate::prune::{nm, select};
use crate::quant::gptq::{self, SparseMask};

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

fn bits_arg(obj: &Bound<'_, PyAny>) -> PyResult<u32> {
    let b = size_arg(obj, "bits")?;
    u32::try_from(b).map_err(|_| PyValueError::new_err(format!("bits must be 4 or 8, got {b}")))
}

/// Threshold of the `k` smallest elements over all `tensors` (1-D float32, as one sequence):
/// `(threshold value, how many elements equal to it are pruned)`.
#[pyfunction]
fn prune_select(
    py: Python<'_>,
    tensors: Vec<PyReadonlyArray1<'_, f32>>,
    k: &Bound<'_, PyAny>,
    absolute: bool,
) -> PyResult<(f32, usize)> {
    let k = size_arg(k, "k")?;
    let slices = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| c_slice(t, &format!("tensors[{i}]")))
        .collect::<PyResult<Vec<_>>>()?;
    let sel = py.detach(|| select::select_k_smallest(&slices, k, absolute))?;
    Ok((sel.threshold, sel.ties))
}

/// Prunes the `k` smallest elements over all `tensors` (ties to the earlier position): writes
/// each keep-mask of `masks` (1-D bool, same lengths). Returns the threshold value.
#[pyfunction]
fn prune_global_masks(
    py: Python<'_>,
    tensors: Vec<PyReadonlyArray1<'_, f32>>,
    mut masks: Vec<PyReadwriteArray1<'_, bool>>,
    k: &Bound<'_, PyAny>,
    absolute: bool,
) -> PyResult<f32> {
    let k = size_arg(k, "k")?;
    let slices = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| c_slice(t, &format!("tensors[{i}]")))
        .collect::<PyResult<Vec<_>>>()?;
    let mut outs = masks
        .iter_mut()
        .enumerate()
        .map(|(i, m)| c_slice_mut(m, &format!("masks[{i}]")))
        .collect::<PyResult<Vec<_>>>()?;
    let t = py.detach(|| -> Result<f32, Error> {
        let sel = select::select_k_smallest(&slices, k, absolute)?;
        select::write_masks(&slices, &mut outs, &sel, absolute)?;
        Ok(sel.threshold)
    })?;
    Ok(t)
}

/// Keep-mask `(rows, cols)` pruning the `k` smallest of each row of `scores` (of `|x| * scale`
/// with a per-column `scale`), ties to the lower column.
#[pyfunction]
#[pyo3(signature = (scores, k, absolute, scale = None))]
fn prune_row_masks<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    k: &Bound<'py, PyAny>,
    absolute: bool,
    scale: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<Bound<'py, PyArray2<bool>>> {
    let k = size_arg(k, "k")?;
    let (rows, cols) = dims(&scores);
    let s = c_slice(&scores, "scores")?;
    let sc = scale.as_ref().map(|a| c_slice(a, "scale")).transpose()?;
    let mask = py.detach(|| -> Result<Vec<bool>, Error> {
        let mut mask = try_filled(rows * cols, true, "the mask")?;
        select::row_masks(s, rows, cols, k, absolute, sc, &mut mask)?;
        Ok(mask)
    })?;
    to_2d(py, mask, rows, cols)
}

/// Keep-mask `(rows, cols)` with the `n` largest scores of every window of `m` columns kept.
#[pyfunction]
#[pyo3(signature = (scores, n, m, absolute, scale = None))]
fn prune_nm_masks<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f32>,
    n: &Bound<'py, PyAny>,
    m: &Bound<'py, PyAny>,
    absolute: bool,
    scale: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<Bound<'py, PyArray2<bool>>> {
    let (n, m) = (size_arg(n, "n")?, size_arg(m, "m")?);
    let (rows, cols) = dims(&scores);
    let s = c_slice(&scores, "scores")?;
    let sc = scale.as_ref().map(|a| c_slice(a, "scale")).transpose()?;
    let mask = py.detach(|| -> Result<Vec<bool>, Error> {
        crate::prune::check_nm(n, m, cols)?;
        let mut mask = try_filled(rows * cols, true, "the mask")?;
        nm::nm_masks(s, rows, cols, n, m, absolute, sc, &mut mask)?;
        Ok(mask)
    })?;
    to_2d(py, mask, rows, cols)
}

/// L`p` norms of groups of `group` rows (`axis = 0`) or columns (`axis = 1`) of `w`.
#[pyfunction]
#[pyo3(signature = (w, axis, group, p, scale = None))]
fn prune_group_norms<'py>(
    py: Python<'py>,
    w: PyReadonlyArray2<'py, f32>,
    axis: usize,
    group: &Bound<'py, PyAny>,
    p: u32,
    scale: Option<PyReadonlyArray1<'py, f32>>,
) -> PyResult<Bound<'py, PyArray1<f32>>> {
    let group = size_arg(group, "group")?;
    let axis = match axis {
        0 => Axis::Rows,
        1 => Axis::Cols,
        _ => {
            return Err(PyValueError::new_err(format!(
                "axis must be 0 or 1, got {axis}"
            )))
        }
    };
    let (rows, cols) = dims(&w);
    let ws = c_slice(&w, "w")?;
    let sc = scale.as_ref().map(|a| c_slice(a, "scale")).transpose()?;
    let out = py.detach(|| structured::group_norms(ws, rows, cols, axis, group, p, sc))?;
    Ok(out.into_pyarray(py))
}

type Compressed<'py> = (Bound<'py, PyArray2<u8>>, Bound<'py, PyArray2<u8>>);

/// 2:4 compression of dense codes `(rows, cols)` under a keep-mask: `(values, meta)`.
#[pyfunction]
fn prune_sparse24_compress<'py>(
    py: Python<'py>,
    codes: PyReadonlyArray2<'py, u8>,
    keep: PyReadonlyArray2<'py, bool>,
    bits: &Bound<'py, PyAny>,
) -> PyResult<Compressed<'py>> {
    let bits = bits_arg(bits)?;
    let (rows, cols) = dims(&codes);
    if dims(&keep) != (rows, cols) {
        return Err(PyValueError::new_err(format!(
            "keep has shape {:?}, codes {:?}",
            dims(&keep),
            (rows, cols)
        )));
    }
    let (cs, ks) = (c_slice(&codes, "codes")?, c_slice(&keep, "keep")?);
    let (values, meta) = py.detach(|| sparse24::compress(cs, ks, rows, cols, bits))?;
    Ok((
        to_2d(py, values, rows, sparse24::value_bytes(cols, bits))?,
        to_2d(py, meta, rows, cols / 8)?,
    ))
}

#[allow(clippy::too_many_arguments)]
fn weight<'a>(
    values: &'a PyReadonlyArray2<'_, u8>,
    meta: &'a PyReadonlyArray2<'_, u8>,
    scales: &'a PyReadonlyArray2<'_, f32>,
    zeros: &'a PyReadonlyArray2<'_, f32>,
    in_features: usize,
    bits: u32,
    group_size: usize,
) -> PyResult<Sparse24Weight<'a>> {
    Ok(Sparse24Weight {
        values: c_slice(values, "values")?,
        meta: c_slice(meta, "meta")?,
        scales: c_slice(scales, "scales")?,
        zeros: c_slice(zeros, "zeros")?,
        out_features: dims(values).0,
        in_features,
        bits,
        group_size,
    })
}

/// Dense codes `(out, in)` of a compressed 2:4 weight (zero points where nothing is stored).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn prune_sparse24_decompress<'py>(
    py: Python<'py>,
    values: PyReadonlyArray2<'py, u8>,
    meta: PyReadonlyArray2<'py, u8>,
    scales: PyReadonlyArray2<'py, f32>,
    zeros: PyReadonlyArray2<'py, f32>,
    in_features: &Bound<'py, PyAny>,
    bits: &Bound<'py, PyAny>,
    group_size: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let k = size_arg(in_features, "in_features")?;
    let (bits, gs) = (bits_arg(bits)?, size_arg(group_size, "group_size")?);
    let w = weight(&values, &meta, &scales, &zeros, k, bits, gs)?;
    let n = w.out_features;
    let out = py.detach(|| sparse24::decompress(&w))?;
    to_2d(py, out, n, k)
}

/// `x @ W^T (+ bias)` with a compressed 2:4 weight; `x` `(m, in)` float32.
#[pyfunction]
#[pyo3(signature = (x, values, meta, scales, zeros, bias, bits, group_size))]
#[allow(clippy::too_many_arguments)]
fn prune_sparse24_linear<'py>(
    py: Python<'py>,
    x: PyReadonlyArray2<'py, f32>,
    values: PyReadonlyArray2<'py, u8>,
    meta: PyReadonlyArray2<'py, u8>,
    scales: PyReadonlyArray2<'py, f32>,
    zeros: PyReadonlyArray2<'py, f32>,
    bias: Option<PyReadonlyArray1<'py, f32>>,
    bits: &Bound<'py, PyAny>,
    group_size: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray2<f32>>> {
    let (bits, gs) = (bits_arg(bits)?, size_arg(group_size, "group_size")?);
    let (m, k) = dims(&x);
    let w = weight(&values, &meta, &scales, &zeros, k, bits, gs)?;
    let xs = c_slice(&x, "x")?;
    let b = bias.as_ref().map(|a| c_slice(a, "bias")).transpose()?;
    let n = w.out_features;
    let y = py.detach(|| sparse24::linear(xs, m, &w, b))?;
    to_2d(py, y, m, n)
}

type SparseBlock<'py> = (
    Bound<'py, PyArray2<u8>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray2<u8>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray2<f32>>,
);

/// SparseGPT over one block of columns (GPTQ's column loop with a mask step). `w` `(rows,
/// cols)` is updated in place to the block's final weights. Either `mask` (1 = pruned) or
/// `n`, `m` (N:M, chosen in the loop). `bits = 0`: no quantization. Returns `(mask, err, codes,
/// scales, zeros)` (the last three empty without quantization).
#[pyfunction]
#[pyo3(signature = (w, hinv, mask, n, m, bits, group_size, symmetric))]
#[allow(clippy::too_many_arguments)]
fn prune_sparsegpt_block<'py>(
    py: Python<'py>,
    mut w: PyReadwriteArray2<'py, f32>,
    hinv: PyReadonlyArray2<'py, f32>,
    mask: Option<PyReadonlyArray2<'py, u8>>,
    n: &Bound<'py, PyAny>,
    m: &Bound<'py, PyAny>,
    bits: &Bound<'py, PyAny>,
    group_size: &Bound<'py, PyAny>,
    symmetric: bool,
) -> PyResult<SparseBlock<'py>> {
    let (n, m) = (size_arg(n, "n")?, size_arg(m, "m")?);
    let (bits, gs) = (bits_arg(bits)?, size_arg(group_size, "group_size")?);
    let (rows, cols) = {
        let s = w.shape();
        (s[0], s[1])
    };
    let hs = c_slice(&hinv, "hinv")?;
    let ms = mask.as_ref().map(|a| c_slice(a, "mask")).transpose()?;
    let how = match (ms, n, m) {
        (Some(mk), 0, 0) => SparseMask::Given(mk),
        (None, n, m) if m > 0 => SparseMask::NM(n, m),
        _ => {
            return Err(PyValueError::new_err(
                "give either a mask (with n = m = 0) or n and m (without a mask)",
            ))
        }
    };
    let quant = (bits > 0).then_some((bits, gs, symmetric));
    let ws = c_slice_mut(&mut w, "w")?;
    let r = py.detach(|| gptq::sparsegpt_block(ws, rows, cols, hs, how, quant))?;
    let (qc, ng) = if quant.is_some() {
        (cols, cols / gs)
    } else {
        (0, 0)
    };
    Ok((
        to_2d(py, r.mask, rows, cols)?,
        to_2d(py, r.err, rows, cols)?,
        to_2d(py, r.codes, rows, qc)?,
        to_2d(py, r.scales, rows, ng)?,
        to_2d(py, r.zeros, rows, ng)?,
    ))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(prune_select, m)?)?;
    m.add_function(wrap_pyfunction!(prune_global_masks, m)?)?;
    m.add_function(wrap_pyfunction!(prune_row_masks, m)?)?;
    m.add_function(wrap_pyfunction!(prune_nm_masks, m)?)?;
    m.add_function(wrap_pyfunction!(prune_group_norms, m)?)?;
    m.add_function(wrap_pyfunction!(prune_sparse24_compress, m)?)?;
    m.add_function(wrap_pyfunction!(prune_sparse24_decompress, m)?)?;
    m.add_function(wrap_pyfunction!(prune_sparse24_linear, m)?)?;
    m.add_function(wrap_pyfunction!(prune_sparsegpt_block, m)?)?;
    Ok(())
}
