//! Building an index from a layer blob in one streaming pass: the blob is
//! hashed (to bind the index to it), inflated with checkpoints at deflate
//! block boundaries every span, and its tar stream is parsed for the file
//! table. Memory use does not grow with the layer: windows are spooled to
//! a temporary file and only the file table grows, with the file count.

use std::io::{self, Read, Seek, Write};

use sha2::{Digest, Sha256};

use crate::error::IndexError;
use crate::format::{
    Checkpoint, Entry, IndexMeta, LayerCompression, LayerInfo, Span, encode_prefix,
};
use crate::gzip::{Inflate, WINDOW_SIZE};

/// Default uncompressed bytes per span; see `docs/formats.md` for the
/// measurement behind it.
pub const DEFAULT_SPAN_SIZE: u64 = 4 << 20;

/// Compressed bytes at the start of each span covered by a digest of
/// their own (the span's head): a reader that needs only the start of a
/// span, such as the last bytes of a file that ends just past a span
/// boundary, is answered once the head has arrived. 256 KiB arrive in a
/// few milliseconds on a data-centre link and cost 32 bytes per span.
pub const HEAD_SIZE: u64 = 256 << 10;

/// What the index is built for.
#[derive(Debug, Clone)]
pub struct LayerToIndex {
    pub digest: String,
    pub size: u64,
    pub compression: LayerCompression,
}

/// A finished index: where its parts are and what they hash to.
#[derive(Debug, Clone)]
pub struct BuiltIndex {
    pub meta: IndexMeta,
    /// Length of the prefix a node fetches to mount (header + metadata).
    pub prefix_len: u64,
    /// `sha256:<hex>` of the prefix.
    pub prefix_digest: String,
    /// Size and digest of the whole index blob.
    pub size: u64,
    pub digest: String,
}

/// Builds the index of `layer` from its blob and writes the index blob to
/// `out`. Fails if the blob does not match `layer`'s digest and size.
pub fn build_index(
    blob: impl Read,
    layer: &LayerToIndex,
    span_size: u64,
    out: impl Write,
) -> Result<BuiltIndex, IndexError> {
    if span_size < MIN_SPAN_SIZE {
        return Err(IndexError::Encode(format!(
            "span size {span_size} is below the 64 KiB minimum"
        )));
    }
    let files = FileCount::default();
    let boundaries = Boundaries::Shaped {
        size: span_size,
        small: (span_size / 8).max(MIN_SPAN_SIZE),
        files: files.clone(),
    };
    let mut scanned = scan_counting(blob, layer, boundaries, HEAD_SIZE, Some(files))?;
    let meta = IndexMeta {
        layer: scanned.layer,
        span_size,
        head_size: HEAD_SIZE,
        entries: scanned.entries,
        spans: scanned.spans,
        windows_length: scanned.windows_length,
    };
    crate::validate::validate(&meta, &crate::format::Limits::default())?;
    let prefix = encode_prefix(&meta)?;
    let mut out = HashingWriter::new(out);
    out.write_all(&prefix)?;
    scanned.windows.rewind()?;
    io::copy(&mut scanned.windows, &mut out)?;
    let (digest, total) = out.finish()?;
    Ok(BuiltIndex {
        prefix_len: prefix.len() as u64,
        prefix_digest: format!("sha256:{}", hex::encode(Sha256::digest(&prefix))),
        size: total,
        digest,
        meta,
    })
}

/// The smallest span an index may have.
const MIN_SPAN_SIZE: u64 = 64 * 1024;

/// A span holding at least this many files (whose headers lie in it) ends
/// at the small span size, an eighth of the span size: a part of the
/// layer with many small files (a Python library, a distribution's `/usr`)
/// gets small spans, so that a program importing a few hundred of them
/// fetches little it does not read; big files keep full spans (fewer
/// requests and windows). Chosen by measurement on Debian with python3 and
/// numpy (docs/benchmarks.md).
const FILES_FOR_A_SMALL_SPAN: u64 = 4;

