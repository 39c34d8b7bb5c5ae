//! The on-disk LSH index: signatures and keys, with parameters, version and checksum.
//!
//! Little-endian throughout:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `SFLSHIDX` |
//! | 8 | 4 | format version (u32) = 1 |
//! | 12 | 4 | key kind (u32): 0 = int64, 1 = UTF-8 strings |
//! | 16 | 8 | threshold (f64) |
//! | 24 | 4 | num_perm (u32) |
//! | 28 | 4 | bands (u32) |
//! | 32 | 4 | rows (u32) |
//! | 36 | 4 | reserved, 0 |
//! | 40 | 8 | n, number of entries (u64) |
//! | 48 | 4 n num_perm | signatures, row-major u32 |
//! | .. | 8 n | int keys (i64), or: (n + 1) u64 byte offsets, then the concatenated UTF-8 keys |
//! | end - 8 | 8 | xxh3_64 (seed 0) of every byte before it |
//!
//! Files are written to a temporary sibling, synced, then renamed over the target, so readers
//! see either the old file or the complete new one.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::error::{Error, Result};

pub const MAGIC: &[u8; 8] = b"SFLSHIDX";
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
/// Largest `num_perm` written or read (MinHash uses 64 to 1024 permutations): bounds what a
/// tiny file with one entry can make a reader allocate per entry.
pub const MAX_NUM_PERM: usize = 1 << 16;

/// Index parameters stored in the header.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IndexHeader {
    pub threshold: f64,
    pub num_perm: usize,
    pub bands: usize,
    pub rows: usize,
}

/// Keys to write.
pub enum KeysRef<'a> {
    Int(&'a [i64]),
    Str(&'a [&'a str]),
}

/// Keys read back.
#[derive(Debug, PartialEq)]
pub enum Keys {
    Int(Vec<i64>),
    Str(Vec<String>),
}

/// A loaded index file.
#[derive(Debug)]
pub struct IndexFile {
    pub header: IndexHeader,
    pub signatures: Vec<u32>,
    pub keys: Keys,
}

struct HashingWriter<W: Write> {
    inner: W,
    hasher: Xxh3,
}

impl<W: Write> HashingWriter<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.hasher.update(bytes);
        self.inner.write_all(bytes)
    }
}

fn u32_field(name: &str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| Error::value(format!("{name} = {v} does not fit the index format")))
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    path.with_file_name(format!(".{name}.tmp-{}-{nanos}", std::process::id()))
}

/// Writes an index atomically (temporary sibling + rename).
pub fn write_index(
    path: &Path,
    header: IndexHeader,
    signatures: &[u32],
    keys: KeysRef<'_>,
) -> Result<()> {
    let k = header.num_perm;
    if k > MAX_NUM_PERM {
        return Err(Error::value(format!(
            "num_perm = {k} exceeds the index format's limit of {MAX_NUM_PERM}"
        )));
    }
    if k == 0 || !signatures.len().is_multiple_of(k) {
        return Err(Error::value(format!(
            "signatures of {} values do not split into rows of num_perm = {k}",
            signatures.len()
        )));
    }
    let n = signatures.len() / k;
    let (kind, n_keys) = match &keys {
        KeysRef::Int(v) => (0u32, v.len()),
        KeysRef::Str(v) => (1u32, v.len()),
    };
    if n_keys != n {
        return Err(Error::value(format!("{n} signatures but {n_keys} keys")));
    }
    let tmp = temp_sibling(path);
    let result = (|| -> Result<()> {
        let file = File::create(&tmp)?;
        let mut w = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            hasher: Xxh3::new(),
        };
        w.put(MAGIC)?;
        w.put(&VERSION.to_le_bytes())?;
        w.put(&kind.to_le_bytes())?;
        w.put(&header.threshold.to_le_bytes())?;
        w.put(&u32_field("num_perm", k)?.to_le_bytes())?;
        w.put(&u32_field("bands", header.bands)?.to_le_bytes())?;
        w.put(&u32_field("rows", header.rows)?.to_le_bytes())?;
        w.put(&0u32.to_le_bytes())?;
        w.put(&(n as u64).to_le_bytes())?;
        let mut buf = Vec::with_capacity(1 << 16);
        for chunk in signatures.chunks(1 << 14) {
            buf.clear();
            chunk
                .iter()
                .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
            w.put(&buf)?;
        }
        match keys {
            KeysRef::Int(v) => {
                for chunk in v.chunks(1 << 13) {
                    buf.clear();
                    chunk
                        .iter()
                        .for_each(|v| buf.extend_from_slice(&v.to_le_bytes()));
                    w.put(&buf)?;
                }
            }
            KeysRef::Str(v) => {
                let mut offset = 0u64;
                w.put(&offset.to_le_bytes())?;
                for s in v {
                    offset += s.len() as u64;
                    w.put(&offset.to_le_bytes())?;
                }
                for s in v {
                    w.put(s.as_bytes())?;
                }
            }
        }
        let digest = w.hasher.digest();
        w.inner.write_all(&digest.to_le_bytes())?;
        let file = w
            .inner
            .into_inner()
            .map_err(|e| Error::Io(e.error().to_string()))?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(|e| match e {
        Error::Io(m) => Error::Io(format!("could not write LSH index {}: {m}", path.display())),
        other => other,
    })
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                Error::value(format!(
                    "LSH index {} is truncated: {what} needs {len} bytes at offset {}",
                    self.path.display(),
                    self.pos
                ))
            })?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
}

