//! Index sets through the real registry: create, push as a referrer, find,
//! fetch a prefix, read a file through spans; and the local store.

use pronto_catalog::{
    CreateOptions, Event, LocalIndexStore, Location, create_indexes, fetch_prefix, find_indexes,
    push_indexes, remove_remote, save_local,
};
use pronto_index::LayerIndex;
use pronto_registry::{ClientConfig, Platform, RegistryClient, Repository, parse_reference};
use pronto_testbed::image::BuiltImage;
use pronto_testbed::{
    Compression, Content, ImageBuilder, Layer, OciLayout, Prereq, Registry, require,
};

const NEEDS: &[Prereq] = &[Prereq::Registry, Prereq::Skopeo];

fn image(layout: &OciLayout) -> BuiltImage {
    ImageBuilder::new()
        .layer(Layer::new().file("etc/small", "too small to index\n"))
        .layer(
            Layer::new()
                .compression(Compression::Gzip(6))
                .file("models/a.bin", Content::random(1, 6 << 20))
                .file("models/readme", "weights for the demo\n")
                .file("models/b.bin", Content::random(2, 6 << 20)),
        )
        .build(layout)
        .unwrap()
}

/// Reads `path` of an indexed layer by fetching only its spans.
async fn read_file(
    client: &RegistryClient,
    repo: &Repository,
    index: &LayerIndex,
    index_blob: &str,
    index_size: u64,
    path: &str,
) -> Vec<u8> {
    let entry = index
        .meta()
        .entries
        .iter()
        .find(|e| e.path == path)
        .unwrap();
    let mut out = Vec::new();
    for i in index.spans_for(entry.offset..entry.offset + entry.size) {
        let window = match index.window_range(i) {
            Some(r) => {
                let bytes = client
                    .blob_range(repo, index_blob, r, index_size)
                    .await
                    .unwrap();
                index.decode_window(i, &bytes).unwrap()
            }
            None => Vec::new(),
        };
        let layer = &index.meta().layer;
        let bytes = client
            .blob_range(repo, &layer.digest, index.span_input(i), layer.size)
            .await
            .unwrap();
        let data = index.decode_span(i, &bytes, &window).unwrap();
        let span = index.span_output(i);
        let from = entry.offset.max(span.start) - span.start;
        let to = (entry.offset + entry.size).min(span.end) - span.start;
        out.extend_from_slice(&data[from as usize..to as usize]);
    }
    out
}

#[tokio::test]
async fn push_find_fetch_and_read_through_the_registry() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let built = image(&layout);
    layout.tag("v1", &built).unwrap();
    let registry = Registry::start().unwrap();
    let reference =
        parse_reference(&registry.push(&layout, "v1", "models/demo:v1").unwrap()).unwrap();
    let client = RegistryClient::new(ClientConfig::default()).unwrap();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();

    let mut events = Vec::new();
    let options = CreateOptions {
        span_size: 1 << 20,
        min_layer_size: 1 << 20,
        ..Default::default()
    };
    let created = create_indexes(&client, &resolved, options, work.path(), |e| events.push(e))
        .await
        .unwrap();
    assert_eq!(created.layers.len(), 1);
    assert_eq!(created.skipped.len(), 1, "the small layer is fetched whole");
    assert!(events.iter().any(|e| matches!(e, Event::Indexed { .. })));

    let digest = push_indexes(&client, &resolved.repository, &created)
        .await
        .unwrap();
    let sets = find_indexes(
        &client,
        None,
        &resolved.repository,
        &resolved.manifest.digest,
        resolved.index.as_ref(),
    )
    .await
    .unwrap();
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0].manifest_digest, digest);
    assert_eq!(sets[0].location, Location::Registry);
    let layer_ref = sets[0].layer(&built.layers[1].digest).unwrap().clone();
    let index = fetch_prefix(&client, None, &resolved.repository, &sets[0], &layer_ref)
        .await
        .unwrap();
    let readme = read_file(
        &client,
        &resolved.repository,
        &index,
        &layer_ref.blob,
        layer_ref.size,
        "models/readme",
    )
    .await;
    assert_eq!(readme, b"weights for the demo\n");
    let b = read_file(
        &client,
        &resolved.repository,
        &index,
        &layer_ref.blob,
        layer_ref.size,
        "models/b.bin",
    )
    .await;
    assert_eq!(b, Content::random(2, 6 << 20).to_vec().unwrap());

    remove_remote(
        &client,
        &resolved.repository,
        &resolved.manifest.digest,
        &digest,
    )
    .await
    .unwrap();
    let sets = find_indexes(
        &client,
        None,
        &resolved.repository,
        &resolved.manifest.digest,
        resolved.index.as_ref(),
    )
    .await
    .unwrap();
    assert!(sets.is_empty());
}

