//! `pronto mount` end to end: a real FUSE mount of an image served lazily
//! from the real registry, compared with containerd's own unpack and with
//! `tar -x`; concurrent readers; faults; bytes fetched for a small read.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pronto_testbed::image::BuiltImage;
use pronto_testbed::net::wait_until;
use pronto_testbed::process::mounts_below;
use pronto_testbed::tree::{PathInfo, SnapshotOptions, diff, snapshot, without_dir_link_counts};
use pronto_testbed::{
    Compression, Containerd, ContainerdOptions, Content, Fault, FaultProxy, ImageBuilder, Layer,
    MountedImage, NodeConfig, OciLayout, Prereq, ProntoNode, Registry, Relay, require,
};

const NEEDS: &[Prereq] = &[Prereq::Root, Prereq::Fuse, Prereq::Registry, Prereq::Skopeo];

/// A pronto state directory with its config file.
struct Node {
    dir: tempfile::TempDir,
    node: ProntoNode,
}

impl Node {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let binary = Path::new(env!("CARGO_BIN_EXE_pronto"));
        let node = ProntoNode::new(dir.path(), binary, &NodeConfig::default()).unwrap();
        Node { dir, node }
    }

    fn pronto(&self, args: &[&str]) -> Command {
        self.node.command(args)
    }

    fn ok(&self, args: &[&str]) -> String {
        self.node.ok(args)
    }

    fn bind(&self, reference: &str, span_size: Option<&str>) {
        bind_index(&self.node, reference, span_size);
    }

    /// `pronto mount` in the background, until dropped.
    fn mount(&self, reference: &str, extra: &[&str]) -> MountedImage {
        self.mount_with_log(reference, extra, "info")
    }

    fn mount_with_log(&self, reference: &str, extra: &[&str], log_filter: &str) -> MountedImage {
        let dir = self.dir.path().join(format!("mnt-{}", rand_suffix()));
        self.node.mount(reference, &dir, extra, log_filter).unwrap()
    }
}

