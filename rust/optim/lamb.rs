//! Fused LAMB step (You et al., 2019) over flat float32 state, with timm's `Lamb` semantics.
//!
//! For every tensor `w` (float32: the parameter itself or the fp32 master of a bf16/fp16 one) with
//! gradient `g` (float32, bfloat16 or float16), first moment `m` and second moment `v`, in
//! float32 and in the order of timm's CPU (single-tensor) path, with a fused multiply-add
//! (`fma(a, b, c) = a b + c`, one rounding) wherever torch's CPU kernels use one:
//!
//! ```text
//! g <- g / clip_divisor                                 (skipped when clip_divisor == 1)
//! m <- fma(1 - beta1, g - m, m)                          m.lerp_(g, 1 - beta1); for weights
//!                                                        >= 0.5 torch's fma(w - 1, g - m, g);
//!                                                        without grad_averaging: beta1 m + g
//! v <- fma((1 - beta2) g, g, beta2 v)                    v.mul_(beta2).addcmul_(g, g, 1 - beta2)
//! u  = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)           (bc = 1 - beta^t, or 1)
//! u <- fma(weight_decay, w, u)                           (when weight_decay != 0)
//! r  = f32(||w||) / f32(||u||)  (1 when either is 0; min(r, 1) with trust_clip)
//! w <- fma(-lr, u r, w)         (w <- fma(-lr, u, w) when weight_decay == 0 and not always_adapt)
//! ```
//!
//! The norms are accumulated in float64 and rounded to float32. Against timm this leaves
//! single-ulp differences only: torch's vectorised float32 `sqrt` is not correctly rounded for a
//! fraction of a percent of the elements, and its float32 norm reductions are not the rounded
//! exact norms (the global gradient norm, computed by [`grad_sq_norm`], likewise).
//!
//! Memory passes: with adaptation, pass 1 updates `m` and `v` and accumulates `||w||^2` and
//! `||u||^2`; pass 2 recomputes `u` from `m`, `v`, `w` (bit-identically) and updates `w` (and
//! writes the bf16/fp16 copy of the parameter). Without adaptation it is one pass. Every pass
//! runs in parallel over fixed chunks of [`CHUNK`] elements; each chunk's norms are summed in a
//! fixed order and the chunks' partial sums sequentially, so the results do not depend on the
//! number of threads. The SIMD copies (AVX-512, AVX2, both with FMA) and the portable one use the
//! same operations (`mul_add` is exactly rounded everywhere), so they give the same bits.

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Elements per parallel task. Fixed (not derived from the thread count): it fixes the order in
/// which the norms are summed.
pub const CHUNK: usize = 1 << 15;
/// Elements per L1-resident block inside a task (gradient conversion buffer).
const BLOCK: usize = 256;
/// Independent float64 accumulators per norm (vectorisable, fixed order).
const LANES: usize = 16;

/// A tensor's gradient, in the parameter's storage type.
#[derive(Clone, Copy, Debug)]
pub enum Grad<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Grad<'a> {
    pub fn len(&self) -> usize {
        match self {
            Grad::F32(s) => s.len(),
            Grad::Bf16(s) => s.len(),
            Grad::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn split_at(self, n: usize) -> (Grad<'a>, Grad<'a>) {
        match self {
            Grad::F32(s) => {
                let (a, b) = s.split_at(n);
                (Grad::F32(a), Grad::F32(b))
            }
            Grad::Bf16(s) => {
                let (a, b) = s.split_at(n);
                (Grad::Bf16(a), Grad::Bf16(b))
            }
            Grad::F16(s) => {
                let (a, b) = s.split_at(n);
                (Grad::F16(a), Grad::F16(b))
            }
        }
    }

    /// Elements `start..start + n` (`n <= BLOCK`) as float32, divided by `div` when given: the
    /// slice itself for float32 without division, else converted into `buf`.
    #[inline(always)]
    fn block<'b>(
        self,
        start: usize,
        n: usize,
        div: Option<f32>,
        buf: &'b mut [f32; BLOCK],
    ) -> &'b [f32]
    where
        'a: 'b,
    {
        let dst = &mut buf[..n];
        match self {
            Grad::F32(s) => {
                let src = &s[start..start + n];
                match div {
                    None => return src,
                    Some(d) => {
                        for (o, &x) in dst.iter_mut().zip(src) {
                            *o = x / d;
                        }
                        return dst;
                    }
                }
            }
            Grad::Bf16(s) => {
                for (o, &x) in dst.iter_mut().zip(&s[start..start + n]) {
                    *o = bf16_to_f32(x);
                }
            }
            Grad::F16(s) => s[start..start + n].convert_to_f32_slice(dst),
        }
        if let Some(d) = div {
            for x in dst.iter_mut() {
                *x /= d;
            }
        }
        dst
    }
}

