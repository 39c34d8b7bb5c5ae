//! Normalisation, tokenising and shingle hashing.
//!
//! * Normalised text: Unicode NFKC, then full lowercase (`str::to_lowercase`, which also applies
//!   the final-sigma rule, like Python's `str.lower`). ASCII text takes a copy-and-lowercase path,
//!   or, with word tokens, a batched path that reads tokens in place and lowercases them as it
//!   hashes them (see `ascii_word_tokens` and `super::batch`).
//! * Word tokens: maximal runs of chars with `char::is_alphanumeric` (Unicode Alphabetic or
//!   Numeric); everything else (spaces, punctuation, `_`) separates words.
//! * Char tokens: the chars of the normalised text, with every run of whitespace replaced by one
//!   `' '` and leading/trailing whitespace dropped.
//! * Token hash: `t = xxh3_64_with_seed(utf8(token), seed)`.
//! * Shingle hash of tokens `t_0..t_{m-1}` (m = ngram, or the whole sequence when the document
//!   has fewer than `ngram` tokens): `fmix64(sum_i C_i * t_i mod 2^64)`, with `C_i` the i-th
//!   output of splitmix64 started at `0x243F6A8885A308D3`, with its low bit set.
//! * A document without tokens has no shingles.

use unicode_normalization::{is_nfkc_quick, IsNormalized, UnicodeNormalization};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::batch::{self, xxh64_avalanche, Level, ShingleHash, ShortKeys};
use crate::error::{Error, Result};

/// How a document is split into tokens before n-grams are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tokenizer {
    /// Maximal runs of alphanumeric chars.
    Word,
    /// Single chars, whitespace runs collapsed to one space.
    Char,
}

impl Tokenizer {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "word" => Ok(Tokenizer::Word),
            "char" => Ok(Tokenizer::Char),
            other => Err(Error::value(format!(
                "tokenizer must be \"word\" or \"char\", got {other:?}"
            ))),
        }
    }
}

/// Start state of the splitmix64 sequence that gives the shingle position multipliers.
pub const POSITION_SEED: u64 = 0x243F_6A88_85A3_08D3;

/// One step of splitmix64 (Steele, Lea, Flood 2014): advances `state` and returns the output.
#[inline]
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// MurmurHash3's 64-bit finaliser.
#[inline(always)]
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    k ^= k >> 33;
    k = k.wrapping_mul(0xC4CE_B9FE_1A85_EC53);
    k ^ (k >> 33)
}

/// First 72 bytes of xxh3's default secret: all that inputs of up to 16 bytes read.
const XXH3_SECRET: [u8; 72] = [
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb,
];

const fn secret64(i: usize) -> u64 {
    let s = &XXH3_SECRET;
    u64::from_le_bytes([
        s[i],
        s[i + 1],
        s[i + 2],
        s[i + 3],
        s[i + 4],
        s[i + 5],
        s[i + 6],
        s[i + 7],
    ])
}

const fn secret32(i: usize) -> u32 {
    let s = &XXH3_SECRET;
    u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]])
}

