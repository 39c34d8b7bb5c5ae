//! The k smallest scores across many tensors, by radix selection (no sort, no concatenation).
//!
//! A global magnitude threshold over a whole model is the k-th smallest `|w|` of all its
//! weights. `torch.kthvalue` / `torch.topk` need the scores concatenated into one tensor first
//! (a copy of the model) and then partition it; here every float is mapped to a `u32` key whose
//! unsigned order is the float order ([`super::order_key`]) and two histogram passes over the
//! tensors in place (the high 16 bits, then the low 16 bits inside the one high bin that holds
//! the k-th key) find the exact k-th key. Tensors are read in chunks, in parallel.
//!
//! Ties are broken by position, so a mask is a function of the scores alone: of the elements
//! equal to the threshold, the earliest ones (tensor order, then index) are pruned first, exactly
//! what a stable sort of the concatenated scores would prune.

use rayon::prelude::*;

use super::{check_no_nan, key_value, order_key};
use crate::error::{try_with_capacity, Error, Result};

/// Elements per parallel task.
const CHUNK: usize = 1 << 18;
const BINS: usize = 1 << 16;

/// Where the `k` smallest elements end.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Selection {
    /// Elements pruned.
    pub k: usize,
    /// Key of the largest pruned element (0 when `k == 0`).
    pub key: u32,
    /// Its value (`|w|` for absolute scores); `-inf` when `k == 0`.
    pub threshold: f32,
    /// Pruned elements equal to the threshold: the first `ties` of them in position order.
    pub ties: usize,
    /// Elements equal to the threshold in all.
    pub equal: usize,
}

impl Selection {
    fn none() -> Self {
        Selection {
            k: 0,
            key: 0,
            threshold: f32::NEG_INFINITY,
            ties: 0,
            equal: 0,
        }
    }
}

fn total_len(tensors: &[&[f32]]) -> usize {
    tensors.iter().map(|t| t.len()).sum()
}

/// Histogram of the high 16 bits of every key (`high = None`), or of the low 16 bits of the keys
/// whose high bits are `high`.
fn histogram(tensors: &[&[f32]], absolute: bool, high: Option<u32>) -> Vec<u64> {
    let pieces: Vec<&[f32]> = tensors.iter().flat_map(|t| t.chunks(CHUNK)).collect();
    let count = |mut h: Vec<u64>, piece: &&[f32]| {
        match high {
            None => {
                for &x in piece.iter() {
                    h[(order_key(x, absolute) >> 16) as usize] += 1;
                }
            }
            Some(hi) => {
                for &x in piece.iter() {
                    let k = order_key(x, absolute);
                    if k >> 16 == hi {
                        h[(k & 0xffff) as usize] += 1;
                    }
                }
            }
        }
        h
    };
    let add = |mut a: Vec<u64>, b: Vec<u64>| {
        for (x, y) in a.iter_mut().zip(&b) {
            *x += y;
        }
        a
    };
    if pieces.len() > 1 && crate::parallel::num_threads() > 1 {
        crate::parallel::install(|| {
            pieces
                .par_iter()
                .fold(|| vec![0u64; BINS], count)
                .reduce(|| vec![0u64; BINS], add)
        })
    } else {
        pieces.iter().fold(vec![0u64; BINS], count)
    }
}

/// Bin holding the element of rank `rank` (0-based) and the count of elements in earlier bins.
fn find_bin(hist: &[u64], rank: u64) -> (usize, u64) {
    let mut before = 0u64;
    for (b, &c) in hist.iter().enumerate() {
        if before + c > rank {
            return (b, before);
        }
        before += c;
    }
    unreachable!("rank {rank} is beyond the histogram's {before} elements")
}

/// Elements sampled to bracket the threshold.
const SAMPLE: usize = 1 << 16;

