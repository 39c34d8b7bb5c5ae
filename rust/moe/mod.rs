//! Mixture-of-Experts: top-k routing, dispatch plans (counting sort) and permute/combine kernels.
//!
//! The flow for `T` tokens of width `D`, `E` experts and `k` slots per token:
//! [`route`] picks `idx` `[T, k]` and `weights` `[T, k]`; [`dispatch_plan`] sorts the `T * k` slots
//! by expert (stable counting sort, optional capacity); [`permute`] gathers `xs[i] = x[token_of[i]]`
//! into expert order; the experts run on contiguous row ranges; [`combine`] reduces
//! `y[t] = sum_s w[t, s] * ys[pos[t, s]]` per token (race-free, no atomics).

pub mod dispatch;
pub mod route;

pub use dispatch::{combine, dispatch_plan, permute, rowdot, DispatchPlan, Element};
pub use route::{route, Gate, Real};