/// The low-precision parameter written from the updated float32 master, if any.
#[derive(Debug, Default)]
pub enum HalfParam<'a> {
    #[default]
    None,
    Bf16(&'a mut [bf16]),
    F16(&'a mut [f16]),
}

impl<'a> HalfParam<'a> {
    fn len(&self) -> Option<usize> {
        match self {
            HalfParam::None => None,
            HalfParam::Bf16(s) => Some(s.len()),
            HalfParam::F16(s) => Some(s.len()),
        }
    }

    fn split_at(self, n: usize) -> (HalfParam<'a>, HalfParam<'a>) {
        match self {
            HalfParam::None => (HalfParam::None, HalfParam::None),
            HalfParam::Bf16(s) => {
                let (a, b) = s.split_at_mut(n);
                (HalfParam::Bf16(a), HalfParam::Bf16(b))
            }
            HalfParam::F16(s) => {
                let (a, b) = s.split_at_mut(n);
                (HalfParam::F16(a), HalfParam::F16(b))
            }
        }
    }

    /// Writes `src` (rounded to nearest even, as torch's `copy_`) at `start..`.
    #[inline(always)]
    fn store(&mut self, start: usize, src: &[f32]) {
        match self {
            HalfParam::None => {}
            HalfParam::Bf16(s) => {
                for (o, &x) in s[start..start + src.len()].iter_mut().zip(src) {
                    *o = f32_to_bf16(x);
                }
            }
            HalfParam::F16(s) => s[start..start + src.len()].convert_from_f32_slice(src),
        }
    }
}

#[inline(always)]
fn bf16_to_f32(x: bf16) -> f32 {
    f32::from_bits(u32::from(x.to_bits()) << 16)
}

/// Round to nearest even; NaN becomes the canonical quiet NaN `0x7FC0` (as torch does).
#[inline(always)]
fn f32_to_bf16(x: f32) -> bf16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    bf16::from_bits(if x.is_nan() { 0x7FC0 } else { rounded })
}

/// One parameter tensor: the float32 weights (or master), its gradient and the two moments, all
/// of one length, plus optionally the low-precision parameter to write.
#[derive(Debug)]
pub struct LambTensor<'a> {
    pub param: &'a mut [f32],
    pub grad: Grad<'a>,
    pub exp_avg: &'a mut [f32],
    pub exp_avg_sq: &'a mut [f32],
    pub half: HalfParam<'a>,
}

/// The hyperparameters of one step of one parameter group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LambHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// `1 - beta1^t` with bias correction, else 1.
    pub bias_correction1: f64,
    /// `1 - beta2^t` with bias correction, else 1.
    pub bias_correction2: f64,
    pub grad_averaging: bool,
    pub trust_clip: bool,
    pub always_adapt: bool,
    /// `max(1, ||g_all|| / max_grad_norm)`, or 1 without clipping (NaN/inf propagate, as in timm).
    pub clip_divisor: f64,
}

impl Default for LambHyper {
    /// timm's defaults, without bias correction (see [`LambHyper::at_step`]) or clipping.
    fn default() -> Self {
        LambHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
            bias_correction1: 1.0,
            bias_correction2: 1.0,
            grad_averaging: true,
            trust_clip: false,
            always_adapt: false,
            clip_divisor: 1.0,
        }
    }
}

impl LambHyper {
    /// The same hyperparameters with the bias corrections of step `t` (1-based).
    pub fn at_step(self, t: i32) -> Self {
        LambHyper {
            bias_correction1: 1.0 - self.beta1.powi(t),
            bias_correction2: 1.0 - self.beta2.powi(t),
            ..self
        }
    }

    /// A `ValueError` for out-of-range values.
    pub fn validate(&self) -> Result<()> {
        for (name, x) in [
            ("lr", self.lr),
            ("eps", self.eps),
            ("weight_decay", self.weight_decay),
        ] {
            if !(x.is_finite() && x >= 0.0) {
                return Err(Error::value(format!(
                    "{name} must be finite and >= 0, got {x}"
                )));
            }
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::value(format!("{name} must lie in [0, 1), got {b}")));
            }
        }
        for (name, bc) in [
            ("bias_correction1", self.bias_correction1),
            ("bias_correction2", self.bias_correction2),
        ] {
            if !(bc > 0.0 && bc <= 1.0) {
                return Err(Error::value(format!(
                    "{name} must lie in (0, 1] (1 - beta^step, or 1), got {bc}"
                )));
            }
        }
        if self.clip_divisor <= 0.0 {
            return Err(Error::value(format!(
                "clip_divisor must be positive (max(1, grad norm / max_grad_norm)), got {}",
                self.clip_divisor
            )));
        }
        Ok(())
    }

    fn adapts(&self) -> bool {
        self.weight_decay != 0.0 || self.always_adapt
    }
}

