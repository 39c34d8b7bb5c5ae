//! LSH banding: band hashes, candidate pairs by sorting, and the choice of bands x rows.
//!
//! Band `j` of a signature is its values `j*rows .. (j+1)*rows`; its hash is
//! `xxh3_64_with_seed(little-endian bytes of those u32 values, j)`, with 0 reserved: a real hash
//! of 0 becomes 1, and every band of an empty signature is 0, which never collides.

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::minhash::is_empty_signature;
use crate::error::{Error, Result};

/// Band hash given to every band of an empty signature; candidate search skips it.
pub const EMPTY_BAND: u64 = 0;

/// Default weights of `optimal_bands` (repeated as literals in the Python signature): a missed pair costs 19 times a spurious candidate, which
/// at threshold 0.8 and 128 permutations picks 16 bands x 8 rows (P(candidate | J=0.85) = 0.994).
pub const DEFAULT_FP_WEIGHT: f64 = 0.05;
pub const DEFAULT_FN_WEIGHT: f64 = 0.95;

/// Probability that a pair with Jaccard `s` shares at least one band: `1 - (1 - s^r)^b`.
pub fn candidate_probability(s: f64, bands: usize, rows: usize) -> f64 {
    1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32)
}

pub fn check_banding(bands: usize, rows: usize, num_perm: usize) -> Result<()> {
    if bands == 0 || rows == 0 {
        return Err(Error::value(format!(
            "bands and rows must both be at least 1, got bands = {bands}, rows = {rows}"
        )));
    }
    if bands.saturating_mul(rows) > num_perm {
        return Err(Error::value(format!(
            "bands * rows = {bands} * {rows} = {} exceeds num_perm = {num_perm}",
            bands * rows
        )));
    }
    Ok(())
}

/// Composite Simpson rule with `2 * half` intervals.
fn simpson(f: impl Fn(f64) -> f64, lo: f64, hi: f64, half: usize) -> f64 {
    if hi <= lo {
        return 0.0;
    }
    let n = 2 * half;
    let h = (hi - lo) / n as f64;
    let mut sum = f(lo) + f(hi);
    for i in 1..n {
        sum += f(lo + i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 };
    }
    sum * h / 3.0
}

/// (bands, rows) with bands * rows <= num_perm minimising
/// `fp_weight * int_0^t P(s) ds + fn_weight * int_t^1 (1 - P(s)) ds` (datasketch's criterion).
/// Ties go to the first found (fewest bands, then fewest rows).
pub fn optimal_bands(
    threshold: f64,
    num_perm: usize,
    fp_weight: f64,
    fn_weight: f64,
) -> Result<(usize, usize)> {
    check_threshold(threshold)?;
    if num_perm == 0 {
        return Err(Error::value("num_perm must be at least 1, got 0"));
    }
    for (name, w) in [("fp_weight", fp_weight), ("fn_weight", fn_weight)] {
        if !(w.is_finite() && w >= 0.0) {
            return Err(Error::value(format!(
                "{name} must be finite and >= 0, got {w}"
            )));
        }
    }
    if fp_weight + fn_weight <= 0.0 {
        return Err(Error::value("fp_weight and fn_weight must not both be 0"));
    }
    let mut best = (f64::INFINITY, 1, 1);
    for bands in 1..=num_perm {
        for rows in 1..=num_perm / bands {
            let fp = simpson(
                |s| candidate_probability(s, bands, rows),
                0.0,
                threshold,
                128,
            );
            let fnr = simpson(
                |s| 1.0 - candidate_probability(s, bands, rows),
                threshold,
                1.0,
                128,
            );
            let err = fp_weight * fp + fn_weight * fnr;
            if err < best.0 - 1e-15 {
                best = (err, bands, rows);
            }
        }
    }
    Ok((best.1, best.2))
}

pub fn check_threshold(threshold: f64) -> Result<()> {
    if !(threshold > 0.0 && threshold <= 1.0) {
        return Err(Error::value(format!(
            "threshold must lie in (0, 1], got {threshold}"
        )));
    }
    Ok(())
}

