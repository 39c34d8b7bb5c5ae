//! Python bindings for `crate::dedup`: argument conversion, GIL release and error mapping.

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::Mutex;

use numpy::ndarray::Array2;
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2,
    PyUntypedArray, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyString, PyTuple};
use rayon::prelude::*;

use crate::dedup::index_file::{self, IndexHeader, Keys, KeysRef};
use crate::dedup::jsonl;
use crate::dedup::{self, lsh, minhash, MinHasher, Permutations, Shingler, Tokenizer};
use crate::error::{Error, Result};

/// One input document as borrowed from Python.
enum RawDoc<'a> {
    Str(&'a str),
    Bytes(&'a [u8]),
    Owned(String),
}

fn replace_errors(errors: &str) -> PyResult<bool> {
    match errors {
        "strict" => Ok(false),
        "replace" => Ok(true),
        other => Err(PyValueError::new_err(format!(
            "errors must be \"strict\" or \"replace\", got {other:?}"
        ))),
    }
}

/// The items of a list or tuple, each kept alive by its own reference while the GIL is released.
fn items<'py>(texts: &Bound<'py, PyAny>) -> PyResult<Vec<Bound<'py, PyAny>>> {
    if let Ok(list) = texts.cast::<PyList>() {
        return Ok(list.iter().collect());
    }
    if let Ok(tuple) = texts.cast::<PyTuple>() {
        return Ok(tuple.iter().collect());
    }
    Err(PyTypeError::new_err(format!(
        "texts must be a list or tuple of str or bytes, got {}",
        texts.get_type().name()?
    )))
}

/// Borrows the UTF-8 of every str (no copy for ASCII strings) and the buffer of every bytes.
fn raw_docs<'a>(items: &'a [Bound<'_, PyAny>], replace: bool) -> PyResult<Vec<RawDoc<'a>>> {
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            if let Ok(s) = item.cast::<PyString>() {
                match s.to_str() {
                    Ok(s) => Ok(RawDoc::Str(s)),
                    Err(_) if replace => Ok(RawDoc::Owned(s.to_string_lossy().into_owned())),
                    Err(e) => Err(PyValueError::new_err(format!(
                        "document {i} cannot be encoded as UTF-8 ({e}); pass errors=\"replace\" to substitute U+FFFD"
                    ))),
                }
            } else if let Ok(b) = item.cast::<PyBytes>() {
                Ok(RawDoc::Bytes(b.as_bytes()))
            } else {
                Err(PyTypeError::new_err(format!(
                    "document {i} must be str or bytes, got {}",
                    item.get_type().name()?
                )))
            }
        })
        .collect()
}

/// UTF-8 views of the documents (decoding bytes in parallel); runs without the GIL.
fn decode<'a>(raw: &'a [RawDoc<'a>], replace: bool) -> Result<Vec<Cow<'a, str>>> {
    crate::parallel::install(|| {
        raw.par_iter()
            .enumerate()
            .map(|(i, d)| match d {
                RawDoc::Str(s) => Ok(Cow::Borrowed(*s)),
                RawDoc::Owned(s) => Ok(Cow::Borrowed(s.as_str())),
                RawDoc::Bytes(b) if replace => Ok(String::from_utf8_lossy(b)),
                RawDoc::Bytes(b) => std::str::from_utf8(b).map(Cow::Borrowed).map_err(|e| {
                    Error::value(format!(
                        "document {i} is not valid UTF-8 ({e}); pass errors=\"replace\" to substitute U+FFFD"
                    ))
                }),
            })
            .collect()
    })
}

fn dtype_and_shape(obj: &Bound<'_, PyAny>) -> String {
    match obj.cast::<PyUntypedArray>() {
        Ok(a) => format!("dtype {} and shape {:?}", a.dtype(), a.shape()),
        Err(_) => obj
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default(),
    }
}

/// A C-contiguous 2-D array of `T`; never copies (so a read-only memmap works).
fn matrix<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    dtype: &str,
    cols: Option<usize>,
) -> PyResult<PyReadonlyArray2<'py, T>> {
    let arr = obj.cast::<PyArray2<T>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a 2-D numpy array of {dtype}, got {}",
            dtype_and_shape(obj)
        ))
    })?;
    if let Some(c) = cols {
        if arr.shape()[1] != c {
            return Err(PyValueError::new_err(format!(
                "{name} must have shape (m, {c}), got {:?}",
                arr.shape()
            )));
        }
    }
    let ro = arr
        .try_readonly()
        .map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
    if !ro.is_c_contiguous() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be C-contiguous (use numpy.ascontiguousarray)"
        )));
    }
    Ok(ro)
}

