//! Top-k routing from router logits.
//!
//! `Gate::Softmax` follows Mixtral: softmax over all experts (in the logits' precision, so fp32 for
//! fp32 logits), top-k, then optional renormalisation of the k weights. `Gate::Sigmoid` follows
//! DeepSeek-V3: independent sigmoid scores. In both cases an optional per-expert `bias` is added to
//! the scores for the selection only; the weights are the unbiased scores. Ties go to the lower
//! expert index, so routing is deterministic.

use std::ops::{Add, Div, Mul, Sub};

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Floating-point types the router runs in (f32 and f64).
pub trait Real:
    Copy
    + PartialOrd
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn exp(self) -> Self;
    fn is_nan(self) -> bool;
}

macro_rules! impl_real {
    ($t:ty) => {
        impl Real for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn is_nan(self) -> bool {
                <$t>::is_nan(self)
            }
        }
    };
}
impl_real!(f32);
impl_real!(f64);

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Softmax over the experts (Mixtral, Switch).
    Softmax,
    /// Independent sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

impl Gate {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "softmax" => Ok(Gate::Softmax),
            "sigmoid" => Ok(Gate::Sigmoid),
            other => Err(Error::value(format!(
                "router must be 'softmax' or 'sigmoid', got {other:?}"
            ))),
        }
    }
}

/// Insert expert `e` with selection key `key` into the best-first list `best` of at most `k`
/// entries; equal keys keep the earlier (lower) expert first.
#[inline]
fn push_top<F: Real>(best: &mut Vec<(F, usize)>, k: usize, key: F, e: usize) {
    if best.len() == k {
        match best.last() {
            Some(&(worst, _)) if key > worst => {
                best.pop();
            }
            _ => return,
        }
    }
    let at = best
        .iter()
        .position(|&(v, _)| key > v)
        .unwrap_or(best.len());
    best.insert(at, (key, e));
}

/// Checks `num_experts` and `top_k` (O(1)); callers that size `[T, top_k]` outputs before
/// [`route`] call it first, so the product `T * top_k <= T * num_experts` fits.
pub fn check_route_args(num_experts: usize, top_k: usize) -> Result<()> {
    if num_experts == 0 {
        return Err(Error::value(
            "num_experts (the logits' last dimension) must be at least 1, got 0",
        ));
    }
    if top_k == 0 || top_k > num_experts {
        return Err(Error::value(format!(
            "top_k must be in 1..={num_experts} (num_experts), got {top_k}"
        )));
    }
    Ok(())
}