#[inline(always)]
fn read64(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

#[inline(always)]
fn read32(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

/// `xxh3_64_with_seed`, with the paths for inputs of up to 16 bytes (nearly every token) inlined
/// here; longer inputs call the xxhash-rust crate. Tested equal to the crate for every length.
#[inline(always)]
pub fn token_hash(b: &[u8], seed: u64) -> u64 {
    let len = b.len();
    if len > 16 {
        return xxh3_64_with_seed(b, seed);
    }
    if len > 8 {
        let lo = read64(b, 0) ^ (secret64(24) ^ secret64(32)).wrapping_add(seed);
        let hi = read64(b, len - 8) ^ (secret64(40) ^ secret64(48)).wrapping_sub(seed);
        let product = lo as u128 * hi as u128;
        let acc = (len as u64)
            .wrapping_add(lo.swap_bytes())
            .wrapping_add(hi)
            .wrapping_add(product as u64 ^ (product >> 64) as u64);
        let v = (acc ^ (acc >> 37)).wrapping_mul(0x1656_6791_9E37_79F9);
        return v ^ (v >> 32);
    }
    if len >= 4 {
        let seed = seed ^ (((seed as u32).swap_bytes() as u64) << 32);
        let input64 = (read32(b, len - 4) as u64).wrapping_add((read32(b, 0) as u64) << 32);
        let mut v = input64 ^ (secret64(8) ^ secret64(16)).wrapping_sub(seed);
        v ^= v.rotate_left(49) ^ v.rotate_left(24);
        v = v.wrapping_mul(0x9FB2_1C65_1E98_DF25);
        v ^= (v >> 35).wrapping_add(len as u64);
        v = v.wrapping_mul(0x9FB2_1C65_1E98_DF25);
        return v ^ (v >> 28);
    }
    let keyed = if len > 0 {
        let combo = ((b[0] as u32) << 16)
            | ((b[len >> 1] as u32) << 24)
            | (b[len - 1] as u32)
            | ((len as u32) << 8);
        combo as u64 ^ ((secret32(0) ^ secret32(4)) as u64).wrapping_add(seed)
    } else {
        seed ^ secret64(56) ^ secret64(64)
    };
    xxh64_avalanche(keyed)
}

/// xxh3's keys for tokens of 1-3, 4-8 and 9-16 bytes under `seed`.
fn short_keys(seed: u64) -> (ShortKeys, (u64, u64)) {
    let seed48 = seed ^ (((seed as u32).swap_bytes() as u64) << 32);
    (
        ShortKeys {
            key_1to3: ((secret32(0) ^ secret32(4)) as u64).wrapping_add(seed),
            key_4to8: (secret64(8) ^ secret64(16)).wrapping_sub(seed48),
        },
        (
            (secret64(24) ^ secret64(32)).wrapping_add(seed),
            (secret64(40) ^ secret64(48)).wrapping_sub(seed),
        ),
    )
}

/// xxh3 of the lowercased alphanumeric ASCII token `bytes[start..start + len]`, 9-16 bytes,
/// read in place.
#[inline]
fn hash_9to16_lowercased(bytes: &[u8], start: usize, len: usize, keys: (u64, u64)) -> u64 {
    const LOWER: u64 = 0x2020_2020_2020_2020;
    let lo = (read64(bytes, start) | LOWER) ^ keys.0;
    let hi = (read64(bytes, start + len - 8) | LOWER) ^ keys.1;
    let product = lo as u128 * hi as u128;
    let acc = (len as u64)
        .wrapping_add(lo.swap_bytes())
        .wrapping_add(hi)
        .wrapping_add(product as u64 ^ (product >> 64) as u64);
    let v = (acc ^ (acc >> 37)).wrapping_mul(0x1656_6791_9E37_79F9);
    v ^ (v >> 32)
}

/// Odd multipliers `C_0..C_{n-1}` for the shingle combine.
pub fn position_multipliers(ngram: usize) -> Vec<u64> {
    let mut state = POSITION_SEED;
    (0..ngram).map(|_| splitmix64(&mut state) | 1).collect()
}

/// Longest shingle, in tokens: each shingle hash costs `ngram` multiply-adds and the position
/// multipliers take `8 * ngram` bytes, so larger values only cost time and memory.
pub const MAX_NGRAM: usize = 1024;

/// Shingling parameters, validated once.
#[derive(Debug, Clone)]
pub struct Shingler {
    ngram: usize,
    tokenizer: Tokenizer,
    seed: u64,
    multipliers: Vec<u64>,
    ascii_char_hashes: Vec<u64>,
    short_keys: ShortKeys,
    key_9to16: (u64, u64),
}

/// Per-thread buffers reused across documents.
#[derive(Default)]
pub struct Scratch {
    text: String,
    /// Token hashes (of the current block on the ASCII path, whose buffers only grow).
    tokens: Vec<u64>,
    masks: Vec<u64>,
    ascii: AsciiTokens,
    long_buf: Vec<u8>,
    shingles: Vec<u64>,
}

impl Shingler {
    pub fn new(ngram: usize, tokenizer: Tokenizer, seed: u64) -> Result<Self> {
        if ngram == 0 {
            return Err(Error::value("ngram must be at least 1, got 0"));
        }
        if ngram > MAX_NGRAM {
            return Err(Error::value(format!(
                "ngram must be at most {MAX_NGRAM}, got {ngram}"
            )));
        }
        let ascii_char_hashes = match tokenizer {
            Tokenizer::Char => (0u8..128).map(|c| xxh3_64_with_seed(&[c], seed)).collect(),
            Tokenizer::Word => Vec::new(),
        };
        let (short_keys, key_9to16) = short_keys(seed);
        Ok(Shingler {
            ngram,
            tokenizer,
            seed,
            multipliers: position_multipliers(ngram),
            ascii_char_hashes,
            short_keys,
            key_9to16,
        })
    }

    pub fn ngram(&self) -> usize {
        self.ngram
    }

    /// Calls `emit` with the 64-bit hash of every shingle of `text`, in order (repeats included).
    pub fn for_each_shingle(&self, text: &str, scratch: &mut Scratch, mut emit: impl FnMut(u64)) {
        for &h in self.shingle_hashes(text, scratch) {
            emit(h);
        }
    }

    /// The 64-bit hash of every shingle of `text`, in order (repeats included), in a buffer of
    /// `scratch`.
    pub fn shingle_hashes<'s>(&self, text: &str, scratch: &'s mut Scratch) -> &'s [u64] {
        self.shingle_hashes_at(Level::detect(), text, scratch)
    }

    /// `shingle_hashes` with the kernel copies of `level` (tests compare them).
    fn shingle_hashes_at<'s>(
        &self,
        level: Level,
        text: &str,
        scratch: &'s mut Scratch,
    ) -> &'s [u64] {
        let mut out = std::mem::take(&mut scratch.shingles);
        self.shingles_into(level, text, scratch, &mut out);
        scratch.shingles = out;
        &scratch.shingles
    }

    /// The low 32 bits of every shingle hash of `text` (what MinHash permutes) into `out`.
    pub fn shingle_hashes_low32(&self, text: &str, scratch: &mut Scratch, out: &mut Vec<u32>) {
        self.shingles_into(Level::detect(), text, scratch, out);
    }

    /// Every shingle hash of `text`, in order, into `out` (replacing its contents).
    fn shingles_into<T: ShingleHash>(
        &self,
        level: Level,
        text: &str,
        sc: &mut Scratch,
        out: &mut Vec<T>,
    ) {
        out.clear();
        // Pure ASCII needs no NFKC and lowercases per byte: word tokens are hashed in place
        // (token offsets are u32 there).
        if self.tokenizer == Tokenizer::Word
            && text.len() < u32::MAX as usize - 128
            && self.ascii_word_shingles(level, text.as_bytes(), sc, out)
        {
            return;
        }
        out.clear();
        let ascii = normalize_into(text, &mut sc.text);
        sc.tokens.clear();
        match self.tokenizer {
            Tokenizer::Word => {
                word_token_hashes(&sc.text, ascii, self.seed, &mut sc.masks, &mut sc.tokens)
            }
            Tokenizer::Char => self.char_token_hashes(&sc.text, &mut sc.tokens),
        }
        let tokens = &sc.tokens;
        if tokens.is_empty() {
        } else if tokens.len() < self.ngram {
            out.push(T::from_hash(combine(tokens, &self.multipliers)));
        } else {
            let from = out.len();
            out.resize(from + tokens.len() + 1 - self.ngram, T::from_hash(0));
            T::combine(level, tokens, &self.multipliers, &mut out[from..]);
        }
    }

    /// The shingles of ASCII text with word tokens, appended to `out`, block by block (blocks
    /// of about `ASCII_BLOCK` bytes cut between tokens, so the per-token arrays stay in cache
    /// and small): a SIMD alphanumeric mask gives the token edges, every token's first 8 bytes
    /// go to an array, one batched kernel hashes the tokens of up to 8 bytes, longer ones (about
    /// one in ten in English) are fixed up one by one, and the last `ngram - 1` token hashes
    /// carry over to the next block. False (with `out` partly filled) when `bytes` is not ASCII.
    fn ascii_word_shingles<T: ShingleHash>(
        &self,
        level: Level,
        bytes: &[u8],
        sc: &mut Scratch,
        out: &mut Vec<T>,
    ) -> bool {
        let n = bytes.len();
        let keep = self.ngram - 1;
        let mut carried = 0usize;
        let mut total = 0usize;
        let mut from = 0usize;
        while from < n {
            let mut to = (from + ASCII_BLOCK).min(n);
            // Cut before a byte that cannot continue a token.
            while to < n && bytes[to].is_ascii_alphanumeric() {
                to += 1;
            }
            let block = &bytes[from..to];
            from = to;
            let Some((count, long_count)) = ascii_word_tokens(level, block, &mut sc.ascii) else {
                return false;
            };
            let t = &sc.ascii;
            if sc.tokens.len() < carried + count {
                sc.tokens.resize(carried + count, 0);
            }
            let tokens = &mut sc.tokens[carried..carried + count];
            batch::short_token_hashes(
                level,
                &t.words[..count],
                &t.starts[..count],
                &t.ends[..count],
                self.short_keys,
                tokens,
            );
            for &i in &t.long[..long_count] {
                let i = i as usize;
                let (start, end) = (t.starts[i] as usize, t.ends[i] as usize);
                let len = end - start;
                tokens[i] = if len <= 16 {
                    hash_9to16_lowercased(block, start, len, self.key_9to16)
                } else {
                    sc.long_buf.clear();
                    sc.long_buf
                        .extend(block[start..end].iter().map(|&b| b | 0x20));
                    token_hash(&sc.long_buf, self.seed)
                };
            }
            total += count;
            let avail = carried + count;
            if avail > keep {
                let windows = avail - keep;
                let at = out.len();
                out.resize(at + windows, T::from_hash(0));
                T::combine(
                    level,
                    &sc.tokens[..avail],
                    &self.multipliers,
                    &mut out[at..],
                );
                sc.tokens.copy_within(windows..avail, 0);
                carried = keep;
            } else {
                carried = avail;
            }
        }
        if total > 0 && total < self.ngram {
            out.push(T::from_hash(combine(
                &sc.tokens[..total],
                &self.multipliers,
            )));
        }
        true
    }

    /// Sorted, de-duplicated shingle hashes of `text` (the set exact Jaccard is computed on).
    pub fn shingle_set(&self, text: &str, scratch: &mut Scratch) -> Vec<u64> {
        let mut set = Vec::new();
        self.for_each_shingle(text, scratch, |h| set.push(h));
        set.sort_unstable();
        set.dedup();
        set
    }

    fn char_token_hashes(&self, text: &str, out: &mut Vec<u64>) {
        let space = self.ascii_char_hashes[b' ' as usize];
        let mut pending_space = false;
        let mut buf = [0u8; 4];
        for ch in text.chars() {
            if ch.is_whitespace() {
                pending_space = !out.is_empty();
                continue;
            }
            if pending_space {
                out.push(space);
                pending_space = false;
            }
            let h = if ch.is_ascii() {
                self.ascii_char_hashes[ch as usize]
            } else {
                token_hash(ch.encode_utf8(&mut buf).as_bytes(), self.seed)
            };
            out.push(h);
        }
    }
}