fn as_slice<'a, T: numpy::Element>(a: &'a PyReadonlyArray2<'_, T>) -> PyResult<&'a [T]> {
    a.as_slice()
        .map_err(|e| PyTypeError::new_err(e.to_string()))
}

/// The rows of a C-contiguous `(m, 2)` int64 array as pairs, borrowed: never copied.
fn pairs_of<'a>(a: &'a PyReadonlyArray2<'_, i64>) -> PyResult<&'a [[i64; 2]]> {
    let (pairs, rest) = as_slice(a)?.as_chunks::<2>();
    debug_assert!(rest.is_empty());
    Ok(pairs)
}

fn to_2d<T: numpy::Element>(
    py: Python<'_>,
    v: Vec<T>,
    cols: usize,
) -> PyResult<Bound<'_, PyArray2<T>>> {
    let rows = v.len().checked_div(cols).unwrap_or(0);
    let arr = Array2::from_shape_vec((rows, cols), v).map_err(|e| Error::runtime(e.to_string()))?;
    Ok(arr.into_pyarray(py))
}

fn hasher(num_perm: usize, ngram: usize, tokenizer: &str, seed: u64) -> Result<MinHasher> {
    let shingler = Shingler::new(ngram, Tokenizer::parse(tokenizer)?, seed)?;
    Ok(MinHasher::new(shingler, Permutations::new(num_perm, seed)?))
}

/// MinHash signatures `(n, num_perm)` uint32 of a list of str/bytes documents.
#[pyfunction]
#[pyo3(signature = (texts, num_perm=128, ngram=5, tokenizer="word", seed=1, errors="strict"))]
fn signatures<'py>(
    py: Python<'py>,
    texts: &Bound<'py, PyAny>,
    num_perm: usize,
    ngram: usize,
    tokenizer: &str,
    seed: u64,
    errors: &str,
) -> PyResult<Bound<'py, PyArray2<u32>>> {
    let replace = replace_errors(errors)?;
    let h = hasher(num_perm, ngram, tokenizer, seed)?;
    let items = items(texts)?;
    let raw = raw_docs(&items, replace)?;
    let out = py.detach(|| decode(&raw, replace).and_then(|docs| h.signatures(&docs)))?;
    to_2d(py, out, num_perm)
}

/// Hash of each document's normalised text `(n,)` uint64, for the exact-duplicate pass.
#[pyfunction]
#[pyo3(signature = (texts, errors="strict"))]
fn exact_hashes<'py>(
    py: Python<'py>,
    texts: &Bound<'py, PyAny>,
    errors: &str,
) -> PyResult<Bound<'py, PyArray1<u64>>> {
    let replace = replace_errors(errors)?;
    let items = items(texts)?;
    let raw = raw_docs(&items, replace)?;
    let out = py.detach(|| decode(&raw, replace).map(|docs| dedup::exact_hashes(&docs)))?;
    Ok(out.into_pyarray(py))
}

/// Band hashes `(n, bands)` uint64 of signatures `(n, num_perm)` uint32.
#[pyfunction]
fn band_hashes<'py>(
    py: Python<'py>,
    signatures: &Bound<'py, PyAny>,
    bands: usize,
    rows: usize,
) -> PyResult<Bound<'py, PyArray2<u64>>> {
    let sigs = matrix::<u32>(signatures, "signatures", "uint32", None)?;
    let k = sigs.shape()[1];
    let flat = as_slice(&sigs)?;
    let out = py.detach(|| lsh::band_hashes(flat, k, bands, rows))?;
    to_2d(py, out, bands)
}

