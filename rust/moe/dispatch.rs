//! Dispatch plans (stable counting sort of token slots by expert) and the permute / combine
//! kernels that move rows between token order and expert order.

use std::ops::{Add, Mul};

use half::bf16;
use rayon::prelude::*;

use crate::error::{checked_mul, try_filled, Error, Result};

/// Where every token slot goes, and which token every expert-ordered row came from.
///
/// Slot `a = t * top_k + s` is token `t`'s `s`-th choice. Rows of expert `e` are
/// `offsets[e]..offsets[e] + counts[e]`, in token order (the sort is stable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchPlan {
    pub num_tokens: usize,
    pub top_k: usize,
    pub num_experts: usize,
    /// Slots that chose each expert, before the capacity cut: `[E]`.
    pub routed: Vec<i64>,
    /// Slots kept per expert: `[E]`.
    pub counts: Vec<i64>,
    /// First row of each expert's block, and the total row count last: `[E + 1]`.
    pub offsets: Vec<i64>,
    /// Token of each expert-ordered row, -1 for padding rows: `[rows]`.
    pub token_of: Vec<i64>,
    /// Slot of each expert-ordered row, -1 for padding rows: `[rows]`.
    pub slot_of: Vec<i64>,
    /// Row of each slot, -1 when the slot was dropped by the capacity: `[T * k]`.
    pub pos: Vec<i64>,
    /// Number of dropped slots.
    pub dropped: usize,
}

/// Slots per parallel chunk of the counting sort (at least `num_experts`, so the per-chunk
/// histograms take no more memory than `idx` plus one histogram).
const SORT_CHUNK: usize = 1 << 14;

/// Most experts a plan may have: 2^20 (the largest published expert counts, PEER's 1024^2; the
/// `[E]` outputs then take 8 MiB each).
pub const MAX_EXPERTS: usize = 1 << 20;

/// A padded plan may hold at most `max(PADDED_ROWS_FLOOR, PADDED_ROWS_PER_SLOT * T * k)` rows
/// (padding grows with `num_experts * max(counts)`, so a skewed routing over many experts asks
/// for far more rows than there are slots); beyond that the call is a `ValueError` naming the
/// rows asked for, not an allocation the size of `E * T * k`.
pub const PADDED_ROWS_FLOOR: usize = 1 << 20;
/// See [`PADDED_ROWS_FLOOR`].
pub const PADDED_ROWS_PER_SLOT: usize = 256;

/// Checks `num_experts` and `top_k` of a plan (O(1)).
pub fn check_plan_args(top_k: usize, num_experts: usize) -> Result<()> {
    if top_k == 0 {
        return Err(Error::value(
            "top_k (idx's last dimension) must be at least 1, got 0",
        ));
    }
    if num_experts == 0 || num_experts > MAX_EXPERTS {
        return Err(Error::value(format!(
            "num_experts must be in 1..={MAX_EXPERTS}, got {num_experts}"
        )));
    }
    Ok(())
}

