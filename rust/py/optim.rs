//! Python bindings for `crate::optim`: argument conversion, GIL release and error mapping only.
//!
//! Each list holds one NumPy view per parameter tensor (`t.detach().numpy()`, any shape,
//! C-contiguous); bfloat16 / float16 tensors cross as their uint16 bits
//! (`t.view(torch.uint16).numpy()`), named by `dtype`.

use half::slice::HalfBitsSliceExt;
use half::{bf16, f16};
use numpy::{
    BorrowError, Element, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyReadwriteArrayDyn,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use super::{c_slice, c_slice_mut};
use crate::optim::lamb::{self, Grad, HalfParam, LambHyper, LambTensor};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Dtype {
    F32,
    Bf16,
    F16,
}

fn dtype_arg(dtype: &str) -> PyResult<Dtype> {
    match dtype {
        "float32" => Ok(Dtype::F32),
        "bfloat16" => Ok(Dtype::Bf16),
        "float16" => Ok(Dtype::F16),
        _ => Err(PyValueError::new_err(format!(
            "dtype must be 'float32', 'bfloat16' or 'float16', got {dtype:?}"
        ))),
    }
}

/// The items of a list or tuple (a `TypeError` for anything else: iterating an ndarray would
/// silently treat its rows as tensors).
fn items<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if let Ok(l) = obj.cast::<PyList>() {
        return Ok(l.iter().collect());
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        return Ok(t.iter().collect());
    }
    Err(PyTypeError::new_err(format!(
        "{name} must be a list or tuple of arrays, got {}",
        obj.get_type().name()?
    )))
}

fn typed<'a, 'py, T: Element>(
    item: &'a Bound<'py, PyAny>,
    label: &str,
    want: &str,
) -> PyResult<&'a Bound<'py, PyArrayDyn<T>>> {
    item.cast::<PyArrayDyn<T>>().map_err(|_| {
        let got = match item.cast::<PyUntypedArray>() {
            Ok(a) => format!("a {} array", a.dtype()),
            Err(_) => item
                .get_type()
                .name()
                .map_or_else(|_| "another object".to_owned(), |n| n.to_string()),
        };
        PyTypeError::new_err(format!("{label} must be a {want} NumPy array, got {got}"))
    })
}

fn borrow_err(label: &str, e: BorrowError) -> PyErr {
    match e {
        BorrowError::NotWriteable => {
            PyTypeError::new_err(format!("{label} is read-only; the step writes it in place"))
        }
        _ => PyValueError::new_err(format!(
            "{label} overlaps another array of this call (each tensor needs its own buffers)"
        )),
    }
}

fn readwrite_list<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    want: &str,
) -> PyResult<Vec<PyReadwriteArrayDyn<'py, T>>> {
    optional_readwrite_list(obj, name, want, false).map(|v| v.into_iter().flatten().collect())
}

/// As [`readwrite_list`]; `None` items are kept as `None` where `allow_none`.
fn optional_readwrite_list<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    want: &str,
    allow_none: bool,
) -> PyResult<Vec<Option<PyReadwriteArrayDyn<'py, T>>>> {
    let mut out = Vec::new();
    for (i, item) in items(obj, name)?.iter().enumerate() {
        if allow_none && item.is_none() {
            out.push(None);
            continue;
        }
        let label = format!("{name}[{i}]");
        let a = typed::<T>(item, &label, want)?;
        out.push(Some(a.try_readwrite().map_err(|e| borrow_err(&label, e))?));
    }
    Ok(out)
}

fn readonly_list<'py, T: Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    want: &str,
) -> PyResult<Vec<PyReadonlyArrayDyn<'py, T>>> {
    let mut out = Vec::new();
    for (i, item) in items(obj, name)?.iter().enumerate() {
        let label = format!("{name}[{i}]");
        let a = typed::<T>(item, &label, want)?;
        out.push(a.try_readonly().map_err(|e| borrow_err(&label, e))?);
    }
    Ok(out)
}

fn slices_mut<'a, T: Element>(
    arrays: &'a mut [PyReadwriteArrayDyn<'_, T>],
    name: &str,
) -> PyResult<Vec<&'a mut [T]>> {
    arrays
        .iter_mut()
        .enumerate()
        .map(|(i, a)| c_slice_mut(a, &format!("{name}[{i}]")))
        .collect()
}

fn slices<'a, T: Element>(
    arrays: &'a [PyReadonlyArrayDyn<'_, T>],
    name: &str,
) -> PyResult<Vec<&'a [T]>> {
    arrays
        .iter()
        .enumerate()
        .map(|(i, a)| c_slice(a, &format!("{name}[{i}]")))
        .collect()
}

