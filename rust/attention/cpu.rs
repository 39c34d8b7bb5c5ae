//! Tiled attention on the CPU: online-softmax forward, recomputing backward.
//!
//! Forward: one task per (sequence, query head, query tile of 64 rows); key/value tiles of 128
//! stream through it with an online softmax in f32 (f64 for f64 inputs); only the log-sum-exp of
//! each row is kept for the backward. Backward: one task per (sequence, kv head, part), where part
//! `p` owns the key/value tiles `p, p + P, p + 2P, ...`; it finishes dK and dV of its tiles (summing
//! over the query heads of a GQA group) and adds its dQ contributions into its own dQ buffer. The
//! `P` buffers are summed in a fixed order at the end, so results do not depend on the thread
//! count. No buffer larger than a tile is allocated per task; no N x N matrix exists anywhere.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::gemm::{Avx2, Avx512};
use super::gemm::{Isa as IsaChoice, MulAdd, Portable, Real, Storage};
use super::mask::{MaskSpec, TileClass};
use crate::error::{checked_mul, checked_product, try_filled, try_with_capacity, try_zeroed};
use crate::error::{Error, Result};

/// Query rows per forward tile.
pub const FWD_BLOCK_Q: usize = 64;
/// Keys per forward tile.
pub const FWD_BLOCK_K: usize = 128;
/// Query rows per backward tile.
pub const BWD_BLOCK_Q: usize = 64;
/// Keys per backward tile.
pub const BWD_BLOCK_K: usize = 64;
/// Largest supported head dimension.
pub const MAX_HEAD_DIM: usize = 256;
/// Largest sequence length, total token count and head count of a call (`i32::MAX`: the packed
/// offsets are int32, and the CUDA kernels index tokens and heads with 32-bit ints). Keeps every
/// mask computation `i + (nk - nq) -/+ window` far from the `i64` range.
pub const MAX_TOKENS: usize = i32::MAX as usize;
/// Backward tasks aimed at per call, independent of the thread count (it fixes the dQ split).
const BWD_TARGET_TASKS: usize = 8;
/// Upper bound on the dQ buffers of the backward (memory: parts x size of dQ).
const BWD_MAX_PARTS: usize = 8;

/// Where the log-sum-exp of query `i` of sequence `b`, head `h` lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LseLayout {
    /// `(batch, heads_q, seqlen_q)`, for padded batches.
    Batched { seqlen_q: usize },
    /// `(heads_q, total_q)`, for packed variable-length sequences.
    Packed { total_q: usize },
}

/// Sizes of one attention call. Tensors are token-major: q `(total_q, heads_q, head_dim)`, k and v
/// `(total_k, heads_kv, head_dim)`; sequence `b` holds tokens `cu_seqlens[b]..cu_seqlens[b + 1]`.
#[derive(Clone, Debug)]
pub struct Shape {
    pub heads_q: usize,
    pub heads_kv: usize,
    pub head_dim: usize,
    pub cu_seqlens_q: Vec<usize>,
    pub cu_seqlens_k: Vec<usize>,
    pub lse_layout: LseLayout,
}

impl Shape {
    /// A padded batch: q `(batch, seqlen_q, heads_q, head_dim)`, k/v `(batch, seqlen_k, heads_kv, head_dim)`.
    pub fn batched(
        batch: usize,
        seqlen_q: usize,
        seqlen_k: usize,
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
    ) -> Result<Self> {
        check_count("seqlen_q", seqlen_q)?;
        check_count("seqlen_k", seqlen_k)?;
        check_count(
            "total_q (batch * seqlen_q)",
            checked_mul("batch * seqlen_q", batch, seqlen_q)?,
        )?;
        check_count(
            "total_k (batch * seqlen_k)",
            checked_mul("batch * seqlen_k", batch, seqlen_k)?,
        )?;
        // Sequences without queries or keys hold nothing: a batch of them is described by no
        // sequence at all (so an empty (2^40, 0, h, d) batch allocates no 2^40 offsets).
        let batch = if seqlen_q == 0 && seqlen_k == 0 {
            0
        } else {
            batch
        };
        // batch * seqlen fits (checked above), and batch <= total_q or total_k < 2^31.
        let offsets = |n: usize| -> Result<Vec<usize>> {
            let mut cu = try_with_capacity(batch + 1, "cu_seqlens")?;
            cu.extend((0..=batch).map(|b| b * n));
            Ok(cu)
        };
        let shape = Shape {
            heads_q,
            heads_kv,
            head_dim,
            cu_seqlens_q: offsets(seqlen_q)?,
            cu_seqlens_k: offsets(seqlen_k)?,
            lse_layout: LseLayout::Batched { seqlen_q },
        };
        shape.validate()?;
        Ok(shape)
    }

    /// Packed sequences given by cumulative lengths (`batch + 1` entries starting at 0).
    pub fn packed(
        cu_seqlens_q: &[i32],
        cu_seqlens_k: &[i32],
        heads_q: usize,
        heads_kv: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let convert = |name: &str, cu: &[i32]| -> Result<Vec<usize>> {
            if cu.len() < 2 {
                return Err(Error::value(format!(
                    "{name} must hold batch + 1 >= 2 offsets, got {} entries",
                    cu.len()
                )));
            }
            if cu[0] != 0 {
                return Err(Error::value(format!(
                    "{name} must start at 0, got {}",
                    cu[0]
                )));
            }
            if let Some(w) = cu.windows(2).find(|w| w[1] < w[0]) {
                return Err(Error::value(format!(
                    "{name} must be non-decreasing, got {} after {}",
                    w[1], w[0]
                )));
            }
            Ok(cu.iter().map(|&x| x as usize).collect())
        };
        let cu_q = convert("cu_seqlens_q", cu_seqlens_q)?;
        let cu_k = convert("cu_seqlens_k", cu_seqlens_k)?;
        if cu_q.len() != cu_k.len() {
            return Err(Error::value(format!(
                "cu_seqlens_q and cu_seqlens_k describe different batch sizes ({} vs {})",
                cu_q.len() - 1,
                cu_k.len() - 1
            )));
        }
        let total_q = *cu_q.last().unwrap_or(&0);
        let shape = Shape {
            heads_q,
            heads_kv,
            head_dim,
            cu_seqlens_q: cu_q,
            cu_seqlens_k: cu_k,
            lse_layout: LseLayout::Packed { total_q },
        };
        shape.validate()?;
        Ok(shape)
    }

    fn validate(&self) -> Result<()> {
        if self.head_dim == 0 || self.head_dim > MAX_HEAD_DIM {
            return Err(Error::value(format!(
                "head_dim must be in 1..={MAX_HEAD_DIM}, got {}",
                self.head_dim
            )));
        }
        if self.heads_q == 0 || self.heads_kv == 0 || !self.heads_q.is_multiple_of(self.heads_kv) {
            return Err(Error::value(format!(
                "query heads ({}) must be a positive multiple of key/value heads ({})",
                self.heads_q, self.heads_kv
            )));
        }
        check_count("heads_q", self.heads_q)?;
        // The fields are public: check what the kernels' indexing relies on (O(batch)).
        let (cq, ck) = (&self.cu_seqlens_q, &self.cu_seqlens_k);
        let monotone = |cu: &[usize]| cu.first() == Some(&0) && cu.windows(2).all(|w| w[0] <= w[1]);
        if cq.len() != ck.len() || !monotone(cq) || !monotone(ck) {
            return Err(Error::value(
                "cu_seqlens_q and cu_seqlens_k must be non-decreasing offsets from 0 of one batch",
            ));
        }
        let lse_ok = match self.lse_layout {
            LseLayout::Batched { seqlen_q } => cq.windows(2).all(|w| w[1] - w[0] == seqlen_q),
            LseLayout::Packed { total_q } => total_q == self.total_q(),
        };
        if !lse_ok {
            return Err(Error::value(format!(
                "the log-sum-exp layout {:?} does not match the query offsets",
                self.lse_layout
            )));
        }
        check_count("total_q", self.total_q())?;
        check_count("total_k", self.total_k())?;
        // The element counts of q and k/v (and so of every buffer sized from them) fit.
        checked_product(
            "q elements (total_q * heads_q * head_dim)",
            &[self.total_q(), self.heads_q, self.head_dim],
        )?;
        checked_product(
            "k elements (total_k * heads_kv * head_dim)",
            &[self.total_k(), self.heads_kv, self.head_dim],
        )?;
        Ok(())
    }