/// Unique sorted pairs `(m, 2)` int64, `i < j`, of rows sharing a band hash.
#[pyfunction]
#[pyo3(signature = (band_hashes, max_bucket=None))]
fn candidate_pairs<'py>(
    py: Python<'py>,
    band_hashes: &Bound<'py, PyAny>,
    max_bucket: Option<usize>,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let bh = matrix::<u64>(band_hashes, "band_hashes", "uint64", None)?;
    let bands = bh.shape()[1];
    let flat = as_slice(&bh)?;
    if bands == 0 {
        return Err(PyValueError::new_err(
            "band_hashes must have at least one column",
        ));
    }
    let out = py.detach(|| lsh::candidate_pairs(flat, bands, max_bucket.unwrap_or(usize::MAX)))?;
    to_2d(py, out.into_flattened(), 2)
}

/// The buckets of a band-hash matrix `(n, bands)` uint64, handed out in pieces of bounded work
/// (`lsh::Buckets`): small buckets as their pairs, large ones as their rows.
#[pyclass(module = "slimforge._native")]
struct CandidateBuckets {
    inner: Mutex<lsh::Buckets>,
}

/// One piece: pairs `(m, 2)` int64 of the small buckets (unique, sorted, `i < j`), rows `(k,)`
/// int64 of the large buckets and their offsets `(b + 1,)` int64.
type PyPiece<'py> = (
    Bound<'py, PyArray2<i64>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray1<i64>>,
);

impl CandidateBuckets {
    fn get(&self) -> Result<std::sync::MutexGuard<'_, lsh::Buckets>> {
        self.inner
            .lock()
            .map_err(|_| Error::runtime("buckets were poisoned by an earlier panic"))
    }
}

#[pymethods]
impl CandidateBuckets {
    #[new]
    fn new(py: Python<'_>, band_hashes: &Bound<'_, PyAny>, max_bucket: usize) -> PyResult<Self> {
        let bh = matrix::<u64>(band_hashes, "band_hashes", "uint64", None)?;
        let bands = bh.shape()[1];
        if bands == 0 {
            return Err(PyValueError::new_err(
                "band_hashes must have at least one column",
            ));
        }
        let flat = as_slice(&bh)?;
        let buckets = py.detach(|| lsh::Buckets::new(flat, bands, max_bucket))?;
        Ok(Self {
            inner: Mutex::new(buckets),
        })
    }

    /// Number of buckets (runs of two or more rows sharing a band hash), all bands.
    fn __len__(&self) -> PyResult<usize> {
        Ok(self.get()?.len())
    }

    /// Rows `(r,)` int64 that share a band hash with another row: sorted, unique.
    fn rows<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<i64>>> {
        let rows = py.detach(|| self.get().map(|b| b.rows()))?;
        Ok(rows
            .into_iter()
            .map(i64::from)
            .collect::<Vec<_>>()
            .into_pyarray(py))
    }

    /// Size of the largest bucket (0 without buckets).
    fn largest(&self) -> PyResult<usize> {
        Ok(self.get()?.largest())
    }

    /// Work not handed out yet: pairs of the small buckets plus rows of the large ones.
    fn units_left(&self) -> PyResult<u64> {
        Ok(self.get()?.units_left())
    }

    /// The next buckets that fit in `max_units` of work (at least one), or None at the end.
    fn next_piece<'py>(&self, py: Python<'py>, max_units: u64) -> PyResult<Option<PyPiece<'py>>> {
        let piece = py.detach(|| self.get()?.next_piece(max_units.max(1)))?;
        let Some(p) = piece else {
            return Ok(None);
        };
        Ok(Some((
            to_2d(py, p.pairs.into_flattened(), 2)?,
            p.members.into_pyarray(py),
            p.offsets.into_pyarray(py),
        )))
    }
}

/// Estimated Jaccard `(m,)` float64 of each pair of signature rows.
#[pyfunction]
fn estimate_jaccard_pairs<'py>(
    py: Python<'py>,
    signatures: &Bound<'py, PyAny>,
    pairs: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let sigs = matrix::<u32>(signatures, "signatures", "uint32", None)?;
    let p = matrix::<i64>(pairs, "pairs", "int64", Some(2))?;
    let k = sigs.shape()[1];
    if k == 0 {
        return Err(PyValueError::new_err(
            "signatures must have at least one column",
        ));
    }
    let (flat, pairs) = (as_slice(&sigs)?, pairs_of(&p)?);
    let out = py.detach(|| minhash::estimate_jaccard_pairs(flat, k, &pairs))?;
    Ok(out.into_pyarray(py))
}

