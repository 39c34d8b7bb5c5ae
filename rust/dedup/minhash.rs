//! MinHash signatures with the "affine32 on a mixed 64-bit hash" permutation family.
//!
//! For shingle hash `h` (64-bit, already mixed by `fmix64`), `x = h mod 2^32` (its low 32 bits)
//! and permutation `k` is `pi_k(x) = (a_k * x + b_k) mod 2^32`, a bijection of u32 because `a_k`
//! is odd. `(a_k, b_k)` come from splitmix64 started at `seed`: outputs `2k` and `2k + 1`, low 32
//! bits, `a_k` with its low bit set. `sig[k] = min over shingles of pi_k(x)`; a document without
//! shingles has the *empty signature*, every value `u32::MAX`, which never counts as similar to
//! anything. Plain wrapping u32 arithmetic: identical on every platform and instruction set.

use rayon::prelude::*;

use super::shingle::{splitmix64, Scratch, Shingler};
use crate::error::{Error, Result};

/// Permutation block widths: accumulators, multipliers and offsets of one block stay in
/// registers (3 x 4 vectors) while the shingle hashes stream past.
const BLOCK_AVX512: usize = 64;
const BLOCK_AVX2: usize = 32;
const BLOCK_PORTABLE: usize = 16;
/// Parameter arrays are padded to a multiple of the widest block.
const PAD: usize = BLOCK_AVX512;

/// Most permutations a signature may have: 32 KiB per signature, and the largest `num_perm`
/// `lsh::optimal_bands` searches (its work grows as `num_perm * ln(num_perm)`).
pub const MAX_NUM_PERM: usize = 8192;

/// The `num_perm` affine permutations derived from a seed.
#[derive(Debug, Clone)]
pub struct Permutations {
    num_perm: usize,
    a: Vec<u32>,
    b: Vec<u32>,
}

impl Permutations {
    pub fn new(num_perm: usize, seed: u64) -> Result<Self> {
        if num_perm == 0 {
            return Err(Error::value("num_perm must be at least 1, got 0"));
        }
        if num_perm > MAX_NUM_PERM {
            return Err(Error::value(format!(
                "num_perm must be at most {MAX_NUM_PERM}, got {num_perm}"
            )));
        }
        let padded = num_perm
            .checked_next_multiple_of(PAD)
            .ok_or_else(|| Error::value(format!("num_perm = {num_perm} is too large")))?;
        let mut a = super::filled(padded, 1u32, "permutation multipliers")?;
        let mut b = super::filled(padded, 0u32, "permutation offsets")?;
        let mut state = seed;
        for k in 0..num_perm {
            a[k] = (splitmix64(&mut state) as u32) | 1;
            b[k] = splitmix64(&mut state) as u32;
        }
        Ok(Permutations { num_perm, a, b })
    }

    pub fn num_perm(&self) -> usize {
        self.num_perm
    }

    /// `(a_k, b_k)` for k < num_perm.
    pub fn params(&self) -> (&[u32], &[u32]) {
        (&self.a[..self.num_perm], &self.b[..self.num_perm])
    }

    /// Minimum of every permutation over `xs`, into `out` (length `num_perm`).
    pub fn apply(&self, xs: &[u32], out: &mut [u32], padded_out: &mut Vec<u32>) {
        padded_out.clear();
        padded_out.resize(self.a.len(), u32::MAX);
        min_affine_dispatch(xs, &self.a, &self.b, padded_out);
        out.copy_from_slice(&padded_out[..self.num_perm]);
    }
}

#[inline(always)]
fn min_affine_block<const B: usize>(xs: &[u32], a: &[u32], b: &[u32], out: &mut [u32]) {
    let a: &[u32; B] = a.try_into().expect("block of multipliers");
    let b: &[u32; B] = b.try_into().expect("block of offsets");
    let mut acc = [u32::MAX; B];
    for &x in xs {
        for j in 0..B {
            acc[j] = acc[j].min(a[j].wrapping_mul(x).wrapping_add(b[j]));
        }
    }
    out.copy_from_slice(&acc);
}

