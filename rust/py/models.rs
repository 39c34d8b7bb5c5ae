//! Python bindings for `crate::models`: argument conversion, GIL release and error mapping only.

use numpy::{
    PyReadonlyArray1, PyReadonlyArray2, PyReadwriteArray2, PyReadwriteArrayDyn,
    PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use super::quant::{in_features, parse_route};
use super::{c_slice, c_slice_mut, size_arg};
use crate::attention::Rotary;
use crate::models::{LlamaStack, Proj, StackBlock};

/// A projection as Python hands it over: `(qweight, scales, zeros, bias, bits, group_size,
/// route)`.
type PyProj<'py> = (
    PyReadonlyArray2<'py, u8>,
    PyReadonlyArray2<'py, f32>,
    PyReadonlyArray2<'py, f32>,
    Option<PyReadonlyArray1<'py, f32>>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    String,
);

type PyBlock<'py> = (
    PyReadonlyArray1<'py, f32>,
    PyProj<'py>,
    PyProj<'py>,
    PyReadonlyArray1<'py, f32>,
    PyProj<'py>,
    PyProj<'py>,
);

fn proj(p: &PyProj<'_>, name: &str) -> PyResult<Proj> {
    let (qweight, scales, zeros, bias, bits, group_size, route) = p;
    let bits = size_arg(bits, "bits")?;
    let bits = u32::try_from(bits)
        .map_err(|_| PyValueError::new_err(format!("{name}: bits must be 4 or 8, got {bits}")))?;
    let shape = qweight.shape();
    Ok(Proj {
        qweight: c_slice(qweight, name)?.to_vec(),
        scales: c_slice(scales, name)?.to_vec(),
        zeros: c_slice(zeros, name)?.to_vec(),
        bias: bias
            .as_ref()
            .map(|b| c_slice(b, name).map(|s| s.to_vec()))
            .transpose()?,
        out_features: shape[0],
        in_features: in_features(bits, shape[1])?,
        bits,
        group_size: size_arg(group_size, "group_size")?,
        route: parse_route(route, bits)?,
    })
}

/// The blocks of a Llama-architecture model with quantized projections, run one decode step per
/// call (`slimforge.models.llama`'s fast decode path).
#[pyclass(module = "slimforge._native", frozen)]
struct LlamaStackDecoder {
    inner: LlamaStack,
}

#[pymethods]
impl LlamaStackDecoder {
    /// `blocks`: per block `(attn_norm, qkv, o, ffn_norm, gate_up, down)`, each projection
    /// `(qweight, scales, zeros, bias | None, bits, group_size, route)` (q/k/v and gate/up
    /// stacked along the rows). The buffers are copied.
    #[new]
    #[pyo3(signature = (blocks, final_norm, heads_q, heads_kv, head_dim, eps))]
    fn new(
        blocks: Vec<PyBlock<'_>>,
        final_norm: PyReadonlyArray1<'_, f32>,
        heads_q: &Bound<'_, PyAny>,
        heads_kv: &Bound<'_, PyAny>,
        head_dim: &Bound<'_, PyAny>,
        eps: f64,
    ) -> PyResult<Self> {
        let mut out = Vec::with_capacity(blocks.len());
        for (i, (n1, qkv, o, n2, gu, down)) in blocks.iter().enumerate() {
            out.push(StackBlock {
                attn_norm: c_slice(n1, "attn_norm")?.to_vec(),
                qkv: proj(qkv, &format!("block {i} qkv"))?,
                o: proj(o, &format!("block {i} o"))?,
                ffn_norm: c_slice(n2, "ffn_norm")?.to_vec(),
                gate_up: proj(gu, &format!("block {i} gate_up"))?,
                down: proj(down, &format!("block {i} down"))?,
            });
        }
        let inner = LlamaStack::new(
            out,
            c_slice(&final_norm, "final_norm")?.to_vec(),
            size_arg(heads_q, "heads_q")?,
            size_arg(heads_kv, "heads_kv")?,
            size_arg(head_dim, "head_dim")?,
            eps as f32,
        )?;
        Ok(Self { inner })
    }

    #[getter]
    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }

    /// One decode step in place: `x` `(batch, hidden)` float32 embeddings of the new tokens
    /// become the final-normed hidden states; `k_cache` / `v_cache` `(layers, batch, heads_kv,
    /// capacity, head_dim)` gain each sequence's key/value at `lengths[b]` (not advanced);
    /// `cos` / `sin`: rotary tables `(positions, head_dim / 2)` or None.
    #[pyo3(signature = (x, k_cache, v_cache, lengths, cos, sin, softmax_scale))]
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        py: Python<'_>,
        mut x: PyReadwriteArray2<'_, f32>,
        mut k_cache: PyReadwriteArrayDyn<'_, f32>,
        mut v_cache: PyReadwriteArrayDyn<'_, f32>,
        lengths: PyReadonlyArray1<'_, i64>,
        cos: Option<PyReadonlyArray2<'_, f32>>,
        sin: Option<PyReadonlyArray2<'_, f32>>,
        softmax_scale: f64,
    ) -> PyResult<()> {
        let ks = k_cache.shape().to_vec();
        let batch = lengths.shape()[0];
        if ks.len() != 5 || v_cache.shape() != ks.as_slice() {
            return Err(PyValueError::new_err(format!(
                "k_cache {ks:?} and v_cache {:?} must have one 5-D shape (layers, batch, \
                 heads_kv, capacity, head_dim)",
                v_cache.shape()
            )));
        }
        if ks[0] != self.inner.num_layers() || ks[1] != batch || x.shape()[0] != batch {
            return Err(PyValueError::new_err(format!(
                "the caches {ks:?} must hold {} layers and x {:?} / lengths one row per sequence \
                 ({batch})",
                self.inner.num_layers(),
                x.shape()
            )));
        }
        if cos.is_some() != sin.is_some() {
            return Err(PyValueError::new_err("cos and sin go together"));
        }
        let capacity = ks[3];
        let ls = c_slice(&lengths, "lengths")?;
        let cs = cos.as_ref().map(|c| c_slice(c, "cos")).transpose()?;
        let ss = sin.as_ref().map(|s| c_slice(s, "sin")).transpose()?;
        let rotary = cs.zip(ss).map(|(cos, sin)| Rotary { cos, sin });
        let xs = c_slice_mut(&mut x, "x")?;
        let kc = c_slice_mut(&mut k_cache, "k_cache")?;
        let vc = c_slice_mut(&mut v_cache, "v_cache")?;
        let inner = &self.inner;
        py.detach(|| inner.step(xs, kc, vc, ls, capacity, rotary, softmax_scale as f32))?;
        Ok(())
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<LlamaStackDecoder>()?;
    Ok(())
}
