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
//!   frame, cached under its content digest, so a chunk any layer of any
//!   image already brought is never fetched again. Small files are the
//!   exception: runs of them share a span (see [`ChunkedLayout`]).

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

    /// The layer-blob bytes of span `i`'s head, when the span is longer
    /// than its head and the head has a digest of its own: the start of
    /// the span's output can then be served before the rest arrives.
    fn head_input(&self, _i: usize) -> Option<Range<u64>> {
        None
    }

    /// Verifies span `i`'s head (the bytes at [`Self::head_input`]) and
    /// decodes it: the start of the span's output.
    fn decode_head(&self, i: usize, _input: &[u8], _window: &[u8]) -> Result<Vec<u8>, String> {
        Err(format!("span {i} has no head"))
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

    fn head_input(&self, i: usize) -> Option<Range<u64>> {
        self.0.head_input(i)
    }

    fn decode_head(&self, i: usize, input: &[u8], window: &[u8]) -> Result<Vec<u8>, String> {
        self.0
            .decode_head(i, input, window)
            .map_err(|e| e.to_string())
    }
}

/// One chunk of a chunked layer.
#[derive(Debug, Clone)]
struct ChunkSpan {
    /// Where the chunk starts in the stream.
    start: u64,
    len: u64,
    /// Its member (or frame) in the blob, and where in what that
    /// decompresses to the chunk starts.
    blob: Range<u64>,
    inner: u64,
    digest: [u8; 32],
}

/// A chunked layer's table of contents as a layout.
///
/// A span is one chunk, except for small files (one chunk of at most
/// [`pronto_toc::SMALL_FILE`] bytes each): a run of them in blob order is
/// one span, so that a start that reads hundreds of small files stores tens
/// of cache entries rather than hundreds, each written and synced on its
/// own. A run ends where [`pronto_toc::ends_run`] says, and at any other
/// chunk: the same files in another layer or image form the same runs,
/// after a change as before it but around it, and so the same cache keys.
/// Layers Pronto writes in gzip hold each run in one member. Chunks that
/// share a member (eStargz's `innerOffset`) are always in one span.
#[derive(Debug)]
pub struct ChunkedLayout {
    digest: String,
    size: u64,
    entries: Vec<Entry>,
    chunks: Vec<ChunkSpan>,
    /// Per span, its chunks.
    spans: Vec<Range<usize>>,
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
        let mut all = Vec::new();
        // Per chunk, whether it holds a small file.
        let mut small = Vec::new();
        let mut stream = 0u64;
        for (entry, chunks) in entries.iter_mut().zip(chunks) {
            entry.offset = stream;
            let one = chunks.len() == 1 && entry.size <= pronto_toc::SMALL_FILE;
            for chunk in chunks {
                all.push(ChunkSpan {
                    start: stream + chunk.file_offset,
                    len: chunk.len,
                    blob: chunk.blob,
                    inner: chunk.inner,
                    digest: chunk.digest,
                });
                small.push(one);
            }
            if entry.kind == EntryKind::File {
                stream += entry.size;
            }
        }
        let mut spans: Vec<Range<usize>> = Vec::new();
        let (mut first, mut run) = (0, 0u64);
        for i in 0..all.len() {
            run += all[i].len;
            let Some(next) = all.get(i + 1) else {
                spans.push(first..i + 1);
                break;
            };
            let ends = next.blob.start != all[i].blob.start
                && (!small[i] || !small[i + 1] || pronto_toc::ends_run(&all[i].digest, run));
            if ends {
                spans.push(first..i + 1);
                (first, run) = (i + 1, 0);
            }
        }
        // The mean, not the largest: read-ahead counts spans, and
        // content-defined chunks of one file range from a quarter to four
        // times their average.
        let total: u64 = all.iter().map(|s| s.len).sum();
        let span_size = (total / spans.len().max(1) as u64).max(64 << 10);
        Ok(Self {
            digest: digest.to_owned(),
            size,
            entries,
            chunks: all,
            spans,
            span_size,
            compression,
        })
    }

    /// The first and last chunk of span `i`.
    fn ends(&self, i: usize) -> (&ChunkSpan, &ChunkSpan) {
        let span = &self.spans[i];
        (&self.chunks[span.start], &self.chunks[span.end - 1])
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
        let first = self.spans.partition_point(|s| {
            let last = &self.chunks[s.end - 1];
            last.start + last.len <= range.start
        });
        let last = self
            .spans
            .partition_point(|s| self.chunks[s.start].start < range.end);
        first..last.max(first)
    }

    fn span_input(&self, i: usize) -> Range<u64> {
        let (first, last) = self.ends(i);
        first.blob.start..last.blob.end
    }

    fn span_output(&self, i: usize) -> Range<u64> {
        let (first, last) = self.ends(i);
        first.start..last.start + last.len
    }

    /// Chunks are as small as the files they hold: a read fetches its
    /// neighbours too, up to 256 KiB, as the seekable index's spans do
    /// where many files begin.
    fn min_fetch(&self) -> u64 {
        256 << 10
    }

    /// The chunk's content digest alone: the same bytes in any layer of
    /// any image are one cache entry, fetched once. A run of small files:
    /// their digests in order.
    fn span_key(&self, i: usize) -> CacheKey {
        let chunks = &self.chunks[self.spans[i].clone()];
        let mut hasher = Sha256::new();
        if let [chunk] = chunks {
            hasher.update(b"pronto chunk v1");
            hasher.update(chunk.digest);
        } else {
            hasher.update(b"pronto chunks v1");
            for chunk in chunks {
                hasher.update(chunk.digest);
            }
        }
        hasher.finalize().into()
    }

    fn decode_span(&self, i: usize, input: &[u8], _window: &[u8]) -> Result<Vec<u8>, String> {
        let base = self.span_input(i).start;
        let output = self.span_output(i);
        let mut data = vec![0u8; (output.end - output.start) as usize];
        let mut at = 0;
        // The member being decompressed, and how far.
        let mut open: Option<(u64, Box<dyn Read + '_>, u64)> = None;
        for j in self.spans[i].clone() {
            let chunk = &self.chunks[j];
            let failed = |e: std::io::Error| {
                format!("chunk {j} does not decompress to {} bytes: {e}", chunk.len)
            };
            if open
                .as_ref()
                .is_none_or(|(start, ..)| *start != chunk.blob.start)
            {
                let bytes = input
                    .get((chunk.blob.start - base) as usize..(chunk.blob.end - base) as usize)
                    .ok_or_else(|| format!("chunk {j} lies outside the bytes fetched"))?;
                let decoder = self.compression.decoder(bytes).map_err(failed)?;
                open = Some((chunk.blob.start, decoder, 0));
            }
            let (_, decoder, read) = open.as_mut().expect("opened above");
            if chunk.inner < *read {
                return Err(format!(
                    "chunk {j} starts before the chunk ahead of it ends"
                ));
            }
            std::io::copy(&mut decoder.take(chunk.inner - *read), &mut std::io::sink())
                .map_err(failed)?;
            let out = &mut data[at..at + chunk.len as usize];
            decoder.read_exact(out).map_err(failed)?;
            *read = chunk.inner + chunk.len;
            if <[u8; 32]>::from(Sha256::digest(&*out)) != chunk.digest {
                return Err(format!(
                    "chunk {j} does not match its digest sha256:{}",
                    hex::encode(chunk.digest)
                ));
            }
            at += chunk.len as usize;
        }
        Ok(data)
    }
}
