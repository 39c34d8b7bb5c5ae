//! LSH banding: band hashes, candidate pairs by sorting, and the choice of bands x rows.
//!
//! Band `j` of a signature is its values `j*rows .. (j+1)*rows`; its hash is
//! `xxh3_64_with_seed(little-endian bytes of those u32 values, j)`, with 0 reserved: a real hash
//! of 0 becomes 1, and every band of an empty signature is 0, which never collides.

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::minhash::{is_empty_signature, MAX_NUM_PERM};
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
            bands as u128 * rows as u128
        )));
    }
    Ok(())
}

/// Intervals of the Simpson rule `optimal_bands` integrates with.
const SIMPSON_INTERVALS: usize = 256;

/// `optimal_bands_with` asks whether to stop after this many (bands, rows) pairs (about a
/// millisecond of work).
const STOP_CHECK_EVERY: usize = 256;

/// Composite Simpson rule with `2 * half` intervals.
#[cfg(test)]
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

/// The Simpson nodes of `[lo, hi]` raised to the power `rows`, so that the integrand of every
/// `bands` is one `powi` per node. Nodes are computed exactly as the plain rule computes them
/// (`lo`, `lo + i * h`, `hi`), so the integrals are bit-identical to it.
struct PoweredNodes {
    /// `s_i^rows` for the nodes `s_0 = lo .. s_n = hi`; empty when `hi <= lo`.
    x: Vec<f64>,
    h: f64,
}

impl PoweredNodes {
    fn new(lo: f64, hi: f64, rows: usize) -> Self {
        let n = SIMPSON_INTERVALS;
        if hi <= lo {
            return Self {
                x: Vec::new(),
                h: 0.0,
            };
        }
        let h = (hi - lo) / n as f64;
        let r = rows as i32;
        let x = (0..=n)
            .map(|i| match i {
                0 => lo,
                i if i == n => hi,
                i => lo + i as f64 * h,
            })
            .map(|s| s.powi(r))
            .collect();
        Self { x, h }
    }

    /// Simpson integral of `g(1 - (1 - x)^bands)` over the nodes.
    fn integrate(&self, bands: usize, g: impl Fn(f64) -> f64) -> f64 {
        let n = SIMPSON_INTERVALS;
        if self.x.is_empty() {
            return 0.0;
        }
        let b = bands as i32;
        let f = |x: f64| g(1.0 - (1.0 - x).powi(b));
        let mut sum = f(self.x[0]) + f(self.x[n]);
        for (i, &x) in self.x.iter().enumerate().take(n).skip(1) {
            sum += f(x) * if i % 2 == 1 { 4.0 } else { 2.0 };
        }
        sum * self.h / 3.0
    }
}

/// (bands, rows) with bands * rows <= num_perm minimising
/// `fp_weight * int_0^t P(s) ds + fn_weight * int_t^1 (1 - P(s)) ds` (datasketch's criterion).
/// Ties go to the first found (fewest bands, then fewest rows).
///
/// The search is exhaustive: `sum_{b <= k} floor(k / b)` (about `k ln k`) pairs, two Simpson
/// integrals of `SIMPSON_INTERVALS` intervals each, so `num_perm` is capped at
/// `minhash::MAX_NUM_PERM` (8192: about 80,000 pairs, well under a second).
pub fn optimal_bands(
    threshold: f64,
    num_perm: usize,
    fp_weight: f64,
    fn_weight: f64,
) -> Result<(usize, usize)> {
    let found = optimal_bands_with(threshold, num_perm, fp_weight, fn_weight, &mut || false)?;
    Ok(found.expect("never stopped"))
}

