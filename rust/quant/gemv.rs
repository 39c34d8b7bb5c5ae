//! Fused dequantize-and-multiply `y = x @ dequant(W).T (+ bias)` for decode-sized batches.
//!
//! Two routes, both reading the documented packed layout directly (no repacking):
//! - `Route::Float`: codes are turned into `f32` weights in registers (`(q - z) * s` as one FMA)
//!   and multiplied with the `f32` activations; error is `f32` rounding only.
//! - `Route::Int8Activations`: activations are quantized to int8 per block of 32 (absmax / 127)
//!   and multiplied with the unsigned codes by integer dot products (AVX-512 VNNI `vpdpbusd`);
//!   per-group activation sums carry the zero points. Extra error per output is at most
//!   `sum_k |w_k| * absmax(block(k)) / 254`.
//!
//! INT4 bytes hold element `2j` (low nibble) and `2j + 1` (high nibble); the SIMD kernels split a
//! register into its low and high nibbles and pair them with activations that were reordered once
//! per call into `[even elements][odd elements]` per chunk, so the weights stay in place.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::{check_len, groups_per_row, qmax};
use crate::error::{Error, Result};

/// A packed quantized weight `(out_features, in_features)` borrowed from the caller.
#[derive(Clone, Copy, Debug)]
pub struct QuantWeight<'a> {
    /// `(out, in)` codes for 8 bits, `(out, in / 2)` nibble-packed codes for 4 bits.
    pub qweight: &'a [u8],
    /// `(out, in / group_size)`.
    pub scales: &'a [f32],
    /// `(out, in / group_size)`, integer-valued.
    pub zeros: &'a [f32],
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u32,
    pub group_size: usize,
}

impl QuantWeight<'_> {
    /// Checks shapes, bits and group size; returns the number of groups per row.
    ///
    /// Parameter values are not scanned here (that would cost a pass over them per call): they
    /// are checked where the weight is built (`affine::quantize`, `QuantLinear.from_quantized`).
    pub fn validate(&self) -> Result<usize> {
        qmax(self.bits)?;
        let ng = groups_per_row(self.in_features, self.group_size)?;
        let row_bytes = self.row_bytes()?;
        check_len("qweight", self.qweight.len(), self.out_features, row_bytes)?;
        check_len("scales", self.scales.len(), self.out_features, ng)?;
        check_len("zeros", self.zeros.len(), self.out_features, ng)?;
        Ok(ng)
    }

    fn row_bytes(&self) -> Result<usize> {
        if self.bits == 8 {
            return Ok(self.in_features);
        }
        if !self.in_features.is_multiple_of(2) || !self.group_size.is_multiple_of(2) {
            return Err(Error::value(format!(
                "INT4 needs an even in_features and group_size, got {} and {}",
                self.in_features, self.group_size
            )));
        }
        Ok(self.in_features / 2)
    }
}

/// How activations meet the quantized weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Dequantize codes to `f32` in registers and FMA with `f32` activations.
    Float,
    /// Quantize activations to int8 per 32-block and use integer dot products.
    Int8Activations,
}

/// The instruction set a kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    Avx2Fma,
    Avx512,
    Avx512Vnni,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2Fma => "avx2+fma",
            Isa::Avx512 => "avx512f+bw",
            Isa::Avx512Vnni => "avx512f+bw+vnni",
        }
    }
}

/// Best instruction set of this CPU (detected once).
pub fn detect_isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let avx512 =
                is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw");
            if avx512 && is_x86_feature_detected!("avx512vnni") {
                return Isa::Avx512Vnni;
            }
            if avx512 {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2Fma;
            }
        }
        Isa::Portable
    })
}

/// The route `"auto"` picks: the faster one measured (docs/quant.md), i.e. the int8 route except
/// for INT8 weights on AVX-512 without VNNI, where the float kernel beats the AVX2 integer one.
pub fn default_route(bits: u32) -> Route {
    if bits == 8 && detect_isa() == Isa::Avx512 {
        Route::Float
    } else {
        Route::Int8Activations
    }
}