/// Indexes the image (layers of 1 MiB and more, `span_size` or the
/// default) and binds the index to it, as its owner would.
fn bind_index(node: &ProntoNode, reference: &str, span_size: Option<&str>) {
    let mut args = vec![
        "index",
        "create",
        reference,
        "--min-layer-size",
        "1MiB",
        "--bind",
    ];
    if let Some(size) = span_size {
        args.extend(["--span-size", size]);
    }
    node.ok(&args);
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

struct Pushed {
    _work: tempfile::TempDir,
    layout: OciLayout,
    image: BuiltImage,
    registry: Registry,
    reference: String,
}

impl Pushed {
    /// The image's reference through `host` (a relay or fault proxy in
    /// front of the registry).
    fn through(&self, host: &str) -> String {
        self.reference.replace(&self.registry.host(), host)
    }
}

/// A node in `dir` with `config`, for tests that set more than [`Node`].
fn node_in(dir: &Path, config: &NodeConfig) -> ProntoNode {
    ProntoNode::new(dir, Path::new(env!("CARGO_BIN_EXE_pronto")), config).unwrap()
}

/// Bytes of all of `reference`'s layer indexes, as `pronto index inspect`
/// reports them.
fn index_bytes(node: &ProntoNode, reference: &str) -> u64 {
    let inspected: serde_json::Value =
        serde_json::from_str(&node.ok(&["index", "inspect", reference, "--json"])).unwrap();
    inspected[0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["index_size"].as_u64().unwrap())
        .sum()
}

/// An image bound and mounted on a node of its own, its registry reached
/// through a counting relay.
struct Counted {
    mounted: MountedImage,
    node: ProntoNode,
    _dir: tempfile::TempDir,
}

/// Binds `reference` (spans of `span_size`) on a node with `config` and
/// mounts it; `relay` counts from the mount on.
fn mount_counted(
    reference: &str,
    relay: &Relay,
    config: &NodeConfig,
    span_size: &str,
    log_filter: &str,
) -> Counted {
    let dir = tempfile::tempdir().unwrap();
    let node = node_in(dir.path(), config);
    bind_index(&node, reference, Some(span_size));
    relay.reset();
    let mounted = node
        .mount(reference, &dir.path().join("mnt"), &[], log_filter)
        .unwrap();
    Counted {
        mounted,
        node,
        _dir: dir,
    }
}

fn push_edge_image() -> Pushed {
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let image = pronto_testbed::image::edge_image(&layout);
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry.push(&layout, "v1", "mount/edge:v1").unwrap();
    Pushed {
        _work: work,
        layout,
        image,
        registry,
        reference,
    }
}

#[test]
fn merged_mount_matches_containerds_unpack() {
    require!(&[NEEDS, &[Prereq::Containerd, Prereq::Runc]].concat());
    let pushed = push_edge_image();
    let node = Node::new();
    // Index the upper layer only: the base is fetched whole, the upper one
    // lazily from the registry.
    node.ok(&[
        "index",
        "create",
        &pushed.reference,
        "--min-layer-size",
        "2MiB",
        "--span-size",
        "256KiB",
        "--bind",
    ]);

    let containerd = Containerd::start_with(ContainerdOptions {
        plain_http_registries: vec![pushed.registry.host()],
        ..Default::default()
    })
    .unwrap();
    containerd.pull(&pushed.reference, "overlayfs").unwrap();
    let reference_dir = containerd.root_dir().parent().unwrap().join("image-mount");
    std::fs::create_dir_all(&reference_dir).unwrap();
    containerd
        .ctr_ok(&[
            "images",
            "mount",
            &pushed.reference,
            reference_dir.to_str().unwrap(),
        ])
        .unwrap();
    let expected =
        without_dir_link_counts(snapshot(&reference_dir, SnapshotOptions::default()).unwrap());
    let _ = containerd.ctr_ok(&["images", "unmount", reference_dir.to_str().unwrap()]);

    let mounted = node.mount(&pushed.reference, &[]);
    let actual =
        without_dir_link_counts(snapshot(&mounted.dir, SnapshotOptions::default()).unwrap());
    let differences = diff(&expected, &actual);
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    assert!(actual.contains_key("data/opaque/new") && !actual.contains_key("data/gone"));
}

#[test]
fn single_layer_mount_matches_tar_extraction() {
    require!(NEEDS);
    let pushed = push_edge_image();
    let node = Node::new();
    node.ok(&[
        "index",
        "create",
        &pushed.reference,
        "--min-layer-size",
        "1MiB",
        "--span-size",
        "256KiB",
    ]);
    for layer in &pushed.image.layers {
        let extracted = tempfile::tempdir().unwrap();
        let status = Command::new("tar")
            .args([
                "-x",
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "-p",
                "-f",
            ])
            .arg(pushed.layout.blob_path(&layer.digest))
            .arg("-C")
            .arg(extracted.path())
            .status()
            .unwrap();
        assert!(status.success());
        let expected =
            overlay_form(snapshot(extracted.path(), SnapshotOptions::default()).unwrap());
        let mounted = node.mount(&pushed.reference, &["--layer", &layer.digest]);
        let actual = snapshot(&mounted.dir, SnapshotOptions::default()).unwrap();
        let differences = diff(&expected, &actual);
        assert!(
            differences.is_empty(),
            "layer {}:\n{}",
            layer.digest,
            differences.join("\n")
        );
    }
}

/// What `tar -x` wrote, in the form an overlayfs lower directory has:
/// `.wh.NAME` files become character devices 0/0 named NAME, and
/// `.wh..wh..opq` becomes the `trusted.overlay.opaque` xattr of its dir.
fn overlay_form(tree: BTreeMap<String, PathInfo>) -> BTreeMap<String, PathInfo> {
    let mut out = BTreeMap::new();
    let mut opaque = Vec::new();
    for (path, info) in tree {
        let (dir, name) = path
            .rsplit_once('/')
            .map_or(("", path.as_str()), |(d, n)| (d, n));
        if name == ".wh..wh..opq" {
            opaque.push(dir.to_owned());
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            let target = if dir.is_empty() {
                hidden.to_owned()
            } else {
                format!("{dir}/{hidden}")
            };
            out.insert(
                target,
                PathInfo {
                    kind: "char",
                    mode: 0,
                    size: 0,
                    rdev: 0,
                    content: None,
                    inode_group: 0,
                    nlink: 1,
                    ..info
                },
            );
        } else {
            out.insert(path, info);
        }
    }
    for dir in opaque {
        if let Some(info) = out.get_mut(&dir) {
            info.xattrs
                .insert("trusted.overlay.opaque".into(), b"y".to_vec());
        }
    }
    out
}

#[test]
fn concurrent_readers_get_the_right_bytes() {
    require!(NEEDS);
    let pushed = push_edge_image();
    let node = Node::new();
    node.bind(&pushed.reference, Some("128KiB"));
    let mounted = node.mount(&pushed.reference, &[]);
    let big = Content::random(1, 3 << 20).to_vec().unwrap();
    let model = Content::random(2, 2 << 20).to_vec().unwrap();
    std::thread::scope(|scope| {
        for i in 0..12 {
            let (dir, big, model) = (&mounted.dir, &big, &model);
            scope.spawn(move || {
                let (path, want) = if i % 2 == 0 {
                    ("data/big", big)
                } else {
                    ("data/model", model)
                };
                let got = std::fs::read(dir.join(path)).unwrap();
                assert!(got == *want, "reader {i} got wrong bytes of {path}");
                let small = std::fs::read_dir(dir.join("data/small/d0001"))
                    .unwrap()
                    .count();
                assert_eq!(small, 100);
            });
        }
    });
}

#[test]
fn a_file_held_open_while_it_becomes_local_can_be_opened_again() {
    // The kernel refuses a passthrough open of a file that is open through
    // the page cache: the second open must not ask for one.
    require!(NEEDS);
    let pushed = push_edge_image();
    let node = Node::new();
    node.bind(&pushed.reference, None);
    let mounted = node.mount_with_log(&pushed.reference, &[], "info,pronto_fs=debug");
    let path = mounted.dir.join("data/model");
    let model = Content::random(2, 2 << 20).to_vec().unwrap();
    let mut held = std::fs::File::open(&path).unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut held, &mut first).unwrap();
    assert_eq!(first[0], model[0]);
    // Reading it whole through the held descriptor makes it local.
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut held, &mut rest).unwrap();
    assert_eq!(rest, model[1..]);
    for _ in 0..3 {
        let again = std::fs::read(&path).unwrap();
        assert!(again == model, "a second open read other bytes");
    }
    drop(held);
    // Closed: the next open may read the local copy directly, and an open
    // beside it too.
    let a = std::fs::File::open(&path).unwrap();
    let b = std::fs::read(&path).unwrap();
    assert!(b == model);
    drop(a);
    let log = mounted.log();
    assert!(!log.contains("answering EIO"), "{log}");
    if log.contains("passthrough=true") {
        assert!(log.contains("opened with passthrough"), "{log}");
    }
}