/// Build the dispatch plan for `idx` (`[T, k]` expert ids, row-major).
///
/// A stable counting sort in O(T * k): histogram per chunk, prefix sums over (expert, chunk),
/// then each chunk places its slots. With `capacity`, each expert keeps its first `capacity`
/// slots in token order and the rest are dropped (`pos = -1`). With `padded`, every expert gets
/// the same number of rows (the largest kept count), so `[E * rows, D]` reshapes to `[E, rows, D]`;
/// padding rows have `token_of = slot_of = -1`.
pub fn dispatch_plan(
    idx: &[i64],
    top_k: usize,
    num_experts: usize,
    capacity: Option<usize>,
    padded: bool,
) -> Result<DispatchPlan> {
    check_plan_args(top_k, num_experts)?;
    if !idx.len().is_multiple_of(top_k) {
        return Err(Error::value(format!(
            "idx length {} is not a multiple of top_k {top_k}",
            idx.len()
        )));
    }
    if let Some(bad) = idx.iter().find(|&&e| e < 0 || e as usize >= num_experts) {
        return Err(Error::value(format!(
            "expert ids must be in 0..{num_experts}, got {bad}"
        )));
    }
    let num_slots = idx.len();
    let num_tokens = num_slots / top_k;
    let e_count = num_experts;

    // Histogram per chunk; chunks of at least E slots keep all histograms within O(T * k + E).
    let chunk = SORT_CHUNK.max(e_count);
    let histogram = |chunk: &[i64]| {
        let mut h = vec![0usize; e_count];
        for &e in chunk {
            h[e as usize] += 1;
        }
        h
    };
    let hist: Vec<Vec<usize>> = if num_slots <= chunk {
        vec![histogram(idx)]
    } else {
        crate::parallel::install(|| idx.par_chunks(chunk).map(histogram).collect())
    };
    let mut routed = vec![0usize; e_count];
    for h in &hist {
        for (r, &c) in routed.iter_mut().zip(h) {
            *r += c;
        }
    }
    let cap = capacity.unwrap_or(usize::MAX);
    let counts: Vec<usize> = routed.iter().map(|&r| r.min(cap)).collect();
    let rows_per_expert = counts.iter().copied().max().unwrap_or(0);
    if padded {
        let rows = checked_mul(
            "padded rows (num_experts * max(counts))",
            e_count,
            rows_per_expert,
        )?;
        let limit = PADDED_ROWS_FLOOR.max(num_slots.saturating_mul(PADDED_ROWS_PER_SLOT));
        if rows > limit {
            return Err(Error::value(format!(
                "a padded plan would hold {e_count} experts x {rows_per_expert} rows = {rows} rows \
                 for {num_slots} slots, more than the limit of {limit} \
                 (max(2^20, 256 * tokens * top_k)); pass a capacity or padded=False"
            )));
        }
    }
    let mut offsets = vec![0usize; e_count + 1];
    for e in 0..e_count {
        offsets[e + 1] = if padded {
            (e + 1) * rows_per_expert
        } else {
            offsets[e] + counts[e]
        };
    }
    // Rank of the first slot of each chunk within its expert (exclusive prefix over chunks).
    let mut base = Vec::with_capacity(hist.len());
    let mut running = vec![0usize; e_count];
    for h in &hist {
        base.push(running.clone());
        for (r, &c) in running.iter_mut().zip(h) {
            *r += c;
        }
    }

    let mut pos = vec![-1i64; num_slots];
    let place = |((pos_chunk, idx_chunk), chunk_base): ((&mut [i64], &[i64]), &Vec<usize>)| {
        let mut rank = chunk_base.clone();
        for (p, &e) in pos_chunk.iter_mut().zip(idx_chunk) {
            let e = e as usize;
            let r = rank[e];
            rank[e] += 1;
            if r < cap {
                *p = (offsets[e] + r) as i64;
            }
        }
    };
    if num_slots <= chunk {
        place(((&mut pos[..], idx), &base[0]));
    } else {
        crate::parallel::install(|| {
            pos.par_chunks_mut(chunk)
                .zip(idx.par_chunks(chunk))
                .zip(base.par_iter())
                .for_each(place)
        });
    }

    let rows = offsets[e_count];
    let mut token_of = try_filled(rows, -1i64, "the plan's token_of")?;
    let mut slot_of = try_filled(rows, -1i64, "the plan's slot_of")?;
    let mut dropped = 0usize;
    for (a, &p) in pos.iter().enumerate() {
        if p < 0 {
            dropped += 1;
        } else {
            token_of[p as usize] = (a / top_k) as i64;
            slot_of[p as usize] = a as i64;
        }
    }
    Ok(DispatchPlan {
        num_tokens,
        top_k,
        num_experts,
        routed: routed.iter().map(|&v| v as i64).collect(),
        counts: counts.iter().map(|&v| v as i64).collect(),
        offsets: offsets.iter().map(|&v| v as i64).collect(),
        token_of,
        slot_of,
        pos,
        dropped,
    })
}

/// Element types the kernels move: f32, f64 and bf16 (accumulated in f32).
pub trait Element: Copy + Send + Sync + 'static {
    /// Type of weights and of accumulation.
    type Acc: Copy + Send + Sync + Default + Add<Output = Self::Acc> + Mul<Output = Self::Acc>;
    const ZERO: Self;
    fn to_acc(self) -> Self::Acc;
    fn from_acc(a: Self::Acc) -> Self;
}

