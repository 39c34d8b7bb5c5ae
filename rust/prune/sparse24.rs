//! Compressed 2:4 weights with INT8 or INT4 values, and `y = x @ W^T (+ bias)` that reads them.
//!
//! Layout of a `(out, in)` weight (`in` a multiple of 8) whose every window of 4 consecutive
//! inputs holds at most 2 nonzeros:
//! - `values` `(out, in / 2)` codes for 8 bits, `(out, in / 4)` nibble-packed for 4 bits
//!   (value `2j` in the low nibble of byte `j`): the two stored values of each window, in
//!   column order;
//! - `meta` `(out, in / 8)`: the 2-bit column (0..3) inside its window of stored value `v` at
//!   bits `2 * (v % 4)` of byte `v / 4` (one byte covers two windows);
//! - `scales`, `zeros` `(out, in / group_size)` per group of *original* columns, as in
//!   `crate::quant` (`w = (q - zero) * scale`); `group_size` a multiple of 4.
//!
//! A window with fewer than 2 nonzeros stores a pruned position too (its code is the zero point,
//! value 0). The kernel gathers each stored value's activation by its index: on AVX-512 one
//! two-register permute (`vpermt2ps`) selects 16 activations of a 32-input chunk for 16 values
//! whose codes are dequantized in registers with one FMA, so a row streams `in / 2 + in / 8`
//! bytes (INT8) instead of `in`.

use rayon::prelude::*;

use crate::error::{checked_mul, try_zeroed, Error, Result};
use crate::quant::{check_len, check_params, groups_per_row, qmax};

/// Output rows per rayon task.
const ROWS_PER_TASK: usize = 16;
/// Below this many multiply-adds a call stays on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 18;
/// Tokens that share one pass over a weight row.
pub(crate) const TOKEN_TILE: usize = 4;

/// A compressed 2:4 weight borrowed from the caller (see the module docs for the layout).
#[derive(Clone, Copy, Debug)]
pub struct Sparse24Weight<'a> {
    pub values: &'a [u8],
    pub meta: &'a [u8],
    pub scales: &'a [f32],
    pub zeros: &'a [f32],
    pub out_features: usize,
    pub in_features: usize,
    pub bits: u32,
    pub group_size: usize,
}

/// Bytes of stored values per row.
pub fn value_bytes(in_features: usize, bits: u32) -> usize {
    if bits == 4 {
        in_features / 4
    } else {
        in_features / 2
    }
}

fn check_shape(cols: usize, bits: u32) -> Result<()> {
    qmax(bits)?;
    if !cols.is_multiple_of(8) {
        return Err(Error::value(format!(
            "2:4 compressed storage needs in_features divisible by 8, got {cols}"
        )));
    }
    Ok(())
}

impl Sparse24Weight<'_> {
    /// Checks shapes, bits, group size and parameters; returns the number of groups per row.
    pub fn validate(&self) -> Result<usize> {
        let (n, k) = (self.out_features, self.in_features);
        check_shape(k, self.bits)?;
        let ng = groups_per_row(k, self.group_size)?;
        if !self.group_size.is_multiple_of(4) {
            return Err(Error::value(format!(
                "2:4 compressed storage needs a group_size divisible by 4, got {}",
                self.group_size
            )));
        }
        check_len("values", self.values.len(), n, value_bytes(k, self.bits))?;
        check_len("meta", self.meta.len(), n, k / 8)?;
        check_params(self.scales, self.zeros, n, ng)?;
        Ok(ng)
    }

    #[inline(always)]
    fn index(&self, row: usize, v: usize) -> usize {
        let b = self.meta[row * (self.in_features / 8) + v / 4];
        ((b >> (2 * (v % 4))) & 3) as usize
    }

    #[inline(always)]
    fn code(&self, row: usize, v: usize) -> u8 {
        let rb = value_bytes(self.in_features, self.bits);
        if self.bits == 8 {
            self.values[row * rb + v]
        } else {
            let b = self.values[row * rb + v / 2];
            if v.is_multiple_of(2) {
                b & 0x0f
            } else {
                b >> 4
            }
        }
    }
}

