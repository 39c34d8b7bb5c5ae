//! Scores of whole rows or columns of a weight, in groups: what structured pruning ranks.
//!
//! An MLP neuron is a row of the up/gate projections and a column of the down projection; an
//! attention head is `head_dim` consecutive rows of q (or k, v) and `head_dim` consecutive
//! columns of the output projection; a conv channel is a row of the flattened `(out, in * kh *
//! kw)` weight. [`group_norms`] returns the L1 or L2 norm of each group of `group` consecutive
//! rows (or columns) with every element optionally scaled by a per-column factor, e.g. Wanda's
//! `||X_j||` so that a column of the down projection scores `||W[:, j]|| * ||X_j||`.

use rayon::prelude::*;

use super::check_no_nan;
use crate::error::{Error, Result};

/// Which slices of a `(rows, cols)` weight are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// One score per group of rows (output channels).
    Rows,
    /// One score per group of columns (input channels).
    Cols,
}

/// L`p` norm (`p` 1 or 2) of each group of `group` consecutive rows or columns of `w`
/// `(rows, cols)`, elements multiplied by `scale[j]` (per column) when given. Accumulates in
/// `f64`; returns `rows / group` or `cols / group` scores.
pub fn group_norms(
    w: &[f32],
    rows: usize,
    cols: usize,
    axis: Axis,
    group: usize,
    p: u32,
    scale: Option<&[f32]>,
) -> Result<Vec<f32>> {
    crate::quant::check_len("w", w.len(), rows, cols)?;
    if p != 1 && p != 2 {
        return Err(Error::value(format!("p must be 1 or 2, got {p}")));
    }
    let along = if axis == Axis::Rows { rows } else { cols };
    if group == 0 || !along.is_multiple_of(group) {
        return Err(Error::value(format!(
            "group ({group}) must be positive and divide the {along} {}",
            if axis == Axis::Rows {
                "rows"
            } else {
                "columns"
            }
        )));
    }
    check_no_nan("w", w)?;
    if let Some(s) = scale {
        crate::quant::check_len("scale", s.len(), 1, cols)?;
        check_no_nan("scale", s)?;
    }
    let term = |x: f32, j: usize| -> f64 {
        let v = (x * scale.map_or(1.0, |s| s[j])) as f64;
        if p == 1 {
            v.abs()
        } else {
            v * v
        }
    };
    let parallel = crate::parallel::num_threads() > 1 && rows * cols >= 1 << 16 && rows > 1;
    let per: Vec<f64> = match axis {
        Axis::Rows => {
            let row_sum = |row: &[f32]| row.iter().enumerate().map(|(j, &x)| term(x, j)).sum();
            if parallel {
                crate::parallel::install(|| w.par_chunks(cols.max(1)).map(row_sum).collect())
            } else {
                w.chunks(cols.max(1)).map(row_sum).collect()
            }
        }
        Axis::Cols => {
            let add_row = |mut acc: Vec<f64>, row: &[f32]| {
                for (j, (a, &x)) in acc.iter_mut().zip(row).enumerate() {
                    *a += term(x, j);
                }
                acc
            };
            if cols == 0 {
                Vec::new()
            } else if parallel {
                crate::parallel::install(|| {
                    w.par_chunks(cols)
                        .fold(|| vec![0f64; cols], add_row)
                        .reduce(
                            || vec![0f64; cols],
                            |mut a, b| {
                                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                                a
                            },
                        )
                })
            } else {
                w.chunks(cols).fold(vec![0f64; cols], add_row)
            }
        }
    };
    Ok(per
        .chunks(group)
        .map(|g| {
            let s: f64 = g.iter().sum();
            (if p == 2 { s.sqrt() } else { s }) as f32
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norms_of_rows_and_columns_in_groups() {
        // 4 x 6 weight: w[i][j] = i - j.
        let (rows, cols) = (4, 6);
        let w: Vec<f32> = (0..rows * cols)
            .map(|t| (t / cols) as f32 - (t % cols) as f32)
            .collect();
        let rows_l1 = group_norms(&w, rows, cols, Axis::Rows, 1, 1, None).unwrap();
        assert_eq!(rows_l1, vec![15.0, 11.0, 9.0, 9.0]);
        let rows_l2 = group_norms(&w, rows, cols, Axis::Rows, 2, 2, None).unwrap();
        let sq = |r: i32| (0..6).map(|j| ((r - j) * (r - j)) as f64).sum::<f64>();
        assert_eq!(rows_l2[0], (sq(0) + sq(1)).sqrt() as f32);
        let scale = [1.0f32, 0.0, 2.0, 0.0, 0.0, 0.0];
        let cols_l1 = group_norms(&w, rows, cols, Axis::Cols, 3, 1, Some(&scale)).unwrap();
        // Column 0: |0|+|1|+|2|+|3| = 6; column 2 doubled: 2*(2+1+0+1) = 8.
        assert_eq!(cols_l1, vec![14.0, 0.0]);
    }

    #[test]
    fn bad_arguments_are_errors() {
        let w = [1.0f32; 6];
        assert!(group_norms(&w, 2, 3, Axis::Rows, 4, 2, None).is_err());
        assert!(group_norms(&w, 2, 3, Axis::Cols, 2, 2, None).is_err());
        assert!(group_norms(&w, 2, 3, Axis::Rows, 1, 3, None).is_err());
        assert!(group_norms(&w, 2, 3, Axis::Rows, 1, 2, Some(&[1.0])).is_err());
        assert!(group_norms(&w[..5], 2, 3, Axis::Rows, 1, 2, None).is_err());
    }
}