/// `1.5 * 2^23`: `(x + M) - M` is `x` rounded to the nearest integer, ties to even, for `|x| < 2^22`.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// Activation block for the int8 route (one scale per 32 consecutive inputs).
pub const ACT_BLOCK: usize = 32;
/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 16;
/// Below this many multiply-adds a call stays on the calling thread (a pool hop costs more).
const PARALLEL_MIN_MACS: usize = 1 << 18;
/// Tokens that share one pass over a weight row (held in registers).
pub(crate) const TOKEN_TILE: usize = 4;

/// Activations prepared once per call for the float route.
pub(crate) struct FloatActs {
    /// `(m, stride)`; INT4 SIMD kernels get `[h even][h odd]` per chunk of `2h` inputs.
    pub x: Vec<f32>,
    pub stride: usize,
}

/// Activations prepared once per call for the int8 route.
pub(crate) struct IntActs {
    /// `(m, stride)` int8 codes; INT4 SIMD kernels get `[64 even][64 odd]` per 128 inputs.
    pub xq: Vec<i8>,
    pub stride: usize,
    /// `(m, in / 32)` block scales.
    pub xs: Vec<f32>,
    /// `(m, lane_stride)` block scale of each 32-bit lane of a 64-byte weight chunk (SIMD only).
    pub lane_scales: Vec<f32>,
    pub lane_stride: usize,
    /// `(m, groups)`: `sum over blocks in group of xs * sum(xq)`, multiplied by the zero points.
    pub group_sums: Vec<f32>,
}

/// Reorders each chunk of `2h` inputs into `[h even][h odd]` (`h = 0`: unchanged).
fn split_even_odd<T: Copy + Default>(row: &[T], h: usize, padded: usize) -> Vec<T> {
    let mut out = vec![T::default(); padded];
    if h == 0 {
        out[..row.len()].copy_from_slice(row);
        return out;
    }
    for (c, chunk) in row.chunks(2 * h).enumerate() {
        let base = c * 2 * h;
        for (i, &v) in chunk.iter().enumerate() {
            out[base + (i % 2) * h + i / 2] = v;
        }
    }
    out
}

fn prepare_float(x: &[f32], m: usize, k: usize, half: usize) -> FloatActs {
    let stride = if half == 0 {
        k
    } else {
        k.div_ceil(2 * half) * 2 * half
    };
    let mut out = Vec::with_capacity(m * stride);
    for row in x.chunks_exact(k).take(m) {
        out.extend(split_even_odd(row, half, stride));
    }
    FloatActs { x: out, stride }
}

/// `chunk_elems`: inputs per weight chunk (a 64-byte chunk: 128 for INT4, 64 for INT8; a 32-byte
/// chunk: half that), 0 = portable; `lanes_per_chunk`: its 32-bit lanes (16 or 8).
fn prepare_int(
    x: &[f32],
    m: usize,
    k: usize,
    group_size: usize,
    chunk_elems: usize,
    lanes_per_chunk: usize,
    zeros_split: bool,
) -> IntActs {
    let nb = k / ACT_BLOCK;
    let ng = k / group_size;
    let stride = if chunk_elems == 0 {
        k
    } else {
        k.div_ceil(chunk_elems) * chunk_elems
    };
    let lane_stride = stride
        .checked_div(chunk_elems)
        .map_or(0, |c| c * lanes_per_chunk);
    let mut xq = Vec::with_capacity(m * stride);
    let mut xs = vec![0f32; m * nb];
    let mut lane_scales = vec![0f32; m * lane_stride];
    let mut group_sums = vec![0f32; m * ng];
    let mut codes = vec![0i8; k];
    for t in 0..m {
        let row = &x[t * k..(t + 1) * k];
        for b in 0..nb {
            let blk = &row[b * ACT_BLOCK..(b + 1) * ACT_BLOCK];
            let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
            // f32::max skips NaN: a NaN/Inf block gets a NaN scale so the output shows it.
            let finite = blk.iter().all(|v| v.is_finite());
            let scale = if finite { amax / 127.0 } else { f32::NAN };
            let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
            let mut sum = 0i32;
            for (c, &v) in codes[b * ACT_BLOCK..(b + 1) * ACT_BLOCK]
                .iter_mut()
                .zip(blk)
            {
                // |v * inv| <= 127: adding and removing 1.5 * 2^23 rounds to nearest-even
                // without a libm call (`round_ties_even` is one on baseline x86-64).
                let r = (v * inv + ROUND_MAGIC) - ROUND_MAGIC;
                *c = r.clamp(-127.0, 127.0) as i8;
                sum += *c as i32;
            }
            xs[t * nb + b] = scale;
            group_sums[t * ng + b * ACT_BLOCK / group_size] += scale * sum as f32;
        }
        let half = if zeros_split { chunk_elems / 2 } else { 0 };
        xq.extend(split_even_odd(&codes, half, stride));
        if chunk_elems != 0 {
            // A lane covers 4 bytes of the chunk: 4 inputs (INT8) or 4 even + 4 odd inputs (INT4).
            let lane_elems = chunk_elems / lanes_per_chunk;
            for (l, ls) in lane_scales[t * lane_stride..(t + 1) * lane_stride]
                .iter_mut()
                .enumerate()
            {
                let first = l * lane_elems;
                if first < k {
                    *ls = xs[t * nb + first / ACT_BLOCK];
                }
            }
        }
    }
    IntActs {
        xq,
        stride,
        xs,
        lane_scales,
        lane_stride,
        group_sums,
    }
}