impl Element for f32 {
    type Acc = f32;
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_acc(a: f32) -> Self {
        a
    }
}

impl Element for f64 {
    type Acc = f64;
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_acc(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_acc(a: f64) -> Self {
        a
    }
}

impl Element for bf16 {
    type Acc = f32;
    const ZERO: Self = bf16::ZERO;
    #[inline(always)]
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn from_acc(a: f32) -> Self {
        bf16::from_f32(a)
    }
}

/// Rows per rayon task: enough work to amortise scheduling for narrow rows.
fn min_rows(dim: usize) -> usize {
    (4096 / dim.max(1)).max(1)
}

/// Below this many elements a kernel runs on the calling thread: waking the pool costs more.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// Apply `f(i, row)` to every `dim`-wide row of `out`, in the library pool when large.
fn for_each_row<T: Send>(out: &mut [T], dim: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
    if out.len() < PARALLEL_MIN_ELEMENTS {
        out.chunks_mut(dim)
            .enumerate()
            .for_each(|(i, row)| f(i, row));
    } else {
        crate::parallel::install(|| {
            out.par_chunks_mut(dim)
                .enumerate()
                .with_min_len(min_rows(dim))
                .for_each(|(i, row)| f(i, row))
        });
    }
}

fn check_index(name: &str, values: &[i64], limit: usize) -> Result<()> {
    if let Some(bad) = values.iter().find(|&&v| v < -1 || v >= limit as i64) {
        return Err(Error::value(format!(
            "{name} entries must be -1 or in 0..{limit}, got {bad}"
        )));
    }
    Ok(())
}

/// Gather rows into expert order: `out[i] = row_scale[i] * x[token_of[i]]` (zero where
/// `token_of[i] == -1`; no scaling without `row_scale`).
///
/// `x`: `[T, dim]`; `token_of`: `[rows]`; `row_scale`: `[rows]`; `out`: `[rows, dim]`.
pub fn permute<T: Element>(
    x: &[T],
    dim: usize,
    token_of: &[i64],
    row_scale: Option<&[T::Acc]>,
    out: &mut [T],
) -> Result<()> {
    if dim == 0 {
        return Ok(());
    }
    if !x.len().is_multiple_of(dim) {
        return Err(Error::value(format!(
            "x length {} is not a multiple of dim {dim}",
            x.len()
        )));
    }
    let num_tokens = x.len() / dim;
    if out.len() != checked_mul("out rows * dim", token_of.len(), dim)? {
        return Err(Error::value(format!(
            "out must be [{}, {dim}], got {} elements",
            token_of.len(),
            out.len()
        )));
    }
    if let Some(s) = row_scale {
        if s.len() != token_of.len() {
            return Err(Error::value(format!(
                "row_scale must have {} entries, got {}",
                token_of.len(),
                s.len()
            )));
        }
    }
    check_index("token_of", token_of, num_tokens)?;
    for_each_row(out, dim, |i, row| {
        let t = token_of[i];
        if t < 0 {
            row.fill(T::ZERO);
            return;
        }
        let src = &x[t as usize * dim..(t as usize + 1) * dim];
        match row_scale {
            None => row.copy_from_slice(src),
            Some(s) => {
                let s = s[i];
                for (o, &v) in row.iter_mut().zip(src) {
                    *o = T::from_acc(v.to_acc() * s);
                }
            }
        }
    });
    Ok(())
}

/// Reduce expert outputs back to tokens: `out[t] = sum_s weights[t, s] * ys[pos[t, s]]`,
/// skipping dropped slots (`pos = -1`); unit weights without `weights`.
///
/// `ys`: `[rows, dim]`; `pos`, `weights`: `[T, top_k]`; `out`: `[T, dim]`. Each token's row is
/// reduced by one task in a fixed slot order, so the result is deterministic.
pub fn combine<T: Element>(
    ys: &[T],
    dim: usize,
    pos: &[i64],
    top_k: usize,
    weights: Option<&[T::Acc]>,
    out: &mut [T],
) -> Result<()> {
    if top_k == 0 {
        return Err(Error::value("top_k must be at least 1"));
    }
    if !pos.len().is_multiple_of(top_k) {
        return Err(Error::value(format!(
            "pos length {} is not a multiple of top_k {top_k}",
            pos.len()
        )));
    }
    let num_tokens = pos.len() / top_k;
    if let Some(w) = weights {
        if w.len() != pos.len() {
            return Err(Error::value(format!(
                "weights must have {} entries like pos, got {}",
                pos.len(),
                w.len()
            )));
        }
    }
    if dim == 0 {
        return Ok(());
    }
    if !ys.len().is_multiple_of(dim) {
        return Err(Error::value(format!(
            "ys length {} is not a multiple of dim {dim}",
            ys.len()
        )));
    }
    if out.len() != checked_mul("out tokens * dim", num_tokens, dim)? {
        return Err(Error::value(format!(
            "out must be [{num_tokens}, {dim}], got {} elements",
            out.len()
        )));
    }
    check_index("pos", pos, ys.len() / dim)?;
    // Each token's row is reduced by one closure in a fixed slot order: no atomics, deterministic.
    let reduce = |acc: &mut [T::Acc], t: usize, row: &mut [T]| {
        acc.fill(T::Acc::default());
        for s in 0..top_k {
            let p = pos[t * top_k + s];
            if p < 0 {
                continue;
            }
            let src = &ys[p as usize * dim..(p as usize + 1) * dim];
            match weights {
                None => {
                    for (a, &v) in acc.iter_mut().zip(src) {
                        *a = *a + v.to_acc();
                    }
                }
                Some(w) => {
                    let w = w[t * top_k + s];
                    for (a, &v) in acc.iter_mut().zip(src) {
                        *a = *a + w * v.to_acc();
                    }
                }
            }
        }
        for (o, &a) in row.iter_mut().zip(acc.iter()) {
            *o = T::from_acc(a);
        }
    };
    if out.len() < PARALLEL_MIN_ELEMENTS {
        let mut acc = vec![T::Acc::default(); dim];
        out.chunks_mut(dim)
            .enumerate()
            .for_each(|(t, row)| reduce(&mut acc, t, row));
    } else {
        crate::parallel::install(|| {
            out.par_chunks_mut(dim)
                .enumerate()
                .with_min_len(min_rows(dim))
                .for_each_init(
                    || vec![T::Acc::default(); dim],
                    |acc, (t, row)| reduce(acc, t, row),
                )
        });
    }
    Ok(())
}

/// Dot product with independent partial sums, so the loop vectorises.
#[inline]
fn dot<T: Element>(a: &[T], b: &[T]) -> T::Acc {
    const LANES: usize = 16;
    let mut partial = [T::Acc::default(); LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            partial[l] = partial[l] + x[l].to_acc() * y[l].to_acc();
        }
    }
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::Acc::default(), |s, (&u, &v)| s + u.to_acc() * v.to_acc());
    partial.iter().fold(tail, |s, &v| s + v)
}