/// One pass instead of two when a sample brackets the k-th key: the keys between two sample
/// quantiles around rank `k` are collected (a small fraction of the input) and the count below
/// them tallied, then the k-th key is selected among the collected ones. `None` when the input
/// is small or the bracket missed (the radix passes then run).
fn select_by_sample(tensors: &[&[f32]], n: usize, k: usize, absolute: bool) -> Option<Selection> {
    if n < 4 * SAMPLE {
        return None;
    }
    // Evenly strided sample of keys over the whole sequence.
    let stride = n / SAMPLE;
    let mut sample = Vec::with_capacity(SAMPLE + 1);
    let (mut t, mut off) = (0usize, 0usize);
    for i in (0..n).step_by(stride) {
        while i - off >= tensors[t].len() {
            off += tensors[t].len();
            t += 1;
        }
        sample.push(order_key(tensors[t][i - off], absolute));
    }
    sample.sort_unstable();
    let s = sample.len();
    let at = ((k as f64 / n as f64) * s as f64) as usize;
    let margin = 4 * (s as f64).sqrt() as usize + 16;
    let lo = if at > margin { sample[at - margin] } else { 0 };
    let hi = if at + margin < s {
        sample[at + margin]
    } else {
        u32::MAX
    };
    let pieces: Vec<&[f32]> = tensors.iter().flat_map(|t| t.chunks(CHUNK)).collect();
    #[cfg(target_arch = "x86_64")]
    let avx512 = crate::quant::gemv::detect_isa() >= crate::quant::gemv::Isa::Avx512;
    let scan = |piece: &&[f32]| -> (usize, Vec<u32>) {
        let mut inside = Vec::new();
        #[cfg(target_arch = "x86_64")]
        if avx512 {
            // SAFETY: AVX-512 F detected above.
            let below = unsafe { scan_avx512(piece, absolute, lo, hi, &mut inside) };
            return (below, inside);
        }
        let mut below = 0usize;
        for &x in piece.iter() {
            let key = order_key(x, absolute);
            below += usize::from(key < lo);
            if key >= lo && key <= hi {
                inside.push(key);
            }
        }
        (below, inside)
    };
    let parts: Vec<(usize, Vec<u32>)> = if pieces.len() > 1 && crate::parallel::num_threads() > 1 {
        crate::parallel::install(|| pieces.par_iter().map(scan).collect())
    } else {
        pieces.iter().map(scan).collect()
    };
    let below: usize = parts.iter().map(|p| p.0).sum();
    let mut inside: Vec<u32> = parts.into_iter().flat_map(|p| p.1).collect();
    if k <= below || k > below + inside.len() {
        return None;
    }
    let (_, &mut key, _) = inside.select_nth_unstable(k - 1 - below);
    let less = inside.iter().filter(|&&x| x < key).count();
    let equal = inside.iter().filter(|&&x| x == key).count();
    Some(Selection {
        k,
        key,
        threshold: key_value(key, absolute),
        ties: k - below - less,
        equal,
    })
}

/// The bracket scan with AVX-512: 16 keys per step, the count below `lo` by a mask popcount and
/// the keys in `[lo, hi]` appended by one compress-store. Returns the count below.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn scan_avx512(x: &[f32], absolute: bool, lo: u32, hi: u32, out: &mut Vec<u32>) -> usize {
    use std::arch::x86_64::*;
    let (vlo, vhi) = (_mm512_set1_epi32(lo as i32), _mm512_set1_epi32(hi as i32));
    let top = _mm512_set1_epi32(i32::MIN);
    let low31 = _mm512_set1_epi32(i32::MAX);
    let mut below = 0usize;
    let body = x.len() / 16 * 16;
    out.reserve(64);
    for i in (0..body).step_by(16) {
        let b = _mm512_loadu_si512(x.as_ptr().add(i) as *const _);
        let key = if absolute {
            _mm512_and_si512(b, low31)
        } else {
            // -0.0 sorts with +0.0; negative floats flip all bits, positive ones the sign bit.
            let b = _mm512_maskz_mov_epi32(_mm512_cmpneq_epi32_mask(b, top), b);
            _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), top))
        };
        below += _mm512_cmplt_epu32_mask(key, vlo).count_ones() as usize;
        let keep = _mm512_cmpge_epu32_mask(key, vlo) & _mm512_cmple_epu32_mask(key, vhi);
        if keep != 0 {
            if out.capacity() - out.len() < 16 {
                out.reserve(out.len().max(64));
            }
            let len = out.len();
            _mm512_mask_compressstoreu_epi32(out.as_mut_ptr().add(len) as *mut _, keep, key);
            out.set_len(len + keep.count_ones() as usize);
        }
    }
    for &v in &x[body..] {
        let key = order_key(v, absolute);
        below += usize::from(key < lo);
        if key >= lo && key <= hi {
            out.push(key);
        }
    }
    below
}