/// Reads and verifies an index file (see [`parse_index`]). The file is read whole; a file that
/// cannot be read is an `Io` error, a malformed one a `Value` error.
pub fn read_index(path: &Path) -> Result<IndexFile> {
    let data = fs::read(path)
        .map_err(|e| Error::Io(format!("could not read LSH index {}: {e}", path.display())))?;
    parse_index(&data, path)
}

/// Parses and verifies the bytes of an index file; `path` only names it in errors.
///
/// Untrusted input is safe: every size the header declares is checked against the bytes
/// present before anything is allocated, so a `Value` error ("... is not a valid LSH index:
/// ...") comes back for any malformed input, and the result takes memory linear in
/// `data.len()`: at most about four times it (the signatures, and per string key a 24-byte
/// `String` plus its bytes, where the file spends at least `4 * num_perm + 8` bytes on each
/// entry). Checked:
/// magic, version, checksum, key kind, reserved field, threshold in (0, 1], `1 <= bands * rows
/// <= num_perm <= MAX_NUM_PERM`, `n` against the file size, string key offsets (starting at 0,
/// non-decreasing, ending at the end of the key bytes), UTF-8 keys, and no trailing bytes.
pub fn parse_index(data: &[u8], path: &Path) -> Result<IndexFile> {
    let bad = |msg: String| {
        Error::value(format!(
            "{} is not a valid LSH index: {msg}",
            path.display()
        ))
    };
    if data.len() < 8 || &data[..8] != MAGIC {
        return Err(bad("wrong magic bytes (expected SFLSHIDX)".into()));
    }
    if data.len() < HEADER_LEN + 8 {
        return Err(bad(format!(
            "truncated: {} bytes, the header alone needs {}",
            data.len(),
            HEADER_LEN + 8
        )));
    }
    let (body, tail) = data.split_at(data.len() - 8);
    let stored = u64::from_le_bytes(tail.try_into().expect("8 bytes"));
    let mut r = Reader {
        bytes: body,
        pos: 8,
        path,
    };
    let version = r.u32("version")?;
    if version != VERSION {
        return Err(bad(format!(
            "format version {version}, this build reads version {VERSION}"
        )));
    }
    if xxh3_64(body) != stored {
        return Err(bad(
            "checksum mismatch (the file is corrupt or truncated)".into()
        ));
    }
    let kind = r.u32("key kind")?;
    let threshold = f64::from_le_bytes(r.take(8, "threshold")?.try_into().expect("8 bytes"));
    let num_perm = r.u32("num_perm")? as usize;
    let bands = r.u32("bands")? as usize;
    let rows = r.u32("rows")? as usize;
    let reserved = r.u32("reserved")?;
    let n = r.u64("n")?;
    if kind > 1 {
        return Err(bad(format!("unknown key kind {kind}")));
    }
    if reserved != 0 {
        return Err(bad(format!("reserved field is {reserved}, expected 0")));
    }
    if num_perm > MAX_NUM_PERM {
        return Err(bad(format!(
            "num_perm = {num_perm} exceeds the limit of {MAX_NUM_PERM}"
        )));
    }
    super::lsh::check_threshold(threshold).map_err(|e| bad(e.to_string()))?;
    super::lsh::check_banding(bands, rows, num_perm).map_err(|e| bad(e.to_string()))?;
    // Every entry takes 4 * num_perm bytes of signature and 8 bytes of key (an int64, or a u64
    // offset): check the count against the bytes present before allocating anything.
    let avail = (body.len() - HEADER_LEN) as u64;
    let per_entry = 4 * num_perm as u64 + 8;
    let fixed = if kind == 1 { 8 } else { 0 };
    let needed = n.checked_mul(per_entry).and_then(|v| v.checked_add(fixed));
    if needed.is_none_or(|v| v > avail) {
        return Err(bad(format!(
            "n = {n} entries of {per_entry} bytes do not fit in the {avail} bytes after the \
             header (truncated or corrupt)"
        )));
    }
    let n = usize::try_from(n).map_err(|_| bad("entry count too large".into()))?;
    let sig_len = n * num_perm * 4; // <= avail: no overflow
    let signatures: Vec<u32> = r
        .take(sig_len, "signatures")?
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let keys = if kind == 0 {
        Keys::Int(
            r.take(n * 8, "keys")?
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect(),
        )
    } else {
        let offsets = r.take((n + 1) * 8, "key offsets")?;
        let offset =
            |i: usize| u64::from_le_bytes(offsets[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        if offset(0) != 0 {
            return Err(bad(format!(
                "the first key offset is {}, expected 0",
                offset(0)
            )));
        }
        let blob_len = r.bytes.len() - r.pos;
        if offset(n) != blob_len as u64 {
            return Err(bad(format!(
                "the key offsets end at {}, but {blob_len} key bytes follow them",
                offset(n)
            )));
        }
        let blob = r.take(blob_len, "key bytes")?;
        let mut keys = Vec::with_capacity(n);
        let mut start = 0usize;
        for i in 1..=n {
            let end = offset(i);
            if end < start as u64 || end > blob_len as u64 {
                return Err(bad(format!(
                    "key offset {i} = {end} is out of order (previous {start}, key bytes {blob_len})"
                )));
            }
            let end = end as usize;
            let key = std::str::from_utf8(&blob[start..end])
                .map_err(|_| bad(format!("key {} is not valid UTF-8", i - 1)))?;
            keys.push(key.to_owned());
            start = end;
        }
        Keys::Str(keys)
    };
    if r.pos != body.len() {
        return Err(bad(format!(
            "{} unexpected bytes before the checksum",
            body.len() - r.pos
        )));
    }
    Ok(IndexFile {
        header: IndexHeader {
            threshold,
            num_perm,
            bands,
            rows,
        },
        signatures,
        keys,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("slimforge-idx-{tag}-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trip_and_corruption() {
        let d = tmpdir("rt");
        let h = IndexHeader {
            threshold: 0.8,
            num_perm: 4,
            bands: 2,
            rows: 2,
        };
        let sigs: Vec<u32> = (0..12).collect();
        let p = d.join("a.idx");
        write_index(&p, h, &sigs, KeysRef::Str(&["x", "", "ü"])).unwrap();
        let f = read_index(&p).unwrap();
        assert_eq!(f.header, h);
        assert_eq!(f.signatures, sigs);
        assert_eq!(f.keys, Keys::Str(vec!["x".into(), "".into(), "ü".into()]));
        write_index(&p, h, &sigs, KeysRef::Int(&[7, 8, 9])).unwrap();
        assert_eq!(read_index(&p).unwrap().keys, Keys::Int(vec![7, 8, 9]));

        let mut bytes = fs::read(&p).unwrap();
        bytes[60] ^= 1;
        fs::write(&p, &bytes).unwrap();
        assert!(read_index(&p).unwrap_err().to_string().contains("checksum"));
        bytes[60] ^= 1;
        fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        assert!(read_index(&p).is_err());
        fs::write(&p, b"not an index").unwrap();
        assert!(read_index(&p).unwrap_err().to_string().contains("magic"));
        assert!(write_index(&p, h, &sigs, KeysRef::Int(&[1])).is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    fn fix_checksum(b: &mut [u8]) {
        let n = b.len() - 8;
        let d = xxh3_64(&b[..n]);
        b[n..].copy_from_slice(&d.to_le_bytes());
    }

    fn sample(keys: KeysRef<'_>, tag: &str) -> Vec<u8> {
        let d = tmpdir(tag);
        let p = d.join("s.idx");
        let h = IndexHeader {
            threshold: 0.5,
            num_perm: 4,
            bands: 2,
            rows: 2,
        };
        let n = match &keys {
            KeysRef::Int(v) => v.len(),
            KeysRef::Str(v) => v.len(),
        };
        let sigs: Vec<u32> = (0..4 * n as u32).collect();
        write_index(&p, h, &sigs, keys).unwrap();
        let b = fs::read(&p).unwrap();
        fs::remove_dir_all(&d).unwrap();
        b
    }

    fn err_of(b: &[u8]) -> String {
        parse_index(b, Path::new("x.idx")).unwrap_err().to_string()
    }

    #[test]
    fn header_fields_are_checked_against_the_file() {
        let base = sample(KeysRef::Str(&["ab", "c", ""]), "fields");
        assert!(parse_index(&base, Path::new("x.idx")).is_ok());
        let with = |at: usize, bytes: &[u8]| {
            let mut b = base.clone();
            b[at..at + bytes.len()].copy_from_slice(bytes);
            fix_checksum(&mut b);
            b
        };
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (with(12, &7u32.to_le_bytes()), "unknown key kind 7"),
            (with(16, &f64::NAN.to_le_bytes()), "threshold"),
            (with(16, &2.0f64.to_le_bytes()), "threshold"),
            (with(24, &u32::MAX.to_le_bytes()), "exceeds the limit"),
            (with(24, &3u32.to_le_bytes()), "exceeds num_perm"),
            (with(28, &0u32.to_le_bytes()), "at least 1"),
            (with(36, &1u32.to_le_bytes()), "reserved"),
            (with(40, &u64::MAX.to_le_bytes()), "do not fit"),
            (with(40, &(1u64 << 61).to_le_bytes()), "do not fit"),
            (with(40, &4u64.to_le_bytes()), "do not fit"),
            (with(40, &2u64.to_le_bytes()), "first key offset"),
            // first offset (after 3 * 16 signature bytes) not 0; an offset going backwards
            (with(96, &1u64.to_le_bytes()), "first key offset"),
            (with(104, &9u64.to_le_bytes()), "out of order"),
            (with(128, &[0xff]), "not valid UTF-8"),
        ];
        for (b, want) in cases {
            let e = err_of(&b);
            assert!(e.contains(want), "{e} does not contain {want}");
        }
        for cut in 0..base.len() {
            assert!(parse_index(&base[..cut], Path::new("x.idx")).is_err());
        }
        let padded = |b: &[u8], extra: usize| {
            let mut v = b[..b.len() - 8].to_vec();
            v.resize(v.len() + extra + 8, 0);
            fix_checksum(&mut v);
            v
        };
        assert!(err_of(&padded(&base, 8)).contains("key offsets end at"));
        let ints = sample(KeysRef::Int(&[5, 6]), "ints");
        assert!(parse_index(&ints, Path::new("x.idx")).is_ok());
        assert!(err_of(&padded(&ints, 3)).contains("unexpected bytes"));
        let h = IndexHeader {
            threshold: 0.5,
            num_perm: MAX_NUM_PERM + 1,
            bands: 1,
            rows: 1,
        };
        let d = tmpdir("max");
        let sigs = vec![0u32; MAX_NUM_PERM + 1];
        assert!(write_index(&d.join("m.idx"), h, &sigs, KeysRef::Int(&[0]))
            .unwrap_err()
            .to_string()
            .contains("limit"));
        fs::remove_dir_all(&d).unwrap();
    }

    /// Cheap randomized mutations (byte flips, truncations, insertions, field overwrites, with
    /// and without a repaired checksum) on every `cargo test`; `make fuzz` runs cargo-fuzz.
    #[test]
    fn fuzz_mutated_index_files_never_panic() {
        let seeds = [
            sample(KeysRef::Str(&["ab", "c", "", "ü"]), "fz1"),
            sample(KeysRef::Int(&[1, -2, 3]), "fz2"),
            sample(KeysRef::Int(&[]), "fz3"),
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let fields = [8usize, 12, 16, 24, 28, 32, 36, 40, 48, 56, 64];
        for i in 0..20_000 {
            let mut b = seeds[i % seeds.len()].clone();
            for _ in 0..=(rand() % 3) {
                let len = b.len().max(1);
                match rand() % 5 {
                    0 => {
                        let at = rand() as usize % len;
                        if at < b.len() {
                            b[at] ^= 1 << (rand() % 8);
                        }
                    }
                    1 => b.truncate(rand() as usize % len),
                    2 => {
                        let at = rand() as usize % (b.len() + 1);
                        b.insert(at, rand() as u8);
                    }
                    _ => {
                        let at = fields[rand() as usize % fields.len()];
                        let v = match rand() % 4 {
                            0 => u64::MAX,
                            1 => rand() % 8,
                            2 => 1u64 << (rand() % 64),
                            _ => rand(),
                        };
                        let w = if rand() % 2 == 0 { 4 } else { 8 };
                        if at + w <= b.len() {
                            b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
                        }
                    }
                }
            }
            if b.len() >= 16 && rand() % 4 != 0 {
                fix_checksum(&mut b);
            }
            let _ = parse_index(&b, Path::new("fuzz.idx"));
        }
    }
}
