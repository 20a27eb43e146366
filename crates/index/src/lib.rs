//! The seekable index over an unmodified OCI layer: the file table, gzip
//! checkpoints and span digests that let a node read any file of a layer by
//! fetching only the compressed spans that hold it.
//!
//! This is pure format code. It must not know about the network or FUSE:
//! it reads and writes bytes it is given. See `docs/formats.md` for the
//! byte layout and media types.

mod build;
mod error;
mod format;
mod gzip;
mod read;
mod validate;
mod verify;

use std::io::{Read, Write};

pub use build::{BuiltIndex, DEFAULT_SPAN_SIZE, HEAD_SIZE, LayerToIndex, build_index};
pub use error::IndexError;
pub use format::{
    Checkpoint, Entry, EntryKind, HEADER_SIZE, IndexMeta, LayerCompression, LayerInfo, Limits,
    MAGIC, Span, VERSION, encode_prefix, prefix_len,
};
pub use read::LayerIndex;
pub use verify::{LayerTruth, verify_against_layer};

/// Media type of the artifact manifest that carries a layer's indexes.
pub const ARTIFACT_TYPE: &str = "application/vnd.pronto.index.v1";
/// Media type of one layer's index blob.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.pronto.index.layer.v1";
/// Annotation on an index blob's descriptor: the layer it describes.
pub const ANNOTATION_LAYER: &str = "dev.pronto.index.layer";
/// Annotation: length of the prefix a node fetches to mount.
pub const ANNOTATION_PREFIX_SIZE: &str = "dev.pronto.index.prefix.size";
/// Annotation: SHA-256 of that prefix, so it can be verified alone.
pub const ANNOTATION_PREFIX_DIGEST: &str = "dev.pronto.index.prefix.digest";
/// Annotation on the manifest: the span size used.
pub const ANNOTATION_SPAN_SIZE: &str = "dev.pronto.index.span-size";

/// Raw deflate, used for the metadata and the windows.
pub(crate) fn deflate(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(bytes.len() / 2),
        flate2::Compression::new(6),
    );
    encoder
        .write_all(bytes)
        .expect("writing to a Vec cannot fail");
    encoder.finish().expect("writing to a Vec cannot fail")
}

/// Reads a whole tar stream from a layer blob (for comparisons in tests
/// and tools): decompresses as `compression` says.
pub fn decompress_layer(blob: &[u8], compression: LayerCompression) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    compression.decoder(blob)?.read_to_end(&mut out)?;
    Ok(out)
}
