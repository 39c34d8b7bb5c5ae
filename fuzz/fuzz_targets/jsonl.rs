//! The JSONL batch reader (`rust/dedup/jsonl.rs`), read-only: `parse_line` against
//! `serde_json::Value`, and `JsonlReader` over plain, gzip and corrupt-gzip files.
//!
//! Input: one mode byte, then the file (mode % 3: 0 plain, 1 gzip-compressed, 2 the raw bytes
//! under a `.gz` name). Checked: no panic; the first line's `parse_line` agrees with
//! `serde_json::Value` wherever `Value` parses it; every non-blank line comes back once, in
//! order, as a document or a reject, with increasing 1-based line numbers and its raw bytes; a
//! document's text is `parse_line` of its raw line; `text_bytes` and `empty` add up; corrupt
//! gzip is an `Io` error.

#![no_main]

use std::io::Write;
use std::path::{Path, PathBuf};

use _native::dedup::jsonl::{parse_line, JsonlReader};
use _native::error::Error;
use libfuzzer_sys::fuzz_target;

const FIELD: &str = "text";

fn scratch(gz: bool) -> PathBuf {
    let dir = Path::new("/dev/shm");
    let dir = if dir.is_dir() {
        dir.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let ext = if gz { "jsonl.gz" } else { "jsonl" };
    dir.join(format!("slimforge-fuzz-{}.{ext}", std::process::id()))
}

/// What `serde_json::Value` makes of a line: `None` when it cannot parse it, `Some(Some(text))`
/// for an object whose last `FIELD` is a string, `Some(None)` for any other JSON value.
fn reference(raw: &[u8]) -> Option<Option<String>> {
    let text = std::str::from_utf8(raw).ok()?;
    let value = serde_json::from_str::<serde_json::Value>(text).ok()?;
    Some(match value {
        serde_json::Value::Object(map) => match map.get(FIELD) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            _ => None,
        },
        _ => None,
    })
}

fn is_blank(raw: &[u8]) -> bool {
    raw.iter()
        .all(|&b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    // One line on its own: the parser agrees with serde_json.
    let line = body.split(|&b| b == b'\n').next().unwrap_or(&[]);
    // parse_line skips the values it does not need without building them (serde's IgnoredAny:
    // no recursion limit, no number range check), so it may accept lines `Value` rejects; where
    // `Value` parses the line, both must agree.
    match (parse_line(line, FIELD), reference(line)) {
        (Ok(a), Some(Some(b))) => assert_eq!(a, b),
        (Err(_), Some(None)) | (_, None) => {}
        (a, b) => panic!("parse_line gave {a:?}, serde_json {b:?}"),
    }
    let mode = mode % 3;
    let path = scratch(mode != 0);
    let bytes = if mode == 1 {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(body).unwrap();
        enc.finish().unwrap()
    } else {
        body.to_vec()
    };
    std::fs::write(&path, &bytes).unwrap();
    let expected: Vec<&[u8]> = if mode == 2 {
        Vec::new()
    } else {
        body.split_inclusive(|&b| b == b'\n')
            .filter(|l| !is_blank(l))
            .collect()
    };
    let mut reader = JsonlReader::open(&path, FIELD).unwrap().with_raw(true);
    let mut seen = 0usize;
    let mut last_line = 0i64;
    loop {
        let batch = match reader.next_batch(3, false) {
            Ok(Some(b)) => b,
            Ok(None) => break,
            Err(Error::Io(_)) if mode == 2 => break,
            Err(e) => panic!("reading {path:?} (mode {mode}) failed: {e}"),
        };
        assert_eq!(batch.texts.len(), batch.lines.len());
        assert_eq!(batch.texts.len(), batch.raws.len());
        let mut docs = batch
            .texts
            .iter()
            .zip(&batch.lines)
            .zip(&batch.raws)
            .map(|((t, &l), r)| (l, Some(t), r.as_slice()))
            .chain(
                batch
                    .rejects
                    .iter()
                    .map(|r| (r.line as i64, None, r.raw.as_slice())),
            )
            .collect::<Vec<_>>();
        docs.sort_by_key(|d| d.0);
        let mut text_bytes = 0u64;
        let mut empty = 0u64;
        for (line, text, raw) in docs {
            assert!(line > last_line, "line numbers must increase");
            last_line = line;
            if mode != 2 {
                assert_eq!(raw, expected[seen], "line {line}");
            }
            seen += 1;
            match text {
                Some(t) => {
                    assert_eq!(parse_line(raw, FIELD).as_ref(), Ok(t));
                    text_bytes += t.len() as u64;
                    empty += u64::from(t.trim().is_empty());
                }
                None => assert!(parse_line(raw, FIELD).is_err()),
            }
        }
        assert_eq!(batch.text_bytes, text_bytes);
        assert_eq!(batch.empty, empty);
    }
    if mode != 2 {
        assert_eq!(seen, expected.len(), "every non-blank line is read once");
    }
    let _ = std::fs::remove_file(&path);
});