/// Files the tar reader has passed so far, shared with the span cutter.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileCount(std::rc::Rc<std::cell::Cell<u64>>);

impl FileCount {
    fn get(&self) -> u64 {
        self.0.get()
    }

    fn add_one(&self) {
        self.0.set(self.0.get() + 1);
    }
}

/// Where spans end: after `size` bytes of output, or after `small` bytes
/// where many files lie (building), or at the output offsets an existing
/// index claims (checking it).
#[derive(Debug, Clone)]
pub(crate) enum Boundaries {
    Shaped {
        size: u64,
        small: u64,
        files: FileCount,
    },
    /// Each span's `uncompressed_start`, ascending, the first 0.
    At(Vec<u64>),
}

impl Boundaries {
    /// True when span number `next` (0-based) should start at output
    /// offset `out`, the previous one having started at `last` when
    /// `files_at_last` files had been passed.
    fn starts_here(&self, next: usize, last: u64, out: u64, files_at_last: u64) -> bool {
        match self {
            Boundaries::Shaped { size, small, files } => {
                next == 0
                    || out - last >= *size
                    || (out - last >= *small
                        && files.get() - files_at_last >= FILES_FOR_A_SMALL_SPAN)
            }
            Boundaries::At(starts) => starts.get(next) == Some(&out),
        }
    }

    /// Files passed so far (0 when not counted).
    fn files(&self) -> u64 {
        match self {
            Boundaries::Shaped { files, .. } => files.get(),
            Boundaries::At(_) => 0,
        }
    }

    /// Where the span starting at `start` (span number `number`) must end
    /// at the latest in an uncompressed layer.
    fn fixed_end(&self, number: usize, start: u64) -> u64 {
        match self {
            Boundaries::Shaped { size, .. } => start + size,
            Boundaries::At(starts) => starts.get(number + 1).copied().unwrap_or(u64::MAX),
        }
    }
}

/// What one pass over a layer blob found.
pub(crate) struct Scanned {
    pub layer: LayerInfo,
    pub entries: Vec<Entry>,
    pub spans: Vec<Span>,
    /// Every checkpoint's window, raw-deflate compressed, back to back.
    pub windows: std::fs::File,
    pub windows_length: u64,
}

/// Reads `blob` once: hashes it (it must be `layer`), inflates it with
/// checkpoints at `boundaries`, digests each span and its head of
/// `head_size` bytes, and parses its tar stream.
pub(crate) fn scan(
    blob: impl Read,
    layer: &LayerToIndex,
    boundaries: Boundaries,
    head_size: u64,
) -> Result<Scanned, IndexError> {
    scan_counting(blob, layer, boundaries, head_size, None)
}

/// [`scan`], counting the files the tar reader passes into `files`.
fn scan_counting(
    blob: impl Read,
    layer: &LayerToIndex,
    boundaries: Boundaries,
    head_size: u64,
    files: Option<FileCount>,
) -> Result<Scanned, IndexError> {
    let mut blob = HashingReader::new(blob);
    let mut windows = tempfile::tempfile()?;
    let (entries, spans, uncompressed_size, windows_length) = match layer.compression {
        LayerCompression::Gzip => {
            let mut stream = Checkpointer::new(
                &mut blob,
                boundaries,
                SpanHasher::new(head_size),
                &mut windows,
                &layer.digest,
            )?;
            let entries = read_entries(&mut stream, &layer.digest, files.as_ref())?;
            io::copy(&mut stream, &mut io::sink())?;
            let (spans, total_out, windows_length) = stream.finish()?;
            (entries, spans, total_out, windows_length)
        }
        LayerCompression::None => {
            let mut stream = FixedSpans::new(&mut blob, boundaries, SpanHasher::new(head_size));
            let entries = read_entries(&mut stream, &layer.digest, files.as_ref())?;
            io::copy(&mut stream, &mut io::sink())?;
            let (spans, total) = stream.finish();
            (entries, spans, total, 0)
        }
        LayerCompression::Zstd => {
            return Err(IndexError::Unsupported {
                digest: layer.digest.clone(),
                problem: "zstd layers have no seekable index; `pronto convert --compression zstd` makes them lazy (zstd:chunked)".into(),
            });
        }
    };
    let (digest, size) = blob.finish();
    if digest != layer.digest || size != layer.size {
        return Err(IndexError::LayerDigest {
            expected: format!("{} ({} bytes)", layer.digest, layer.size),
            actual: format!("{digest} ({size} bytes)"),
        });
    }
    Ok(Scanned {
        layer: LayerInfo {
            digest,
            size,
            compression: layer.compression,
            uncompressed_size,
        },
        entries,
        spans,
        windows,
        windows_length,
    })
}