#[test]
fn faults_give_correct_bytes_or_eio() {
    require!(NEEDS);
    let pushed = push_edge_image();
    let proxy = FaultProxy::start(pushed.registry.addr()).unwrap();
    let reference = pushed.through(&proxy.host());
    let node = Node::new();
    node.bind(&reference, Some("128KiB"));
    let mounted = node.mount(&reference, &[]);
    let model_layer = &pushed.image.layers[1].digest;
    let want = Content::random(2, 2 << 20).to_vec().unwrap();

    // Transient faults are retried: the bytes are right.
    proxy.inject(&format!("/blobs/{model_layer}"), 2, Fault::Status(503));
    proxy.inject(&format!("/blobs/{model_layer}"), 1, Fault::Truncate);
    let got = std::fs::read(mounted.dir.join("data/model")).unwrap();
    assert!(got == want, "wrong bytes after transient faults");

    // A registry that keeps failing: the read fails with EIO, never with
    // wrong bytes; afterwards reads work again.
    proxy.inject(&format!("/blobs/{model_layer}"), 1000, Fault::Corrupt);
    let err = std::fs::read(mounted.dir.join("data/opaque/new"));
    match err {
        Err(e) => assert_eq!(e.raw_os_error(), Some(nix::libc::EIO), "{e}"),
        Ok(bytes) => assert_eq!(bytes, b"new\n"),
    }
    proxy.clear();
    assert_eq!(
        std::fs::read(mounted.dir.join("data/opaque/new")).unwrap(),
        b"new\n"
    );
}

