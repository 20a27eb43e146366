//! Reading through an index: which spans hold a byte range, and turning a
//! span's verified compressed bytes (plus its checkpoint's window) back
//! into the tar stream's bytes.

use std::io::Read;
use std::ops::Range;

use sha2::{Digest, Sha256};

use crate::error::IndexError;
use crate::format::{IndexMeta, LayerCompression, Limits, decode_prefix};
use crate::gzip::{Inflate, WINDOW_SIZE};

/// A parsed, validated layer index.
#[derive(Debug, Clone)]
pub struct LayerIndex {
    meta: IndexMeta,
    prefix_len: u64,
}

impl LayerIndex {
    /// Parses an index prefix (or a whole index blob) with the default
    /// limits.
    pub fn parse(prefix: &[u8]) -> Result<Self, IndexError> {
        Self::parse_with(prefix, &Limits::default())
    }

    pub fn parse_with(prefix: &[u8], limits: &Limits) -> Result<Self, IndexError> {
        let prefix_len = crate::format::prefix_len(prefix, limits)? as u64;
        let meta = decode_prefix(prefix, limits)?;
        Ok(Self { meta, prefix_len })
    }

    pub fn meta(&self) -> &IndexMeta {
        &self.meta
    }

    /// Length of the prefix (header + metadata) in the index blob.
    pub fn prefix_len(&self) -> u64 {
        self.prefix_len
    }

    /// The tar-stream bytes span `i` produces.
    pub fn span_output(&self, i: usize) -> Range<u64> {
        let start = self.meta.spans[i].uncompressed_start;
        let end = self
            .meta
            .spans
            .get(i + 1)
            .map_or(self.meta.layer.uncompressed_size, |s| s.uncompressed_start);
        start..end
    }

    /// The layer-blob bytes to fetch for span `i`.
    pub fn span_input(&self, i: usize) -> Range<u64> {
        let span = &self.meta.spans[i];
        span.compressed_start..span.compressed_end
    }

    /// Indices of the spans holding the tar-stream bytes `range`.
    pub fn spans_for(&self, range: Range<u64>) -> Range<usize> {
        if range.start >= range.end {
            return 0..0;
        }
        let spans = &self.meta.spans;
        let first = spans.partition_point(|s| s.uncompressed_start <= range.start) - 1;
        let last = spans.partition_point(|s| s.uncompressed_start < range.end);
        first..last
    }

    /// Where the windows section lies in the index blob.
    pub fn windows_range(&self) -> Range<u64> {
        self.prefix_len..self.prefix_len + self.meta.windows_length
    }

    /// Where span `i`'s window lies in the index blob, if it needs one.
    pub fn window_range(&self, i: usize) -> Option<Range<u64>> {
        let cp = self.meta.spans[i].checkpoint.as_ref()?;
        if cp.window_size == 0 {
            return None;
        }
        let start = self.prefix_len + cp.window_offset;
        Some(start..start + u64::from(cp.window_length))
    }

    /// Verifies and decompresses span `i`'s window from the bytes at
    /// [`Self::window_range`].
    pub fn decode_window(&self, i: usize, compressed: &[u8]) -> Result<Vec<u8>, IndexError> {
        let span_error = |problem: String| IndexError::Span {
            layer: self.meta.layer.digest.clone(),
            span: i,
            problem,
        };
        let Some(cp) = self.meta.spans[i].checkpoint.as_ref() else {
            return Ok(Vec::new());
        };
        let digest: [u8; 32] = Sha256::digest(compressed).into();
        if digest != cp.window_digest {
            return Err(span_error(
                "its window does not match the digest in the index".into(),
            ));
        }
        let mut window = Vec::with_capacity(cp.window_size as usize);
        flate2::read::DeflateDecoder::new(compressed)
            .take(WINDOW_SIZE as u64 + 1)
            .read_to_end(&mut window)
            .map_err(|e| span_error(format!("its window does not decompress: {e}")))?;
        if window.len() != cp.window_size as usize {
            return Err(span_error("its window has the wrong size".into()));
        }
        Ok(window)
    }

    /// Verifies span `i`'s compressed bytes (from [`Self::span_input`])
    /// against its digest and returns the tar-stream bytes it holds
    /// ([`Self::span_output`]). `window` is the decoded window (empty when
    /// the span needs none).
    pub fn decode_span(
        &self,
        i: usize,
        compressed: &[u8],
        window: &[u8],
    ) -> Result<Vec<u8>, IndexError> {
        let span = &self.meta.spans[i];
        self.check_input(i, compressed, self.span_input(i), &span.digest, "its bytes")?;
        self.inflate(i, compressed, window, true)
    }

    /// The layer-blob bytes of span `i`'s head, when its index has head
    /// digests and the span is longer than its head (see
    /// [`crate::Span::head_digest`]).
    pub fn head_input(&self, i: usize) -> Option<Range<u64>> {
        let size = self.meta.head_size;
        let input = self.span_input(i);
        (size > 0 && input.end - input.start > size).then(|| input.start..input.start + size)
    }