    pub fn batch(&self) -> usize {
        self.cu_seqlens_q.len() - 1
    }
    pub fn total_q(&self) -> usize {
        *self.cu_seqlens_q.last().unwrap_or(&0)
    }
    pub fn total_k(&self) -> usize {
        *self.cu_seqlens_k.last().unwrap_or(&0)
    }
    fn seq_q(&self, b: usize) -> (usize, usize) {
        (
            self.cu_seqlens_q[b],
            self.cu_seqlens_q[b + 1] - self.cu_seqlens_q[b],
        )
    }
    fn seq_k(&self, b: usize) -> (usize, usize) {
        (
            self.cu_seqlens_k[b],
            self.cu_seqlens_k[b + 1] - self.cu_seqlens_k[b],
        )
    }
    /// Number of log-sum-exp entries.
    pub fn lse_len(&self) -> usize {
        match self.lse_layout {
            LseLayout::Batched { seqlen_q } => self.batch() * self.heads_q * seqlen_q,
            LseLayout::Packed { total_q } => self.heads_q * total_q,
        }
    }
    /// Index of the first entry of (sequence b, head h); entries of a row run with stride 1.
    fn lse_base(&self, b: usize, h: usize) -> usize {
        match self.lse_layout {
            LseLayout::Batched { seqlen_q } => (b * self.heads_q + h) * seqlen_q,
            LseLayout::Packed { total_q } => h * total_q + self.cu_seqlens_q[b],
        }
    }
}

/// Scores and mask of one call.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub softmax_scale: f64,
    /// `s -> softcap * tanh(s / softcap)` when > 0.
    pub softcap: f64,
    /// Bottom-right aligned causal mask (forces `window_right = 0`).
    pub causal: bool,
    /// Keys to the left of the diagonal a query sees; -1 = unbounded.
    pub window_left: i64,
    /// Keys to the right of the diagonal a query sees; -1 = unbounded.
    pub window_right: i64,
    /// Leading tokens that attend to and are attended by every token.
    pub num_global: usize,
}

/// Checks the scalar attention options shared by the CPU and CUDA kernels.
pub fn check_scalar_options(
    softmax_scale: f64,
    softcap: f64,
    window_left: i64,
    window_right: i64,
) -> Result<()> {
    if !softmax_scale.is_finite() {
        return Err(Error::value(format!(
            "softmax_scale must be finite, got {softmax_scale}"
        )));
    }
    if !(softcap.is_finite() && softcap >= 0.0) {
        return Err(Error::value(format!(
            "softcap must be >= 0 (0 = off), got {softcap}"
        )));
    }
    if window_left < -1 || window_right < -1 {
        return Err(Error::value(format!(
            "window bounds must be -1 (unbounded) or >= 0, got ({window_left}, {window_right})"
        )));
    }
    Ok(())
}

impl Options {
    fn validate(&self) -> Result<()> {
        check_scalar_options(
            self.softmax_scale,
            self.softcap,
            self.window_left,
            self.window_right,
        )?;
        if self.causal && self.window_right > 0 {
            return Err(Error::value(format!(
                "causal attention sees no keys right of the diagonal, but window_right = {}",
                self.window_right
            )));
        }
        Ok(())
    }

    fn mask(&self, nq: usize, nk: usize) -> MaskSpec {
        let right = if self.causal { 0 } else { self.window_right };
        MaskSpec::new(self.window_left, right, self.num_global, nq, nk)
    }
}

#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// Tasks write disjoint regions through it (documented at each use).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn ptr(&self) -> *mut T {
        self.0
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Generic,
}

fn detect_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::env::var_os("SLIMFORGE_ATTENTION_NO_SIMD").is_none() {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
    }
    Isa::Generic
}

fn check_count(name: &str, n: usize) -> Result<()> {
    if n > MAX_TOKENS {
        return Err(Error::value(format!(
            "{name} must be at most {MAX_TOKENS} (2^31 - 1), got {n}"
        )));
    }
    Ok(())
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

fn check_len(name: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(Error::value(format!(
            "{name} has {got} elements, expected {want}"
        )));
    }
    Ok(())
}

/// Rows of each (sequence, kv head) block of [`PackedKv`]: the forward's key gemm reads whole
/// groups of 8 rows.
const KV_ROW_ALIGN: usize = 8;

/// A token-major tensor `(tokens, heads, d)` laid out again per (sequence, head) as contiguous rows
/// of `round_up(d, 16)` accumulation-type values, `round_up(seqlen, align)` rows per block, zero
/// padded: the kernels then read tiles as plain slices (no per-tile packing, no cache-aliasing
/// strided reads). Used for K and V in the forward and for Q and dO in the backward.
struct HeadRows {
    /// (first token, tokens) of each sequence.
    seqs: Vec<(usize, usize)>,
    /// First row of each sequence (all heads of earlier sequences come before it).
    seq_base: Vec<usize>,
    heads: usize,
    d: usize,
    dp: usize,
    align: usize,
}

impl HeadRows {
    fn new(seqs: Vec<(usize, usize)>, heads: usize, d: usize, align: usize) -> Result<Self> {
        let mut seq_base = try_with_capacity(seqs.len() + 1, "attention row offsets")?;
        let mut rows = 0usize;
        let overflow = || Error::value("attention row buffer size overflows a 64-bit size");
        for &(_, n) in &seqs {
            seq_base.push(rows);
            let block = n
                .checked_next_multiple_of(align)
                .and_then(|r| r.checked_mul(heads))
                .ok_or_else(overflow)?;
            rows = rows.checked_add(block).ok_or_else(overflow)?;
        }
        seq_base.push(rows);
        let dp = round_up(d, 16);
        rows.checked_mul(dp).ok_or_else(overflow)?;
        Ok(HeadRows {
            seqs,
            seq_base,
            heads,
            d,
            dp,
            align,
        })
    }

    /// Element offset of row `i` of (sequence b, head h).
    fn row(&self, b: usize, h: usize, i: usize) -> usize {
        (self.seq_base[b] + h * round_up(self.seqs[b].1, self.align) + i) * self.dp
    }

    /// `x` (tokens, heads, d) in this layout, converted to the accumulation type and times `mul`.
    fn build<S: Storage>(&self, x: &[S], mul: S::Acc) -> Result<Vec<S::Acc>> {
        let (heads, d, dp) = (self.heads, self.d, self.dp);
        // Fits: checked in `new`.
        let len = self.seq_base[self.seqs.len()] * dp;
        // Every element is written below (values or padding zeros): no zero-fill pass first.
        let mut out = try_with_capacity::<S::Acc>(len, "the attention row buffer")?;
        let dst = SharedMut(out.as_mut_ptr());
        // Work in token order (each source row holds every head of one token, contiguous), so
        // reads stream through memory; a head-major walk strides by heads * d and defeats the
        // prefetchers. Chunks of rows per task; each writes `heads` sequential streams.
        const CHUNK: usize = 64;
        let chunks: Vec<(usize, usize)> = (0..self.seqs.len())
            .flat_map(|b| {
                let padded = round_up(self.seqs[b].1, self.align);
                (0..padded.div_ceil(CHUNK)).map(move |c| (b, c * CHUNK))
            })
            .collect();
        crate::parallel::install(|| {
            chunks.par_iter().for_each(|&(b, i_start)| {
                let (t0, n) = self.seqs[b];
                let i_end = (i_start + CHUNK).min(round_up(n, self.align));
                for h in 0..heads {
                    // SAFETY: (b, row chunk) tasks own disjoint rows of every head's block; the
                    // blocks tile `0..len` of `out`, so every element gets written exactly once.
                    let rows = unsafe {
                        std::slice::from_raw_parts_mut(
                            dst.ptr().add(self.row(b, h, i_start)),
                            (i_end - i_start) * dp,
                        )
                    };
                    for (i, row) in (i_start..i_end).zip(rows.chunks_exact_mut(dp)) {
                        if i < n {
                            let src = &x[((t0 + i) * heads + h) * d..][..d];
                            for (o, &value) in row.iter_mut().zip(src) {
                                *o = value.load() * mul;
                            }
                            row[d..].fill(S::Acc::ZERO);
                        } else {
                            row.fill(S::Acc::ZERO);
                        }
                    }
                }
            })
        });
        // SAFETY: all `len` elements were initialised above.
        unsafe { out.set_len(len) };
        Ok(out)
    }
}