/// Compresses dense codes `(rows, cols)` whose keep-mask has at most 2 `true` in every window of
/// 4 columns. Returns `(values, meta)`; a window with fewer kept positions also stores its first
/// pruned ones (whose codes should be the zero point). `ValueError` names a window that keeps 3
/// or 4, or a code above `2^bits - 1`.
pub fn compress(
    codes: &[u8],
    keep: &[bool],
    rows: usize,
    cols: usize,
    bits: u32,
) -> Result<(Vec<u8>, Vec<u8>)> {
    check_shape(cols, bits)?;
    check_len("codes", codes.len(), rows, cols)?;
    check_len("keep", keep.len(), rows, cols)?;
    let max = qmax(bits)? as u8;
    if let Some(i) = codes.iter().position(|&c| c > max) {
        return Err(Error::value(format!(
            "code {} at row {}, column {} does not fit {bits} bits",
            codes[i],
            i / cols,
            i % cols
        )));
    }
    let rb = value_bytes(cols, bits);
    let mut values = try_zeroed::<u8>(checked_mul("values", rows, rb)?, "the 2:4 values")?;
    let mut meta = try_zeroed::<u8>(rows * (cols / 8), "the 2:4 indices")?;
    for r in 0..rows {
        let row = &codes[r * cols..(r + 1) * cols];
        let km = &keep[r * cols..(r + 1) * cols];
        for win in 0..cols / 4 {
            let w0 = win * 4;
            let kept = km[w0..w0 + 4].iter().filter(|&&k| k).count();
            if kept > 2 {
                return Err(Error::value(format!(
                    "row {r}, columns {w0}..{}: {kept} of 4 kept, not a 2:4 pattern",
                    w0 + 4
                )));
            }
            // The kept positions, then the first pruned ones, in column order.
            let mut pick = [0usize; 2];
            let mut n = 0;
            for i in 0..4 {
                if km[w0 + i] && n < 2 {
                    pick[n] = i;
                    n += 1;
                }
            }
            for i in 0..4 {
                if n < 2 && !km[w0 + i] && !pick[..n].contains(&i) {
                    pick[n] = i;
                    n += 1;
                }
            }
            pick.sort_unstable();
            for (slot, &i) in pick.iter().enumerate() {
                let v = 2 * win + slot;
                let c = row[w0 + i];
                if bits == 8 {
                    values[r * rb + v] = c;
                } else {
                    values[r * rb + v / 2] |= c << (4 * (v % 2));
                }
                meta[r * (cols / 8) + v / 4] |= (i as u8) << (2 * (v % 4));
            }
        }
    }
    Ok((values, meta))
}

/// Dense codes `(out, in)` of a compressed weight: stored codes at their columns, the group's
/// zero point elsewhere (so they dequantize to 0).
pub fn decompress(w: &Sparse24Weight) -> Result<Vec<u8>> {
    let ng = w.validate()?;
    let (n, k) = (w.out_features, w.in_features);
    let mut out = try_zeroed::<u8>(n * k, "the dense codes")?;
    for r in 0..n {
        for c in 0..k {
            out[r * k + c] = w.zeros[r * ng + c / w.group_size] as u8;
        }
        for v in 0..k / 2 {
            let col = 4 * (v / 2) + w.index(r, v);
            out[r * k + col] = w.code(r, v);
        }
    }
    Ok(out)
}

/// One row against `y.len()` tokens, portable.
fn row_portable(w: &Sparse24Weight, r: usize, ng: usize, x: &[f32], y: &mut [f32]) {
    let k = w.in_features;
    let per_group = w.group_size / 2;
    for t in y.iter_mut() {
        *t = 0.0;
    }
    for g in 0..ng {
        let s = w.scales[r * ng + g];
        let z = w.zeros[r * ng + g];
        for v in g * per_group..(g + 1) * per_group {
            let col = 4 * (v / 2) + w.index(r, v);
            let wv = (w.code(r, v) as f32 - z) * s;
            for (t, yt) in y.iter_mut().enumerate() {
                *yt += wv * x[t * k + col];
            }
        }
    }
}

/// `x` `(m, in)` row-major `f32`; returns `(m, out)`.
pub fn linear(x: &[f32], m: usize, w: &Sparse24Weight, bias: Option<&[f32]>) -> Result<Vec<f32>> {
    linear_with_simd(x, m, w, bias, true)
}