/// Band hashes of row-major `(n, num_perm)` signatures: row-major `(n, bands)`.
pub fn band_hashes(sigs: &[u32], num_perm: usize, bands: usize, rows: usize) -> Result<Vec<u64>> {
    check_banding(bands, rows, num_perm)?;
    if sigs.len() % num_perm != 0 {
        return Err(Error::value(format!(
            "signatures of {} values do not split into rows of num_perm = {num_perm}",
            sigs.len()
        )));
    }
    let n = sigs.len() / num_perm;
    let mut out = vec![0u64; n * bands];
    crate::parallel::install(|| {
        out.par_chunks_mut(bands)
            .zip(sigs.par_chunks(num_perm))
            .with_min_len(256)
            .for_each_init(Vec::new, |bytes: &mut Vec<u8>, (dst, sig)| {
                if is_empty_signature(sig) {
                    dst.fill(EMPTY_BAND);
                    return;
                }
                for (j, d) in dst.iter_mut().enumerate() {
                    bytes.clear();
                    for v in &sig[j * rows..(j + 1) * rows] {
                        bytes.extend_from_slice(&v.to_le_bytes());
                    }
                    let h = xxh3_64_with_seed(bytes, j as u64);
                    *d = if h == EMPTY_BAND { 1 } else { h };
                }
            });
    });
    Ok(out)
}

/// Most pairs one call may produce (16 GiB of packed pairs); more is an error, not an abort.
pub const MAX_PAIRS: u64 = 1 << 31;

/// Pairs contributed by one bucket of equal band hashes (rows ascending): every pair, or for a
/// bucket larger than `max_bucket`, a star from its first row plus a chain through consecutive
/// rows (`2 (g - 1)` pairs, enough to connect it; verification then sees fewer pairs).
fn bucket_pairs(group: &[(u64, u32)], max_bucket: usize, out: &mut Vec<u64>) {
    let pack = |i: u32, k: u32| ((i as u64) << 32) | k as u64;
    if group.len() <= max_bucket {
        for (p, &(_, i)) in group.iter().enumerate() {
            for &(_, k) in &group[p + 1..] {
                out.push(pack(i, k));
            }
        }
    } else {
        let first = group[0].1;
        for w in group.windows(2) {
            out.push(pack(first, w[1].1));
            if w[0].1 != first {
                out.push(pack(w[0].1, w[1].1));
            }
        }
    }
}

fn bucket_pair_count(g: u64, max_bucket: usize) -> u64 {
    if g as usize <= max_bucket {
        g * g.saturating_sub(1) / 2
    } else {
        2 * (g - 1)
    }
}

