//! Whole-model steps that run in one native call.
//!
//! A decode step of a small language model is a few hundred tiny operations (norms, quantized
//! GEMVs, attention against the cache, residual adds); issued one by one from Python each pays
//! interpreter and dispatch overhead and, with several threads, a trip into the thread pool that
//! costs more than the work. [`llama::LlamaStack`] runs every block of a Llama-architecture model
//! for one new token per sequence inside a single visit to the library's pool.

pub mod llama;

pub use llama::{LlamaStack, Proj, StackBlock};