/// Per-chunk group lookup for the int8 route: the weight scale of each lane of a weight chunk.
pub(crate) struct ChunkGroups {
    /// First group of the chunk.
    pub first: Vec<u32>,
    /// Number of groups the chunk touches (1 for group sizes >= chunk).
    pub count: Vec<u32>,
    /// `(chunks, lanes)`: group of each lane, relative to `first`.
    pub lane_group: Vec<i32>,
}

fn chunk_groups(k: usize, group_size: usize, chunk_elems: usize, lanes: usize) -> ChunkGroups {
    let nchunks = k.div_ceil(chunk_elems);
    let lane_elems = chunk_elems / lanes;
    let mut first = Vec::with_capacity(nchunks);
    let mut count = Vec::with_capacity(nchunks);
    let mut lane_group = Vec::with_capacity(nchunks * lanes);
    for c in 0..nchunks {
        let start = c * chunk_elems;
        let last = (start + chunk_elems).min(k) - 1;
        let g0 = start / group_size;
        first.push(g0 as u32);
        count.push((last / group_size - g0 + 1) as u32);
        for l in 0..lanes {
            let e = (start + l * lane_elems).min(last);
            lane_group.push((e / group_size - g0) as i32);
        }
    }
    ChunkGroups {
        first,
        count,
        lane_group,
    }
}

/// `x`: `(m, in_features)` row-major `f32`; returns `(m, out_features)` `f32`.
pub fn linear(
    x: &[f32],
    m: usize,
    w: &QuantWeight,
    bias: Option<&[f32]>,
    route: Route,
) -> Result<Vec<f32>> {
    linear_with_isa(x, m, w, bias, route, detect_isa())
}

