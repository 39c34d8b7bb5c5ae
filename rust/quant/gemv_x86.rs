//! x86-64 SIMD row kernels for `gemv` (selected at run time by `gemv::detect_isa`).
//!
//! Each kernel computes one weight row against a tile of up to `TOKEN_TILE` tokens, so a row is
//! streamed from memory once per tile and its codes are widened once for all tokens of the tile.
#![cfg(target_arch = "x86_64")]
// AVX-512 intrinsics are stable since Rust 1.89; the crate's rust-version must be raised to match.

use std::arch::x86_64::*;

use super::gemv::{ChunkGroups, FloatActs, IntActs, TOKEN_TILE};

/// Bytes ahead of the current weight position to prefetch. Rows are contiguous, so this runs into
/// the next row; the hardware prefetcher stops at 4 KiB pages, i.e. at every INT8 row of 4096.
/// A prefetch is only a hint: addresses past the buffer never fault.
const PREFETCH_BYTES: usize = 2048;

#[inline(always)]
unsafe fn prefetch(p: *const u8) {
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_BYTES) as *const i8);
}

/// Calls `tile::<T>(t0, T)` over token tiles of at most `TOKEN_TILE`.
macro_rules! for_each_tile {
    ($m:expr, |$t0:ident, $n:ident| $body:expr) => {{
        let mut $t0 = 0;
        while $t0 < $m {
            let $n = ($m - $t0).min(TOKEN_TILE);
            $body;
            $t0 += $n;
        }
    }};
}

/// Float route, AVX-512: 32 INT4 inputs (16 bytes) or 16 INT8 inputs per step; `g % 32 == 0`.
///
/// # Safety
/// Needs AVX-512 F/BW; `q`, `s`, `neg_zs` and `acts` must describe one validated row.
pub(crate) unsafe fn float_row_avx512(
    int4: bool,
    q: &[u8],
    s: &[f32],
    neg_zs: &[f32],
    g: usize,
    acts: &FloatActs,
    y: &mut [f32],
) {
    for_each_tile!(y.len(), |t0, n| match n {
        1 => float_tile_avx512::<1>(int4, q, s, neg_zs, g, acts, t0, y),
        2 => float_tile_avx512::<2>(int4, q, s, neg_zs, g, acts, t0, y),
        3 => float_tile_avx512::<3>(int4, q, s, neg_zs, g, acts, t0, y),
        _ => float_tile_avx512::<4>(int4, q, s, neg_zs, g, acts, t0, y),
    });
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn float_tile_avx512<const T: usize>(
    int4: bool,
    q: &[u8],
    s: &[f32],
    neg_zs: &[f32],
    g: usize,
    acts: &FloatActs,
    t0: usize,
    y: &mut [f32],
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    let xb = acts.x.as_ptr().add(t0 * acts.stride);
    let stride = acts.stride;
    let qp = q.as_ptr();
    if int4 {
        let m15 = _mm512_set1_epi32(15);
        let steps = g / 32;
        for gi in 0..s.len() {
            let sv = _mm512_set1_ps(*s.get_unchecked(gi));
            let nz = _mm512_set1_ps(*neg_zs.get_unchecked(gi));
            for j in gi * steps..(gi + 1) * steps {
                if j % 4 == 0 {
                    prefetch(qp.add(j * 16));
                }
                let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(qp.add(j * 16) as *const __m128i));
                let lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, m15)), sv, nz);
                let hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32::<4>(v)), sv, nz);
                for (t, a) in acc.iter_mut().enumerate() {
                    let xp = xb.add(t * stride + j * 32);
                    a[0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp), a[0]);
                    a[1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), a[1]);
                }
            }
        }
    } else {
        let pairs = g / 32;
        for gi in 0..s.len() {
            let sv = _mm512_set1_ps(*s.get_unchecked(gi));
            let nz = _mm512_set1_ps(*neg_zs.get_unchecked(gi));
            for j in gi * pairs..(gi + 1) * pairs {
                let p = qp.add(j * 32);
                if j % 2 == 0 {
                    prefetch(p);
                }
                let v0 =
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)));
                let v1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    p.add(16) as *const __m128i
                )));
                let w0 = _mm512_fmadd_ps(v0, sv, nz);
                let w1 = _mm512_fmadd_ps(v1, sv, nz);
                for (t, a) in acc.iter_mut().enumerate() {
                    let xp = xb.add(t * stride + j * 32);
                    a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a[0]);
                    a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a[1]);
                }
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        *y.get_unchecked_mut(t0 + t) = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
    }
}

