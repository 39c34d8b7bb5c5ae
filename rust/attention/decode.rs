//! Decode attention: one new token per sequence against its key/value cache.
//!
//! A decode step of a causal LM has, per sequence, one query row per head and a cache of keys and
//! values. [`decode_step`] takes the fused q/k/v projection of the new tokens, applies the rotary
//! embedding (rotate-half, as Hugging Face Llama) to q and k, appends k and v to the caches at each
//! sequence's length, and attends every query head to the sequence's cached keys (grouped-query:
//! the query heads of one kv head read its keys once). The work is tiny (a few hundred thousand
//! multiply-adds at batch 1), so it runs on the calling thread unless it is large enough to repay
//! a trip into the thread pool (`PARALLEL_MIN_MACS`), and then in parallel over (sequence, kv head).
//!
//! Layouts (row-major f32): `qkv` `(batch, (heads_q + 2 heads_kv) * head_dim)` stacked
//! `[q; k; v]`; caches `(batch, heads_kv, capacity, head_dim)`; output
//! `(batch, heads_q * head_dim)`. The softmax is the exact two-pass one (scores, max, exponentials
//! through the vectorisable `fast_exp_f32`, weighted sum of values).

use rayon::prelude::*;

use super::gemm::fast_exp_f32;
use crate::error::{checked_product, Error, Result};

/// Work (multiply-adds) below which a step stays on the calling thread: waking the pool costs
/// tens of microseconds on a busy machine, the whole of a batch-1 step.
pub const PARALLEL_MIN_MACS: usize = 1 << 18;

/// The sizes of one decode step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeShape {
    pub batch: usize,
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    /// Positions each cache row can hold.
    pub capacity: usize,
}

impl DecodeShape {
    /// Checks the head counts and sizes; returns the query heads per kv head.
    pub fn validate(&self) -> Result<usize> {
        if self.heads_kv == 0 || self.heads_q == 0 || !self.heads_q.is_multiple_of(self.heads_kv) {
            return Err(Error::value(format!(
                "heads_q ({}) must be a positive multiple of heads_kv ({})",
                self.heads_q, self.heads_kv
            )));
        }
        if self.head_dim == 0 || self.head_dim > super::MAX_HEAD_DIM {
            return Err(Error::value(format!(
                "head_dim must be in 1..={}, got {}",
                super::MAX_HEAD_DIM,
                self.head_dim
            )));
        }
        checked_product(
            "the cache (batch * heads_kv * capacity * head_dim)",
            &[self.batch, self.heads_kv, self.capacity, self.head_dim],
        )?;
        Ok(self.heads_q / self.heads_kv)
    }

    fn qkv_width(&self) -> usize {
        (self.heads_q + 2 * self.heads_kv) * self.head_dim
    }
}

/// Rotary tables `(positions, half)`, row `p` for position `p` (`half = head_dim / 2`).
#[derive(Clone, Copy, Debug)]
pub struct Rotary<'a> {
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

fn check_len(name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::value(format!(
            "{name} must hold {want} elements, got {got}"
        )));
    }
    Ok(())
}

