//! The index blob: its data model, its byte layout and its parser.
//!
//! Layout (all integers little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `PRNTIDX\0` |
//! | 8 | 2 | format version (2; version 1 is still read) |
//! | 10 | 2 | reserved, 0 |
//! | 12 | 4 | length M of the compressed metadata |
//! | 16 | M | metadata: [`IndexMeta`] in postcard encoding, raw-deflate compressed |
//! | 16+M | … | windows: each checkpoint's 32 KiB window, raw-deflate compressed, back to back |
//!
//! The prefix `[0, 16+M)` is everything a node needs to mount; windows are
//! fetched one by one with range reads when their span is first read. Every
//! window and every compressed span of the layer carries a SHA-256 in the
//! metadata; the prefix itself is verified against the digest recorded in
//! the index manifest (see `docs/formats.md`).

use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::error::IndexError;

pub const MAGIC: &[u8; 8] = b"PRNTIDX\0";
pub const VERSION: u16 = 2;
/// The first format version, still read: its spans carry no head digest.
pub const VERSION_1: u16 = 1;
pub const HEADER_SIZE: usize = 16;

/// Limits a parser applies before trusting anything in an index.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_meta_compressed: u64,
    pub max_meta_uncompressed: u64,
    pub max_entries: usize,
    pub max_spans: usize,
    pub max_name_len: usize,
    pub max_xattrs_per_entry: usize,
    pub max_xattr_value: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_meta_compressed: 256 << 20,
            max_meta_uncompressed: 1 << 30,
            max_entries: 8_000_000,
            max_spans: 4_000_000,
            max_name_len: 16 * 1024,
            max_xattrs_per_entry: 256,
            max_xattr_value: 64 * 1024,
        }
    }
}

/// How the layer blob is compressed (for a plain tar, compressed and
/// uncompressed offsets are the same).
pub use pronto_layer::Compression as LayerCompression;

/// The layer an index describes. The index is only valid for this blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerInfo {
    /// `sha256:<hex>` of the compressed layer blob.
    pub digest: String,
    /// Size of the layer blob.
    pub size: u64,
    pub compression: LayerCompression,
    /// Size of the tar stream.
    pub uncompressed_size: u64,
}

pub use pronto_layer::{Entry, EntryKind};

/// Where decompression can resume: the state at a deflate block boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Offset in the layer blob of the first whole byte of deflate data.
    pub deflate_offset: u64,
    /// Bits (0–7) of the byte before `deflate_offset` that belong to the
    /// next block.
    pub bits: u8,
    /// The window: offset in the windows section, compressed length,
    /// uncompressed length (≤ 32 KiB) and SHA-256 of the compressed bytes.
    pub window_offset: u64,
    pub window_length: u32,
    pub window_size: u32,
    pub window_digest: [u8; 32],
}

/// A piece of the layer that is fetched, verified and decompressed as one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Span {
    /// The bytes of the layer blob to fetch: `[compressed_start, compressed_end)`.
    pub compressed_start: u64,
    pub compressed_end: u64,
    /// Where the span's output starts in the tar stream; it ends where the
    /// next span starts (or at the end of the stream).
    pub uncompressed_start: u64,
    /// SHA-256 of the compressed bytes.
    pub digest: [u8; 32],
    /// SHA-256 of the span's head: its first [`IndexMeta::head_size`]
    /// compressed bytes, or all of them when the span is shorter. A reader
    /// that needs only the start of a span is answered from the head once
    /// it has arrived and been checked, before the rest of the span.
    pub head_digest: [u8; 32],
    /// For gzip layers, where to resume decompression.
    pub checkpoint: Option<Checkpoint>,
}

