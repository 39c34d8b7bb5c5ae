//! Batched kernels of the shingling step: token hashes of short ASCII tokens and the shingle
//! combine, each over a whole document's arrays at once so the 64-bit multiplies vectorise.
//!
//! Every kernel is one `#[inline(always)]` body compiled three times (AVX-512F+DQ, AVX2,
//! portable) and picked at run time. The bodies are plain wrapping u64 arithmetic, so every copy
//! gives the same bits; only the instructions differ.

use super::shingle::fmix64;

/// Which copy of the batched kernels runs, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Portable,
    /// AVX2, BMI1/2, POPCNT, LZCNT (x86-64-v3).
    Avx2,
    /// The above plus AVX-512 F, DQ, VL, BW.
    Avx512,
}

impl Level {
    /// The widest copy this CPU supports.
    #[inline]
    pub fn detect() -> Self {
        #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
        {
            use std::is_x86_feature_detected as has;
            if has!("avx2") && has!("bmi1") && has!("bmi2") && has!("popcnt") && has!("lzcnt") {
                if has!("avx512f") && has!("avx512dq") && has!("avx512vl") && has!("avx512bw") {
                    return Level::Avx512;
                }
                return Level::Avx2;
            }
        }
        Level::Portable
    }

    /// Every copy this CPU can run (tests compare them).
    pub fn available() -> Vec<Self> {
        [Level::Portable, Level::Avx2, Level::Avx512]
            .into_iter()
            .filter(|&l| l <= Level::detect())
            .collect()
    }
}

/// Keys of xxh3's 1-3 and 4-8 byte paths for one seed.
#[derive(Debug, Clone, Copy)]
pub struct ShortKeys {
    pub key_1to3: u64,
    pub key_4to8: u64,
}

/// xxh3's final avalanche of its 1-3 byte path (xxh64's `avalanche`).
#[inline(always)]
pub(crate) fn xxh64_avalanche(mut v: u64) -> u64 {
    v ^= v >> 33;
    v = v.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    v ^= v >> 29;
    v = v.wrapping_mul(0x1656_67B1_9E37_79F9);
    v ^ (v >> 32)
}

/// `xxh3_64_with_seed` of one lowercased ASCII token of `len` bytes (1-8 used; longer tokens
/// are fixed up by the caller), given its first 8 bytes little-endian in `word` (bytes past the
/// token are ignored). Both length classes are computed and one selected: no branch.
#[inline(always)]
fn short_token_hash(word: u64, len: u64, keys: ShortKeys) -> u64 {
    // Alphanumeric ASCII lowercases as `b | 0x20`; digits already have the bit.
    let w = word | 0x2020_2020_2020_2020;
    let l = len.min(8);
    let first = w & 0xFF;
    let middle = (w >> ((l >> 1) * 8)) & 0xFF;
    let last = (w >> ((l - 1) * 8)) & 0xFF;
    let combo = (first << 16) | (middle << 24) | last | (l << 8);
    let h13 = xxh64_avalanche(combo ^ keys.key_1to3);
    let head = w & 0xFFFF_FFFF;
    let tail = (w >> ((l.max(4) - 4) * 8)) & 0xFFFF_FFFF;
    let mut v = tail.wrapping_add(head << 32) ^ keys.key_4to8;
    v ^= v.rotate_left(49) ^ v.rotate_left(24);
    v = v.wrapping_mul(0x9FB2_1C65_1E98_DF25);
    v ^= (v >> 35).wrapping_add(l);
    v = v.wrapping_mul(0x9FB2_1C65_1E98_DF25);
    let h48 = v ^ (v >> 28);
    if l >= 4 {
        h48
    } else {
        h13
    }
}

#[inline(always)]
fn short_token_hashes_body(
    _: Level,
    words: &[u64],
    starts: &[u32],
    ends: &[u32],
    keys: ShortKeys,
    out: &mut [u64],
) {
    let n = out.len();
    let (words, starts, ends) = (&words[..n], &starts[..n], &ends[..n]);
    for i in 0..n {
        let len = ends[i].wrapping_sub(starts[i]) as u64;
        out[i] = short_token_hash(words[i], len, keys);
    }
}

/// A shingle hash as stored: the full 64 bits, or the low 32 that MinHash permutes.
pub trait ShingleHash: Copy {
    fn from_hash(h: u64) -> Self;
    /// `combine_windows` into this type.
    fn combine(level: Level, tokens: &[u64], c: &[u64], out: &mut [Self]);
}

impl ShingleHash for u64 {
    #[inline(always)]
    fn from_hash(h: u64) -> Self {
        h
    }
    fn combine(level: Level, tokens: &[u64], c: &[u64], out: &mut [Self]) {
        combine_windows(level, tokens, c, out)
    }
}

impl ShingleHash for u32 {
    #[inline(always)]
    fn from_hash(h: u64) -> Self {
        h as u32
    }
    fn combine(level: Level, tokens: &[u64], c: &[u64], out: &mut [Self]) {
        combine_windows_low32(level, tokens, c, out)
    }
}