/// Gradient of the combine weights: `out[t, s] = <dy[t], ys[pos[t, s]]>` (0 for dropped slots).
///
/// `dy`: `[T, dim]`; `ys`: `[rows, dim]`; `pos`, `out`: `[T, top_k]`.
pub fn rowdot<T: Element>(
    dy: &[T],
    ys: &[T],
    dim: usize,
    pos: &[i64],
    top_k: usize,
    out: &mut [T::Acc],
) -> Result<()> {
    if top_k == 0 {
        return Err(Error::value("top_k must be at least 1"));
    }
    if !pos.len().is_multiple_of(top_k) || out.len() != pos.len() {
        return Err(Error::value(format!(
            "pos and out must be [T, {top_k}], got {} and {} entries",
            pos.len(),
            out.len()
        )));
    }
    let num_tokens = pos.len() / top_k;
    if dim == 0 {
        out.fill(T::Acc::default());
        return Ok(());
    }
    if dy.len() != checked_mul("dy tokens * dim", num_tokens, dim)? {
        return Err(Error::value(format!(
            "dy must be [{num_tokens}, {dim}], got {} elements",
            dy.len()
        )));
    }
    if !ys.len().is_multiple_of(dim) {
        return Err(Error::value(format!(
            "ys length {} is not a multiple of dim {dim}",
            ys.len()
        )));
    }
    check_index("pos", pos, ys.len() / dim)?;
    let dots = |t: usize, o: &mut [T::Acc]| {
        let g = &dy[t * dim..(t + 1) * dim];
        for (s, o) in o.iter_mut().enumerate() {
            let p = pos[t * top_k + s];
            *o = if p < 0 {
                T::Acc::default()
            } else {
                dot(g, &ys[p as usize * dim..(p as usize + 1) * dim])
            };
        }
    };
    if out.len() * dim < PARALLEL_MIN_ELEMENTS {
        out.chunks_mut(top_k)
            .enumerate()
            .for_each(|(t, o)| dots(t, o));
    } else {
        crate::parallel::install(|| {
            out.par_chunks_mut(top_k)
                .enumerate()
                .with_min_len(min_rows(dim * top_k))
                .for_each(|(t, o)| dots(t, o))
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small deterministic pseudo-random generator for test data.
    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 33
    }

    fn random_idx(t: usize, k: usize, e: usize, seed: u64) -> Vec<i64> {
        let mut s = seed;
        let mut idx = Vec::with_capacity(t * k);
        for _ in 0..t {
            let mut chosen: Vec<i64> = Vec::new();
            while chosen.len() < k {
                let c = (lcg(&mut s) % e as u64) as i64;
                if !chosen.contains(&c) {
                    chosen.push(c);
                }
            }
            idx.extend(chosen);
        }
        idx
    }

    #[test]
    fn plan_is_a_stable_sort_with_consistent_offsets() {
        // Large enough to span several sort chunks.
        let (t, k, e) = (20_000, 2, 7);
        let idx = random_idx(t, k, e, 1);
        let plan = dispatch_plan(&idx, k, e, None, false).unwrap();
        assert_eq!(plan.dropped, 0);
        assert_eq!(plan.offsets[0], 0);
        assert_eq!(plan.offsets[e] as usize, t * k);
        for x in 0..e {
            assert_eq!(plan.offsets[x + 1] - plan.offsets[x], plan.counts[x]);
            let rows = plan.offsets[x] as usize..plan.offsets[x + 1] as usize;
            let slots = &plan.slot_of[rows];
            assert!(slots.windows(2).all(|w| w[0] < w[1]), "stable order");
            assert!(slots.iter().all(|&a| idx[a as usize] == x as i64));
        }
        for (a, &p) in plan.pos.iter().enumerate() {
            assert_eq!(plan.slot_of[p as usize], a as i64);
            assert_eq!(plan.token_of[p as usize], (a / k) as i64);
        }
    }

    #[test]
    fn capacity_keeps_the_first_slots_in_token_order() {
        let idx = vec![0, 1, 0, 2, 0, 1, 1, 0];
        let plan = dispatch_plan(&idx, 2, 3, Some(2), false).unwrap();
        assert_eq!(plan.routed, vec![4, 3, 1]);
        assert_eq!(plan.counts, vec![2, 2, 1]);
        assert_eq!(plan.dropped, 3);
        // Expert 0 keeps slots 0 and 2; slots 4 and 7 are dropped. Expert 1 keeps 1 and 5.
        assert_eq!(plan.pos, vec![0, 2, 1, 4, -1, 3, -1, -1]);
        assert_eq!(plan.token_of, vec![0, 1, 0, 2, 1]);
    }

    #[test]
    fn padded_plan_gives_every_expert_the_same_rows() {
        let idx = vec![0, 1, 0, 2, 0, 1];
        let plan = dispatch_plan(&idx, 2, 4, None, true).unwrap();
        assert_eq!(plan.offsets, vec![0, 3, 6, 9, 12]);
        assert_eq!(
            plan.token_of,
            vec![0, 1, 2, 0, 2, -1, 1, -1, -1, -1, -1, -1]
        );
    }

    #[test]
    fn permute_and_combine_round_trip() {
        // Small sizes run serially, large ones in the pool.
        for (t, k, e, d) in [(50, 3, 5, 4), (3000, 2, 7, 33)] {
            round_trip(t, k, e, d);
        }
    }

    fn round_trip(t: usize, k: usize, e: usize, d: usize) {
        let idx = random_idx(t, k, e, 2);
        let x: Vec<f64> = (0..t * d).map(|i| i as f64 * 0.5 - 3.0).collect();
        let plan = dispatch_plan(&idx, k, e, None, false).unwrap();
        let mut xs = vec![0.0; plan.token_of.len() * d];
        permute(&x, d, &plan.token_of, None, &mut xs).unwrap();
        let w = vec![1.0 / k as f64; t * k];
        let mut y = vec![0.0; t * d];
        combine(&xs, d, &plan.pos, k, Some(&w), &mut y).unwrap();
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-12);
        }
        let mut dw = vec![0.0; t * k];
        rowdot(&x, &xs, d, &plan.pos, k, &mut dw).unwrap();
        for tt in 0..t {
            let n: f64 = x[tt * d..(tt + 1) * d].iter().map(|v| v * v).sum();
            assert!((dw[tt * k] - n).abs() < 1e-9);
        }
    }

    #[test]
    fn bf16_combine_accumulates_in_f32() {
        let ys = [bf16::from_f32(1.0), bf16::from_f32(1.0 / 256.0)];
        let mut out = [bf16::ZERO];
        combine(&ys, 1, &[0, 1], 2, Some(&[1.0, 1.0]), &mut out).unwrap();
        assert_eq!(out[0], bf16::from_f32(1.0 + 1.0 / 256.0));
    }

    #[test]
    fn plan_sizes_are_bounded() {
        // num_experts beyond the limit is an error, not a 2^40-entry histogram.
        for e in [0, MAX_EXPERTS + 1, 1 << 40, usize::MAX] {
            assert!(matches!(
                dispatch_plan(&[0, 0], 1, e, None, false),
                Err(Error::Value(_))
            ));
        }
        assert!(dispatch_plan(&[0, 1], 0, 4, None, false).is_err());
        // The largest expert count works with few slots (histograms stay O(slots + E)).
        let idx: Vec<i64> = (0..40_000)
            .map(|i| (i * 7919) % MAX_EXPERTS as i64)
            .collect();
        let plan = dispatch_plan(&idx, 2, MAX_EXPERTS, None, false).unwrap();
        assert_eq!(plan.counts.len(), MAX_EXPERTS);
        assert_eq!(plan.offsets[MAX_EXPERTS], 40_000);
        // Padding all slots of one expert across 2^20 experts would need 2^20 * 40_000 rows.
        let skewed = vec![5i64; 40_000];
        let err = dispatch_plan(&skewed, 1, MAX_EXPERTS, None, true).unwrap_err();
        assert!(err.to_string().contains("padded plan"), "{err}");
        // With a capacity the same call is small.
        let plan = dispatch_plan(&skewed, 1, MAX_EXPERTS, Some(2), true).unwrap();
        assert_eq!(plan.token_of.len(), 2 * MAX_EXPERTS);
        assert_eq!(plan.dropped, 40_000 - 2);
    }

    #[test]
    fn kernel_sizes_are_checked() {
        // token_of.len() * dim overflows: an error, not a wrapped comparison.
        let mut out = [0.0f32; 4];
        assert!(permute(&[0.0f32; 0], usize::MAX / 2, &[-1, -1, -1], None, &mut out).is_err());
        assert!(combine(&[0.0f32; 0], usize::MAX / 2, &[-1, -1], 1, None, &mut out).is_err());
        let mut dw = [0.0f32; 2];
        assert!(rowdot(
            &[0.0f32; 4],
            &[0.0f32; 0],
            usize::MAX / 2,
            &[-1, -1],
            1,
            &mut dw
        )
        .is_err());
    }

    #[test]
    fn kernels_reject_bad_indices() {
        let x = [0.0f32; 4];
        let mut out = [0.0f32; 2];
        assert!(permute(&x, 2, &[2], None, &mut out).is_err());
        assert!(combine(&x, 2, &[0, 5], 2, None, &mut out[..2]).is_err());
        assert!(dispatch_plan(&[0, 3], 2, 3, None, false).is_err());
        assert!(dispatch_plan(&[0, 1, 2], 2, 3, None, false).is_err());
    }
}
