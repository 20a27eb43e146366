//! Any byte range of any file, read through the index and only the spans
//! it names, equals the same bytes of a full decompression.

mod common;

use std::ops::Range;

use pronto_index::{
    EntryKind, IndexError, LayerCompression, LayerIndex, LayerToIndex, build_index,
    decompress_layer,
};
use pronto_testbed::image::LongNames;
use pronto_testbed::{Compression, Content, Entry, Layer};
use proptest::prelude::*;

struct Indexed {
    blob: Vec<u8>,
    tar: Vec<u8>,
    index_blob: Vec<u8>,
    index: LayerIndex,
}

fn index_layer(layer: &Layer, span_size: u64) -> Indexed {
    let common::Built {
        blob,
        index_blob,
        built,
        compression,
    } = common::build(layer, span_size);
    // A node mounts from the prefix alone.
    let index = LayerIndex::parse(&index_blob[..built.prefix_len as usize]).unwrap();
    let tar = decompress_layer(&blob, compression).unwrap();
    assert_eq!(index.meta().layer.uncompressed_size, tar.len() as u64);
    Indexed {
        blob,
        tar,
        index_blob,
        index,
    }
}

impl Indexed {
    /// Reads `range` of the tar stream, recording which layer bytes were
    /// fetched.
    fn read(
        &self,
        range: Range<u64>,
        fetched: &mut Vec<Range<u64>>,
    ) -> Result<Vec<u8>, IndexError> {
        self.index.read_range(
            range,
            |r| {
                fetched.push(r.clone());
                Ok(self.blob[r.start as usize..r.end as usize].to_vec())
            },
            |r| Ok(self.index_blob[r.start as usize..r.end as usize].to_vec()),
        )
    }
}

fn edge_layer(compression: Compression) -> Layer {
    let long = format!("deep/{}/{}", "x".repeat(140), "y".repeat(180));
    Layer::new()
        .compression(compression)
        .long_names(LongNames::Pax)
        .dir("deep")
        .file("empty", "")
        .file("tiny", "t")
        .entry(Entry::file("big", Content::random(1, 3 << 20)).xattr("user.k", b"v".to_vec()))
        .file("zeros", Content::Zeros(2 << 20))
        .file(&long, Content::random(2, 200_000))
        .symlink("link", "big")
        .hardlink("hard", "big")
        .whiteout("gone")
        .opaque("deep")
        .entry(Entry::char_device("dev/null", 1, 3))
        .many_small_files("small", 200, 3)
}

#[test]
fn every_file_reads_back_through_the_index() {
    for compression in [
        Compression::Gzip(6),
        Compression::Gzip(1),
        Compression::None,
    ] {
        let indexed = index_layer(&edge_layer(compression), 256 * 1024);
        let meta = indexed.index.meta();
        // zlib-rs level 1 (quick deflate) writes very long blocks, so it
        // gets few checkpoints: still correct, only less fine-grained.
        if compression != Compression::Gzip(1) {
            assert!(
                meta.spans.len() > 4,
                "{compression:?}: several spans, got {}",
                meta.spans.len()
            );
        }
        for entry in &meta.entries {
            let range = entry.offset..entry.offset + entry.size;
            let bytes = indexed.read(range.clone(), &mut Vec::new()).unwrap();
            assert_eq!(
                bytes,
                &indexed.tar[range.start as usize..range.end as usize],
                "{compression:?} {}",
                entry.path
            );
        }
    }
}

#[test]
fn metadata_matches_the_tar_headers() {
    let indexed = index_layer(&edge_layer(Compression::Gzip(6)), 1 << 20);
    let entries = &indexed.index.meta().entries;
    let find = |path: &str| {
        entries
            .iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("{path}"))
    };
    assert_eq!(find("big").size, 3 << 20);
    assert_eq!(*find("big").xattrs, [("user.k".to_owned(), b"v".to_vec())]);
    assert_eq!(find("link").kind, EntryKind::Symlink);
    assert_eq!(&*find("link").link, "big");
    assert_eq!(find("hard").kind, EntryKind::Hardlink);
    assert_eq!(&*find("hard").link, "big");
    assert_eq!(find(".wh.gone").kind, EntryKind::File);
    assert_eq!(find("deep/.wh..wh..opq").size, 0);
    let dev = find("dev/null");
    assert_eq!(
        (dev.kind, dev.dev_major, dev.dev_minor),
        (EntryKind::CharDevice, 1, 3)
    );
    assert!(
        entries.iter().any(|e| e.path.len() > 300),
        "the long PAX name"
    );
    assert_eq!(find("deep").kind, EntryKind::Dir);
}