/// One decode step (see the module docs). `lengths[b]`: tokens already in sequence `b`'s cache;
/// the new token is written at that position, so it must be below `capacity` (and below the
/// rotary table's rows). Returns the attention output `(batch, heads_q * head_dim)`; the caches
/// gain one position per sequence (the caller advances `lengths`).
#[allow(clippy::too_many_arguments)]
pub fn decode_step(
    qkv: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    lengths: &[i64],
    shape: &DecodeShape,
    rotary: Option<Rotary<'_>>,
    scale: f32,
) -> Result<Vec<f32>> {
    let group = shape.validate()?;
    let DecodeShape {
        batch,
        heads_q,
        heads_kv,
        head_dim: d,
        capacity,
    } = *shape;
    check_len(
        "qkv",
        qkv.len(),
        checked_product("qkv", &[batch, shape.qkv_width()])?,
    )?;
    let cache_len = checked_product("the cache", &[batch, heads_kv, capacity, d])?;
    check_len("k_cache", k_cache.len(), cache_len)?;
    check_len("v_cache", v_cache.len(), cache_len)?;
    check_len("lengths", lengths.len(), batch)?;
    let half = d / 2;
    if let Some(r) = rotary {
        if r.cos.len() != r.sin.len() || (half > 0 && !r.cos.len().is_multiple_of(half)) {
            return Err(Error::value(format!(
                "rotary cos and sin must both be (positions, {half}), got {} and {} elements",
                r.cos.len(),
                r.sin.len()
            )));
        }
    }
    let rot_rows = rotary.map_or(usize::MAX, |r| {
        r.cos.len().checked_div(half).unwrap_or(usize::MAX)
    });
    let mut macs = 0usize;
    for (b, &len) in lengths.iter().enumerate() {
        let pos = usize::try_from(len).ok().filter(|&p| p < capacity).ok_or_else(|| {
            Error::value(format!(
                "lengths[{b}] = {len}: the new token's position must lie in [0, {capacity}) (the cache capacity)"
            ))
        })?;
        if pos >= rot_rows {
            return Err(Error::value(format!(
                "lengths[{b}] = {len}: the rotary tables cover positions below {rot_rows} only"
            )));
        }
        macs = macs.saturating_add(
            (pos + 1)
                .saturating_mul(heads_q + heads_kv)
                .saturating_mul(d),
        );
    }
    if !scale.is_finite() {
        return Err(Error::value(format!(
            "softmax_scale must be finite, got {scale}"
        )));
    }
    let out_len = checked_product("the output", &[batch, heads_q, d])?;
    let mut out = crate::error::try_zeroed::<f32>(out_len, "the attention output")?;
    if out_len == 0 {
        return Ok(out);
    }
    let block = capacity * d;
    #[allow(clippy::type_complexity)]
    let task = |(i, ((kc, vc), o)): (usize, ((&mut [f32], &mut [f32]), &mut [f32]))| {
        let (b, h) = (i / heads_kv, i % heads_kv);
        let pos = lengths[b] as usize;
        let row = &qkv[b * shape.qkv_width()..(b + 1) * shape.qkv_width()];
        let cos_sin = rotary.map(|r| {
            (
                &r.cos[pos * half..(pos + 1) * half],
                &r.sin[pos * half..(pos + 1) * half],
            )
        });
        head_step(row, kc, vc, o, pos, h, group, shape, cos_sin, scale);
    };
    let parallel =
        macs >= PARALLEL_MIN_MACS && batch * heads_kv > 1 && crate::parallel::num_threads() > 1;
    if parallel {
        crate::parallel::install(|| {
            k_cache
                .par_chunks_mut(block)
                .zip(v_cache.par_chunks_mut(block))
                .zip(out.par_chunks_mut(group * d))
                .enumerate()
                .for_each(task)
        });
    } else {
        k_cache
            .chunks_mut(block)
            .zip(v_cache.chunks_mut(block))
            .zip(out.chunks_mut(group * d))
            .enumerate()
            .for_each(task);
    }
    Ok(out)
}

/// Rotate-half RoPE of `x` into `y`: pairs `(x[i], x[i + half])`; an odd last element passes
/// through. Plain multiplies and a subtraction (no fused multiply-add), as torch computes it.
#[inline(always)]
fn rotate(x: &[f32], y: &mut [f32], cos_sin: Option<(&[f32], &[f32])>) {
    match cos_sin {
        None => y.copy_from_slice(x),
        Some((cos, sin)) => {
            let half = cos.len();
            for i in 0..half {
                let (x1, x2) = (x[i], x[i + half]);
                y[i] = x1 * cos[i] - x2 * sin[i];
                y[i + half] = x2 * cos[i] + x1 * sin[i];
            }
            y[2 * half..].copy_from_slice(&x[2 * half..]);
        }
    }
}