/// The `k` smallest elements over all `tensors` (as one sequence, in order): the threshold key
/// and how many elements equal to it are pruned. `absolute`: order by `|x|`. `k` may be 0 or
/// the total length; NaN is an error.
pub fn select_k_smallest(tensors: &[&[f32]], k: usize, absolute: bool) -> Result<Selection> {
    let n = total_len(tensors);
    if k > n {
        return Err(Error::value(format!("cannot prune {k} of {n} elements")));
    }
    for (i, t) in tensors.iter().enumerate() {
        check_no_nan(&format!("tensor {i}"), t)?;
    }
    if k == 0 {
        return Ok(Selection::none());
    }
    let rank = (k - 1) as u64;
    if let Some(sel) = select_by_sample(tensors, n, k, absolute) {
        return Ok(sel);
    }
    let h1 = histogram(tensors, absolute, None);
    let (hi, before_hi) = find_bin(&h1, rank);
    let h2 = histogram(tensors, absolute, Some(hi as u32));
    let (lo, before_lo) = find_bin(&h2, rank - before_hi);
    let key = ((hi as u32) << 16) | lo as u32;
    let below = (before_hi + before_lo) as usize;
    Ok(Selection {
        k,
        key,
        threshold: key_value(key, absolute),
        ties: k - below,
        equal: h2[lo] as usize,
    })
}

/// Writes keep-masks (`true` = keep) for a [`Selection`] of `tensors`: elements above the
/// threshold are kept, those below pruned, and of those equal to it the first `sel.ties` pruned.
pub fn write_masks(
    tensors: &[&[f32]],
    masks: &mut [&mut [bool]],
    sel: &Selection,
    absolute: bool,
) -> Result<()> {
    if masks.len() != tensors.len() {
        return Err(Error::value(format!(
            "{} masks for {} tensors",
            masks.len(),
            tensors.len()
        )));
    }
    for (i, (t, m)) in tensors.iter().zip(masks.iter()).enumerate() {
        if t.len() != m.len() {
            return Err(Error::value(format!(
                "mask {i} has {} elements, tensor {i} has {}",
                m.len(),
                t.len()
            )));
        }
    }
    let mut pieces: Vec<(&[f32], &mut [bool])> = try_with_capacity(
        tensors.iter().map(|t| t.len().div_ceil(CHUNK)).sum(),
        "the mask pieces",
    )?;
    for (t, m) in tensors.iter().zip(masks.iter_mut()) {
        pieces.extend(t.chunks(CHUNK).zip(m.chunks_mut(CHUNK)));
    }
    let k = sel.key;
    let parallel = pieces.len() > 1 && crate::parallel::num_threads() > 1;
    if sel.k == 0 {
        for (_, m) in pieces.iter_mut() {
            m.fill(true);
        }
        return Ok(());
    }
    // Tie budget per piece: only when some, but not all, of the equal elements are pruned.
    let budgets: Vec<usize> = if sel.ties == 0 || sel.ties == sel.equal {
        vec![if sel.ties == 0 { 0 } else { usize::MAX }; pieces.len()]
    } else {
        let count = |(t, _): &(&[f32], &mut [bool])| {
            t.iter().filter(|&&x| order_key(x, absolute) == k).count()
        };
        let counts: Vec<usize> = if parallel {
            crate::parallel::install(|| pieces.par_iter().map(count).collect())
        } else {
            pieces.iter().map(count).collect()
        };
        let mut before = 0usize;
        counts
            .iter()
            .map(|&c| {
                let b = sel.ties.saturating_sub(before);
                before += c;
                b
            })
            .collect()
    };
    let write = |((t, m), budget): (&mut (&[f32], &mut [bool]), &usize)| {
        // Budget 0: every tie kept; a budget past the piece's ties: every tie pruned. Both are
        // one comparison per element (vectorized); only the piece where the ties run out counts.
        if *budget == 0 {
            for (x, keep) in t.iter().zip(m.iter_mut()) {
                *keep = order_key(*x, absolute) >= k;
            }
            return;
        }
        if *budget >= t.len() {
            for (x, keep) in t.iter().zip(m.iter_mut()) {
                *keep = order_key(*x, absolute) > k;
            }
            return;
        }
        let mut left = *budget;
        for (x, keep) in t.iter().zip(m.iter_mut()) {
            let kx = order_key(*x, absolute);
            *keep = if kx == k {
                // The first `budget` equal elements are pruned, the rest kept.
                let prune = left > 0;
                left = left.saturating_sub(1);
                !prune
            } else {
                kx > k
            };
        }
    };
    if parallel {
        crate::parallel::install(|| {
            pieces
                .par_iter_mut()
                .zip(budgets.par_iter())
                .for_each(write)
        });
    } else {
        pieces.iter_mut().zip(budgets.iter()).for_each(write);
    }
    Ok(())
}