/// All pairs `(i, j)`, `i < j`, sharing a band hash in some band (empty bands excluded):
/// unique and sorted. `band_hashes` is row-major `(n, bands)`. Buckets of more than
/// `max_bucket` rows contribute a star plus a chain instead of all their pairs (see
/// `bucket_pairs`); with `usize::MAX` every pair is produced. More than `MAX_PAIRS` pairs
/// before de-duplication is an error that suggests `max_bucket`.
pub fn candidate_pairs(
    band_hashes: &[u64],
    bands: usize,
    max_bucket: usize,
) -> Result<Vec<[i64; 2]>> {
    if bands == 0 || band_hashes.len() % bands != 0 {
        return Err(Error::value(format!(
            "band hashes of {} values do not split into rows of {bands} bands",
            band_hashes.len()
        )));
    }
    if max_bucket < 2 {
        return Err(Error::value(format!(
            "max_bucket must be at least 2, got {max_bucket}"
        )));
    }
    let n = band_hashes.len() / bands;
    if n > u32::MAX as usize {
        return Err(Error::value(format!(
            "at most 2^32 - 1 documents per call, got {n}"
        )));
    }
    crate::parallel::install(|| {
        let columns: Vec<Vec<(u64, u32)>> = (0..bands)
            .into_par_iter()
            .map(|j| {
                let mut column: Vec<(u64, u32)> = (0..n)
                    .map(|i| (band_hashes[i * bands + j], i as u32))
                    .filter(|&(h, _)| h != EMPTY_BAND)
                    .collect();
                column.sort_unstable();
                column
            })
            .collect();
        let total: u64 = columns
            .iter()
            .flat_map(|c| c.chunk_by(|x, y| x.0 == y.0))
            .map(|g| bucket_pair_count(g.len() as u64, max_bucket))
            .fold(0u64, u64::saturating_add);
        if total > MAX_PAIRS {
            let largest = columns
                .iter()
                .flat_map(|c| c.chunk_by(|x, y| x.0 == y.0))
                .map(<[_]>::len)
                .max()
                .unwrap_or(0);
            return Err(Error::value(format!(
                "band collisions would produce {total} candidate pairs (more than {MAX_PAIRS}); the \
                 largest bucket has {largest} documents: pass a smaller max_bucket or remove exact \
                 duplicates first"
            )));
        }
        let mut all: Vec<u64> = Vec::new();
        all.try_reserve_exact(total as usize)
            .map_err(|_| Error::value(format!("cannot allocate {total} candidate pairs")))?;
        let per_band: Vec<Vec<u64>> = columns
            .par_iter()
            .map(|column| {
                let mut pairs = Vec::new();
                for group in column.chunk_by(|x, y| x.0 == y.0) {
                    bucket_pairs(group, max_bucket, &mut pairs);
                }
                pairs
            })
            .collect();
        per_band.iter().for_each(|p| all.extend_from_slice(p));
        drop(per_band);
        all.par_sort_unstable();
        all.dedup();
        Ok(all
            .into_iter()
            .map(|p| [(p >> 32) as i64, (p & 0xFFFF_FFFF) as i64])
            .collect())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_weights_pick_16x8() {
        let (b, r) = optimal_bands(0.8, 128, DEFAULT_FP_WEIGHT, DEFAULT_FN_WEIGHT).unwrap();
        assert_eq!((b, r), (16, 8));
        assert!(candidate_probability(0.85, b, r) > 0.99);
        // datasketch's equal weights reproduce its 9 x 13.
        assert_eq!(optimal_bands(0.8, 128, 0.5, 0.5).unwrap(), (9, 13));
    }

    #[test]
    fn banding_is_validated() {
        assert!(check_banding(0, 4, 16).is_err());
        assert!(check_banding(4, 0, 16).is_err());
        assert!(check_banding(5, 4, 16).is_err());
        assert!(check_banding(4, 4, 16).is_ok());
        assert!(optimal_bands(0.0, 128, 0.5, 0.5).is_err());
        assert!(optimal_bands(1.5, 128, 0.5, 0.5).is_err());
        assert!(optimal_bands(0.5, 128, 0.0, 0.0).is_err());
    }

    #[test]
    fn pairs_from_shared_bands() {
        // 4 docs, 2 bands: 0~2 share band 0, 1~2~3 share band 1, doc 3 band 0 empty.
        let bh = [5, 7, 6, 9, 5, 9, 0, 9];
        let pairs = candidate_pairs(&bh, 2, usize::MAX).unwrap();
        assert_eq!(pairs, vec![[0, 2], [1, 2], [1, 3], [2, 3]]);
        let empty = [0u64, 0, 0, 0];
        assert!(candidate_pairs(&empty, 2, usize::MAX).unwrap().is_empty());
        assert!(candidate_pairs(&bh, 2, 1).is_err());
    }

    #[test]
    fn large_buckets_become_star_and_chain() {
        let bh = [7u64; 6];
        let all = candidate_pairs(&bh, 1, usize::MAX).unwrap();
        assert_eq!(all.len(), 15);
        let capped = candidate_pairs(&bh, 1, 5).unwrap();
        assert_eq!(
            capped,
            vec![
                [0, 1],
                [0, 2],
                [0, 3],
                [0, 4],
                [0, 5],
                [1, 2],
                [2, 3],
                [3, 4],
                [4, 5]
            ]
        );
        assert_eq!(candidate_pairs(&bh, 1, 6).unwrap(), all);
    }

    #[test]
    fn empty_signatures_get_empty_bands() {
        let sigs = [u32::MAX; 8]
            .iter()
            .chain([1u32; 8].iter())
            .copied()
            .collect::<Vec<_>>();
        let bh = band_hashes(&sigs, 8, 2, 4).unwrap();
        assert_eq!(&bh[..2], &[EMPTY_BAND, EMPTY_BAND]);
        assert!(bh[2] != EMPTY_BAND && bh[3] != EMPTY_BAND && bh[2] != bh[3]);
    }
}
