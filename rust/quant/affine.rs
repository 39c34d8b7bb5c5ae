//! Round-to-nearest affine quantization with per-channel or per-group parameters.

use rayon::prelude::*;

use super::{check_len, check_params, groups_per_row, qmax};
use crate::error::{try_zeroed, Error, Result};

/// Smallest scale handed out, so an all-zero group still has a usable (positive) scale.
pub const SCALE_EPS: f32 = f32::EPSILON;

fn check_finite(w: &[f32], cols: usize) -> Result<()> {
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::value(format!(
            "weight contains NaN or Inf ({} at row {}, column {})",
            w[i],
            i / cols.max(1),
            i % cols.max(1)
        )));
    }
    Ok(())
}

/// `(scale, zero)` of one group: the one affine rule every quantizer in the crate uses (and
/// `slimforge.quant.primitives` mirrors in torch ops).
///
/// Asymmetric: the range `[min(g, 0), max(g, 0)]` maps onto `[0, qmax]`, `scale = (hi - lo) /
/// qmax`, `zero = round(-lo / scale)`. Symmetric: `scale = absmax / (qmax / 2)`, `zero = (qmax +
/// 1) / 2`. Range arithmetic in `f64` (no overflow near `f32::MAX`); scales at least
/// [`SCALE_EPS`], so an all-zero group gets a usable scale and dequantizes to exact zeros.
#[inline]
pub fn group_qparams(g: &[f32], qmax: f64, symmetric: bool) -> (f32, f32) {
    // min/max are exact in f32; only the division below needs the wider type.
    let (lo, hi) = g
        .iter()
        .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (lo as f64, hi as f64);
    if symmetric {
        let amax = hi.max(-lo);
        (
            ((amax / (qmax / 2.0)) as f32).max(SCALE_EPS),
            ((qmax + 1.0) / 2.0) as f32,
        )
    } else {
        let scale = (((hi - lo) / qmax) as f32).max(SCALE_EPS);
        let zero = (-lo / scale as f64).round_ties_even().clamp(0.0, qmax) as f32;
        (scale, zero)
    }
}

/// Min-max (asymmetric) or absmax (symmetric) parameters for a `(rows, cols)` row-major weight.
///
/// Asymmetric: the range `[min(w, 0), max(w, 0)]` maps onto `[0, qmax]`, `zero = round(-lo /
/// scale)`. Symmetric: `scale = absmax / (qmax / 2)` (7.5 or 127.5) and `zero = 8` or `128`.
/// Returns `(scales, zeros)`, each `(rows, cols / group_size)`.
pub fn choose_qparams(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u32,
    group_size: usize,
    symmetric: bool,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let qmax = qmax(bits)? as f64;
    let ng = groups_per_row(cols, group_size)?;
    check_len("weight", w.len(), rows, cols)?;
    check_finite(w, cols)?;
    // rows * ng <= rows * cols = w.len() (checked above).
    let mut scales = try_zeroed::<f32>(rows * ng, "the scales")?;
    let mut zeros = try_zeroed::<f32>(rows * ng, "the zero points")?;
    if rows * ng == 0 {
        return Ok((scales, zeros));
    }
    crate::parallel::install(|| {
        w.par_chunks(group_size)
            .zip(scales.par_iter_mut().zip(zeros.par_iter_mut()))
            .for_each(|(g, (s, z))| {
                // f64 so that max - min cannot overflow for weights near f32::MAX.
                (*s, *z) = group_qparams(g, qmax, symmetric);
            })
    });
    Ok((scales, zeros))
}

/// `q = clamp(round_half_even(w / scale) + zero, 0, qmax)` as unpacked `u8` codes `(rows, cols)`.
///
/// Computed in `f32` exactly as `torch.clamp(torch.round(w / s) + z, 0, qmax)` does.
pub fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    scales: &[f32],
    zeros: &[f32],
    bits: u32,
    group_size: usize,
) -> Result<Vec<u8>> {
    let qmax = qmax(bits)? as f32;
    let ng = groups_per_row(cols, group_size)?;
    check_len("weight", w.len(), rows, cols)?;
    check_params(scales, zeros, rows, ng)?;
    check_finite(w, cols)?;
    let mut q = try_zeroed::<u8>(w.len(), "the codes")?;
    if q.is_empty() {
        return Ok(q);
    }
    crate::parallel::install(|| {
        q.par_chunks_mut(group_size)
            .zip(w.par_chunks(group_size))
            .zip(scales.par_iter().zip(zeros.par_iter()))
            .for_each(|((qg, wg), (&s, &z))| {
                for (o, &v) in qg.iter_mut().zip(wg) {
                    *o = ((v / s).round_ties_even() + z).clamp(0.0, qmax) as u8;
                }
            })
    });
    Ok(q)
}

/// `(q - zero) * scale` for unpacked codes `(rows, cols)`; returns `f32` `(rows, cols)`.
pub fn dequantize(
    q: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    zeros: &[f32],
    group_size: usize,
) -> Result<Vec<f32>> {
    let ng = groups_per_row(cols, group_size)?;
    check_len("codes", q.len(), rows, cols)?;
    check_len("scales", scales.len(), rows, ng)?;
    check_len("zeros", zeros.len(), rows, ng)?;
    let mut w = try_zeroed::<f32>(q.len(), "the dequantized weight")?;
    if w.is_empty() {
        return Ok(w);
    }
    crate::parallel::install(|| {
        w.par_chunks_mut(group_size)
            .zip(q.par_chunks(group_size))
            .zip(scales.par_iter().zip(zeros.par_iter()))
            .for_each(|((wg, qg), (&s, &z))| {
                for (o, &c) in wg.iter_mut().zip(qg) {
                    *o = (c as f32 - z) * s;
                }
            })
    });
    Ok(w)
}