/// As [`linear`], with the instruction set forced (at most the detected one), for tests and benches.
pub fn linear_with_isa(
    x: &[f32],
    m: usize,
    w: &QuantWeight,
    bias: Option<&[f32]>,
    route: Route,
    isa: Isa,
) -> Result<Vec<f32>> {
    let ng = w.validate()?;
    let (n, k, g) = (w.out_features, w.in_features, w.group_size);
    check_len("x", x.len(), m, k)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), 1, n)?;
    }
    if isa > detect_isa() {
        return Err(Error::runtime(format!(
            "this CPU does not support {}",
            isa.name()
        )));
    }
    let mn = crate::error::checked_mul("the output's elements (m * out_features)", m, n)?;
    let mut out = crate::error::try_zeroed::<f32>(mn, "the linear's output")?;
    if m == 0 || n == 0 {
        return Ok(out);
    }
    if k == 0 {
        // No input features: y = bias. (The kernels walk rows of k > 0 elements; `chunks_exact(0)`
        // would panic.)
        if let Some(b) = bias {
            for row in out.chunks_exact_mut(n) {
                row.copy_from_slice(b);
            }
        }
        return Ok(out);
    }
    let int_ok = k % ACT_BLOCK == 0 && g % ACT_BLOCK == 0;
    let route = if int_ok { route } else { Route::Float };
    let int4 = w.bits == 4;
    let row_bytes = if int4 { k / 2 } else { k };
    let mut out_t = crate::error::try_zeroed::<f32>(mn, "the linear's output")?;
    let parallel = mn.saturating_mul(k) >= PARALLEL_MIN_MACS && crate::parallel::num_threads() > 1;

    match route {
        Route::Float => {
            // SIMD float kernels step 32 (AVX-512) or 16 (AVX2) inputs; other shapes stay portable.
            let isa = match isa {
                Isa::Avx512 | Isa::Avx512Vnni if g % 32 == 0 => Isa::Avx512,
                Isa::Avx512 | Isa::Avx512Vnni | Isa::Avx2Fma if g % 16 == 0 => Isa::Avx2Fma,
                _ => Isa::Portable,
            };
            let half = match (int4, isa) {
                (true, Isa::Avx512) => 16,
                (true, Isa::Avx2Fma) => 8,
                _ => 0,
            };
            let acts = prepare_float(x, m, k, half);
            for_each_row_block(&mut out_t, m, parallel, |task, chunk| {
                let mut neg_zs = vec![0f32; ng];
                for (i, y) in chunk.chunks_exact_mut(m).enumerate() {
                    let r = task * ROWS_PER_TASK + i;
                    let s = &w.scales[r * ng..(r + 1) * ng];
                    let z = &w.zeros[r * ng..(r + 1) * ng];
                    for ((nz, &sv), &zv) in neg_zs.iter_mut().zip(s).zip(z) {
                        *nz = -zv * sv;
                    }
                    let q = &w.qweight[r * row_bytes..(r + 1) * row_bytes];
                    float_row(isa, int4, q, s, &neg_zs, g, &acts, y);
                }
            });
        }
        Route::Int8Activations => {
            // 64-byte chunks of 16 lanes (VNNI) or 32-byte chunks of 8 lanes (AVX2 maddubs).
            let (chunk_bytes, lanes) = match isa {
                Isa::Avx512Vnni => (64, 16),
                Isa::Avx512 | Isa::Avx2Fma => (32, 8),
                Isa::Portable => (0, 0),
            };
            let chunk_elems = if int4 { 2 * chunk_bytes } else { chunk_bytes };
            let acts = prepare_int(x, m, k, g, chunk_elems, lanes, int4);
            let groups = (chunk_elems > 0).then(|| chunk_groups(k, g, chunk_elems, lanes));
            #[cfg(target_arch = "x86_64")]
            if m == 1 && lanes == 16 {
                if let Some(cg) = &groups {
                    // One token: rows side by side, zero points in the kernel.
                    for_each_row_block(&mut out_t, 1, parallel, |task, chunk| {
                        let r0 = task * ROWS_PER_TASK;
                        let r1 = r0 + chunk.len();
                        // SAFETY: VNNI support was checked by `detect_isa`; shapes by `validate`.
                        unsafe {
                            super::gemv_x86::int_single_token_vnni(
                                int4,
                                &w.qweight[r0 * row_bytes..r1 * row_bytes],
                                row_bytes,
                                &w.scales[r0 * ng..r1 * ng],
                                &w.zeros[r0 * ng..r1 * ng],
                                ng,
                                cg,
                                &acts,
                                chunk,
                            )
                        }
                    });
                    return Ok(finish(out_t, out, m, n, bias));
                }
            }
            for_each_row_block(&mut out_t, m, parallel, |task, chunk| {
                for (i, y) in chunk.chunks_exact_mut(m).enumerate() {
                    let r = task * ROWS_PER_TASK + i;
                    let s = &w.scales[r * ng..(r + 1) * ng];
                    let z = &w.zeros[r * ng..(r + 1) * ng];
                    let q = &w.qweight[r * row_bytes..(r + 1) * row_bytes];
                    match &groups {
                        #[cfg(target_arch = "x86_64")]
                        Some(cg) if lanes == 16 => {
                            // SAFETY: VNNI support was checked by `detect_isa`; shapes by `validate`.
                            unsafe { super::gemv_x86::int_row_vnni(int4, q, s, k, cg, &acts, y) }
                        }
                        #[cfg(target_arch = "x86_64")]
                        Some(cg) => {
                            // SAFETY: AVX2 support was checked by `detect_isa`; shapes by `validate`.
                            unsafe { super::gemv_x86::int_row_avx2(int4, q, s, cg, &acts, y) }
                        }
                        _ => int_row_portable(int4, q, s, g, &acts, y),
                    }
                    for (t, yv) in y.iter_mut().enumerate() {
                        *yv -= dot3(s, z, &acts.group_sums[t * ng..(t + 1) * ng]);
                    }
                }
            });
        }
    }
    Ok(finish(out_t, out, m, n, bias))
}