    /// Verifies span `i`'s head (the bytes at [`Self::head_input`]) against
    /// its digest and returns the tar-stream bytes it decodes to: the
    /// start of [`Self::span_output`], as far as the head reaches.
    pub fn decode_head(
        &self,
        i: usize,
        compressed: &[u8],
        window: &[u8],
    ) -> Result<Vec<u8>, IndexError> {
        let Some(input) = self.head_input(i) else {
            return Err(self.span_error(i, "it has no head digest".into()));
        };
        let span = &self.meta.spans[i];
        self.check_input(i, compressed, input, &span.head_digest, "its head")?;
        self.inflate(i, compressed, window, false)
    }

    fn span_error(&self, i: usize, problem: String) -> IndexError {
        IndexError::Span {
            layer: self.meta.layer.digest.clone(),
            span: i,
            problem,
        }
    }

    /// Checks that `compressed` is `input`'s bytes: its length, and its
    /// SHA-256 against `digest`.
    fn check_input(
        &self,
        i: usize,
        compressed: &[u8],
        input: Range<u64>,
        digest: &[u8; 32],
        what: &str,
    ) -> Result<(), IndexError> {
        if compressed.len() as u64 != input.end - input.start {
            return Err(self.span_error(
                i,
                format!(
                    "got {} bytes, expected {}",
                    compressed.len(),
                    input.end - input.start
                ),
            ));
        }
        let actual: [u8; 32] = Sha256::digest(compressed).into();
        if &actual != digest {
            return Err(self.span_error(i, format!("{what} do not match the digest in the index")));
        }
        Ok(())
    }

    /// Decodes verified bytes from the start of span `i`: all of it
    /// (`whole`: the output must be exactly the span's), or its head (the
    /// output may be shorter, never longer).
    fn inflate(
        &self,
        i: usize,
        compressed: &[u8],
        window: &[u8],
        whole: bool,
    ) -> Result<Vec<u8>, IndexError> {
        let span = &self.meta.spans[i];
        let span_error = |problem: String| self.span_error(i, problem);
        let output = self.span_output(i);
        let len = (output.end - output.start) as usize;
        match (self.meta.layer.compression, &span.checkpoint) {
            (LayerCompression::None, _) => Ok(compressed.to_vec()),
            (LayerCompression::Gzip, Some(cp)) => {
                let start = (cp.deflate_offset - span.compressed_start) as usize;
                let mut inflate = Inflate::raw().map_err(|e| span_error(e.0))?;
                if cp.bits > 0 {
                    inflate
                        .prime(cp.bits, compressed[start - 1])
                        .map_err(|e| span_error(e.0))?;
                }
                inflate
                    .set_dictionary(window)
                    .map_err(|e| span_error(e.0))?;
                // One byte of room past the promised length: a span that
                // decodes to more than its index says is caught, not cut.
                let mut out = vec![0u8; len + 1];
                let mut pos_in = start;
                let mut pos_out = 0;
                loop {
                    let step = inflate
                        .step(&compressed[pos_in..], &mut out[pos_out..], true)
                        .map_err(|e| span_error(e.0))?;
                    pos_in += step.consumed;
                    pos_out += step.produced;
                    if step.end || pos_out > len || (step.consumed == 0 && step.produced == 0) {
                        break;
                    }
                }
                if pos_out > len || (whole && pos_out != len) {
                    let more = if pos_out > len { "more than " } else { "" };
                    return Err(span_error(format!(
                        "decompressed to {more}{pos_out} bytes, expected {len}"
                    )));
                }
                out.truncate(pos_out);
                Ok(out)
            }
            (LayerCompression::Gzip, None) => Err(span_error("it has no checkpoint".into())),
            (LayerCompression::Zstd, _) => Err(span_error("zstd layers are not indexed".into())),
        }
    }

    /// Reads tar-stream bytes `range` with caller-supplied fetchers for
    /// layer-blob ranges and index-blob ranges. For tests and simple tools;
    /// the filesystem schedules spans itself.
    pub fn read_range(
        &self,
        range: Range<u64>,
        mut fetch_layer: impl FnMut(Range<u64>) -> Result<Vec<u8>, IndexError>,
        mut fetch_index: impl FnMut(Range<u64>) -> Result<Vec<u8>, IndexError>,
    ) -> Result<Vec<u8>, IndexError> {
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for i in self.spans_for(range.clone()) {
            let window = match self.window_range(i) {
                Some(r) => self.decode_window(i, &fetch_index(r)?)?,
                None => Vec::new(),
            };
            let bytes = self.decode_span(i, &fetch_layer(self.span_input(i))?, &window)?;
            let span = self.span_output(i);
            let from = range.start.max(span.start) - span.start;
            let to = range.end.min(span.end) - span.start;
            out.extend_from_slice(&bytes[from as usize..to as usize]);
        }
        Ok(out)
    }
}