/// One (sequence, kv head): append k and v at `pos`, attend the group's query heads to keys
/// `0..=pos`, write their outputs into `out` `(group, d)`.
#[allow(clippy::too_many_arguments)]
fn head_step(
    row: &[f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    out: &mut [f32],
    pos: usize,
    h: usize,
    group: usize,
    shape: &DecodeShape,
    cos_sin: Option<(&[f32], &[f32])>,
    scale: f32,
) {
    let d = shape.head_dim;
    let (hq, hkv) = (shape.heads_q, shape.heads_kv);
    let k_new = &row[(hq + h) * d..(hq + h + 1) * d];
    let v_new = &row[(hq + hkv + h) * d..(hq + hkv + h + 1) * d];
    rotate(k_new, &mut k_cache[pos * d..(pos + 1) * d], cos_sin);
    v_cache[pos * d..(pos + 1) * d].copy_from_slice(v_new);
    let mut q = vec![0f32; group * d];
    for (g, qg) in q.chunks_exact_mut(d).enumerate() {
        let head = h * group + g;
        rotate(&row[head * d..(head + 1) * d], qg, cos_sin);
        for x in qg.iter_mut() {
            *x *= scale;
        }
    }
    let n = pos + 1;
    let mut scores = vec![0f32; group * n];
    attend(
        &q,
        &k_cache[..n * d],
        &v_cache[..n * d],
        &mut scores,
        out,
        group,
        d,
    );
}

/// softmax(q K^T) V for `group` query rows (already scaled) against `n` key/value rows.
fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
    group: usize,
    d: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f")
            && std::env::var_os("SLIMFORGE_ATTENTION_NO_SIMD").is_none()
        {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { attend_avx512(q, keys, values, scores, out, group, d) };
        }
        if is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && std::env::var_os("SLIMFORGE_ATTENTION_NO_SIMD").is_none()
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { attend_avx2(q, keys, values, scores, out, group, d) };
        }
    }
    attend_generic(q, keys, values, scores, out, group, d)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn attend_avx512(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &mut [f32],
    o: &mut [f32],
    g: usize,
    d: usize,
) {
    attend_generic(q, k, v, s, o, g, d)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_avx2(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: &mut [f32],
    o: &mut [f32],
    g: usize,
    d: usize,
) {
    attend_generic(q, k, v, s, o, g, d)
}

/// 16 independent partial sums, so the compiler keeps them in one or two vector registers.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (a16, b16) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (a16.remainder(), b16.remainder());
    for (x, y) in a16.zip(b16) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    let mut s8 = [0f32; 8];
    for l in 0..8 {
        s8[l] = acc[l] + acc[l + 8];
    }
    let s4 = [s8[0] + s8[4], s8[1] + s8[5], s8[2] + s8[6], s8[3] + s8[7]];
    (s4[0] + s4[2]) + (s4[1] + s4[3]) + tail
}