/// A memory range `[start, end)` of one argument array, for the overlap check.
struct Span {
    start: usize,
    end: usize,
    written: bool,
    label: String,
}

fn spans<T>(out: &mut Vec<Span>, name: &str, written: bool, xs: &[Option<&[T]>]) {
    for (i, s) in xs.iter().enumerate() {
        if let Some(s) = s {
            let start = s.as_ptr() as usize;
            out.push(Span {
                start,
                end: start + std::mem::size_of_val(*s),
                written,
                label: format!("{name}[{i}]"),
            });
        }
    }
}

fn some<'a, T>(xs: &'a [&'a mut [T]]) -> Vec<Option<&'a [T]>> {
    xs.iter().map(|s| Some(&**s)).collect()
}

/// A `ValueError` when an array the step writes shares memory with any other array of the call.
/// NumPy's borrow flags catch views of one ndarray; two `.numpy()` views of one torch storage
/// have different base objects, so the ranges are compared here as well.
fn check_no_overlap(mut spans: Vec<Span>) -> PyResult<()> {
    spans.retain(|s| s.end > s.start);
    spans.sort_by_key(|s| s.start);
    for (i, a) in spans.iter().enumerate() {
        for b in spans[i + 1..].iter().take_while(|b| b.start < a.end) {
            if a.written || b.written {
                return Err(PyValueError::new_err(format!(
                    "{} and {} share memory (each tensor needs its own buffers)",
                    a.label, b.label
                )));
            }
        }
    }
    Ok(())
}

/// One fused LAMB step over a parameter group; returns each tensor's trust ratio.
#[pyfunction]
#[pyo3(signature = (
    params, grads, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, weight_decay,
    bias_correction1, bias_correction2, grad_averaging, trust_clip, always_adapt,
    clip_divisor = 1.0, dtype = "float32", half_params = None
))]
#[allow(clippy::too_many_arguments)]
fn lamb_step<'py>(
    py: Python<'py>,
    params: &Bound<'py, PyAny>,
    grads: &Bound<'py, PyAny>,
    exp_avgs: &Bound<'py, PyAny>,
    exp_avg_sqs: &Bound<'py, PyAny>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    bias_correction1: f64,
    bias_correction2: f64,
    grad_averaging: bool,
    trust_clip: bool,
    always_adapt: bool,
    clip_divisor: f64,
    dtype: &str,
    half_params: Option<&Bound<'py, PyAny>>,
) -> PyResult<Vec<f64>> {
    let dtype = dtype_arg(dtype)?;
    let hyper = LambHyper {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        bias_correction1,
        bias_correction2,
        grad_averaging,
        trust_clip,
        always_adapt,
        clip_divisor,
    };
    hyper.validate()?;
    if dtype == Dtype::F32 && half_params.is_some() {
        return Err(PyValueError::new_err(
            "half_params is only for dtype='bfloat16' or 'float16' (float32 parameters are \
             updated in params directly)",
        ));
    }
    let mut w = readwrite_list::<f32>(params, "params", "float32")?;
    let mut m = readwrite_list::<f32>(exp_avgs, "exp_avgs", "float32")?;
    let mut v = readwrite_list::<f32>(exp_avg_sqs, "exp_avg_sqs", "float32")?;
    let half_want = "uint16 (the bits of bfloat16 / float16)";
    let (g32, g16) = match dtype {
        Dtype::F32 => (readonly_list::<f32>(grads, "grads", "float32")?, Vec::new()),
        _ => (Vec::new(), readonly_list::<u16>(grads, "grads", half_want)?),
    };
    let mut h = match half_params {
        Some(obj) => optional_readwrite_list::<u16>(obj, "half_params", half_want, true)?,
        None => Vec::new(),
    };
    let ng = g32.len().max(g16.len());
    if [ng, m.len(), v.len()].iter().any(|&n| n != w.len())
        || (half_params.is_some() && h.len() != w.len())
    {
        let half = if half_params.is_some() {
            format!(", half_params {}", h.len())
        } else {
            String::new()
        };
        return Err(PyValueError::new_err(format!(
            "one array per tensor in every list: got params {}, grads {ng}, exp_avgs {}, \
             exp_avg_sqs {}{half}",
            w.len(),
            m.len(),
            v.len()
        )));
    }
    let ws = slices_mut(&mut w, "params")?;
    let ms = slices_mut(&mut m, "exp_avgs")?;
    let vs = slices_mut(&mut v, "exp_avg_sqs")?;
    let hs: Vec<Option<&mut [u16]>> = h
        .iter_mut()
        .enumerate()
        .map(|(i, a)| {
            a.as_mut()
                .map(|a| c_slice_mut(a, &format!("half_params[{i}]")))
                .transpose()
        })
        .collect::<PyResult<_>>()?;
    let gs32 = slices(&g32, "grads")?;
    let gs16 = slices(&g16, "grads")?;
    let mut all = Vec::new();
    spans(&mut all, "params", true, &some(&ws));
    spans(&mut all, "exp_avgs", true, &some(&ms));
    spans(&mut all, "exp_avg_sqs", true, &some(&vs));
    let halves: Vec<Option<&[u16]>> = hs.iter().map(|s| s.as_deref()).collect();
    spans(&mut all, "half_params", true, &halves);
    let spans32: Vec<Option<&[f32]>> = gs32.iter().map(|&s| Some(s)).collect();
    let spans16: Vec<Option<&[u16]>> = gs16.iter().map(|&s| Some(s)).collect();
    spans(&mut all, "grads", false, &spans32);
    spans(&mut all, "grads", false, &spans16);
    check_no_overlap(all)?;
    let grads: Vec<Grad<'_>> = match dtype {
        Dtype::F32 => gs32.into_iter().map(Grad::F32).collect(),
        Dtype::Bf16 => gs16
            .into_iter()
            .map(|s| Grad::Bf16(s.reinterpret_cast::<bf16>()))
            .collect(),
        Dtype::F16 => gs16
            .into_iter()
            .map(|s| Grad::F16(s.reinterpret_cast::<f16>()))
            .collect(),
    };
    let mut halves: Vec<HalfParam<'_>> = hs
        .into_iter()
        .map(|s| match (s, dtype) {
            (None, _) => HalfParam::None,
            (Some(s), Dtype::F16) => HalfParam::F16(s.reinterpret_cast_mut::<f16>()),
            (Some(s), _) => HalfParam::Bf16(s.reinterpret_cast_mut::<bf16>()),
        })
        .collect();
    halves.resize_with(ws.len(), HalfParam::default);
    let tensors: Vec<LambTensor<'_>> = ws
        .into_iter()
        .zip(grads)
        .zip(ms)
        .zip(vs)
        .zip(halves)
        .map(
            |((((param, grad), exp_avg), exp_avg_sq), half)| LambTensor {
                param,
                grad,
                exp_avg,
                exp_avg_sq,
                half,
            },
        )
        .collect();
    Ok(py.detach(|| lamb::step(tensors, &hyper))?)
}

