//! GPTQ's inner column loop for one block of columns (Frantar et al., 2022).
//!
//! The Python driver (`slimforge.quant.gptq`) owns the Hessian, its inverse Cholesky factor,
//! act-order and the lazy rank-`block` update of the columns after the block (one GEMM). This
//! kernel does the part that is a long chain of small steps: for each column of the block,
//! quantize it, turn the rounding error into `err = (w - dequant) / Hinv[i, i]` and subtract
//! `err * Hinv[i, j]` from every later column `j` of the block. Rows (output channels) are
//! independent in that loop, so each row runs start to finish on one thread with its 4-byte
//! columns and the block of `Hinv` in cache, instead of one pass over all rows per column.
//!
//! Group parameters are [`super::affine::group_qparams`] (the crate's one affine rule) of the
//! group's already error-corrected columns; codes `clamp(round(w / scale) + zero, 0, 2^bits - 1)`.

use rayon::prelude::*;

use super::affine::group_qparams;
use super::gemv::{detect_isa, Isa};
use crate::error::{try_zeroed, Error, Result};

/// Rows per rayon task (a task must amortise its hop; one row of a 128-column block is ~8k FMAs).
const ROWS_PER_TASK: usize = 16;

/// One rayon task's rows: `((w, codes), err)` and `(scales, zeros)`.
type TaskSlices<'a> = (
    ((&'a mut [f32], &'a mut [u8]), &'a mut [f32]),
    (&'a mut [f32], &'a mut [f32]),
);

/// Output of [`gptq_block`]: codes and errors `(rows, cols)`, group parameters
/// `(rows, cols / group_size)`.
pub struct BlockResult {
    pub codes: Vec<u8>,
    pub err: Vec<f32>,
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
}

fn group_params(g: &[f32], maxq: f32, symmetric: bool) -> (f32, f32) {
    group_qparams(g, maxq as f64, symmetric)
}

/// Rows quantized together: their scalar steps (group parameters, rounding, the division by
/// `Hinv[i, i]`) are independent, so the core overlaps them.
const ROW_TILE: usize = 4;

/// `R` rows of the block (`w` is `(R, cols)` row-major), quantized column by column; codes,
/// errors `(R, cols)` and group parameters `(R, cols / group_size)` go to the matching slices.
/// `FMA`: fuse the update `w -= e * h` (the x86 copies); the portable copy multiplies and
/// subtracts.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_tile<const R: usize, const FMA: bool>(
    w: &mut [f32],
    cols: usize,
    hinv: &[f32],
    codes: &mut [u8],
    err: &mut [f32],
    scales: &mut [f32],
    zeros: &mut [f32],
    group_size: usize,
    bits: u32,
    symmetric: bool,
) {
    let ng = cols / group_size;
    let maxq = ((1u32 << bits) - 1) as f32;
    let mut scale = [1f32; R];
    let mut zero = [0f32; R];
    let mut e = [0f32; R];
    for i in 0..cols {
        let d = hinv[i * cols + i];
        for r in 0..R {
            if i % group_size == 0 {
                let g = &w[r * cols + i..r * cols + i + group_size];
                (scale[r], zero[r]) = group_params(g, maxq, symmetric);
                scales[r * ng + i / group_size] = scale[r];
                zeros[r * ng + i / group_size] = zero[r];
            }
            let x = w[r * cols + i];
            let q = ((x / scale[r]).round_ties_even() + zero[r]).clamp(0.0, maxq);
            e[r] = (x - (q - zero[r]) * scale[r]) / d;
            codes[r * cols + i] = q as u8;
            err[r * cols + i] = e[r];
        }
        // Columns i+1.. need the update; starting at the 16-column boundary below i+1 keeps the
        // loop free of a scalar head. That also touches columns <= i, which is harmless: they are
        // never read again (columns < i get h = 0 from the upper-triangular Hinv, column i ends
        // up holding its dequantized value), so only what is left in `w` differs between copies.
        let start = if FMA { (i + 1) & !15 } else { i + 1 };
        let h = &hinv[i * cols + start..(i + 1) * cols];
        for (row, &er) in w.chunks_exact_mut(cols).zip(&e) {
            for (t, &hj) in row[start..].iter_mut().zip(h) {
                *t = if FMA {
                    (-er).mul_add(hj, *t)
                } else {
                    *t - er * hj
                };
            }
        }
    }
}