/// Dequantizes a packed weight in one pass: `qweight` is `(rows, cols)` for 8 bits or
/// `(rows, cols / 2)` nibble-packed for 4 bits; returns `f32` `(rows, cols)`.
pub fn dequantize_packed(
    qweight: &[u8],
    rows: usize,
    cols: usize,
    scales: &[f32],
    zeros: &[f32],
    bits: u32,
    group_size: usize,
) -> Result<Vec<f32>> {
    qmax(bits)?;
    if bits == 8 {
        return dequantize(qweight, rows, cols, scales, zeros, group_size);
    }
    let ng = groups_per_row(cols, group_size)?;
    if !cols.is_multiple_of(2) || !group_size.is_multiple_of(2) {
        return Err(Error::value(format!(
            "INT4 needs an even in_features and group_size, got {cols} and {group_size}"
        )));
    }
    check_len("qweight", qweight.len(), rows, cols / 2)?;
    check_len("scales", scales.len(), rows, ng)?;
    check_len("zeros", zeros.len(), rows, ng)?;
    // rows * cols = 2 * qweight.len() (checked above).
    let mut w = try_zeroed::<f32>(rows * cols, "the dequantized weight")?;
    if w.is_empty() {
        return Ok(w);
    }
    crate::parallel::install(|| {
        w.par_chunks_mut(group_size)
            .zip(qweight.par_chunks(group_size / 2))
            .zip(scales.par_iter().zip(zeros.par_iter()))
            .for_each(|((wg, pg), (&s, &z))| {
                for (o, &b) in wg.chunks_exact_mut(2).zip(pg) {
                    o[0] = ((b & 15) as f32 - z) * s;
                    o[1] = ((b >> 4) as f32 - z) * s;
                }
            })
    });
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg_weights(n: usize, seed: u64) -> Vec<f32> {
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

    #[test]
    fn round_trip_error_is_at_most_half_a_step() {
        for bits in [4, 8] {
            for sym in [false, true] {
                for g in [32, 64, 128] {
                    let (rows, cols) = (5, 256);
                    let w = lcg_weights(rows * cols, bits as u64 + g as u64);
                    let (s, z) = choose_qparams(&w, rows, cols, bits, g, sym).unwrap();
                    let q = quantize(&w, rows, cols, &s, &z, bits, g).unwrap();
                    assert!(q.iter().all(|&c| c as u32 <= qmax(bits).unwrap()));
                    let d = dequantize(&q, rows, cols, &s, &z, g).unwrap();
                    for i in 0..w.len() {
                        let sc = s[i / g];
                        assert!((w[i] - d[i]).abs() <= sc * 0.5 * (1.0 + 1e-5) + 1e-7, "{i}");
                    }
                }
            }
        }
    }

    #[test]
    fn symmetric_zero_points_are_mid_range() {
        let w = lcg_weights(64, 3);
        let (_, z8) = choose_qparams(&w, 1, 64, 8, 64, true).unwrap();
        let (_, z4) = choose_qparams(&w, 1, 64, 4, 32, true).unwrap();
        assert_eq!(z8, vec![128.0]);
        assert_eq!(z4, vec![8.0, 8.0]);
    }

    #[test]
    fn zero_group_gets_positive_scale_and_exact_zeros() {
        let w = vec![0f32; 64];
        let (s, z) = choose_qparams(&w, 2, 32, 4, 32, false).unwrap();
        assert!(s.iter().all(|&v| v > 0.0));
        let q = quantize(&w, 2, 32, &s, &z, 4, 32).unwrap();
        let d = dequantize(&q, 2, 32, &s, &z, 32).unwrap();
        assert!(d.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn packed_dequantize_matches_unpacked() {
        let (rows, cols, g) = (3, 128, 32);
        let w = lcg_weights(rows * cols, 9);
        let (s, z) = choose_qparams(&w, rows, cols, 4, g, false).unwrap();
        let q = quantize(&w, rows, cols, &s, &z, 4, g).unwrap();
        let p = crate::quant::pack::pack_int4(&q).unwrap();
        let a = dequantize(&q, rows, cols, &s, &z, g).unwrap();
        let b = dequantize_packed(&p, rows, cols, &s, &z, 4, g).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let w = vec![1f32; 96];
        assert!(choose_qparams(&w, 1, 96, 4, 64, false).is_err());
        assert!(choose_qparams(&w, 1, 96, 3, 32, false).is_err());
        assert!(choose_qparams(&w, 1, 96, 8, 0, false).is_err());
        assert!(choose_qparams(&w, 2, 96, 8, 32, false).is_err());
        let mut bad = w.clone();
        bad[5] = f32::NAN;
        assert!(choose_qparams(&bad, 1, 96, 8, 32, false).is_err());
        let s = vec![0f32; 3];
        let z = vec![0f32; 3];
        assert!(quantize(&w, 1, 96, &s, &z, 8, 32).is_err());
        let s = vec![1f32; 3];
        let z = vec![0.5f32; 3];
        assert!(quantize(&w, 1, 96, &s, &z, 8, 32).is_err());
    }
}