/// K and V of every (sequence, kv head) as [`HeadRows`], `round_up(seqlen_k, 8)` rows each.
struct PackedKv<T> {
    k: Vec<T>,
    v: Vec<T>,
    rows: HeadRows,
}

impl<T: Real> PackedKv<T> {
    fn new<S: Storage<Acc = T>>(shape: &Shape, k: &[S], v: &[S]) -> Result<Self> {
        let seqs = (0..shape.batch()).map(|b| shape.seq_k(b)).collect();
        let rows = HeadRows::new(seqs, shape.heads_kv, shape.head_dim, KV_ROW_ALIGN)?;
        Ok(PackedKv {
            k: rows.build(k, T::ONE)?,
            v: rows.build(v, T::ONE)?,
            rows,
        })
    }
}

struct FwdCtx<'a, S: Storage> {
    q: &'a [S],
    kv: &'a PackedKv<S::Acc>,
    shape: &'a Shape,
    opts: Options,
    out: SharedMut<S>,
    lse: SharedMut<S::Acc>,
}

/// Attention forward: returns `out` (layout of q) and the log-sum-exp of each row (see
/// [`LseLayout`]); rows that see no key give 0 and `-inf`.
pub fn forward<S: Storage>(
    q: &[S],
    k: &[S],
    v: &[S],
    shape: &Shape,
    opts: &Options,
) -> Result<(Vec<S>, Vec<S::Acc>)> {
    opts.validate()?;
    shape.validate()?;
    let (hq, hkv, d) = (shape.heads_q, shape.heads_kv, shape.head_dim);
    check_len("q", q.len(), shape.total_q() * hq * d)?;
    check_len("k", k.len(), shape.total_k() * hkv * d)?;
    check_len("v", v.len(), shape.total_k() * hkv * d)?;
    if q.is_empty() {
        // No query: nothing to compute (and no loop over heads or sequences of an empty q).
        return Ok((Vec::new(), Vec::new()));
    }
    // One trip into the pool for the whole call (the installs inside then run in place): each
    // trip costs two thread wake-ups, which dominate small calls.
    crate::parallel::install(|| forward_in_pool(q, k, v, shape, opts))
}

fn forward_in_pool<S: Storage>(
    q: &[S],
    k: &[S],
    v: &[S],
    shape: &Shape,
    opts: &Options,
) -> Result<(Vec<S>, Vec<S::Acc>)> {
    let hq = shape.heads_q;
    // Every row of `out` is written by the task of its query tile: no zero-fill pass first.
    let mut out = try_with_capacity::<S>(q.len(), "the attention output")?;
    let mut lse = try_filled(shape.lse_len(), S::Acc::NEG_INFINITY, "the log-sum-exp")?;
    // At most heads_q * (total_q / 64 + sequences with queries) tasks: O(size of q).
    let mut tasks = Vec::new();
    for b in 0..shape.batch() {
        let nqt = shape.seq_q(b).1.div_ceil(FWD_BLOCK_Q);
        if nqt == 0 {
            continue;
        }
        for h in 0..hq {
            tasks.extend((0..nqt).map(|it| (b, h, it)));
        }
    }
    let kv = PackedKv::new(shape, k, v)?;
    let ctx = FwdCtx {
        q,
        kv: &kv,
        shape,
        opts: *opts,
        out: SharedMut(out.as_mut_ptr()),
        lse: SharedMut(lse.as_mut_ptr()),
    };
    let isa = detect_isa();
    crate::parallel::install(|| {
        tasks.par_iter().for_each(|&task| {
            // SAFETY: each task writes only the out rows and lse entries of its own query tile.
            unsafe { forward_dispatch(&ctx, task, isa) }
        })
    });
    // SAFETY: the query tiles of all (sequence, head) pairs cover every row of `out`.
    unsafe { out.set_len(q.len()) };
    Ok((out, lse))
}