#[test]
fn the_background_fetch_fills_only_what_is_missing() {
    // Bytes read on demand are not fetched again by the background fetch:
    // the registry sends each byte of a layer with a bound index once.
    require!(NEEDS);
    let pushed = push_edge_image();
    let relay = Relay::start(pushed.registry.addr()).unwrap();
    let reference = pushed.through(&relay.host());
    let config = NodeConfig {
        background: true,
        // Slow enough that the reader below comes first.
        fetch: "background_rate = \"2MiB\"\n".into(),
        ..Default::default()
    };
    let counted = mount_counted(&reference, &relay, &config, "256KiB", "info");
    let (mounted, node) = (&counted.mounted, &counted.node);
    let model = std::fs::read(mounted.dir.join("data/model")).unwrap();
    assert!(model == Content::random(2, 2 << 20).to_vec().unwrap());
    wait_until("the background fetch", Duration::from_secs(60), || {
        Ok(mounted.log().matches("layer local completely").count() == 2)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", mounted.log()));
    let fetched = relay.bytes_down();
    let layers = pushed.image.layers_size();
    // Besides the layers: the indexes (at most all of them), manifests and
    // the config.
    let indexes = index_bytes(node, &reference);
    assert!(
        fetched <= layers + indexes + (64 << 10),
        "fetched {fetched} bytes for {layers} bytes of layers and {indexes} of indexes"
    );
}

/// An image with one 96 MiB file of random bytes (gzip) and a small one,
/// pushed and reached through a counting relay.
fn push_weights_image() -> (Pushed, Relay, String) {
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let image = ImageBuilder::new()
        .layer(
            Layer::new()
                .compression(Compression::FAST)
                .file("config.json", "{}\n")
                .file("weights", Content::random(9, 96 << 20)),
        )
        .build(&layout)
        .unwrap();
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry.push(&layout, "v1", "weights/model:v1").unwrap();
    let relay = Relay::start(registry.addr()).unwrap();
    let pushed = Pushed {
        _work: work,
        layout,
        image,
        registry,
        reference,
    };
    let through = pushed.through(&relay.host());
    (pushed, relay, through)
}

#[test]
fn a_file_read_in_order_is_fetched_ahead_and_every_byte_once() {
    // A model server reading its weights whole: Pronto fetches ahead of it
    // with parallel requests, and the registry sends each byte once.
    require!(NEEDS);
    let (pushed, relay, reference) = push_weights_image();
    let config = NodeConfig {
        background: true,
        ..Default::default()
    };
    let counted = mount_counted(&reference, &relay, &config, "1MiB", "info,pronto_fs=debug");
    let (mounted, node) = (&counted.mounted, &counted.node);
    let read = std::fs::read(mounted.dir.join("weights")).unwrap();
    assert!(read == Content::random(9, 96 << 20).to_vec().unwrap());
    let fetched = relay.bytes_down();
    let layer = pushed.image.layers[0].size;
    let log = mounted.log();
    let ahead = log.matches("purpose=ReadAhead").count();
    assert!(ahead > 10, "spans were fetched ahead of the reader:\n{log}");
    let index = index_bytes(node, &reference);
    assert!(
        fetched <= layer + index + (64 << 10),
        "fetched {fetched} bytes for a {layer}-byte layer and its {index}-byte index"
    );
}

#[test]
fn read_ahead_stops_when_the_reader_stops() {
    require!(NEEDS);
    let (pushed, relay, reference) = push_weights_image();
    let config = NodeConfig {
        background: false,
        fetch: "read_ahead = \"8MiB\"\n".into(),
        ..Default::default()
    };
    let counted = mount_counted(&reference, &relay, &config, "1MiB", "info");
    let mounted = &counted.mounted;
    let mut file = std::fs::File::open(mounted.dir.join("weights")).unwrap();
    let mut head = vec![0u8; 16 << 20];
    std::io::Read::read_exact(&mut file, &mut head).unwrap();
    let want = Content::random(9, 96 << 20).to_vec().unwrap();
    assert!(head[..] == want[..16 << 20]);
    // The reader stops with the file open; what was asked for lands, and
    // then nothing more comes.
    let mut last = u64::MAX;
    wait_until("the fetching to settle", Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(500));
        let now = relay.bytes_down();
        let settled = now == last;
        last = now;
        Ok(settled)
    })
    .unwrap();
    let layer = pushed.image.layers[0].size;
    // 16 MiB read, the kernel's own readahead, and at most two windows.
    assert!(
        last < (16 + 4 + 2 * 8 + 2) << 20,
        "fetched {last} of {layer} bytes after reading 16 MiB"
    );
    drop(file);
}