/// `out (m, n) = out_t (n, m)` transposed, plus the bias.
fn finish(
    out_t: Vec<f32>,
    mut out: Vec<f32>,
    m: usize,
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    if m == 1 {
        match bias {
            Some(b) => out_t
                .iter()
                .zip(b)
                .zip(out.iter_mut())
                .for_each(|((v, b), o)| *o = v + b),
            None => return out_t,
        }
        return out;
    }
    for (r, col) in out_t.chunks_exact(m).enumerate() {
        let b = bias.map_or(0.0, |b| b[r]);
        for (t, &v) in col.iter().enumerate() {
            out[t * n + r] = v + b;
        }
    }
    out
}

/// Runs `f(block_index, block)` over blocks of `ROWS_PER_TASK` output rows of `out_t` `(n, m)`.
fn for_each_row_block(
    out_t: &mut [f32],
    m: usize,
    parallel: bool,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    let block = ROWS_PER_TASK * m;
    if parallel {
        crate::parallel::install(|| {
            out_t
                .par_chunks_mut(block)
                .enumerate()
                .for_each(|(i, c)| f(i, c))
        });
    } else {
        out_t
            .chunks_mut(block)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
    }
}

/// `sum_i a_i * b_i * c_i` with 8 independent partial sums (vectorises, no FMA chain).
fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut part = [0f32; 8];
    let n8 = a.len() / 8 * 8;
    for ((a8, b8), c8) in a[..n8]
        .chunks_exact(8)
        .zip(b[..n8].chunks_exact(8))
        .zip(c[..n8].chunks_exact(8))
    {
        for i in 0..8 {
            part[i] += a8[i] * b8[i] * c8[i];
        }
    }
    let tail: f32 = a[n8..]
        .iter()
        .zip(&b[n8..])
        .zip(&c[n8..])
        .map(|((x, y), z)| x * y * z)
        .sum();
    part.iter().sum::<f32>() + tail
}