/// Reads the tar stream's headers into entries; the data is read past
/// (through `stream`, which keeps track of offsets and spans).
fn read_entries(
    stream: &mut impl Read,
    layer: &str,
    files: Option<&FileCount>,
) -> Result<Vec<Entry>, IndexError> {
    let unsupported = |problem: String| IndexError::Unsupported {
        digest: layer.to_owned(),
        problem,
    };
    let mut archive = tar::Archive::new(stream);
    let mut entries = Vec::new();
    let tar_error = |e: io::Error, what: &str| match IndexError::from(e) {
        IndexError::Io(e) => unsupported(format!("{what}: {e}")),
        inner => inner,
    };
    let items = archive
        .entries()
        .map_err(|e| tar_error(e, "not a tar stream"))?;
    for item in items {
        let mut item = item.map_err(|e| tar_error(e, "malformed tar entry"))?;
        let Some(entry) = pronto_layer::tar_entry(&mut item).map_err(unsupported)? else {
            continue;
        };
        // Drain the data so the next header is read; the stream counts it.
        io::copy(&mut item, &mut io::sink()).map_err(|e| tar_error(e, "unreadable entry data"))?;
        if let Some(files) = files {
            files.add_one();
        }
        entries.push(entry);
    }
    Ok(entries)
}

/// A reader that hashes and counts what passes through it.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn finish(self) -> (String, u64) {
        (
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        )
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    fn finish(mut self) -> io::Result<(String, u64)> {
        self.inner.flush()?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Digests one span's compressed bytes as they pass: all of them, and its
/// head (the first `head_size`).
struct SpanHasher {
    whole: Sha256,
    head: Sha256,
    fed: u64,
    head_size: u64,
}

impl SpanHasher {
    fn new(head_size: u64) -> Self {
        Self {
            whole: Sha256::new(),
            head: Sha256::new(),
            fed: 0,
            head_size,
        }
    }

    fn update(&mut self, bytes: &[u8]) {
        self.whole.update(bytes);
        if self.fed < self.head_size {
            let take = (self.head_size - self.fed).min(bytes.len() as u64) as usize;
            self.head.update(&bytes[..take]);
        }
        self.fed += bytes.len() as u64;
    }

    /// The span's digest and its head's, starting over for the next span.
    fn take(&mut self) -> ([u8; 32], [u8; 32]) {
        let done = std::mem::replace(self, Self::new(self.head_size));
        (done.whole.finalize().into(), done.head.finalize().into())
    }
}

/// Spans of an uncompressed tar: fixed-size pieces of the blob itself.
struct FixedSpans<R> {
    inner: R,
    boundaries: Boundaries,
    position: u64,
    hasher: SpanHasher,
    spans: Vec<Span>,
    /// Files the tar reader had passed when the open span started.
    files_at_last: u64,
}

impl<R: Read> FixedSpans<R> {
    fn new(inner: R, boundaries: Boundaries, hasher: SpanHasher) -> Self {
        Self {
            inner,
            boundaries,
            position: 0,
            hasher,
            spans: Vec::new(),
            files_at_last: 0,
        }
    }

    fn close_span(&mut self) {
        let start = self.spans.last().map_or(0, |s: &Span| s.compressed_end);
        if self.position == start {
            return;
        }
        let (digest, head_digest) = self.hasher.take();
        self.spans.push(Span {
            compressed_start: start,
            compressed_end: self.position,
            uncompressed_start: start,
            digest,
            head_digest,
            checkpoint: None,
        });
        self.files_at_last = self.boundaries.files();
    }

    fn finish(mut self) -> (Vec<Span>, u64) {
        self.close_span();
        (self.spans, self.position)
    }
}

impl<R: Read> Read for FixedSpans<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut span_start = self.spans.last().map_or(0, |s| s.compressed_end);
        if self.position > span_start
            && self.boundaries.starts_here(
                self.spans.len() + 1,
                span_start,
                self.position,
                self.files_at_last,
            )
        {
            // Many files in this span: it ends here, small.
            self.close_span();
            span_start = self.position;
        }
        let span_end = self.boundaries.fixed_end(self.spans.len(), span_start);
        let room = usize::try_from(span_end - self.position).unwrap_or(usize::MAX);
        let want = buf.len().min(room);
        let n = self.inner.read(&mut buf[..want])?;
        self.hasher.update(&buf[..n]);
        self.position += n as u64;
        if self.position == span_end {
            self.close_span();
        }
        Ok(n)
    }
}

