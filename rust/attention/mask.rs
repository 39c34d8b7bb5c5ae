//! Masks as tile classes: a (query tile, key tile) pair is skipped, computed without a mask, or
//! computed with a per-element mask, so masked-out tiles cost nothing.

/// How a tile of scores is treated by the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileClass {
    /// Every element is masked: the tile is not computed.
    Skip,
    /// No element is masked.
    Full,
    /// Some elements are masked: the per-element rule [`MaskSpec::visible`] applies.
    Partial,
}

/// The mask of one sequence: a sliding window around the bottom-right-aligned diagonal (causal is
/// `right = 0`), plus Longformer-style global tokens.
///
/// Query `i` sees key `j` when `i + nk - nq - left <= j <= i + nk - nq + right` (a negative bound
/// is unbounded), or when `i < num_global` or `j < num_global`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskSpec {
    pub window_left: i64,
    pub window_right: i64,
    pub num_global: usize,
    /// `nk - nq` of the sequence: the offset of the diagonal.
    pub diag_offset: i64,
}

impl MaskSpec {
    /// The mask of a sequence with `nq` queries and `nk` keys.
    ///
    /// Window bounds are clamped to the sequence first (`left` to `nk`, `right` to `nq`: a left
    /// bound of `nk - 1` or more already reaches key 0 from every query, a right bound of `nq - 1`
    /// or more already reaches the last key), so the mask is the same and no later `i + offset
    /// -/+ bound` can overflow, whatever bound the caller passed (`i64::MAX` included). Lengths
    /// must be at most `i64::MAX / 4` (the attention shapes allow at most `i32::MAX`).
    pub fn new(
        window_left: i64,
        window_right: i64,
        num_global: usize,
        nq: usize,
        nk: usize,
    ) -> Self {
        let (nq, nk) = (nq as i64, nk as i64);
        let clamp = |w: i64, n: i64| if w < 0 { -1 } else { w.min(n) };
        MaskSpec {
            window_left: clamp(window_left, nk),
            window_right: clamp(window_right, nq),
            num_global,
            diag_offset: nk - nq,
        }
    }

    /// True when the mask hides nothing (no window bound, no global tokens needed).
    pub fn is_dense(&self) -> bool {
        self.window_left < 0 && self.window_right < 0
    }

    /// Whether query `i` sees key `j` (both indices inside their sequence).
    #[inline(always)]
    pub fn visible(&self, i: usize, j: usize) -> bool {
        let g = self.num_global;
        if i < g || j < g {
            return true;
        }
        let (i, j) = (i as i64, j as i64);
        let centre = i + self.diag_offset;
        (self.window_left < 0 || j >= centre - self.window_left)
            && (self.window_right < 0 || j <= centre + self.window_right)
    }

    /// Class of the tile of queries `[i0, i1)` x keys `[j0, j1)` (both non-empty).
    /// The positions of `0..len` that one query row (`other = i`, `by_query = true`) or one key
    /// column (`other = j`) sees, outside the global tokens: a contiguous range `lo..hi`.
    /// [`MaskSpec::mask_outside`] applies it with the global rows and columns kept.
    #[inline(always)]
    fn band(&self, other: usize, by_query: bool, start: usize, len: usize) -> (usize, usize) {
        let (o, off) = (other as i64, self.diag_offset);
        // Query i sees keys i + off - left ..= i + off + right; key j is seen by queries
        // j - off - right ..= j - off + left (an unset side is unbounded).
        let (lo, hi) = if by_query {
            (
                (self.window_left >= 0).then(|| o + off - self.window_left),
                (self.window_right >= 0).then(|| o + off + self.window_right),
            )
        } else {
            (
                (self.window_right >= 0).then(|| o - off - self.window_right),
                (self.window_left >= 0).then(|| o - off + self.window_left),
            )
        };
        let clip = |x: i64| (x - start as i64).clamp(0, len as i64) as usize;
        let lo = lo.map_or(0, clip);
        let hi = hi.map_or(len, |h| clip(h + 1));
        (lo, hi.max(lo))
    }

    /// Sets `fill` on the entries of a partial tile's row (query `i` over keys `start..`, or with
    /// `by_query = false` key `j` over queries `start..`) that the mask hides: the same rule as
    /// [`MaskSpec::visible`], as two contiguous fills instead of a test per element.
    #[inline(always)]
    pub fn mask_outside<T: Copy>(
        &self,
        other: usize,
        by_query: bool,
        start: usize,
        row: &mut [T],
        fill: T,
    ) {
        let g = self.num_global;
        if other < g {
            return; // a global token sees and is seen by everything
        }
        let len = row.len();
        let (lo, hi) = self.band(other, by_query, start, len);
        // Positions below the global count stay visible.
        let keep = g.saturating_sub(start).min(len);
        if keep < lo {
            row[keep..lo].fill(fill);
        }
        let from = hi.max(keep);
        if from < len {
            row[from..].fill(fill);
        }
    }