/// Exact Jaccard `(m,)` float64 of the shingle sets of each pair of documents.
#[pyfunction]
#[pyo3(signature = (texts, pairs, ngram=5, tokenizer="word", errors="strict"))]
fn exact_jaccard_pairs<'py>(
    py: Python<'py>,
    texts: &Bound<'py, PyAny>,
    pairs: &Bound<'py, PyAny>,
    ngram: usize,
    tokenizer: &str,
    errors: &str,
) -> PyResult<Bound<'py, PyArray1<f64>>> {
    let replace = replace_errors(errors)?;
    let shingler = Shingler::new(ngram, Tokenizer::parse(tokenizer)?, 0)?;
    let p = matrix::<i64>(pairs, "pairs", "int64", Some(2))?;
    let pairs = pairs_of(&p)?;
    let items = items(texts)?;
    minhash::check_pairs(&pairs, items.len())?;
    // Every document is borrowed, but only those named by a pair are shingled.
    let raw = raw_docs(&items, replace)?;
    let out = py.detach(|| {
        decode(&raw, replace).and_then(|docs| dedup::exact_jaccard_pairs(&docs, &pairs, &shingler))
    })?;
    Ok(out.into_pyarray(py))
}

/// Cluster id `(n,)` int64 of each of `n` documents: the smallest index in its component.
#[pyfunction]
fn connected_components<'py>(
    py: Python<'py>,
    n: usize,
    pairs: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyArray1<i64>>> {
    let p = matrix::<i64>(pairs, "pairs", "int64", Some(2))?;
    let pairs = pairs_of(&p)?;
    let out = py.detach(|| dedup::connected_components(n, &pairs))?;
    Ok(out.into_pyarray(py))
}

/// `(bands, rows)` minimising the weighted false-positive + false-negative integrals.
#[pyfunction]
#[pyo3(signature = (threshold, num_perm=128, fp_weight=0.05, fn_weight=0.95))]
fn optimal_bands(
    py: Python<'_>,
    threshold: f64,
    num_perm: usize,
    fp_weight: f64,
    fn_weight: f64,
) -> PyResult<(usize, usize)> {
    // Without the GIL, but checking for Ctrl-C (or any pending signal handler's exception)
    // as it goes.
    let mut interrupted: Option<PyErr> = None;
    let found = py.detach(|| {
        lsh::optimal_bands_with(threshold, num_perm, fp_weight, fn_weight, &mut || {
            match Python::attach(|py| py.check_signals()) {
                Ok(()) => false,
                Err(e) => {
                    interrupted = Some(e);
                    true
                }
            }
        })
    })?;
    match (found, interrupted) {
        (_, Some(e)) => Err(e),
        (Some(bands_rows), None) => Ok(bands_rows),
        (None, None) => Err(Error::runtime("band search stopped").into()),
    }
}

/// xxh3_64 of a bytes object with a seed (the base hash of the scheme).
#[pyfunction]
#[pyo3(signature = (data, seed=0))]
fn xxh3_64(data: &Bound<'_, PyBytes>, seed: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(data.as_bytes(), seed)
}

/// Name of the permutation kernel this CPU runs ("avx512f", "avx2" or "portable").
#[pyfunction]
fn minhash_kernel() -> &'static str {
    minhash::kernel_name()
}

/// Writes an LSH index file atomically; `keys` is an int64 array `(n,)` or a list of str.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn lsh_index_save<'py>(
    py: Python<'py>,
    path: PathBuf,
    threshold: f64,
    bands: usize,
    rows: usize,
    signatures: &Bound<'py, PyAny>,
    keys: &Bound<'py, PyAny>,
) -> PyResult<()> {
    let sigs = matrix::<u32>(signatures, "signatures", "uint32", None)?;
    let num_perm = sigs.shape()[1];
    lsh::check_threshold(threshold)?;
    lsh::check_banding(bands, rows, num_perm)?;
    let flat = as_slice(&sigs)?;
    let header = IndexHeader {
        threshold,
        num_perm,
        bands,
        rows,
    };
    if let Ok(arr) = keys.cast::<PyArray1<i64>>() {
        let ro = arr
            .try_readonly()
            .map_err(|e| PyValueError::new_err(format!("keys: {e}")))?;
        let k = ro
            .as_slice()
            .map_err(|e| PyTypeError::new_err(format!("keys: {e}")))?;
        return Ok(py.detach(|| index_file::write_index(&path, header, flat, KeysRef::Int(k)))?);
    }
    let key_items = items(keys).map_err(|_| {
        PyTypeError::new_err(format!(
            "keys must be an int64 array or a list of str, got {}",
            dtype_and_shape(keys)
        ))
    })?;
    let strs: Vec<&str> = key_items
        .iter()
        .enumerate()
        .map(|(i, k)| {
            k.cast::<PyString>()
                .map_err(|_| PyTypeError::new_err(format!("key {i} must be str")))
                .and_then(|s| s.to_str())
        })
        .collect::<PyResult<_>>()?;
    Ok(py.detach(|| index_file::write_index(&path, header, flat, KeysRef::Str(&strs)))?)
}

