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
    if k == 0 || signatures.len() % k != 0 {
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

/// Reads and verifies an index file.
pub fn read_index(path: &Path) -> Result<IndexFile> {
    let data = fs::read(path)
        .map_err(|e| Error::Io(format!("could not read LSH index {}: {e}", path.display())))?;
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
    let _reserved = r.u32("reserved")?;
    let n = usize::try_from(r.u64("n")?).map_err(|_| bad("entry count too large".into()))?;
    super::lsh::check_threshold(threshold).map_err(|e| bad(e.to_string()))?;
    super::lsh::check_banding(bands, rows, num_perm).map_err(|e| bad(e.to_string()))?;
    let sig_len = n
        .checked_mul(num_perm)
        .and_then(|v| v.checked_mul(4))
        .ok_or_else(|| bad("size overflow".into()))?;
    let signatures: Vec<u32> = r
        .take(sig_len, "signatures")?
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    let keys = match kind {
        0 => Keys::Int(
            r.take(
                n.checked_mul(8)
                    .ok_or_else(|| bad("size overflow".into()))?,
                "keys",
            )?
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        ),
        1 => {
            let offsets: Vec<u64> = (0..=n)
                .map(|_| r.u64("key offsets"))
                .collect::<Result<_>>()?;
            let blob = r.take(*offsets.last().unwrap_or(&0) as usize, "key bytes")?;
            let mut keys = Vec::with_capacity(n);
            for w in offsets.windows(2) {
                let (s, e) = (w[0] as usize, w[1] as usize);
                if s > e || e > blob.len() {
                    return Err(bad("key offsets out of order".into()));
                }
                let key = std::str::from_utf8(&blob[s..e])
                    .map_err(|_| bad("a key is not valid UTF-8".into()))?;
                keys.push(key.to_owned());
            }
            Keys::Str(keys)
        }
        other => return Err(bad(format!("unknown key kind {other}"))),
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
}