    pub fn classify(&self, i0: usize, i1: usize, j0: usize, j1: usize) -> TileClass {
        debug_assert!(i0 < i1 && j0 < j1);
        let g = self.num_global;
        if i1 <= g || j1 <= g {
            return TileClass::Full;
        }
        let (first_i, last_i) = (i0 as i64, i1 as i64 - 1);
        let (first_j, last_j) = (j0 as i64, j1 as i64 - 1);
        let off = self.diag_offset;
        let (left, right) = (self.window_left, self.window_right);
        let band_full = (left < 0 || first_j >= last_i + off - left)
            && (right < 0 || last_j <= first_i + off + right);
        if band_full {
            return TileClass::Full;
        }
        let band_empty = (left >= 0 && last_j < first_i + off - left)
            || (right >= 0 && first_j > last_i + off + right);
        if band_empty && i0 >= g && j0 >= g {
            TileClass::Skip
        } else {
            TileClass::Partial
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_exhaustively(spec: MaskSpec, nq: usize, nk: usize, tq: usize, tk: usize) {
        for i0 in (0..nq).step_by(tq) {
            let i1 = (i0 + tq).min(nq);
            for j0 in (0..nk).step_by(tk) {
                let j1 = (j0 + tk).min(nk);
                let mut any = false;
                let mut all = true;
                for i in i0..i1 {
                    for j in j0..j1 {
                        let v = spec.visible(i, j);
                        any |= v;
                        all &= v;
                    }
                }
                match spec.classify(i0, i1, j0, j1) {
                    TileClass::Skip => assert!(!any, "{spec:?} tile {i0} {j0} skipped but visible"),
                    TileClass::Full => assert!(all, "{spec:?} tile {i0} {j0} full but masked"),
                    TileClass::Partial => {}
                }
            }
        }
    }

    #[test]
    fn mask_outside_agrees_with_the_element_rule() {
        for &(nq, nk) in &[(37, 37), (20, 50), (50, 20), (1, 9), (64, 64)] {
            for &(l, r) in &[(-1, -1), (-1, 0), (3, 0), (5, 2), (0, 0), (-1, 4), (7, -1)] {
                for g in [0usize, 1, 5] {
                    let spec = MaskSpec::new(l, r, g, nq, nk);
                    for start in [0usize, 3, 16] {
                        for i in 0..nq {
                            let mut row = vec![true; nk.saturating_sub(start)];
                            spec.mask_outside(i, true, start, &mut row, false);
                            for (c, &v) in row.iter().enumerate() {
                                assert_eq!(
                                    v,
                                    spec.visible(i, start + c),
                                    "{spec:?} i={i} j={}",
                                    start + c
                                );
                            }
                        }
                        for j in 0..nk {
                            let mut col = vec![true; nq.saturating_sub(start)];
                            spec.mask_outside(j, false, start, &mut col, false);
                            for (r, &v) in col.iter().enumerate() {
                                assert_eq!(
                                    v,
                                    spec.visible(start + r, j),
                                    "{spec:?} i={} j={j}",
                                    start + r
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn classes_agree_with_the_element_rule() {
        for &(nq, nk) in &[(37, 37), (20, 50), (50, 20), (1, 9), (64, 64)] {
            for &(l, r) in &[(-1, -1), (-1, 0), (3, 0), (5, 2), (0, 0), (-1, 4), (7, -1)] {
                for g in [0usize, 1, 5] {
                    let spec = MaskSpec::new(l, r, g, nq, nk);
                    for &(tq, tk) in &[(4, 4), (8, 3), (16, 16), (5, 7)] {
                        check_exhaustively(spec, nq, nk, tq, tk);
                    }
                }
            }
        }
    }

    #[test]
    fn huge_windows_are_clamped_to_the_sequence() {
        // i64::MAX used to overflow `i + offset - left` (wrong masks in release builds).
        for &(nq, nk) in &[(37usize, 37usize), (20, 50), (50, 20), (1, 9), (9, 1)] {
            for &(l, r) in &[
                (i64::MAX, 0),
                (i64::MAX, i64::MAX),
                (-1, i64::MAX),
                (i64::MAX, -1),
            ] {
                let huge = MaskSpec::new(l, r, 0, nq, nk);
                // A bound past the sequence is no bound.
                let unbounded = |w: i64| if w == i64::MAX { -1 } else { w };
                let plain = MaskSpec::new(unbounded(l), unbounded(r), 0, nq, nk);
                for i in 0..nq {
                    for j in 0..nk {
                        assert_eq!(huge.visible(i, j), plain.visible(i, j), "{l} {r} {i} {j}");
                    }
                    let mut a = vec![true; nk];
                    let mut b = vec![true; nk];
                    huge.mask_outside(i, true, 0, &mut a, false);
                    plain.mask_outside(i, true, 0, &mut b, false);
                    assert_eq!(a, b);
                }
                check_exhaustively(huge, nq, nk, 4, 4);
                assert_eq!(huge.classify(0, nq, 0, nk), plain.classify(0, nq, 0, nk));
            }
        }
    }

    #[test]
    fn causal_is_bottom_right_aligned() {
        let spec = MaskSpec::new(-1, 0, 0, 2, 5);
        assert!(spec.visible(0, 3) && !spec.visible(0, 4) && spec.visible(1, 4));
        let spec = MaskSpec::new(-1, 0, 0, 5, 2);
        assert!(!spec.visible(2, 0) && spec.visible(3, 0) && !spec.visible(3, 1));
    }

    #[test]
    fn causal_tiles_are_skipped_above_the_diagonal() {
        let spec = MaskSpec::new(-1, 0, 0, 256, 256);
        assert_eq!(spec.classify(0, 64, 64, 128), TileClass::Skip);
        assert_eq!(spec.classify(64, 128, 0, 64), TileClass::Full);
        assert_eq!(spec.classify(64, 128, 64, 128), TileClass::Partial);
    }
}
