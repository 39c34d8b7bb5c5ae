//! Batch reading of JSONL document files (plain or gzip) and copying of kept lines, for the
//! streaming file deduplicator.
//!
//! Lines are read sequentially and parsed in parallel. A line is a document when it is valid
//! UTF-8 holding a JSON object whose `field` is a string; blank lines are skipped; any other
//! line is a reject, reported with its 1-based line number, the reason (worded as
//! `slimforge.io` words it) and its raw bytes.
//!
//! Resource bounds: a line longer than `max_line_bytes` (default `DEFAULT_MAX_LINE_BYTES`,
//! 64 MiB, not counting its newline) stops reading with an error at that line, checked while
//! the line is read, so memory stays within about `max_line_bytes` plus one batch of lines
//! (`BATCH_BYTES`) whatever the input holds. Gzip input is read member by member: an empty
//! file is an empty stream, and zero bytes after the last member (tape or block padding,
//! which `gzip -t` accepts) are ignored; anything else after a member must be another member.

use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use flate2::bufread::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use rayon::prelude::*;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, Result};

/// A batch stops growing at this many bytes of raw lines, so huge lines keep memory bounded.
const BATCH_BYTES: usize = 64 << 20;

/// Default longest line, in bytes without its newline (`slimforge.io.DEFAULT_MAX_LINE_BYTES`).
pub const DEFAULT_MAX_LINE_BYTES: usize = 64 << 20;

/// A gzip stream of one or more members (RFC 1952 section 2.2), read as one stream like
/// `gzip -d` does: an empty input is an empty stream, and zero bytes after the last member
/// are padding and ignored. A member's trailer (CRC-32 and length) is checked as it ends.
pub struct GzipMembers<R: BufRead> {
    state: GzState<R>,
    members: u64,
}

enum GzState<R: BufRead> {
    /// Between members (or before the first).
    Boundary(R),
    Member(Box<GzDecoder<R>>),
    Done,
}

impl<R: BufRead> GzipMembers<R> {
    pub fn new(input: R) -> Self {
        Self {
            state: GzState::Boundary(input),
            members: 0,
        }
    }
}

/// Skips the zero bytes left in `input`; an error if anything else follows them.
fn skip_zero_padding<R: BufRead>(input: &mut R) -> io::Result<()> {
    loop {
        let buf = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(());
        }
        let zeros = buf.iter().take_while(|&&b| b == 0).count();
        if zeros < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "invalid gzip data: non-zero bytes after the zero padding that follows the last member",
            ));
        }
        input.consume(zeros);
    }
}

impl<R: BufRead> Read for GzipMembers<R> {
    fn read(&mut self, into: &mut [u8]) -> io::Result<usize> {
        if into.is_empty() {
            return Ok(0);
        }
        loop {
            match std::mem::replace(&mut self.state, GzState::Done) {
                GzState::Done => return Ok(0),
                GzState::Boundary(mut input) => {
                    let first = loop {
                        match input.fill_buf() {
                            Ok(b) => break b.first().copied(),
                            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                            Err(e) => {
                                self.state = GzState::Boundary(input);
                                return Err(e);
                            }
                        }
                    };
                    match first {
                        None => return Ok(0),
                        Some(0) if self.members > 0 => {
                            skip_zero_padding(&mut input)?;
                            return Ok(0);
                        }
                        Some(_) => {
                            self.members += 1;
                            self.state = GzState::Member(Box::new(GzDecoder::new(input)));
                        }
                    }
                }
                GzState::Member(mut d) => match d.read(into) {
                    Ok(0) => self.state = GzState::Boundary((*d).into_inner()),
                    Ok(n) => {
                        self.state = GzState::Member(d);
                        return Ok(n);
                    }
                    // flate2 reports a stream that ends inside a member as UnexpectedEof, or
                    // as an empty read before the trailer: either way it is truncated.
                    Err(e) => return Err(e),
                },
            }
        }
    }
}

/// How reading one line ended.
enum LineEnd {
    /// A line (with its newline, if it had one) is in the buffer.
    Line,
    /// End of input, nothing read.
    Eof,
    /// The line has more than the limit of bytes; reading stopped inside it.
    TooLong,
}