#[test]
fn a_registry_that_never_answers_fails_the_read_in_bounded_time() {
    require!(NEEDS);
    let pushed = push_edge_image();
    let proxy = FaultProxy::start(pushed.registry.addr()).unwrap();
    let reference = pushed.through(&proxy.host());
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig {
        fetch: "read_timeout = \"2s\"\n".into(),
        ..Default::default()
    };
    let node = node_in(dir.path(), &config);
    bind_index(&node, &reference, None);
    let mounted = node
        .mount(&reference, &dir.path().join("mnt"), &[], "info")
        .unwrap();
    let model_layer = &pushed.image.layers[1].digest;
    proxy.inject(
        &format!("/blobs/{model_layer}"),
        1000,
        Fault::Silent(Duration::from_secs(20)),
    );
    // Without a bound the read would wait out every retry's timeout
    // (minutes); with it, it fails with EIO long before the watchdog.
    let path = mounted.dir.join("data/model");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::fs::read(path));
    });
    let read = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the read gave up");
    let err = read.unwrap_err();
    assert_eq!(err.raw_os_error(), Some(nix::libc::EIO), "{err}");
    wait_until("the EIO is logged", Duration::from_secs(10), || {
        Ok(mounted.log().contains("fetch.read_timeout"))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", mounted.log()));
    assert!(
        mounted.log().contains(r#"file="/data/model""#),
        "{}",
        mounted.log()
    );
    // The registry answers again: so does the file.
    proxy.clear();
    let want = Content::random(2, 2 << 20).to_vec().unwrap();
    assert!(std::fs::read(mounted.dir.join("data/model")).unwrap() == want);
}

#[test]
fn one_small_file_of_a_large_layer_fetches_a_few_spans() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let image = ImageBuilder::new()
        .layer(
            Layer::new()
                .compression(Compression::FAST)
                .file("weights-a", Content::random(1, 150 << 20))
                .file("config.json", "{\"layers\": 32}\n")
                .file("weights-b", Content::random(2, 150 << 20)),
        )
        .build(&layout)
        .unwrap();
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    registry.push(&layout, "v1", "big/model:v1").unwrap();
    let relay = Relay::start(registry.addr()).unwrap();
    let reference = format!("{}/big/model:v1", relay.host());
    let node = Node::new();
    node.ok(&["index", "create", &reference, "--bind"]);
    relay.reset();
    let mounted = node.mount(&reference, &[]);
    let at_mount = relay.bytes_down();
    assert_eq!(
        std::fs::read(mounted.dir.join("config.json")).unwrap(),
        b"{\"layers\": 32}\n"
    );
    let fetched = relay.bytes_down();
    let layer = image.layers[0].size;
    assert!(at_mount < 256 * 1024, "mounting fetched {at_mount} bytes");
    assert!(
        fetched < 3 * (4 << 20) + 256 * 1024,
        "reading one small file fetched {fetched} of {layer} bytes"
    );
}

#[test]
fn eviction_keeps_the_budget_and_spares_open_files() {
    require!(NEEDS);
    let pushed = push_edge_image();
    let relay = Relay::start(pushed.registry.addr()).unwrap();
    let reference = pushed.through(&relay.host());
    let node = Node::new();
    let config = node.dir.path().join("config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[cache]\nbudget = \"1MiB\"\n");
    std::fs::write(&config, text).unwrap();
    node.bind(&reference, Some("128KiB"));
    let mounted = node.mount(&reference, &[]);
    let stats = || -> serde_json::Value {
        serde_json::from_str(&node.ok(&["cache", "stats", "--json"])).unwrap()
    };

    // The 2 MiB model stays open: its data is pinned although it alone is
    // over the budget.
    let mut open = std::fs::File::open(mounted.dir.join("data/model")).unwrap();
    let mut first = Vec::new();
    std::io::Read::read_to_end(&mut open, &mut first).unwrap();
    for entry in std::fs::read_dir(mounted.dir.join("data/small/d0002")).unwrap() {
        std::fs::read(entry.unwrap().path()).unwrap();
    }
    let before = relay.bytes_down();
    let again = std::fs::read(mounted.dir.join("data/model")).unwrap();
    assert!(again == first);
    assert_eq!(
        relay.bytes_down(),
        before,
        "an open file's data was evicted and fetched again"
    );
    drop(open);

    // Closed, it can go: reading other data brings usage back to budget.
    for path in [
        "data/opaque/new",
        "data/sym",
        "data/deep/a/b/c/d/e/f/g/leaf",
    ] {
        std::fs::read(mounted.dir.join(path)).unwrap();
    }
    // The kernel sends RELEASE after close() returns; give it a moment.
    let mut usage = stats();
    wait_until("eviction after close", Duration::from_secs(10), || {
        usage = stats();
        Ok(usage["bytes"].as_u64().unwrap() <= 1 << 20)
    })
    .unwrap_or_else(|_| {
        panic!(
            "cache holds {} bytes with a 1 MiB budget; mount log:\n{}",
            usage["bytes"],
            mounted.daemon.log_tail(40)
        )
    });
    assert_eq!(usage["in_use"], true);
}

/// A real Debian root filesystem, mounted lazily: its tree equals `tar -x`
/// of the layer, and a real program runs from it.
#[test]
fn debian_root_filesystem_runs_python_from_the_mount() {
    require!(&[NEEDS, &[Prereq::Debootstrap]].concat());
    let rootfs = pronto_testbed::debian::bookworm_with_python().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let image = ImageBuilder::new()
        .layer(
            Layer::from_dir(&rootfs)
                .unwrap()
                .compression(Compression::Gzip(6)),
        )
        .build(&layout)
        .unwrap();
    layout.tag("bookworm", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry
        .push(&layout, "bookworm", "debian/python:bookworm")
        .unwrap();
    let node = Node::new();
    node.ok(&["index", "create", &reference, "--bind"]);

    let layer = &image.layers[0];
    let extracted = tempfile::tempdir().unwrap();
    let status = Command::new("tar")
        .args([
            "-x",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-p",
            "-f",
        ])
        .arg(layout.blob_path(&layer.digest))
        .arg("-C")
        .arg(extracted.path())
        .status()
        .unwrap();
    assert!(status.success());
    let expected = snapshot(extracted.path(), SnapshotOptions::default()).unwrap();
    let mounted = node.mount(&reference, &[]);
    let actual = snapshot(&mounted.dir, SnapshotOptions::default()).unwrap();
    let differences = diff(&expected, &actual);
    assert!(
        differences.is_empty(),
        "{} differences, first: {}",
        differences.len(),
        differences
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );

    let out = Command::new("chroot")
        .arg(&mounted.dir)
        .args(["/usr/bin/python3", "-c", "import json, os; print(json.dumps({'ok': True, 'files': len(os.listdir('/usr/bin')) > 50}))"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        r#"{"ok": true, "files": true}"#
    );
}

#[test]
fn background_fetch_makes_the_image_local_and_verifies_it() {
    require!(NEEDS);
    let pushed = push_edge_image();
    let node = Node::new();
    let config = node.dir.path().join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "background = false",
        "background = true\nbackground_rate = \"0\"",
    );
    std::fs::write(&config, text).unwrap();
    node.bind(&pushed.reference, Some("256KiB"));
    let mounted = node.mount_with_log(&pushed.reference, &[], "info,pronto_fs=debug");
    wait_until("background fetch", Duration::from_secs(60), || {
        Ok(mounted
            .daemon
            .log_tail(50)
            .matches("layer local completely")
            .count()
            == 2)
    })
    .unwrap_or_else(|e| panic!("{e}:\n{}", mounted.daemon.log_tail(30)));
    // With the registry gone, every file still reads: all of it is local.
    drop(pushed.registry);
    let model = std::fs::read(mounted.dir.join("data/model")).unwrap();
    assert!(model == Content::random(2, 2 << 20).to_vec().unwrap());
    let big = std::fs::read(mounted.dir.join("data/big")).unwrap();
    assert!(big == Content::random(1, 3 << 20).to_vec().unwrap());
    // Local files are read by the kernel itself (FUSE passthrough) on
    // kernels that offer it.
    let log = std::fs::read_to_string(mounted.daemon.log_path()).unwrap();
    if log.contains("passthrough=true") {
        assert!(log.contains("opened with passthrough"), "{log}");
    } else {
        eprintln!("this kernel has no FUSE passthrough; reads went through the daemon");
    }
}

/// Offsets past 4 GiB: a file larger than 4 GiB has the right size, and the
/// file stored after it in the tar stream reads back right.
#[test]
fn files_over_4_gib() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let huge = (4u64 << 30) + (3 << 20);
    let image = ImageBuilder::new()
        .layer(
            Layer::new()
                .compression(Compression::FAST)
                .file("huge", Content::Zeros(huge))
                .file("after", "stored past the 4 GiB mark\n"),
        )
        .build(&layout)
        .unwrap();
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry.push(&layout, "v1", "big/huge:v1").unwrap();
    let node = Node::new();
    node.ok(&["index", "create", &reference, "--bind"]);
    let mounted = node.mount(&reference, &[]);
    assert_eq!(
        std::fs::metadata(mounted.dir.join("huge")).unwrap().len(),
        huge
    );
    assert_eq!(
        std::fs::read(mounted.dir.join("after")).unwrap(),
        b"stored past the 4 GiB mark\n"
    );
    let mut file = std::fs::File::open(mounted.dir.join("huge")).unwrap();
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(huge - 4096)).unwrap();
    let mut tail = Vec::new();
    std::io::Read::read_to_end(&mut file, &mut tail).unwrap();
    assert_eq!(tail.len(), 4096);
    assert!(tail.iter().all(|b| *b == 0));
}