/// `sum_i c_i * t_{j+i}`, then `fmix64`, for every window `j`; `N` known at compile time.
#[inline(always)]
fn combine_fixed<const N: usize, T: ShingleHash>(tokens: &[u64], c: &[u64], out: &mut [T]) {
    let m = out.len();
    let c: [u64; N] = std::array::from_fn(|i| c[i]);
    let t: [&[u64]; N] = std::array::from_fn(|i| &tokens[i..i + m]);
    for j in 0..m {
        let mut s = 0u64;
        for i in 0..N {
            s = s.wrapping_add(c[i].wrapping_mul(t[i][j]));
        }
        out[j] = T::from_hash(fmix64(s));
    }
}

/// The same for any window length, in blocks: one pass per position, then the finaliser.
#[inline(always)]
fn combine_any<T: ShingleHash>(tokens: &[u64], c: &[u64], out: &mut [T]) {
    const BLOCK: usize = 256;
    let mut acc = [0u64; BLOCK];
    for (b, out) in out.chunks_mut(BLOCK).enumerate() {
        let m = out.len();
        let acc = &mut acc[..m];
        acc.fill(0);
        for (i, &ci) in c.iter().enumerate() {
            let t = &tokens[b * BLOCK + i..b * BLOCK + i + m];
            for j in 0..m {
                acc[j] = acc[j].wrapping_add(ci.wrapping_mul(t[j]));
            }
        }
        for (o, &a) in out.iter_mut().zip(acc.iter()) {
            *o = T::from_hash(fmix64(a));
        }
    }
}

#[inline(always)]
fn combine_body<T: ShingleHash>(tokens: &[u64], c: &[u64], out: &mut [T]) {
    match c.len() {
        5 => combine_fixed::<5, T>(tokens, c, out),
        3 => combine_fixed::<3, T>(tokens, c, out),
        _ => combine_any(tokens, c, out),
    }
}

#[inline(always)]
fn combine_body_u64(_: Level, tokens: &[u64], c: &[u64], out: &mut [u64]) {
    combine_body(tokens, c, out)
}

#[inline(always)]
fn combine_body_u32(_: Level, tokens: &[u64], c: &[u64], out: &mut [u32]) {
    combine_body(tokens, c, out)
}

/// Defines `pub fn $name(level, args..)` running `$body(level, args..)` compiled for `level`
/// (lowered to what this CPU supports); the body sees the level it was compiled for.
macro_rules! multiversion {
    ($name:ident => $body:path, ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        pub fn $name(level: $crate::dedup::batch::Level, $($arg: $ty),*) $(-> $ret)? {
            use $crate::dedup::batch::Level;
            let level = level.min(Level::detect());
            #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
            {
                #[target_feature(enable = "avx512f,avx512dq,avx512vl,avx512bw,avx2,bmi1,bmi2,popcnt,lzcnt")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $body(Level::Avx512, $($arg),*)
                }
                #[target_feature(enable = "avx2,bmi1,bmi2,popcnt,lzcnt")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $body(Level::Avx2, $($arg),*)
                }
                match level {
                    // SAFETY: `Level::detect` found every feature of this copy on the CPU.
                    Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    Level::Avx2 => return unsafe { avx2($($arg),*) },
                    Level::Portable => {}
                }
            }
            let _ = level;
            $body(Level::Portable, $($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion!(short_token_hashes => short_token_hashes_body, (words: &[u64], starts: &[u32], ends: &[u32], keys: ShortKeys, out: &mut [u64]));
multiversion!(combine_windows => combine_body_u64, (tokens: &[u64], c: &[u64], out: &mut [u64]));
multiversion!(combine_windows_low32 => combine_body_u32, (tokens: &[u64], c: &[u64], out: &mut [u32]));

#[cfg(test)]
mod tests {
    use super::super::shingle::{position_multipliers, splitmix64};
    use super::*;

    #[test]
    fn every_copy_of_the_combine_agrees() {
        let mut state = 11u64;
        let tokens: Vec<u64> = (0..301).map(|_| splitmix64(&mut state)).collect();
        for n in [1, 2, 3, 4, 5, 7, 13] {
            let c = position_multipliers(n);
            let m = tokens.len() + 1 - n;
            let want: Vec<u64> = tokens
                .windows(n)
                .map(|w| {
                    fmix64(
                        w.iter()
                            .zip(&c)
                            .fold(0u64, |a, (&t, &k)| a.wrapping_add(k.wrapping_mul(t))),
                    )
                })
                .collect();
            for level in Level::available() {
                for len in [m, m.min(7), 1] {
                    let mut out = vec![0u64; len];
                    combine_windows(level, &tokens[..len + n - 1], &c, &mut out);
                    assert_eq!(out, want[..len], "n = {n}, {level:?}, {len} windows");
                }
            }
        }
    }
}
