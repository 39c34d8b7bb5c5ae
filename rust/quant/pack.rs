//! INT4 nibble packing: element `2j` in the low nibble, element `2j + 1` in the high nibble of
//! byte `j`. Rows of even length pack independently, so a row-major matrix packs as one buffer.

use rayon::prelude::*;

use crate::error::{Error, Result};

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

/// Packs codes in `[0, 15]` two per byte; `q.len()` must be even.
pub fn pack_int4(q: &[u8]) -> Result<Vec<u8>> {
    if !q.len().is_multiple_of(2) {
        return Err(Error::value(format!(
            "pack_int4 needs an even number of codes, got {}",
            q.len()
        )));
    }
    let mut out = vec![0u8; q.len() / 2];
    let seen = if q.len() < PARALLEL_MIN_BYTES {
        pack_into(&mut out, q)
    } else {
        crate::parallel::install(|| {
            out.par_chunks_mut(CHUNK_BYTES)
                .zip(q.par_chunks(2 * CHUNK_BYTES))
                .map(|(o, c)| pack_into(o, c))
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
    if packed.len() < PARALLEL_MIN_BYTES {
        unpack_into(&mut out, packed);
    } else {
        crate::parallel::install(|| {
            out.par_chunks_mut(2 * CHUNK_BYTES)
                .zip(packed.par_chunks(CHUNK_BYTES))
                .for_each(|(o, c)| unpack_into(o, c))
        });
    }
    out
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
    fn unpack_matches_the_plain_loop_for_every_byte() {
        let bytes: Vec<u8> = (0..=255u8).chain(0..=255u8).collect();
        let want: Vec<u8> = bytes.iter().flat_map(|&b| [b & 15, b >> 4]).collect();
        assert_eq!(unpack_int4(&bytes), want);
        assert_eq!(unpack_int4(&bytes[..5]), want[..10]);
    }
}
