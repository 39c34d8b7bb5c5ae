//! Mixture-of-Experts: top-k routing, dispatch plans (counting sort) and permute/combine kernels.