/// Float route, AVX2 + FMA: 16 INT4 inputs (8 bytes) or 8 INT8 inputs per step; `g % 16 == 0`.
///
/// # Safety
/// Needs AVX2 and FMA; arguments as for [`float_row_avx512`].
pub(crate) unsafe fn float_row_avx2(
    int4: bool,
    q: &[u8],
    s: &[f32],
    neg_zs: &[f32],
    g: usize,
    acts: &FloatActs,
    y: &mut [f32],
) {
    for_each_tile!(y.len(), |t0, n| match n {
        1 => float_tile_avx2::<1>(int4, q, s, neg_zs, g, acts, t0, y),
        2 => float_tile_avx2::<2>(int4, q, s, neg_zs, g, acts, t0, y),
        3 => float_tile_avx2::<3>(int4, q, s, neg_zs, g, acts, t0, y),
        _ => float_tile_avx2::<4>(int4, q, s, neg_zs, g, acts, t0, y),
    });
}

#[target_feature(enable = "avx2,fma")]
unsafe fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn float_tile_avx2<const T: usize>(
    int4: bool,
    q: &[u8],
    s: &[f32],
    neg_zs: &[f32],
    g: usize,
    acts: &FloatActs,
    t0: usize,
    y: &mut [f32],
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    let xb = acts.x.as_ptr().add(t0 * acts.stride);
    let stride = acts.stride;
    let qp = q.as_ptr();
    let steps = g / 16;
    for gi in 0..s.len() {
        let sv = _mm256_set1_ps(*s.get_unchecked(gi));
        let nz = _mm256_set1_ps(*neg_zs.get_unchecked(gi));
        for j in gi * steps..(gi + 1) * steps {
            let (w0, w1) = if int4 {
                let v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qp.add(j * 8) as *const __m128i));
                let lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
                let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32::<4>(v));
                (_mm256_fmadd_ps(lo, sv, nz), _mm256_fmadd_ps(hi, sv, nz))
            } else {
                let b = _mm_loadu_si128(qp.add(j * 16) as *const __m128i);
                let v0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                let v1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128::<8>(b)));
                (_mm256_fmadd_ps(v0, sv, nz), _mm256_fmadd_ps(v1, sv, nz))
            };
            for (t, a) in acc.iter_mut().enumerate() {
                let xp = xb.add(t * stride + j * 16);
                a[0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), a[0]);
                a[1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), a[1]);
            }
        }
    }
    for (t, a) in acc.iter().enumerate() {
        *y.get_unchecked_mut(t0 + t) = hsum256(_mm256_add_ps(a[0], a[1]));
    }
}

/// The 64 bytes of a weight row at `off` (zero past its end), prefetching further along.
#[inline(always)]
unsafe fn load_chunk(row: &[u8], off: usize) -> __m512i {
    let (nbytes, qp) = (row.len(), row.as_ptr());
    prefetch(qp.add(off));
    if off + 64 <= nbytes {
        _mm512_loadu_si512(qp.add(off) as *const _)
    } else {
        _mm512_maskz_loadu_epi8((1u64 << (nbytes - off)) - 1, qp.add(off) as *const i8)
    }
}

/// The weight scale of each 32-bit lane of chunk `c` of a row whose group scales are `s`.
#[inline(always)]
unsafe fn lane_weight_scales(cg: &ChunkGroups, s: &[f32], c: usize) -> __m512 {
    let g0 = *cg.first.get_unchecked(c) as usize;
    let cnt = *cg.count.get_unchecked(c);
    if cnt == 1 {
        _mm512_set1_ps(*s.get_unchecked(g0))
    } else {
        let idx = _mm512_loadu_si512(cg.lane_group.as_ptr().add(c * 16) as *const _);
        let sv = _mm512_maskz_loadu_ps(((1u32 << cnt) - 1) as u16, s.as_ptr().add(g0));
        _mm512_permutexvar_ps(idx, sv)
    }
}