/// The per-element constants, in float32 as torch's ops see the Python scalars.
#[derive(Clone, Copy, Debug)]
struct Consts {
    /// 0: `fma(w1, g - m, m)`; 1: `fma(w1 - 1, g - m, g)` (torch's lerp for weights >= 0.5);
    /// 2: `beta1 m + g` (no grad averaging).
    mode: u8,
    b1: f32,
    w1: f32,
    w1_minus_1: f32,
    b2: f32,
    c2: f32,
    bc1: f32,
    bc2_sqrt: f32,
    eps: f32,
    decay: bool,
    wd: f32,
    neg_lr: f32,
    div: Option<f32>,
}

impl Consts {
    fn new(h: &LambHyper) -> Self {
        let w1 = (1.0 - h.beta1) as f32;
        let mode = if !h.grad_averaging {
            2
        } else if w1.abs() < 0.5 {
            0
        } else {
            1
        };
        let div = h.clip_divisor as f32;
        Consts {
            mode,
            b1: h.beta1 as f32,
            w1,
            w1_minus_1: w1 - 1.0,
            b2: h.beta2 as f32,
            c2: (1.0 - h.beta2) as f32,
            bc1: h.bias_correction1 as f32,
            bc2_sqrt: h.bias_correction2.sqrt() as f32,
            eps: h.eps as f32,
            decay: h.weight_decay != 0.0,
            wd: h.weight_decay as f32,
            neg_lr: -h.lr as f32,
            div: if div == 1.0 { None } else { Some(div) },
        }
    }
}

/// `m.lerp_(g, w1)` (or `m.mul_(beta1).add_(g)`) and `v.mul_(beta2).addcmul_(g, g, 1 - beta2)`.
#[inline(always)]
fn moments<const M: u8>(c: &Consts, g: f32, m: f32, v: f32) -> (f32, f32) {
    let m = match M {
        0 => c.w1.mul_add(g - m, m),
        1 => c.w1_minus_1.mul_add(g - m, g),
        _ => m * c.b1 + g,
    };
    (m, (c.c2 * g).mul_add(g, v * c.b2))
}

/// `(m / bc1) / (sqrt(v) / sqrt(bc2) + eps)`, then `.add_(w, alpha=weight_decay)`.
#[inline(always)]
fn direction<const WD: bool>(c: &Consts, m: f32, v: f32, w: f32) -> f32 {
    let u = (m / c.bc1) / (v.sqrt() / c.bc2_sqrt + c.eps);
    if WD {
        c.wd.mul_add(w, u)
    } else {
        u
    }
}

#[inline(always)]
fn add_squares(acc: &mut [f64; LANES], x: &[f32]) {
    let mut it = x.chunks_exact(LANES);
    for ch in &mut it {
        for (a, &y) in acc.iter_mut().zip(ch) {
            let y = f64::from(y);
            *a = y.mul_add(y, *a);
        }
    }
    for (a, &y) in acc.iter_mut().zip(it.remainder()) {
        let y = f64::from(y);
        *a = y.mul_add(y, *a);
    }
}

fn lanes_sum(acc: &[f64; LANES]) -> f64 {
    let mut a = *acc;
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            a[i] += a[i + n];
        }
    }
    a[0]
}

/// A contiguous piece (at most [`CHUNK`] elements) of tensor `tensor`: the unit of parallel work.
struct Chunk<'a> {
    tensor: usize,
    w: &'a mut [f32],
    g: Grad<'a>,
    m: &'a mut [f32],
    v: &'a mut [f32],
    half: HalfParam<'a>,
}

/// Moments, direction and the squares of `w` and `u` for up to [`LANES`] elements; element `l`
/// goes to accumulator `l`. Called on whole groups of `LANES` (fixed-size, so it unrolls into
/// SIMD code with the accumulators in registers), and once on the tail of a tensor.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // one index into six arrays
fn norms_group<const M: u8, const WD: bool>(
    c: &Consts,
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    w: &[f32],
    acc: &mut [[f64; LANES]; 2],
) {
    let n = g.len().min(LANES);
    let (g, m, v, w) = (&g[..n], &mut m[..n], &mut v[..n], &w[..n]);
    let [aw, au] = acc;
    for l in 0..n {
        let (m2, v2) = moments::<M>(c, g[l], m[l], v[l]);
        m[l] = m2;
        v[l] = v2;
        let u = f64::from(direction::<WD>(c, m2, v2, w[l]));
        let x = f64::from(w[l]);
        aw[l] = x.mul_add(x, aw[l]);
        au[l] = u.mul_add(u, au[l]);
    }
}

