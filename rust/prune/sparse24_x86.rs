//! AVX-512 row kernel for `sparse24::linear` (selected at run time).
//!
//! Per chunk of 32 inputs: the 16 stored values' 2-bit indices (one `u32` of `meta`) become a
//! vector of positions `4 * (j / 2) + idx_j` by one variable shift, a mask and an add; their
//! codes are widened to `f32` and dequantized with one FMA (`q * s - z * s`); each token's 32
//! activations (two registers) are gathered by one `vpermt2ps` and multiplied in.
#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::sparse24::{Sparse24Weight, TOKEN_TILE};

/// # Safety
/// Needs AVX-512 F/BW; `w` validated, `in_features` and `group_size` multiples of 32, `x` holds
/// `y.len()` rows of `in_features`.
pub(crate) unsafe fn row_avx512(w: &Sparse24Weight, r: usize, ng: usize, x: &[f32], y: &mut [f32]) {
    let m = y.len();
    let mut t0 = 0;
    while t0 < m {
        let n = (m - t0).min(TOKEN_TILE);
        match n {
            1 => tile::<1>(w, r, ng, x, t0, y),
            2 => tile::<2>(w, r, ng, x, t0, y),
            3 => tile::<3>(w, r, ng, x, t0, y),
            _ => tile::<4>(w, r, ng, x, t0, y),
        }
        t0 += n;
    }
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn codes16(int4: bool, p: *const u8) -> __m512 {
    let bytes = if int4 {
        let b = _mm_loadl_epi64(p as *const __m128i);
        let m15 = _mm_set1_epi8(15);
        let lo = _mm_and_si128(b, m15);
        let hi = _mm_and_si128(_mm_srli_epi16(b, 4), m15);
        _mm_unpacklo_epi8(lo, hi)
    } else {
        _mm_loadu_si128(p as *const __m128i)
    };
    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes))
}

#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn tile<const T: usize>(
    w: &Sparse24Weight,
    r: usize,
    ng: usize,
    x: &[f32],
    t0: usize,
    y: &mut [f32],
) {
    let k = w.in_features;
    let int4 = w.bits == 4;
    let chunk_bytes = if int4 { 8 } else { 16 };
    let vals = w
        .values
        .as_ptr()
        .add(r * super::sparse24::value_bytes(k, w.bits));
    let meta = w.meta.as_ptr().add(r * (k / 8));
    let shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
    let three = _mm512_set1_epi32(3);
    let steps = w.group_size / 32;
    let xb = x.as_ptr().add(t0 * k);
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    for g in 0..ng {
        let s = *w.scales.get_unchecked(r * ng + g);
        let z = *w.zeros.get_unchecked(r * ng + g);
        let sv = _mm512_set1_ps(s);
        let nz = _mm512_set1_ps(-z * s);
        for c in g * steps..(g + 1) * steps {
            let mw = (meta.add(4 * c) as *const u32).read_unaligned();
            let idx = _mm512_add_epi32(
                _mm512_and_si512(
                    _mm512_srlv_epi32(_mm512_set1_epi32(mw as i32), shifts),
                    three,
                ),
                base,
            );
            let wv = _mm512_fmadd_ps(codes16(int4, vals.add(c * chunk_bytes)), sv, nz);
            let a = c % 2;
            for (t, at) in acc.iter_mut().enumerate() {
                let xp = xb.add(t * k + 32 * c);
                let xs =
                    _mm512_permutex2var_ps(_mm512_loadu_ps(xp), idx, _mm512_loadu_ps(xp.add(16)));
                at[a] = _mm512_fmadd_ps(wv, xs, at[a]);
            }
        }
    }
    for (t, at) in acc.iter().enumerate() {
        *y.get_unchecked_mut(t0 + t) = _mm512_reduce_add_ps(_mm512_add_ps(at[0], at[1]));
    }
}
