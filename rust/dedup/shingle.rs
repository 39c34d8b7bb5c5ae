//! Normalisation, tokenising and shingle hashing.
//!
//! * Normalised text: Unicode NFKC, then full lowercase (`str::to_lowercase`, which also applies
//!   the final-sigma rule, like Python's `str.lower`). ASCII text takes a copy-and-lowercase path.
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

/// Odd multipliers `C_0..C_{n-1}` for the shingle combine.
pub fn position_multipliers(ngram: usize) -> Vec<u64> {
    let mut state = POSITION_SEED;
    (0..ngram).map(|_| splitmix64(&mut state) | 1).collect()
}

/// Shingling parameters, validated once.
#[derive(Debug, Clone)]
pub struct Shingler {
    ngram: usize,
    tokenizer: Tokenizer,
    seed: u64,
    multipliers: Vec<u64>,
    ascii_char_hashes: Vec<u64>,
}

/// Per-thread buffers reused across documents.
#[derive(Default)]
pub struct Scratch {
    text: String,
    tokens: Vec<u64>,
}

impl Shingler {
    pub fn new(ngram: usize, tokenizer: Tokenizer, seed: u64) -> Result<Self> {
        if ngram == 0 {
            return Err(Error::value("ngram must be at least 1, got 0"));
        }
        let ascii_char_hashes = match tokenizer {
            Tokenizer::Char => (0u8..128).map(|c| xxh3_64_with_seed(&[c], seed)).collect(),
            Tokenizer::Word => Vec::new(),
        };
        Ok(Shingler {
            ngram,
            tokenizer,
            seed,
            multipliers: position_multipliers(ngram),
            ascii_char_hashes,
        })
    }

    pub fn ngram(&self) -> usize {
        self.ngram
    }

    /// Calls `emit` with the 64-bit hash of every shingle of `text`, in order (repeats included).
    pub fn for_each_shingle(&self, text: &str, scratch: &mut Scratch, mut emit: impl FnMut(u64)) {
        let ascii = normalize_into(text, &mut scratch.text);
        scratch.tokens.clear();
        match self.tokenizer {
            Tokenizer::Word => {
                word_token_hashes(&scratch.text, ascii, self.seed, &mut scratch.tokens)
            }
            Tokenizer::Char => self.char_token_hashes(&scratch.text, &mut scratch.tokens),
        }
        let tokens = &scratch.tokens;
        if tokens.is_empty() {
            return;
        }
        let c = &self.multipliers;
        if tokens.len() < self.ngram {
            emit(combine(tokens, c));
            return;
        }
        if self.ngram == 5 {
            // The default gets a fixed-size window so the combine is fully unrolled.
            let c5: [u64; 5] = [c[0], c[1], c[2], c[3], c[4]];
            for w in tokens.windows(5) {
                let s = c5[0]
                    .wrapping_mul(w[0])
                    .wrapping_add(c5[1].wrapping_mul(w[1]))
                    .wrapping_add(c5[2].wrapping_mul(w[2]))
                    .wrapping_add(c5[3].wrapping_mul(w[3]))
                    .wrapping_add(c5[4].wrapping_mul(w[4]));
                emit(fmix64(s));
            }
        } else {
            for w in tokens.windows(self.ngram) {
                emit(combine(w, c));
            }
        }
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
                xxh3_64_with_seed(ch.encode_utf8(&mut buf).as_bytes(), self.seed)
            };
            out.push(h);
        }
    }
}

#[inline]
fn combine(tokens: &[u64], c: &[u64]) -> u64 {
    let s = tokens
        .iter()
        .zip(c)
        .fold(0u64, |acc, (&t, &m)| acc.wrapping_add(m.wrapping_mul(t)));
    fmix64(s)
}

/// Writes the normalised form of `text` into `out`; returns whether it is pure ASCII.
pub fn normalize_into(text: &str, out: &mut String) -> bool {
    out.clear();
    if text.is_ascii() {
        out.push_str(text);
        out.make_ascii_lowercase();
        return true;
    }
    if is_nfkc_quick(text.chars()) == IsNormalized::Yes {
        out.push_str(&text.to_lowercase());
    } else {
        let nfkc: String = text.nfkc().collect();
        out.push_str(&nfkc.to_lowercase());
    }
    false
}

/// Normalised text (see the module docs).
pub fn normalize(text: &str) -> String {
    let mut out = String::new();
    normalize_into(text, &mut out);
    out
}

/// A lookup table of ASCII alphanumerics.
const ASCII_WORD: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 128 {
        t[i] = (i as u8).is_ascii_alphanumeric();
        i += 1;
    }
    t
};

fn word_token_hashes(text: &str, ascii: bool, seed: u64, out: &mut Vec<u64>) {
    if ascii {
        let bytes = text.as_bytes();
        let n = bytes.len();
        let mut i = 0;
        while i < n {
            // Skip separators, then take the run of word bytes.
            while i < n && !ASCII_WORD[bytes[i] as usize] {
                i += 1;
            }
            let start = i;
            while i < n && ASCII_WORD[bytes[i] as usize] {
                i += 1;
            }
            if i > start {
                out.push(xxh3_64_with_seed(&bytes[start..i], seed));
            }
        }
    } else {
        let mut start: Option<usize> = None;
        for (i, ch) in text.char_indices() {
            if ch.is_alphanumeric() {
                start.get_or_insert(i);
            } else if let Some(s) = start.take() {
                out.push(xxh3_64_with_seed(&text.as_bytes()[s..i], seed));
            }
        }
        if let Some(s) = start {
            out.push(xxh3_64_with_seed(&text.as_bytes()[s..], seed));
        }
    }
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
    fn zero_ngram_is_an_error() {
        assert!(Shingler::new(0, Tokenizer::Word, 1).is_err());
        assert!(Tokenizer::parse("bpe").is_err());
    }

    #[test]
    fn exact_hash_normalises() {
        let mut sc = Scratch::default();
        assert_eq!(exact_hash("Hello", &mut sc), exact_hash("hELLO", &mut sc));
        assert_ne!(exact_hash("Hello", &mut sc), exact_hash("Hello ", &mut sc));
    }
}
