//! Pruning: which weights to drop, and a compressed 2:4 layout with a kernel that uses it.
//!
//! - [`select`]: the k smallest scores across many tensors at once (a global or per-tensor
//!   magnitude threshold) by radix selection, no sort and no concatenated copy; per-row
//!   selection (Wanda's per-output comparison). Ties are broken by position: among equal
//!   scores the earlier element (tensor order, then index) is pruned first.
//! - [`nm`]: N:M masks along the input dimension (at most N kept in every M consecutive inputs).
//! - [`structured`]: L1 / L2 norms of rows or columns, in groups (neurons, channels, heads),
//!   optionally scaled per input channel (Wanda's `|W| * ||X||`).
//! - [`sparse24`]: 2:4 compressed storage (kept codes + 2-bit indices) with INT8 or INT4
//!   values, and `y = x @ W^T` reading it directly.
//!
//! Masks are `u8` / `bool` with 1 (true) = keep. Scores are ordered by a `u32` key whose
//! unsigned order is the float order (`|x|` when `absolute`); NaN scores are an error.

pub mod nm;
pub mod select;
pub mod sparse24;
pub mod structured;

#[cfg(target_arch = "x86_64")]
mod sparse24_x86;

use crate::error::{Error, Result};

/// The `u32` whose unsigned order is the order of `x` (of `|x|` when `absolute`); `-0.0` and
/// `+0.0` share a key, as they compare equal.
#[inline(always)]
pub fn order_key(x: f32, absolute: bool) -> u32 {
    let b = x.to_bits();
    if absolute {
        return b & 0x7fff_ffff;
    }
    if b == 0x8000_0000 {
        return 0x8000_0000; // -0.0 sorts with +0.0
    }
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The float of a key from [`order_key`] (for `absolute`, the non-negative magnitude).
pub fn key_value(key: u32, absolute: bool) -> f32 {
    if absolute {
        return f32::from_bits(key);
    }
    if key >> 31 == 1 {
        f32::from_bits(key & 0x7fff_ffff)
    } else {
        f32::from_bits(!key)
    }
}

/// A `ValueError` naming the first NaN of `x`, if any.
pub(crate) fn check_no_nan(name: &str, x: &[f32]) -> Result<()> {
    if let Some(i) = x.iter().position(|v| v.is_nan()) {
        return Err(Error::value(format!(
            "{name} contains NaN (at element {i}): scores must be numbers"
        )));
    }
    Ok(())
}

/// Checks an N:M pattern: `1 <= n <= m` and `m` divides `cols`.
pub fn check_nm(n: usize, m: usize, cols: usize) -> Result<()> {
    if m == 0 || n == 0 || n > m {
        return Err(Error::value(format!(
            "N:M sparsity needs 1 <= N <= M, got N = {n}, M = {m}"
        )));
    }
    if !cols.is_multiple_of(m) {
        return Err(Error::value(format!(
            "in_features ({cols}) must be divisible by M = {m} for {n}:{m} sparsity"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_float_order() {
        let xs = [
            f32::NEG_INFINITY,
            -3.5,
            -1.0,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            1.0,
            2.5,
            f32::INFINITY,
        ];
        for w in xs.windows(2) {
            assert!(order_key(w[0], false) <= order_key(w[1], false), "{w:?}");
            assert_eq!(key_value(order_key(w[1], false), false), w[1]);
        }
        assert_eq!(order_key(-0.0, false), order_key(0.0, false));
        assert_eq!(order_key(-2.0, true), order_key(2.0, true));
        assert!(order_key(-3.0, true) > order_key(2.0, true));
        assert_eq!(key_value(order_key(-3.0, true), true), 3.0);
    }

    #[test]
    fn nm_arguments_are_checked() {
        assert!(check_nm(2, 4, 8).is_ok());
        assert!(check_nm(4, 4, 8).is_ok());
        assert!(check_nm(5, 4, 8).is_err());
        assert!(check_nm(0, 4, 8).is_err());
        assert!(check_nm(2, 4, 6).is_err());
        assert!(check_nm(1, 0, 6).is_err());
    }
}