/// Reads an LSH index file: `(threshold, num_perm, bands, rows, signatures, keys)`.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn lsh_index_load<'py>(
    py: Python<'py>,
    path: PathBuf,
) -> PyResult<(
    f64,
    usize,
    usize,
    usize,
    Bound<'py, PyArray2<u32>>,
    Bound<'py, PyAny>,
)> {
    let f = py.detach(|| index_file::read_index(&path))?;
    let h = f.header;
    let sigs = to_2d(py, f.signatures, h.num_perm)?;
    let keys = match f.keys {
        Keys::Int(v) => v.into_pyarray(py).into_any(),
        Keys::Str(v) => PyList::new(py, v)?.into_any(),
    };
    Ok((h.threshold, h.num_perm, h.bands, h.rows, sigs, keys))
}

fn lock<'a, T>(
    m: &'a Mutex<Option<T>>,
    what: &str,
) -> Result<std::sync::MutexGuard<'a, Option<T>>> {
    m.lock()
        .map_err(|_| Error::runtime(format!("{what} was poisoned by an earlier panic")))
}

/// Reads a JSONL file (gzip when named `*.gz`) in batches; see `slimforge.io.iter_jsonl_batches`.
#[pyclass(module = "slimforge._native")]
struct JsonlBatchReader {
    inner: Mutex<Option<jsonl::JsonlReader>>,
    batch_size: usize,
    stop_at_reject: bool,
    with_raw: bool,
}

/// One batch: texts (UTF-8 bytes), 1-based line numbers, rejects, text bytes, empty texts,
/// raw lines (or None), and the line that stopped reading (too long) with why (or None).
type PyBatch<'py> = (
    Bound<'py, PyList>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyList>,
    u64,
    u64,
    Option<Bound<'py, PyList>>,
    Option<(u64, String)>,
);

#[pymethods]
impl JsonlBatchReader {
    #[new]
    #[pyo3(signature = (
        path, field="text", batch_size=8192, stop_at_reject=false, with_raw=false,
        max_line_bytes=jsonl::DEFAULT_MAX_LINE_BYTES
    ))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        field: &str,
        batch_size: usize,
        stop_at_reject: bool,
        with_raw: bool,
        max_line_bytes: usize,
    ) -> PyResult<Self> {
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be >= 1, got 0"));
        }
        let reader = py.detach(|| {
            jsonl::JsonlReader::open(&path, field)?
                .with_max_line_bytes(max_line_bytes)
                .map(|r| r.with_raw(with_raw))
        })?;
        Ok(Self {
            inner: Mutex::new(Some(reader)),
            batch_size,
            stop_at_reject,
            with_raw,
        })
    }

    /// The next batch `(texts, lines, rejects, text_bytes, empty, raws, stopped)`, or None at
    /// end of file. `rejects` is a list of `(line, reason, raw)`; `raws` is None unless
    /// `with_raw`; `stopped` is `(line, reason)` for a line over `max_line_bytes`, after which
    /// nothing more is read.
    fn next_batch<'py>(&self, py: Python<'py>) -> PyResult<Option<PyBatch<'py>>> {
        let batch = py.detach(|| -> Result<Option<jsonl::Batch>> {
            let mut guard = lock(&self.inner, "reader")?;
            let Some(reader) = guard.as_mut() else {
                return Ok(None);
            };
            let b = reader.next_batch(self.batch_size, self.stop_at_reject)?;
            if b.is_none() {
                *guard = None;
            }
            Ok(b)
        })?;
        let Some(b) = batch else {
            return Ok(None);
        };
        let texts = PyList::new(py, b.texts.iter().map(|t| PyBytes::new(py, t.as_bytes())))?;
        let rejects = PyList::new(
            py,
            b.rejects
                .iter()
                .map(|r| (r.line, r.reason.as_str(), PyBytes::new(py, &r.raw))),
        )?;
        let raws = if self.with_raw {
            Some(PyList::new(py, b.raws.iter().map(|r| PyBytes::new(py, r)))?)
        } else {
            None
        };
        Ok(Some((
            texts,
            b.lines.into_pyarray(py),
            rejects,
            b.text_bytes,
            b.empty,
            raws,
            b.stopped,
        )))
    }
}

