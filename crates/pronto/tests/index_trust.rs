//! Index trust end to end, through the real registry and a real FUSE
//! mount: an index forged as an attacker with push access would (every
//! digest recomputed, pushed as a referrer of the genuine image, the image
//! and its tag untouched) is refused by a node on the default policy; a
//! node that opts into referrers detects it once the layer is complete,
//! poisons it, drops what was decoded through it and fails reads; later
//! mounts fall back. An index bound into the image index is used without
//! asking the referrers API.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use pronto_catalog::{
    CreateOptions, CreatedIndexes, LayerIndexRef, artifact_manifest, create_indexes,
};
use pronto_index::ARTIFACT_TYPE;
use pronto_registry::{ClientConfig, Platform, RegistryClient, Repository, parse_reference};
use pronto_testbed::forge::{Forgery, forge};
use pronto_testbed::net::wait_until;
use pronto_testbed::{
    Compression, Content, ImageBuilder, Layer, MountedImage, NodeConfig, OciLayout, Prereq,
    ProntoNode, Registry, require,
};

const NEEDS: &[Prereq] = &[Prereq::Root, Prereq::Fuse, Prereq::Registry, Prereq::Skopeo];
const SPAN: u64 = 64 * 1024;
const MOTD: &[u8] = b"welcome\n";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

fn fox() -> Vec<u8> {
    (0..40_000)
        .map(|i| format!("{i:08} the quick brown fox jumps over the lazy dog\n"))
        .collect::<String>()
        .into_bytes()
}

fn layer() -> Layer {
    Layer::new()
        .compression(Compression::Gzip(6))
        .dir("bin")
        .file("bin/tool", Content::random(7, 300_000))
        .file("etc/motd", MOTD.to_vec())
        .file("data/fox.txt", fox())
        .file("data/weights", Content::random(8, 2 << 20))
}

/// A node whose `index.trust` is `trust`, with the background fetch on
/// (the default), as a user runs it.
struct Node {
    dir: tempfile::TempDir,
    node: ProntoNode,
}

impl Node {
    fn new(trust: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = NodeConfig {
            background: true,
            trust: Some(trust.iter().map(|t| t.to_string()).collect()),
            ..Default::default()
        };
        let binary = Path::new(env!("CARGO_BIN_EXE_pronto"));
        let node = ProntoNode::new(dir.path(), binary, &config).unwrap();
        Node { dir, node }
    }

    fn mount(&self, reference: &str, name: &str) -> MountedImage {
        let dir = self.dir.path().join(name);
        self.node.mount(reference, &dir, &[], "info").unwrap()
    }
}

fn read(mounted: &MountedImage, path: &str) -> std::io::Result<Vec<u8>> {
    std::fs::read(mounted.dir.join(path))
}

fn wait_for_log(mounted: &MountedImage, text: &str) {
    wait_until(text, Duration::from_secs(60), || {
        Ok(mounted.log().contains(text))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mounted.log()));
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().mode() & 0o7777
}

/// Checks a mount shows the genuine layer, whatever the forgery.
fn assert_genuine(mounted: &MountedImage) {
    assert_eq!(read(mounted, "etc/motd").unwrap(), MOTD);
    assert_eq!(read(mounted, "data/fox.txt").unwrap(), fox());
    assert_eq!(mode_of(&mounted.dir.join("bin/tool")), 0o644);
    assert!(!mounted.dir.join("bin/sh").exists());
}

/// What `pronto index create` makes for the image, the way its owner
/// would have indexed it.
struct Genuine {
    created: CreatedIndexes,
    blob: Vec<u8>,
    _work: tempfile::TempDir,
}

async fn genuine_index(client: &RegistryClient, reference: &str) -> Genuine {
    let image = client
        .resolve(&parse_reference(reference).unwrap(), &Platform::default())
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let options = CreateOptions {
        span_size: SPAN,
        min_layer_size: 0,
        ..Default::default()
    };
    let created = create_indexes(client, &image, options, work.path(), |_| {})
        .await
        .unwrap();
    let blob = std::fs::read(&created.layers[0].1).unwrap();
    Genuine {
        created,
        blob,
        _work: work,
    }
}