/// Everything in the index except the windows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexMeta {
    pub layer: LayerInfo,
    /// The span size the index was built with (spans end at the first
    /// deflate block boundary after this many uncompressed bytes).
    pub span_size: u64,
    /// How many compressed bytes a span's head digest covers (0: the spans
    /// carry no head digest, as in format version 1).
    pub head_size: u64,
    pub entries: Vec<Entry>,
    pub spans: Vec<Span>,
    /// Length of the windows section.
    pub windows_length: u64,
}

/// Format version 1, read and turned into the current model (no heads).
mod v1 {
    use serde::Deserialize;

    use super::{Checkpoint, Entry, IndexMeta, LayerInfo};

    #[derive(Deserialize)]
    struct Span {
        compressed_start: u64,
        compressed_end: u64,
        uncompressed_start: u64,
        digest: [u8; 32],
        checkpoint: Option<Checkpoint>,
    }

    #[derive(Deserialize)]
    pub(super) struct Meta {
        layer: LayerInfo,
        span_size: u64,
        entries: Vec<Entry>,
        spans: Vec<Span>,
        windows_length: u64,
    }

    impl From<Meta> for IndexMeta {
        fn from(old: Meta) -> Self {
            IndexMeta {
                layer: old.layer,
                span_size: old.span_size,
                head_size: 0,
                entries: old.entries,
                spans: old
                    .spans
                    .into_iter()
                    .map(|s| super::Span {
                        compressed_start: s.compressed_start,
                        compressed_end: s.compressed_end,
                        uncompressed_start: s.uncompressed_start,
                        digest: s.digest,
                        head_digest: [0; 32],
                        checkpoint: s.checkpoint,
                    })
                    .collect(),
                windows_length: old.windows_length,
            }
        }
    }
}

/// Serialises `meta` into the index prefix (header plus compressed
/// metadata).
pub fn encode_prefix(meta: &IndexMeta) -> Result<Vec<u8>, IndexError> {
    let raw = postcard::to_stdvec(meta).map_err(|e| IndexError::Encode(e.to_string()))?;
    let compressed = crate::deflate(&raw);
    let length = u32::try_from(compressed.len())
        .map_err(|_| IndexError::Encode("metadata larger than 4 GiB".into()))?;
    let mut out = Vec::with_capacity(HEADER_SIZE + compressed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&compressed);
    Ok(out)
}

