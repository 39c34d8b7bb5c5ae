//! Python bindings (feature `python`): argument conversion, GIL release and error mapping only.

use numpy::ndarray::Dimension;
use numpy::{PyReadonlyArray, PyReadwriteArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOSError, PyOverflowError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

mod attention;
mod cuda;
mod dedup;
mod models;
mod moe;
mod optim;
mod prune;
mod quant;

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            Error::Value(m) => PyValueError::new_err(m),
            Error::Type(m) => PyTypeError::new_err(m),
            Error::Runtime(m) => PyRuntimeError::new_err(m),
            Error::Io(m) => PyOSError::new_err(m),
        }
    }
}

fn not_c_contiguous(name: &str, f_contiguous: bool, strides: &[isize]) -> PyErr {
    let layout = if f_contiguous {
        "Fortran-ordered"
    } else {
        "non-contiguous (strided)"
    };
    PyTypeError::new_err(format!(
        "{name} must be a C-contiguous array, got a {layout} array with strides {strides:?} \
         (pass np.ascontiguousarray({name}))"
    ))
}

/// The elements of a C-contiguous array, in memory order, or a `TypeError` naming `name`.
///
/// `as_slice` alone also accepts Fortran-ordered arrays (and returns their elements in column
/// order), so every native function reads its arrays through this (or [`c_slice_mut`]).
pub(crate) fn c_slice<'a, T: numpy::Element, D: Dimension>(
    a: &'a PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    if !a.is_c_contiguous() {
        return Err(not_c_contiguous(
            name,
            a.is_fortran_contiguous(),
            a.strides(),
        ));
    }
    a.as_slice().map_err(|e| {
        PyTypeError::new_err(format!(
            "{name} must be an aligned C-contiguous array ({e})"
        ))
    })
}

/// As [`c_slice`], for an array the function writes.
pub(crate) fn c_slice_mut<'a, T: numpy::Element, D: Dimension>(
    a: &'a mut PyReadwriteArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a mut [T]> {
    if !a.is_c_contiguous() {
        return Err(not_c_contiguous(
            name,
            a.is_fortran_contiguous(),
            a.strides(),
        ));
    }
    a.as_slice_mut().map_err(|e| {
        PyTypeError::new_err(format!(
            "{name} must be an aligned C-contiguous array ({e})"
        ))
    })
}

/// A size or count argument (`top_k`, `num_experts`, `group_size`, ...): a `TypeError` for
/// non-integers and a `ValueError` (not `OverflowError`) for negative or huge ones.
pub(crate) fn size_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    match obj.extract::<usize>() {
        Ok(v) => Ok(v),
        Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => {
            let negative = obj.lt(0i32).unwrap_or(false);
            Err(PyValueError::new_err(if negative {
                format!("{name} must be >= 0, got {obj}")
            } else {
                format!("{name} = {obj} is too large (at most {})", usize::MAX)
            }))
        }
        Err(_) => Err(PyTypeError::new_err(format!(
            "{name} must be an int, got {}",
            obj.get_type().name()?
        ))),
    }
}

/// Number of threads in the library's rayon pool.
#[pyfunction]
fn get_num_threads() -> usize {
    crate::parallel::num_threads()
}

/// Resize the library's rayon pool.
#[pyfunction]
fn set_num_threads(n: usize) -> PyResult<()> {
    Ok(crate::parallel::set_num_threads(n)?)
}

/// Whether the extension was built with the `cuda` feature.
#[pyfunction]
fn built_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_function(wrap_pyfunction!(get_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(set_num_threads, m)?)?;
    m.add_function(wrap_pyfunction!(built_with_cuda, m)?)?;
    dedup::register(m)?;
    quant::register(m)?;
    attention::register(m)?;
    moe::register(m)?;
    models::register(m)?;
    optim::register(m)?;
    prune::register(m)?;
    cuda::register(m)?;
    Ok(())
}