#[test]
fn a_small_read_fetches_only_its_spans() {
    let indexed = index_layer(
        &Layer::new()
            .file("a", Content::random(1, 8 << 20))
            .file("b", "small file\n")
            .file("c", Content::random(2, 8 << 20)),
        1 << 20,
    );
    let b = indexed
        .index
        .meta()
        .entries
        .iter()
        .find(|e| e.path == "b")
        .unwrap()
        .clone();
    let mut fetched = Vec::new();
    let bytes = indexed
        .read(b.offset..b.offset + b.size, &mut fetched)
        .unwrap();
    assert_eq!(bytes, b"small file\n");
    let total: u64 = fetched.iter().map(|r| r.end - r.start).sum();
    assert!(total < 3 << 20, "fetched {total} bytes of a 16 MiB layer");
}

#[test]
fn parts_with_many_small_files_get_smaller_spans() {
    // Thousands of small files, then one big file: spans end after a
    // quarter of the span size where many files lie, and run the full
    // size through the big file.
    for compression in [Compression::FAST, Compression::None] {
        let indexed = index_layer(
            &Layer::new()
                .compression(compression)
                .many_text_files("lib", 3000)
                .file("weights", Content::random(3, 12 << 20)),
            1 << 20,
        );
        let meta = indexed.index.meta();
        let weights = meta.entries.iter().find(|e| e.path == "weights").unwrap();
        let spans: Vec<(u64, u64)> = (0..meta.spans.len())
            .map(|i| {
                let out = indexed.index.span_output(i);
                (out.start, out.end - out.start)
            })
            .collect();
        let small: Vec<u64> = spans
            .iter()
            .filter(|(start, _)| start + (1 << 20) < weights.offset)
            .map(|(_, len)| *len)
            .collect();
        let big: Vec<u64> = spans
            .iter()
            .filter(|(start, len)| {
                *start > weights.offset && start + len < weights.offset + weights.size
            })
            .map(|(_, len)| *len)
            .collect();
        assert!(small.len() >= 2, "{compression:?}: {spans:?}");
        assert!(
            small.iter().all(|len| *len < 400 << 10),
            "{compression:?}: spans over small files stay near 128 KiB: {small:?}"
        );
        assert!(
            big.iter().all(|len| *len >= 1 << 20),
            "{compression:?}: spans through the big file are full size: {big:?}"
        );
        // And every byte still reads back.
        let mut fetched = Vec::new();
        let all = indexed
            .read(0..indexed.tar.len() as u64, &mut fetched)
            .unwrap();
        assert!(all == indexed.tar);
    }
}

#[test]
fn tampered_spans_and_windows_are_rejected() {
    let indexed = index_layer(&edge_layer(Compression::Gzip(6)), 256 * 1024);
    let index = &indexed.index;
    let i = 2;
    let input = index.span_input(i);
    let mut span = indexed.blob[input.start as usize..input.end as usize].to_vec();
    let window_range = index.window_range(i).unwrap();
    let mut window =
        indexed.index_blob[window_range.start as usize..window_range.end as usize].to_vec();
    let decoded = index.decode_window(i, &window).unwrap();
    assert!(index.decode_span(i, &span, &decoded).is_ok());

    span[10] ^= 1;
    let err = index
        .decode_span(i, &span, &decoded)
        .unwrap_err()
        .to_string();
    assert!(err.contains("span 2") && err.contains("digest"), "{err}");
    window[3] ^= 1;
    let err = index.decode_window(i, &window).unwrap_err().to_string();
    assert!(err.contains("window"), "{err}");
}

#[test]
fn a_span_head_decodes_to_the_start_of_its_span_and_is_checked() {
    for compression in [Compression::Gzip(6), Compression::None] {
        let layer = Layer::new()
            .compression(compression)
            .file("weights", Content::random(9, 3 << 20));
        let indexed = index_layer(&layer, 1 << 20);
        let index = &indexed.index;
        let mut heads = 0;
        for i in 0..index.meta().spans.len() {
            let Some(head) = index.head_input(i) else {
                continue;
            };
            heads += 1;
            let window = match index.window_range(i) {
                Some(r) => index
                    .decode_window(i, &indexed.index_blob[r.start as usize..r.end as usize])
                    .unwrap(),
                None => Vec::new(),
            };
            let input = index.span_input(i);
            let span = &indexed.blob[input.start as usize..input.end as usize];
            let whole = index.decode_span(i, span, &window).unwrap();
            let mut head_bytes = indexed.blob[head.start as usize..head.end as usize].to_vec();
            let start = index.decode_head(i, &head_bytes, &window).unwrap();
            assert!(
                !start.is_empty() && start.len() < whole.len(),
                "span {i}: a head of {} bytes decoded to {} of {}",
                head_bytes.len(),
                start.len(),
                whole.len()
            );
            assert_eq!(start, whole[..start.len()], "span {i}");

            head_bytes[1000] ^= 1;
            let err = index
                .decode_head(i, &head_bytes, &window)
                .unwrap_err()
                .to_string();
            assert!(err.contains("head") && err.contains("digest"), "{err}");
            let err = index
                .decode_head(i, &head_bytes[..1000], &window)
                .unwrap_err()
                .to_string();
            assert!(err.contains("expected"), "{err}");
        }
        assert!(heads >= 3, "{compression:?}: {heads} spans with heads");
    }
}

