//! Exact Jaccard of shingle sets, computed only for the documents that appear in candidate pairs.

use rayon::prelude::*;

use super::minhash::check_pairs;
use super::shingle::{Scratch, Shingler};
use crate::error::Result;

/// |A ∩ B| / |A ∪ B| of two sorted, de-duplicated sets; 0.0 when both are empty.
pub fn jaccard_sorted(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - common;
    if union == 0 {
        0.0
    } else {
        common as f64 / union as f64
    }
}

/// Exact Jaccard of the 64-bit shingle-hash sets of each pair of `texts`.
pub fn exact_jaccard_pairs<S: AsRef<str> + Sync>(
    texts: &[S],
    pairs: &[[i64; 2]],
    shingler: &Shingler,
) -> Result<Vec<f64>> {
    check_pairs(pairs, texts.len())?;
    let mut docs: Vec<usize> = pairs
        .iter()
        .flat_map(|&[i, j]| [i as usize, j as usize])
        .collect();
    docs.sort_unstable();
    docs.dedup();
    Ok(crate::parallel::install(|| {
        let sets: Vec<Vec<u64>> = docs
            .par_iter()
            .map_init(Scratch::default, |sc, &d| {
                shingler.shingle_set(texts[d].as_ref(), sc)
            })
            .collect();
        let slot = |d: i64| {
            docs.binary_search(&(d as usize))
                .expect("document of a pair")
        };
        pairs
            .par_iter()
            .map(|&[i, j]| jaccard_sorted(&sets[slot(i)], &sets[slot(j)]))
            .collect()
    }))
}

#[cfg(test)]
mod tests {
    use super::super::shingle::Tokenizer;
    use super::*;

    #[test]
    fn jaccard_of_sets() {
        assert_eq!(jaccard_sorted(&[1, 2, 3], &[2, 3, 4]), 0.5);
        assert_eq!(jaccard_sorted(&[], &[]), 0.0);
        assert_eq!(jaccard_sorted(&[1], &[]), 0.0);
    }

    #[test]
    fn pairs_of_texts() {
        let s = Shingler::new(1, Tokenizer::Word, 0).unwrap();
        let texts = ["a b c", "b c d", "", "A, B; C"];
        let j = exact_jaccard_pairs(&texts, &[[0, 1], [0, 3], [2, 2], [1, 3]], &s).unwrap();
        assert_eq!(j, vec![0.5, 1.0, 0.0, 0.5]);
        assert!(exact_jaccard_pairs(&texts, &[[0, 4]], &s).is_err());
    }
}