/// The one body every instruction-set copy is compiled from.
#[inline(always)]
fn min_affine<const B: usize>(xs: &[u32], a: &[u32], b: &[u32], out: &mut [u32]) {
    for ((a, b), o) in a
        .chunks_exact(B)
        .zip(b.chunks_exact(B))
        .zip(out.chunks_exact_mut(B))
    {
        min_affine_block::<B>(xs, a, b, o);
    }
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx512f")]
unsafe fn min_affine_avx512(xs: &[u32], a: &[u32], b: &[u32], out: &mut [u32]) {
    min_affine::<BLOCK_AVX512>(xs, a, b, out)
}

#[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
#[target_feature(enable = "avx2")]
unsafe fn min_affine_avx2(xs: &[u32], a: &[u32], b: &[u32], out: &mut [u32]) {
    min_affine::<BLOCK_AVX2>(xs, a, b, out)
}

fn min_affine_portable(xs: &[u32], a: &[u32], b: &[u32], out: &mut [u32]) {
    min_affine::<BLOCK_PORTABLE>(xs, a, b, out)
}

/// Which copy of the permutation kernel this CPU runs.
pub fn kernel_name() -> &'static str {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
    }
    "portable"
}

fn min_affine_dispatch(xs: &[u32], a: &[u32], b: &[u32], out: &mut [u32]) {
    debug_assert!(a.len().is_multiple_of(PAD) && a.len() == b.len() && a.len() == out.len());
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { min_affine_avx512(xs, a, b, out) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { min_affine_avx2(xs, a, b, out) };
        }
    }
    min_affine_portable(xs, a, b, out)
}

/// Plain one-permutation-at-a-time reference of the same scheme (tests and documentation).
pub fn min_affine_reference(xs: &[u32], a: &[u32], b: &[u32]) -> Vec<u32> {
    a.iter()
        .zip(b)
        .map(|(&a, &b)| {
            xs.iter()
                .map(|&x| a.wrapping_mul(x).wrapping_add(b))
                .min()
                .unwrap_or(u32::MAX)
        })
        .collect()
}

/// Signature engine: a shingler plus the permutations.
#[derive(Debug, Clone)]
pub struct MinHasher {
    shingler: Shingler,
    perms: Permutations,
}

#[derive(Default)]
struct SigScratch {
    shingle: Scratch,
    xs: Vec<u32>,
    padded: Vec<u32>,
}

impl MinHasher {
    pub fn new(shingler: Shingler, perms: Permutations) -> Self {
        MinHasher { shingler, perms }
    }

    pub fn num_perm(&self) -> usize {
        self.perms.num_perm()
    }

    fn signature_into(&self, text: &str, scratch: &mut SigScratch, out: &mut [u32]) {
        self.shingler
            .shingle_hashes_low32(text, &mut scratch.shingle, &mut scratch.xs);
        if scratch.xs.is_empty() {
            out.fill(u32::MAX);
            return;
        }
        self.perms.apply(&scratch.xs, out, &mut scratch.padded);
    }

    /// Signature of one document.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        let mut out = vec![0u32; self.num_perm()];
        self.signature_into(text, &mut SigScratch::default(), &mut out);
        out
    }

    /// Signatures of many documents, row-major `(n, num_perm)`, in parallel over documents.
    pub fn signatures<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<u32>> {
        let k = self.num_perm();
        let len = texts
            .len()
            .checked_mul(k)
            .ok_or_else(|| Error::value("too many signature values"))?;
        let mut out = super::filled(len, 0u32, "signatures")?;
        crate::parallel::install(|| {
            out.par_chunks_mut(k)
                .zip(texts.par_iter())
                .for_each_init(SigScratch::default, |scratch, (row, text)| {
                    self.signature_into(text.as_ref(), scratch, row)
                });
        });
        Ok(out)
    }
}

/// Whether `sig` is the signature of a document without shingles.
#[inline]
pub fn is_empty_signature(sig: &[u32]) -> bool {
    sig.iter().all(|&v| v == u32::MAX)
}

/// Fraction of equal positions; 0.0 when either signature is empty.
#[inline]
pub fn estimate_jaccard(a: &[u32], b: &[u32]) -> f64 {
    if a.is_empty() || is_empty_signature(a) || is_empty_signature(b) {
        return 0.0;
    }
    let equal = a.iter().zip(b).filter(|(x, y)| x == y).count();
    equal as f64 / a.len() as f64
}

/// Checks that every pair indexes one of `n` rows.
pub fn check_pairs(pairs: &[[i64; 2]], n: usize) -> Result<()> {
    for (p, &[i, j]) in pairs.iter().enumerate() {
        if i < 0 || j < 0 || i as u64 >= n as u64 || j as u64 >= n as u64 {
            return Err(Error::value(format!(
                "pair {p} is ({i}, {j}) but indices must lie in [0, {n})"
            )));
        }
    }
    Ok(())
}