/// Text bytes per block on the ASCII word path (blocks end between tokens, so a little more).
const ASCII_BLOCK: usize = 16 * 1024;

/// Tokens of the ASCII word path. The buffers only grow: only the first entries of a document
/// are meaningful, and no document pays for clearing them.
#[derive(Default)]
pub struct AsciiTokens {
    /// Start and end (one past) of every token.
    starts: Vec<u32>,
    ends: Vec<u32>,
    /// First 8 bytes of every token, little-endian, zero-padded at the end of the text.
    words: Vec<u64>,
    /// Indices of the tokens longer than 8 bytes.
    long: Vec<u32>,
}

/// Writes the positions of the set bits of `bits` (plus `base`) at `out[*count..]` and advances
/// `*count`; slots past the new count are scratch, overwritten later.
#[inline(always)]
fn push_positions(out: &mut Vec<u32>, count: &mut usize, bits: u64, base: u32, compress: bool) {
    if *count + 64 > out.len() {
        out.resize((out.len() * 2).max(*count + 64).max(1024), 0);
    }
    let dst: &mut [u32; 64] = (&mut out[*count..*count + 64])
        .try_into()
        .expect("64 slots");
    #[cfg(target_arch = "x86_64")]
    if compress {
        // SAFETY: `compress` is only set where AVX-512 VBMI2 was detected.
        unsafe { positions_compress(bits, base, dst) };
        *count += bits.count_ones() as usize;
        return;
    }
    let _ = compress;
    // 8 at a time: no data-dependent loop exit per bit.
    let total = bits.count_ones() as usize;
    let mut bits = bits;
    let mut k = 0;
    loop {
        for d in &mut dst[k..k + 8] {
            *d = base + bits.trailing_zeros();
            bits &= bits.wrapping_sub(1);
        }
        k += 8;
        if k >= total {
            break;
        }
    }
    *count += total;
}