#[allow(clippy::too_many_arguments)]
fn float_row(
    isa: Isa,
    int4: bool,
    q: &[u8],
    s: &[f32],
    neg_zs: &[f32],
    g: usize,
    acts: &FloatActs,
    y: &mut [f32],
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the ISA was detected at run time; the group size matches the kernel's step.
        Isa::Avx512 => unsafe { super::gemv_x86::float_row_avx512(int4, q, s, neg_zs, g, acts, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2Fma => unsafe { super::gemv_x86::float_row_avx2(int4, q, s, neg_zs, g, acts, y) },
        _ => float_row_portable(int4, q, s, neg_zs, g, acts, y),
    }
}

fn float_row_portable(
    int4: bool,
    q: &[u8],
    s: &[f32],
    neg_zs: &[f32],
    g: usize,
    acts: &FloatActs,
    y: &mut [f32],
) {
    for (t, yv) in y.iter_mut().enumerate() {
        let x = &acts.x[t * acts.stride..];
        let mut acc = 0f32;
        for (gi, (&sv, &nz)) in s.iter().zip(neg_zs).enumerate() {
            let xg = &x[gi * g..(gi + 1) * g];
            if int4 {
                for (&b, xp) in q[gi * g / 2..(gi + 1) * g / 2]
                    .iter()
                    .zip(xg.chunks_exact(2))
                {
                    acc += ((b & 15) as f32 * sv + nz) * xp[0];
                    acc += ((b >> 4) as f32 * sv + nz) * xp[1];
                }
            } else {
                for (&c, &xv) in q[gi * g..(gi + 1) * g].iter().zip(xg) {
                    acc += (c as f32 * sv + nz) * xv;
                }
            }
        }
        *yv = acc;
    }
}

/// Integer-dot part of the int8 route (the zero-point term is subtracted by the caller).
fn int_row_portable(int4: bool, q: &[u8], s: &[f32], g: usize, acts: &IntActs, y: &mut [f32]) {
    let nb = g / ACT_BLOCK;
    let blocks_per_row = s.len() * nb;
    for (t, yv) in y.iter_mut().enumerate() {
        let xq = &acts.xq[t * acts.stride..];
        let xs = &acts.xs[t * blocks_per_row..(t + 1) * blocks_per_row];
        let mut acc = 0f32;
        for (gi, &sv) in s.iter().enumerate() {
            let mut ga = 0f32;
            for b in gi * nb..(gi + 1) * nb {
                let xb = &xq[b * ACT_BLOCK..(b + 1) * ACT_BLOCK];
                let dot: i32 = if int4 {
                    q[b * ACT_BLOCK / 2..(b + 1) * ACT_BLOCK / 2]
                        .iter()
                        .zip(xb.chunks_exact(2))
                        .map(|(&c, xp)| {
                            (c & 15) as i32 * xp[0] as i32 + (c >> 4) as i32 * xp[1] as i32
                        })
                        .sum()
                } else {
                    q[b * ACT_BLOCK..(b + 1) * ACT_BLOCK]
                        .iter()
                        .zip(xb)
                        .map(|(&c, &xv)| c as i32 * xv as i32)
                        .sum()
                };
                ga += xs[b] * dot as f32;
            }
            acc += sv * ga;
        }
        *yv = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{affine, pack};

    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    struct Case {
        qweight: Vec<u8>,
        scales: Vec<f32>,
        zeros: Vec<f32>,
        deq: Vec<f32>,
        n: usize,
        k: usize,
        bits: u32,
        g: usize,
    }

    fn case(n: usize, k: usize, bits: u32, g: usize, sym: bool) -> Case {
        let wf = lcg(n * k, (n * 31 + k) as u64);
        let (scales, zeros) = affine::choose_qparams(&wf, n, k, bits, g, sym).unwrap();
        let q = affine::quantize(&wf, n, k, &scales, &zeros, bits, g).unwrap();
        let deq = affine::dequantize(&q, n, k, &scales, &zeros, g).unwrap();
        let qweight = if bits == 4 {
            pack::pack_int4(&q).unwrap()
        } else {
            q
        };
        Case {
            qweight,
            scales,
            zeros,
            deq,
            n,
            k,
            bits,
            g,
        }
    }

    impl Case {
        fn weight(&self) -> QuantWeight<'_> {
            QuantWeight {
                qweight: &self.qweight,
                scales: &self.scales,
                zeros: &self.zeros,
                out_features: self.n,
                in_features: self.k,
                bits: self.bits,
                group_size: self.g,
            }
        }
    }

    /// f64 reference and the bound on the int8-activation error (`sum |w| * absmax / 254`).
    fn reference(c: &Case, x: &[f32], m: usize) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let (n, k) = (c.n, c.k);
        let mut y = vec![0f64; m * n];
        let mut mag = vec![0f64; m * n];
        let mut act_err = vec![0f64; m * n];
        for t in 0..m {
            let xt = &x[t * k..(t + 1) * k];
            for r in 0..n {
                let wr = &c.deq[r * k..(r + 1) * k];
                for i in 0..k {
                    y[t * n + r] += wr[i] as f64 * xt[i] as f64;
                    mag[t * n + r] += (wr[i] as f64 * xt[i] as f64).abs();
                    if k % ACT_BLOCK == 0 {
                        let b = i / ACT_BLOCK;
                        let amax = xt[b * ACT_BLOCK..(b + 1) * ACT_BLOCK]
                            .iter()
                            .fold(0f32, |a, v| a.max(v.abs()));
                        act_err[t * n + r] += (wr[i] as f64).abs() * amax as f64 / 254.0;
                    }
                }
            }
        }
        (y, mag, act_err)
    }

    fn check(c: &Case, m: usize) {
        let x = lcg(m * c.k, 77 + m as u64);
        let (want, mag, act_err) = reference(c, &x, m);
        let mut isas = vec![Isa::Portable];
        for isa in [Isa::Avx2Fma, Isa::Avx512, Isa::Avx512Vnni] {
            if isa <= detect_isa() {
                isas.push(isa);
            }
        }
        for isa in isas {
            for route in [Route::Float, Route::Int8Activations] {
                let got = linear_with_isa(&x, m, &c.weight(), None, route, isa).unwrap();
                for i in 0..want.len() {
                    let float_tol = 1e-5 * mag[i] + 1e-6;
                    let tol = match route {
                        Route::Float => float_tol,
                        Route::Int8Activations => act_err[i] * 1.001 + float_tol,
                    };
                    let err = (got[i] as f64 - want[i]).abs();
                    assert!(
                        err <= tol,
                        "{isa:?} {route:?} bits={} g={} m={m} i={i}: {} vs {} (tol {tol})",
                        c.bits,
                        c.g,
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }

    #[test]
    fn all_kernels_match_the_f64_reference() {
        for bits in [4, 8] {
            for (k, g) in [
                (256, 32),
                (256, 64),
                (256, 128),
                (384, 128),
                (192, 192),
                (160, 160),
                (96, 32),
            ] {
                for sym in [false, true] {
                    let c = case(37, k, bits, g, sym);
                    for m in [1, 3, 4, 6, 9] {
                        check(&c, m);
                    }
                }
            }
        }
    }

    #[test]
    fn non_finite_activations_give_nan_on_every_route() {
        let c = case(4, 128, 4, 32, false);
        let mut x = lcg(2 * 128, 5);
        x[7] = f32::NAN;
        x[128 + 100] = f32::INFINITY;
        for isa in [Isa::Portable, detect_isa()] {
            for route in [Route::Float, Route::Int8Activations] {
                let y = linear_with_isa(&x, 2, &c.weight(), None, route, isa).unwrap();
                assert!(y[..4].iter().all(|v| v.is_nan()), "{isa:?} {route:?} {y:?}");
                assert!(
                    y[4..].iter().all(|v| !v.is_finite()),
                    "{isa:?} {route:?} {y:?}"
                );
            }
        }
    }

    #[test]
    fn odd_group_shapes_use_the_portable_path() {
        // per-channel with in_features not a multiple of 32
        check(&case(5, 50, 8, 50, false), 2);
        check(&case(5, 50, 4, 50, true), 3);
    }

    #[test]
    fn bias_is_added_and_shapes_are_checked() {
        let c = case(8, 64, 4, 32, false);
        let x = lcg(64, 1);
        let bias: Vec<f32> = (0..8).map(|i| i as f32).collect();
        let a = linear(&x, 1, &c.weight(), None, Route::Float).unwrap();
        let b = linear(&x, 1, &c.weight(), Some(&bias), Route::Float).unwrap();
        for i in 0..8 {
            assert!((b[i] - a[i] - i as f32).abs() < 1e-5);
        }
        assert!(linear(&x[..63], 1, &c.weight(), None, Route::Float).is_err());
        assert!(linear(&x, 1, &c.weight(), Some(&bias[..7]), Route::Float).is_err());
        let mut w = c.weight();
        w.group_size = 48;
        assert!(linear(&x, 1, &w, None, Route::Float).is_err());
        w.group_size = 32;
        w.bits = 3;
        assert!(linear(&x, 1, &w, None, Route::Float).is_err());
    }

    #[test]
    fn degenerate_shapes_are_handled_or_rejected() {
        // in_features = 0: y = bias on every route (the kernels used to panic on chunks of 0).
        let bias = [1.0f32, 2.0, 3.0];
        for bits in [4, 8] {
            let w = QuantWeight {
                qweight: &[],
                scales: &[],
                zeros: &[],
                out_features: 3,
                in_features: 0,
                bits,
                group_size: 32,
            };
            for route in [Route::Float, Route::Int8Activations] {
                assert_eq!(
                    linear(&[], 2, &w, Some(&bias), route).unwrap(),
                    [bias, bias].concat()
                );
                assert_eq!(linear(&[], 2, &w, None, route).unwrap(), vec![0.0; 6]);
            }
            // m * out_features overflows: an error, not a wrapped allocation size.
            let huge = QuantWeight {
                out_features: 1 << 40,
                ..w
            };
            let err = linear(&[], 1 << 40, &huge, None, Route::Float).unwrap_err();
            assert!(matches!(err, Error::Value(_)), "{err}");
        }
    }
}
