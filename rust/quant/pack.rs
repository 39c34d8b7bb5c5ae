//! INT4 nibble packing: element `2j` in the low nibble, element `2j + 1` in the high nibble of
//! byte `j`. Rows of even length pack independently, so a row-major matrix packs as one buffer.

use rayon::prelude::*;

use crate::error::{checked_mul, try_zeroed, Error, Result};

/// Buffers below this size are packed on the calling thread (a pool hop costs more).
const PARALLEL_MIN_BYTES: usize = 1 << 20;
const CHUNK_BYTES: usize = 1 << 16;

/// Packs `q` into `out` and returns the OR of all codes (validated by the caller afterwards, so
/// the input is read once).
fn pack_into(out: &mut [u8], q: &[u8]) -> u8 {
    // SWAR: 8 codes (one u64) -> 4 bytes; a byte-pair loop does not vectorise.
    let mut seen = 0u64;
    let mut oc = out.chunks_exact_mut(4);
    let mut qc = q.chunks_exact(8);
    for (o, c) in (&mut oc).zip(&mut qc) {
        let v = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        seen |= v;
        let t = (v | (v >> 4)) & 0x00FF_00FF_00FF_00FF;
        let t = (t | (t >> 8)) & 0x0000_FFFF_0000_FFFF;
        let t = (t | (t >> 16)) as u32;
        o.copy_from_slice(&t.to_le_bytes());
    }
    let mut seen = seen.to_le_bytes().iter().fold(0u8, |a, &b| a | b);
    for (o, pair) in oc
        .into_remainder()
        .iter_mut()
        .zip(qc.remainder().chunks_exact(2))
    {
        seen |= pair[0] | pair[1];
        *o = pair[0] | (pair[1] << 4);
    }
    seen
}

fn unpack_into(out: &mut [u8], p: &[u8]) {
    // SWAR, the inverse of `pack_into`: 4 bytes (one u32) -> 8 codes (one u64).
    let mut oc = out.chunks_exact_mut(8);
    let mut pc = p.chunks_exact(4);
    for (o, c) in (&mut oc).zip(&mut pc) {
        let v = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as u64;
        let v = (v | (v << 16)) & 0x0000_FFFF_0000_FFFF;
        let v = (v | (v << 8)) & 0x00FF_00FF_00FF_00FF;
        let v = (v | (v << 4)) & 0x0F0F_0F0F_0F0F_0F0F;
        o.copy_from_slice(&v.to_le_bytes());
    }
    for (pair, &b) in oc.into_remainder().chunks_exact_mut(2).zip(pc.remainder()) {
        pair[0] = b & 15;
        pair[1] = b >> 4;
    }
}

/// AVX2 copies of the two loops (32 codes per step), chosen at run time.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Packs 32-code blocks with `maddubs` (c0 + 16 c1 per byte pair) and `packus`; returns the
    /// number of codes done and the OR of them.
    #[target_feature(enable = "avx2")]
    pub unsafe fn pack_avx2(out: &mut [u8], q: &[u8]) -> (usize, u8) {
        let blocks = (q.len() / 32).min(out.len() / 16);
        let weights = _mm256_set1_epi16(0x1001); // bytes [1, 16] per 16-bit lane
        let mut seen = _mm256_setzero_si256();
        for i in 0..blocks {
            // SAFETY: i < blocks keeps both accesses in bounds; unaligned loads/stores.
            let v = _mm256_loadu_si256(q.as_ptr().add(32 * i) as *const __m256i);
            seen = _mm256_or_si256(seen, v);
            let pairs = _mm256_maddubs_epi16(v, weights);
            let packed = _mm256_packus_epi16(pairs, pairs);
            // packus works per 128-bit lane: bytes 0-7 and 16-23 hold the result.
            let ordered = _mm256_permute4x64_epi64(packed, 0b1000);
            _mm_storeu_si128(
                out.as_mut_ptr().add(16 * i) as *mut __m128i,
                _mm256_castsi256_si128(ordered),
            );
        }
        let mut bytes = [0u8; 32];
        _mm256_storeu_si256(bytes.as_mut_ptr() as *mut __m256i, seen);
        (32 * blocks, bytes.iter().fold(0, |a, &b| a | b))
    }

    /// Unpacks 16-byte blocks into 32 codes (low nibble first); returns the bytes done.
    #[target_feature(enable = "avx2")]
    pub unsafe fn unpack_avx2(out: &mut [u8], p: &[u8]) -> usize {
        let blocks = (p.len() / 16).min(out.len() / 32);
        let mask = _mm_set1_epi8(0x0F);
        for i in 0..blocks {
            // SAFETY: i < blocks keeps both accesses in bounds; unaligned loads/stores.
            let b = _mm_loadu_si128(p.as_ptr().add(16 * i) as *const __m128i);
            let lo = _mm_and_si128(b, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
            let dst = out.as_mut_ptr().add(32 * i);
            _mm_storeu_si128(dst as *mut __m128i, _mm_unpacklo_epi8(lo, hi));
            _mm_storeu_si128(dst.add(16) as *mut __m128i, _mm_unpackhi_epi8(lo, hi));
        }
        16 * blocks
    }
}