/// Reads one line into `raw` (empty on entry), never holding more than `max + 1` bytes of it:
/// the read stops after `max` bytes plus a newline, so a longer line is found without being
/// buffered whole.
fn read_line_capped(input: &mut dyn BufRead, raw: &mut Vec<u8>, max: usize) -> io::Result<LineEnd> {
    let limit = (max as u64).saturating_add(1);
    let n = Read::take(input, limit).read_until(b'\n', raw)?;
    Ok(if n == 0 {
        LineEnd::Eof
    } else if n as u64 == limit && raw.last() != Some(&b'\n') {
        LineEnd::TooLong
    } else {
        LineEnd::Line
    })
}

fn is_gzip(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.to_ascii_lowercase().ends_with(".gz"))
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}

/// Python's `bytes.strip()` whitespace: blank lines hold only these.
fn is_blank(raw: &[u8]) -> bool {
    raw.iter()
        .all(|&b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
}

/// The Python type name of a JSON value, for reasons worded like `slimforge.io`'s.
struct TypeName(&'static str);

/// What the wanted field of an object turned out to be.
enum FieldValue {
    Text(String),
    Other(&'static str),
}

struct FieldVisitor;

impl<'de> Visitor<'de> for FieldVisitor {
    type Value = FieldValue;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<FieldValue, E> {
        Ok(FieldValue::Text(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> std::result::Result<FieldValue, E> {
        Ok(FieldValue::Text(v))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<FieldValue, E> {
        Ok(FieldValue::Other("bool"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<FieldValue, E> {
        Ok(FieldValue::Other("int"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<FieldValue, E> {
        Ok(FieldValue::Other("int"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<FieldValue, E> {
        Ok(FieldValue::Other("float"))
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<FieldValue, E> {
        Ok(FieldValue::Other("NoneType"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<FieldValue, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(FieldValue::Other("list"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<FieldValue, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(FieldValue::Other("dict"))
    }
}

impl<'de> de::Deserialize<'de> for FieldValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(FieldVisitor)
    }
}

/// The top-level value of a line: an object's wanted field (the last one, as Python keeps),
/// or the type name of a non-object.
enum Top {
    Object(Option<FieldValue>),
    NotObject(TypeName),
}

struct TopSeed<'f>(&'f str);

impl<'de> DeserializeSeed<'de> for TopSeed<'_> {
    type Value = Top;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> std::result::Result<Top, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_> {
    type Value = Top;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<Top, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == self.0 {
                found = Some(map.next_value::<FieldValue>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(Top::Object(found))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Top, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Top::NotObject(TypeName("list")))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> std::result::Result<Top, E> {
        Ok(Top::NotObject(TypeName("str")))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> std::result::Result<Top, E> {
        Ok(Top::NotObject(TypeName("bool")))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> std::result::Result<Top, E> {
        Ok(Top::NotObject(TypeName("int")))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> std::result::Result<Top, E> {
        Ok(Top::NotObject(TypeName("int")))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> std::result::Result<Top, E> {
        Ok(Top::NotObject(TypeName("float")))
    }
    fn visit_unit<E: de::Error>(self) -> std::result::Result<Top, E> {
        Ok(Top::NotObject(TypeName("NoneType")))
    }
}

/// The text of `field` in one JSONL line, or why the line is not a document.
pub fn parse_line(raw: &[u8], field: &str) -> std::result::Result<String, String> {
    let text = std::str::from_utf8(raw)
        .map_err(|e| format!("invalid UTF-8 at byte {}", e.valid_up_to()))?;
    let mut d = serde_json::Deserializer::from_str(text);
    let top = TopSeed(field)
        .deserialize(&mut d)
        .and_then(|t| d.end().map(|()| t))
        .map_err(|e| {
            // serde_json appends " at line L column C"; keep the message, report the column.
            let msg = e.to_string();
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_owned();
            format!("invalid JSON ({msg} at column {})", e.column())
        })?;
    match top {
        Top::NotObject(TypeName(t)) => Err(format!("expected a JSON object, got {t}")),
        Top::Object(None) => Err(format!("missing field '{field}'")),
        Top::Object(Some(FieldValue::Other(t))) => {
            Err(format!("field '{field}' is {t}, expected a string"))
        }
        Top::Object(Some(FieldValue::Text(s))) => Ok(s),
    }
}

/// A line that is not a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub line: u64,
    pub reason: String,
    pub raw: Vec<u8>,
}

/// Documents read from one stretch of a file, in order.
#[derive(Debug, Default)]
pub struct Batch {
    /// The text of each document's field.
    pub texts: Vec<String>,
    /// The 1-based line number of each document.
    pub lines: Vec<i64>,
    /// Malformed lines, in order.
    pub rejects: Vec<Reject>,
    /// Total UTF-8 bytes of `texts`.
    pub text_bytes: u64,
    /// How many texts are empty or only whitespace.
    pub empty: u64,
    /// The raw line of each document, when asked for.
    pub raws: Vec<Vec<u8>>,
    /// A line that stopped reading for good (longer than the line limit): its number and why.
    /// It comes after every document and reject of the batch; no batch follows.
    pub stopped: Option<(u64, String)>,
}

/// Reads a JSONL file (gzip when its name ends in `.gz`) a batch of lines at a time.
pub struct JsonlReader {
    path: PathBuf,
    input: Box<dyn BufRead + Send>,
    field: String,
    line: u64,
    done: bool,
    keep_raw: bool,
    max_line_bytes: usize,
    /// Set when a line over the limit stopped reading, until a batch hands it back.
    stopped: Option<(u64, String)>,
}

impl JsonlReader {
    pub fn open(path: &Path, field: &str) -> Result<Self> {
        let file = File::open(path).map_err(|e| io_error(path, e))?;
        let input: Box<dyn BufRead + Send> = if is_gzip(path) {
            Box::new(BufReader::with_capacity(
                1 << 20,
                GzipMembers::new(BufReader::new(file)),
            ))
        } else {
            Box::new(BufReader::with_capacity(1 << 20, file))
        };
        Ok(Self {
            path: path.to_owned(),
            input,
            field: field.to_owned(),
            line: 0,
            done: false,
            keep_raw: false,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            stopped: None,
        })
    }

    /// Longest line accepted, in bytes without its newline (at least 1).
    pub fn with_max_line_bytes(mut self, max_line_bytes: usize) -> Result<Self> {
        if max_line_bytes == 0 {
            return Err(Error::value("max_line_bytes must be at least 1, got 0"));
        }
        self.max_line_bytes = max_line_bytes;
        Ok(self)
    }

    /// Whether batches carry raw lines.
    pub fn keeps_raw(&self) -> bool {
        self.keep_raw
    }

    /// Also hand back each document's raw line (`Batch::raws`).
    pub fn with_raw(mut self, keep_raw: bool) -> Self {
        self.keep_raw = keep_raw;
        self
    }

    /// Up to `max_lines` non-blank raw lines with their line numbers; empty at end of file.
    fn raw_lines(&mut self, max_lines: usize) -> Result<Vec<(u64, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while !self.done && out.len() < max_lines && bytes < BATCH_BYTES {
            let mut raw = Vec::new();
            let end = match read_line_capped(&mut *self.input, &mut raw, self.max_line_bytes) {
                Ok(end) => end,
                Err(e) => {
                    // A failed stream is not read further (it could look like a clean end).
                    self.done = true;
                    return Err(Error::Io(format!(
                        "{}: {e} (while reading line {})",
                        self.path.display(),
                        self.line + 1
                    )));
                }
            };
            match end {
                LineEnd::Eof => {
                    self.done = true;
                    break;
                }
                LineEnd::TooLong => {
                    self.done = true;
                    self.stopped = Some((
                        self.line + 1,
                        format!(
                            "line is longer than {} bytes (the max_line_bytes limit; raise it \
                             with max_line_bytes= or --max-line-mb to read this file)",
                            self.max_line_bytes
                        ),
                    ));
                    break;
                }
                LineEnd::Line => {}
            }
            self.line += 1;
            if is_blank(&raw) {
                continue;
            }
            bytes += raw.len();
            out.push((self.line, raw));
        }
        Ok(out)
    }

    /// The next batch of up to `max_lines` non-blank lines, parsed in parallel; `None` at end.
    /// With `stop_at_reject`, the batch ends at the first reject and reading stops there.
    pub fn next_batch(&mut self, max_lines: usize, stop_at_reject: bool) -> Result<Option<Batch>> {
        let raw = self.raw_lines(max_lines.max(1))?;
        if raw.is_empty() && self.stopped.is_none() {
            return Ok(None);
        }
        let field = self.field.as_str();
        let parsed: Vec<std::result::Result<String, String>> = crate::parallel::install(|| {
            raw.par_iter().map(|(_, r)| parse_line(r, field)).collect()
        });
        let mut batch = Batch::default();
        for ((line, raw), p) in raw.into_iter().zip(parsed) {
            match p {
                Ok(text) => {
                    batch.text_bytes += text.len() as u64;
                    batch.empty += u64::from(text.trim().is_empty());
                    batch.texts.push(text);
                    batch.lines.push(line as i64);
                    if self.keep_raw {
                        batch.raws.push(raw);
                    }
                }
                Err(reason) => {
                    batch.rejects.push(Reject { line, reason, raw });
                    if stop_at_reject {
                        self.done = true;
                        // The reject comes first; the long line after it is never reached.
                        self.stopped = None;
                        break;
                    }
                }
            }
        }
        batch.stopped = self.stopped.take();
        Ok(Some(batch))
    }

    /// The next stretch of raw lines with whether each is a document (parsed in parallel).
    /// A line over the limit is an error (`path:line: reason`).
    fn next_classified(&mut self, max_lines: usize) -> Result<Vec<(u64, Vec<u8>, bool)>> {
        let raw = self.raw_lines(max_lines.max(1))?;
        if let Some((line, reason)) = self.stopped.take() {
            return Err(Error::value(format!(
                "{}:{line}: {reason}",
                self.path.display()
            )));
        }
        let field = self.field.as_str();
        let ok: Vec<bool> = crate::parallel::install(|| {
            raw.par_iter()
                .map(|(_, r)| parse_line(r, field).is_ok())
                .collect()
        });
        Ok(raw
            .into_iter()
            .zip(ok)
            .map(|((l, r), ok)| (l, r, ok))
            .collect())
    }
}

enum Sink {
    Plain(BufWriter<File>),
    Gzip(BufWriter<GzEncoder<File>>),
}

impl Sink {
    fn create(path: &Path, gzip: bool) -> Result<Self> {
        let f = File::create(path).map_err(|e| io_error(path, e))?;
        // Buffer above the compressor so it sees large blocks, not single lines.
        Ok(if gzip {
            Sink::Gzip(BufWriter::with_capacity(
                1 << 20,
                GzEncoder::new(f, Compression::new(6)),
            ))
        } else {
            Sink::Plain(BufWriter::with_capacity(1 << 20, f))
        })
    }
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Sink::Plain(w) => w,
            Sink::Gzip(w) => w,
        }
    }
    fn finish(self) -> std::io::Result<()> {
        match self {
            Sink::Plain(mut w) => w.flush(),
            Sink::Gzip(w) => w
                .into_inner()
                .map_err(|e| e.into_error())?
                .finish()?
                .flush(),
        }
    }
}

/// Pass 3 of the file deduplicator: copies the kept documents' raw lines byte for byte (plain
/// or gzip by the output's name) and writes one clusters-TSV row per document, numbering the
/// documents of all inputs in order exactly as `JsonlReader` does (rejects are skipped).
pub struct KeptWriter {
    output: Sink,
    output_path: PathBuf,
    clusters: BufWriter<File>,
    clusters_path: PathBuf,
    index: usize,
    input: Option<(JsonlReader, String)>,
}

impl KeptWriter {
    /// Creates `output` (gzip-compressed when `gzip`) and `clusters` (with the TSV header).
    pub fn create(output: &Path, gzip: bool, clusters: &Path) -> Result<Self> {
        let mut c = BufWriter::with_capacity(
            1 << 20,
            File::create(clusters).map_err(|e| io_error(clusters, e))?,
        );
        c.write_all(b"index\tfile\tline\tcluster\tkept\n")
            .map_err(|e| io_error(clusters, e))?;
        Ok(Self {
            output: Sink::create(output, gzip)?,
            output_path: output.to_owned(),
            clusters: c,
            clusters_path: clusters.to_owned(),
            index: 0,
            input: None,
        })
    }

    /// Documents written so far (the global index of the next one).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Starts copying from `path`, named `display` in the clusters file (written as given: the
    /// caller escapes it), reading lines of up to `max_line_bytes`.
    pub fn open_input(
        &mut self,
        path: &Path,
        field: &str,
        display: &str,
        max_line_bytes: usize,
    ) -> Result<()> {
        let reader = JsonlReader::open(path, field)?.with_max_line_bytes(max_line_bytes)?;
        self.input = Some((reader, display.to_owned()));
        Ok(())
    }

    /// Handles up to `max_lines` more lines of the current input; returns the documents seen,
    /// or `None` when the input is exhausted. `keep` and `cluster` cover all documents of all
    /// inputs.
    pub fn step(
        &mut self,
        keep: &[bool],
        cluster: &[i64],
        max_lines: usize,
    ) -> Result<Option<usize>> {
        if keep.len() != cluster.len() {
            return Err(Error::value(format!(
                "keep has {} entries but cluster has {}",
                keep.len(),
                cluster.len()
            )));
        }
        let Some((reader, display)) = self.input.as_mut() else {
            return Err(Error::value("no input opened"));
        };
        let lines = reader.next_classified(max_lines)?;
        if lines.is_empty() {
            return Ok(None);
        }
        let mut seen = 0;
        let out = self.output.writer();
        let mut itoa = itoa_buf::Buf::default();
        for (line, raw, ok) in lines {
            if !ok {
                continue;
            }
            let i = self.index;
            if i >= keep.len() {
                return Err(Error::runtime(format!(
                    "inputs changed while deduplicating: more than {} documents on re-reading",
                    keep.len()
                )));
            }
            if keep[i] {
                out.write_all(&raw)
                    .and_then(|()| {
                        if raw.ends_with(b"\n") {
                            Ok(())
                        } else {
                            out.write_all(b"\n")
                        }
                    })
                    .map_err(|e| io_error(&self.output_path, e))?;
            }
            let row = itoa.row(i, display, line, cluster[i], keep[i]);
            self.clusters
                .write_all(row)
                .map_err(|e| io_error(&self.clusters_path, e))?;
            self.index += 1;
            seen += 1;
        }
        Ok(Some(seen))
    }

    /// Flushes both files (finishing the gzip stream); returns the documents written.
    pub fn finish(self) -> Result<usize> {
        let KeptWriter {
            output,
            output_path,
            mut clusters,
            clusters_path,
            index,
            ..
        } = self;
        output.finish().map_err(|e| io_error(&output_path, e))?;
        clusters.flush().map_err(|e| io_error(&clusters_path, e))?;
        Ok(index)
    }
}

mod itoa_buf {
    use std::io::Write;

    /// Reused buffer for one clusters-TSV row.
    #[derive(Default)]
    pub struct Buf(Vec<u8>);

    impl Buf {
        pub fn row(&mut self, i: usize, file: &str, line: u64, cluster: i64, kept: bool) -> &[u8] {
            self.0.clear();
            // Writing into a Vec cannot fail.
            let _ = writeln!(self.0, "{i}\t{file}\t{line}\t{cluster}\t{}", u8::from(kept));
            &self.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("slimforge-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        if is_gzip(&p) {
            let mut e = GzEncoder::new(File::create(&p).unwrap(), Compression::fast());
            e.write_all(bytes).unwrap();
            e.finish().unwrap();
        } else {
            std::fs::write(&p, bytes).unwrap();
        }
        p
    }

    fn read_all(p: &Path, batch: usize) -> Batch {
        let mut r = JsonlReader::open(p, "text").unwrap().with_raw(true);
        let mut all = Batch::default();
        while let Some(b) = r.next_batch(batch, false).unwrap() {
            all.texts.extend(b.texts);
            all.lines.extend(b.lines);
            all.rejects.extend(b.rejects);
            all.raws.extend(b.raws);
            all.text_bytes += b.text_bytes;
            all.empty += b.empty;
        }
        all
    }

    const MIXED: &[u8] = b"{\"text\": \"a b\"}\r\n\n   \r\n{\"text\": nope}\n{\"other\": 1}\n{\"text\": \"\xff\"}\n{\"text\": 5}\n[1, 2]\n{\"text\": {\"a\": 1}}\n{\"id\": 3, \"text\": \"caf\\u00e9\\nline\\\"q\\\"\"}\n\"str\"\n{\"text\": \"  \"}";

    #[test]
    fn reads_documents_rejects_and_blank_lines() {
        for (name, batch) in [("m.jsonl", 2), ("m.jsonl.gz", 1000), ("m2.jsonl", 1)] {
            let p = tmp(name, MIXED);
            let all = read_all(&p, batch);
            assert_eq!(all.texts, vec!["a b", "café\nline\"q\"", "  "], "{name}");
            assert_eq!(all.lines, vec![1, 10, 12]);
            assert_eq!(
                all.raws[0], b"{\"text\": \"a b\"}\r\n",
                "CRLF kept byte for byte"
            );
            assert_eq!(
                all.raws[2], b"{\"text\": \"  \"}",
                "no newline added at end of file"
            );
            assert_eq!(all.empty, 1);
            assert_eq!(all.text_bytes, (3 + "café\nline\"q\"".len() + 2) as u64);
            let reasons: Vec<(u64, &str)> = all
                .rejects
                .iter()
                .map(|r| (r.line, r.reason.as_str()))
                .collect();
            assert_eq!(reasons[0].0, 4);
            assert!(reasons[0].1.starts_with("invalid JSON (") && reasons[0].1.contains("column"));
            assert_eq!(
                &reasons[1..],
                &[
                    (5, "missing field 'text'"),
                    (6, "invalid UTF-8 at byte 10"),
                    (7, "field 'text' is int, expected a string"),
                    (8, "expected a JSON object, got list"),
                    (9, "field 'text' is dict, expected a string"),
                    (11, "expected a JSON object, got str"),
                ]
            );
            assert_eq!(all.rejects[0].raw, b"{\"text\": nope}\n");
            assert_eq!(all.rejects[2].raw, b"{\"text\": \"\xff\"}\n");
        }
    }

    #[test]
    fn stops_at_first_reject_when_asked() {
        let p = tmp("stop.jsonl", MIXED);
        let mut r = JsonlReader::open(&p, "text").unwrap();
        let b = r.next_batch(1000, true).unwrap().unwrap();
        assert_eq!(b.texts, vec!["a b"]);
        assert_eq!(b.rejects.len(), 1);
        assert_eq!(b.rejects[0].line, 4);
        assert!(r.next_batch(1000, true).unwrap().is_none());
    }

    #[test]
    fn very_long_lines_and_duplicate_keys() {
        let long = "w ".repeat(3_000_000);
        let mut bytes = format!("{{\"text\": \"x\", \"text\": \"{long}\"}}\n").into_bytes();
        bytes.extend_from_slice(b"{\"text\": \"short\"}");
        let p = tmp("long.jsonl", &bytes);
        let all = read_all(&p, 1);
        assert_eq!(all.texts.len(), 2);
        assert_eq!(
            all.texts[0], long,
            "the last duplicate key wins, as in Python"
        );
        assert_eq!(all.texts[1], "short");
    }

    #[test]
    fn concatenated_gzip_members_are_one_stream() {
        let dir = tmp("unused.jsonl", b"").parent().unwrap().to_owned();
        let p = dir.join("multi.jsonl.gz");
        let mut bytes = Vec::new();
        for part in [&b"{\"text\": \"one\"}\n"[..], b"{\"text\": \"two\"}\n"] {
            let mut e = GzEncoder::new(Vec::new(), Compression::fast());
            e.write_all(part).unwrap();
            bytes.extend(e.finish().unwrap());
        }
        std::fs::write(&p, bytes).unwrap();
        let all = read_all(&p, 10);
        assert_eq!(all.texts, vec!["one", "two"]);
        assert_eq!(all.lines, vec![1, 2]);
    }

    fn gz<P: AsRef<[u8]>>(parts: &[P]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for part in parts {
            let mut e = GzEncoder::new(Vec::new(), Compression::fast());
            e.write_all(part.as_ref()).unwrap();
            bytes.extend(e.finish().unwrap());
        }
        bytes
    }

    fn raw_file(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = tmp("unused.jsonl", b"").parent().unwrap().to_owned();
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn try_read_all(p: &Path, max_line: usize) -> Result<Batch> {
        let mut r = JsonlReader::open(p, "text")?.with_max_line_bytes(max_line)?;
        let mut all = Batch::default();
        while let Some(b) = r.next_batch(2, false)? {
            all.texts.extend(b.texts);
            all.lines.extend(b.lines);
            all.rejects.extend(b.rejects);
            if b.stopped.is_some() {
                all.stopped = b.stopped;
            }
        }
        Ok(all)
    }

    #[test]
    fn empty_gzip_and_zero_padding_are_accepted() {
        let empty = raw_file("empty.jsonl.gz", b"");
        let all = try_read_all(&empty, 100).unwrap();
        assert!(all.texts.is_empty() && all.rejects.is_empty());

        let empty_member = raw_file("empty-member.jsonl.gz", &gz(&[b""]));
        assert!(try_read_all(&empty_member, 100).unwrap().texts.is_empty());

        let mut padded = gz(&[b"{\"text\": \"one\"}\n", b"{\"text\": \"two\"}\n"]);
        padded.extend(std::iter::repeat_n(0u8, 3 << 20));
        let p = raw_file("padded.jsonl.gz", &padded);
        let all = try_read_all(&p, 100).unwrap();
        assert_eq!(all.texts, vec!["one", "two"]);

        // Zeros then something else, a file of zeros, and garbage after a member: errors.
        let mut bad = gz(&[b"{\"text\": \"one\"}\n"]);
        bad.extend([0, 0, 0, 7]);
        for (name, bytes) in [
            ("zero-then-junk.jsonl.gz", bad),
            ("zeros.jsonl.gz", vec![0u8; 64]),
            ("junk-after.jsonl.gz", {
                let mut b = gz(&[b"{\"text\": \"one\"}\n"]);
                b.extend(b"junk");
                b
            }),
        ] {
            let p = raw_file(name, &bytes);
            let err = try_read_all(&p, 100).unwrap_err();
            assert!(matches!(err, Error::Io(_)), "{name}: {err:?}");
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn truncated_and_corrupt_gzip_are_io_errors() {
        let whole = gz(&[&b"{\"text\": \"abc def\"}\n".repeat(1000)]);
        for cut in [
            1,
            5,
            10,
            20,
            whole.len() / 2,
            whole.len() - 4,
            whole.len() - 1,
        ] {
            let p = raw_file("cut.jsonl.gz", &whole[..cut]);
            let err = try_read_all(&p, 1 << 20).unwrap_err();
            assert!(matches!(err, Error::Io(_)), "cut {cut}: {err:?}");
        }
        let mut flipped = whole.clone();
        let at = flipped.len() - 6; // inside the CRC-32 of the trailer
        flipped[at] ^= 0xFF;
        let p = raw_file("crc.jsonl.gz", &flipped);
        assert!(matches!(try_read_all(&p, 1 << 20), Err(Error::Io(_))));
    }

    #[test]
    fn lines_over_the_limit_stop_reading_at_their_number() {
        let bytes = b"{\"text\": \"ab\"}\n{\"text\": \"abc\"}\r\n\n{\"text\": \"abcdefghij\"}\n{\"text\": \"x\"}\n";
        for name in ["cap.jsonl", "cap.jsonl.gz"] {
            let p = tmp(name, bytes);
            // 16 bytes: the second line's content is 16 with its CR, the fourth's 22.
            let all = try_read_all(&p, 16).unwrap();
            assert_eq!(all.texts, vec!["ab", "abc"], "{name}");
            let (line, reason) = all.stopped.expect("stopped");
            assert_eq!(line, 4);
            assert!(reason.contains("longer than 16 bytes"), "{reason}");
            // Exactly at the limit is fine.
            let all = try_read_all(&p, 22).unwrap();
            assert_eq!(all.texts.len(), 4);
            assert!(all.stopped.is_none());
        }
        // An earlier reject stops first when asked to.
        let p = tmp("cap2.jsonl", b"nope\n{\"text\": \"abcdefghijklmnop\"}\n");
        let mut r = JsonlReader::open(&p, "text")
            .unwrap()
            .with_max_line_bytes(10)
            .unwrap();
        let b = r.next_batch(100, true).unwrap().unwrap();
        assert_eq!((b.rejects.len(), b.stopped), (1, None));
        assert!(r.next_batch(100, true).unwrap().is_none());
        // The first line already too long: a batch with nothing but the stop.
        let mut r = JsonlReader::open(&p, "text")
            .unwrap()
            .with_max_line_bytes(3)
            .unwrap();
        let b = r.next_batch(100, false).unwrap().unwrap();
        assert!(b.texts.is_empty() && b.rejects.is_empty());
        assert_eq!(b.stopped.map(|s| s.0), Some(1));
        assert!(r.next_batch(100, false).unwrap().is_none());
        assert!(JsonlReader::open(&p, "text")
            .unwrap()
            .with_max_line_bytes(0)
            .is_err());
        // The kept-lines writer fails with path:line.
        let dir = p.parent().unwrap().to_owned();
        let mut w =
            KeptWriter::create(&dir.join("cap.out.jsonl"), false, &dir.join("cap.tsv")).unwrap();
        let p = tmp("cap3.jsonl", bytes);
        w.open_input(&p, "text", "in", 16).unwrap();
        let err = loop {
            match w.step(&[true; 8], &[0; 8], 100) {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("expected an error"),
                Err(e) => break e,
            }
        };
        assert!(
            err.to_string().contains("cap3.jsonl:4: line is longer"),
            "{err}"
        );
    }

    #[test]
    fn an_endless_line_is_never_buffered_whole() {
        let mut input = BufReader::with_capacity(4096, io::repeat(b'a'));
        let mut raw = Vec::new();
        let end = read_line_capped(&mut input, &mut raw, 100_000).unwrap();
        assert!(matches!(end, LineEnd::TooLong));
        assert!(raw.len() <= 100_001, "{}", raw.len());
    }

    #[test]
    fn missing_file_is_an_io_error() {
        let r = JsonlReader::open(Path::new("/nonexistent/x.jsonl"), "text");
        assert!(matches!(r, Err(Error::Io(_))));
    }

    #[test]
    fn kept_writer_copies_raw_lines_and_numbers_documents() {
        let p = tmp("w.jsonl", MIXED);
        let dir = p.parent().unwrap().to_owned();
        for out_name in ["out.jsonl", "out.jsonl.gz"] {
            let out = dir.join(out_name);
            let tsv = dir.join("out.tsv");
            let mut w = KeptWriter::create(&out, is_gzip(&out), &tsv).unwrap();
            w.open_input(&p, "text", "in.jsonl", DEFAULT_MAX_LINE_BYTES)
                .unwrap();
            let keep = [true, true, false];
            let cluster = [0, 1, 0];
            while w.step(&keep, &cluster, 2).unwrap().is_some() {}
            assert_eq!(w.finish().unwrap(), 3);
            let written = if is_gzip(&out) {
                let mut s = Vec::new();
                std::io::Read::read_to_end(
                    &mut flate2::read::MultiGzDecoder::new(File::open(&out).unwrap()),
                    &mut s,
                )
                .unwrap();
                s
            } else {
                std::fs::read(&out).unwrap()
            };
            assert_eq!(
                written,
                b"{\"text\": \"a b\"}\r\n{\"id\": 3, \"text\": \"caf\\u00e9\\nline\\\"q\\\"\"}\n"
            );
            assert_eq!(
                std::fs::read_to_string(&tsv).unwrap(),
                "index\tfile\tline\tcluster\tkept\n0\tin.jsonl\t1\t0\t1\n1\tin.jsonl\t10\t1\t1\n2\tin.jsonl\t12\t0\t0\n"
            );
        }
        // More documents than the mask covers means the input changed.
        let mut w = KeptWriter::create(&dir.join("o2.jsonl"), false, &dir.join("o2.tsv")).unwrap();
        w.open_input(&p, "text", "in", DEFAULT_MAX_LINE_BYTES)
            .unwrap();
        let err = loop {
            match w.step(&[true], &[0], 100) {
                Ok(None) => panic!("expected an error"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert!(err.to_string().contains("inputs changed"));
    }
}