unsafe fn forward_dispatch<S: Storage>(ctx: &FwdCtx<'_, S>, task: (usize, usize, usize), isa: Isa) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => forward_avx512(ctx, task),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => forward_avx2(ctx, task),
        Isa::Generic => forward_tile::<S, Portable>(ctx, task),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn forward_avx512<S: Storage>(ctx: &FwdCtx<'_, S>, task: (usize, usize, usize)) {
    forward_tile::<S, Avx512>(ctx, task)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_avx2<S: Storage>(ctx: &FwdCtx<'_, S>, task: (usize, usize, usize)) {
    forward_tile::<S, Avx2>(ctx, task)
}

#[inline(always)]
unsafe fn forward_tile<S: Storage, I: IsaChoice>(
    ctx: &FwdCtx<'_, S>,
    (b, h, it): (usize, usize, usize),
) {
    const BQ: usize = FWD_BLOCK_Q;
    const BK: usize = FWD_BLOCK_K;
    let zero = S::Acc::ZERO;
    let neg_inf = S::Acc::NEG_INFINITY;
    let shape = ctx.shape;
    let (hq, hkv, d) = (shape.heads_q, shape.heads_kv, shape.head_dim);
    let dp = round_up(d, 16);
    let hk = h / (hq / hkv);
    let (q0, nq) = shape.seq_q(b);
    let nk = shape.seq_k(b).1;
    let i0 = it * BQ;
    let rows = BQ.min(nq - i0);
    let mask = ctx.opts.mask(nq, nk);
    let scale = S::Acc::from_f64(ctx.opts.softmax_scale);
    let capped = ctx.opts.softcap > 0.0;
    let cap = S::Acc::from_f64(ctx.opts.softcap);
    let inv_cap = if capped {
        S::Acc::from_f64(1.0 / ctx.opts.softcap)
    } else {
        zero
    };

    // Everything is kept transposed (keys or features x queries) so softmax statistics are
    // per-column vectors and no tile is ever transposed inside the key loop. Scores, their running
    // max m and the lse are in natural units, computed exactly as the backward recomputes them
    // (`scale` folded into Q^T, the same sums, the same softcap): see `backward_part`. Only the
    // difference s - m goes to base 2, P = exp2((s - m) * log2(e)), so its rounding is relative to
    // s - m (P = 1 exactly at the max), not to |s|.
    let log2e = S::Acc::from_f64(std::f64::consts::LOG2_E);
    // Q rows are heads * d apart in memory: copy them with vector loads first (many rows in
    // flight), then transpose from L1; a scalar transpose straight from the strided rows waits
    // on one cache miss after another.
    let mut q_rows = Vec::with_capacity(rows * d);
    for r in 0..rows {
        q_rows.extend_from_slice(&ctx.q[((q0 + i0 + r) * hq + h) * d..][..d]);
    }
    let mut q_t = vec![zero; d * BQ];
    transpose_rows(&q_rows, d, rows, d, scale, &mut q_t, BQ);
    let mut s_t = vec![zero; BK * BQ];
    let mut acc_t = vec![zero; dp * BQ];
    let mut m = [neg_inf; BQ];
    let mut l = [zero; BQ];
    let mut m_use = [zero; BQ];
    let mut alpha = [zero; BQ];
    let mut tile_sum = [zero; BQ];

    for jt in 0..nk.div_ceil(BK) {
        let j0 = jt * BK;
        let cols = BK.min(nk - j0);
        let class = mask.classify(i0, i0 + rows, j0, j0 + cols);
        if class == TileClass::Skip {
            continue;
        }
        let k_ptr = ctx.kv.k.as_ptr().add(ctx.kv.rows.row(b, hk, j0));
        let v_ptr = ctx.kv.v.as_ptr().add(ctx.kv.rows.row(b, hk, j0));
        // S^T = K Q^T (keys x queries); rows past `cols` are never read.
        let m_rows = round_up(cols, 8);
        S::Acc::gemm_for::<I>(
            m_rows,
            BQ,
            d,
            k_ptr,
            dp,
            1,
            q_t.as_ptr(),
            BQ,
            s_t.as_mut_ptr(),
            BQ,
            false,
        );
        let mut tile_max = [neg_inf; BQ];
        for c in 0..cols {
            let row = &mut s_t[c * BQ..(c + 1) * BQ];
            if capped {
                for x in row.iter_mut() {
                    *x = cap * capped_tanh(*x, inv_cap);
                }
            }
            if class == TileClass::Partial {
                mask.mask_outside(j0 + c, false, i0, &mut row[..rows], neg_inf);
            }
            for (t, &x) in tile_max.iter_mut().zip(row.iter()) {
                *t = t.max(x);
            }
        }
        for r in 0..BQ {
            let m_new = m[r].max(tile_max[r]);
            // A column that has seen nothing keeps m = -inf; shifting by 0 gives P = 0, not NaN.
            m_use[r] = if m_new == neg_inf { zero } else { m_new };
            alpha[r] = ((m[r] - m_use[r]) * log2e).exp2_nonpos_with::<I::MulAdd>();
            m[r] = m_new;
        }
        tile_sum.fill(zero);
        for c in 0..cols {
            let row = &mut s_t[c * BQ..(c + 1) * BQ];
            for ((x, &mu), t) in row.iter_mut().zip(&m_use).zip(tile_sum.iter_mut()) {
                // x <= mu: masked scores are -inf, and mu is the max of the column so far.
                let p = ((*x - mu) * log2e).exp2_nonpos_with::<I::MulAdd>();
                *x = p;
                *t = *t + p;
            }
        }
        let mut rescale = false;
        for r in 0..BQ {
            l[r] = l[r] * alpha[r] + tile_sum[r];
            rescale |= alpha[r] != S::Acc::ONE;
        }
        // Once the running maxima settle (most tiles after the first few) alpha is exactly 1.
        if rescale {
            for x in 0..d {
                for (a, &al) in acc_t[x * BQ..(x + 1) * BQ].iter_mut().zip(&alpha) {
                    *a = *a * al;
                }
            }
        }
        // acc^T += V^T P^T (features x queries); V^T is a strided view of the V tile.
        S::Acc::gemm_for::<I>(
            dp,
            BQ,
            cols,
            v_ptr,
            1,
            dp,
            s_t.as_ptr(),
            BQ,
            acc_t.as_mut_ptr(),
            BQ,
            true,
        );
    }

    let lse_base = shape.lse_base(b, h) + i0;
    for r in 0..rows {
        let out_row = ctx.out.ptr().add(((q0 + i0 + r) * hq + h) * d);
        if l[r] == zero {
            // The row sees no key: output 0.
            // (All storage types have 0.0 as all-zero bits; the row may be uninitialised.)
            std::ptr::write_bytes(out_row, 0, d);
            *ctx.lse.ptr().add(lse_base + r) = neg_inf;
            continue;
        }
        let inv = S::Acc::ONE / l[r];
        for x in 0..d {
            *out_row.add(x) = S::store(acc_t[x * BQ + r] * inv);
        }
        // l >= 1 (the max contributes 2^0 = 1); one key, or one clear winner, gives lse = m exactly.
        *ctx.lse.ptr().add(lse_base + r) = m[r] + l[r].ln();
    }
}

/// `tanh(s / cap)` of a scaled score `s`: the forward's softcapped score is `cap * capped_tanh(s)`.
/// Forward and backward must compute it with the same operations (see `backward_part`).
#[inline(always)]
fn capped_tanh<T: Real>(s: T, inv_cap: T) -> T {
    (s * inv_cap).tanh()
}

/// `dst[x * ld + r] = src[r * stride + x] * mul` for `r < rows`, `x < d`.
///
/// Kept out of line, so it is compiled for the baseline target: inside the AVX-512 kernels the
/// strided side of a transpose vectorises into gathers or scatters, which cost more than scalar
/// moves here.
#[inline(never)]
fn transpose_rows<S: Storage>(
    src: &[S],
    stride: usize,
    rows: usize,
    d: usize,
    mul: S::Acc,
    dst: &mut [S::Acc],
    ld: usize,
) {
    for r in 0..rows {
        for (x, &v) in src[r * stride..r * stride + d].iter().enumerate() {
            dst[x * ld + r] = v.load() * mul;
        }
    }
}

/// `dst[x * ld + r] = src[r * stride + x]` for `r < rows`, `x < d`; out of line for the same
/// reason as [`transpose_rows`].
#[inline(never)]
fn transpose_acc<T: Real>(
    src: &[T],
    stride: usize,
    rows: usize,
    d: usize,
    dst: &mut [T],
    ld: usize,
) {
    for r in 0..rows {
        for (x, &v) in src[r * stride..r * stride + d].iter().enumerate() {
            dst[x * ld + r] = v;
        }
    }
}

struct BwdCtx<'a, S: Storage> {
    k: &'a [S],
    v: &'a [S],
    lse: &'a [S::Acc],
    /// rowsum(dO * O), laid out like lse.
    delta: &'a [S::Acc],
    /// Q (times softmax_scale) and dO rows, `round_up(seqlen_q, BWD_BLOCK_Q)` per block, see
    /// [`HeadRows`].
    q_rows: &'a [S::Acc],
    do_rows: &'a [S::Acc],
    rows: &'a HeadRows,
    shape: &'a Shape,
    opts: Options,
    parts: usize,
    dq_parts: SharedMut<S::Acc>,
    dk: SharedMut<S>,
    dv: SharedMut<S>,
}

/// Attention backward from the saved `out` and `lse`: returns `(dq, dk, dv)` in the layouts of
/// q, k, v. Deterministic: the result does not depend on the number of threads.
#[allow(clippy::too_many_arguments)]
pub fn backward<S: Storage>(
    dout: &[S],
    q: &[S],
    k: &[S],
    v: &[S],
    out: &[S],
    lse: &[S::Acc],
    shape: &Shape,
    opts: &Options,
) -> Result<(Vec<S>, Vec<S>, Vec<S>)> {
    opts.validate()?;
    shape.validate()?;
    let (hq, hkv, d) = (shape.heads_q, shape.heads_kv, shape.head_dim);
    let q_len = shape.total_q() * hq * d;
    check_len("q", q.len(), q_len)?;
    check_len("dout", dout.len(), q_len)?;
    check_len("out", out.len(), q_len)?;
    check_len("k", k.len(), shape.total_k() * hkv * d)?;
    check_len("v", v.len(), shape.total_k() * hkv * d)?;
    check_len("lse", lse.len(), shape.lse_len())?;
    if q.is_empty() {
        // No query sees any key: dK = dV = 0 (and no loop over heads or sequences).
        return Ok((
            Vec::new(),
            try_zeroed(k.len(), "dk")?,
            try_zeroed(v.len(), "dv")?,
        ));
    }
    // One trip into the pool for the whole call, as in `forward`.
    crate::parallel::install(|| backward_in_pool(dout, q, k, v, out, lse, shape, opts))
}

#[allow(clippy::too_many_arguments)]
fn backward_in_pool<S: Storage>(
    dout: &[S],
    q: &[S],
    k: &[S],
    v: &[S],
    out: &[S],
    lse: &[S::Acc],
    shape: &Shape,
    opts: &Options,
) -> Result<(Vec<S>, Vec<S>, Vec<S>)> {
    let (hq, hkv, d) = (shape.heads_q, shape.heads_kv, shape.head_dim);
    let q_len = shape.total_q() * hq * d;
    let batch = shape.batch();
    let zero = S::Acc::ZERO;

    let isa = detect_isa();
    let mut delta = try_zeroed::<S::Acc>(lse.len(), "the backward's delta")?;
    let delta_ptr = SharedMut(delta.as_mut_ptr());
    // (sequence, head) pairs of the sequences with queries: at most total_q * heads_q.
    let pairs: Vec<(usize, usize)> = (0..batch)
        .filter(|&b| shape.seq_q(b).1 > 0)
        .flat_map(|b| (0..hq).map(move |h| (b, h)))
        .collect();
    crate::parallel::install(|| {
        pairs.par_iter().for_each(|&(b, h)| {
            let (q0, nq) = shape.seq_q(b);
            let base = shape.lse_base(b, h);
            let (g, o) = (&dout[q0 * hq * d..], &out[q0 * hq * d..]);
            // SAFETY: (b, h) pairs own disjoint delta entries; `isa` was detected on this CPU.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(delta_ptr.ptr().add(base), nq);
                delta_dispatch(g, o, h, hq, d, dst, isa)
            }
        })
    });

    let seqs = (0..batch).map(|b| shape.seq_q(b)).collect();
    let rows = HeadRows::new(seqs, hq, d, BWD_BLOCK_Q)?;
    // Q times softmax_scale, rounded as in the forward's Q^T: the recomputed scores are then the
    // forward's bit for bit (same products, same summation order), and so is P.
    let scale = S::Acc::from_f64(opts.softmax_scale);
    let q_rows = rows.build(q, scale)?;
    let do_rows = rows.build(dout, S::Acc::ONE)?;

    let max_kv_tiles = (0..batch)
        .map(|b| shape.seq_k(b).1.div_ceil(BWD_BLOCK_K))
        .max()
        .unwrap_or(0)
        .max(1);
    let parts = BWD_TARGET_TASKS
        .div_ceil(batch.max(1) * hkv)
        .clamp(1, BWD_MAX_PARTS)
        .min(max_kv_tiles);
    let mut dq_parts = try_zeroed::<S::Acc>(
        checked_mul("dQ buffers (parts * dq size)", parts, q_len)?,
        "the backward's dQ buffers",
    )?;
    // dK and dV rows are all written by the task owning their key tile: no zero-fill pass.
    let mut dk = try_with_capacity::<S>(k.len(), "dk")?;
    let mut dv = try_with_capacity::<S>(v.len(), "dv")?;
    let ctx = BwdCtx {
        k,
        v,
        lse,
        delta: &delta,
        q_rows: &q_rows,
        do_rows: &do_rows,
        rows: &rows,
        shape,
        opts: *opts,
        parts,
        dq_parts: SharedMut(dq_parts.as_mut_ptr()),
        dk: SharedMut(dk.as_mut_ptr()),
        dv: SharedMut(dv.as_mut_ptr()),
    };
    // Sequences without keys have no dK/dV rows: at most total_k * heads_kv * parts tasks.
    let mut tasks = Vec::new();
    for b in 0..batch {
        if shape.seq_k(b).1 == 0 {
            continue;
        }
        for hk in 0..hkv {
            tasks.extend((0..parts).map(|p| (b, hk, p)));
        }
    }
    crate::parallel::install(|| {
        tasks.par_iter().for_each(|&task| {
            // SAFETY: task (b, hk, p) writes dK/dV rows of its own kv tiles and its own dQ buffer p.
            unsafe { backward_dispatch(&ctx, task, isa) }
        })
    });
    // SAFETY: the parts of every (sequence, kv head) cover all of its key tiles.
    unsafe {
        dk.set_len(k.len());
        dv.set_len(v.len());
    }

    let mut dq = try_zeroed::<S>(q_len, "dq")?;
    let parts_ref = &dq_parts;
    crate::parallel::install(|| {
        dq.par_chunks_mut(4096)
            .enumerate()
            .for_each(|(chunk, dst)| {
                let start = chunk * 4096;
                for (i, slot) in dst.iter_mut().enumerate() {
                    let mut sum = zero;
                    for p in 0..parts {
                        sum = sum + parts_ref[p * q_len + start + i];
                    }
                    *slot = S::store(sum * scale);
                }
            })
    });
    Ok((dq, dk, dv))
}

