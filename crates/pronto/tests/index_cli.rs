//! `pronto index …` as a user runs it, against the real registry.

use std::path::Path;
use std::process::Output;

use pronto_testbed::{
    Compression, Content, ImageBuilder, Layer, NodeConfig, OciLayout, Prereq, ProntoNode, Registry,
    require,
};

fn pronto(node: &ProntoNode, args: &[&str]) -> Output {
    node.output(args)
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn create_list_inspect_and_remove_locally_and_in_the_registry() {
    require!(&[Prereq::Registry, Prereq::Skopeo]);
    let work = tempfile::tempdir().unwrap();
    let binary = Path::new(env!("CARGO_BIN_EXE_pronto"));
    let config = ProntoNode::new(work.path(), binary, &NodeConfig::default()).unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let image = ImageBuilder::new()
        .layer(Layer::new().file("small", "x"))
        .layer(
            Layer::new()
                .compression(Compression::Gzip(6))
                .file("big", Content::random(4, 3 << 20))
                .many_small_files("files", 50, 1),
        )
        .build(&layout)
        .unwrap();
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry.push(&layout, "v1", "cli/app:v1").unwrap();
    let big = &image.layers[1].digest;

    // Local store.
    let out = ok(pronto(
        &config,
        &[
            "index",
            "create",
            &reference,
            "--min-layer-size",
            "1MiB",
            "--span-size",
            "1MiB",
        ],
    ));
    assert!(out.contains("indexed 1 of 2 layers"), "{out}");
    assert!(out.contains("not indexed"), "{out}");
    let local_digest = out
        .split_whitespace()
        .skip_while(|w| *w != "index")
        .nth(1)
        .unwrap()
        .trim_end_matches(';')
        .to_owned();
    let listed = ok(pronto(&config, &["index", "list", &reference]));
    assert!(
        listed.contains(&local_digest) && listed.contains("local"),
        "{listed}"
    );

    let json: serde_json::Value = serde_json::from_str(&ok(pronto(
        &config,
        &["index", "inspect", &local_digest, "--json"],
    )))
    .unwrap();
    let layer = &json[0]["layers"][0];
    assert_eq!(layer["layer"], big.as_str());
    assert_eq!(layer["files"], 53, "big, files/, files/d0000/ and 50 files");
    assert!(layer["spans"].as_u64().unwrap() >= 3);

    // The registry.
    let out = ok(pronto(
        &config,
        &[
            "index",
            "create",
            &reference,
            "--min-layer-size",
            "1MiB",
            "--push",
        ],
    ));
    assert!(out.contains("pushed to"), "{out}");
    // Bound into the image index the tag names.
    let out = ok(pronto(
        &config,
        &[
            "index",
            "create",
            &reference,
            "--min-layer-size",
            "1MiB",
            "--bind",
        ],
    ));
    assert!(out.contains("now names image index"), "{out}");
    let listed = ok(pronto(&config, &["index", "list", &reference]));
    for place in ["bound", "referrers", "local"] {
        assert!(listed.contains(place), "{place}: {listed}");
    }
    let text = ok(pronto(&config, &["index", "inspect", &reference]));
    assert_eq!(text.matches(big.as_str()).count(), 3, "{text}");

    // Tampering with the stored index is caught with a clear message.
    let hex = {
        let v: serde_json::Value = json[0]["layers"][0]["index_blob"].clone();
        v.as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap()
            .to_owned()
    };
    let blob = work.path().join("root/indexes/blobs/sha256").join(hex);
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[30] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();
    let bad = pronto(&config, &["index", "inspect", &local_digest]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("prefix digest"), "{err}");

    let removed = ok(pronto(&config, &["index", "rm", &reference]));
    assert_eq!(removed.matches("removed").count(), 3, "{removed}");
    let listed = ok(pronto(&config, &["index", "list", &reference]));
    assert_eq!(
        listed.lines().count(),
        1,
        "only the header is left: {listed}"
    );
    assert!(
        !pronto(&config, &["index", "rm", &reference])
            .status
            .success()
    );
}