/// Int8-activation route, AVX-512 VNNI: one 64-byte weight chunk (128 INT4 or 64 INT8 inputs)
/// per step. Writes `sum_k s * q_k * xs * xq_k`; the caller subtracts the zero-point term.
///
/// # Safety
/// Needs AVX-512 F/BW/VNNI; `acts` and `cg` prepared for this weight's shape and bits.
pub(crate) unsafe fn int_row_vnni(
    int4: bool,
    q: &[u8],
    s: &[f32],
    _k: usize,
    cg: &ChunkGroups,
    acts: &IntActs,
    y: &mut [f32],
) {
    for_each_tile!(y.len(), |t0, n| match n {
        1 => int_tile_vnni::<1>(int4, q, s, cg, acts, t0, y),
        2 => int_tile_vnni::<2>(int4, q, s, cg, acts, t0, y),
        3 => int_tile_vnni::<3>(int4, q, s, cg, acts, t0, y),
        _ => int_tile_vnni::<4>(int4, q, s, cg, acts, t0, y),
    });
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int_tile_vnni<const T: usize>(
    int4: bool,
    q: &[u8],
    s: &[f32],
    cg: &ChunkGroups,
    acts: &IntActs,
    t0: usize,
    y: &mut [f32],
) {
    let nchunks = cg.first.len();
    // Two accumulator sets (even and odd chunks) so consecutive chunks do not wait on one FMA chain.
    let mut acc0 = [_mm512_setzero_ps(); T];
    let mut acc1 = [_mm512_setzero_ps(); T];
    let mut c = 0;
    while c + 1 < nchunks {
        int_chunk_vnni::<T>(int4, q, s, cg, acts, t0, c, &mut acc0);
        int_chunk_vnni::<T>(int4, q, s, cg, acts, t0, c + 1, &mut acc1);
        c += 2;
    }
    if c < nchunks {
        int_chunk_vnni::<T>(int4, q, s, cg, acts, t0, c, &mut acc0);
    }
    for t in 0..T {
        *y.get_unchecked_mut(t0 + t) = _mm512_reduce_add_ps(_mm512_add_ps(acc0[t], acc1[t]));
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn int_chunk_vnni<const T: usize>(
    int4: bool,
    q: &[u8],
    s: &[f32],
    cg: &ChunkGroups,
    acts: &IntActs,
    t0: usize,
    c: usize,
    acc: &mut [__m512; T],
) {
    let wv = load_chunk(q, c * 64);
    let ws = lane_weight_scales(cg, s, c);
    let xq = acts.xq.as_ptr().add(t0 * acts.stride);
    let ls = acts
        .lane_scales
        .as_ptr()
        .add(t0 * acts.lane_stride + c * 16);
    if int4 {
        let m15 = _mm512_set1_epi8(15);
        let lo = _mm512_and_si512(wv, m15);
        let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), m15);
        for (t, a) in acc.iter_mut().enumerate() {
            let xp = xq.add(t * acts.stride + c * 128);
            let d = _mm512_dpbusd_epi32(
                _mm512_setzero_si512(),
                lo,
                _mm512_loadu_si512(xp as *const _),
            );
            let d = _mm512_dpbusd_epi32(d, hi, _mm512_loadu_si512(xp.add(64) as *const _));
            let sc = _mm512_mul_ps(_mm512_loadu_ps(ls.add(t * acts.lane_stride)), ws);
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, *a);
        }
    } else {
        for (t, a) in acc.iter_mut().enumerate() {
            let xp = xq.add(t * acts.stride + c * 64);
            let d = _mm512_dpbusd_epi32(
                _mm512_setzero_si512(),
                wv,
                _mm512_loadu_si512(xp as *const _),
            );
            let sc = _mm512_mul_ps(_mm512_loadu_ps(ls.add(t * acts.lane_stride)), ws);
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, *a);
        }
    }
}