/// `optimal_bands`, calling `stop` every `STOP_CHECK_EVERY` pairs of the search (for Ctrl-C);
/// `Ok(None)` when it returned true and the search was abandoned.
pub fn optimal_bands_with(
    threshold: f64,
    num_perm: usize,
    fp_weight: f64,
    fn_weight: f64,
    stop: &mut dyn FnMut() -> bool,
) -> Result<Option<(usize, usize)>> {
    check_threshold(threshold)?;
    if num_perm == 0 {
        return Err(Error::value("num_perm must be at least 1, got 0"));
    }
    if num_perm > MAX_NUM_PERM {
        return Err(Error::value(format!(
            "num_perm must be at most {MAX_NUM_PERM} to choose bands and rows, got {num_perm}"
        )));
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
    // err[offset[b] + r - 1] for b = 1..=k, r = 1..=k/b: filled rows-first (one set of powered
    // nodes per `rows`), then scanned bands-first, as the plain double loop would.
    let k = num_perm;
    let mut offset = vec![0usize; k + 2];
    for b in 1..=k {
        offset[b + 1] = offset[b] + k / b;
    }
    let mut err = vec![0.0f64; offset[k + 1]];
    let mut done = 0usize;
    for rows in 1..=k {
        let below = PoweredNodes::new(0.0, threshold, rows);
        let above = PoweredNodes::new(threshold, 1.0, rows);
        for bands in 1..=k / rows {
            done += 1;
            if done.is_multiple_of(STOP_CHECK_EVERY) && stop() {
                return Ok(None);
            }
            let fp = below.integrate(bands, |p| p);
            let fnr = above.integrate(bands, |p| 1.0 - p);
            err[offset[bands] + rows - 1] = fp_weight * fp + fn_weight * fnr;
        }
    }
    let mut best = (f64::INFINITY, 1, 1);
    for bands in 1..=k {
        for rows in 1..=k / bands {
            let e = err[offset[bands] + rows - 1];
            if e < best.0 - 1e-15 {
                best = (e, bands, rows);
            }
        }
    }
    Ok(Some((best.1, best.2)))
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
    if !sigs.len().is_multiple_of(num_perm) {
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

fn pack(i: u32, k: u32) -> u64 {
    ((i as u64) << 32) | k as u64
}

fn unpack(p: u64) -> [i64; 2] {
    [(p >> 32) as i64, (p & 0xFFFF_FFFF) as i64]
}

/// Pairs contributed by one bucket of equal band hashes (rows ascending): every pair, or for a
/// bucket larger than `max_bucket`, a star from its first row plus a chain through consecutive
/// rows (`2 (g - 1)` pairs, enough to connect it; verification then sees fewer pairs).
fn bucket_pairs(group: &[u32], max_bucket: usize, out: &mut Vec<u64>) {
    if group.len() <= max_bucket {
        for (p, &i) in group.iter().enumerate() {
            for &k in &group[p + 1..] {
                out.push(pack(i, k));
            }
        }
    } else {
        let first = group[0];
        for w in group.windows(2) {
            out.push(pack(first, w[1]));
            if w[0] != first {
                out.push(pack(w[0], w[1]));
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

/// Checks a row-major `(n, bands)` band-hash matrix and `max_bucket`; returns `n`.
fn check_band_matrix(band_hashes: &[u64], bands: usize, max_bucket: usize) -> Result<usize> {
    if bands == 0 || !band_hashes.len().is_multiple_of(bands) {
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
    Ok(n)
}

/// The buckets of a band-hash matrix: every run of two or more rows sharing a band hash, band
/// after band (bands in order, buckets in hash order, rows ascending within a bucket).
/// Singletons are dropped while each band is sorted, so this holds 4 bytes per row that shares
/// a band hash (plus one offset per bucket), not the matrix.
///
/// `next_piece` hands the buckets out in pieces of bounded work: a bucket of at most
/// `max_bucket` rows contributes all its `g (g - 1) / 2` pairs, a larger one its `g` rows, which
/// the caller verifies through leaders (linear in `g`; `slimforge.dedup` and docs/dedup.md).
pub struct Buckets {
    rows: Vec<u32>,
    /// Bucket `b` is `rows[starts[b]..starts[b + 1]]`.
    starts: Vec<usize>,
    max_bucket: usize,
    /// The first bucket not yet handed out.
    next: usize,
}

/// One piece of `Buckets`: the pairs of its small buckets (unique, sorted, `i < j`) and the
/// rows of its large buckets (`members[offsets[b]..offsets[b + 1]]`, each ascending).
#[derive(Debug, Default, PartialEq)]
pub struct Piece {
    pub pairs: Vec<[i64; 2]>,
    pub members: Vec<i64>,
    pub offsets: Vec<i64>,
}

/// Bytes of `(hash, row)` columns `Buckets::new` sorts at once: bands are sorted in parallel
/// (one thread each) in groups that fit, or one at a time with a parallel sort when a single
/// column is larger.
const SORT_BYTES: usize = 64 << 20;

/// The buckets of band `j`: their rows (ascending within each) and their sizes.
fn band_buckets(
    band_hashes: &[u64],
    bands: usize,
    j: usize,
    parallel_sort: bool,
) -> (Vec<u32>, Vec<u32>) {
    let n = band_hashes.len() / bands;
    let mut column: Vec<(u64, u32)> = (0..n)
        .map(|i| (band_hashes[i * bands + j], i as u32))
        .filter(|&(h, _)| h != EMPTY_BAND)
        .collect();
    if parallel_sort {
        column.par_sort_unstable();
    } else {
        column.sort_unstable();
    }
    let (mut rows, mut sizes) = (Vec::new(), Vec::new());
    for group in column.chunk_by(|x, y| x.0 == y.0) {
        if group.len() >= 2 {
            rows.extend(group.iter().map(|&(_, i)| i));
            sizes.push(group.len() as u32);
        }
    }
    (rows, sizes)
}

impl Buckets {
    /// Sorts the bands in groups whose `(hash, row)` columns (16 bytes per row) fit in
    /// `SORT_BYTES`, one band per thread, or one band at a time when a column is larger: the
    /// transient memory is at most `max(SORT_BYTES, 16 n)` bytes, whatever the number of bands.
    pub fn new(band_hashes: &[u64], bands: usize, max_bucket: usize) -> Result<Self> {
        let n = check_band_matrix(band_hashes, bands, max_bucket)?;
        let group = (SORT_BYTES / (16 * n.max(1))).clamp(1, bands);
        let mut rows: Vec<u32> = Vec::new();
        let mut starts = vec![0usize];
        crate::parallel::install(|| {
            for j0 in (0..bands).step_by(group) {
                let parts: Vec<(Vec<u32>, Vec<u32>)> = (j0..(j0 + group).min(bands))
                    .into_par_iter()
                    .map(|j| band_buckets(band_hashes, bands, j, group == 1))
                    .collect();
                for (band_rows, sizes) in parts {
                    for g in sizes {
                        starts.push(starts[starts.len() - 1] + g as usize);
                    }
                    rows.extend_from_slice(&band_rows);
                }
            }
        });
        rows.shrink_to_fit();
        starts.shrink_to_fit();
        Ok(Buckets {
            rows,
            starts,
            max_bucket,
            next: 0,
        })
    }

    /// Number of buckets (two or more rows), handed out or not.
    pub fn len(&self) -> usize {
        self.starts.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every bucket's rows, in order.
    pub fn iter(&self) -> impl Iterator<Item = &[u32]> + '_ {
        self.starts.windows(2).map(|w| &self.rows[w[0]..w[1]])
    }

    /// Rows in at least one bucket: sorted, unique.
    pub fn rows(&self) -> Vec<u32> {
        let mut r = self.rows.clone();
        crate::parallel::install(|| r.par_sort_unstable());
        r.dedup();
        r
    }

    /// Size of the largest bucket (0 without buckets).
    pub fn largest(&self) -> usize {
        self.starts
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }

    /// Work of one bucket of `g` rows: its pairs, or its rows when it is large.
    fn units(&self, g: usize) -> u64 {
        if g <= self.max_bucket {
            (g as u64) * (g as u64 - 1) / 2
        } else {
            g as u64
        }
    }

    /// Work left in the buckets not handed out yet.
    pub fn units_left(&self) -> u64 {
        self.starts[self.next..]
            .windows(2)
            .map(|w| self.units(w[1] - w[0]))
            .fold(0u64, u64::saturating_add)
    }

    /// The next buckets, as many as fit in `max_units` of work (at least one bucket, so a
    /// piece may exceed `max_units` by one bucket's work: at most `max_bucket^2 / 2` pairs or
    /// one large bucket's rows); `None` when every bucket was handed out.
    pub fn next_piece(&mut self, max_units: u64) -> Result<Option<Piece>> {
        let count = self.len();
        if self.next >= count {
            return Ok(None);
        }
        let first = self.next;
        let (mut units, mut pairs, mut members, mut large) = (0u64, 0u64, 0usize, 0usize);
        let mut end = first;
        while end < count {
            let g = self.starts[end + 1] - self.starts[end];
            let u = self.units(g);
            if end > first && units.saturating_add(u) > max_units {
                break;
            }
            units = units.saturating_add(u);
            if g <= self.max_bucket {
                pairs += u;
            } else {
                members += g;
                large += 1;
            }
            end += 1;
        }
        self.next = end;
        let mut packed: Vec<u64> = Vec::new();
        packed
            .try_reserve_exact(pairs as usize)
            .map_err(|_| Error::value(format!("cannot allocate {pairs} candidate pairs")))?;
        let mut piece = Piece {
            pairs: Vec::new(),
            members: Vec::with_capacity(members),
            offsets: Vec::with_capacity(large + 1),
        };
        piece.offsets.push(0);
        for b in first..end {
            let group = &self.rows[self.starts[b]..self.starts[b + 1]];
            if group.len() <= self.max_bucket {
                bucket_pairs(group, self.max_bucket, &mut packed);
            } else {
                piece.members.extend(group.iter().map(|&i| i as i64));
                piece.offsets.push(piece.members.len() as i64);
            }
        }
        crate::parallel::install(|| packed.par_sort_unstable());
        packed.dedup();
        piece.pairs = packed.iter().map(|&p| unpack(p)).collect();
        Ok(Some(piece))
    }
}

/// All pairs `(i, j)`, `i < j`, sharing a band hash in some band (empty bands excluded):
/// unique and sorted. `band_hashes` is row-major `(n, bands)`. Buckets of more than
/// `max_bucket` rows contribute a star plus a chain instead of all their pairs (see
/// `bucket_pairs`); with `usize::MAX` every pair is produced. More than `MAX_PAIRS` pairs
/// before de-duplication is an error that suggests `max_bucket`. The pipeline itself uses
/// `Buckets`, whose large buckets are verified through leaders instead.
pub fn candidate_pairs(
    band_hashes: &[u64],
    bands: usize,
    max_bucket: usize,
) -> Result<Vec<[i64; 2]>> {
    let buckets = Buckets::new(band_hashes, bands, max_bucket)?;
    let total: u64 = buckets
        .iter()
        .map(|g| bucket_pair_count(g.len() as u64, max_bucket))
        .fold(0u64, u64::saturating_add);
    if total > MAX_PAIRS {
        return Err(Error::value(format!(
            "band collisions would produce {total} candidate pairs (more than {MAX_PAIRS}); the \
             largest bucket has {} documents: pass a smaller max_bucket or remove exact \
             duplicates first",
            buckets.largest()
        )));
    }
    let mut all: Vec<u64> = Vec::new();
    all.try_reserve_exact(total as usize)
        .map_err(|_| Error::value(format!("cannot allocate {total} candidate pairs")))?;
    for group in buckets.iter() {
        bucket_pairs(group, max_bucket, &mut all);
    }
    drop(buckets);
    crate::parallel::install(|| all.par_sort_unstable());
    all.dedup();
    Ok(all.into_iter().map(unpack).collect())
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

    /// The search as it was first written: one plain Simpson integral per (bands, rows).
    fn reference_optimal_bands(t: f64, k: usize, fp_w: f64, fn_w: f64) -> (usize, usize) {
        let mut best = (f64::INFINITY, 1, 1);
        for bands in 1..=k {
            for rows in 1..=k / bands {
                let fp = simpson(|s| candidate_probability(s, bands, rows), 0.0, t, 128);
                let fnr = simpson(|s| 1.0 - candidate_probability(s, bands, rows), t, 1.0, 128);
                let err = fp_w * fp + fn_w * fnr;
                if err < best.0 - 1e-15 {
                    best = (err, bands, rows);
                }
            }
        }
        (best.1, best.2)
    }

    #[test]
    fn band_search_matches_the_plain_double_loop() {
        let weights = [
            (DEFAULT_FP_WEIGHT, DEFAULT_FN_WEIGHT),
            (0.5, 0.5),
            (1.0, 0.0),
        ];
        for k in [1, 2, 7, 16, 64, 100, 128, 256] {
            for step in 1..=20 {
                let t = step as f64 / 20.0;
                for (fp_w, fn_w) in weights {
                    assert_eq!(
                        optimal_bands(t, k, fp_w, fn_w).unwrap(),
                        reference_optimal_bands(t, k, fp_w, fn_w),
                        "t = {t}, k = {k}, weights = ({fp_w}, {fn_w})"
                    );
                }
            }
        }
    }

    #[test]
    fn band_search_is_bounded_and_stoppable() {
        let err = optimal_bands(0.8, MAX_NUM_PERM + 1, 0.5, 0.5).unwrap_err();
        assert!(err.to_string().contains("at most 8192"), "{err}");
        assert!(optimal_bands(0.8, usize::MAX, 0.5, 0.5).is_err());
        let mut calls = 0;
        let got = optimal_bands_with(0.8, 1024, 0.5, 0.5, &mut || {
            calls += 1;
            calls == 3
        })
        .unwrap();
        assert_eq!((got, calls), (None, 3));
        let (b, r) = optimal_bands(0.8, MAX_NUM_PERM, 0.05, 0.95).unwrap();
        assert!(b * r <= MAX_NUM_PERM && b > 1 && r > 1);
    }

    #[test]
    fn huge_banding_is_an_error_not_an_overflow() {
        let err = check_banding(usize::MAX, usize::MAX, 128).unwrap_err();
        assert!(err.to_string().contains("exceeds num_perm"), "{err}");
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

    /// Deterministic band hashes in `1..=alphabet`, with about one in eight empty.
    fn random_bands(n: usize, bands: usize, alphabet: u64, seed: u64) -> Vec<u64> {
        let mut s = seed;
        (0..n * bands)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = s >> 33;
                if v.is_multiple_of(8) {
                    EMPTY_BAND
                } else {
                    1 + v % alphabet
                }
            })
            .collect()
    }

    #[test]
    fn pieces_cover_every_pair_within_their_budget() {
        let (n, bands) = (300, 4);
        let bh = random_bands(n, bands, 40, 7);
        let all = candidate_pairs(&bh, bands, usize::MAX).unwrap();
        for max_units in [1u64, 7, 100, u64::MAX] {
            let mut b = Buckets::new(&bh, bands, usize::MAX).unwrap();
            let total = b.units_left();
            let mut seen = Vec::new();
            let mut units = 0;
            while let Some(piece) = b.next_piece(max_units).unwrap() {
                assert!(piece.members.is_empty() && piece.offsets == vec![0]);
                assert!(piece.pairs.windows(2).all(|w| w[0] < w[1]));
                units += piece.pairs.len() as u64;
                seen.extend(piece.pairs);
            }
            assert_eq!(b.units_left(), 0);
            assert!(units >= all.len() as u64 && total >= units);
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, all, "max_units = {max_units}");
        }
    }

    #[test]
    fn pieces_respect_the_budget_but_hold_one_bucket() {
        // Buckets of 3, 4 and 5 rows in one band: 3, 6 and 10 pairs.
        let bh = [1u64, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 3];
        let mut b = Buckets::new(&bh, 1, usize::MAX).unwrap();
        assert_eq!((b.len(), b.largest(), b.units_left()), (3, 5, 19));
        let sizes: Vec<usize> = std::iter::from_fn(|| b.next_piece(9).unwrap())
            .map(|p| p.pairs.len())
            .collect();
        assert_eq!(sizes, vec![9, 10]);
    }

    #[test]
    fn large_buckets_are_handed_out_as_members() {
        // Band 0: rows 0..6 share 7 (large for max_bucket 3), rows 6 and 7 share 8.
        // Band 1: rows 1, 3, 5 share 9 (small), the rest are singletons or empty.
        let bh = [7u64, 0, 7, 9, 7, 0, 7, 9, 7, 4, 7, 9, 8, 5, 8, 6];
        let mut b = Buckets::new(&bh, 2, 3).unwrap();
        assert_eq!(b.rows(), vec![0, 1, 2, 3, 4, 5, 6, 7]);
        let piece = b.next_piece(u64::MAX).unwrap().unwrap();
        assert_eq!(piece.pairs, vec![[1, 3], [1, 5], [3, 5], [6, 7]]);
        assert_eq!(piece.members, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(piece.offsets, vec![0, 6]);
        assert!(b.next_piece(u64::MAX).unwrap().is_none());
        // The linear units of a large bucket: its rows, not its 15 pairs.
        assert_eq!(Buckets::new(&bh, 2, 3).unwrap().units_left(), 6 + 1 + 3);
        assert!(Buckets::new(&bh, 2, 1).is_err());
        assert!(Buckets::new(&bh[..3], 2, 3).is_err());
    }
}
