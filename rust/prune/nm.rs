//! N:M masks: in every window of M consecutive inputs of a row, keep the N largest scores.
//!
//! Windows run along the input dimension (the columns of a `(out, in)` weight), which is what
//! 2:4 sparse tensor cores and [`super::sparse24`] need. Within a window the `M - N` smallest
//! scores are pruned, ties to the lower index (the order of a stable sort).

use rayon::prelude::*;

use super::{check_nm, check_no_nan, order_key};
use crate::error::Result;

/// Writes `mask` `(rows, cols)` (`true` = keep) for an N:M pattern over `scores` `(rows, cols)`:
/// scores are `|x| * scale[j]` when `scale` is given, `|x|` when `absolute`, else `x`.
#[allow(clippy::too_many_arguments)]
pub fn nm_masks(
    scores: &[f32],
    rows: usize,
    cols: usize,
    n: usize,
    m: usize,
    absolute: bool,
    scale: Option<&[f32]>,
    mask: &mut [bool],
) -> Result<()> {
    check_nm(n, m, cols)?;
    crate::quant::check_len("scores", scores.len(), rows, cols)?;
    crate::quant::check_len("mask", mask.len(), rows, cols)?;
    check_no_nan("scores", scores)?;
    if let Some(s) = scale {
        crate::quant::check_len("scale", s.len(), 1, cols)?;
        check_no_nan("scale", s)?;
    }
    if rows * cols == 0 {
        return Ok(());
    }
    let drop = m - n;
    let abs = absolute || scale.is_some();
    let key = |row: &[f32], j: usize| -> u64 {
        let v = match scale {
            Some(s) => row[j].abs() * s[j],
            None => row[j],
        };
        ((order_key(v, abs) as u64) << 32) | j as u64
    };
    let run = |buf: &mut Vec<u64>, (row, mk): (&[f32], &mut [bool])| {
        mk.fill(true);
        if drop == 0 {
            return;
        }
        for w0 in (0..cols).step_by(m) {
            if m == 4 && drop == 2 {
                // 2:4: the two smallest of four by a fixed network of comparisons.
                let k = [
                    key(row, w0),
                    key(row, w0 + 1),
                    key(row, w0 + 2),
                    key(row, w0 + 3),
                ];
                let mut order = [0usize, 1, 2, 3];
                order.sort_unstable_by_key(|&i| k[i]);
                mk[w0 + order[0]] = false;
                mk[w0 + order[1]] = false;
                continue;
            }
            buf.clear();
            buf.extend((w0..w0 + m).map(|j| key(row, j)));
            buf.sort_unstable();
            for &c in &buf[..drop] {
                mk[(c & 0xffff_ffff) as usize] = false;
            }
        }
    };
    if rows > 1 && crate::parallel::num_threads() > 1 && rows * cols >= 1 << 15 {
        crate::parallel::install(|| {
            scores
                .par_chunks(cols)
                .zip(mask.par_chunks_mut(cols))
                .for_each_init(|| Vec::with_capacity(m), run)
        });
    } else {
        let mut buf = Vec::with_capacity(m);
        for pair in scores.chunks(cols).zip(mask.chunks_mut(cols)) {
            run(&mut buf, pair);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_n_largest_of_each_window() {
        let (rows, cols) = (3, 12);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| (((i * 7919) % 13) as f32 - 6.0) * 0.5)
            .collect();
        for (n, m) in [(2, 4), (1, 4), (4, 4), (3, 6), (1, 2), (2, 3)] {
            let mut mask = vec![false; rows * cols];
            nm_masks(&w, rows, cols, n, m, true, None, &mut mask).unwrap();
            for r in 0..rows {
                for w0 in (0..cols).step_by(m) {
                    let idx: Vec<usize> = (r * cols + w0..r * cols + w0 + m).collect();
                    let mut order = idx.clone();
                    order.sort_by(|&a, &b| {
                        w[a].abs().partial_cmp(&w[b].abs()).unwrap().then(a.cmp(&b))
                    });
                    for (rank, &i) in order.iter().enumerate() {
                        assert_eq!(mask[i], rank >= m - n, "n={n} m={m} i={i}");
                    }
                }
            }
        }
    }

    #[test]
    fn ties_prune_the_lower_index() {
        let w = [1.0f32; 8];
        let mut mask = vec![false; 8];
        nm_masks(&w, 1, 8, 2, 4, true, None, &mut mask).unwrap();
        assert_eq!(mask, [false, false, true, true, false, false, true, true]);
        let mut mask = vec![false; 8];
        let scale = [1.0f32, 1.0, 0.5, 1.0, 2.0, 1.0, 1.0, 1.0];
        nm_masks(&w, 1, 8, 2, 4, false, Some(&scale), &mut mask).unwrap();
        assert_eq!(mask, [false, true, false, true, true, false, false, true]);
    }

    #[test]
    fn bad_patterns_are_errors() {
        let mut mask = vec![false; 6];
        assert!(nm_masks(&[0.0; 6], 1, 6, 2, 4, true, None, &mut mask).is_err());
        assert!(nm_masks(&[0.0; 6], 1, 6, 3, 2, true, None, &mut mask).is_err());
        assert!(nm_masks(&[f32::NAN; 6], 1, 6, 1, 2, true, None, &mut mask).is_err());
    }
}