/// `push_positions` with one byte compress of the lane numbers, then widened to u32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi2")]
#[inline]
unsafe fn positions_compress(bits: u64, base: u32, dst: &mut [u32; 64]) {
    use std::arch::x86_64::*;
    static LANES: [u8; 64] = {
        let mut l = [0u8; 64];
        let mut i = 0;
        while i < 64 {
            l[i] = i as u8;
            i += 1;
        }
        l
    };
    let lanes = _mm512_loadu_si512(LANES.as_ptr() as *const _);
    let packed = _mm512_maskz_compress_epi8(bits, lanes);
    let base = _mm512_set1_epi32(base as i32);
    let p = dst.as_mut_ptr() as *mut __m512i;
    _mm512_storeu_si512(
        p,
        _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm512_castsi512_si128(packed)), base),
    );
    if bits.count_ones() > 16 {
        let q1 = _mm512_extracti32x4_epi32::<1>(packed);
        let q2 = _mm512_extracti32x4_epi32::<2>(packed);
        let q3 = _mm512_extracti32x4_epi32::<3>(packed);
        _mm512_storeu_si512(p.add(1), _mm512_add_epi32(_mm512_cvtepu8_epi32(q1), base));
        _mm512_storeu_si512(p.add(2), _mm512_add_epi32(_mm512_cvtepu8_epi32(q2), base));
        _mm512_storeu_si512(p.add(3), _mm512_add_epi32(_mm512_cvtepu8_epi32(q3), base));
    }
}

/// Token start and end offsets of `bytes` into `t.starts` / `t.ends`, from the alphanumeric mask
/// of each 64-byte chunk (`mask` returns it with the mask of non-ASCII bytes); returns the token
/// count, or `None` as soon as a byte is not ASCII.
#[inline(always)]
fn token_edges(
    bytes: &[u8],
    t: &mut AsciiTokens,
    mask: impl Fn(&[u8; 64]) -> (u64, u64),
    compress: bool,
) -> Option<usize> {
    // A token starts where the alphanumeric mask turns on and ends where it turns off.
    let (mut ns, mut ne) = (0usize, 0usize);
    let mut carry = 0u64;
    let mut chunks = bytes.chunks_exact(64);
    let mut base = 0u32;
    for chunk in &mut chunks {
        let (m, high) = mask(chunk.try_into().expect("64 bytes"));
        if high != 0 {
            return None;
        }
        let prev = (m << 1) | carry;
        push_positions(&mut t.starts, &mut ns, m & !prev, base, compress);
        push_positions(&mut t.ends, &mut ne, !m & prev, base, compress);
        carry = m >> 63;
        base += 64;
    }
    let mut m = 0u64;
    for (i, &b) in chunks.remainder().iter().enumerate() {
        if !b.is_ascii() {
            return None;
        }
        m |= (b.is_ascii_alphanumeric() as u64) << i;
    }
    // After a full last chunk this word is empty and holds only the closing edge, at bit 0.
    let prev = (m << 1) | carry;
    push_positions(&mut t.starts, &mut ns, m & !prev, base, compress);
    push_positions(&mut t.ends, &mut ne, !m & prev, base, compress);
    debug_assert_eq!(ns, ne);
    Some(ns.min(ne))
}

/// `ascii_word_tokens_body` with AVX-512 throughout: one mask and two byte compresses per 64
/// bytes for the token edges, gathers for the first 8 bytes of 8 tokens at a time, and a dword
/// compress for the indices of the long tokens.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi2,popcnt,bmi1,bmi2")]
unsafe fn ascii_word_tokens_avx512(bytes: &[u8], t: &mut AsciiTokens) -> Option<(usize, usize)> {
    use std::arch::x86_64::*;
    let n = bytes.len();
    // SAFETY (closure): this function's target features cover the mask kernel's.
    let count = token_edges(
        bytes,
        t,
        |c| unsafe { ascii_alnum_and_high_mask64_avx512(c) },
        true,
    )?;
    // 16 slots of slack for whole-vector stores.
    if t.words.len() < count + 16 {
        t.words.resize(count + 16, 0);
    }
    if t.long.len() < count + 16 {
        t.long.resize(count + 16, 0);
    }
    let mut inside = count;
    while inside > 0 && t.starts[inside - 1] as usize + 8 > n {
        inside -= 1;
    }
    let (starts, ends) = (&t.starts[..count], &t.ends[..count]);
    let words = &mut t.words[..count + 16];
    let long = &mut t.long[..count + 16];
    let text = bytes.as_ptr() as *const i64;
    let mut i = 0;
    // Every token before `inside` has 8 readable bytes from its start on.
    while i + 8 <= inside {
        let idx = _mm256_loadu_si256(starts.as_ptr().add(i) as *const __m256i);
        let w = _mm512_i32gather_epi64::<1>(idx, text);
        _mm512_storeu_si512(words.as_mut_ptr().add(i) as *mut _, w);
        i += 8;
    }
    for i in i..count {
        let start = starts[i] as usize;
        words[i] = if i < inside {
            read64(bytes, start)
        } else {
            let mut b = [0u8; 8];
            b[..n - start].copy_from_slice(&bytes[start..]);
            u64::from_le_bytes(b)
        };
    }
    let mut long_count = 0usize;
    let mut lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let sixteen = _mm512_set1_epi32(16);
    let eight = _mm512_set1_epi32(8);
    let mut i = 0;
    while i < count {
        let k: __mmask16 = if count - i >= 16 {
            0xFFFF
        } else {
            (1u16 << (count - i)) - 1
        };
        let s = _mm512_maskz_loadu_epi32(k, starts.as_ptr().add(i) as *const i32);
        let e = _mm512_maskz_loadu_epi32(k, ends.as_ptr().add(i) as *const i32);
        let is_long = _mm512_cmpgt_epu32_mask(_mm512_sub_epi32(e, s), eight);
        let packed = _mm512_maskz_compress_epi32(is_long, lane);
        _mm512_storeu_si512(long.as_mut_ptr().add(long_count) as *mut _, packed);
        long_count += is_long.count_ones() as usize;
        lane = _mm512_add_epi32(lane, sixteen);
        i += 16;
    }
    Some((count, long_count))
}

