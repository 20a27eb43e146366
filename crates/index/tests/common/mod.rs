//! What the index tests share: a generated layer written out and indexed.

// Each test file uses what it needs of it.
#![allow(dead_code)]

use pronto_index::{BuiltIndex, LayerCompression, LayerToIndex, build_index};
use pronto_testbed::Layer;

/// A layer blob and its index blob.
pub struct Built {
    pub blob: Vec<u8>,
    pub index_blob: Vec<u8>,
    pub built: BuiltIndex,
    pub compression: LayerCompression,
}

/// Writes `layer` and indexes it with `span_size`.
pub fn build(layer: &Layer, span_size: u64) -> Built {
    let mut blob = Vec::new();
    let digests = layer.write(&mut blob).unwrap();
    let compression = LayerCompression::from_media_type(layer.compression.media_type())
        .expect("a layer media type");
    let target = LayerToIndex {
        digest: digests.digest,
        size: digests.size,
        compression,
    };
    let mut index_blob = Vec::new();
    let built = build_index(blob.as_slice(), &target, span_size, &mut index_blob).unwrap();
    assert_eq!(built.size, index_blob.len() as u64);
    Built {
        blob,
        index_blob,
        built,
        compression,
    }
}