/// Pass 1 with adaptation: moments, and `(||w||^2, ||u||^2)` of the chunk.
#[inline(always)]
fn norms_chunk<const M: u8, const WD: bool>(c: &Consts, t: &mut Chunk<'_>) -> (f64, f64) {
    let mut gbuf = [0f32; BLOCK];
    let mut acc = [[0f64; LANES]; 2];
    let blocks =
        t.w.chunks(BLOCK)
            .zip(t.m.chunks_mut(BLOCK))
            .zip(t.v.chunks_mut(BLOCK));
    for (i, ((w, m), v)) in blocks.enumerate() {
        let g = t.g.block(i * BLOCK, w.len(), c.div, &mut gbuf);
        let mut groups = g
            .chunks_exact(LANES)
            .zip(m.chunks_exact_mut(LANES))
            .zip(v.chunks_exact_mut(LANES))
            .zip(w.chunks_exact(LANES));
        for (((g, m), v), w) in &mut groups {
            let g: &[f32; LANES] = g.try_into().expect("a whole group");
            let m: &mut [f32; LANES] = m.try_into().expect("a whole group");
            let v: &mut [f32; LANES] = v.try_into().expect("a whole group");
            let w: &[f32; LANES] = w.try_into().expect("a whole group");
            norms_group::<M, WD>(c, g, m, v, w, &mut acc);
        }
        let tail = w.len() / LANES * LANES;
        if tail < w.len() {
            let (g, m, v, w) = (&g[tail..], &mut m[tail..], &mut v[tail..], &w[tail..]);
            norms_group::<M, WD>(c, g, m, v, w, &mut acc);
        }
    }
    (lanes_sum(&acc[0]), lanes_sum(&acc[1]))
}

/// Pass 2 with adaptation: `w <- fma(-lr, u r, w)` with `u` recomputed from `m`, `v`, `w`.
#[inline(always)]
fn apply_chunk<const WD: bool>(c: &Consts, ratio: f32, t: &mut Chunk<'_>) {
    let blocks =
        t.w.chunks_mut(BLOCK)
            .zip(t.m.chunks(BLOCK))
            .zip(t.v.chunks(BLOCK));
    for (i, ((w, m), v)) in blocks.enumerate() {
        for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
            *w = c.neg_lr.mul_add(direction::<WD>(c, m, v, *w) * ratio, *w);
        }
        t.half.store(i * BLOCK, w);
    }
}

/// The single pass without adaptation (so without weight decay): moments and
/// `w <- fma(-lr, u, w)`.
#[inline(always)]
fn fused_chunk<const M: u8>(c: &Consts, t: &mut Chunk<'_>) {
    let mut gbuf = [0f32; BLOCK];
    let blocks =
        t.w.chunks_mut(BLOCK)
            .zip(t.m.chunks_mut(BLOCK))
            .zip(t.v.chunks_mut(BLOCK));
    for (i, ((w, m), v)) in blocks.enumerate() {
        let g = t.g.block(i * BLOCK, w.len(), c.div, &mut gbuf);
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let (m2, v2) = moments::<M>(c, g, *m, *v);
            *m = m2;
            *v = v2;
            *w = c.neg_lr.mul_add(direction::<false>(c, m2, v2, *w), *w);
        }
        t.half.store(i * BLOCK, w);
    }
}

#[inline(always)]
fn sq_norm_chunk(g: Grad<'_>) -> f64 {
    let mut buf = [0f32; BLOCK];
    let mut acc = [0f64; LANES];
    let mut start = 0;
    while start < g.len() {
        let n = BLOCK.min(g.len() - start);
        add_squares(&mut acc, g.block(start, n, None, &mut buf));
        start += n;
    }
    lanes_sum(&acc)
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Norms,
    Apply(f32),
    Fused,
}

#[inline(always)]
fn run(op: Op, c: &Consts, t: &mut Chunk<'_>) -> (f64, f64) {
    match op {
        Op::Norms => match (c.mode, c.decay) {
            (0, false) => norms_chunk::<0, false>(c, t),
            (0, true) => norms_chunk::<0, true>(c, t),
            (1, false) => norms_chunk::<1, false>(c, t),
            (1, true) => norms_chunk::<1, true>(c, t),
            (_, false) => norms_chunk::<2, false>(c, t),
            (_, true) => norms_chunk::<2, true>(c, t),
        },
        Op::Apply(ratio) => {
            if c.decay {
                apply_chunk::<true>(c, ratio, t)
            } else {
                apply_chunk::<false>(c, ratio, t)
            }
            (0.0, 0.0)
        }
        Op::Fused => {
            match c.mode {
                0 => fused_chunk::<0>(c, t),
                1 => fused_chunk::<1>(c, t),
                _ => fused_chunk::<2>(c, t),
            }
            (0.0, 0.0)
        }
    }
}

