//! Launcher for the weight-only quantized GEMV kernel (kernels/quant.cu).

use std::ffi::c_void;

use super::device::{self, Launch};
use super::kernels;
use super::{guarded, ElemType};
use crate::error::{Error, Result};

/// Output rows per thread block (one 32-thread slice each); must match `QG_ROWS` in quant.cu.
const ROWS_PER_BLOCK: usize = 8;
/// Most tokens one launch takes; must match `QG_MAX_TOKENS` in quant.cu.
pub const MAX_TOKENS: usize = 8;

/// `y = x W^T (+ bias)`: x `(tokens, k)` and y `(tokens, n)` in the activation dtype, qweight
/// `(n, k / 2)` (INT4, element `2j` in the low nibble of byte `j`) or `(n, k)` (INT8) uint8 codes,
/// scales and zeros `(n, k / group_size)` float32, bias `(n,)` float32 or 0; all contiguous
/// device memory owned by the caller, qweight 4-byte aligned.
#[derive(Debug, Clone, Copy, Default)]
pub struct QuantGemvCall {
    pub device: usize,
    pub stream: u64,
    pub bits: u32,
    pub tokens: usize,
    pub n: usize,
    pub k: usize,
    pub group_size: usize,
    pub x: u64,
    pub qweight: u64,
    pub scales: u64,
    pub zeros: u64,
    pub bias: u64,
    pub y: u64,
}

impl QuantGemvCall {
    /// Checks everything that can be checked without a GPU.
    pub fn validate(&self) -> Result<()> {
        let per_word = match self.bits {
            4 => 8,
            8 => 4,
            b => {
                return Err(Error::value(format!(
                    "bits must be 4 or 8 for the CUDA quantized GEMV, got {b}"
                )))
            }
        };
        if self.tokens > MAX_TOKENS {
            return Err(Error::value(format!(
                "the CUDA quantized GEMV takes at most {MAX_TOKENS} tokens, got {}",
                self.tokens
            )));
        }
        if self.group_size == 0
            || !self.group_size.is_multiple_of(per_word)
            || !self.k.is_multiple_of(self.group_size)
        {
            return Err(Error::value(format!(
                "group_size {} must be a multiple of {per_word} that divides in_features {}",
                self.group_size, self.k
            )));
        }
        if !self.qweight.is_multiple_of(4) {
            return Err(Error::value("qweight must be 4-byte aligned"));
        }
        Ok(())
    }
}

/// Whether rows can be read as 16-byte units: whole units per row and a 16-byte aligned base.
fn vec4_rows(call: &QuantGemvCall) -> bool {
    let row_bytes = call.k * call.bits as usize / 8;
    row_bytes.is_multiple_of(16) && call.qweight.is_multiple_of(16)
}

fn as_param<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

fn i64_of(v: usize, what: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::value(format!("{what} = {v} is too large")))
}

/// Launch geometry: (blocks, threads per block, dynamic shared memory bytes).
fn geometry(n: usize) -> Result<Launch> {
    let blocks = u32::try_from(n.div_ceil(ROWS_PER_BLOCK))
        .map_err(|_| Error::value("too many output rows"))?;
    Ok(Launch {
        grid: (blocks, 1, 1),
        block: (32 * ROWS_PER_BLOCK as u32, 1, 1),
        smem: (32 * ROWS_PER_BLOCK * MAX_TOKENS * 4) as u32,
    })
}

pub fn quant_gemv(call: &QuantGemvCall, elem: ElemType) -> Result<()> {
    guarded("quant_gemv", || {
        call.validate()?;
        if call.tokens == 0 || call.n == 0 {
            return Ok(());
        }
        let mut ptrs = vec![("y", call.y)];
        if call.k > 0 {
            ptrs.extend([
                ("x", call.x),
                ("qweight", call.qweight),
                ("scales", call.scales),
                ("zeros", call.zeros),
            ]);
        }
        if let Some((name, _)) = ptrs.iter().find(|(_, p)| *p == 0) {
            return Err(Error::value(format!("{name} is a null device pointer")));
        }
        let ctx = device::context(call.device)?;
        let module = kernels::quant_module(elem, call.bits);
        let f = device::function(&ctx, &module, "quant_gemv")?;
        let launch = geometry(call.n)?;
        let (mut x, mut q, mut s, mut z, mut b, mut y) = (
            call.x,
            call.qweight,
            call.scales,
            call.zeros,
            call.bias,
            call.y,
        );
        let mut tokens = i32::try_from(call.tokens).map_err(|_| Error::value("too many tokens"))?;
        let mut n = i64_of(call.n, "out_features")?;
        let mut k = i64_of(call.k, "in_features")?;
        let mut gs = i64_of(call.group_size, "group_size")?;
        let mut vec4 = i32::from(vec4_rows(call));
        let mut params = [
            as_param(&mut x),
            as_param(&mut q),
            as_param(&mut s),
            as_param(&mut z),
            as_param(&mut b),
            as_param(&mut y),
            as_param(&mut tokens),
            as_param(&mut n),
            as_param(&mut k),
            as_param(&mut gs),
            as_param(&mut vec4),
        ];
        // SAFETY: parameter types match quant_gemv; pointers come from live caller tensors.
        unsafe { device::launch(&f, &launch, call.stream, &mut params) }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call() -> QuantGemvCall {
        QuantGemvCall {
            bits: 4,
            tokens: 1,
            n: 16,
            k: 256,
            group_size: 128,
            ..Default::default()
        }
    }

    #[test]
    fn vec4_needs_whole_aligned_units() {
        let c = QuantGemvCall {
            qweight: 256,
            ..call()
        }; // INT4, k = 256: 128-byte rows
        assert!(vec4_rows(&c));
        assert!(!vec4_rows(&QuantGemvCall { qweight: 260, ..c }));
        assert!(!vec4_rows(&QuantGemvCall {
            k: 24,
            group_size: 8,
            ..c
        })); // 12-byte rows
        assert!(vec4_rows(&QuantGemvCall {
            bits: 8,
            k: 16,
            group_size: 4,
            ..c
        }));
    }

    #[test]
    fn geometry_covers_every_row() {
        let g = geometry(4097).unwrap();
        assert_eq!(g.grid.0 as usize * ROWS_PER_BLOCK, 4104);
        assert_eq!(g.block.0, 256);
    }

    #[test]
    fn bad_calls_fail_before_any_cuda_call() {
        assert!(call().validate().is_ok());
        for bad in [
            QuantGemvCall { bits: 3, ..call() },
            QuantGemvCall {
                tokens: 9,
                ..call()
            },
            QuantGemvCall {
                group_size: 100,
                ..call()
            },
            QuantGemvCall {
                group_size: 12,
                k: 24,
                ..call()
            },
            QuantGemvCall {
                qweight: 2,
                ..call()
            },
        ] {
            assert!(matches!(
                quant_gemv(&bad, ElemType::F32),
                Err(Error::Value(_))
            ));
        }
        // INT8 words hold 4 codes: group 4 is fine there.
        assert!(QuantGemvCall {
            bits: 8,
            group_size: 4,
            k: 8,
            ..call()
        }
        .validate()
        .is_ok());
    }
}
