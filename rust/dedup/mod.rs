//! Near-duplicate detection: normalisation and shingling, MinHash signatures, LSH banding,
//! candidate verification and clustering.
//!
//! Staged, each step a pure function of its inputs: `shingle` (normalise, tokenise, hash
//! shingles), `minhash` (signatures, estimated Jaccard), `lsh` (band hashes, candidate pairs,
//! bands x rows), `verify` (exact Jaccard of candidates), `cluster` (union-find), and
//! `index_file` (the on-disk LSH index), `jsonl` (batch reading of JSONL document files).

pub mod batch;
pub mod cluster;
pub mod index_file;
pub mod jsonl;
pub mod lsh;
pub mod minhash;
pub mod shingle;
pub mod verify;

pub use cluster::connected_components;
pub use lsh::{band_hashes, candidate_pairs, optimal_bands};
pub use minhash::{estimate_jaccard_pairs, MinHasher, Permutations};
pub use shingle::{exact_hash, Shingler, Tokenizer};
pub use verify::exact_jaccard_pairs;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// A vector of `len` copies of `value`, or an error (not an abort) when memory runs out.
pub(crate) fn filled<T: Clone>(len: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| Error::value(format!("cannot allocate {what} of {len} elements")))?;
    v.resize(len, value);
    Ok(v)
}

/// Exact-duplicate hashes of many documents (hash of the normalised text), in parallel.
pub fn exact_hashes<S: AsRef<str> + Sync>(texts: &[S]) -> Vec<u64> {
    crate::parallel::install(|| {
        texts
            .par_iter()
            .map_init(shingle::Scratch::default, |sc, t| {
                exact_hash(t.as_ref(), sc)
            })
            .collect()
    })
}
