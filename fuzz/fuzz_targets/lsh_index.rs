//! The LSH index reader (`rust/dedup/index_file.rs`) on arbitrary bytes.
//!
//! Input: one mode byte, then the file. Odd modes repair the trailing xxh3 checksum first, so
//! mutations reach the parser behind the checksum. Every input must give `Ok` or a `Value`
//! error (never a panic, an abort or an allocation failure), and an accepted file must be
//! canonical: writing what was read gives the same bytes back.

#![no_main]

use std::path::{Path, PathBuf};

use _native::dedup::index_file::{parse_index, write_index, Keys, KeysRef};
use _native::error::Error;
use libfuzzer_sys::fuzz_target;
use xxhash_rust::xxh3::xxh3_64;

fn scratch() -> PathBuf {
    let dir = Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("slimforge-fuzz-lsh-{}.idx", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 == 1 && bytes.len() >= 8 {
        let n = bytes.len() - 8;
        let digest = xxh3_64(&bytes[..n]);
        bytes[n..].copy_from_slice(&digest.to_le_bytes());
    }
    match parse_index(&bytes, Path::new("fuzz.idx")) {
        Err(Error::Value(_)) => {}
        Err(e) => panic!("a malformed index must be a Value error, got {e:?}"),
        Ok(f) => {
            let k = f.header.num_perm;
            let n = f.signatures.len() / k;
            assert_eq!(f.signatures.len(), n * k);
            let path = scratch();
            let written = match &f.keys {
                Keys::Int(v) => {
                    assert_eq!(v.len(), n);
                    write_index(&path, f.header, &f.signatures, KeysRef::Int(v))
                }
                Keys::Str(v) => {
                    assert_eq!(v.len(), n);
                    let strs: Vec<&str> = v.iter().map(String::as_str).collect();
                    write_index(&path, f.header, &f.signatures, KeysRef::Str(&strs))
                }
            };
            written.expect("an index that was read can be written");
            let again = std::fs::read(&path).expect("read back");
            let _ = std::fs::remove_file(&path);
            assert!(again == bytes, "an accepted index file is not canonical");
        }
    }
});