/// Per row of `scores` `(rows, cols)`: prunes the `k` smallest (of `|x| * scale[j]` when
/// `scale` is given, of `|x|` when `absolute`, else of `x`), ties to the lower column index.
/// Writes `mask` `(rows, cols)`, `true` = keep.
pub fn row_masks(
    scores: &[f32],
    rows: usize,
    cols: usize,
    k: usize,
    absolute: bool,
    scale: Option<&[f32]>,
    mask: &mut [bool],
) -> Result<()> {
    crate::quant::check_len("scores", scores.len(), rows, cols)?;
    crate::quant::check_len("mask", mask.len(), rows, cols)?;
    if k > cols {
        return Err(Error::value(format!(
            "cannot prune {k} of the {cols} elements of a row"
        )));
    }
    if cols > u32::MAX as usize {
        return Err(Error::value(format!(
            "rows of {cols} elements are too long (at most 2^32 - 1)"
        )));
    }
    check_no_nan("scores", scores)?;
    if let Some(s) = scale {
        crate::quant::check_len("scale", s.len(), 1, cols)?;
        check_no_nan("scale", s)?;
    }
    if rows * cols == 0 {
        return Ok(());
    }
    let run = |buf: &mut Vec<u64>, (row, m): (&[f32], &mut [bool])| {
        if k == 0 {
            m.fill(true);
            return;
        }
        buf.clear();
        buf.extend(row.iter().enumerate().map(|(j, &x)| {
            let v = match scale {
                Some(s) => x.abs() * s[j],
                None => x,
            };
            ((order_key(v, absolute || scale.is_some()) as u64) << 32) | j as u64
        }));
        let (_, &mut last, _) = buf.select_nth_unstable(k - 1);
        for (j, keep) in m.iter_mut().enumerate() {
            let v = match scale {
                Some(s) => row[j].abs() * s[j],
                None => row[j],
            };
            let c = ((order_key(v, absolute || scale.is_some()) as u64) << 32) | j as u64;
            *keep = c > last;
        }
    };
    if rows > 1 && crate::parallel::num_threads() > 1 && rows * cols >= 1 << 15 {
        crate::parallel::install(|| {
            scores
                .par_chunks(cols)
                .zip(mask.par_chunks_mut(cols))
                .for_each_init(|| Vec::with_capacity(cols), run)
        });
    } else {
        let mut buf = Vec::with_capacity(cols);
        for pair in scores.chunks(cols).zip(mask.chunks_mut(cols)) {
            run(&mut buf, pair);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::lcg;

    /// Stable sort of (key, global position): the first k are pruned.
    fn reference(tensors: &[&[f32]], k: usize, absolute: bool) -> Vec<Vec<bool>> {
        let mut all: Vec<(u32, usize)> = Vec::new();
        let mut pos = 0;
        for t in tensors {
            for &x in t.iter() {
                all.push((order_key(x, absolute), pos));
                pos += 1;
            }
        }
        all.sort();
        let mut keep = vec![true; pos];
        for &(_, p) in &all[..k] {
            keep[p] = false;
        }
        let mut out = Vec::new();
        let mut start = 0;
        for t in tensors {
            out.push(keep[start..start + t.len()].to_vec());
            start += t.len();
        }
        out
    }

    fn masks_of(tensors: &[&[f32]], k: usize, absolute: bool) -> Vec<Vec<bool>> {
        let sel = select_k_smallest(tensors, k, absolute).unwrap();
        let mut bufs: Vec<Vec<bool>> = tensors.iter().map(|t| vec![false; t.len()]).collect();
        let mut views: Vec<&mut [bool]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
        write_masks(tensors, &mut views, &sel, absolute).unwrap();
        bufs
    }

    #[test]
    fn matches_a_stable_sort_with_ties_and_chunks() {
        // Coarse values give many ties; sizes straddle the chunk size.
        let a: Vec<f32> = lcg(CHUNK + 1234, 1)
            .iter()
            .map(|x| (x * 16.0).round() / 16.0)
            .collect();
        let b: Vec<f32> = lcg(777, 2).iter().map(|x| (x * 8.0).round()).collect();
        let c = vec![0.0f32; 100];
        let ts: Vec<&[f32]> = vec![&a, &b, &c, &[]];
        let n = total_len(&ts);
        for absolute in [true, false] {
            for k in [0, 1, 50, 100, 101, n / 3, n / 2, n - 1, n] {
                let (got, want) = (masks_of(&ts, k, absolute), reference(&ts, k, absolute));
                let sel = select_k_smallest(&ts, k, absolute).unwrap();
                let differ: Vec<usize> = got
                    .concat()
                    .iter()
                    .zip(want.concat())
                    .enumerate()
                    .filter(|(_, (a, b))| **a != *b)
                    .map(|(i, _)| i)
                    .take(5)
                    .collect();
                assert!(
                    differ.is_empty(),
                    "k = {k}, abs = {absolute}, {sel:?}: {differ:?}"
                );
            }
        }
    }

    #[test]
    fn the_sampled_bracket_agrees_with_the_radix_passes() {
        let a: Vec<f32> = lcg(5 * SAMPLE + 17, 9)
            .iter()
            .map(|x| (x * 64.0).round() / 64.0)
            .collect();
        let b = lcg(SAMPLE, 10);
        let ts: Vec<&[f32]> = vec![&a, &b];
        let n = total_len(&ts);
        for (k, absolute) in [
            (1, true),
            (1000, true),
            (n / 7, true),
            (n / 2, true),
            (n - 3, true),
            (n, true),
            (n / 3, false),
            (n / 2, false),
        ] {
            let fast = select_by_sample(&ts, n, k, absolute);
            let h1 = histogram(&ts, absolute, None);
            let (hi, bh) = find_bin(&h1, (k - 1) as u64);
            let h2 = histogram(&ts, absolute, Some(hi as u32));
            let (lo, bl) = find_bin(&h2, (k - 1) as u64 - bh);
            if let Some(f) = fast {
                assert_eq!(f.key, ((hi as u32) << 16) | lo as u32, "k = {k}");
                assert_eq!(f.ties, k - (bh + bl) as usize);
                assert_eq!(f.equal, h2[lo] as usize);
            }
            assert!(fast.is_some() || k == n, "k = {k}: the bracket missed");
            assert_eq!(
                masks_of(&ts, k, absolute),
                reference(&ts, k, absolute),
                "k = {k}"
            );
        }
    }

    #[test]
    fn threshold_is_the_kth_value() {
        let a = lcg(5000, 3);
        let mut sorted: Vec<f32> = a.iter().map(|x| x.abs()).collect();
        sorted.sort_by(|x, y| x.partial_cmp(y).unwrap());
        for k in [1, 10, 2500, 5000] {
            let s = select_k_smallest(&[&a], k, true).unwrap();
            assert_eq!(s.threshold, sorted[k - 1]);
        }
    }

    #[test]
    fn row_masks_match_per_row_sorts() {
        let (rows, cols) = (7, 33);
        let w: Vec<f32> = lcg(rows * cols, 4)
            .iter()
            .map(|x| (x * 6.0).round())
            .collect();
        let scale: Vec<f32> = lcg(cols, 5).iter().map(|x| x.abs() + 0.5).collect();
        for k in [0, 1, 16, 33] {
            for sc in [None, Some(scale.as_slice())] {
                let mut mask = vec![false; rows * cols];
                row_masks(&w, rows, cols, k, true, sc, &mut mask).unwrap();
                for r in 0..rows {
                    let row = &w[r * cols..(r + 1) * cols];
                    let mut order: Vec<(u32, usize)> = row
                        .iter()
                        .enumerate()
                        .map(|(j, &x)| {
                            let v = sc.map_or(x.abs(), |s| x.abs() * s[j]);
                            (order_key(v, true), j)
                        })
                        .collect();
                    order.sort();
                    let mut want = vec![true; cols];
                    for &(_, j) in &order[..k] {
                        want[j] = false;
                    }
                    assert_eq!(&mask[r * cols..(r + 1) * cols], want.as_slice());
                }
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let a = [1.0f32, f32::NAN];
        assert!(select_k_smallest(&[&a], 1, true).is_err());
        assert!(select_k_smallest(&[&[1.0f32]], 2, true).is_err());
        let mut m = vec![true; 4];
        assert!(row_masks(&[1.0; 4], 2, 2, 3, true, None, &mut m).is_err());
        assert!(row_masks(&[1.0; 4], 2, 3, 1, true, None, &mut m).is_err());
        let sel = select_k_smallest(&[&[1.0f32, 2.0]], 1, true).unwrap();
        let mut short = [true; 1];
        let mut views: Vec<&mut [bool]> = vec![&mut short];
        assert!(write_masks(&[&[1.0f32, 2.0]], &mut views, &sel, true).is_err());
    }
}