/// `sum ||g||^2` over a list of gradients, in float64 (for the global gradient clipping).
#[pyfunction]
#[pyo3(signature = (grads, dtype = "float32"))]
fn lamb_grad_sq_norm<'py>(
    py: Python<'py>,
    grads: &Bound<'py, PyAny>,
    dtype: &str,
) -> PyResult<f64> {
    let dtype = dtype_arg(dtype)?;
    let half_want = "uint16 (the bits of bfloat16 / float16)";
    let (g32, g16) = match dtype {
        Dtype::F32 => (readonly_list::<f32>(grads, "grads", "float32")?, Vec::new()),
        _ => (Vec::new(), readonly_list::<u16>(grads, "grads", half_want)?),
    };
    let gs32 = slices(&g32, "grads")?;
    let gs16 = slices(&g16, "grads")?;
    let grads: Vec<Grad<'_>> = match dtype {
        Dtype::F32 => gs32.into_iter().map(Grad::F32).collect(),
        Dtype::Bf16 => gs16
            .into_iter()
            .map(|s| Grad::Bf16(s.reinterpret_cast::<bf16>()))
            .collect(),
        Dtype::F16 => gs16
            .into_iter()
            .map(|s| Grad::F16(s.reinterpret_cast::<f16>()))
            .collect(),
    };
    Ok(py.detach(|| lamb::grad_sq_norm(&grads)))
}

/// Which copy of the LAMB kernels this CPU runs (`"avx512"`, `"avx2"` or `"portable"`).
#[pyfunction]
fn lamb_kernel_isa() -> &'static str {
    lamb::kernel_isa()
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(lamb_step, m)?)?;
    m.add_function(wrap_pyfunction!(lamb_grad_sq_norm, m)?)?;
    m.add_function(wrap_pyfunction!(lamb_kernel_isa, m)?)?;
    Ok(())
}