/// Length of the prefix, read from the first 16 bytes.
pub fn prefix_len(header: &[u8], limits: &Limits) -> Result<usize, IndexError> {
    let bad = |problem: String| IndexError::Malformed(problem);
    if header.len() < HEADER_SIZE {
        return Err(bad(format!(
            "the index is truncated at byte {} of its {HEADER_SIZE}-byte header",
            header.len()
        )));
    }
    if &header[..8] != MAGIC {
        return Err(bad("this is not a Pronto index (wrong magic bytes)".into()));
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    if version != VERSION && version != VERSION_1 {
        return Err(IndexError::Version(version));
    }
    let length = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if u64::from(length) > limits.max_meta_compressed {
        return Err(bad(format!(
            "the index metadata claims {length} bytes, over the limit of {}",
            limits.max_meta_compressed
        )));
    }
    Ok(HEADER_SIZE + length as usize)
}

/// Parses and validates an index prefix.
pub fn decode_prefix(prefix: &[u8], limits: &Limits) -> Result<IndexMeta, IndexError> {
    let len = prefix_len(prefix, limits)?;
    if prefix.len() < len {
        return Err(IndexError::Malformed(format!(
            "the index is truncated at byte {} of {len}",
            prefix.len()
        )));
    }
    let mut raw = Vec::new();
    flate2::read::DeflateDecoder::new(&prefix[HEADER_SIZE..len])
        .take(limits.max_meta_uncompressed + 1)
        .read_to_end(&mut raw)
        .map_err(|e| {
            IndexError::Malformed(format!("the index metadata does not decompress: {e}"))
        })?;
    if raw.len() as u64 > limits.max_meta_uncompressed {
        return Err(IndexError::Malformed(format!(
            "the index metadata decompresses to more than {} bytes",
            limits.max_meta_uncompressed
        )));
    }
    let malformed =
        |e: postcard::Error| IndexError::Malformed(format!("the index metadata is malformed: {e}"));
    let mut meta: IndexMeta = if u16::from_le_bytes([prefix[8], prefix[9]]) == VERSION_1 {
        postcard::from_bytes::<v1::Meta>(&raw)
            .map_err(malformed)?
            .into()
    } else {
        postcard::from_bytes(&raw).map_err(malformed)?
    };
    drop(raw);
    // serde grows long sequences by doubling (it does not trust their
    // announced length): a big layer's tables would keep up to half
    // their size as spare capacity for as long as the layer is mounted.
    meta.entries.shrink_to_fit();
    meta.spans.shrink_to_fit();
    crate::validate::validate(&meta, limits)?;
    Ok(meta)
}

#[cfg(test)]
mod tests {
    use serde::Serialize;
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::{LayerIndex, LayerToIndex, build_index};

    /// Format version 1's layout, to write an index as Pronto did before
    /// spans had heads.
    #[derive(Serialize)]
    struct SpanV1<'a> {
        compressed_start: u64,
        compressed_end: u64,
        uncompressed_start: u64,
        digest: [u8; 32],
        checkpoint: &'a Option<Checkpoint>,
    }

    #[derive(Serialize)]
    struct MetaV1<'a> {
        layer: &'a LayerInfo,
        span_size: u64,
        entries: &'a [Entry],
        spans: Vec<SpanV1<'a>>,
        windows_length: u64,
    }

    #[test]
    fn a_version_1_index_still_reads_without_heads() {
        let mut tar = tar::Builder::new(Vec::new());
        let data = vec![7u8; 300_000];
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, "data", data.as_slice())
            .unwrap();
        let blob = tar.into_inner().unwrap();
        let layer = LayerToIndex {
            digest: format!("sha256:{}", hex::encode(Sha256::digest(&blob))),
            size: blob.len() as u64,
            compression: LayerCompression::None,
        };
        let built = build_index(blob.as_slice(), &layer, 64 << 10, std::io::sink()).unwrap();
        assert_eq!(built.meta.head_size, crate::HEAD_SIZE);
        let meta = &built.meta;
        let old = MetaV1 {
            layer: &meta.layer,
            span_size: meta.span_size,
            entries: &meta.entries,
            spans: meta
                .spans
                .iter()
                .map(|s| SpanV1 {
                    compressed_start: s.compressed_start,
                    compressed_end: s.compressed_end,
                    uncompressed_start: s.uncompressed_start,
                    digest: s.digest,
                    checkpoint: &s.checkpoint,
                })
                .collect(),
            windows_length: meta.windows_length,
        };
        let compressed = crate::deflate(&postcard::to_stdvec(&old).unwrap());
        let mut prefix = MAGIC.to_vec();
        prefix.extend_from_slice(&VERSION_1.to_le_bytes());
        prefix.extend_from_slice(&0u16.to_le_bytes());
        prefix.extend_from_slice(&(compressed.len() as u32).to_le_bytes());
        prefix.extend_from_slice(&compressed);

        let index = LayerIndex::parse(&prefix).unwrap();
        assert_eq!(index.meta().head_size, 0);
        assert_eq!(index.meta().spans.len(), meta.spans.len());
        assert!((0..meta.spans.len()).all(|i| index.head_input(i).is_none()));
        let file = &index.meta().entries[0];
        let read = index
            .read_range(
                file.offset..file.offset + file.size,
                |r| Ok(blob[r.start as usize..r.end as usize].to_vec()),
                |_| unreachable!("a plain tar has no windows"),
            )
            .unwrap();
        assert_eq!(read, data);

        let mut future = prefix.clone();
        future[8] = 3;
        let err = LayerIndex::parse(&future).unwrap_err().to_string();
        assert!(err.contains("version 3"), "{err}");
    }
}