/// Rows `(rows, cols)` in tiles of `ROW_TILE` (the remainder one by one).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_body<const FMA: bool>(
    w: &mut [f32],
    cols: usize,
    hinv: &[f32],
    codes: &mut [u8],
    err: &mut [f32],
    scales: &mut [f32],
    zeros: &mut [f32],
    group_size: usize,
    bits: u32,
    symmetric: bool,
) {
    let ng = cols / group_size;
    let rows = w.len() / cols;
    let tiled = rows / ROW_TILE * ROW_TILE;
    let (wt, wr) = w.split_at_mut(tiled * cols);
    let (ct, cr) = codes.split_at_mut(tiled * cols);
    let (et, er) = err.split_at_mut(tiled * cols);
    let (st, sr) = scales.split_at_mut(tiled * ng);
    let (zt, zr) = zeros.split_at_mut(tiled * ng);
    let tile = ROW_TILE * cols;
    for ((((w, c), e), s), z) in wt
        .chunks_exact_mut(tile)
        .zip(ct.chunks_exact_mut(tile))
        .zip(et.chunks_exact_mut(tile))
        .zip(st.chunks_exact_mut(ROW_TILE * ng))
        .zip(zt.chunks_exact_mut(ROW_TILE * ng))
    {
        rows_tile::<ROW_TILE, FMA>(w, cols, hinv, c, e, s, z, group_size, bits, symmetric);
    }
    for ((((w, c), e), s), z) in wr
        .chunks_exact_mut(cols)
        .zip(cr.chunks_exact_mut(cols))
        .zip(er.chunks_exact_mut(cols))
        .zip(sr.chunks_exact_mut(ng))
        .zip(zr.chunks_exact_mut(ng))
    {
        rows_tile::<1, FMA>(w, cols, hinv, c, e, s, z, group_size, bits, symmetric);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512(
    w: &mut [f32],
    cols: usize,
    hinv: &[f32],
    codes: &mut [u8],
    err: &mut [f32],
    scales: &mut [f32],
    zeros: &mut [f32],
    group_size: usize,
    bits: u32,
    symmetric: bool,
) {
    rows_body::<true>(
        w, cols, hinv, codes, err, scales, zeros, group_size, bits, symmetric,
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx2(
    w: &mut [f32],
    cols: usize,
    hinv: &[f32],
    codes: &mut [u8],
    err: &mut [f32],
    scales: &mut [f32],
    zeros: &mut [f32],
    group_size: usize,
    bits: u32,
    symmetric: bool,
) {
    rows_body::<true>(
        w, cols, hinv, codes, err, scales, zeros, group_size, bits, symmetric,
    )
}

/// GPTQ over one block: `w` `(rows, cols)` row-major holds the block's columns of every output
/// row (error-corrected by earlier blocks) and is updated in place; `hinv` `(cols, cols)` is the
/// block's diagonal block of the upper Cholesky factor of `H^-1`. Groups of `group_size` columns
/// start at column 0 of the block (`group_size` must divide `cols`). `bits` in 2..=8.
pub fn gptq_block(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    hinv: &[f32],
    bits: u32,
    group_size: usize,
    symmetric: bool,
) -> Result<BlockResult> {
    gptq_block_with_isa(
        w,
        rows,
        cols,
        hinv,
        bits,
        group_size,
        symmetric,
        detect_isa(),
    )
}

/// As [`gptq_block`], with the instruction set forced (at most the detected one), for tests.
#[allow(clippy::too_many_arguments)]
pub fn gptq_block_with_isa(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    hinv: &[f32],
    bits: u32,
    group_size: usize,
    symmetric: bool,
    isa: Isa,
) -> Result<BlockResult> {
    if isa > detect_isa() {
        return Err(Error::runtime(format!(
            "this CPU does not support {}",
            isa.name()
        )));
    }
    if !(2..=8).contains(&bits) {
        return Err(Error::value(format!("bits must be in 2..=8, got {bits}")));
    }
    if group_size == 0 || !cols.is_multiple_of(group_size) {
        return Err(Error::value(format!(
            "group_size {group_size} must divide the block's {cols} columns"
        )));
    }
    super::check_len("w", w.len(), rows, cols)?;
    super::check_len("hinv", hinv.len(), cols, cols)?;
    if let Some(i) = (0..cols)
        .find(|&i| hinv[i * cols + i].partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater))
    {
        return Err(Error::value(format!(
            "hinv[{i}, {i}] = {} is not positive (not a Cholesky factor)",
            hinv[i * cols + i]
        )));
    }
    let ng = cols / group_size;
    // rows * cols = w.len() (checked above), rows * ng <= rows * cols.
    let mut out = BlockResult {
        codes: try_zeroed(rows * cols, "the GPTQ codes")?,
        err: try_zeroed(rows * cols, "the GPTQ errors")?,
        scales: try_zeroed(rows * ng, "the GPTQ scales")?,
        zeros: try_zeroed(rows * ng, "the GPTQ zero points")?,
    };
    if rows * cols == 0 {
        return Ok(out);
    }
    let run = |(((w, codes), err), (scales, zeros)): TaskSlices<'_>| {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is at most what `detect_isa` found on this CPU (checked above).
            Isa::Avx512 | Isa::Avx512Vnni => unsafe {
                rows_avx512(
                    w, cols, hinv, codes, err, scales, zeros, group_size, bits, symmetric,
                )
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2Fma => unsafe {
                rows_avx2(
                    w, cols, hinv, codes, err, scales, zeros, group_size, bits, symmetric,
                )
            },
            _ => rows_body::<false>(
                w, cols, hinv, codes, err, scales, zeros, group_size, bits, symmetric,
            ),
        }
    };
    let task = ROWS_PER_TASK;
    let chunks = w
        .chunks_mut(task * cols)
        .zip(out.codes.chunks_mut(task * cols))
        .zip(out.err.chunks_mut(task * cols))
        .zip(
            out.scales
                .chunks_mut(task * ng)
                .zip(out.zeros.chunks_mut(task * ng)),
        );
    if rows > task && crate::parallel::num_threads() > 1 {
        let chunks: Vec<_> = chunks.collect();
        crate::parallel::install(|| chunks.into_par_iter().for_each(run));
    } else {
        chunks.for_each(run);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain transcription of the column loop, one row at a time, without the task split.
    fn reference(
        w: &[f32],
        rows: usize,
        cols: usize,
        hinv: &[f32],
        bits: u32,
        gs: usize,
        sym: bool,
    ) -> Vec<u8> {
        let mut w = w.to_vec();
        let mut codes = vec![0u8; rows * cols];
        for r in 0..rows {
            let (mut s, mut z) = (1f32, 0f32);
            for i in 0..cols {
                if i % gs == 0 {
                    let g = &w[r * cols + i..r * cols + i + gs];
                    (s, z) = group_params(g, ((1u32 << bits) - 1) as f32, sym);
                }
                let x = w[r * cols + i];
                let q = ((x / s).round_ties_even() + z).clamp(0.0, ((1u32 << bits) - 1) as f32);
                codes[r * cols + i] = q as u8;
                let e = (x - (q - z) * s) / hinv[i * cols + i];
                for j in i + 1..cols {
                    w[r * cols + j] -= e * hinv[i * cols + j];
                }
            }
        }
        codes
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    }

    #[test]
    fn matches_the_column_loop() {
        let (rows, cols) = (37, 64);
        let mut seed = 7;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
        // An upper-triangular factor with a positive diagonal.
        let mut hinv = vec![0f32; cols * cols];
        for i in 0..cols {
            hinv[i * cols + i] = 1.0 + lcg(&mut seed).abs();
            for j in i + 1..cols {
                hinv[i * cols + j] = 0.2 * lcg(&mut seed);
            }
        }
        for (bits, gs, sym) in [
            (4, 16, false),
            (3, 64, false),
            (8, 32, false),
            (2, 8, false),
            (4, 16, true),
            (3, 32, true),
        ] {
            let want = reference(&w, rows, cols, &hinv, bits, gs, sym);
            // The portable copy does the same operations in the same order: identical codes.
            let mut wk = w.clone();
            let got = gptq_block_with_isa(&mut wk, rows, cols, &hinv, bits, gs, sym, Isa::Portable)
                .unwrap();
            assert_eq!(got.codes, want);
            // The x86 copies fuse the update (one rounding instead of two): a code on a rounding
            // tie may flip and the flip moves its row's later codes by a step or so.
            let mut wk = w.clone();
            let got = gptq_block(&mut wk, rows, cols, &hinv, bits, gs, sym).unwrap();
            let differ = got.codes.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert!(differ <= rows * cols / 20, "{differ} codes differ");
            assert!(got.codes.iter().all(|&c| (c as u32) < (1 << bits)));
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let mut w = vec![0f32; 8];
        let h = vec![1f32; 16];
        assert!(gptq_block(&mut w, 2, 4, &h, 1, 4, false).is_err());
        assert!(gptq_block(&mut w, 2, 4, &h, 4, 3, false).is_err());
        assert!(gptq_block(&mut w, 2, 4, &h[..8], 4, 4, false).is_err());
        let mut h0 = h.clone();
        h0[5] = 0.0;
        assert!(gptq_block(&mut w, 2, 4, &h0, 4, 4, false).is_err());
    }
}