/// Pushes `forgery` of the genuine index as the only referrer of the image
/// `reference` names; the image and its tag stay as they are.
async fn push_forged_referrer(
    client: &RegistryClient,
    reference: &str,
    genuine: &Genuine,
    forgery: &Forgery,
) {
    let repo = Repository::of(&parse_reference(reference).unwrap());
    let forged = forge(&genuine.blob, forgery).unwrap();
    client
        .push_blob(&repo, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let blob = client
        .push_blob(&repo, Bytes::from(forged.blob.clone()))
        .await
        .unwrap();
    assert_eq!(blob, forged.digest);
    let layer = LayerIndexRef {
        layer: genuine.created.layers[0].0.layer.clone(),
        blob,
        size: forged.blob.len() as u64,
        prefix_size: forged.prefix_size,
        prefix_digest: forged.prefix_digest,
    };
    let subject = &genuine.created.subject;
    let manifest = artifact_manifest(subject, SPAN, &[layer]);
    client
        .push_referrer(
            &repo,
            &subject.digest,
            OCI_MANIFEST,
            ARTIFACT_TYPE,
            manifest.into(),
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_indexes_are_refused_or_poisoned_and_bound_ones_are_used() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let image = ImageBuilder::new().layer(layer()).build(&layout).unwrap();
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let client = RegistryClient::new(ClientConfig::default()).unwrap();

    let forgeries = [
        Forgery::OtherFilesBytes {
            path: "etc/motd".into(),
            source: "bin/tool".into(),
        },
        Forgery::SetuidRoot {
            path: "bin/tool".into(),
        },
        Forgery::AddedEntry {
            path: "bin/sh".into(),
            source: "bin/tool".into(),
        },
        Forgery::ShiftedSpan { span: 2, by: 512 },
        Forgery::AlteredWindow { span: 8 },
    ];
    for (n, forgery) in forgeries.iter().enumerate() {
        let reference = registry
            .push(&layout, "v1", &format!("trust/forged{n}:v1"))
            .unwrap();
        let genuine = genuine_index(&client, &reference).await;
        push_forged_referrer(&client, &reference, &genuine, forgery).await;

        // The default policy does not use referrers: the layer is fetched
        // whole and the container sees the image.
        let careful = Node::new(&["bound", "local"]);
        let mounted = careful.mount(&reference, "careful");
        assert!(
            mounted.log().contains("index.trust does not accept"),
            "{forgery:?}: {}",
            mounted.log()
        );
        assert!(
            mounted.log().contains("0 of 1 layers lazy"),
            "{}",
            mounted.log()
        );
        assert_genuine(&mounted);
        drop(mounted);

        // A node that opts into referrers mounts lazily; once the layer is
        // complete the forgery is found, the index poisoned, its data
        // dropped and every read fails.
        let trusting = Node::new(&["referrers"]);
        let mounted = trusting.mount(&reference, "trusting");
        assert!(
            mounted.log().contains("1 of 1 layers lazy"),
            "{}",
            mounted.log()
        );
        wait_for_log(&mounted, "is poisoned");
        assert!(
            !mounted.log().contains("verified"),
            "{forgery:?}: nothing was verified: {}",
            mounted.log()
        );
        let err = read(&mounted, "data/weights").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{forgery:?}");
        let stats = trusting.node.output(&["cache", "stats", "--json"]);
        let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
        assert_eq!(stats["entries"], 0, "{forgery:?}: the cache keeps nothing");
        drop(mounted);

        // Later mounts on that node do not use the poisoned index.
        let mounted = trusting.mount(&reference, "again");
        assert!(
            mounted.log().contains("not to match its layers"),
            "{forgery:?}: {}",
            mounted.log()
        );
        assert_genuine(&mounted);
    }

    // A bound index is used by the default policy, and the referrers API
    // (or its tag fallback) is never asked.
    let reference = registry.push(&layout, "v1", "trust/bound:v1").unwrap();
    let owner = Node::new(&["bound", "local"]);
    let out = owner.node.output(&[
        "index",
        "create",
        &reference,
        "--bind",
        "--min-layer-size",
        "0",
        "--span-size",
        "64KiB",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = registry.access_log().unwrap().len();
    let node = Node::new(&["bound", "local"]);
    let mounted = node.mount(&reference, "bound");
    assert!(mounted.log().contains("(bound)"), "{}", mounted.log());
    assert!(
        mounted.log().contains("1 of 1 layers lazy"),
        "{}",
        mounted.log()
    );
    assert_genuine(&mounted);
    wait_for_log(&mounted, "layer local completely; every span verified");
    let asked: Vec<_> = registry.access_log().unwrap()[before..]
        .iter()
        .filter(|e| e.path.contains("/referrers/") || e.path.contains("sha256-"))
        .cloned()
        .collect();
    assert!(asked.is_empty(), "referrers were asked for: {asked:?}");
}