/// Pass 3 of the file deduplicator: copies kept JSONL lines and writes the clusters TSV.
#[pyclass(module = "slimforge._native")]
struct JsonlKeptWriter {
    inner: Mutex<Option<jsonl::KeptWriter>>,
}

#[pymethods]
impl JsonlKeptWriter {
    #[new]
    fn new(py: Python<'_>, output: PathBuf, gzip: bool, clusters: PathBuf) -> PyResult<Self> {
        let w = py.detach(|| jsonl::KeptWriter::create(&output, gzip, &clusters))?;
        Ok(Self {
            inner: Mutex::new(Some(w)),
        })
    }

    /// Starts copying from `path`, named `display` in the clusters file (written as given),
    /// reading lines of up to `max_line_bytes` (a longer one is a ValueError `path:line: ...`).
    #[pyo3(signature = (path, field, display, max_line_bytes=jsonl::DEFAULT_MAX_LINE_BYTES))]
    fn open_input(
        &self,
        py: Python<'_>,
        path: PathBuf,
        field: &str,
        display: &str,
        max_line_bytes: usize,
    ) -> PyResult<()> {
        Ok(py.detach(|| -> Result<()> {
            let mut g = lock(&self.inner, "writer")?;
            g.as_mut()
                .ok_or_else(|| Error::value("writer is finished"))?
                .open_input(&path, field, display, max_line_bytes)
        })?)
    }

    /// Handles up to `max_lines` more lines; the documents seen, or None at end of the input.
    /// `keep` (bool) and `cluster` (int64) cover all documents of all inputs.
    #[pyo3(signature = (keep, cluster, max_lines=65536))]
    fn step(
        &self,
        py: Python<'_>,
        keep: PyReadonlyArray1<'_, bool>,
        cluster: PyReadonlyArray1<'_, i64>,
        max_lines: usize,
    ) -> PyResult<Option<usize>> {
        let keep = keep
            .as_slice()
            .map_err(|e| PyTypeError::new_err(format!("keep: {e}")))?;
        let cluster = cluster
            .as_slice()
            .map_err(|e| PyTypeError::new_err(format!("cluster: {e}")))?;
        Ok(py.detach(|| -> Result<Option<usize>> {
            let mut g = lock(&self.inner, "writer")?;
            g.as_mut()
                .ok_or_else(|| Error::value("writer is finished"))?
                .step(keep, cluster, max_lines.max(1))
        })?)
    }

    /// Flushes both files; returns the number of documents written to the clusters file.
    fn finish(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(py.detach(|| -> Result<usize> {
            let w = lock(&self.inner, "writer")?
                .take()
                .ok_or_else(|| Error::value("writer is finished"))?;
            w.finish()
        })?)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<JsonlBatchReader>()?;
    m.add_class::<JsonlKeptWriter>()?;
    m.add_class::<CandidateBuckets>()?;
    m.add_function(wrap_pyfunction!(signatures, m)?)?;
    m.add_function(wrap_pyfunction!(exact_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(band_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(candidate_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(estimate_jaccard_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(exact_jaccard_pairs, m)?)?;
    m.add_function(wrap_pyfunction!(connected_components, m)?)?;
    m.add_function(wrap_pyfunction!(optimal_bands, m)?)?;
    m.add_function(wrap_pyfunction!(xxh3_64, m)?)?;
    m.add_function(wrap_pyfunction!(minhash_kernel, m)?)?;
    m.add_function(wrap_pyfunction!(lsh_index_save, m)?)?;
    m.add_function(wrap_pyfunction!(lsh_index_load, m)?)?;
    Ok(())
}
