//! Optimizer steps: a fused LAMB update over flat float32 state (see [`lamb`]).

pub mod lamb;

pub use lamb::{grad_sq_norm, step, Grad, HalfParam, LambHyper, LambTensor};