/// Inflates a gzip blob for a reader of its tar stream, recording a
/// checkpoint at the deflate block boundaries `boundaries` asks for, and the digest of every span's compressed bytes.
struct Checkpointer<'a, R> {
    blob: R,
    layer: &'a str,
    inflate: Inflate,
    input: Vec<u8>,
    input_pos: usize,
    input_len: usize,
    blob_eof: bool,
    ended: bool,
    /// The last 32 KiB of output (a ring; `window_filled` bytes valid).
    window: Vec<u8>,
    window_pos: usize,
    window_filled: usize,
    boundaries: Boundaries,
    last_checkpoint_out: u64,
    /// Files the tar reader had passed at the last checkpoint.
    files_at_last: u64,
    hasher: SpanHasher,
    last_byte: u8,
    spans: Vec<Span>,
    windows: &'a mut std::fs::File,
    windows_length: u64,
}

impl<'a, R: Read> Checkpointer<'a, R> {
    fn new(
        blob: R,
        boundaries: Boundaries,
        hasher: SpanHasher,
        windows: &'a mut std::fs::File,
        layer: &'a str,
    ) -> Result<Self, IndexError> {
        Ok(Self {
            blob,
            layer,
            inflate: Inflate::gzip().map_err(|e| IndexError::Encode(e.to_string()))?,
            input: vec![0; 256 * 1024],
            input_pos: 0,
            input_len: 0,
            blob_eof: false,
            ended: false,
            window: vec![0; WINDOW_SIZE],
            window_pos: 0,
            window_filled: 0,
            boundaries,
            last_checkpoint_out: 0,
            files_at_last: 0,
            hasher,
            last_byte: 0,
            spans: Vec::new(),
            windows,
            windows_length: 0,
        })
    }

