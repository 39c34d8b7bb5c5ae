//! Launchers for the MoE gather/combine kernels (kernels/moe.cu).

use std::ffi::c_void;

use super::device::{self, Launch};
use super::kernels;
use super::{guarded, ElemType};
use crate::error::{Error, Result};

/// `xs[i] = x[token_of[i]]`: x `(rows_x, dim)`, token_of `(rows_out,)` int32/int64, xs `(rows_out, dim)`,
/// all contiguous device memory owned by the caller. Out-of-range indices give zero rows.
#[derive(Debug, Clone, Copy, Default)]
pub struct PermuteCall {
    pub device: usize,
    pub stream: u64,
    pub index_bits: u32,
    pub rows_out: usize,
    pub rows_x: usize,
    pub dim: usize,
    pub x: u64,
    pub token_of: u64,
    pub xs: u64,
}

/// `y[t] = sum_s weights[t, s] * ys[pos[t, s]]`: ys `(rows_ys, dim)`, pos `(tokens, top_k)` int32/int64,
/// weights `(tokens, top_k)` float32, y `(tokens, dim)`. Out-of-range positions are skipped.
#[derive(Debug, Clone, Copy, Default)]
pub struct CombineCall {
    pub device: usize,
    pub stream: u64,
    pub index_bits: u32,
    pub tokens: usize,
    pub top_k: usize,
    pub rows_ys: usize,
    pub dim: usize,
    pub ys: u64,
    pub pos: u64,
    pub weights: u64,
    pub y: u64,
}

fn check_index_bits(bits: u32) -> Result<()> {
    if bits == 32 || bits == 64 {
        Ok(())
    } else {
        Err(Error::type_(format!(
            "index tensors must be int32 or int64, got {bits}-bit integers"
        )))
    }
}

fn nonnull(ptrs: &[(&str, u64)]) -> Result<()> {
    match ptrs.iter().find(|(_, p)| *p == 0) {
        Some((name, _)) => Err(Error::value(format!("{name} is a null device pointer"))),
        None => Ok(()),
    }
}

/// Threads over columns (a warp multiple, at most 256) and rows per block, for `units` columns.
fn row_block(units: usize) -> (u32, u32) {
    let x = units.clamp(1, 256).div_ceil(32) * 32;
    (x as u32, (256 / x).max(1) as u32)
}

fn as_param<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

fn i64_of(v: usize, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::value(format!("{what} = {v} is too large")))
}

pub fn moe_permute(call: &PermuteCall, elem: ElemType) -> Result<()> {
    guarded("moe_permute", || {
        check_index_bits(call.index_bits)?;
        if call.rows_out == 0 || call.dim == 0 {
            return Ok(());
        }
        nonnull(&[("x", call.x), ("token_of", call.token_of), ("xs", call.xs)])?;
        let ctx = device::context(call.device)?;
        let module = kernels::moe_module(elem, call.index_bits);
        let row_bytes = call.dim * elem.size();
        // Rows of whole, aligned 16-byte units move as uint4.
        let vec16 = row_bytes % 16 == 0 && call.x % 16 == 0 && call.xs % 16 == 0;
        let (name, units) = if vec16 {
            ("moe_permute_v16", row_bytes / 16)
        } else {
            ("moe_permute", call.dim)
        };
        let f = device::function(&ctx, &module, name)?;
        let (bx, by) = row_block(units);
        let geometry = Launch {
            grid: (
                u32::try_from(call.rows_out.div_ceil(by as usize))
                    .map_err(|_| Error::value("too many rows"))?,
                1,
                1,
            ),
            block: (bx, by, 1),
            smem: 0,
        };
        let (mut x, mut idx, mut xs) = (call.x, call.token_of, call.xs);
        let mut rows_out = i64_of(call.rows_out, "rows_out")?;
        let mut rows_x = i64_of(call.rows_x, "rows_x")?;
        let mut dim = i64_of(units, "dim")?;
        let mut params = [
            as_param(&mut x),
            as_param(&mut idx),
            as_param(&mut xs),
            as_param(&mut rows_out),
            as_param(&mut rows_x),
            as_param(&mut dim),
        ];
        // SAFETY: parameter types match moe_permute(_v16); pointers come from live caller tensors.
        unsafe { device::launch(&f, &geometry, call.stream, &mut params) }
    })
}

pub fn moe_combine(call: &CombineCall, elem: ElemType) -> Result<()> {
    guarded("moe_combine", || {
        check_index_bits(call.index_bits)?;
        if call.tokens == 0 || call.dim == 0 {
            return Ok(());
        }
        nonnull(&[("y", call.y)])?;
        if call.top_k > 0 {
            nonnull(&[
                ("ys", call.ys),
                ("pos", call.pos),
                ("weights", call.weights),
            ])?;
        }
        let ctx = device::context(call.device)?;
        let module = kernels::moe_module(elem, call.index_bits);
        let f = device::function(&ctx, &module, "moe_combine")?;
        let (bx, _) = row_block(call.dim);
        let geometry = Launch {
            grid: (
                u32::try_from(call.tokens).map_err(|_| Error::value("too many tokens"))?,
                1,
                1,
            ),
            block: (bx, 1, 1),
            smem: 0,
        };
        let (mut ys, mut pos, mut w, mut y) = (call.ys, call.pos, call.weights, call.y);
        let mut tokens = i64_of(call.tokens, "tokens")?;
        let mut top_k = i64_of(call.top_k, "top_k")?;
        let mut rows_ys = i64_of(call.rows_ys, "rows_ys")?;
        let mut dim = i64_of(call.dim, "dim")?;
        let mut params = [
            as_param(&mut ys),
            as_param(&mut pos),
            as_param(&mut w),
            as_param(&mut y),
            as_param(&mut tokens),
            as_param(&mut top_k),
            as_param(&mut rows_ys),
            as_param(&mut dim),
        ];
        // SAFETY: parameter types match moe_combine; pointers come from live caller tensors.
        unsafe { device::launch(&f, &geometry, call.stream, &mut params) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_blocks_cover_256_threads() {
        assert_eq!(row_block(1), (32, 8));
        assert_eq!(row_block(64), (64, 4));
        assert_eq!(row_block(100), (128, 2));
        assert_eq!(row_block(4096), (256, 1));
    }

    #[test]
    fn index_bits_are_checked() {
        let call = PermuteCall {
            index_bits: 16,
            rows_out: 1,
            dim: 1,
            ..Default::default()
        };
        assert!(matches!(
            moe_permute(&call, ElemType::F32),
            Err(Error::Type(_))
        ));
    }
}