/// Which copy of the kernels runs (all give the same bits). `Portable` on an x86 CPU without FMA
/// computes `mul_add` in software: slow, but exact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        let fma = has!("fma");
        if fma && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq") {
            return Isa::Avx512;
        }
        if fma && has!("avx2") {
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Which copy of the LAMB kernels this CPU runs: `"avx512"`, `"avx2"` or `"portable"`.
pub fn kernel_isa() -> &'static str {
    match detect() {
        Isa::Portable => "portable",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => "avx2",
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => "avx512",
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn run_avx512(op: Op, c: &Consts, t: &mut Chunk<'_>) -> (f64, f64) {
    run(op, c, t)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(op: Op, c: &Consts, t: &mut Chunk<'_>) -> (f64, f64) {
    run(op, c, t)
}

fn run_portable(op: Op, c: &Consts, t: &mut Chunk<'_>) -> (f64, f64) {
    run(op, c, t)
}

fn run_isa(isa: Isa, op: Op, c: &Consts, t: &mut Chunk<'_>) -> (f64, f64) {
    match isa {
        Isa::Portable => run_portable(op, c, t),
        // SAFETY: `detect` returned these only where the CPU has the features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { run_avx2(op, c, t) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { run_avx512(op, c, t) },
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn sq_norm_avx512(g: Grad<'_>) -> f64 {
    sq_norm_chunk(g)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sq_norm_avx2(g: Grad<'_>) -> f64 {
    sq_norm_chunk(g)
}

fn sq_norm_isa(isa: Isa, g: Grad<'_>) -> f64 {
    match isa {
        Isa::Portable => sq_norm_chunk(g),
        // SAFETY: `detect` returned these only where the CPU has the features.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { sq_norm_avx2(g) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { sq_norm_avx512(g) },
    }
}

fn check_tensors(tensors: &[LambTensor<'_>]) -> Result<()> {
    for (i, t) in tensors.iter().enumerate() {
        let n = t.param.len();
        let others = [
            ("grads", Some(t.grad.len())),
            ("exp_avgs", Some(t.exp_avg.len())),
            ("exp_avg_sqs", Some(t.exp_avg_sq.len())),
            ("half_params", t.half.len()),
        ];
        for (name, len) in others {
            if let Some(len) = len.filter(|&len| len != n) {
                return Err(Error::value(format!(
                    "{name}[{i}] has {len} elements but params[{i}] has {n}"
                )));
            }
        }
    }
    Ok(())
}

fn split(tensors: Vec<LambTensor<'_>>) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    for (i, t) in tensors.into_iter().enumerate() {
        let (mut w, mut g, mut m, mut v, mut half) =
            (t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.half);
        while !w.is_empty() {
            let n = CHUNK.min(w.len());
            let (w0, w1) = w.split_at_mut(n);
            let (g0, g1) = g.split_at(n);
            let (m0, m1) = m.split_at_mut(n);
            let (v0, v1) = v.split_at_mut(n);
            let (h0, h1) = half.split_at(n);
            chunks.push(Chunk {
                tensor: i,
                w: w0,
                g: g0,
                m: m0,
                v: v0,
                half: h0,
            });
            (w, g, m, v, half) = (w1, g1, m1, v1, h1);
        }
    }
    chunks
}

/// One LAMB step over `tensors` (one parameter group) in the library's thread pool: updates the
/// weights, moments and low-precision copies in place and returns each tensor's trust ratio (1
/// where the group does not adapt). A `ValueError` for bad hyperparameters or mismatched lengths.
pub fn step(tensors: Vec<LambTensor<'_>>, h: &LambHyper) -> Result<Vec<f64>> {
    h.validate()?;
    check_tensors(&tensors)?;
    let isa = detect();
    Ok(crate::parallel::install(|| step_in_pool(tensors, h, isa)))
}

fn step_in_pool(tensors: Vec<LambTensor<'_>>, h: &LambHyper, isa: Isa) -> Vec<f64> {
    let c = Consts::new(h);
    let count = tensors.len();
    let mut chunks = split(tensors);
    if !h.adapts() {
        chunks.par_iter_mut().for_each(|t| {
            run_isa(isa, Op::Fused, &c, t);
        });
        return vec![1.0; count];
    }
    let partials: Vec<(f64, f64)> = chunks
        .par_iter_mut()
        .map(|t| run_isa(isa, Op::Norms, &c, t))
        .collect();
    let (mut w2, mut u2) = (vec![0f64; count], vec![0f64; count]);
    for (t, &(a, b)) in chunks.iter().zip(&partials) {
        w2[t.tensor] += a;
        u2[t.tensor] += b;
    }
    // As timm: the norms as float32 (rounded from float64 here) and their quotient in float32.
    let ratios: Vec<f32> = w2
        .iter()
        .zip(&u2)
        .map(|(&w2, &u2)| {
            let (wn, un) = (w2.sqrt() as f32, u2.sqrt() as f32);
            let r = if wn > 0.0 && un > 0.0 { wn / un } else { 1.0 };
            // NaN-propagating, as torch.clamp.
            if h.trust_clip && r > 1.0 {
                1.0
            } else {
                r
            }
        })
        .collect();
    chunks.par_iter_mut().for_each(|t| {
        run_isa(isa, Op::Apply(ratios[t.tensor]), &c, t);
    });
    ratios.into_iter().map(f64::from).collect()
}

/// `sum ||g||^2` over `grads` in float64 (the global norm for gradient clipping), in the
/// library's thread pool; independent of the thread count.
pub fn grad_sq_norm(grads: &[Grad<'_>]) -> f64 {
    let isa = detect();
    crate::parallel::install(|| grad_sq_norm_in_pool(grads, isa))
}

fn grad_sq_norm_in_pool(grads: &[Grad<'_>], isa: Isa) -> f64 {
    let mut pieces = Vec::new();
    for &g in grads {
        let mut rest = g;
        while !rest.is_empty() {
            let (a, b) = rest.split_at(CHUNK.min(rest.len()));
            pieces.push(a);
            rest = b;
        }
    }
    let partials: Vec<f64> = pieces.par_iter().map(|&g| sq_norm_isa(isa, g)).collect();
    partials.iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain transcription of the formulas in the module documentation, one element at a time.
    fn reference(w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: &LambHyper) -> f64 {
        let div = h.clip_divisor as f32;
        let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
        let w1 = (1.0 - h.beta1) as f32;
        let c2 = (1.0 - h.beta2) as f32;
        let (bc1, bc2_sqrt) = (h.bias_correction1 as f32, h.bias_correction2.sqrt() as f32);
        let (eps, wd, lr) = (h.eps as f32, h.weight_decay as f32, h.lr as f32);
        let mut u = vec![0f32; w.len()];
        for i in 0..w.len() {
            let gi = if div == 1.0 { g[i] } else { g[i] / div };
            m[i] = if !h.grad_averaging {
                m[i] * b1 + gi
            } else if w1 < 0.5 {
                w1.mul_add(gi - m[i], m[i])
            } else {
                (w1 - 1.0).mul_add(gi - m[i], gi)
            };
            v[i] = (c2 * gi).mul_add(gi, v[i] * b2);
            u[i] = (m[i] / bc1) / (v[i].sqrt() / bc2_sqrt + eps);
            if h.weight_decay != 0.0 {
                u[i] = wd.mul_add(w[i], u[i]);
            }
        }
        let mut r = 1f32;
        if h.adapts() {
            let wn = w.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt() as f32;
            let un = u.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt() as f32;
            if wn > 0.0 && un > 0.0 {
                r = wn / un;
            }
            if h.trust_clip {
                r = r.min(1.0);
            }
            u.iter_mut().for_each(|x| *x *= r);
        }
        for i in 0..w.len() {
            w[i] = (-lr).mul_add(u[i], w[i]);
        }
        f64::from(r)
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    struct State {
        w: Vec<Vec<f32>>,
        g: Vec<Vec<f32>>,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    }

    fn state(sizes: &[usize], seed: u64) -> State {
        let w = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| noise(n, seed + i as u64))
            .collect();
        let g = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                noise(n, seed + 100 + i as u64)
                    .iter()
                    .map(|x| x * 1e-2)
                    .collect()
            })
            .collect();
        let zeros = || sizes.iter().map(|&n| vec![0f32; n]).collect::<Vec<_>>();
        State {
            w,
            g,
            m: zeros(),
            v: zeros(),
        }
    }

    fn tensors(s: &mut State) -> Vec<LambTensor<'_>> {
        s.w.iter_mut()
            .zip(&s.g)
            .zip(s.m.iter_mut())
            .zip(s.v.iter_mut())
            .map(|(((w, g), m), v)| LambTensor {
                param: w,
                grad: Grad::F32(g),
                exp_avg: m,
                exp_avg_sq: v,
                half: HalfParam::None,
            })
            .collect()
    }

    const SIZES: [usize; 6] = [0, 1, 7, 300, 3 * CHUNK + 17, 5000];

    fn flag_combinations() -> Vec<LambHyper> {
        let mut out = Vec::new();
        for bits in 0..64u32 {
            let on = |k: u32| bits & (1 << k) != 0;
            let base = LambHyper {
                lr: 1e-2,
                grad_averaging: on(0),
                trust_clip: on(1),
                always_adapt: on(2),
                weight_decay: if on(3) { 0.01 } else { 0.0 },
                clip_divisor: if on(4) { 3.5 } else { 1.0 },
                beta1: if on(5) { 0.9 } else { 0.3 },
                ..LambHyper::default()
            };
            out.push(base);
        }
        out
    }

    #[test]
    fn matches_the_scalar_reference_on_every_flag_combination() {
        for (k, h0) in flag_combinations().into_iter().enumerate() {
            let mut a = state(&SIZES, k as u64);
            let mut b = state(&SIZES, k as u64);
            for t in 1..=4 {
                let h = if k % 2 == 0 { h0.at_step(t) } else { h0 };
                let ratios = step(tensors(&mut a), &h).unwrap();
                for (i, &got) in ratios.iter().enumerate() {
                    let r = reference(&mut b.w[i], &b.g[i], &mut b.m[i], &mut b.v[i], &h);
                    // Only the order of the float64 norm sums differs, which leaves the float32
                    // norms (and so every bit) unchanged on these inputs.
                    assert_eq!(got, r, "{h:?} {i}");
                }
                assert_eq!(a.m, b.m, "{h:?}");
                assert_eq!(a.v, b.v, "{h:?}");
                assert_eq!(a.w, b.w, "{h:?}");
            }
        }
    }

    #[test]
    fn bits_do_not_depend_on_thread_count_or_isa() {
        let h = LambHyper {
            clip_divisor: 2.0,
            ..LambHyper::default().at_step(3)
        };
        let sizes = [5 * CHUNK + 3, 11, CHUNK];
        let mut runs = Vec::new();
        for (threads, isa) in [
            (1, detect()),
            (2, detect()),
            (3, Isa::Portable),
            (4, detect()),
        ] {
            let mut s = state(&sizes, 7);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let ratios = pool.install(|| step_in_pool(tensors(&mut s), &h, isa));
            let grads: Vec<Grad<'_>> = s.g.iter().map(|g| Grad::F32(g)).collect();
            let norm = pool.install(|| grad_sq_norm_in_pool(&grads, isa));
            runs.push((ratios, norm, s.w, s.m, s.v));
        }
        for r in &runs[1..] {
            assert!(r.0 == runs[0].0 && r.1 == runs[0].1 && r.2 == runs[0].2);
            assert!(r.3 == runs[0].3 && r.4 == runs[0].4);
        }
    }

    #[test]
    fn half_grads_and_params_follow_the_master() {
        let n = CHUNK + 1000;
        let h = LambHyper::default().at_step(1);
        let w0 = noise(n, 3);
        let g32 = noise(n, 4);
        let gb: Vec<bf16> = g32.iter().map(|&x| bf16::from_f32(x)).collect();
        let gh: Vec<f16> = g32.iter().map(|&x| f16::from_f32(x)).collect();
        // bf16: against the float32 kernel on the widened gradient.
        let mut wb = w0.clone();
        let (mut mb, mut vb) = (vec![0f32; n], vec![0f32; n]);
        let mut pb = vec![bf16::ZERO; n];
        let t = LambTensor {
            param: &mut wb,
            grad: Grad::Bf16(&gb),
            exp_avg: &mut mb,
            exp_avg_sq: &mut vb,
            half: HalfParam::Bf16(&mut pb),
        };
        step(vec![t], &h).unwrap();
        let wide: Vec<f32> = gb.iter().map(|x| x.to_f32()).collect();
        let mut wr = w0.clone();
        let (mut mr, mut vr) = (vec![0f32; n], vec![0f32; n]);
        let t = LambTensor {
            param: &mut wr,
            grad: Grad::F32(&wide),
            exp_avg: &mut mr,
            exp_avg_sq: &mut vr,
            half: HalfParam::None,
        };
        step(vec![t], &h).unwrap();
        assert_eq!(wb, wr);
        assert!(pb.iter().zip(&wb).all(|(p, w)| *p == bf16::from_f32(*w)));
        // fp16.
        let mut wh = w0.clone();
        let (mut mh, mut vh) = (vec![0f32; n], vec![0f32; n]);
        let mut ph = vec![f16::ZERO; n];
        let t = LambTensor {
            param: &mut wh,
            grad: Grad::F16(&gh),
            exp_avg: &mut mh,
            exp_avg_sq: &mut vh,
            half: HalfParam::F16(&mut ph),
        };
        step(vec![t], &h).unwrap();
        let wide: Vec<f32> = gh.iter().map(|x| x.to_f32()).collect();
        let mut wr = w0;
        let (mut mr, mut vr) = (vec![0f32; n], vec![0f32; n]);
        reference(&mut wr, &wide, &mut mr, &mut vr, &h);
        assert_eq!(mh, mr);
        assert!(ph.iter().zip(&wh).all(|(p, w)| *p == f16::from_f32(*w)));
        // Rounding to bf16: ties to even, NaN canonical.
        for x in [
            1.0f32,
            f32::from_bits(0x3F80_8000), // 1 + 2^-8: a tie, rounds down to even
            f32::from_bits(0x3F81_8000), // a tie that rounds up to even
            -3.3e38,
            f32::INFINITY,
            1e-40,
        ] {
            assert_eq!(f32_to_bf16(x), bf16::from_f32(x), "{x}");
        }
        assert_eq!(f32_to_bf16(f32::NAN).to_bits(), 0x7FC0);
    }

    #[test]
    fn zero_weights_and_trust_clip() {
        let h = LambHyper {
            trust_clip: true,
            ..LambHyper::default().at_step(1)
        };
        let mut s = state(&[10, 10], 1);
        s.w[0].iter_mut().for_each(|x| *x = 0.0);
        s.w[1].iter_mut().for_each(|x| *x *= 1e6);
        let r = step(tensors(&mut s), &h).unwrap();
        assert_eq!(r, vec![1.0, 1.0]);
        // Non-finite gradients propagate (as in timm) instead of failing.
        let mut s = state(&[4], 2);
        s.g[0][1] = f32::NAN;
        step(tensors(&mut s), &LambHyper::default()).unwrap();
        assert!(s.w[0][1].is_nan() && s.w[0][0].is_finite());
    }

    #[test]
    fn grad_norm_matches_a_plain_sum() {
        let sizes = [3 * CHUNK + 5, 0, 77];
        let s = state(&sizes, 9);
        let grads: Vec<Grad<'_>> = s.g.iter().map(|g| Grad::F32(g)).collect();
        let want: f64 = s.g.iter().flatten().map(|&x| f64::from(x).powi(2)).sum();
        let got = grad_sq_norm(&grads);
        assert!((got - want).abs() <= 1e-12 * want);
        let gb: Vec<bf16> = s.g[2].iter().map(|&x| bf16::from_f32(x)).collect();
        let want: f64 = gb.iter().map(|x| f64::from(x.to_f32()).powi(2)).sum();
        assert!((grad_sq_norm(&[Grad::Bf16(&gb)]) - want).abs() <= 1e-12 * want);
    }

    #[test]
    fn bad_arguments_are_value_errors() {
        let bad = [
            LambHyper {
                lr: -1.0,
                ..LambHyper::default()
            },
            LambHyper {
                lr: f64::NAN,
                ..LambHyper::default()
            },
            LambHyper {
                eps: f64::INFINITY,
                ..LambHyper::default()
            },
            LambHyper {
                beta1: 1.0,
                ..LambHyper::default()
            },
            LambHyper {
                beta2: -0.1,
                ..LambHyper::default()
            },
            LambHyper {
                bias_correction1: 0.0,
                ..LambHyper::default()
            },
            LambHyper {
                bias_correction2: 1.5,
                ..LambHyper::default()
            },
            LambHyper {
                clip_divisor: 0.0,
                ..LambHyper::default()
            },
        ];
        for h in bad {
            let mut s = state(&[3], 0);
            assert!(
                matches!(step(tensors(&mut s), &h), Err(Error::Value(_))),
                "{h:?}"
            );
        }
        let mut s = state(&[3], 0);
        s.m[0].push(0.0);
        let err = step(tensors(&mut s), &LambHyper::default()).unwrap_err();
        assert_eq!(
            err,
            Error::value("exp_avgs[0] has 4 elements but params[0] has 3")
        );
        let mut s = state(&[3], 0);
        let mut half = vec![bf16::ZERO; 2];
        let mut t = tensors(&mut s);
        t[0].half = HalfParam::Bf16(&mut half);
        assert!(matches!(
            step(t, &LambHyper::default()),
            Err(Error::Value(_))
        ));
    }
}