/// Estimated Jaccard of each pair of rows of `sigs` (`(n, num_perm)` row-major).
pub fn estimate_jaccard_pairs(
    sigs: &[u32],
    num_perm: usize,
    pairs: &[[i64; 2]],
) -> Result<Vec<f64>> {
    if num_perm == 0 || !sigs.len().is_multiple_of(num_perm) {
        return Err(Error::value(format!(
            "signatures of {} values do not split into rows of num_perm = {num_perm}",
            sigs.len()
        )));
    }
    check_pairs(pairs, sigs.len() / num_perm)?;
    let row = |i: i64| &sigs[i as usize * num_perm..(i as usize + 1) * num_perm];
    Ok(crate::parallel::install(|| {
        pairs
            .par_iter()
            .map(|&[i, j]| estimate_jaccard(row(i), row(j)))
            .collect()
    }))
}

#[cfg(test)]
mod tests {
    use super::super::shingle::Tokenizer;
    use super::*;

    fn hasher(k: usize, seed: u64) -> MinHasher {
        MinHasher::new(
            Shingler::new(3, Tokenizer::Word, seed).unwrap(),
            Permutations::new(k, seed).unwrap(),
        )
    }

    #[test]
    fn kernels_match_reference() {
        let mut state = 3;
        let xs: Vec<u32> = (0..1000).map(|_| splitmix64(&mut state) as u32).collect();
        for k in [1, 5, 16, 64, 100, 128, 200] {
            let p = Permutations::new(k, 42).unwrap();
            let (a, b) = p.params();
            let want = min_affine_reference(&xs, a, b);
            let mut got = vec![0; k];
            p.apply(&xs, &mut got, &mut Vec::new());
            assert_eq!(got, want, "k = {k}");
            let mut out = vec![u32::MAX; p.a.len()];
            min_affine_portable(&xs, &p.a, &p.b, &mut out);
            assert_eq!(&out[..k], &want[..]);
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            {
                if std::is_x86_feature_detected!("avx2") {
                    out.fill(0);
                    // SAFETY: AVX2 is present (checked just above).
                    unsafe { min_affine_avx2(&xs, &p.a, &p.b, &mut out) };
                    assert_eq!(&out[..k], &want[..]);
                }
                if std::is_x86_feature_detected!("avx512f") {
                    out.fill(0);
                    // SAFETY: AVX-512F is present (checked just above).
                    unsafe { min_affine_avx512(&xs, &p.a, &p.b, &mut out) };
                    assert_eq!(&out[..k], &want[..]);
                }
            }
        }
    }

    #[test]
    fn permutation_params_follow_splitmix64() {
        let p = Permutations::new(3, 9).unwrap();
        let mut s = 9u64;
        let (a, b) = p.params();
        for k in 0..3 {
            assert_eq!(a[k], (splitmix64(&mut s) as u32) | 1);
            assert_eq!(b[k], splitmix64(&mut s) as u32);
        }
        assert!(Permutations::new(0, 1).is_err());
        assert!(Permutations::new(MAX_NUM_PERM, 1).is_ok());
        assert!(Permutations::new(MAX_NUM_PERM + 1, 1).is_err());
        assert!(Permutations::new(usize::MAX, 1).is_err());
    }

    #[test]
    fn identical_and_similar_documents() {
        let h = hasher(128, 1);
        let text = "the quick brown fox jumps over the lazy dog again and again";
        assert_eq!(
            estimate_jaccard(&h.signature(text), &h.signature(text)),
            1.0
        );
        let other = "completely different words appear in this other sentence here";
        assert!(estimate_jaccard(&h.signature(text), &h.signature(other)) < 0.1);
    }

    #[test]
    fn empty_documents_are_never_similar() {
        let h = hasher(16, 1);
        let e = h.signature("");
        assert!(is_empty_signature(&e));
        assert_eq!(estimate_jaccard(&e, &e), 0.0);
    }

    #[test]
    fn batch_equals_single() {
        let h = hasher(32, 5);
        let texts = ["a b c d", "", "x", "a b c d e f g", "ünïcödé wörds here"];
        let batch = h.signatures(&texts).unwrap();
        for (i, t) in texts.iter().enumerate() {
            assert_eq!(&batch[i * 32..(i + 1) * 32], &h.signature(t)[..]);
        }
    }

    #[test]
    fn pairs_are_checked() {
        let sigs = vec![1u32; 8];
        assert!(estimate_jaccard_pairs(&sigs, 4, &[[0, 2]]).is_err());
        assert!(estimate_jaccard_pairs(&sigs, 3, &[[0, 1]]).is_err());
        assert_eq!(
            estimate_jaccard_pairs(&sigs, 4, &[[0, 1]]).unwrap(),
            vec![1.0]
        );
    }
}