fn pack_fast(out: &mut [u8], q: &[u8]) -> u8 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked above).
        let (done, seen) = unsafe { x86::pack_avx2(out, q) };
        return seen | pack_into(&mut out[done / 2..], &q[done..]);
    }
    pack_into(out, q)
}

fn unpack_fast(out: &mut [u8], p: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked above).
        let done = unsafe { x86::unpack_avx2(out, p) };
        unpack_into(&mut out[2 * done..], &p[done..]);
        return;
    }
    unpack_into(out, p)
}

/// Packs codes in `[0, 15]` two per byte; `q.len()` must be even.
pub fn pack_int4(q: &[u8]) -> Result<Vec<u8>> {
    if !q.len().is_multiple_of(2) {
        return Err(Error::value(format!(
            "pack_int4 needs an even number of codes, got {}",
            q.len()
        )));
    }
    let mut out = try_zeroed::<u8>(q.len() / 2, "the packed INT4 codes")?;
    let seen = if q.len() < PARALLEL_MIN_BYTES {
        pack_fast(&mut out, q)
    } else {
        crate::parallel::install(|| {
            out.par_chunks_mut(CHUNK_BYTES)
                .zip(q.par_chunks(2 * CHUNK_BYTES))
                .map(|(o, c)| pack_fast(o, c))
                .reduce(|| 0, |a, b| a | b)
        })
    };
    if seen > 15 {
        let i = q.iter().position(|&c| c > 15).unwrap_or(0);
        return Err(Error::value(format!(
            "INT4 codes must be in [0, 15], got {} at index {i}",
            q[i]
        )));
    }
    Ok(out)
}

/// Unpacks bytes into two codes each (low nibble first).
pub fn unpack_int4(packed: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; packed.len() * 2];
    unpack_all(&mut out, packed);
    out
}

/// [`unpack_int4`], with a `RuntimeError` instead of an abort when the output cannot be allocated.
pub fn try_unpack_int4(packed: &[u8]) -> Result<Vec<u8>> {
    let n = checked_mul("unpacked INT4 codes", packed.len(), 2)?;
    let mut out = try_zeroed::<u8>(n, "the unpacked INT4 codes")?;
    unpack_all(&mut out, packed);
    Ok(out)
}

fn unpack_all(out: &mut [u8], packed: &[u8]) {
    if packed.len() < PARALLEL_MIN_BYTES {
        unpack_fast(out, packed);
    } else {
        crate::parallel::install(|| {
            out.par_chunks_mut(2 * CHUNK_BYTES)
                .zip(packed.par_chunks(CHUNK_BYTES))
                .for_each(|(o, c)| unpack_fast(o, c))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_nibble_holds_the_even_element() {
        assert_eq!(pack_int4(&[1, 2, 15, 0]).unwrap(), vec![0x21, 0x0F]);
        assert_eq!(unpack_int4(&[0x21, 0x0F]), vec![1, 2, 15, 0]);
    }

    #[test]
    fn round_trip_is_exact_small_and_parallel() {
        for n in [0usize, 2, 6, 34, 3 << 20] {
            let q: Vec<u8> = (0..n).map(|i| ((i * 7 + i / 3) % 16) as u8).collect();
            let p = pack_int4(&q).unwrap();
            assert_eq!(p.len(), n / 2);
            assert_eq!(unpack_int4(&p), q);
        }
    }

    #[test]
    fn rejects_odd_length_and_large_codes() {
        assert!(pack_int4(&[1, 2, 3]).is_err());
        assert!(pack_int4(&[1, 16]).is_err());
        let mut big = vec![3u8; 3 << 20];
        big[2_000_001] = 200;
        let err = pack_int4(&big).unwrap_err().to_string();
        assert!(err.contains("200") && err.contains("2000001"), "{err}");
    }

    #[test]
    fn simd_and_portable_paths_agree() {
        for n in [0usize, 2, 30, 32, 34, 64, 98, 1000] {
            let q: Vec<u8> = (0..n).map(|i| ((i * 11 + i / 7) % 16) as u8).collect();
            let mut fast = vec![0u8; n / 2];
            let mut plain = vec![0u8; n / 2];
            assert_eq!(pack_fast(&mut fast, &q), pack_into(&mut plain, &q));
            assert_eq!(fast, plain);
            let mut back = vec![0u8; n];
            unpack_fast(&mut back, &fast);
            assert_eq!(back, q);
        }
        let mut out = vec![0u8; 16];
        assert_eq!(pack_fast(&mut out, &[16u8; 32]) & 0xF0, 0x10);
    }

    #[test]
    fn unpack_matches_the_plain_loop_for_every_byte() {
        let bytes: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        let want: Vec<u8> = bytes.iter().flat_map(|&b| [b & 15, b >> 4]).collect();
        assert_eq!(unpack_int4(&bytes), want);
        assert_eq!(unpack_int4(&bytes[..5]), want[..10]);
    }
}