/// `pronto umount` succeeds while a reader is stuck on a stalled registry,
/// and the reader gets an error instead of hanging.
#[test]
fn unmount_works_with_readers_blocked() {
    require!(NEEDS);
    let pushed = push_edge_image();
    let proxy = FaultProxy::start(pushed.registry.addr()).unwrap();
    let reference = pushed.through(&proxy.host());
    let node = Node::new();
    node.bind(&reference, None);
    let mut mounted = node.mount(&reference, &[]);
    proxy.inject("/blobs/", 1000, Fault::Stall(Duration::from_secs(600)));
    let path = mounted.dir.join("data/model");
    let reader = std::thread::spawn(move || std::fs::read(path));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !reader.is_finished(),
        "the reader should be waiting on the registry"
    );

    let out = node
        .pronto(&["umount", mounted.dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mounts_below(&mounted.dir).is_empty());
    let result = reader.join().unwrap();
    assert!(
        result.is_err(),
        "a read of an aborted mount must fail, not return data"
    );
    wait_until("the mount process to exit", Duration::from_secs(20), || {
        Ok(!mounted.daemon.is_running())
    })
    .unwrap();
}

/// Programs keep running once their files are local and read through
/// passthrough: executing a file another process is running works.
#[test]
fn programs_run_from_local_files() {
    require!(&[NEEDS, &[Prereq::Busybox]].concat());
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "wc", "echo", "cat"]))
        .build(&layout)
        .unwrap();
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry.push(&layout, "v1", "tools/busybox:v1").unwrap();
    let node = Node::new();
    let mounted = node.mount_with_log(&reference, &[], "info,pronto_fs=debug");
    for _ in 0..3 {
        let out = Command::new("chroot")
            .arg(&mounted.dir)
            .args(["/bin/sh", "-c", "echo hi | wc -c; cat /bin/busybox | wc -c"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let size = std::fs::metadata(pronto_testbed::prereq::BUSYBOX)
            .unwrap()
            .len();
        assert_eq!(
            stdout.split_whitespace().collect::<Vec<_>>(),
            ["3", size.to_string().as_str()],
            "stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_converted_image_unpacks_as_its_source_and_mounts_lazily_without_an_index() {
    require!(&[NEEDS, &[Prereq::Containerd, Prereq::Runc]].concat());
    let pushed = push_edge_image();
    let node = Node::new();
    // A startup profile of the source on this node: the files it names
    // come first in each layer, where order cannot change the tree
    // (`data/opaque/new` is under an opaque marker of its layer: it stays).
    let ranges = |paths: &[&str]| {
        paths
            .iter()
            .map(|p| pronto_fs::profile::FileRange {
                path: (*p).into(),
                offset: 0,
                len: 1,
                seen: 1,
            })
            .collect()
    };
    let first = [
        vec!["data/small/d0002/f000250", "data/big", "etc/hosts"],
        vec![
            "data/opaque/new",
            "data/deep/a/b/c/d/e/f/g/leaf",
            "data/model",
        ],
    ];
    pronto_fs::profile::ProfileStore::new(node.node.root().join("profiles"))
        .save(&pronto_fs::profile::Profile {
            version: pronto_fs::profile::PROFILE_VERSION,
            manifest: pushed.image.manifest_digest.clone(),
            starts: 1,
            layers: pushed
                .image
                .layers
                .iter()
                .zip(&first)
                .map(|(layer, paths)| pronto_fs::profile::LayerProfile {
                    digest: layer.digest.clone(),
                    ranges: ranges(paths),
                })
                .collect(),
        })
        .unwrap();
    // Both chunked forms: eStargz (gzip) and zstd:chunked.
    let forms: Vec<(String, &str)> = ["gzip", "zstd"]
        .iter()
        .map(|compression| {
            let converted = pushed
                .reference
                .replace("mount/edge:v1", &format!("mount/edge-{compression}:v1"));
            let said = node.ok(&[
                "convert",
                &pushed.reference,
                &converted,
                "--chunk-size",
                "64KiB",
                "--compression",
                compression,
            ]);
            assert!(
                said.contains("5 files placed first; carried over as sha256:"),
                "{said}"
            );
            let files = layer_files(&pushed.registry, &said);
            assert_eq!(files[0][..3], first[0], "{compression}");
            assert_eq!(files[1][..2], first[1][1..], "{compression}");
            (converted, *compression)
        })
        .collect();

    // containerd's own unpack (overlayfs) of the source and of the
    // converted images: the same tree, so nodes without Pronto run them.
    let containerd = Containerd::start_with(ContainerdOptions {
        plain_http_registries: vec![pushed.registry.host()],
        ..Default::default()
    })
    .unwrap();
    let unpacked = |reference: &str| {
        containerd.pull(reference, "overlayfs").unwrap();
        let dir = containerd
            .root_dir()
            .parent()
            .unwrap()
            .join(format!("image-mount-{}", rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        containerd
            .ctr_ok(&["images", "mount", reference, dir.to_str().unwrap()])
            .unwrap();
        let tree = without_dir_link_counts(snapshot(&dir, SnapshotOptions::default()).unwrap());
        let _ = containerd.ctr_ok(&["images", "unmount", dir.to_str().unwrap()]);
        tree
    };
    let source = unpacked(&pushed.reference);
    for (converted, compression) in &forms {
        let differences = diff(&source, &unpacked(converted));
        assert!(
            differences.is_empty(),
            "{compression}: {}",
            differences.join("\n")
        );

        // Pronto mounts every layer lazily through its TOC, with no index.
        let mounted = node.mount(converted, &[]);
        let log = mounted.log();
        assert!(
            log.contains("2 of 2 layers lazy") && log.contains("tables of contents"),
            "{compression}: {log}"
        );
        let actual =
            without_dir_link_counts(snapshot(&mounted.dir, SnapshotOptions::default()).unwrap());
        let differences = diff(&source, &actual);
        assert!(
            differences.is_empty(),
            "{compression}: {}",
            differences.join("\n")
        );
    }
}

#[test]
fn a_conversion_that_fails_names_the_blob_and_tags_nothing() {
    require!(NEEDS);
    let pushed = push_edge_image();
    let node = Node::new();
    // A layer blob changed in the registry's storage, its size kept.
    let layer = &pushed.image.layers[1].digest;
    let hex = layer.strip_prefix("sha256:").unwrap();
    let path = pushed.registry.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let target = pushed
        .reference
        .replace("mount/edge:v1", "mount/edge-bad:v1");
    let out = node
        .pronto(&["convert", &pushed.reference, &target])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(layer.as_str()), "{stderr}");
    let tags = pushed
        .registry
        .storage_dir()
        .join("docker/registry/v2/repositories/mount/edge-bad/_manifests/tags");
    assert!(
        std::fs::read_dir(&tags).map_or(true, |mut t| t.next().is_none()),
        "a failed conversion tagged {target}"
    );
}

/// The regular files of each layer of the image `said` names
/// (`…@sha256:<hex>`), in their order in the layer, read from the
/// registry's storage.
fn layer_files(registry: &Registry, said: &str) -> Vec<Vec<String>> {
    let at = said.find("@sha256:").expect("a digest") + 1;
    let blob = |digest: &str| {
        let hex = digest.strip_prefix("sha256:").unwrap();
        std::fs::read(registry.storage_dir().join(format!(
            "docker/registry/v2/blobs/sha256/{}/{hex}/data",
            &hex[..2]
        )))
        .unwrap()
    };
    let manifest: serde_json::Value = serde_json::from_slice(&blob(&said[at..at + 71])).unwrap();
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|layer| {
            let compression =
                pronto_layer::Compression::from_media_type(layer["mediaType"].as_str().unwrap())
                    .unwrap();
            let bytes = blob(layer["digest"].as_str().unwrap());
            let mut archive = tar::Archive::new(compression.decoder(bytes.as_slice()).unwrap());
            archive
                .entries()
                .unwrap()
                .map(|e| e.unwrap())
                .filter(|e| e.header().entry_type() == tar::EntryType::Regular)
                .map(|e| e.path().unwrap().to_string_lossy().into_owned())
                .collect()
        })
        .collect()
}

#[test]
fn every_platform_of_a_multi_platform_image_is_converted() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let build = |arch: &str| {
        ImageBuilder::new()
            .platform(pronto_testbed::image::Platform::new("linux", arch))
            .layer(Layer::new().file("arch", arch))
            .layer(Layer::new().file("data", Content::random(4, 300_000)))
            .entrypoint(&["/bin/app"])
            .build(&layout)
            .unwrap()
    };
    let (amd, arm) = (build("amd64"), build("arm64"));
    layout.tag_multi_platform("v1", &[amd, arm]).unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry.push(&layout, "v1", "mount/multi:v1").unwrap();
    let node = Node::new();
    let target = reference.replace("mount/multi:v1", "mount/multi-zstd:v1");
    let said = node.ok(&["convert", &reference, &target, "--compression", "zstd"]);
    assert!(said.contains("2 platforms, 4 layers"), "{said}");

    for arch in ["amd64", "arm64"] {
        let platform = format!("linux/{arch}");
        let report: serde_json::Value = serde_json::from_str(&node.ok(&[
            "image",
            "inspect",
            &target,
            "--platform",
            &platform,
            "--json",
        ]))
        .unwrap();
        assert_eq!(
            report["index"]["platforms"],
            serde_json::json!(["linux/amd64", "linux/arm64"])
        );
        assert_eq!(report["config"]["architecture"], arch);
        assert_eq!(
            report["config"]["entrypoint"],
            serde_json::json!(["/bin/app"])
        );
        for layer in report["layers"].as_array().unwrap() {
            assert_eq!(
                layer["media_type"], "application/vnd.oci.image.layer.v1.tar+zstd",
                "{report}"
            );
        }
        // Lazily, through the zstd:chunked TOCs, each platform's own files.
        let mounted = node.mount(&target, &["--platform", &platform]);
        assert!(
            mounted.log().contains("2 of 2 layers lazy"),
            "{}",
            mounted.log()
        );
        assert_eq!(
            std::fs::read_to_string(mounted.dir.join("arch")).unwrap(),
            arch
        );
        assert!(
            std::fs::read(mounted.dir.join("data")).unwrap()
                == Content::random(4, 300_000).to_vec().unwrap()
        );
    }
}

#[test]
fn a_packed_directory_mounts_lazily_as_the_directory_it_was() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("model");
    std::fs::create_dir_all(dir.join("weights/shards")).unwrap();
    std::fs::write(dir.join("config.json"), "{\"layers\": 2}\n").unwrap();
    std::fs::write(dir.join("empty"), "").unwrap();
    let big = Content::random(21, 3 << 20).to_vec().unwrap();
    std::fs::write(dir.join("weights/shards/0.bin"), &big).unwrap();
    std::fs::hard_link(
        dir.join("weights/shards/0.bin"),
        dir.join("weights/latest.bin"),
    )
    .unwrap();
    std::os::unix::fs::symlink("shards/0.bin", dir.join("weights/link")).unwrap();
    std::fs::write(dir.join("run.sh"), "#!/bin/sh\n").unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(dir.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(dir.join("config.json"), Some(1000), Some(1001)).unwrap();
    xattr::set(dir.join("config.json"), "user.origin", b"pack").unwrap();
    nix::unistd::mkfifo(
        &dir.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();

    let registry = Registry::start().unwrap();
    let node = Node::new();
    let target = format!("{}/packed/model:v1", registry.host());
    let said = node.ok(&[
        "pack",
        dir.to_str().unwrap(),
        "--target",
        &target,
        "--compression",
        "zstd",
    ]);
    assert!(
        said.contains("@sha256:") && said.contains("9 entries"),
        "{said}"
    );

    let mounted = node.mount(&target, &[]);
    assert!(
        mounted.log().contains("1 of 1 layers lazy"),
        "{}",
        mounted.log()
    );
    let expected = without_dir_link_counts(snapshot(&dir, SnapshotOptions::default()).unwrap());
    let actual =
        without_dir_link_counts(snapshot(&mounted.dir, SnapshotOptions::default()).unwrap());
    let differences = diff(&expected, &actual);
    assert!(differences.is_empty(), "{}", differences.join("\n"));

    // Not a directory: a clear error, nothing pushed.
    let out = node
        .pronto(&[
            "pack",
            dir.join("config.json").to_str().unwrap(),
            "--target",
            &format!("{}/packed/bad:v1", registry.host()),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a directory"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