/// Fills `t` for `bytes`; returns the number of tokens and of tokens over 8 bytes, or `None`
/// as soon as a byte is not ASCII.
#[inline(always)]
fn ascii_word_tokens_body(
    level: Level,
    bytes: &[u8],
    t: &mut AsciiTokens,
) -> Option<(usize, usize)> {
    let n = bytes.len();
    #[cfg(target_arch = "x86_64")]
    if level == Level::Avx512 && std::is_x86_feature_detected!("avx512vbmi2") {
        // SAFETY: `Level::Avx512` means AVX-512F/BW/VL, BMI1/2 and POPCNT were detected, and
        // VBMI2 just above.
        return unsafe { ascii_word_tokens_avx512(bytes, t) };
    }
    let _ = level;
    let token_count = token_edges(bytes, t, ascii_alnum_and_high_mask64, false)?;
    if t.words.len() < token_count {
        t.words.resize(token_count, 0);
    }
    if t.long.len() < token_count {
        t.long.resize(token_count, 0);
    }
    let starts = &t.starts[..token_count];
    let ends = &t.ends[..token_count];
    let words = &mut t.words[..token_count];
    let long = &mut t.long[..token_count];
    // All but the last few tokens have 8 bytes of text from their start on.
    let mut inside = token_count;
    while inside > 0 && starts[inside - 1] as usize + 8 > n {
        inside -= 1;
    }
    let mut long_count = 0usize;
    for i in 0..token_count {
        let start = starts[i] as usize;
        words[i] = if i < inside {
            read64(bytes, start)
        } else {
            let mut b = [0u8; 8];
            b[..n - start].copy_from_slice(&bytes[start..]);
            u64::from_le_bytes(b)
        };
        // Branch-free: about one token in ten is long, at random.
        long[long_count.min(i)] = i as u32;
        long_count += (ends[i] - starts[i] > 8) as usize;
    }
    Some((token_count, long_count))
}

batch::multiversion!(ascii_word_tokens => ascii_word_tokens_body, (bytes: &[u8], t: &mut AsciiTokens) -> Option<(usize, usize)>);

#[inline]
fn combine(tokens: &[u64], c: &[u64]) -> u64 {
    let s = tokens
        .iter()
        .zip(c)
        .fold(0u64, |acc, (&t, &m)| acc.wrapping_add(m.wrapping_mul(t)));
    fmix64(s)
}

/// Writes the normalised form of `text` into `out`; returns whether it is pure ASCII.
///
/// Works line by line: `'\n'` ends both a normalisation segment and a final-sigma context, so
/// pure-ASCII lines (the bulk of most text) take the copy-and-lowercase path.
pub fn normalize_into(text: &str, out: &mut String) -> bool {
    out.clear();
    if text.is_ascii() {
        out.push_str(text);
        out.make_ascii_lowercase();
        return true;
    }
    for line in text.split_inclusive('\n') {
        if line.is_ascii() {
            let from = out.len();
            out.push_str(line);
            out[from..].make_ascii_lowercase();
        } else if is_nfkc_quick(line.chars()) == IsNormalized::Yes {
            out.push_str(&line.to_lowercase());
        } else {
            let nfkc: String = line.nfkc().collect();
            out.push_str(&nfkc.to_lowercase());
        }
    }
    false
}

/// Whole-text normalisation, the definition `normalize_into` must match.
#[cfg(test)]
fn normalize_reference(text: &str) -> String {
    text.nfkc().collect::<String>().to_lowercase()
}

/// Normalised text (see the module docs).
pub fn normalize(text: &str) -> String {
    let mut out = String::new();
    normalize_into(text, &mut out);
    out
}

/// Bit `i % 64` of `masks[i / 64]` is set when byte `i` belongs to an alphanumeric char.
///
/// A branch-free SIMD pass classifies ASCII bytes 64 at a time; multi-byte chars (only in
/// non-ASCII text) are then decoded one by one and their bytes marked if alphanumeric.
fn word_byte_mask(text: &str, ascii: bool, masks: &mut Vec<u64>) {
    let bytes = text.as_bytes();
    masks.clear();
    masks.resize(bytes.len().div_ceil(64), 0);
    let mut chunks = bytes.chunks_exact(64);
    for (m, chunk) in masks.iter_mut().zip(&mut chunks) {
        *m = ascii_alnum_mask64(chunk.try_into().expect("64 bytes"));
    }
    let tail = chunks.remainder();
    if !tail.is_empty() {
        let mut m = 0u64;
        for (i, &b) in tail.iter().enumerate() {
            m |= (b.is_ascii_alphanumeric() as u64) << i;
        }
        *masks.last_mut().expect("a word for the tail") = m;
    }
    if ascii {
        return;
    }
    // Only the lead bytes of multi-byte chars need a decode; they start at char boundaries.
    for (w, block) in bytes.chunks(64).enumerate() {
        let mut lead = 0u64;
        for (i, &b) in block.iter().enumerate() {
            lead |= ((b >= 0xC0) as u64) << i;
        }
        while lead != 0 {
            let i = w * 64 + lead.trailing_zeros() as usize;
            lead &= lead - 1;
            let ch = text[i..].chars().next().expect("a char at a lead byte");
            if ch.is_alphanumeric() {
                for p in i..i + ch.len_utf8() {
                    masks[p / 64] |= 1 << (p % 64);
                }
            }
        }
    }
}