#[tokio::test]
async fn local_store_and_tampered_indexes() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let built = image(&layout);
    layout.tag("v1", &built).unwrap();
    let registry = Registry::start().unwrap();
    let reference =
        parse_reference(&registry.push(&layout, "v1", "models/demo:v1").unwrap()).unwrap();
    let client = RegistryClient::new(ClientConfig::default()).unwrap();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    let options = CreateOptions {
        min_layer_size: 1 << 20,
        ..Default::default()
    };
    let created = create_indexes(&client, &resolved, options, work.path(), |_| {})
        .await
        .unwrap();

    let store = LocalIndexStore::open(&work.path().join("root")).unwrap();
    let digest = save_local(&store, &created).unwrap();
    let sets = find_indexes(
        &client,
        Some(&store),
        &resolved.repository,
        &resolved.manifest.digest,
        resolved.index.as_ref(),
    )
    .await
    .unwrap();
    assert_eq!(sets.len(), 1);
    assert_eq!(
        (sets[0].location, sets[0].manifest_digest.as_str()),
        (Location::Local, digest.as_str())
    );
    let layer_ref = sets[0].layers[0].clone();
    let index = fetch_prefix(
        &client,
        Some(&store),
        &resolved.repository,
        &sets[0],
        &layer_ref,
    )
    .await
    .unwrap();
    assert_eq!(index.meta().layer.digest, built.layers[1].digest);

    // Tamper with the stored index blob's prefix: the recorded digest
    // catches it.
    let path = store.blob_path(&layer_ref.blob).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[20] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let err = fetch_prefix(
        &client,
        Some(&store),
        &resolved.repository,
        &sets[0],
        &layer_ref,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("prefix digest"), "{err}");
}

/// A 1 GiB layer of a few large files mounts from a prefix of a few
/// kilobytes, although all windows together are far larger.
#[tokio::test]
async fn a_large_layer_mounts_from_a_small_prefix() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let built = ImageBuilder::new()
        .layer(
            Layer::new()
                .compression(Compression::Gzip(6))
                .file("a", Content::Zeros(400 << 20))
                .file("b", Content::random(3, 24 << 20))
                .file("c", Content::Zeros(600 << 20)),
        )
        .build(&layout)
        .unwrap();
    layout.tag("v1", &built).unwrap();
    let registry = Registry::start().unwrap();
    let reference =
        parse_reference(&registry.push(&layout, "v1", "big/layer:v1").unwrap()).unwrap();
    let client = RegistryClient::new(ClientConfig::default()).unwrap();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    let created = create_indexes(
        &client,
        &resolved,
        CreateOptions::default(),
        work.path(),
        |_| {},
    )
    .await
    .unwrap();
    let built_index = &created.built[0];
    assert!(built_index.meta.layer.uncompressed_size > 1 << 30);
    assert!(
        built_index.prefix_len < 64 * 1024,
        "prefix of {} bytes",
        built_index.prefix_len
    );
    assert!(
        built_index.size > 4 * built_index.prefix_len,
        "windows are most of the blob"
    );
}
