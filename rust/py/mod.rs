//! Python bindings (feature `python`): argument conversion, GIL release and error mapping only.

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::error::Error;

mod attention;
mod cuda;
mod dedup;
mod moe;
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
    cuda::register(m)?;
    Ok(())
}