    fn corrupt(&self, problem: String) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            IndexError::CorruptLayer {
                digest: self.layer.to_owned(),
                offset: self.inflate.total_in(),
                problem,
            },
        )
    }

    fn remember_output(&mut self, out: &[u8]) {
        let out = if out.len() > WINDOW_SIZE {
            &out[out.len() - WINDOW_SIZE..]
        } else {
            out
        };
        let first = out.len().min(WINDOW_SIZE - self.window_pos);
        self.window[self.window_pos..self.window_pos + first].copy_from_slice(&out[..first]);
        self.window[..out.len() - first].copy_from_slice(&out[first..]);
        self.window_pos = (self.window_pos + out.len()) % WINDOW_SIZE;
        self.window_filled = (self.window_filled + out.len()).min(WINDOW_SIZE);
    }

    /// The window in order, oldest byte first.
    fn current_window(&self) -> Vec<u8> {
        if self.window_filled < WINDOW_SIZE {
            return self.window[..self.window_filled].to_vec();
        }
        let mut w = self.window[self.window_pos..].to_vec();
        w.extend_from_slice(&self.window[..self.window_pos]);
        w
    }

    fn checkpoint(&mut self) -> io::Result<()> {
        let total_in = self.inflate.total_in();
        let total_out = self.inflate.total_out();
        let bits = (self.inflate.data_type() & 7) as u8;
        let window = self.current_window();
        let compressed = crate::deflate(&window);
        self.windows.write_all(&compressed)?;
        let checkpoint = Checkpoint {
            deflate_offset: total_in,
            bits,
            window_offset: self.windows_length,
            window_length: compressed.len() as u32,
            window_size: window.len() as u32,
            window_digest: Sha256::digest(&compressed).into(),
        };
        self.windows_length += compressed.len() as u64;
        if let Some(previous) = self.spans.last_mut() {
            previous.compressed_end = total_in;
            (previous.digest, previous.head_digest) = self.hasher.take();
            if bits > 0 {
                // The partial byte belongs to both spans.
                self.hasher.update(&[self.last_byte]);
            }
        }
        self.spans.push(Span {
            compressed_start: if self.spans.is_empty() {
                0
            } else {
                total_in - u64::from(bits > 0)
            },
            compressed_end: total_in,
            uncompressed_start: total_out,
            digest: [0; 32],
            head_digest: [0; 32],
            checkpoint: Some(checkpoint),
        });
        self.last_checkpoint_out = total_out;
        self.files_at_last = self.boundaries.files();
        Ok(())
    }

    fn finish(mut self) -> Result<(Vec<Span>, u64, u64), IndexError> {
        if !self.ended {
            return Err(IndexError::CorruptLayer {
                digest: self.layer.to_owned(),
                offset: self.inflate.total_in(),
                problem: "the gzip stream ends early".into(),
            });
        }
        // Anything after the gzip trailer (another member, garbage) would be
        // data the index cannot reach.
        let mut rest = self.input_len - self.input_pos;
        if rest == 0 && !self.blob_eof {
            rest = self.blob.read(&mut self.input)?;
        }
        if rest > 0 {
            return Err(IndexError::Unsupported {
                digest: self.layer.to_owned(),
                problem: format!(
                    "data follows the gzip stream at byte {} (multi-member gzip is not indexed)",
                    self.inflate.total_in()
                ),
            });
        }
        let total_in = self.inflate.total_in();
        let total_out = self.inflate.total_out();
        if let Some(last) = self.spans.last_mut() {
            last.compressed_end = total_in;
            (last.digest, last.head_digest) = self.hasher.take();
        }
        Ok((self.spans, total_out, self.windows_length))
    }
}

impl<R: Read> Read for Checkpointer<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while !self.ended && !buf.is_empty() {
            if self.input_pos == self.input_len && !self.blob_eof {
                self.input_len = self.blob.read(&mut self.input)?;
                self.input_pos = 0;
                self.blob_eof = self.input_len == 0;
            }
            let input = &self.input[self.input_pos..self.input_len];
            let step = self
                .inflate
                .step(input, buf, true)
                .map_err(|e| self.corrupt(e.0))?;
            if step.consumed > 0 {
                let used = &self.input[self.input_pos..self.input_pos + step.consumed];
                self.hasher.update(used);
                self.last_byte = used[step.consumed - 1];
                self.input_pos += step.consumed;
            }
            self.remember_output(&buf[..step.produced]);
            let data_type = self.inflate.data_type();
            let at_boundary = data_type & 128 != 0 && data_type & 64 == 0;
            let out = self.inflate.total_out();
            if step.end {
                self.ended = true;
            } else if at_boundary
                && self.boundaries.starts_here(
                    self.spans.len(),
                    self.last_checkpoint_out,
                    out,
                    self.files_at_last,
                )
            {
                self.checkpoint()?;
            }
            if step.produced > 0 {
                return Ok(step.produced);
            }
            if step.consumed == 0 && self.blob_eof && !step.end {
                return Err(self.corrupt("the gzip stream ends early".into()));
            }
        }
        Ok(0)
    }
}
