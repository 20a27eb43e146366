//! Where a lazily read layer's bytes lie: the one thing that differs
//! between layer formats on the read path.
//!
//! A layout describes a layer as a stream of bytes cut into spans. Each
//! entry's data is a range of that stream; each span is a range of the
//! stream that one range of the layer blob decodes to, verified against a
//! digest, and cached under a key. Everything else — span locks, coalesced
//! range requests, read-ahead, startup-profile prefetch, the background
//! fetch, local copies for passthrough — is [`crate::IndexedLayer`]'s, the
//! same for every format.
//!
//! Two layouts exist:
//! - [`IndexLayout`], the seekable index over an unmodified layer: the
//!   stream is the layer's tar, spans start at deflate checkpoints and may
//!   need a 32 KiB window from the index blob;
//! - [`ChunkedLayout`], a chunked layer's table of contents (eStargz or
//!   zstd:chunked): the stream is every regular file's data one after
//!   another, and each span is one chunk, its own gzip member or zstd
//!   frame, cached under its content digest, so
//!   a chunk any layer of any image already brought is never fetched again.

use std::io::Read;
use std::ops::Range;
use std::sync::Arc;

use pronto_index::LayerIndex;
use pronto_layer::{Entry, EntryKind};
use pronto_store::CacheKey;
use pronto_toc::{Compression, Toc};
use sha2::{Digest, Sha256};

/// How a layer's entries map onto spans of its blob. Offsets of the
/// stream are [`Entry::offset`] plus an offset in the file.
pub trait Layout: Send + Sync + std::fmt::Debug {
    /// `sha256:<hex>` of the layer blob.
    fn layer_digest(&self) -> &str;

    /// Size of the layer blob.
    fn layer_size(&self) -> u64;

    /// The layer's entries; a regular file's data is the stream's bytes
    /// `offset..offset + size`.
    fn entries(&self) -> &[Entry];

    /// How many spans there are.
    fn span_count(&self) -> usize;

    /// The usual length of a span's output, to size read-ahead.
    fn span_size(&self) -> u64;

    /// The spans holding stream bytes `range`.
    fn spans_for(&self, range: Range<u64>) -> Range<usize>;

    /// The layer-blob bytes to fetch for span `i`. Neighbouring spans'
    /// inputs follow each other, so runs of spans are one range request.
    fn span_input(&self, i: usize) -> Range<u64>;

    /// The stream bytes span `i` decodes to.
    fn span_output(&self, i: usize) -> Range<u64>;

    /// The cache key of span `i`'s decoded bytes.
    fn span_key(&self, i: usize) -> CacheKey;

    /// Verifies span `i`'s input bytes and decodes them; `window` is its
    /// window (empty when it needs none).
    fn decode_span(&self, i: usize, input: &[u8], window: &[u8]) -> Result<Vec<u8>, String>;

    /// How many blob bytes an on-demand read may fetch at least, taking
    /// the missing spans after the ones it needs (0: only those).
    fn min_fetch(&self) -> u64 {
        0
    }

    /// Where span `i`'s window lies in the index blob, if it needs one.
    fn window_range(&self, _i: usize) -> Option<Range<u64>> {
        None
    }

    /// The cache key of span `i`'s window, if it needs one.
    fn window_key(&self, _i: usize) -> Option<CacheKey> {
        None
    }

    /// The length of span `i`'s window, if it needs one.
    fn window_size(&self, _i: usize) -> Option<usize> {
        None
    }

    /// Verifies and decodes span `i`'s window from the bytes at
    /// [`Self::window_range`].
    fn decode_window(&self, _i: usize, _bytes: &[u8]) -> Result<Vec<u8>, String> {
        Ok(Vec::new())
    }
}

/// The seekable index over an unmodified layer.
#[derive(Debug, Clone)]
pub struct IndexLayout(pub Arc<LayerIndex>);

impl Layout for IndexLayout {
    fn layer_digest(&self) -> &str {
        &self.0.meta().layer.digest
    }

    fn layer_size(&self) -> u64 {
        self.0.meta().layer.size
    }

    fn entries(&self) -> &[Entry] {
        &self.0.meta().entries
    }

    fn span_count(&self) -> usize {
        self.0.meta().spans.len()
    }

    fn span_size(&self) -> u64 {
        self.0.meta().span_size
    }

    fn spans_for(&self, range: Range<u64>) -> Range<usize> {
        self.0.spans_for(range)
    }

    fn span_input(&self, i: usize) -> Range<u64> {
        self.0.span_input(i)
    }

    fn span_output(&self, i: usize) -> Range<u64> {
        self.0.span_output(i)
    }

    /// The span's compressed digest and its window's digest together (the
    /// same compressed bytes after a different window decode differently).
    fn span_key(&self, i: usize) -> CacheKey {
        let span = &self.0.meta().spans[i];
        let mut hasher = Sha256::new();
        hasher.update(b"pronto span v1");
        hasher.update(span.digest);
        if let Some(cp) = &span.checkpoint {
            hasher.update(cp.window_digest);
        }
        hasher.finalize().into()
    }