/// `delta[i] = rowsum(dO * O)` of query `i` of head `h` (rows `heads * d` apart), summed with the
/// multiply-adds of the tile gemm of `backward_part` in the same order (fused where it fuses): where
/// O is a V row bit for bit (a query that sees one key, so P = 1 and O = V exactly), dP - delta is
/// then exactly 0, as it is in the reference, instead of the rounding difference of two sums.
///
/// # Safety
/// The CPU must support `isa`.
unsafe fn delta_dispatch<S: Storage>(
    dout: &[S],
    out: &[S],
    h: usize,
    heads: usize,
    d: usize,
    delta: &mut [S::Acc],
    isa: Isa,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => delta_avx512(dout, out, h, heads, d, delta),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => delta_avx2(dout, out, h, heads, d, delta),
        Isa::Generic => delta_rows::<S, Portable>(dout, out, h, heads, d, delta),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn delta_avx512<S: Storage>(
    dout: &[S],
    out: &[S],
    h: usize,
    heads: usize,
    d: usize,
    delta: &mut [S::Acc],
) {
    delta_rows::<S, Avx512>(dout, out, h, heads, d, delta)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn delta_avx2<S: Storage>(
    dout: &[S],
    out: &[S],
    h: usize,
    heads: usize,
    d: usize,
    delta: &mut [S::Acc],
) {
    delta_rows::<S, Avx2>(dout, out, h, heads, d, delta)
}

#[inline(always)]
fn delta_rows<S: Storage, I: IsaChoice>(
    dout: &[S],
    out: &[S],
    h: usize,
    heads: usize,
    d: usize,
    delta: &mut [S::Acc],
) {
    for (i, slot) in delta.iter_mut().enumerate() {
        let off = (i * heads + h) * d;
        let mut dot = S::Acc::ZERO;
        for (&g, &o) in dout[off..off + d].iter().zip(&out[off..off + d]) {
            // The gemm computes mul_add(a, b, acc) with a from dO and b from V.
            dot = I::MulAdd::mul_add(g.load(), o.load(), dot);
        }
        *slot = dot;
    }
}

unsafe fn backward_dispatch<S: Storage>(
    ctx: &BwdCtx<'_, S>,
    task: (usize, usize, usize),
    isa: Isa,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => backward_avx512(ctx, task),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => backward_avx2(ctx, task),
        Isa::Generic => backward_part::<S, Portable>(ctx, task),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn backward_avx512<S: Storage>(ctx: &BwdCtx<'_, S>, task: (usize, usize, usize)) {
    backward_part::<S, Avx512>(ctx, task)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_avx2<S: Storage>(ctx: &BwdCtx<'_, S>, task: (usize, usize, usize)) {
    backward_part::<S, Avx2>(ctx, task)
}

#[inline(always)]
unsafe fn backward_part<S: Storage, I: IsaChoice>(
    ctx: &BwdCtx<'_, S>,
    (b, hk, part): (usize, usize, usize),
) {
    const BQ: usize = BWD_BLOCK_Q;
    const BK: usize = BWD_BLOCK_K;
    let zero = S::Acc::ZERO;
    let one = S::Acc::ONE;
    let shape = ctx.shape;
    let (hq, hkv, d) = (shape.heads_q, shape.heads_kv, shape.head_dim);
    let dp = round_up(d, 16);
    let group = hq / hkv;
    let (q0, nq) = shape.seq_q(b);
    let (k0, nk) = shape.seq_k(b);
    let mask = ctx.opts.mask(nq, nk);
    let capped = ctx.opts.softcap > 0.0;
    let cap = S::Acc::from_f64(ctx.opts.softcap);
    let inv_cap = if capped {
        S::Acc::from_f64(1.0 / ctx.opts.softcap)
    } else {
        zero
    };
    let log2e = S::Acc::from_f64(std::f64::consts::LOG2_E);
    let q_len = shape.total_q() * hq * d;
    let dq_part = ctx.dq_parts.ptr().add(part * q_len);

    // Key side, packed once per key tile: K rows, K^T and V^T (zero beyond `cols`).
    let mut k_tile = vec![zero; BK * dp];
    let mut k_t = vec![zero; d * BK];
    let mut v_t = vec![zero; d * BK];
    let mut v_rows = vec![zero; BK * d];
    let mut p = vec![zero; BQ * BK];
    let mut ds = vec![zero; BQ * BK];
    let mut tanh_s = vec![zero; if capped { BQ * BK } else { 0 }];
    let mut dq_tile = vec![zero; BQ * dp];
    let mut dk_acc = vec![zero; BK * dp];
    let mut dv_acc = vec![zero; BK * dp];

    let mut jt = part;
    while jt < nk.div_ceil(BK) {
        let j0 = jt * BK;
        let cols = BK.min(nk - j0);
        if cols < BK {
            k_tile.fill(zero);
            k_t.fill(zero);
            v_t.fill(zero);
        }
        let base = ((k0 + j0) * hkv + hk) * d;
        for (c, dst) in k_tile.chunks_exact_mut(dp).take(cols).enumerate() {
            let src = &ctx.k[base + c * hkv * d..][..d];
            for (o, &x) in dst.iter_mut().zip(src) {
                *o = x.load();
            }
        }
        // V rows copied with vector loads first (many strided rows in flight), then both
        // transposes read L1-resident rows.
        for (c, dst) in v_rows.chunks_exact_mut(d).take(cols).enumerate() {
            let src = &ctx.v[base + c * hkv * d..][..d];
            for (o, &x) in dst.iter_mut().zip(src) {
                *o = x.load();
            }
        }
        transpose_acc(&k_tile, dp, cols, d, &mut k_t, BK);
        transpose_acc(&v_rows, d, cols, d, &mut v_t, BK);
        dk_acc.fill(zero);
        dv_acc.fill(zero);
        // A sequence without queries has nothing to add: skip its (possibly many) heads.
        let heads = if nq == 0 {
            0..0
        } else {
            hk * group..(hk + 1) * group
        };
        for h in heads {
            let lse_base = shape.lse_base(b, h);
            for it in 0..nq.div_ceil(BQ) {
                let i0 = it * BQ;
                let rows = BQ.min(nq - i0);
                let class = mask.classify(i0, i0 + rows, j0, j0 + cols);
                if class == TileClass::Skip {
                    continue;
                }
                let q_tile = ctx.q_rows.as_ptr().add(ctx.rows.row(b, h, i0));
                let do_tile = ctx.do_rows.as_ptr().add(ctx.rows.row(b, h, i0));
                // S = (scale Q) K^T (queries x keys): the forward's scores, bit for bit.
                S::Acc::gemm_for::<I>(
                    BQ,
                    BK,
                    d,
                    q_tile,
                    dp,
                    1,
                    k_t.as_ptr(),
                    BK,
                    p.as_mut_ptr(),
                    BK,
                    false,
                );
                for r in 0..rows {
                    let lse = ctx.lse[lse_base + i0 + r];
                    let row = &mut p[r * BK..(r + 1) * BK];
                    if lse == S::Acc::NEG_INFINITY {
                        // The row sees no key: P = 0 (and never exp(s + inf)).
                        row.fill(zero);
                        continue;
                    }
                    // P = exp(s - lse) = 2^((s - lse) * log2(e)), with s and lse exactly as the
                    // forward computed them: a row whose max term is its only one (lse = m) gets
                    // P = 1 exactly there, and in general the rounding is relative to s - lse,
                    // not to |s| or |lse| (which a base-2 s * log2(e) - lse * log2(e) would be).
                    // s - lse <= 0 up to rounding: keep the overflow clamp of exp2.
                    if capped {
                        let trow = &mut tanh_s[r * BK..(r + 1) * BK];
                        for (x, t) in row[..cols].iter_mut().zip(trow.iter_mut()) {
                            let th = capped_tanh(*x, inv_cap);
                            *t = th;
                            *x = ((cap * th - lse) * log2e).exp2_with::<I::MulAdd>();
                        }
                    } else {
                        for x in row[..cols].iter_mut() {
                            *x = ((*x - lse) * log2e).exp2_with::<I::MulAdd>();
                        }
                    }
                    if class == TileClass::Partial {
                        mask.mask_outside(i0 + r, true, j0, &mut row[..cols], zero);
                    }
                    row[cols..].fill(zero);
                }
                p[rows * BK..].fill(zero);
                // dV += P^T dO, with P^T a transposed view of P
                S::Acc::gemm_for::<I>(
                    BK,
                    dp,
                    rows,
                    p.as_ptr(),
                    1,
                    BK,
                    do_tile,
                    dp,
                    dv_acc.as_mut_ptr(),
                    dp,
                    true,
                );
                // dP = dO V^T
                S::Acc::gemm_for::<I>(
                    BQ,
                    BK,
                    d,
                    do_tile,
                    dp,
                    1,
                    v_t.as_ptr(),
                    BK,
                    ds.as_mut_ptr(),
                    BK,
                    false,
                );
                for r in 0..rows {
                    let dlt = ctx.delta[lse_base + i0 + r];
                    let prow = &p[r * BK..(r + 1) * BK];
                    let row = &mut ds[r * BK..(r + 1) * BK];
                    for (x, &pv) in row.iter_mut().zip(prow) {
                        *x = pv * (*x - dlt);
                    }
                    if capped {
                        for (x, &t) in row.iter_mut().zip(&tanh_s[r * BK..(r + 1) * BK]) {
                            *x = *x * (one - t * t);
                        }
                    }
                }
                // dK += dS^T (scale Q), with dS^T a transposed view of dS
                S::Acc::gemm_for::<I>(
                    BK,
                    dp,
                    rows,
                    ds.as_ptr(),
                    1,
                    BK,
                    q_tile,
                    dp,
                    dk_acc.as_mut_ptr(),
                    dp,
                    true,
                );
                let dq_rows = dq_part.add(((q0 + i0) * hq + h) * d);
                if rows == BQ && d == dp {
                    // dQ rows += dS K, accumulated in place (whole tile, no padding columns).
                    S::Acc::gemm_for::<I>(
                        BQ,
                        dp,
                        cols,
                        ds.as_ptr(),
                        BK,
                        1,
                        k_tile.as_ptr(),
                        dp,
                        dq_rows,
                        hq * d,
                        true,
                    );
                } else {
                    // dQ_tile = dS K (rows past `rows` are never read), then added row by row.
                    let m_rows = round_up(rows, 8);
                    S::Acc::gemm_for::<I>(
                        m_rows,
                        dp,
                        cols,
                        ds.as_ptr(),
                        BK,
                        1,
                        k_tile.as_ptr(),
                        dp,
                        dq_tile.as_mut_ptr(),
                        dp,
                        false,
                    );
                    for r in 0..rows {
                        // A slice (not pointer arithmetic): no aliasing seen, so it vectorises.
                        let dst = std::slice::from_raw_parts_mut(dq_rows.add(r * hq * d), d);
                        for (o, &g) in dst.iter_mut().zip(&dq_tile[r * dp..r * dp + d]) {
                            *o = *o + g;
                        }
                    }
                }
            }
        }
        for c in 0..cols {
            let base = ((k0 + j0 + c) * hkv + hk) * d;
            // The rows may be uninitialised: raw writes, no slices of them.
            let (dk, dv) = (ctx.dk.ptr().add(base), ctx.dv.ptr().add(base));
            for (x, (&a, &b)) in dk_acc[c * dp..c * dp + d]
                .iter()
                .zip(&dv_acc[c * dp..c * dp + d])
                .enumerate()
            {
                dk.add(x).write(S::store(a));
                dv.add(x).write(S::store(b));
            }
        }
        jt += ctx.parts;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dense float64 reference of one (sequence, head), with the same mask rule.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        shape: &Shape,
        opts: &Options,
    ) -> (Vec<f64>, Vec<f64>) {
        let (hq, hkv, d) = (shape.heads_q, shape.heads_kv, shape.head_dim);
        let mut out = vec![0.0; q.len()];
        let mut lse = vec![f64::NEG_INFINITY; shape.lse_len()];
        for b in 0..shape.batch() {
            let (q0, nq) = shape.seq_q(b);
            let (k0, nk) = shape.seq_k(b);
            let mask = opts.mask(nq, nk);
            for h in 0..hq {
                let hk = h / (hq / hkv);
                for i in 0..nq {
                    let qi = &q[((q0 + i) * hq + h) * d..][..d];
                    let scores: Vec<Option<f64>> = (0..nk)
                        .map(|j| {
                            mask.visible(i, j).then(|| {
                                let kj = &k[((k0 + j) * hkv + hk) * d..][..d];
                                let s: f64 = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>()
                                    * opts.softmax_scale;
                                if opts.softcap > 0.0 {
                                    opts.softcap * (s / opts.softcap).tanh()
                                } else {
                                    s
                                }
                            })
                        })
                        .collect();
                    let mx = scores
                        .iter()
                        .flatten()
                        .fold(f64::NEG_INFINITY, |a, &b| a.max(b));
                    if mx == f64::NEG_INFINITY {
                        continue;
                    }
                    let sum: f64 = scores.iter().flatten().map(|s| (s - mx).exp()).sum();
                    lse[shape.lse_base(b, h) + i] = mx + sum.ln();
                    for (j, s) in scores.iter().enumerate() {
                        if let Some(s) = s {
                            let p = (s - mx).exp() / sum;
                            let vj = &v[((k0 + j) * hkv + hk) * d..][..d];
                            for x in 0..d {
                                out[((q0 + i) * hq + h) * d + x] += p * vj[x];
                            }
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    fn data(n: usize, seed: u64) -> Vec<f64> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state % 2001) as f64 / 1000.0 - 1.0
            })
            .collect()
    }

    fn opts(causal: bool, left: i64, right: i64, g: usize, cap: f64) -> Options {
        Options {
            softmax_scale: 0.3,
            softcap: cap,
            causal,
            window_left: left,
            window_right: right,
            num_global: g,
        }
    }

    #[test]
    fn forward_matches_reference_f64_and_f32() {
        for (shape, o) in [
            (
                Shape::batched(2, 70, 70, 4, 2, 40).unwrap(),
                opts(false, -1, -1, 0, 0.0),
            ),
            (
                Shape::batched(1, 130, 200, 2, 1, 16).unwrap(),
                opts(true, -1, -1, 0, 0.0),
            ),
            (
                Shape::batched(1, 200, 130, 2, 2, 64).unwrap(),
                opts(true, 20, 0, 0, 0.0),
            ),
            (
                Shape::batched(1, 150, 150, 1, 1, 32).unwrap(),
                opts(false, 7, 9, 3, 2.0),
            ),
            (
                Shape::packed(&[0, 5, 5, 140], &[0, 9, 20, 150], 3, 1, 24).unwrap(),
                opts(true, -1, -1, 2, 0.0),
            ),
        ] {
            let q = data(shape.total_q() * shape.heads_q * shape.head_dim, 1);
            let k = data(shape.total_k() * shape.heads_kv * shape.head_dim, 2);
            let v = data(shape.total_k() * shape.heads_kv * shape.head_dim, 3);
            let (want, want_lse) = reference(&q, &k, &v, &shape, &o);
            let (got, got_lse) = forward(&q, &k, &v, &shape, &o).unwrap();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{a} vs {b}");
            }
            for (a, b) in got_lse.iter().zip(&want_lse) {
                assert!(a == b || (a - b).abs() < 1e-12, "{a} vs {b}");
            }
            let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let (got32, _) = forward(&f(&q), &f(&k), &f(&v), &shape, &o).unwrap();
            for (a, b) in got32.iter().zip(&want) {
                assert!((*a as f64 - b).abs() < 2e-5, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let shape = Shape::batched(1, 70, 90, 2, 1, 8).unwrap();
        for o in [opts(true, 30, -1, 0, 0.0), opts(false, -1, -1, 2, 1.5)] {
            let q = data(shape.total_q() * 2 * 8, 4);
            let k = data(shape.total_k() * 8, 5);
            let v = data(shape.total_k() * 8, 6);
            let g = data(q.len(), 7);
            let (out, lse) = forward(&q, &k, &v, &shape, &o).unwrap();
            let (dq, dk, dv) = backward(&g, &q, &k, &v, &out, &lse, &shape, &o).unwrap();
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                let (o2, _) = reference(q, k, v, &shape, &o);
                o2.iter().zip(&g).map(|(a, b)| a * b).sum()
            };
            let eps = 1e-6;
            for (which, idx) in [
                (0usize, 17usize),
                (0, 1000),
                (1, 33),
                (1, 600),
                (2, 5),
                (2, 700),
            ] {
                let mut args = [q.clone(), k.clone(), v.clone()];
                args[which][idx] += eps;
                let up = loss(&args[0], &args[1], &args[2]);
                args[which][idx] -= 2.0 * eps;
                let down = loss(&args[0], &args[1], &args[2]);
                let numeric = (up - down) / (2.0 * eps);
                let analytic = [&dq, &dk, &dv][which][idx];
                assert!(
                    (numeric - analytic).abs() < 1e-6,
                    "{which} {idx}: {numeric} vs {analytic}"
                );
            }
        }
    }

    #[test]
    fn one_key_rows_are_exact_in_f32() {
        // window (0, 0): query i sees key i only, so P = 1, out = v and lse = s, dv = dO and
        // dq = dk = 0, all exactly; for every ISA's kernels (the forward and backward must compute
        // the same scores, and delta the same sum as dP).
        let (n, h, d) = (150, 2, 40);
        let shape = Shape::batched(1, n, n, h, h, d).unwrap();
        let o = opts(false, 0, 0, 0, 0.0);
        let f = |x: Vec<f64>| x.iter().map(|&v| (3.0 * v) as f32).collect::<Vec<f32>>();
        let (q, k, v, g) = (
            f(data(n * h * d, 1)),
            f(data(n * h * d, 2)),
            f(data(n * h * d, 3)),
            f(data(n * h * d, 4)),
        );
        // The first element that differs (and the two values), if any.
        let diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .enumerate()
                .find(|(_, (x, y))| x != y)
                .map(|(i, (&x, &y))| (i, x, y))
        };
        let (out, lse) = forward(&q, &k, &v, &shape, &o).unwrap();
        assert_eq!(diff(&out, &v), None, "out vs v");
        let (dq, dk, dv) = backward(&g, &q, &k, &v, &out, &lse, &shape, &o).unwrap();
        assert_eq!(diff(&dv, &g), None, "dv vs dout");
        let zeros = vec![0.0f32; dq.len()];
        assert_eq!(diff(&dq, &zeros), None, "dq vs 0");
        assert_eq!(diff(&dk, &zeros), None, "dk vs 0");
        for i in 0..n {
            for hh in 0..h {
                let s: f64 = (0..d)
                    .map(|x| q[(i * h + hh) * d + x] as f64 * k[(i * h + hh) * d + x] as f64)
                    .sum::<f64>()
                    * 0.3;
                let got = lse[hh * n + i] as f64;
                assert!((got - s).abs() < 1e-5 * s.abs().max(1.0), "{got} vs {s}");
            }
        }
    }

    #[test]
    fn fully_masked_rows_give_zero_and_neg_inf() {
        // 5 queries, 2 keys, causal bottom-right: the first 3 queries see nothing.
        let shape = Shape::batched(1, 5, 2, 1, 1, 4).unwrap();
        let q = data(20, 1);
        let k = data(8, 2);
        let (out, lse) = forward(&q, &k, &k, &shape, &opts(true, -1, -1, 0, 0.0)).unwrap();
        assert!(out[..12].iter().all(|&x| x == 0.0));
        assert!(lse[..3].iter().all(|&x| x == f64::NEG_INFINITY));
        assert!(lse[3].is_finite() && out[12..].iter().all(|x| x.is_finite()));
        let (dq, dk, dv) = backward(
            &q,
            &q,
            &k,
            &k,
            &out,
            &lse,
            &shape,
            &opts(true, -1, -1, 0, 0.0),
        )
        .unwrap();
        assert!(dq.iter().chain(&dk).chain(&dv).all(|x| x.is_finite()));
        assert!(dq[..12].iter().all(|&x| x == 0.0));
    }

    #[test]
    fn nan_scores_poison_their_rows_like_the_reference() {
        // NaN in a query row, and in a key that some rows see (causal): those rows, and only
        // those, get NaN output and lse; the backward then gives NaN where the reference does.
        let (n, h, d) = (150, 2, 16);
        let shape = Shape::batched(1, n, n, h, 1, d).unwrap();
        let o = opts(true, -1, -1, 0, 0.0);
        let mut q = data(n * h * d, 1);
        let mut k = data(n * d, 2);
        let v = data(n * d, 3);
        q[(20 * h + 1) * d + 3] = f64::NAN; // query 20, head 1
        k[100 * d + 5] = f64::NAN; // key 100: seen by queries 100.. (causal)
        let (want, want_lse) = reference_nan(&q, &k, &v, &shape, &o);
        let f = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
        let (out64, lse64) = forward(&q, &k, &v, &shape, &o).unwrap();
        let (out32, lse32) = forward(&f(&q), &f(&k), &f(&v), &shape, &o).unwrap();
        for i in 0..n {
            for hh in 0..h {
                let row = (i * h + hh) * d;
                let nan_row = (i == 20 && hh == 1) || i >= 100;
                assert_eq!(want[row].is_nan(), nan_row, "reference {i} {hh}");
                assert!(
                    out64[row..row + d].iter().all(|x| x.is_nan() == nan_row),
                    "{i} {hh}"
                );
                assert!(
                    out32[row..row + d].iter().all(|x| x.is_nan() == nan_row),
                    "{i} {hh}"
                );
                assert_eq!(lse64[hh * n + i].is_nan(), nan_row);
                assert_eq!(lse32[hh * n + i].is_nan(), nan_row);
                assert_eq!(want_lse[hh * n + i].is_nan(), nan_row);
            }
        }
        let g = data(q.len(), 4);
        let (dq, dk, dv) = backward(&g, &q, &k, &v, &out64, &lse64, &shape, &o).unwrap();
        let (dq32, _, dv32) =
            backward(&f(&g), &f(&q), &f(&k), &f(&v), &out32, &lse32, &shape, &o).unwrap();
        // Query 20 of head 1 sees keys 0..=20: their dv is NaN; its own dq row is NaN.
        assert!(dv[..21 * d].iter().all(|x| x.is_nan()));
        assert!(dv32[..21 * d].iter().all(|x| x.is_nan()));
        assert!(dq[(20 * h + 1) * d..(20 * h + 2) * d]
            .iter()
            .all(|x| x.is_nan()));
        assert!(dq32[(20 * h + 1) * d..(20 * h + 2) * d]
            .iter()
            .all(|x| x.is_nan()));
        // Queries 0..20 see only finite keys and rows: finite gradients.
        assert!(dq[..20 * h * d].iter().all(|x| x.is_finite()));
        assert!(dk[100 * d..101 * d].iter().all(|x| x.is_nan()));
    }

    /// [`reference`] that keeps NaN (the max of a row with a NaN score is NaN).
    fn reference_nan(
        q: &[f64],
        k: &[f64],
        v: &[f64],
        shape: &Shape,
        opts: &Options,
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut lse) = reference(q, k, v, shape, opts);
        let (hq, hkv, d) = (shape.heads_q, shape.heads_kv, shape.head_dim);
        let (nq, nk) = (shape.total_q(), shape.total_k());
        let mask = opts.mask(nq, nk);
        for i in 0..nq {
            for h in 0..hq {
                let hk = h / (hq / hkv);
                let qi = &q[(i * hq + h) * d..][..d];
                let poisoned = (0..nk).any(|j| {
                    mask.visible(i, j)
                        && qi
                            .iter()
                            .zip(&k[(j * hkv + hk) * d..][..d])
                            .any(|(a, b)| (a * b).is_nan())
                });
                if poisoned {
                    out[(i * hq + h) * d..][..d].fill(f64::NAN);
                    lse[h * nq + i] = f64::NAN;
                }
            }
        }
        (out, lse)
    }

    #[test]
    fn absurd_shapes_are_errors_or_free() {
        // 2^40 empty sequences: no 2^40 offsets, an empty result.
        let shape = Shape::batched(1 << 40, 0, 0, 3, 1, 8).unwrap();
        let (out, lse) =
            forward::<f32>(&[], &[], &[], &shape, &opts(true, -1, -1, 0, 0.0)).unwrap();
        assert!(out.is_empty() && lse.is_empty());
        for bad in [
            Shape::batched(1, 1 << 40, 1, 1, 1, 8),
            Shape::batched(1, 1, 1 << 40, 1, 1, 8),
            Shape::batched(1 << 20, 1 << 12, 1, 1, 1, 8),
            Shape::batched(usize::MAX, 2, 2, 1, 1, 8),
            Shape::batched(1, 1, 1, 1 << 31, 1, 8),
            Shape::batched(1, 1 << 30, 1, 1 << 30, 1, 256),
        ] {
            assert!(matches!(bad, Err(Error::Value(_))), "{bad:?}");
        }
        // Queries without keys: zeros and -inf, for any number of heads.
        let shape = Shape::batched(2, 3, 0, 64, 1, 4).unwrap();
        let q = vec![1.0f32; 2 * 3 * 64 * 4];
        let (out, lse) = forward(&q, &[], &[], &shape, &opts(false, -1, -1, 0, 0.0)).unwrap();
        assert!(out.iter().all(|&x| x == 0.0) && lse.iter().all(|&x| x == f32::NEG_INFINITY));
        // Keys without queries: dk = dv = 0 without touching any head.
        let shape = Shape::batched(2, 0, 5, 64, 1, 4).unwrap();
        let k = vec![1.0f32; 2 * 5 * 4];
        let (dq, dk, dv) = backward(
            &[],
            &[],
            &k,
            &k,
            &[],
            &[],
            &shape,
            &opts(false, -1, -1, 0, 0.0),
        )
        .unwrap();
        assert!(dq.is_empty() && dk == vec![0.0; k.len()] && dv == vec![0.0; k.len()]);
        // A hand-made inconsistent shape is an error, not an out-of-bounds write.
        let mut shape = Shape::batched(2, 4, 4, 1, 1, 8).unwrap();
        shape.lse_layout = LseLayout::Batched { seqlen_q: 3 };
        let x = vec![0.0f32; 64];
        assert!(forward(&x, &x, &x, &shape, &opts(false, -1, -1, 0, 0.0)).is_err());
        shape.cu_seqlens_q = vec![0, 5, 4];
        assert!(forward(&x, &x, &x, &shape, &opts(false, -1, -1, 0, 0.0)).is_err());
    }

    #[test]
    fn windows_past_the_sequence_are_unbounded() {
        for (nq, nk) in [(70, 20), (20, 70), (64, 64)] {
            let shape = Shape::batched(1, nq, nk, 1, 1, 8).unwrap();
            let q = data(nq * 8, 1);
            let k = data(nk * 8, 2);
            for (huge, plain) in [
                (opts(true, i64::MAX, -1, 0, 0.0), opts(true, -1, -1, 0, 0.0)),
                (
                    opts(false, i64::MAX, i64::MAX, 0, 0.0),
                    opts(false, -1, -1, 0, 0.0),
                ),
                (opts(false, 3, i64::MAX, 2, 0.0), opts(false, 3, -1, 2, 0.0)),
            ] {
                let a = forward(&q, &k, &k, &shape, &huge).unwrap();
                let b = forward(&q, &k, &k, &shape, &plain).unwrap();
                assert_eq!(a, b, "{nq} {nk} {huge:?}");
                let g = data(q.len(), 3);
                let ga = backward(&g, &q, &k, &k, &a.0, &a.1, &shape, &huge).unwrap();
                let gb = backward(&g, &q, &k, &k, &b.0, &b.1, &shape, &plain).unwrap();
                assert_eq!(ga, gb);
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(Shape::batched(1, 4, 4, 3, 2, 8).is_err());
        assert!(Shape::batched(1, 4, 4, 2, 2, 300).is_err());
        assert!(Shape::packed(&[0, 5, 3], &[0, 5, 6], 1, 1, 8).is_err());
        assert!(Shape::packed(&[1, 5], &[0, 5], 1, 1, 8).is_err());
        let shape = Shape::batched(1, 4, 4, 1, 1, 8).unwrap();
        let x = vec![0.0f32; 32];
        assert!(forward(&x, &x, &x, &shape, &opts(false, -2, -1, 0, 0.0)).is_err());
        assert!(forward(&x, &x, &x, &shape, &opts(true, -1, 3, 0, 0.0)).is_err());
        assert!(forward(&x[..31], &x, &x, &shape, &opts(false, -1, -1, 0, 0.0)).is_err());
    }
}