/// Int8-activation route, AVX2: one 32-byte weight chunk (64 INT4 or 32 INT8 inputs) per step,
/// `vpmaddubsw` + `vpmaddwd` in place of `vpdpbusd`. INT8 codes are split into nibbles first
/// (`q = 16 * hi + lo`) so the 16-bit pair sums cannot saturate.
///
/// # Safety
/// Needs AVX2 and FMA; `acts` and `cg` prepared for 32-byte chunks of this weight.
pub(crate) unsafe fn int_row_avx2(
    int4: bool,
    q: &[u8],
    s: &[f32],
    cg: &ChunkGroups,
    acts: &IntActs,
    y: &mut [f32],
) {
    for_each_tile!(y.len(), |t0, n| match n {
        1 => int_tile_avx2::<1>(int4, q, s, cg, acts, t0, y),
        2 => int_tile_avx2::<2>(int4, q, s, cg, acts, t0, y),
        3 => int_tile_avx2::<3>(int4, q, s, cg, acts, t0, y),
        _ => int_tile_avx2::<4>(int4, q, s, cg, acts, t0, y),
    });
}

#[target_feature(enable = "avx2,fma")]
unsafe fn int_tile_avx2<const T: usize>(
    int4: bool,
    q: &[u8],
    s: &[f32],
    cg: &ChunkGroups,
    acts: &IntActs,
    t0: usize,
    y: &mut [f32],
) {
    let nbytes = q.len();
    let qp = q.as_ptr();
    let m15 = _mm256_set1_epi8(15);
    let ones = _mm256_set1_epi16(1);
    let sixteens = _mm256_set1_epi16(16);
    let mut acc = [_mm256_setzero_ps(); T];
    let xq = acts.xq.as_ptr().add(t0 * acts.stride);
    let in_per_chunk = if int4 { 64 } else { 32 };
    for c in 0..cg.first.len() {
        let off = c * 32;
        prefetch(qp.add(off));
        let wv = if off + 32 <= nbytes {
            _mm256_loadu_si256(qp.add(off) as *const __m256i)
        } else {
            // No masked byte loads in AVX2: copy the row's tail into a zeroed buffer.
            let mut tail = [0u8; 32];
            tail[..nbytes - off].copy_from_slice(&q[off..]);
            _mm256_loadu_si256(tail.as_ptr() as *const __m256i)
        };
        let g0 = *cg.first.get_unchecked(c) as usize;
        let ws = if *cg.count.get_unchecked(c) == 1 {
            _mm256_set1_ps(*s.get_unchecked(g0))
        } else {
            let idx = _mm256_loadu_si256(cg.lane_group.as_ptr().add(c * 8) as *const __m256i);
            _mm256_i32gather_ps::<4>(s.as_ptr().add(g0), idx)
        };
        let lo = _mm256_and_si256(wv, m15);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(wv), m15);
        for (t, a) in acc.iter_mut().enumerate() {
            let xp = xq.add(t * acts.stride + c * in_per_chunk);
            let d = if int4 {
                let xe = _mm256_loadu_si256(xp as *const __m256i);
                let xo = _mm256_loadu_si256(xp.add(32) as *const __m256i);
                let pairs =
                    _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe), _mm256_maddubs_epi16(hi, xo));
                _mm256_madd_epi16(pairs, ones)
            } else {
                let xv = _mm256_loadu_si256(xp as *const __m256i);
                _mm256_add_epi32(
                    _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xv), ones),
                    _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xv), sixteens),
                )
            };
            let ls = _mm256_loadu_ps(
                acts.lane_scales
                    .as_ptr()
                    .add((t0 + t) * acts.lane_stride + c * 8),
            );
            *a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(ls, ws), *a);
        }
    }
    for (t, a) in acc.iter().enumerate() {
        *y.get_unchecked_mut(t0 + t) = hsum256(*a);
    }
}

