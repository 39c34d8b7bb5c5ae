//! Deterministic clustering: union-find over verified pairs.
//!
//! Union always hangs the larger root under the smaller one, so every root is the smallest index
//! of its set; a document's cluster id is that index, whatever the order of the pairs or the
//! number of threads that produced them.

use super::minhash::check_pairs;
use crate::error::Result;

/// Union-find whose roots are always the smallest member.
pub struct MinRootUnionFind {
    parent: Vec<usize>,
}

impl MinRootUnionFind {
    pub fn new(n: usize) -> Result<Self> {
        let mut parent = super::filled(n, 0usize, "cluster ids")?;
        parent.iter_mut().enumerate().for_each(|(i, p)| *p = i);
        Ok(MinRootUnionFind { parent })
    }

    pub fn find(&mut self, mut x: usize) -> usize {
        while self.parent[x] != x {
            // Path halving keeps trees shallow without recursion.
            self.parent[x] = self.parent[self.parent[x]];
            x = self.parent[x];
        }
        x
    }

    pub fn union(&mut self, a: usize, b: usize) {
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
            self.parent[hi] = lo;
        }
    }
}

/// Cluster id of every document: the smallest index in its connected component.
pub fn connected_components(n: usize, pairs: &[[i64; 2]]) -> Result<Vec<i64>> {
    check_pairs(pairs, n)?;
    let mut uf = MinRootUnionFind::new(n)?;
    for &[i, j] in pairs {
        uf.union(i as usize, j as usize);
    }
    Ok((0..n).map(|i| uf.find(i) as i64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_smallest_members() {
        let ids = connected_components(7, &[[5, 3], [3, 6], [1, 2], [6, 4]]).unwrap();
        assert_eq!(ids, vec![0, 1, 1, 3, 3, 3, 3]);
    }

    #[test]
    fn pair_order_does_not_matter() {
        let mut pairs = vec![[8i64, 9], [0, 9], [2, 3], [3, 4], [7, 5], [5, 1], [4, 6]];
        let want = connected_components(10, &pairs).unwrap();
        pairs.reverse();
        assert_eq!(connected_components(10, &pairs).unwrap(), want);
        for p in &mut pairs {
            p.swap(0, 1);
        }
        assert_eq!(connected_components(10, &pairs).unwrap(), want);
    }

    #[test]
    fn out_of_range_pairs_are_errors() {
        assert!(connected_components(3, &[[0, 3]]).is_err());
        assert!(connected_components(3, &[[-1, 2]]).is_err());
        assert_eq!(connected_components(0, &[]).unwrap(), Vec::<i64>::new());
    }
}
