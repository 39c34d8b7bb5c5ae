//! Element types and the register-blocked tile matmul the attention kernels are built from.
//!
//! The micro-kernel keeps an `MR x NR` block of C in registers and streams A (broadcast) and B
//! (rows) through it; it is written as plain loops over fixed-size arrays so LLVM vectorises it for
//! whatever target features the calling function enables (AVX-512, AVX2+FMA, or the baseline).

use std::ops::{Add, Div, Mul, Sub};

use half::bf16;

/// The accumulation type of the kernels: `f32` (fast path) or `f64` (exact checks).
pub trait Real:
    Copy
    + crate::error::ZeroBits
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    const NEG_INFINITY: Self;
    const INFINITY: Self;
    fn from_f64(x: f64) -> Self;
    /// `exp`, vectorisable; `exp(-inf) = 0`.
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    /// `2^x`, vectorisable; `exp2(-inf) = 0`, `exp2(NaN)` is NaN.
    fn exp2(self) -> Self;
    /// [`Real::exp2`] built from the multiply-add flavour `F` (fused inside the FMA kernels).
    #[inline(always)]
    fn exp2_with<F: MulAdd>(self) -> Self {
        self.exp2()
    }
    /// [`Real::exp2_with`] for `self <= 0` only (the f32 version skips the overflow clamp).
    #[inline(always)]
    fn exp2_nonpos_with<F: MulAdd>(self) -> Self {
        self.exp2()
    }
    /// `tanh`, vectorisable.
    fn tanh(self) -> Self;
    fn max(self, other: Self) -> Self;
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// [`gemm`] for the instruction set `I`; f32 has hand-blocked SIMD kernels.
    ///
    /// # Safety
    /// As [`gemm`], and the CPU must support `I`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_for<I: Isa>(
        m: usize,
        n: usize,
        k: usize,
        a: *const Self,
        a_rs: usize,
        a_cs: usize,
        b: *const Self,
        ldb: usize,
        c: *mut Self,
        ldc: usize,
        accumulate: bool,
    );
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const INFINITY: Self = f32::INFINITY;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn exp(self) -> Self {
        fast_exp_f32(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn exp2(self) -> Self {
        fast_exp2_f32(self)
    }
    #[inline(always)]
    fn exp2_with<F: MulAdd>(self) -> Self {
        fast_exp2_f32_with::<F>(self)
    }
    #[inline(always)]
    fn exp2_nonpos_with<F: MulAdd>(self) -> Self {
        fast_exp2_nonpos_f32_with::<F>(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        // tanh(x) = 1 - 2 / (exp(2x) + 1): absolute error about 1e-7, which is what softcap needs.
        let x = self.clamp(-9.0, 9.0);
        1.0 - 2.0 / (fast_exp_f32(2.0 * x) + 1.0)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if self > other {
            self
        } else {
            other
        }
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
    #[inline(always)]
    unsafe fn gemm_for<I: Isa>(
        m: usize,
        n: usize,
        k: usize,
        a: *const Self,
        a_rs: usize,
        a_cs: usize,
        b: *const Self,
        ldb: usize,
        c: *mut Self,
        ldc: usize,
        accumulate: bool,
    ) {
        match I::KIND {
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx512 => x86::gemm_avx512(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate),
            #[cfg(target_arch = "x86_64")]
            IsaKind::Avx2 => x86::gemm_avx2(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate),
            _ => gemm::<f32, I::MulAdd, 4, 16>(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate),
        }
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const INFINITY: Self = f64::INFINITY;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn exp2(self) -> Self {
        f64::exp2(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if self > other {
            self
        } else {
            other
        }
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
    #[inline(always)]
    unsafe fn gemm_for<I: Isa>(
        m: usize,
        n: usize,
        k: usize,
        a: *const Self,
        a_rs: usize,
        a_cs: usize,
        b: *const Self,
        ldb: usize,
        c: *mut Self,
        ldc: usize,
        accumulate: bool,
    ) {
        gemm::<f64, I::MulAdd, 4, 16>(m, n, k, a, a_rs, a_cs, b, ldb, c, ldc, accumulate)
    }
}

/// `exp(x)` for f32 in branch-free, vectorisable form (Cephes `expf` polynomial, about 1 ulp).
#[inline(always)]
pub fn fast_exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(-87.336_54, 88.0);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n lies in [-126, 127] after the clamp, so the exponent field cannot overflow.
    // 2^n from the mantissa of n + 127 + 2^23: no float-to-int conversion, so it vectorises.
    let scale = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
    let out = y * scale;
    if x < -87.336_54 {
        0.0
    } else {
        out
    }
}

/// `2^x` for f32 in branch-free, vectorisable form.
#[inline(always)]
pub fn fast_exp2_f32(x: f32) -> f32 {
    fast_exp2_f32_with::<Unfused>(x)
}

/// [`fast_exp2_f32`] with the multiply-add flavour `F`: about a dozen vector operations.
///
/// Rounding uses the `1.5 * 2^23` trick: adding it leaves `round(x) + 127` in the low mantissa
/// bits, which are both `n` (after subtracting the constant back) and, shifted left by 23, the
/// exponent field of `2^n` (no float-to-int conversion, no `floor`). Inputs at or below -127 give
/// `n = -127`, whose exponent field is 0, so the result is exactly 0 without a select. NaN gives
/// NaN.
#[inline(always)]
pub fn fast_exp2_f32_with<F: MulAdd>(x: f32) -> f32 {
    // Both clamps let NaN through (a comparison with NaN is false, so the select keeps `x`; one
    // max/min instruction each, as with the operands the other way round), and NaN gives NaN:
    // a NaN score must poison its softmax row, as in the reference, not vanish into 2^-127 = 0.
    let xc = if x < -127.0 { -127.0 } else { x };
    let xc = if xc > 127.0 { 127.0 } else { xc };
    exp2_clamped::<F>(xc)
}

/// [`fast_exp2_f32_with`] for `x <= 127` (the softmax exponents `s - max <= 0`): no upper clamp,
/// one operation fewer. NaN gives NaN, as there.
#[inline(always)]
pub fn fast_exp2_nonpos_f32_with<F: MulAdd>(x: f32) -> f32 {
    let xc = if x < -127.0 { -127.0 } else { x };
    exp2_clamped::<F>(xc)
}

/// `2^x` for `x` in [-127, 127].
#[inline(always)]
fn exp2_clamped<F: MulAdd>(xc: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0 + 127.0; // 1.5 * 2^23 + exponent bias
    let t = xc + SHIFT;
    let n = t - SHIFT;
    let r = xc - n;
    // 2^r on [-1/2, 1/2] as 1 + r q(r), q of degree 5 fitted for minimax relative error
    // (about 1e-7 evaluated in f32, i.e. within an ulp).
    const C: [f32; 6] = [
        1.535_336_2e-4,
        1.339_887_5e-3,
        9.618_437e-3,
        5.550_332_4e-2,
        2.402_264_8e-1,
        6.931_472e-1,
    ];
    let mut p = C[0];
    for &c in &C[1..] {
        p = F::mul_add(p, r, c);
    }
    let y = F::mul_add(p, r, 1.0);
    y * f32::from_bits(t.to_bits() << 23)
}

/// A storage element type of the inputs and outputs: `f32`, `bf16` (accumulated in f32) or `f64`.
/// All-zero bits are the value 0 in every storage type (`ZeroBits`), so zeroed buffers need no
/// fill pass.
pub trait Storage: Copy + crate::error::ZeroBits + Send + Sync + 'static {
    type Acc: Real;
    fn load(self) -> Self::Acc;
    fn store(x: Self::Acc) -> Self;
}

impl Storage for f32 {
    type Acc = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        x
    }
}

impl Storage for f64 {
    type Acc = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(x: f64) -> Self {
        x
    }
}

impl Storage for bf16 {
    type Acc = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        // bf16 is the top half of an f32: a shift, which vectorises (half's `to_f32` may not).
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

/// Multiply-add flavour: fused where the target has FMA, separate otherwise (a fused
/// `mul_add` without hardware FMA is a slow library call).
pub trait MulAdd {
    fn mul_add<T: Real>(a: T, b: T, c: T) -> T;
}

/// Hardware fused multiply-add.
pub struct Fused;
/// Separate multiply and add.
pub struct Unfused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add<T: Real>(a: T, b: T, c: T) -> T {
        a.mul_add(b, c)
    }
}

impl MulAdd for Unfused {
    #[inline(always)]
    fn mul_add<T: Real>(a: T, b: T, c: T) -> T {
        a * b + c
    }
}

/// Which instruction set a kernel instance is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IsaKind {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

/// A compile-time instruction-set choice for the tile kernels.
pub trait Isa {
    const KIND: IsaKind;
    type MulAdd: MulAdd;
}

/// AVX-512F + FMA.
#[cfg(target_arch = "x86_64")]
pub struct Avx512;
/// AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
pub struct Avx2;
/// Whatever the build target gives (fused multiply-add only where it is native).
pub struct Portable;

#[cfg(target_arch = "x86_64")]
impl Isa for Avx512 {
    const KIND: IsaKind = IsaKind::Avx512;
    type MulAdd = Fused;
}
#[cfg(target_arch = "x86_64")]
impl Isa for Avx2 {
    const KIND: IsaKind = IsaKind::Avx2;
    type MulAdd = Fused;
}
impl Isa for Portable {
    const KIND: IsaKind = IsaKind::Portable;
    #[cfg(target_arch = "aarch64")]
    type MulAdd = Fused;
    #[cfg(not(target_arch = "aarch64"))]
    type MulAdd = Unfused;
}

/// `C (m x n) = [C +] A (m x k) B (k x n)`; A[r][p] lives at `a + r * a_rs + p * a_cs` (so A may
/// be a transposed view), B and C are row-major with leading dimensions `ldb`, `ldc`.
///
/// # Safety
/// `m` must be a multiple of `MR` and `n` a multiple of 16 (and of `NR` or `NR / 2`); the pointers
/// must cover the addressed elements.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub unsafe fn gemm<T: Real, F: MulAdd, const MR: usize, const NR: usize>(
    m: usize,
    n: usize,
    k: usize,
    a: *const T,
    a_rs: usize,
    a_cs: usize,
    b: *const T,
    ldb: usize,
    c: *mut T,
    ldc: usize,
    accumulate: bool,
) {
    debug_assert!(m.is_multiple_of(MR) && n.is_multiple_of(16));
    let mut i = 0;
    while i < m {
        let mut j = 0;
        while j + NR <= n {
            micro::<T, F, MR, NR>(
                k,
                a.add(i * a_rs),
                a_rs,
                a_cs,
                b.add(j),
                ldb,
                c.add(i * ldc + j),
                ldc,
                accumulate,
            );
            j += NR;
        }
        while j < n {
            micro::<T, F, MR, 16>(
                k,
                a.add(i * a_rs),
                a_rs,
                a_cs,
                b.add(j),
                ldb,
                c.add(i * ldc + j),
                ldc,
                accumulate,
            );
            j += 16;
        }
        i += MR;
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn micro<T: Real, F: MulAdd, const MR: usize, const NR: usize>(
    k: usize,
    a: *const T,
    a_rs: usize,
    a_cs: usize,
    b: *const T,
    ldb: usize,
    c: *mut T,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[T::ZERO; NR]; MR];
    for p in 0..k {
        let brow = b.add(p * ldb);
        let mut bv = [T::ZERO; NR];
        for (x, slot) in bv.iter_mut().enumerate() {
            *slot = *brow.add(x);
        }
        for (r, acc_row) in acc.iter_mut().enumerate() {
            let av = *a.add(r * a_rs + p * a_cs);
            for x in 0..NR {
                acc_row[x] = F::mul_add(av, bv[x], acc_row[x]);
            }
        }
    }
    for (r, acc_row) in acc.iter().enumerate() {
        let crow = c.add(r * ldc);
        for (x, &value) in acc_row.iter().enumerate() {
            let dst = crow.add(x);
            *dst = if accumulate { *dst + value } else { value };
        }
    }
}

/// Hand-blocked f32 micro-kernels: `MR` rows of C held in registers, 2 vectors wide.
// The AVX-512 intrinsics are stable since Rust 1.89: the crate's rust-version must be >= 1.89.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// One `MR x (16 NV)` block of C kept in registers over the whole k loop.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn block_avx512<const MR: usize, const NV: usize>(
        k: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        for p in 0..k {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, slot) in bv.iter_mut().enumerate() {
                *slot = _mm512_loadu_ps(b.add(p * ldb + 16 * v));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(r * a_rs + p * a_cs));
                for (slot, &bvec) in row.iter_mut().zip(&bv) {
                    *slot = _mm512_fmadd_ps(av, bvec, *slot);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, &value) in row.iter().enumerate() {
                let dst = c.add(r * ldc + 16 * v);
                let value = if accumulate {
                    _mm512_add_ps(value, _mm512_loadu_ps(dst))
                } else {
                    value
                };
                _mm512_storeu_ps(dst, value);
            }
        }
    }

    /// `C = [C +] A B` with 4 x 64 register blocks when 64 | n, else 8 x 32 (16-wide tail).
    /// Needs `m % 8 == 0` (4 when 64 | n) and `n % 16 == 0`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub unsafe fn gemm_avx512(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        debug_assert!(m.is_multiple_of(4) && n.is_multiple_of(16));
        if n.is_multiple_of(64) {
            for i in (0..m).step_by(4) {
                for j in (0..n).step_by(64) {
                    block_avx512::<4, 4>(
                        k,
                        a.add(i * a_rs),
                        a_rs,
                        a_cs,
                        b.add(j),
                        ldb,
                        c.add(i * ldc + j),
                        ldc,
                        accumulate,
                    );
                }
            }
            return;
        }
        debug_assert!(m.is_multiple_of(8));
        for i in (0..m).step_by(8) {
            let mut j = 0;
            while j + 32 <= n {
                block_avx512::<8, 2>(
                    k,
                    a.add(i * a_rs),
                    a_rs,
                    a_cs,
                    b.add(j),
                    ldb,
                    c.add(i * ldc + j),
                    ldc,
                    accumulate,
                );
                j += 32;
            }
            if j < n {
                block_avx512::<8, 1>(
                    k,
                    a.add(i * a_rs),
                    a_rs,
                    a_cs,
                    b.add(j),
                    ldb,
                    c.add(i * ldc + j),
                    ldc,
                    accumulate,
                );
            }
        }
    }

    /// `C = [C +] A B` with 4 x 16 register blocks of two 8-wide vectors. `m % 4 == 0`, `n % 16 == 0`.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub unsafe fn gemm_avx2(
        m: usize,
        n: usize,
        k: usize,
        a: *const f32,
        a_rs: usize,
        a_cs: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        debug_assert!(m.is_multiple_of(4) && n.is_multiple_of(16));
        let mut i = 0;
        while i < m {
            let ai = a.add(i * a_rs);
            let ci = c.add(i * ldc);
            let mut j = 0;
            while j < n {
                let mut acc0 = [_mm256_setzero_ps(); 4];
                let mut acc1 = [_mm256_setzero_ps(); 4];
                for p in 0..k {
                    let b0 = _mm256_loadu_ps(b.add(p * ldb + j));
                    let b1 = _mm256_loadu_ps(b.add(p * ldb + j + 8));
                    for r in 0..4 {
                        let av = _mm256_set1_ps(*ai.add(r * a_rs + p * a_cs));
                        acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
                        acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
                    }
                }
                for r in 0..4 {
                    let dst = ci.add(r * ldc + j);
                    if accumulate {
                        acc0[r] = _mm256_add_ps(acc0[r], _mm256_loadu_ps(dst));
                        acc1[r] = _mm256_add_ps(acc1[r], _mm256_loadu_ps(dst.add(8)));
                    }
                    _mm256_storeu_ps(dst, acc0[r]);
                    _mm256_storeu_ps(dst.add(8), acc1[r]);
                }
                j += 16;
            }
            i += 4;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_std() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let rel = (fast_exp_f32(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        assert_eq!(fast_exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(fast_exp_f32(-1000.0), 0.0);
        assert_eq!(fast_exp_f32(0.0), 1.0);
    }

    #[test]
    fn fast_exp2_matches_std() {
        fn check<F: MulAdd>() {
            let e = fast_exp2_f32_with::<F>;
            let mut worst = 0.0f32;
            let mut x = -125.0f32;
            while x < 127.0 {
                worst = worst.max((e(x) - x.exp2()).abs() / x.exp2());
                x += 0.0173;
            }
            assert!(worst < 4e-7, "worst relative error {worst}");
            for x in [f32::NEG_INFINITY, -1000.0, -127.0] {
                assert_eq!(e(x), 0.0, "{x}");
            }
            assert_eq!(e(0.0), 1.0);
            for i in -8..=8 {
                assert_eq!(e(i as f32), (i as f32).exp2(), "{i}");
            }
        }
        check::<Unfused>();
        check::<Fused>();
        for x in [
            0.0f32,
            -0.0,
            -1e-7,
            -0.3,
            -1.0,
            -5.5,
            -126.9,
            -127.0,
            -1000.0,
            f32::NAN,
        ] {
            let clamped = fast_exp2_f32_with::<Fused>(x);
            let nonpos = fast_exp2_nonpos_f32_with::<Fused>(x);
            assert!(
                nonpos == clamped || (nonpos.is_nan() && clamped.is_nan()),
                "{x}"
            );
        }
        // NaN propagates (a NaN score must poison its softmax row, not become P = 0).
        assert!(fast_exp2_f32_with::<Fused>(f32::NAN).is_nan());
        assert!(fast_exp2_f32_with::<Unfused>(f32::NAN).is_nan());
        assert!(fast_exp2_nonpos_f32_with::<Fused>(f32::NAN).is_nan());
        assert!(fast_exp2_nonpos_f32_with::<Unfused>(-f32::NAN).is_nan());
        assert_eq!(fast_exp2_f32_with::<Fused>(f32::INFINITY), 127f32.exp2());
        assert_eq!(fast_exp2_nonpos_f32_with::<Unfused>(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn tanh_is_close() {
        for i in -400..400 {
            let x = i as f32 * 0.05;
            assert!((Real::tanh(x) - x.tanh()).abs() < 3e-7, "{x}");
        }
    }

    #[test]
    fn gemm_matches_naive() {
        let (m, n, k) = (16, 48, 13);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
        let mut c = vec![1.0f32; m * n];
        unsafe {
            gemm::<f32, Unfused, 8, 32>(
                m,
                n,
                k,
                a.as_ptr(),
                k,
                1,
                b.as_ptr(),
                n,
                c.as_mut_ptr(),
                n,
                true,
            )
        };
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum::<f32>();
                assert_eq!(c[i * n + j], want);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_gemms_match_portable() {
        let (m, n, k) = (16, 80, 21);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 13) as f32 - 6.0).collect();
        let mut want = vec![2.0f32; m * n];
        unsafe {
            gemm::<f32, Unfused, 4, 16>(
                m,
                n,
                k,
                a.as_ptr(),
                k,
                1,
                b.as_ptr(),
                n,
                want.as_mut_ptr(),
                n,
                true,
            )
        };
        if is_x86_feature_detected!("avx512f") {
            let mut got = vec![2.0f32; m * n];
            unsafe {
                f32::gemm_for::<Avx512>(
                    m,
                    n,
                    k,
                    a.as_ptr(),
                    k,
                    1,
                    b.as_ptr(),
                    n,
                    got.as_mut_ptr(),
                    n,
                    true,
                )
            };
            assert_eq!(got, want);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let mut got = vec![2.0f32; m * n];
            unsafe {
                f32::gemm_for::<Avx2>(
                    m,
                    n,
                    k,
                    a.as_ptr(),
                    k,
                    1,
                    b.as_ptr(),
                    n,
                    got.as_mut_ptr(),
                    n,
                    true,
                )
            };
            assert_eq!(got, want);
        }
    }

    #[test]
    fn bf16_load_is_exact() {
        for x in [0.0f32, 1.5, -3.25, 1e-20, 6.5e4] {
            let h = bf16::from_f32(x);
            assert_eq!(h.load(), h.to_f32());
        }
    }
}