/// Int8-activation route, AVX-512 VNNI, one token (`m == 1`): `R` weight rows at a time, so the
/// rows' FMA chains run side by side instead of one short row waiting on its own latency, and
/// the activation chunk and its lane scales are loaded once for the `R` rows. Writes the whole
/// output `sum_k s * (q_k - z) * xs * xq_k` (zero-point term included) of rows `r0..r0 + R`.
///
/// # Safety
/// Needs AVX-512 F/BW/VNNI; `q` / `s` / `z` hold rows `r0..r0 + R` of `row_bytes` bytes and `ng`
/// groups; `acts` and `cg` prepared for this weight's shape and bits with one token.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn int_rows_vnni<const R: usize>(
    int4: bool,
    q: &[u8],
    row_bytes: usize,
    s: &[f32],
    z: &[f32],
    ng: usize,
    cg: &ChunkGroups,
    acts: &IntActs,
    r0: usize,
    y: &mut [f32],
) {
    let nchunks = cg.first.len();
    let mut acc = [_mm512_setzero_ps(); R];
    let xq = acts.xq.as_ptr();
    let ls = acts.lane_scales.as_ptr();
    let m15 = _mm512_set1_epi8(15);
    for c in 0..nchunks {
        let off = c * 64;
        let (x0, x1) = if int4 {
            (
                _mm512_loadu_si512(xq.add(c * 128) as *const _),
                _mm512_loadu_si512(xq.add(c * 128 + 64) as *const _),
            )
        } else {
            (
                _mm512_loadu_si512(xq.add(c * 64) as *const _),
                _mm512_setzero_si512(),
            )
        };
        let lsv = _mm512_loadu_ps(ls.add(c * 16));
        for (rr, a) in acc.iter_mut().enumerate() {
            let row = r0 + rr;
            let wv = load_chunk(q.get_unchecked(row * row_bytes..(row + 1) * row_bytes), off);
            let ws = lane_weight_scales(cg, s.get_unchecked(row * ng..(row + 1) * ng), c);
            let d = if int4 {
                let lo = _mm512_and_si512(wv, m15);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(wv), m15);
                _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, x0), hi, x1)
            } else {
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv, x0)
            };
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(lsv, ws), *a);
        }
    }
    // Zero-point term: sum over groups of s * z * (activation sum of the group).
    let gs = acts.group_sums.as_ptr();
    for (rr, a) in acc.iter_mut().enumerate() {
        let row = r0 + rr;
        let mut zacc = _mm512_setzero_ps();
        let mut g = 0;
        while g < ng {
            let mask = if ng - g >= 16 {
                u16::MAX
            } else {
                ((1u32 << (ng - g)) - 1) as u16
            };
            let sv = _mm512_maskz_loadu_ps(mask, s.as_ptr().add(row * ng + g));
            let zv = _mm512_maskz_loadu_ps(mask, z.as_ptr().add(row * ng + g));
            let gv = _mm512_maskz_loadu_ps(mask, gs.add(g));
            zacc = _mm512_fmadd_ps(_mm512_mul_ps(sv, zv), gv, zacc);
            g += 16;
        }
        *y.get_unchecked_mut(rr) = _mm512_reduce_add_ps(_mm512_sub_ps(*a, zacc));
    }
}

/// [`int_rows_vnni`] over every row of `y` (rows `0..y.len()` of `q` / `s` / `z`), four at a time.
///
/// # Safety
/// As [`int_rows_vnni`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn int_single_token_vnni(
    int4: bool,
    q: &[u8],
    row_bytes: usize,
    s: &[f32],
    z: &[f32],
    ng: usize,
    cg: &ChunkGroups,
    acts: &IntActs,
    y: &mut [f32],
) {
    let rows = y.len();
    let mut r = 0;
    while r + 4 <= rows {
        int_rows_vnni::<4>(int4, q, row_bytes, s, z, ng, cg, acts, r, &mut y[r..r + 4]);
        r += 4;
    }
    while r < rows {
        int_rows_vnni::<1>(int4, q, row_bytes, s, z, ng, cg, acts, r, &mut y[r..r + 1]);
        r += 1;
    }
}