#[inline(always)]
fn attend_generic(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
    group: usize,
    d: usize,
) {
    let n = keys.len() / d;
    for (j, k) in keys.chunks_exact(d).enumerate() {
        for g in 0..group {
            scores[g * n + j] = dot(&q[g * d..(g + 1) * d], k);
        }
    }
    for (g, o) in out.chunks_exact_mut(d).enumerate() {
        let s = &mut scores[g * n..(g + 1) * n];
        let m = s.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        if m.is_nan() || s.iter().any(|x| x.is_nan()) {
            o.fill(f32::NAN);
            continue;
        }
        let mut l = 0f32;
        for x in s.iter_mut() {
            *x = fast_exp_f32(*x - m);
        }
        for x in s.iter() {
            l += *x;
        }
        o.fill(0.0);
        for (p, v) in s.iter().zip(values.chunks_exact(d)) {
            for (oi, vi) in o.iter_mut().zip(v) {
                *oi += p * vi;
            }
        }
        let inv = 1.0 / l;
        for oi in o.iter_mut() {
            *oi *= inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in `[-1, 1)`: twice the shared generator's (exact in f32).
    fn lcg(n: usize, seed: u64) -> Vec<f32> {
        crate::test_util::lcg(n, seed)
            .iter()
            .map(|v| 2.0 * v)
            .collect()
    }

    /// f64 reference of one step: rotate, append, attend.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        qkv: &[f32],
        kc: &[f32],
        vc: &[f32],
        lengths: &[i64],
        s: &DecodeShape,
        cos: Option<&[f32]>,
        sin: Option<&[f32]>,
        scale: f64,
    ) -> Vec<f64> {
        let (d, hq, hkv, cap) = (s.head_dim, s.heads_q, s.heads_kv, s.capacity);
        let half = d / 2;
        let w = s.qkv_width();
        let rot = |x: &[f32], pos: usize| -> Vec<f64> {
            let mut y: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            if let (Some(c), Some(sn)) = (cos, sin) {
                for i in 0..half {
                    let (x1, x2) = (x[i] as f64, x[i + half] as f64);
                    let (cv, sv) = (c[pos * half + i] as f64, sn[pos * half + i] as f64);
                    y[i] = x1 * cv - x2 * sv;
                    y[i + half] = x2 * cv + x1 * sv;
                }
            }
            y
        };
        let mut out = vec![0f64; s.batch * hq * d];
        for b in 0..s.batch {
            let pos = lengths[b] as usize;
            let row = &qkv[b * w..(b + 1) * w];
            for h in 0..hq {
                let kvh = h / (hq / hkv);
                let q = rot(&row[h * d..(h + 1) * d], pos);
                let base = (b * hkv + kvh) * cap * d;
                let mut keys: Vec<Vec<f64>> = (0..pos)
                    .map(|j| {
                        kc[base + j * d..base + (j + 1) * d]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    })
                    .collect();
                keys.push(rot(&row[(hq + kvh) * d..(hq + kvh + 1) * d], pos));
                let mut vals: Vec<Vec<f64>> = (0..pos)
                    .map(|j| {
                        vc[base + j * d..base + (j + 1) * d]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    })
                    .collect();
                vals.push(
                    row[(hq + hkv + kvh) * d..(hq + hkv + kvh + 1) * d]
                        .iter()
                        .map(|&x| x as f64)
                        .collect(),
                );
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|k| k.iter().zip(&q).map(|(a, b)| a * b).sum::<f64>() * scale)
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let p: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
                let l: f64 = p.iter().sum();
                for (pj, v) in p.iter().zip(&vals) {
                    for i in 0..d {
                        out[(b * hq + h) * d + i] += pj * v[i] / l;
                    }
                }
            }
        }
        out
    }

    fn case(shape: DecodeShape, lengths: &[i64], rotary: bool) {
        let (d, cap) = (shape.head_dim, shape.capacity);
        let qkv = lcg(shape.batch * shape.qkv_width(), 1);
        let cache_len = shape.batch * shape.heads_kv * cap * d;
        let k0 = lcg(cache_len, 2);
        let v0 = lcg(cache_len, 3);
        let half = d / 2;
        let cos: Vec<f32> = (0..cap * half).map(|i| ((i as f32) * 0.37).cos()).collect();
        let sin: Vec<f32> = (0..cap * half).map(|i| ((i as f32) * 0.37).sin()).collect();
        let (mut kc, mut vc) = (k0.clone(), v0.clone());
        let rot = rotary.then_some(Rotary {
            cos: &cos,
            sin: &sin,
        });
        let scale = 1.0 / (d as f32).sqrt();
        let out = decode_step(&qkv, &mut kc, &mut vc, lengths, &shape, rot, scale).unwrap();
        let want = reference(
            &qkv,
            &k0,
            &v0,
            lengths,
            &shape,
            rotary.then_some(&cos[..]),
            rotary.then_some(&sin[..]),
            scale as f64,
        );
        for (i, (a, b)) in out.iter().zip(&want).enumerate() {
            assert!((*a as f64 - b).abs() < 1e-5, "{i}: {a} vs {b} ({shape:?})");
        }
        // The caches changed at the new positions only (the rest untouched).
        for (b, &len) in lengths.iter().enumerate().take(shape.batch) {
            for h in 0..shape.heads_kv {
                for p in 0..cap {
                    let at = ((b * shape.heads_kv + h) * cap + p) * d;
                    let same = kc[at..at + d] == k0[at..at + d] && vc[at..at + d] == v0[at..at + d];
                    assert_eq!(same, p as i64 != len, "b={b} h={h} p={p}");
                }
            }
        }
    }

    #[test]
    fn matches_the_f64_reference() {
        for (hq, hkv, d) in [(4, 4, 16), (9, 3, 64), (8, 1, 33), (2, 2, 7), (6, 2, 128)] {
            let shape = DecodeShape {
                batch: 3,
                heads_q: hq,
                heads_kv: hkv,
                head_dim: d,
                capacity: 40,
            };
            case(shape, &[0, 17, 39], true);
            case(shape, &[5, 1, 2], false);
        }
    }

    #[test]
    fn large_steps_run_in_parallel_with_the_same_result() {
        let shape = DecodeShape {
            batch: 8,
            heads_q: 8,
            heads_kv: 2,
            head_dim: 64,
            capacity: 600,
        };
        case(shape, &[599, 0, 300, 450, 10, 598, 100, 200], true);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let s = DecodeShape {
            batch: 1,
            heads_q: 2,
            heads_kv: 1,
            head_dim: 4,
            capacity: 3,
        };
        let qkv = vec![0f32; 16];
        let (mut k, mut v) = (vec![0f32; 12], vec![0f32; 12]);
        assert!(decode_step(&qkv, &mut k, &mut v, &[3], &s, None, 1.0).is_err());
        assert!(decode_step(&qkv, &mut k, &mut v, &[-1], &s, None, 1.0).is_err());
        assert!(decode_step(&qkv[..15], &mut k, &mut v, &[0], &s, None, 1.0).is_err());
        let bad = DecodeShape { heads_kv: 3, ..s };
        assert!(decode_step(&qkv, &mut k, &mut v, &[0], &bad, None, 1.0).is_err());
        let cos = [1f32, 1.0];
        let rot = Rotary {
            cos: &cos,
            sin: &cos,
        };
        assert!(decode_step(&qkv, &mut k, &mut v, &[1], &s, Some(rot), 1.0).is_err());
        assert!(decode_step(&qkv, &mut k, &mut v, &[0], &s, Some(rot), 1.0).is_ok());
        assert!(decode_step(&qkv, &mut k, &mut v, &[0], &s, None, f32::NAN).is_err());
    }
}