    fn decode_span(&self, i: usize, input: &[u8], window: &[u8]) -> Result<Vec<u8>, String> {
        self.0
            .decode_span(i, input, window)
            .map_err(|e| e.to_string())
    }

    fn window_range(&self, i: usize) -> Option<Range<u64>> {
        self.0.window_range(i)
    }

    fn window_key(&self, i: usize) -> Option<CacheKey> {
        let cp = self.0.meta().spans[i].checkpoint.as_ref()?;
        let mut hasher = Sha256::new();
        hasher.update(b"pronto window v1");
        hasher.update(cp.window_digest);
        Some(hasher.finalize().into())
    }

    fn window_size(&self, i: usize) -> Option<usize> {
        let cp = self.0.meta().spans.get(i)?.checkpoint.as_ref()?;
        Some(cp.window_size as usize)
    }

    fn decode_window(&self, i: usize, bytes: &[u8]) -> Result<Vec<u8>, String> {
        self.0.decode_window(i, bytes).map_err(|e| e.to_string())
    }
}

/// One chunk as a span.
#[derive(Debug, Clone)]
struct ChunkSpan {
    /// Where the chunk starts in the stream.
    start: u64,
    len: u64,
    blob: Range<u64>,
    digest: [u8; 32],
}

/// A chunked layer's table of contents as a layout.
#[derive(Debug)]
pub struct ChunkedLayout {
    digest: String,
    size: u64,
    entries: Vec<Entry>,
    spans: Vec<ChunkSpan>,
    span_size: u64,
    compression: Compression,
}

impl ChunkedLayout {
    /// The layout of the layer blob `digest` of `size` bytes, from its
    /// checked TOC; its chunks are compressed with `compression`.
    pub fn new(
        digest: &str,
        size: u64,
        toc: Toc,
        compression: Compression,
    ) -> Result<Self, String> {
        if toc.toc_offset > size {
            return Err(format!(
                "the TOC starts at byte {}, past the {size}-byte layer",
                toc.toc_offset
            ));
        }
        let Toc {
            mut entries,
            chunks,
            ..
        } = toc;
        let mut spans = Vec::new();
        let mut stream = 0u64;
        for (entry, chunks) in entries.iter_mut().zip(chunks) {
            entry.offset = stream;
            for chunk in chunks {
                spans.push(ChunkSpan {
                    start: stream + chunk.file_offset,
                    len: chunk.len,
                    blob: chunk.blob,
                    digest: chunk.digest,
                });
            }
            if entry.kind == EntryKind::File {
                stream += entry.size;
            }
        }
        let span_size = spans.iter().map(|s| s.len).max().unwrap_or(0).max(64 << 10);
        Ok(Self {
            digest: digest.to_owned(),
            size,
            entries,
            spans,
            span_size,
            compression,
        })
    }
}

impl Layout for ChunkedLayout {
    fn layer_digest(&self) -> &str {
        &self.digest
    }

    fn layer_size(&self) -> u64 {
        self.size
    }

    fn entries(&self) -> &[Entry] {
        &self.entries
    }

    fn span_count(&self) -> usize {
        self.spans.len()
    }

    fn span_size(&self) -> u64 {
        self.span_size
    }

    fn spans_for(&self, range: Range<u64>) -> Range<usize> {
        if range.start >= range.end {
            return 0..0;
        }
        let first = self
            .spans
            .partition_point(|s| s.start + s.len <= range.start);
        let last = self.spans.partition_point(|s| s.start < range.end);
        first..last.max(first)
    }

    fn span_input(&self, i: usize) -> Range<u64> {
        self.spans[i].blob.clone()
    }

    fn span_output(&self, i: usize) -> Range<u64> {
        let span = &self.spans[i];
        span.start..span.start + span.len
    }

    /// Chunks are as small as the files they hold: a read fetches its
    /// neighbours too, up to 512 KiB, as the seekable index's spans do
    /// where many files begin.
    fn min_fetch(&self) -> u64 {
        512 << 10
    }

    /// The chunk's content digest alone: the same bytes in any layer of
    /// any image are one cache entry, fetched once.
    fn span_key(&self, i: usize) -> CacheKey {
        let mut hasher = Sha256::new();
        hasher.update(b"pronto chunk v1");
        hasher.update(self.spans[i].digest);
        hasher.finalize().into()
    }

    fn decode_span(&self, i: usize, input: &[u8], _window: &[u8]) -> Result<Vec<u8>, String> {
        let span = &self.spans[i];
        let mut data = vec![0u8; span.len as usize];
        self.compression
            .decoder(input)
            .and_then(|mut decoder| decoder.read_exact(&mut data))
            .map_err(|e| format!("chunk {i} does not decompress to {} bytes: {e}", span.len))?;
        if <[u8; 32]>::from(Sha256::digest(&data)) != span.digest {
            return Err(format!(
                "chunk {i} does not match its digest sha256:{}",
                hex::encode(span.digest)
            ));
        }
        Ok(data)
    }
}