/// ASCII letters and digits among 64 bytes, one bit each (lowercase input expected, but
/// uppercase letters count too).
#[inline]
fn ascii_alnum_mask64(chunk: &[u8; 64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of the x86_64 baseline; loads are unaligned and in bounds.
        unsafe {
            let mut m = 0u64;
            for q in 0..4 {
                let v = _mm_loadu_si128(chunk.as_ptr().add(16 * q) as *const __m128i);
                // Unsigned range checks as signed compares after shifting the range to -128.
                let in_range = |lo: u8, len: u8| {
                    let shifted = _mm_add_epi8(v, _mm_set1_epi8((128u8.wrapping_sub(lo)) as i8));
                    _mm_cmplt_epi8(shifted, _mm_set1_epi8((128u8.wrapping_add(len)) as i8))
                };
                let alnum = _mm_or_si128(
                    _mm_or_si128(in_range(b'a', 26), in_range(b'A', 26)),
                    in_range(b'0', 10),
                );
                m |= (_mm_movemask_epi8(alnum) as u32 as u64) << (16 * q);
            }
            m
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let mut m = 0u64;
        for (i, &b) in chunk.iter().enumerate() {
            m |= (b.is_ascii_alphanumeric() as u64) << i;
        }
        m
    }
}

/// `ascii_alnum_mask64`, plus the bytes with the high bit set (non-ASCII), in one pass.
#[inline]
fn ascii_alnum_and_high_mask64(chunk: &[u8; 64]) -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let mut high = 0u64;
        for q in 0..4 {
            // SAFETY: SSE2 is part of the x86_64 baseline; the load is unaligned and in bounds.
            let bits = unsafe {
                _mm_movemask_epi8(_mm_loadu_si128(chunk.as_ptr().add(16 * q) as *const __m128i))
            };
            high |= (bits as u32 as u64) << (16 * q);
        }
        (ascii_alnum_mask64(chunk), high)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let mut high = 0u64;
        for (i, &b) in chunk.iter().enumerate() {
            high |= ((b >> 7) as u64) << i;
        }
        (ascii_alnum_mask64(chunk), high)
    }
}

/// `ascii_alnum_and_high_mask64` in one AVX-512BW step.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
unsafe fn ascii_alnum_and_high_mask64_avx512(chunk: &[u8; 64]) -> (u64, u64) {
    use std::arch::x86_64::*;
    let v = _mm512_loadu_si512(chunk.as_ptr() as *const _);
    // Unsigned range checks: `(b | 0x20) - 'a' < 26` for letters, `b - '0' < 10` for digits.
    let folded = _mm512_or_si512(v, _mm512_set1_epi8(0x20));
    let letter = _mm512_cmplt_epu8_mask(
        _mm512_sub_epi8(folded, _mm512_set1_epi8(b'a' as i8)),
        _mm512_set1_epi8(26),
    );
    let digit = _mm512_cmplt_epu8_mask(
        _mm512_sub_epi8(v, _mm512_set1_epi8(b'0' as i8)),
        _mm512_set1_epi8(10),
    );
    (letter | digit, _mm512_movepi8_mask(v))
}

/// First position >= `pos` whose bit is `want`; `masks.len() * 64` if none.
#[inline]
fn next_bit(masks: &[u64], pos: usize, want: bool) -> usize {
    let mut w = pos / 64;
    if w >= masks.len() {
        return masks.len() * 64;
    }
    let flip = if want { 0 } else { u64::MAX };
    let mut m = (masks[w] ^ flip) & (u64::MAX << (pos % 64));
    while m == 0 {
        w += 1;
        if w == masks.len() {
            return masks.len() * 64;
        }
        m = masks[w] ^ flip;
    }
    w * 64 + m.trailing_zeros() as usize
}

fn word_token_hashes(text: &str, ascii: bool, seed: u64, masks: &mut Vec<u64>, out: &mut Vec<u64>) {
    word_byte_mask(text, ascii, masks);
    let bytes = text.as_bytes();
    let n = bytes.len();
    let mut pos = 0;
    loop {
        let start = next_bit(masks, pos, true);
        if start >= n {
            break;
        }
        let end = next_bit(masks, start, false).min(n);
        out.push(token_hash(&bytes[start..end], seed));
        pos = end;
    }
}

/// Plain char-by-char word tokeniser: the definition the bitmask tokeniser must match.
#[cfg(test)]
fn word_token_hashes_reference(text: &str, seed: u64) -> Vec<u64> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| xxh3_64_with_seed(w.as_bytes(), seed))
        .collect()
}

