//! Tiled (flash) attention on the CPU: online-softmax forward and recomputing backward.
//!
//! `cpu` holds the tiled kernels, `mask` the tile classes (skip / full / partial) that make
//! masked-out tiles free, `gemm` the element types and the register-blocked tile matmul,
//! `decode` one query row per sequence against its key/value cache (token-by-token generation).

pub mod cpu;
pub mod decode;
pub mod gemm;
pub mod mask;

pub use cpu::{backward, forward, LseLayout, Options, Shape, MAX_HEAD_DIM};
pub use decode::{decode_step, DecodeShape, Rotary};
pub use gemm::{Real, Storage};
pub use mask::{MaskSpec, TileClass};