/// As [`linear`]; `simd = false` forces the portable kernel (tests, benches).
pub fn linear_with_simd(
    x: &[f32],
    m: usize,
    w: &Sparse24Weight,
    bias: Option<&[f32]>,
    simd: bool,
) -> Result<Vec<f32>> {
    let ng = w.validate()?;
    let (n, k) = (w.out_features, w.in_features);
    check_len("x", x.len(), m, k)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), 1, n)?;
    }
    let mn = checked_mul("the output's elements (m * out_features)", m, n)?;
    let mut out = try_zeroed::<f32>(mn, "the linear's output")?;
    if mn == 0 {
        return Ok(out);
    }
    #[cfg(target_arch = "x86_64")]
    let use_simd = simd
        && k.is_multiple_of(32)
        && w.group_size.is_multiple_of(32)
        && crate::quant::gemv::detect_isa() >= crate::quant::gemv::Isa::Avx512;
    #[cfg(not(target_arch = "x86_64"))]
    let use_simd = {
        let _ = simd;
        false
    };
    let mut out_t = try_zeroed::<f32>(mn, "the linear's output")?;
    let parallel =
        mn.saturating_mul(k) / 2 >= PARALLEL_MIN_MACS && crate::parallel::num_threads() > 1;
    let run = |(task, chunk): (usize, &mut [f32])| {
        for (i, y) in chunk.chunks_exact_mut(m).enumerate() {
            let r = task * ROWS_PER_TASK + i;
            if use_simd {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: AVX-512 F/BW detected above; shapes checked by `validate`.
                unsafe {
                    super::sparse24_x86::row_avx512(w, r, ng, x, y)
                };
            } else {
                row_portable(w, r, ng, x, y);
            }
        }
    };
    if parallel {
        crate::parallel::install(|| {
            out_t
                .par_chunks_mut(ROWS_PER_TASK * m)
                .enumerate()
                .for_each(run)
        });
    } else {
        out_t
            .chunks_mut(ROWS_PER_TASK * m)
            .enumerate()
            .for_each(run);
    }
    for (r, col) in out_t.chunks_exact(m).enumerate() {
        let b = bias.map_or(0.0, |b| b[r]);
        for (t, &v) in col.iter().enumerate() {
            out[t * n + r] = v + b;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    struct Case {
        n: usize,
        k: usize,
        bits: u32,
        gs: usize,
        dense: Vec<u8>,
        values: Vec<u8>,
        meta: Vec<u8>,
        scales: Vec<f32>,
        zeros: Vec<f32>,
    }

    impl Case {
        fn new(n: usize, k: usize, bits: u32, gs: usize, seed: u64) -> Case {
            let ng = k / gs;
            let max = (1u32 << bits) - 1;
            let zeros: Vec<f32> = (0..n * ng)
                .map(|i| (i as u32 * 37 % (max + 1)) as f32)
                .collect();
            let scales: Vec<f32> = lcg(n * ng, seed).iter().map(|x| x.abs() + 0.01).collect();
            let r = lcg(n * k, seed + 1);
            // Keep 0, 1 or 2 of each window; pruned positions hold the zero point.
            let mut dense = vec![0u8; n * k];
            let mut keep = vec![false; n * k];
            for i in 0..n * k {
                let (row, col) = (i / k, i % k);
                let z = zeros[row * ng + col / gs] as u8;
                let win = i / 4;
                let kept = (win * 7 + i % 4 * 3) % 5 < 2 && win % 11 != 3;
                keep[i] = kept && keep[win * 4..i].iter().filter(|&&b| b).count() < 2;
                dense[i] = if keep[i] {
                    ((r[i] + 0.5) * max as f32) as u8
                } else {
                    z
                };
            }
            let (values, meta) = compress(&dense, &keep, n, k, bits).unwrap();
            Case {
                n,
                k,
                bits,
                gs,
                dense,
                values,
                meta,
                scales,
                zeros,
            }
        }

        fn weight(&self) -> Sparse24Weight<'_> {
            Sparse24Weight {
                values: &self.values,
                meta: &self.meta,
                scales: &self.scales,
                zeros: &self.zeros,
                out_features: self.n,
                in_features: self.k,
                bits: self.bits,
                group_size: self.gs,
            }
        }
    }

    #[test]
    fn compress_then_decompress_round_trips() {
        for (bits, gs) in [(8, 32), (4, 64), (8, 8), (4, 4)] {
            let c = Case::new(9, 64, bits, gs, 3);
            assert_eq!(
                decompress(&c.weight()).unwrap(),
                c.dense,
                "bits {bits} gs {gs}"
            );
            assert_eq!(c.values.len(), 9 * value_bytes(64, bits));
            assert_eq!(c.meta.len(), 9 * 8);
        }
    }

    #[test]
    fn kernels_match_an_f64_reference() {
        for (n, k, bits, gs, m) in [
            (37, 128, 8, 32, 1),
            (37, 128, 8, 64, 3),
            (20, 96, 4, 32, 5),
            (16, 64, 8, 16, 2),
            (5, 40, 4, 8, 1),
        ] {
            let c = Case::new(n, k, bits, gs, 11);
            let x = lcg(m * k, 99);
            let bias: Vec<f32> = lcg(n, 5);
            let ng = k / gs;
            let mut want = vec![0f64; m * n];
            for t in 0..m {
                for r in 0..n {
                    let mut acc = bias[r] as f64;
                    for col in 0..k {
                        let g = r * ng + col / gs;
                        let wv =
                            (c.dense[r * k + col] as f64 - c.zeros[g] as f64) * c.scales[g] as f64;
                        acc += wv * x[t * k + col] as f64;
                    }
                    want[t * n + r] = acc;
                }
            }
            for simd in [false, true] {
                let got = linear_with_simd(&x, m, &c.weight(), Some(&bias), simd).unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!((*g as f64 - w).abs() < 1e-3 * (1.0 + w.abs()), "{g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let codes = vec![0u8; 16];
        let mut keep = vec![false; 16];
        keep[..3].fill(true);
        assert!(compress(&codes, &keep, 2, 8, 8).is_err());
        assert!(compress(&codes, &[false; 16], 1, 16, 4).is_ok());
        assert!(compress(&[16u8; 8], &[false; 8], 1, 8, 4).is_err());
        assert!(compress(&codes, &[false; 16], 4, 4, 8).is_err());
        let c = Case::new(4, 32, 8, 32, 1);
        let mut w = c.weight();
        w.group_size = 6;
        assert!(w.validate().is_err());
        let w = c.weight();
        assert!(linear(&[0.0; 31], 1, &w, None).is_err());
        assert!(linear(&[0.0; 32], 1, &w, Some(&[0.0; 3])).is_err());
        let zero_scale = vec![0.0f32; 4];
        let mut bad = c.weight();
        bad.scales = &zero_scale;
        assert!(bad.validate().is_err());
    }
}