/// Route `num_tokens = logits.len() / num_experts` tokens to `top_k` experts each.
///
/// `logits`: `[T, E]` row-major; `bias`: `[E]` (selection only); writes `idx_out` `[T, k]`
/// (best first) and `weights_out` `[T, k]`. With `normalize` the k weights of a token sum to one.
#[allow(clippy::too_many_arguments)]
pub fn route<F: Real>(
    logits: &[F],
    num_experts: usize,
    top_k: usize,
    gate: Gate,
    bias: Option<&[F]>,
    normalize: bool,
    idx_out: &mut [i64],
    weights_out: &mut [F],
) -> Result<()> {
    check_route_args(num_experts, top_k)?;
    if !logits.len().is_multiple_of(num_experts) {
        return Err(Error::value(format!(
            "logits length {} is not a multiple of num_experts {num_experts}",
            logits.len()
        )));
    }
    let num_tokens = logits.len() / num_experts;
    if idx_out.len() != num_tokens * top_k || weights_out.len() != num_tokens * top_k {
        return Err(Error::value(format!(
            "outputs must hold num_tokens * top_k = {} entries, got {} and {}",
            num_tokens * top_k,
            idx_out.len(),
            weights_out.len()
        )));
    }
    if let Some(b) = bias {
        if b.len() != num_experts {
            return Err(Error::value(format!(
                "bias must have num_experts = {num_experts} entries, got {}",
                b.len()
            )));
        }
        if b.iter().any(|v| v.is_nan()) {
            return Err(Error::value("routing bias contains NaN"));
        }
    }
    if logits.iter().any(|v| v.is_nan()) {
        return Err(Error::value("router logits contain NaN"));
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let rows = logits
        .chunks(num_experts)
        .zip(idx_out.chunks_mut(top_k))
        .zip(weights_out.chunks_mut(top_k));
    if logits.len() < 1 << 15 {
        // Small batches stay on the calling thread: waking the pool costs more than the work.
        let mut scores = vec![F::ZERO; num_experts];
        let mut best = Vec::with_capacity(top_k + 1);
        for ((row, idx), w) in rows {
            route_row(
                row,
                top_k,
                gate,
                bias,
                normalize,
                &mut scores,
                &mut best,
                idx,
                w,
            );
        }
        return Ok(());
    }
    crate::parallel::install(|| {
        logits
            .par_chunks(num_experts)
            .zip(idx_out.par_chunks_mut(top_k))
            .zip(weights_out.par_chunks_mut(top_k))
            .with_min_len(64)
            .for_each_init(
                || (vec![F::ZERO; num_experts], Vec::with_capacity(top_k + 1)),
                |(scores, best), ((row, idx), w)| {
                    route_row(row, top_k, gate, bias, normalize, scores, best, idx, w)
                },
            );
    });
    Ok(())
}

#[allow(clippy::too_many_arguments)]
#[inline]
fn route_row<F: Real>(
    row: &[F],
    top_k: usize,
    gate: Gate,
    bias: Option<&[F]>,
    normalize: bool,
    scores: &mut [F],
    best: &mut Vec<(F, usize)>,
    idx: &mut [i64],
    w: &mut [F],
) {
    match gate {
        Gate::Softmax => {
            let mut max = row[0];
            for &v in &row[1..] {
                if v > max {
                    max = v;
                }
            }
            let mut sum = F::ZERO;
            for (s, &v) in scores.iter_mut().zip(row) {
                *s = (v - max).exp();
                sum = sum + *s;
            }
            let inv = F::ONE / sum;
            for s in scores.iter_mut() {
                *s = *s * inv;
            }
        }
        Gate::Sigmoid => {
            for (s, &v) in scores.iter_mut().zip(row) {
                *s = F::ONE / (F::ONE + (F::ZERO - v).exp());
            }
        }
    }
    best.clear();
    for (e, &s) in scores.iter().enumerate() {
        let key = match bias {
            Some(b) => s + b[e],
            None => s,
        };
        push_top(best, top_k, key, e);
    }
    let mut total = F::ZERO;
    for (slot, &(_, e)) in best.iter().enumerate() {
        idx[slot] = e as i64;
        w[slot] = scores[e];
        total = total + scores[e];
    }
    if normalize && total > F::ZERO {
        let inv = F::ONE / total;
        for v in w.iter_mut() {
            *v = *v * inv;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        logits: &[f64],
        e: usize,
        k: usize,
        gate: Gate,
        bias: Option<&[f64]>,
        norm: bool,
    ) -> (Vec<i64>, Vec<f64>) {
        let t = logits.len() / e;
        let mut idx = vec![0; t * k];
        let mut w = vec![0.0; t * k];
        route(logits, e, k, gate, bias, norm, &mut idx, &mut w).unwrap();
        (idx, w)
    }

    #[test]
    fn softmax_top2_renormalises() {
        let (idx, w) = run(&[0.0, 2.0, 1.0, -1.0], 4, 2, Gate::Softmax, None, true);
        assert_eq!(idx, vec![1, 2]);
        let (a, b) = (2f64.exp(), 1f64.exp());
        assert!((w[0] - a / (a + b)).abs() < 1e-12);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ties_go_to_the_lower_expert() {
        let (idx, _) = run(&[1.0, 3.0, 3.0, 3.0, 0.0], 5, 2, Gate::Softmax, None, true);
        assert_eq!(idx, vec![1, 2]);
        let (idx, _) = run(&[0.0; 6], 6, 3, Gate::Sigmoid, None, true);
        assert_eq!(idx, vec![0, 1, 2]);
    }

    #[test]
    fn bias_changes_selection_not_weights() {
        let logits = [0.0, 1.0, 2.0];
        let bias = [5.0, 0.0, 0.0];
        let (idx, w) = run(&logits, 3, 1, Gate::Sigmoid, Some(&bias), false);
        assert_eq!(idx, vec![0]);
        assert!((w[0] - 0.5).abs() < 1e-12);
    }

    #[test]
    fn rejects_bad_input() {
        let mut idx = vec![0; 2];
        let mut w = vec![0.0f32; 2];
        assert!(route(
            &[0.0f32; 4],
            4,
            5,
            Gate::Softmax,
            None,
            true,
            &mut idx,
            &mut w
        )
        .is_err());
        assert!(route(
            &[f32::NAN; 4],
            4,
            2,
            Gate::Softmax,
            None,
            true,
            &mut idx,
            &mut w
        )
        .is_err());
        assert!(route(
            &[0.0f32; 5],
            4,
            2,
            Gate::Softmax,
            None,
            true,
            &mut idx,
            &mut w
        )
        .is_err());
    }
}
