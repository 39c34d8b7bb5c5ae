//! CUDA kernels compiled at run time with NVRTC (feature `cuda`).
//!
//! Nothing CUDA is needed to build or import: the driver (`libcuda.so.1`) and NVRTC
//! (`libnvrtc.so.13`/`.12`) are loaded on first use. Every public entry checks that they are present
//! and runs under `catch_unwind`, so a missing library or a cudarc panic becomes `Error::Runtime`.
//! Kernels run on the caller's stream (PyTorch's current stream) on memory the caller owns: nothing
//! here allocates or frees device memory.

mod attention;
mod device;
mod kernels;
mod moe;
mod nvrtc;
mod quant;

pub use attention::{attention_backward, attention_forward, AttnCall};
pub use device::device_arch;
pub use moe::{moe_combine, moe_permute, CombineCall, PermuteCall};
pub use nvrtc::{compile_check, nvrtc_version};
pub use quant::{quant_gemv, QuantGemvCall};

use crate::error::{Error, Result};

/// Storage type of activations, as the kernels see it (`ELEM` in the CUDA sources).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    BF16,
    F16,
}

impl ElemType {
    pub const ALL: [ElemType; 3] = [ElemType::F32, ElemType::BF16, ElemType::F16];

    /// Parses a torch dtype name: `float32`, `bfloat16` or `float16`.
    pub fn parse(name: &str) -> Result<Self> {
        match name.trim_start_matches("torch.") {
            "float32" | "float" => Ok(ElemType::F32),
            "bfloat16" => Ok(ElemType::BF16),
            "float16" | "half" => Ok(ElemType::F16),
            other => Err(Error::type_(format!(
                "expected dtype float32, bfloat16 or float16, got {other}"
            ))),
        }
    }

    pub fn size(self) -> usize {
        match self {
            ElemType::F32 => 4,
            ElemType::BF16 | ElemType::F16 => 2,
        }
    }

    fn code(self) -> u32 {
        match self {
            ElemType::F32 => 0,
            ElemType::BF16 => 1,
            ElemType::F16 => 2,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "float32",
            ElemType::BF16 => "bfloat16",
            ElemType::F16 => "float16",
        }
    }
}

/// Runs `f`, turning a panic (cudarc panics on a missing library or symbol) into `Error::Runtime`.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(Error::runtime(format!(
                "{what}: CUDA backend failed: {msg}"
            )))
        }
    }
}
