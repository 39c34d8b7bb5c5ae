//! Helpers shared by the unit tests.

/// `n` deterministic pseudo-random values in `[-0.5, 0.5)` (a 64-bit LCG, 24 bits per value).
pub fn lcg(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}
