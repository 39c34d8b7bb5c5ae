//! Tiled (flash) attention on the CPU: online-softmax forward and recomputing backward.
//!
//! `cpu` holds the tiled kernels, `mask` the tile classes (skip / full / partial) that make
//! masked-out tiles free, `gemm` the element types and the register-blocked tile matmul.

pub mod cpu;
pub mod gemm;
pub mod mask;

pub use cpu::{backward, forward, LseLayout, Options, Shape, MAX_HEAD_DIM};
pub use gemm::{Real, Storage};
pub use mask::{MaskSpec, TileClass};