#[test]
fn a_blob_that_is_not_the_layer_is_refused() {
    let layer = edge_layer(Compression::Gzip(6));
    let mut blob = Vec::new();
    let digests = layer.write(&mut blob).unwrap();
    blob[5000] ^= 0x55;
    let target = LayerToIndex {
        digest: digests.digest,
        size: digests.size,
        compression: LayerCompression::Gzip,
    };
    let err = build_index(blob.as_slice(), &target, 1 << 20, Vec::new()).unwrap_err();
    assert!(
        matches!(
            err,
            IndexError::LayerDigest { .. }
                | IndexError::CorruptLayer { .. }
                | IndexError::Unsupported { .. }
        ),
        "{err}"
    );
}

#[test]
fn hostile_prefixes_fail_cleanly() {
    let indexed = index_layer(&edge_layer(Compression::Gzip(6)), 256 * 1024);
    let prefix_len = indexed.index.prefix_len() as usize;
    let prefix = &indexed.index_blob[..prefix_len];
    for cut in [0, 7, 15, 16, 40, prefix_len - 1] {
        assert!(
            LayerIndex::parse(&prefix[..cut]).is_err(),
            "truncated at {cut}"
        );
    }
    let mut wrong_version = prefix.to_vec();
    wrong_version[8] = 9;
    let err = LayerIndex::parse(&wrong_version).unwrap_err().to_string();
    assert!(err.contains("version 9"), "{err}");
    // Flipping bytes anywhere must give an error or a valid index, never a
    // panic.
    for i in (0..prefix_len).step_by(7) {
        let mut copy = prefix.to_vec();
        copy[i] ^= 0xa5;
        let _ = LayerIndex::parse(&copy);
    }
}

/// A random layer: files of assorted sizes (empty, tiny, crossing many
/// spans), symlinks, hardlinks to earlier files, whiteouts, long names.
fn arb_layer() -> impl Strategy<Value = Layer> {
    let item = prop_oneof![
        4 => (0u64..300_000, any::<u64>()).prop_map(|(len, seed)| (0u8, len, seed)),
        1 => (1u64 << 20..3 << 20, any::<u64>()).prop_map(|(len, seed)| (1u8, len, seed)),
        1 => Just((2u8, 0, 0)),
        1 => Just((3u8, 0, 0)),
        1 => Just((4u8, 0, 0)),
    ];
    (
        proptest::collection::vec(item, 1..25),
        prop_oneof![
            Just(Compression::Gzip(6)),
            Just(Compression::Gzip(1)),
            Just(Compression::None)
        ],
        any::<bool>(),
    )
        .prop_map(|(items, compression, compressible)| {
            let mut layer = Layer::new().compression(compression).dir("d");
            let mut files = Vec::new();
            for (i, (kind, len, seed)) in items.into_iter().enumerate() {
                let name = if i % 5 == 4 {
                    format!("d/{}-{i}", "n".repeat(120))
                } else {
                    format!("d/f{i}")
                };
                layer = match kind {
                    0 | 1 => {
                        files.push(name.clone());
                        let content = if compressible {
                            Content::Bytes(
                                (0..len)
                                    .map(|b| ((b % 7) as u8).wrapping_add(seed as u8))
                                    .collect(),
                            )
                        } else {
                            Content::random(seed, len)
                        };
                        layer.file(&name, content)
                    }
                    2 => layer.symlink(&name, "f0"),
                    3 => match files.first() {
                        Some(target) => layer.hardlink(&name, &target.clone()),
                        None => layer.file(&name, ""),
                    },
                    _ => layer.whiteout(&format!("d/gone{i}")),
                };
            }
            layer
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_range_of_any_file_matches_full_decompression(
        layer in arb_layer(),
        span_kib in prop_oneof![Just(64u64), Just(128), Just(1024)],
        picks in proptest::collection::vec((any::<prop::sample::Index>(), 0.0f64..1.0, 0.0f64..1.0), 1..12),
    ) {
        let indexed = index_layer(&layer, span_kib * 1024);
        let files: Vec<_> = indexed.index.meta().entries.iter()
            .filter(|e| e.kind == EntryKind::File)
            .cloned()
            .collect();
        if files.is_empty() {
            return Ok(());
        }
        for (pick, a, b) in picks {
            let file = &files[pick.index(files.len())];
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            let start = file.offset + (lo * file.size as f64) as u64;
            let end = file.offset + (hi * file.size as f64) as u64;
            let bytes = indexed.read(start..end, &mut Vec::new()).unwrap();
            prop_assert_eq!(bytes.as_slice(), &indexed.tar[start as usize..end as usize]);
        }
    }
}
