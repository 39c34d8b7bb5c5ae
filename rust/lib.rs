//! slimforge's native core: the kernels behind the Python package.
//!
//! Every area is plain Rust with its own tests; `py` (feature `python`) only converts arguments,
//! releases the GIL and maps errors; `cuda` (feature `cuda`) holds the NVRTC-compiled kernels.

pub mod attention;
pub mod dedup;
pub mod error;
pub mod models;
pub mod moe;
pub mod optim;
pub mod parallel;
pub mod prune;
pub mod quant;

#[cfg(test)]
mod test_util;

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(feature = "python")]
mod py;
