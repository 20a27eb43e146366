//! An index is checked against its whole layer: a genuine index passes
//! (whatever span size it was built with), and each forgery an attacker
//! with push access could publish — every digest in the index recomputed —
//! is found and named.

mod common;

use common::Built;
use pronto_index::{IndexError, LayerIndex, verify_against_layer};
use pronto_testbed::forge::{Forgery, forge};
use pronto_testbed::{Compression, Content, Layer};

/// Text whose repeats reach back across span boundaries, so that the
/// data after a checkpoint is decoded through its window.
fn fox() -> Content {
    let text: String = (0..40_000)
        .map(|i| format!("{i:08} the quick brown fox jumps over the lazy dog\n"))
        .collect();
    Content::Bytes(text.into_bytes())
}

fn layer(compression: Compression) -> Layer {
    Layer::new()
        .compression(compression)
        .dir("bin")
        .file("bin/tool", Content::random(7, 300_000))
        .file("etc/motd", "welcome\n")
        .file("data/fox.txt", fox())
        .file("data/weights", Content::random(8, 400_000))
}

fn build(layer: &Layer, span_size: u64) -> Built {
    common::build(layer, span_size)
}

fn verify(built: &Built, index_blob: &[u8]) -> Result<(), IndexError> {
    let index = LayerIndex::parse(index_blob).unwrap();
    let windows = &index_blob[index.windows_range().start as usize..];
    verify_against_layer(&index, built.blob.as_slice(), windows)
}

#[test]
fn genuine_indexes_pass_at_any_span_size() {
    for compression in [Compression::Gzip(6), Compression::None] {
        for span_size in [64 * 1024, 256 * 1024, 4 << 20] {
            let built = build(&layer(compression), span_size);
            verify(&built, &built.index_blob).unwrap();
        }
    }
}

#[test]
fn every_forgery_is_found_and_named() {
    let built = build(&layer(Compression::Gzip(6)), 64 * 1024);
    let genuine = LayerIndex::parse(&built.index_blob).unwrap();
    // A span whose window holds fox text: its checkpoint lies inside the file.
    let fox = genuine
        .meta()
        .entries
        .iter()
        .find(|e| e.path == "data/fox.txt")
        .unwrap();
    let fox_span = (0..genuine.meta().spans.len())
        .find(|i| {
            let out = genuine.span_output(*i);
            out.start > fox.offset + 64 * 1024 && out.end < fox.offset + fox.size
        })
        .expect("a span inside the text file");
    let cases = [
        (
            Forgery::OtherFilesBytes {
                path: "etc/motd".into(),
                source: "bin/tool".into(),
            },
            "\"etc/motd\": its size",
        ),
        (
            Forgery::SetuidRoot {
                path: "bin/tool".into(),
            },
            "\"bin/tool\": its mode",
        ),
        (
            Forgery::AddedEntry {
                path: "bin/sh".into(),
                source: "bin/tool".into(),
            },
            "first extra: \"bin/sh\"",
        ),
        (Forgery::ShiftedSpan { span: 2, by: 512 }, "span 2"),
        (Forgery::WrongHead { span: 1 }, "span 1 has a head digest"),
        (
            Forgery::AlteredWindow { span: fox_span },
            "window is not the layer's data",
        ),
    ];
    for (forgery, expected) in cases {
        let forged = forge(&built.index_blob, &forgery).unwrap();
        let err = verify(&built, &forged.blob).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, IndexError::Mismatch { .. }) && text.contains(expected),
            "{forgery:?}: {text}"
        );
    }
}

#[test]
fn a_shifted_span_fails_to_decode_on_read() {
    let built = build(&layer(Compression::Gzip(6)), 64 * 1024);
    let forged = forge(
        &built.index_blob,
        &Forgery::ShiftedSpan { span: 2, by: 512 },
    )
    .unwrap();
    let index = LayerIndex::parse(&forged.blob).unwrap();
    for span in [1, 2, index.meta().spans.len() - 1] {
        let read = index.read_range(
            index.span_output(span),
            |r| Ok(built.blob[r.start as usize..r.end as usize].to_vec()),
            |r| Ok(forged.blob[r.start as usize..r.end as usize].to_vec()),
        );
        if span == 1 || span == 2 {
            let err = read.unwrap_err().to_string();
            assert!(err.contains("decompressed to"), "span {span}: {err}");
        } else {
            read.unwrap();
        }
    }
}

#[test]
fn a_last_span_that_claims_less_is_refused() {
    let built = build(&layer(Compression::Gzip(6)), 64 * 1024);
    let genuine = LayerIndex::parse(&built.index_blob).unwrap();
    let last = genuine.meta().spans.len() - 1;
    let forged = forge(
        &built.index_blob,
        &Forgery::ShiftedSpan {
            span: last,
            by: 512,
        },
    )
    .unwrap();
    let index = LayerIndex::parse(&forged.blob).unwrap();
    let err = index
        .read_range(
            index.span_output(last),
            |r| Ok(built.blob[r.start as usize..r.end as usize].to_vec()),
            |r| Ok(forged.blob[r.start as usize..r.end as usize].to_vec()),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("more than"), "{err}");
}

#[test]
fn an_altered_window_changes_data_until_the_layer_is_checked() {
    // Reading through the forged window gives text the image does not
    // have: only the whole-layer check can tell, which is why it exists.
    let built = build(&layer(Compression::Gzip(6)), 64 * 1024);
    let genuine = LayerIndex::parse(&built.index_blob).unwrap();
    let span = (1..genuine.meta().spans.len())
        .find(|i| {
            let forged = forge(&built.index_blob, &Forgery::AlteredWindow { span: *i }).unwrap();
            let index = LayerIndex::parse(&forged.blob).unwrap();
            let out = index.span_output(*i);
            let read = index.read_range(
                out.clone(),
                |r| Ok(built.blob[r.start as usize..r.end as usize].to_vec()),
                |r| Ok(forged.blob[r.start as usize..r.end as usize].to_vec()),
            );
            read.is_ok_and(|bytes| bytes.windows(9).any(|w| w == b"BROWN FOX"))
        })
        .expect("a span decoded through an altered window");
    let forged = forge(&built.index_blob, &Forgery::AlteredWindow { span }).unwrap();
    assert!(verify(&built, &forged.blob).is_err());
}