/// The words of the normalised text (for tests and documentation).
pub fn words(text: &str) -> Vec<String> {
    let norm = normalize(text);
    norm.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Hash of the normalised text, for the exact-duplicate pass: `xxh3_64_with_seed(utf8, 0)`.
pub fn exact_hash(text: &str, scratch: &mut Scratch) -> u64 {
    normalize_into(text, &mut scratch.text);
    xxh3_64_with_seed(scratch.text.as_bytes(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hashes(s: &Shingler, text: &str) -> Vec<u64> {
        let mut out = Vec::new();
        s.for_each_shingle(text, &mut Scratch::default(), |h| out.push(h));
        out
    }

    #[test]
    fn words_split_on_non_alphanumerics() {
        assert_eq!(
            words("Hello, WORLD! snake_case x2"),
            ["hello", "world", "snake", "case", "x2"]
        );
        assert_eq!(words("Ｆｕｌｌ width ﬁ"), ["full", "width", "fi"]);
        assert_eq!(words("ΣΟΦΟΣ"), ["σοφος"]);
        assert!(words("  ... ").is_empty());
    }

    #[test]
    fn shingle_counts() {
        let s = Shingler::new(3, Tokenizer::Word, 1).unwrap();
        assert_eq!(hashes(&s, "a b c d e").len(), 3);
        assert_eq!(hashes(&s, "a b").len(), 1);
        assert!(hashes(&s, "").is_empty());
        assert!(hashes(&s, " \t\n,;").is_empty());
        // Case and width do not matter; punctuation only separates.
        assert_eq!(hashes(&s, "A b, C d"), hashes(&s, "a B c D"));
        assert_eq!(hashes(&s, "ａ b c"), hashes(&s, "A B C"));
    }

    #[test]
    fn ascii_and_unicode_paths_agree() {
        let s = Shingler::new(2, Tokenizer::Word, 7).unwrap();
        // The trailing "é" forces the Unicode path; its own word only adds shingles at the end.
        let a = hashes(&s, "one two three four");
        let b = hashes(&s, "one two three four é");
        assert_eq!(&b[..a.len()], &a[..]);
        assert_eq!(b.len(), a.len() + 1);
    }

    #[test]
    fn char_tokens_collapse_whitespace() {
        let s = Shingler::new(3, Tokenizer::Char, 1).unwrap();
        assert_eq!(hashes(&s, "  ab \n\t cd  "), hashes(&s, "ab cd"));
        assert_eq!(hashes(&s, "ab cd").len(), 3);
        assert_eq!(hashes(&s, "ab").len(), 1);
        assert!(hashes(&s, "   ").is_empty());
    }

    #[test]
    fn order_and_seed_matter() {
        let s = Shingler::new(2, Tokenizer::Word, 1).unwrap();
        let t = Shingler::new(2, Tokenizer::Word, 2).unwrap();
        assert_ne!(hashes(&s, "a b"), hashes(&s, "b a"));
        assert_ne!(hashes(&s, "a b"), hashes(&t, "a b"));
    }

    #[test]
    fn line_wise_normalisation_matches_whole_text() {
        for text in [
            "ASCII only\nLines",
            "ΟΔΥΣΣΕΥΣ\nΣ\nαΣ b\nAΣ\n",
            "ﬁne\nＦＵＬＬ\ne\u{301}\n\u{301}x",
            "İstanbul\n\nKELVİN K",
            "mixed ascii then é\nplain\n",
        ] {
            let mut out = String::new();
            normalize_into(text, &mut out);
            assert_eq!(out, normalize_reference(text), "{text:?}");
        }
    }

    #[test]
    fn bitmask_tokeniser_matches_reference() {
        let mut state = 11u64;
        let alphabet: Vec<char> = "ab Z9_-.,\n\té中ß①ﬁ ".chars().collect();
        for len in [0, 1, 5, 63, 64, 65, 127, 128, 129, 300] {
            for _ in 0..20 {
                let text: String = (0..len)
                    .map(|_| alphabet[(splitmix64(&mut state) % alphabet.len() as u64) as usize])
                    .collect();
                let norm = normalize(&text);
                let mut got = Vec::new();
                word_token_hashes(&norm, norm.is_ascii(), 3, &mut Vec::new(), &mut got);
                assert_eq!(got, word_token_hashes_reference(&norm, 3), "{text:?}");
            }
        }
        let all: String = (0u8..128).map(char::from).collect();
        let mut got = Vec::new();
        word_token_hashes(&all, true, 0, &mut Vec::new(), &mut got);
        assert_eq!(got, word_token_hashes_reference(&all, 0));
        assert_eq!(got.len(), 3);
    }

    #[test]
    fn inlined_token_hash_equals_xxh3() {
        let mut state = 5u64;
        let data: Vec<u8> = (0..64).map(|_| splitmix64(&mut state) as u8).collect();
        for seed in [0, 1, 42, u64::MAX, 0x1234_5678_9ABC_DEF0] {
            for len in 0..=40 {
                for start in [0, 3, 17] {
                    let b = &data[start..start + len];
                    assert_eq!(
                        token_hash(b, seed),
                        xxh3_64_with_seed(b, seed),
                        "len {len} seed {seed}"
                    );
                }
            }
        }
    }

    /// Random texts over `alphabet`, with long letter runs now and then (tokens over 8 and 16
    /// bytes) and lengths around the 64-byte blocks.
    fn random_texts(alphabet: &str, state: &mut u64) -> Vec<String> {
        let alphabet: Vec<char> = alphabet.chars().collect();
        let mut texts = Vec::new();
        for len in [
            0, 1, 3, 4, 5, 8, 9, 17, 40, 63, 64, 65, 127, 128, 129, 500, 3000,
        ] {
            for rep in 0..30 {
                texts.push(
                    (0..len)
                        .map(|i| {
                            let r = splitmix64(state);
                            if rep % 3 == 0 && i % 23 != 0 {
                                alphabet[(r % 2) as usize]
                            } else {
                                alphabet[(r % alphabet.len() as u64) as usize]
                            }
                        })
                        .collect(),
                );
            }
        }
        texts
    }

    #[test]
    fn fused_ascii_path_matches_reference() {
        let mut state = 3u64;
        let mut texts = random_texts("aZ9q \n,.-_xYkLmnopQRSTuv", &mut state);
        // Tokens of exactly 8, 9, 16 and 17 bytes, at the very end and after a 64-byte block.
        for w in [
            "abcdefgh",
            "ABCDEFGHI",
            "abcdefghijklmnop",
            "abcdefghijklmnopq",
        ] {
            texts.push(format!("x {w}"));
            texts.push(format!("{} {w}", "y".repeat(63)));
            texts.push(format!("{w}{}", " ".repeat(64 - w.len())));
        }
        // Several ASCII_BLOCK blocks: a token straddling the first cut, a single run longer than
        // a block, and a mix of short texts.
        texts.push(format!(
            "{}abcdefghij {}",
            "ab ".repeat(5460),
            "word ".repeat(5000)
        ));
        texts.push(format!("x {} y z", "q".repeat(40_000)));
        texts.push(texts[..300].join(" ").repeat(2));
        // Non-ASCII in the first block, in the tail, and after full blocks.
        texts.push(format!("{}é", "word ".repeat(13)));
        texts.push(format!("é{}", "word ".repeat(30)));
        texts.push(format!("{}Ünï", "word ".repeat(40)));
        texts.push(format!("{}Ünï", "word ".repeat(10_000)));
        let mut sc = Scratch::default();
        for ngram in [1, 2, 3, 5, 7] {
            let s = Shingler::new(ngram, Tokenizer::Word, 9).unwrap();
            let c = position_multipliers(ngram);
            for text in &texts {
                let tokens = word_token_hashes_reference(&normalize(text), 9);
                let want: Vec<u64> = if tokens.is_empty() {
                    Vec::new()
                } else if tokens.len() < ngram {
                    vec![combine(&tokens, &c)]
                } else {
                    tokens.windows(ngram).map(|w| combine(w, &c)).collect()
                };
                for level in Level::available() {
                    let got = s.shingle_hashes_at(level, text, &mut sc);
                    assert_eq!(got, want, "{level:?} ngram {ngram} {text:?}");
                }
                let mut low = Vec::new();
                s.shingle_hashes_low32(text, &mut sc, &mut low);
                let want_low: Vec<u32> = want.iter().map(|&h| h as u32).collect();
                assert_eq!(low, want_low);
            }
        }
    }

    #[test]
    fn char_shingles_match_reference_at_every_level() {
        let mut state = 5u64;
        let texts = random_texts("aZ é\t,Σ\nxq", &mut state);
        let mut sc = Scratch::default();
        for ngram in [1, 3, 5, 9] {
            let s = Shingler::new(ngram, Tokenizer::Char, 2).unwrap();
            let c = position_multipliers(ngram);
            for text in &texts {
                let norm = normalize(text);
                let chars: Vec<String> = norm
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
                    .chars()
                    .map(String::from)
                    .collect();
                let tokens: Vec<u64> = chars
                    .iter()
                    .map(|ch| xxh3_64_with_seed(ch.as_bytes(), 2))
                    .collect();
                let want: Vec<u64> = if tokens.is_empty() {
                    Vec::new()
                } else if tokens.len() < ngram {
                    vec![combine(&tokens, &c)]
                } else {
                    tokens.windows(ngram).map(|w| combine(w, &c)).collect()
                };
                for level in Level::available() {
                    assert_eq!(
                        s.shingle_hashes_at(level, text, &mut sc),
                        want,
                        "{level:?} {text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn short_token_kernel_equals_xxh3_at_every_level() {
        let mut state = 7u64;
        let text: Vec<u8> = (0..4096)
            .map(|_| {
                let r = splitmix64(&mut state);
                b"aZ09qxYM"[(r % 8) as usize]
            })
            .collect();
        let mut words = Vec::new();
        let (mut starts, mut ends) = (Vec::new(), Vec::new());
        for start in 0..text.len() - 8 {
            let len = 1 + start % 8;
            words.push(read64(&text, start));
            starts.push(start as u32);
            ends.push((start + len) as u32);
        }
        for seed in [0, 1, 9, u64::MAX] {
            let (keys, _) = short_keys(seed);
            let want: Vec<u64> = starts
                .iter()
                .zip(&ends)
                .map(|(&s, &e)| {
                    let lower: Vec<u8> = text[s as usize..e as usize]
                        .iter()
                        .map(|b| b | 0x20)
                        .collect();
                    xxh3_64_with_seed(&lower, seed)
                })
                .collect();
            for level in Level::available() {
                let mut got = vec![0; want.len()];
                batch::short_token_hashes(level, &words, &starts, &ends, keys, &mut got);
                assert_eq!(got, want, "{level:?} seed {seed}");
            }
        }
    }

    #[test]
    fn zero_ngram_is_an_error() {
        assert!(Shingler::new(0, Tokenizer::Word, 1).is_err());
        assert!(Shingler::new(MAX_NGRAM, Tokenizer::Word, 1).is_ok());
        assert!(Shingler::new(MAX_NGRAM + 1, Tokenizer::Char, 1).is_err());
        assert!(Shingler::new(usize::MAX, Tokenizer::Word, 1).is_err());
        assert!(Tokenizer::parse("bpe").is_err());
    }

    #[test]
    fn exact_hash_normalises() {
        let mut sc = Scratch::default();
        assert_eq!(exact_hash("Hello", &mut sc), exact_hash("hELLO", &mut sc));
        assert_ne!(exact_hash("Hello", &mut sc), exact_hash("Hello ", &mut sc));
    }
}
