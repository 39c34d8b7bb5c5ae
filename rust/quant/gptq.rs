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
//!
//! SparseGPT (Frantar & Alistarh, 2023) is the same loop with a mask step ([`sparsegpt_block`]):
//! a pruned weight's target is 0 instead of its rounded value, the error is spread the same way,
//! and for N:M patterns the mask of each window of M columns is chosen when the loop reaches it,
//! from the error-corrected weights (`w^2 / Hinv[j, j]^2`, the M - N smallest pruned). Optional
//! quantization of the kept weights in the same pass. GPTQ's path is the `PRUNE = false` copy of
//! the loop and computes exactly what it computed before.

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
fn rows_tile<const R: usize, const FMA: bool, const PRUNE: bool>(
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
    mask: &mut [u8],
    pattern: Pattern,
) {
    let ng = cols / group_size;
    let maxq = ((1u32 << bits) - 1) as f32;
    let mut scale = [1f32; R];
    let mut zero = [0f32; R];
    let mut e = [0f32; R];
    let mut kept = [0f32; R];
    for i in 0..cols {
        let d = hinv[i * cols + i];
        if PRUNE && pattern.m > 0 && i % pattern.m == 0 {
            for r in 0..R {
                choose_window(
                    &w[r * cols..(r + 1) * cols],
                    hinv,
                    cols,
                    i,
                    pattern,
                    &mut mask[r * cols..],
                );
            }
        }
        for r in 0..R {
            if PRUNE {
                // SparseGPT: a pruned weight's target is 0; kept ones are rounded when quantizing.
                if pattern.quant && i % group_size == 0 {
                    let g = &w[r * cols + i..r * cols + i + group_size];
                    (scale[r], zero[r]) = group_params(g, maxq, symmetric);
                    scales[r * ng + i / group_size] = scale[r];
                    zeros[r * ng + i / group_size] = zero[r];
                }
                let x = w[r * cols + i];
                let v = if mask[r * cols + i] != 0 { 0.0 } else { x };
                kept[r] = if pattern.quant {
                    let q = ((v / scale[r]).round_ties_even() + zero[r]).clamp(0.0, maxq);
                    codes[r * cols + i] = q as u8;
                    (q - zero[r]) * scale[r]
                } else {
                    v
                };
                e[r] = (x - kept[r]) / d;
                err[r * cols + i] = e[r];
                continue;
            }
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
        if PRUNE {
            // The update above may have touched column i (FMA copies); it ends as its target.
            for r in 0..R {
                w[r * cols + i] = kept[r];
            }
        }
    }
}

/// The N:M pattern of SparseGPT's mask step: `n` kept of every `m` columns (`m = 0`: the mask
/// is given), and whether kept weights are quantized.
#[derive(Clone, Copy, Debug, Default)]
struct Pattern {
    n: usize,
    m: usize,
    quant: bool,
}

/// Marks (1 = pruned) the `m - n` columns of `i..i + m` with the smallest `w^2 / Hinv[j, j]^2`
/// in `mask` (the row's mask from column 0), ties to the lower column.
fn choose_window(row: &[f32], hinv: &[f32], cols: usize, i: usize, p: Pattern, mask: &mut [u8]) {
    let mut order: [(f32, usize); 64] = [(0.0, 0); 64];
    let win = &mut order[..p.m];
    for (o, j) in win.iter_mut().zip(i..i + p.m) {
        let d = hinv[j * cols + j];
        *o = (row[j] * row[j] / (d * d), j);
    }
    // Scores are finite and non-negative (checked inputs): a total order by value, then index.
    win.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for (rank, &(_, j)) in win.iter().enumerate() {
        mask[j] = u8::from(rank < p.m - p.n);
    }
}

/// Rows `(rows, cols)` in tiles of `ROW_TILE` (the remainder one by one).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rows_body<const FMA: bool, const PRUNE: bool>(
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
    mask: &mut [u8],
    pattern: Pattern,
) {
    if PRUNE {
        // One row at a time: the mask step and the unquantized case need no group slices.
        let ng = if pattern.quant { cols / group_size } else { 0 };
        let cw = if pattern.quant { cols } else { 0 };
        let rows = w.len() / cols;
        for r in 0..rows {
            rows_tile::<1, FMA, true>(
                &mut w[r * cols..(r + 1) * cols],
                cols,
                hinv,
                &mut codes[r * cw..(r + 1) * cw],
                &mut err[r * cols..(r + 1) * cols],
                &mut scales[r * ng..(r + 1) * ng],
                &mut zeros[r * ng..(r + 1) * ng],
                group_size,
                bits,
                symmetric,
                &mut mask[r * cols..(r + 1) * cols],
                pattern,
            );
        }
        return;
    }
    let ng = cols / group_size;
    let rows = w.len() / cols;
    let tiled = rows / ROW_TILE * ROW_TILE;
    let (wt, wr) = w.split_at_mut(tiled * cols);
    let (ct, cr) = codes.split_at_mut(tiled * cols);
    let (et, er) = err.split_at_mut(tiled * cols);
    let (st, sr) = scales.split_at_mut(tiled * ng);
    let (zt, zr) = zeros.split_at_mut(tiled * ng);
    let tile = ROW_TILE * cols;
    let p = Pattern::default();
    for ((((w, c), e), s), z) in wt
        .chunks_exact_mut(tile)
        .zip(ct.chunks_exact_mut(tile))
        .zip(et.chunks_exact_mut(tile))
        .zip(st.chunks_exact_mut(ROW_TILE * ng))
        .zip(zt.chunks_exact_mut(ROW_TILE * ng))
    {
        rows_tile::<ROW_TILE, FMA, false>(
            w,
            cols,
            hinv,
            c,
            e,
            s,
            z,
            group_size,
            bits,
            symmetric,
            &mut [],
            p,
        );
    }
    for ((((w, c), e), s), z) in wr
        .chunks_exact_mut(cols)
        .zip(cr.chunks_exact_mut(cols))
        .zip(er.chunks_exact_mut(cols))
        .zip(sr.chunks_exact_mut(ng))
        .zip(zr.chunks_exact_mut(ng))
    {
        rows_tile::<1, FMA, false>(
            w,
            cols,
            hinv,
            c,
            e,
            s,
            z,
            group_size,
            bits,
            symmetric,
            &mut [],
            p,
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx512<const PRUNE: bool>(
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
    mask: &mut [u8],
    pattern: Pattern,
) {
    rows_body::<true, PRUNE>(
        w, cols, hinv, codes, err, scales, zeros, group_size, bits, symmetric, mask, pattern,
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_avx2<const PRUNE: bool>(
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
    mask: &mut [u8],
    pattern: Pattern,
) {
    rows_body::<true, PRUNE>(
        w, cols, hinv, codes, err, scales, zeros, group_size, bits, symmetric, mask, pattern,
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
    let p = Pattern::default();
    let run = |(((w, codes), err), (scales, zeros)): TaskSlices<'_>| {
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `isa` is at most what `detect_isa` found on this CPU (checked above).
            Isa::Avx512 | Isa::Avx512Vnni => unsafe {
                rows_avx512::<false>(
                    w,
                    cols,
                    hinv,
                    codes,
                    err,
                    scales,
                    zeros,
                    group_size,
                    bits,
                    symmetric,
                    &mut [],
                    p,
                )
            },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Isa::Avx2Fma => unsafe {
                rows_avx2::<false>(
                    w,
                    cols,
                    hinv,
                    codes,
                    err,
                    scales,
                    zeros,
                    group_size,
                    bits,
                    symmetric,
                    &mut [],
                    p,
                )
            },
            _ => rows_body::<false, false>(
                w,
                cols,
                hinv,
                codes,
                err,
                scales,
                zeros,
                group_size,
                bits,
                symmetric,
                &mut [],
                p,
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

/// Output of [`sparsegpt_block`]: the mask (1 = pruned) and errors `(rows, cols)`; with
/// quantization also codes `(rows, cols)` and group parameters `(rows, cols / group_size)`
/// (empty otherwise).
pub struct SparseBlockResult {
    pub mask: Vec<u8>,
    pub err: Vec<f32>,
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
    pub zeros: Vec<f32>,
}

/// How [`sparsegpt_block`] picks the pruned weights.
#[derive(Clone, Copy, Debug)]
pub enum SparseMask<'a> {
    /// A mask `(rows, cols)` chosen for the whole block (1 = pruned): SparseGPT's unstructured
    /// mode picks it from the block's weights at the block's start.
    Given(&'a [u8]),
    /// `n` kept in every window of `m` columns (`m` at most 64, dividing `cols`), chosen when the
    /// loop reaches the window.
    NM(usize, usize),
}

/// SparseGPT over one block: GPTQ's column loop where a pruned weight's target is 0 and a kept
/// weight's target is itself (or its rounded value with `quant = Some((bits, group_size,
/// symmetric))`). `w` `(rows, cols)` is updated in place and ends holding the block's final
/// weights (0 where pruned); `hinv` as for [`gptq_block`]. Errors feed the caller's lazy update
/// of the later columns, as in GPTQ.
pub fn sparsegpt_block(
    w: &mut [f32],
    rows: usize,
    cols: usize,
    hinv: &[f32],
    mask: SparseMask,
    quant: Option<(u32, usize, bool)>,
) -> Result<SparseBlockResult> {
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
    if let Some(i) = w.iter().position(|x| !x.is_finite()) {
        return Err(Error::value(format!(
            "w[{}, {}] = {} is not finite",
            i / cols.max(1),
            i % cols.max(1),
            w[i]
        )));
    }
    let (bits, group_size, symmetric) = quant.unwrap_or((8, cols.max(1), false));
    if quant.is_some() {
        if !(2..=8).contains(&bits) {
            return Err(Error::value(format!("bits must be in 2..=8, got {bits}")));
        }
        if group_size == 0 || !cols.is_multiple_of(group_size) {
            return Err(Error::value(format!(
                "group_size {group_size} must divide the block's {cols} columns"
            )));
        }
    }
    let mut out_mask: Vec<u8> = try_zeroed(rows * cols, "the SparseGPT mask")?;
    let pattern = match mask {
        SparseMask::Given(m) => {
            super::check_len("mask", m.len(), rows, cols)?;
            out_mask.copy_from_slice(m);
            Pattern {
                n: 0,
                m: 0,
                quant: quant.is_some(),
            }
        }
        SparseMask::NM(n, m) => {
            crate::prune::check_nm(n, m, cols)?;
            if m > 64 {
                return Err(Error::value(format!("M must be at most 64, got {m}")));
            }
            Pattern {
                n,
                m,
                quant: quant.is_some(),
            }
        }
    };
    let (qc, ng) = if quant.is_some() {
        (cols, cols / group_size)
    } else {
        (0, 0)
    };
    let mut out = SparseBlockResult {
        mask: out_mask,
        err: try_zeroed(rows * cols, "the SparseGPT errors")?,
        codes: try_zeroed(rows * qc, "the SparseGPT codes")?,
        scales: try_zeroed(rows * ng, "the SparseGPT scales")?,
        zeros: try_zeroed(rows * ng, "the SparseGPT zero points")?,
    };
    if rows * cols == 0 {
        return Ok(out);
    }
    let isa = detect_isa();
    let task = ROWS_PER_TASK;
    let run = |((((w, mask), err), codes), (scales, zeros)): SparseTaskSlices<'_>| match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is what `detect_isa` found on this CPU.
        Isa::Avx512 | Isa::Avx512Vnni => unsafe {
            rows_avx512::<true>(
                w, cols, hinv, codes, err, scales, zeros, group_size, bits, symmetric, mask,
                pattern,
            )
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2Fma => unsafe {
            rows_avx2::<true>(
                w, cols, hinv, codes, err, scales, zeros, group_size, bits, symmetric, mask,
                pattern,
            )
        },
        _ => rows_body::<false, true>(
            w, cols, hinv, codes, err, scales, zeros, group_size, bits, symmetric, mask, pattern,
        ),
    };
    // Empty outputs (no quantization) still need one (empty) slice per task.
    let n_tasks = rows.div_ceil(task);
    let codes: Vec<&mut [u8]> = if qc > 0 {
        out.codes.chunks_mut(task * qc).collect()
    } else {
        (0..n_tasks).map(|_| <&mut [u8]>::default()).collect()
    };
    let scales: Vec<&mut [f32]> = if ng > 0 {
        out.scales.chunks_mut(task * ng).collect()
    } else {
        (0..n_tasks).map(|_| <&mut [f32]>::default()).collect()
    };
    let zeros: Vec<&mut [f32]> = if ng > 0 {
        out.zeros.chunks_mut(task * ng).collect()
    } else {
        (0..n_tasks).map(|_| <&mut [f32]>::default()).collect()
    };
    let chunks: Vec<SparseTaskSlices<'_>> = w
        .chunks_mut(task * cols)
        .zip(out.mask.chunks_mut(task * cols))
        .zip(out.err.chunks_mut(task * cols))
        .zip(codes)
        .zip(scales.into_iter().zip(zeros))
        .collect();
    if rows > task && crate::parallel::num_threads() > 1 {
        crate::parallel::install(|| chunks.into_par_iter().for_each(run));
    } else {
        chunks.into_iter().for_each(run);
    }
    Ok(out)
}

/// One rayon task's rows for SparseGPT: `((((w, mask), err), codes), (scales, zeros))`.
type SparseTaskSlices<'a> = (
    (((&'a mut [f32], &'a mut [u8]), &'a mut [f32]), &'a mut [u8]),
    (&'a mut [f32], &'a mut [f32]),
);

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

    /// SparseGPT's loop for one row, transcribed: prune to 0 (N:M windows chosen on arrival),
    /// spread the error over the later columns. Returns the final row and its mask.
    fn sparse_reference(
        w: &[f32],
        cols: usize,
        hinv: &[f32],
        given: Option<&[u8]>,
        nm: (usize, usize),
    ) -> (Vec<f32>, Vec<u8>) {
        let mut w = w.to_vec();
        let mut mask = given.map_or(vec![0u8; cols], |m| m.to_vec());
        let mut out = vec![0f32; cols];
        for i in 0..cols {
            if nm.1 > 0 && i % nm.1 == 0 {
                let mut order: Vec<(f32, usize)> = (i..i + nm.1)
                    .map(|j| (w[j] * w[j] / (hinv[j * cols + j] * hinv[j * cols + j]), j))
                    .collect();
                order.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
                for (rank, &(_, j)) in order.iter().enumerate() {
                    mask[j] = u8::from(rank < nm.1 - nm.0);
                }
            }
            let x = w[i];
            let t = if mask[i] != 0 { 0.0 } else { x };
            let e = (x - t) / hinv[i * cols + i];
            for j in i + 1..cols {
                w[j] -= e * hinv[i * cols + j];
            }
            out[i] = t;
        }
        (out, mask)
    }

    #[test]
    fn sparsegpt_matches_the_column_loop() {
        let (rows, cols) = (37, 64);
        let mut seed = 11;
        let w: Vec<f32> = (0..rows * cols).map(|_| lcg(&mut seed)).collect();
        let mut hinv = vec![0f32; cols * cols];
        for i in 0..cols {
            hinv[i * cols + i] = 1.0 + lcg(&mut seed).abs();
            for j in i + 1..cols {
                hinv[i * cols + j] = 0.2 * lcg(&mut seed);
            }
        }
        let given: Vec<u8> = (0..rows * cols).map(|i| u8::from(i * 7 % 10 < 5)).collect();
        for case in 0..3 {
            let (mask, nm) = match case {
                0 => (SparseMask::Given(&given), (0, 0)),
                1 => (SparseMask::NM(2, 4), (2, 4)),
                _ => (SparseMask::NM(3, 8), (3, 8)),
            };
            let mut wk = w.clone();
            let got = sparsegpt_block(&mut wk, rows, cols, &hinv, mask, None).unwrap();
            let mut mask_differ = 0;
            for r in 0..rows {
                let g = (case == 0).then(|| &given[r * cols..(r + 1) * cols]);
                let (want, want_mask) =
                    sparse_reference(&w[r * cols..(r + 1) * cols], cols, &hinv, g, nm);
                mask_differ += want_mask
                    .iter()
                    .zip(&got.mask[r * cols..(r + 1) * cols])
                    .filter(|(a, b)| a != b)
                    .count();
                if want_mask == got.mask[r * cols..(r + 1) * cols] {
                    for (a, b) in want.iter().zip(&wk[r * cols..(r + 1) * cols]) {
                        assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
                    }
                }
                for (j, &x) in wk[r * cols..(r + 1) * cols].iter().enumerate() {
                    assert_eq!(
                        x == 0.0,
                        got.mask[r * cols + j] == 1 || w[r * cols + j] == 0.0
                    );
                }
            }
            // FMA copies round the update once: a near-tie of scores may flip.
            assert!(
                mask_differ <= rows * cols / 100,
                "case {case}: {mask_differ} differ"
            );
            if nm.1 > 0 {
                for win in got.mask.chunks(nm.1) {
                    assert_eq!(win.iter().filter(|&&b| b == 1).count(), nm.1 - nm.0);
                }
            }
        }
        // With quantization: kept weights land on the grid, pruned ones on 0 (code = zero).
        let mut wk = w.clone();
        let got = sparsegpt_block(
            &mut wk,
            rows,
            cols,
            &hinv,
            SparseMask::NM(2, 4),
            Some((4, 32, false)),
        )
        .unwrap();
        for (i, &wi) in wk.iter().enumerate() {
            let (r, c) = (i / cols, i % cols);
            let (s, z) = (got.scales[r * 2 + c / 32], got.zeros[r * 2 + c / 32]);
            assert_eq!(wi, (got.codes[i] as f32 - z) * s);
            if got.mask[i] == 1 {
                assert_eq!(got.codes[i] as f32, z);
            }
        }
    }

    #[test]
    fn sparsegpt_bad_arguments_are_errors() {
        let mut w = vec![0f32; 8];
        let h: Vec<f32> = (0..16)
            .map(|i| if i % 5 == 0 { 1.0 } else { 0.0 })
            .collect();
        assert!(sparsegpt_block(&mut w, 2, 4, &h, SparseMask::NM(3, 2), None).is_err());
        assert!(sparsegpt_block(&mut w, 2, 4, &h, SparseMask::NM(2, 3), None).is_err());
        assert!(sparsegpt_block(&mut w, 2, 4, &h, SparseMask::Given(&[0; 7]), None).is_err());
        assert!(
            sparsegpt_block(&mut w, 2, 4, &h, SparseMask::NM(2, 4), Some((4, 3, false))).is_err()
        );
        w[3] = f32::NAN;
        assert!(sparsegpt_block(&mut w, 2, 4, &h, SparseMask::NM(2, 4), None).is_err());
        let mut w = vec![1f32; 8];
        assert!(sparsegpt_block(&mut w, 2, 4, &h, SparseMask::NM(2, 4), None).is_ok());
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
