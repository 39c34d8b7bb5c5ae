//! INT8/INT4 weight quantization: affine quantize/dequantize, nibble packing, fused
//! dequantize-and-multiply kernels for decode-sized batches.
//!
//! Layout contract (shared with the Python package): a weight `(out, in)` has unsigned codes
//! `q` in `[0, 2^bits - 1]`, per-group `scales` and integer-valued `zeros` (both `f32`,
//! `(out, in / group_size)`), and `w ~= (q - zero) * scale`. INT4 codes are packed two per byte
//! along `in`: element `2j` in the low nibble and `2j + 1` in the high nibble of byte `j`.

pub mod affine;
pub mod gemv;
pub mod gptq;
pub mod pack;

mod gemv_x86;

use crate::error::{Error, Result};

/// Largest code for `bits` (15 or 255); only 4 and 8 bits are supported.
pub fn qmax(bits: u32) -> Result<u32> {
    match bits {
        4 => Ok(15),
        8 => Ok(255),
        _ => Err(Error::value(format!("bits must be 4 or 8, got {bits}"))),
    }
}

/// Checks that `group_size` is positive and divides `cols`; returns the number of groups per row.
pub fn groups_per_row(cols: usize, group_size: usize) -> Result<usize> {
    if group_size == 0 {
        return Err(Error::value("group_size must be positive"));
    }
    if !cols.is_multiple_of(group_size) {
        return Err(Error::value(format!(
            "in_features ({cols}) must be divisible by group_size ({group_size})"
        )));
    }
    Ok(cols / group_size)
}

/// Checks that a buffer holds `rows * cols` elements.
pub(crate) fn check_len(name: &str, len: usize, rows: usize, cols: usize) -> Result<()> {
    // Checked: `rows * cols` of caller-given sizes could wrap onto `len` (a (0, 2^32) weight with
    // a (0, 0) hinv used to pass as 2^64 = 0 and then index hinv out of bounds).
    let want = crate::error::checked_mul(&format!("{name} size"), rows, cols)?;
    if len != want {
        return Err(Error::value(format!(
            "{name} has {len} elements, expected {rows} x {cols} = {want}"
        )));
    }
    Ok(())
}

/// Finite and integer-valued (a cast, not `fract`, which is a libm call on baseline x86-64).
fn is_integer(z: f32) -> bool {
    z.is_finite() && z.abs() < 2.0e9 && (z as i64) as f32 == z
}

/// Checks per-group parameters: finite positive scales and finite integer-valued zeros.
pub(crate) fn check_params(
    scales: &[f32],
    zeros: &[f32],
    rows: usize,
    ngroups: usize,
) -> Result<()> {
    check_len("scales", scales.len(), rows, ngroups)?;
    check_len("zeros", zeros.len(), rows, ngroups)?;
    if let Some(i) = scales.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(Error::value(format!(
            "scales must be finite and positive, got {} at row {}, group {}",
            scales[i],
            i / ngroups.max(1),
            i % ngroups.max(1)
        )));
    }
    if let Some(i) = zeros.iter().position(|&z| !is_integer(z)) {
        return Err(Error::value(format!(
            "zeros must be finite integer values, got {} at row {}, group {}",
            zeros[i],
            i / ngroups.max(1),
            i % ngroups.max(1)
        )));
    }
    Ok(())
}
