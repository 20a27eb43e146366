//! `pronto serve` as containerd's proxy snapshotter, end to end: the real
//! registry (behind a byte-counting relay), containerd 1.6 with CRI, runc,
//! and Pronto's FUSE mounts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use pronto_testbed::cri::Cri;
use pronto_testbed::faults::{Fault, FaultProxy};
use pronto_testbed::image::BuiltImage;
use pronto_testbed::net::{free_loopback_port, http_get, wait_until};
use pronto_testbed::process::{Daemon, mounts_below, unmount_below};
use pronto_testbed::tree::{SnapshotOptions, diff, snapshot, without_dir_link_counts};
use pronto_testbed::{
    Compression, Containerd, ContainerdOptions, Content, CriOptions, ImageBuilder, KeeperGuard,
    Layer, NodeConfig, OciLayout, Prereq, ProntoNode, Registry, Relay, require,
};
use sha2::{Digest, Sha256};

const NEEDS: &[Prereq] = &[
    Prereq::Root,
    Prereq::Fuse,
    Prereq::Containerd,
    Prereq::Runc,
    Prereq::Registry,
    Prereq::Skopeo,
    Prereq::Busybox,
];

/// The data file of the test image (96 MiB, incompressible).
const MODEL: Content = Content::Random {
    seed: 7,
    len: 96 << 20,
};

/// A registry behind a relay, containerd with CRI using the `pronto` proxy
/// snapshotter, and `pronto serve`.
struct Stack {
    work: tempfile::TempDir,
    layout: OciLayout,
    /// Shared with a second node started [`Stack::beside`] this one.
    registry: Arc<Registry>,
    relay: Arc<Relay>,
    /// Another way to the registry, which can stall requests.
    faults: Arc<FaultProxy>,
    containerd: Option<Containerd>,
    node: ProntoNode,
    serve: Option<Daemon>,
    /// The keeper `pronto serve` starts outlives each daemon.
    _keeper: KeeperGuard,
    serve_starts: usize,
    /// Where `pronto serve` answers Prometheus scrapes.
    metrics: SocketAddr,
}

impl Stack {
    fn start() -> Self {
        Self::start_with("")
    }

    /// Like [`Stack::start`], with `extra` TOML appended to Pronto's
    /// configuration.
    fn start_with(extra: &str) -> Self {
        let registry = Registry::start().unwrap();
        let relay = Relay::start(registry.addr()).unwrap();
        let faults = FaultProxy::start(registry.addr()).unwrap();
        Self::start_on(Arc::new(registry), Arc::new(relay), Arc::new(faults), extra)
    }

    /// Another node, with its own containerd, `pronto serve` and node
    /// cache, pulling from this stack's registry.
    fn beside(&self, extra: &str) -> Self {
        Self::start_on(
            self.registry.clone(),
            self.relay.clone(),
            self.faults.clone(),
            extra,
        )
    }

    fn start_on(
        registry: Arc<Registry>,
        relay: Arc<Relay>,
        faults: Arc<FaultProxy>,
        extra: &str,
    ) -> Self {
        let work = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(&work.path().join("layout")).unwrap();
        let socket = work.path().join("pronto.sock");
        let containerd = Containerd::start_with(ContainerdOptions {
            proxy_snapshotters: vec![("pronto".into(), socket)],
            cri: Some(CriOptions {
                snapshotter: "pronto".into(),
                sandbox_image: "pronto.test/pause:3.9".into(),
            }),
            plain_http_registries: vec![relay.host(), registry.host(), faults.host()],
            extra_config: String::new(),
            supervised: false,
        })
        .unwrap();
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_loopback_port().unwrap()));
        let config = NodeConfig {
            hosts_dir: Some(containerd.hosts_dir()),
            metrics_address: Some(metrics),
            extra: extra.to_owned(),
            ..Default::default()
        };
        let binary = Path::new(env!("CARGO_BIN_EXE_pronto"));
        let node = ProntoNode::new(work.path(), binary, &config).unwrap();
        let mut stack = Stack {
            work,
            layout,
            registry,
            relay,
            faults,
            containerd: Some(containerd),
            _keeper: node.keeper_guard(),
            node,
            serve: None,
            serve_starts: 0,
            metrics,
        };
        stack.start_serve();
        stack
    }

    fn containerd(&self) -> &Containerd {
        self.containerd.as_ref().unwrap()
    }

    fn root(&self) -> PathBuf {
        self.work.path().join("root")
    }

    fn pronto_ok(&self, args: &[&str]) -> String {
        self.node.ok(args)
    }

    /// `pronto pull REFERENCE` through this stack's containerd.
    fn pronto_pull(&self, reference: &str) -> String {
        let address = self.containerd().socket();
        self.pronto_ok(&["pull", "--address", address.to_str().unwrap(), reference])
    }

    fn start_serve(&mut self) {
        self.serve_starts += 1;
        let log = self.work.path().join("serve.log");
        std::fs::write(&log, "").unwrap();
        let daemon = self.node.serve(&log, "info,pronto_fs=debug").unwrap();
        self.serve = Some(daemon);
        if let Some(containerd) = &self.containerd {
            // containerd reconnects to a restarted plugin after its backoff
            // (at most 3 s); until then calls fail as unavailable.
            wait_until("containerd reconnects", Duration::from_secs(30), || {
                Ok(containerd
                    .ctr_in("k8s.io")
                    .args(["snapshots", "--snapshotter", "pronto", "ls"])
                    .output()?
                    .status
                    .success())
            })
            .unwrap();
        }
    }

    /// Kills `pronto serve` with SIGKILL, as a crash or an OOM kill would.
    fn kill_serve(&mut self) {
        if let Some(mut daemon) = self.serve.take() {
            let pid = daemon.pid().unwrap() as i32;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
            daemon.stop();
        }
    }

    fn stop_serve(&mut self) {
        if let Some(mut daemon) = self.serve.take() {
            daemon.stop();
        }
    }

    fn serve_log(&self) -> String {
        std::fs::read_to_string(self.work.path().join("serve.log")).unwrap_or_default()
    }

    /// An image of busybox plus a layer with a 96 MiB data file and a small
    /// text file, pushed to the registry; indexed when `indexed`.
    fn push_model_image(&self, repo: &str, indexed: bool) -> (String, BuiltImage) {
        let image = ImageBuilder::new()
            .layer(Layer::busybox(&["sh", "cat", "sha256sum", "sleep", "head"]))
            .layer(
                Layer::new()
                    .compression(Compression::Gzip(6))
                    .dir("model")
                    .file("model/config.json", "{\"ready\": true}\n")
                    .file("model/weights.bin", MODEL),
            )
            .cmd(&["cat", "/model/config.json"])
            .build(&self.layout)
            .unwrap();
        let reference = self.push(&image, repo);
        if indexed {
            self.pronto_ok(&["index", "create", &reference, "--bind"]);
        }
        (reference, image)
    }

    /// Pushes `image` as `repo:v1` and returns its reference through the
    /// relay.
    fn push(&self, image: &BuiltImage, repo: &str) -> String {
        let tag = repo.replace('/', "-");
        self.layout.tag(&tag, image).unwrap();
        self.registry
            .push(&self.layout, &tag, &format!("{repo}:v1"))
            .unwrap();
        format!("{}/{repo}:v1", self.relay.host())
    }

    /// `ctr run --rm` in the Kubernetes namespace on the `pronto` snapshotter.
    fn run(&self, image: &str, args: &[&str]) -> Output {
        let id = format!("c{}", rand_suffix());
        let out = self
            .containerd()
            .ctr_in("k8s.io")
            .args(["run", "--rm", "--snapshotter", "pronto", image, &id])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "container from {image}: {}\n{}\npronto serve:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.serve_log(), 30)
        );
        out
    }

    /// `ctr run -d` of `image` with `options` (before the image) running
    /// `args`, in the Kubernetes namespace on the `pronto` snapshotter; the
    /// container's ID.
    fn start_container(&self, image: &str, options: &[&str], args: &[&str]) -> String {
        let id = format!("c{}", rand_suffix());
        let out = self
            .containerd()
            .ctr_in("k8s.io")
            .args(["run", "-d", "--snapshotter", "pronto"])
            .args(options)
            .args([image, &id])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        id
    }

    /// `ctr task exec`: runs `args` in running container `id`.
    fn exec(&self, id: &str, args: &[&str]) -> Command {
        let mut command = self.containerd().ctr_in("k8s.io");
        command
            .args([
                "task",
                "exec",
                "--exec-id",
                &format!("e{}", rand_suffix()),
                id,
            ])
            .args(args);
        command
    }

    /// Kills the task of container `id`.
    fn kill_container(&self, id: &str) {
        let _ = self
            .containerd()
            .ctr_in("k8s.io")
            .args(["task", "kill", "-s", "SIGKILL", id])
            .output();
    }

    /// The daemon's log has `message`.
    fn assert_logged(&self, message: &str) {
        let log = self.serve_log();
        assert!(
            log.contains(message),
            "no {message:?} in:\n{}",
            tail(&log, 30)
        );
    }

    /// A new container of `reference` reads the model file right.
    fn assert_new_container_reads_model(&self, reference: &str) {
        let out = self.run(reference, &["sha256sum", "/model/weights.bin"]);
        assert!(
            stdout(&out).starts_with(&model_sha256()),
            "{}",
            stdout(&out)
        );
    }

    /// `sha256sum` of the model file in running container `id` is right.
    fn assert_model_reads_back(&self, id: &str) {
        let out = self
            .exec(id, &["sha256sum", "/model/weights.bin"])
            .output()
            .unwrap();
        assert!(
            stdout(&out).starts_with(&model_sha256()),
            "{}{}\n{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.serve_log(), 30)
        );
    }

    /// Announces a pull of `reference` to the daemon, as `pronto pull` and
    /// kubelet's pull through Pronto's CRI socket do.
    fn announce(&self, reference: &str) {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(pronto_snapshotter::status::expect(
                &self.work.path().join("pronto.sock"),
                reference,
                "linux/amd64",
            ))
            .unwrap();
    }

    /// Waits until no snapshot directory is left (a failed pull deletes
    /// what it unpacked; a job still stopping may do so after the pull).
    fn wait_for_unpack_dirs_deleted(&self) {
        let dirs = || {
            std::fs::read_dir(self.root().join("snapshotter/snapshots"))
                .map(|dirs| dirs.count())
                .unwrap_or(0)
        };
        wait_until(
            "unpack directories deleted",
            Duration::from_secs(30),
            || Ok(dirs() == 0),
        )
        .unwrap_or_else(|e| panic!("{e}: {} left\n{}", dirs(), tail(&self.serve_log(), 20)));
    }

    fn snapshots(&self) -> Vec<String> {
        let out = self
            .containerd()
            .ctr_in("k8s.io")
            .args(["snapshots", "--snapshotter", "pronto", "ls"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .map(str::to_owned)
            .collect()
    }

    /// FUSE mounts of lazy layers below Pronto's root.
    fn lazy_mounts(&self) -> Vec<PathBuf> {
        mounts_below(&self.root().join("snapshotter"))
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // containerd first: its overlays stack on Pronto's mounts.
        drop(self.containerd.take());
        self.stop_serve();
        unmount_below(self.work.path());
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed) + u64::from(std::process::id()) * 1000
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn model_sha256() -> String {
    hex::encode(Sha256::digest(MODEL.to_vec().unwrap()))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn cri_pull_mounts_indexed_layers_lazily_and_the_container_runs() {
    require!(NEEDS);
    let stack = Stack::start();
    let (reference, image) = stack.push_model_image("lazy/model", true);
    stack.relay.reset();
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    let image_id = cri.pull_image(&reference).unwrap();
    assert!(image_id.starts_with("sha256:"), "{image_id}");
    let out = stack.run(&reference, &[]);
    assert_eq!(stdout(&out), "{\"ready\": true}\n");
    let fetched = stack.relay.bytes_down();
    let total = image.layers_size();
    assert!(
        fetched * 10 < total,
        "pull and start fetched {fetched} of {total} bytes:\n{}",
        tail(&stack.serve_log(), 40)
    );
    let log = stack.serve_log();
    assert!(log.contains("layer mounted lazily"), "{}", tail(&log, 30));
    // The small busybox layer has no index of its own: Pronto fetches and
    // unpacks it itself (logged), so containerd never starts fetching the
    // layers above it.
    assert!(log.contains("layer-not-indexed"), "{}", tail(&log, 30));
    assert!(
        log.contains("layer fetched in parallel and unpacked"),
        "{}",
        tail(&log, 30)
    );
    assert!(!log.contains(CONTAINERD_PULLS), "{}", tail(&log, 30));
    // Every FUSE request a container makes is answered by Pronto itself.
    assert!(!log.contains("Not Implemented"), "{}", tail(&log, 30));
    assert_eq!(stack.lazy_mounts().len(), 1, "{:?}", stack.lazy_mounts());
    // The data reads back exactly, fetched on demand.
    stack.assert_new_container_reads_model(&reference);
}

/// The four numbers of `pronto pull`'s line "registry round trips: N here
/// (M requests), K in pronto serve (L requests)".
fn round_trips(pulled: &str) -> Vec<u64> {
    pulled
        .lines()
        .find_map(|l| l.strip_prefix("registry round trips: "))
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// The value of sample `series` (name and labels exactly as exported) in
/// Prometheus text, if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.parse().ok())
}

#[test]
fn the_layers_of_an_image_ask_the_registry_for_its_startup_profile_once() {
    require!(NEEDS);
    let stack = Stack::start();
    let mut builder = ImageBuilder::new().layer(Layer::busybox(&["sh", "cat"]));
    for i in 0..3 {
        builder = builder.layer(
            Layer::new()
                .compression(Compression::FAST)
                .file(&format!("data/part-{i}.bin"), Content::random(i, 12 << 20)),
        );
    }
    let image = builder.build(&stack.layout).unwrap();
    let reference = stack.push(&image, "profiles/layers");
    stack.pronto_ok(&["index", "create", &reference, "--bind"]);
    let before = stack.registry.access_log().unwrap().len();
    let pulled = stack.pronto_pull(&reference);
    assert!(pulled.contains("3 layers lazy"), "{pulled}");
    // Each mount looks for a profile in the background; this registry has
    // no referrers API, so a lookup is a referrers request and the tag
    // schema's fallback. The first mount's lookup finds none; the others
    // take its answer.
    let asked = |part: &str| {
        stack.registry.access_log().unwrap()[before..]
            .iter()
            .filter(|e| e.path.contains(part))
            .count()
    };
    wait_until("a profile lookup", Duration::from_secs(10), || {
        Ok(asked("/manifests/sha256-") > 0)
    })
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let log: Vec<String> = stack.registry.access_log().unwrap()[before..]
        .iter()
        .map(|e| format!("{} {} {} {}", e.method, e.path, e.status, e.user_agent))
        .collect();
    assert_eq!(asked("/referrers/"), 1, "{log:#?}");
    assert_eq!(asked("/manifests/sha256-"), 1, "{log:#?}");
}

#[test]
fn a_pull_announced_ahead_finds_its_layers_opened_and_reads_each_document_once() {
    require!(NEEDS);
    let stack = Stack::start();
    let mut builder = ImageBuilder::new().layer(Layer::busybox(&["sh", "sha256sum"]));
    for i in 0..3 {
        builder = builder.layer(
            Layer::new()
                .compression(Compression::FAST)
                .file(&format!("data/part-{i}.bin"), Content::random(i, 12 << 20)),
        );
    }
    let image = builder.build(&stack.layout).unwrap();
    let reference = stack.push(&image, "ahead/layers");
    stack.pronto_ok(&["index", "create", &reference, "--bind"]);
    let before = stack.registry.access_log().unwrap().len();
    // What Pronto asked the registry for since `before`: (method, path).
    let asked = || -> Vec<(String, String)> {
        stack.registry.access_log().unwrap()[before..]
            .iter()
            .filter(|e| e.user_agent.starts_with("pronto/"))
            .map(|e| (e.method.clone(), e.path.clone()))
            .collect()
    };
    let known: Vec<&str> = image
        .layers
        .iter()
        .map(|l| l.digest.as_str())
        .chain([image.config_digest.as_str()])
        .collect();
    // Blobs that are neither a layer nor the config: the index blobs,
    // read a prefix at a time.
    let index_reads = || {
        asked()
            .into_iter()
            .filter(|(m, p)| m == "GET" && p.contains("/blobs/"))
            .filter(|(_, p)| !known.iter().any(|d| p.ends_with(d)))
            .count()
    };
    // kubelet's pull through Pronto's CRI socket (and `pronto pull`)
    // announces the image; the daemon opens its layers before any
    // `Prepare` comes.
    stack.announce(&reference);
    // The busybox layer has no index (it is under the minimum size): it
    // comes whole, and its download starts with the look-ahead too.
    let busybox = format!("/v2/ahead/layers/blobs/{}", image.layers[0].digest);
    let busybox_reads = || {
        asked()
            .into_iter()
            .filter(|(m, p)| m == "GET" && *p == busybox)
            .count()
    };
    wait_until(
        "the index prefixes and the whole layer fetched ahead",
        Duration::from_secs(20),
        || Ok(index_reads() == 3 && busybox_reads() == 1),
    )
    .unwrap();
    // containerd's own pull now prepares the layers: each takes its
    // prefix fetched ahead, and the whole layer its download.
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    cri.pull_image(&reference).unwrap();
    assert_eq!(
        index_reads(),
        3,
        "a prefix was fetched twice: {:#?}",
        asked()
    );
    assert_eq!(
        busybox_reads(),
        1,
        "the whole layer was fetched twice: {:#?}",
        asked()
    );
    let log = stack.serve_log();
    assert_eq!(
        log.matches("layer fetched in parallel and unpacked")
            .count(),
        1,
        "{}",
        tail(&log, 30)
    );
    // The image is on the node now: announcing it again fetches none of
    // its layers.
    let announced_again = stack.registry.access_log().unwrap().len();
    stack.announce(&reference);
    wait_until(
        "the second look-ahead resolved the tag",
        Duration::from_secs(20),
        || {
            Ok(stack.registry.access_log().unwrap()[announced_again..]
                .iter()
                .any(|e| e.user_agent.starts_with("pronto/") && e.path.contains("/manifests/")))
        },
    )
    .unwrap();
    // Whatever it would start, it starts right after.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        busybox_reads(),
        1,
        "a layer on the node was fetched again: {:#?}",
        asked()
    );
    assert_eq!(
        stack
            .serve_log()
            .matches("layer fetched in parallel and unpacked")
            .count(),
        1
    );
    // (Reads of the files may read the index blobs again, for windows.)
    let out = stack.run(&reference, &["sha256sum", "/data/part-2.bin"]);
    let expected = hex::encode(Sha256::digest(
        Content::random(2, 12 << 20).to_vec().unwrap(),
    ));
    assert!(stdout(&out).starts_with(&expected), "{}", stdout(&out));
    let log = asked();
    let count = |path: String| log.iter().filter(|(m, p)| m == "GET" && *p == path).count();
    let name = "/v2/ahead/layers";
    assert_eq!(
        count(format!("{name}/manifests/{}", image.manifest_digest)),
        1,
        "the daemon reads the image manifest once: {log:#?}"
    );
    assert_eq!(
        count(format!("{name}/blobs/{}", image.config_digest)),
        1,
        "the daemon reads the config once: {log:#?}"
    );
}

/// Where the stack's registry keeps blob `digest`.
fn stored_blob(stack: &Stack, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap();
    stack.registry.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ))
}

#[test]
fn layers_that_come_whole_start_downloading_without_waiting_for_the_config() {
    require!(NEEDS);
    let stack = Stack::start();
    // No index: both layers come whole.
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat"]))
        .layer(Layer::new().file("greeting", "hello from a whole layer\n"))
        .build(&stack.layout)
        .unwrap();
    let reference = stack.push(&image, "ahead/whole");
    // The registry serves a config that does not match its digest, so the
    // daemon's read of it fails: as if it had not arrived yet.
    let config = stored_blob(&stack, &image.config_digest);
    let good = std::fs::read(&config).unwrap();
    let mut bad = good.clone();
    let at = bad
        .iter()
        .position(|&b| b == b'2')
        .expect("a digit in the date");
    bad[at] = b'3';
    std::fs::write(&config, &bad).unwrap();
    let before = stack.registry.access_log().unwrap().len();
    let layer_reads = |digest: &str| {
        let path = format!("/v2/ahead/whole/blobs/{digest}");
        stack.registry.access_log().unwrap()[before..]
            .iter()
            .filter(|e| e.user_agent.starts_with("pronto/") && e.method == "GET" && e.path == path)
            .count()
    };
    stack.announce(&reference);
    wait_until(
        "both layers fetched ahead, from the manifest alone",
        Duration::from_secs(20),
        || Ok(image.layers.iter().all(|l| layer_reads(&l.digest) == 1)),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&stack.serve_log(), 30)));
    // The config comes right again; the pull takes the layers fetched
    // ahead, checks them against the config's diff IDs, and fetches
    // nothing twice.
    std::fs::write(&config, &good).unwrap();
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    cri.pull_image(&reference).unwrap();
    for layer in &image.layers {
        assert_eq!(
            layer_reads(&layer.digest),
            1,
            "{} fetched again",
            layer.digest
        );
    }
    let log = stack.serve_log();
    assert_eq!(
        log.matches("layer fetched in parallel and unpacked")
            .count(),
        2,
        "{}",
        tail(&log, 30)
    );
    let out = stack.run(&reference, &["cat", "/greeting"]);
    assert_eq!(stdout(&out), "hello from a whole layer\n");
}

#[test]
fn a_config_that_lies_about_a_layer_fails_the_pull_and_commits_nothing() {
    require!(NEEDS);
    let stack = Stack::start();
    let busybox = Layer::busybox(&["sh", "cat"]);
    let other = Layer::new().file("greeting", "not what the config names\n");
    let told = stack.layout.write_layer(&other).unwrap().diff_id;
    let image = ImageBuilder::new()
        .layer(busybox)
        .claimed_diff_ids(vec![told.clone()])
        .build(&stack.layout)
        .unwrap();
    let reference = stack.push(&image, "lying/config");
    // Announced ahead, the layer is fetched and unpacked before anything
    // has read the config: the check comes when the pull claims it.
    stack.announce(&reference);
    wait_until("the layer unpacked ahead", Duration::from_secs(20), || {
        Ok(stack
            .serve_log()
            .contains("layer fetched in parallel and unpacked"))
    })
    .unwrap();
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    let err = format!("{:#}", cri.pull_image(&reference).unwrap_err());
    assert!(
        err.contains(&format!("the image config says {told}"))
            && err.contains(&image.layers[0].diff_id),
        "the pull fails naming both diff IDs: {err}\n{}",
        tail(&stack.serve_log(), 30)
    );
    assert!(stack.snapshots().is_empty(), "{:?}", stack.snapshots());
    stack.wait_for_unpack_dirs_deleted();
}

#[test]
fn metrics_and_status_account_for_what_the_registry_served() {
    require!(NEEDS);
    let stack = Stack::start();
    let (reference, image) = stack.push_model_image("watched/model", true);
    // Only what `pronto serve` asks for from here on.
    let before = stack.registry.access_log().unwrap().len();
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    cri.pull_image(&reference).unwrap();
    let head = 3_000_000;
    let out = stack.run(
        &reference,
        &[
            "sh",
            "-c",
            &format!("head -c {head} /model/weights.bin | sha256sum"),
        ],
    );
    let expected = hex::encode(Sha256::digest(&MODEL.to_vec().unwrap()[..head]));
    assert!(stdout(&out).starts_with(&expected), "{}", stdout(&out));

    // Every response body byte the registry wrote to Pronto is counted,
    // no more (the access log is written when a response completes).
    let served = || -> u64 {
        stack.registry.access_log().unwrap()[before..]
            .iter()
            .filter(|entry| entry.user_agent.starts_with("pronto/"))
            .map(|entry| entry.bytes)
            .sum()
    };
    let scrape = || {
        let (status, text) = http_get(stack.metrics, "/metrics").unwrap();
        assert_eq!(status, 200, "{text}");
        text
    };
    let received = |text: &str| sample(text, "pronto_registry_received_bytes_total");
    let mut text = scrape();
    let settled = wait_until(
        "metrics match the access log",
        Duration::from_secs(10),
        || {
            text = scrape();
            Ok(received(&text) == Some(served() as f64))
        },
    );
    assert!(
        settled.is_ok(),
        "registry served {} bytes to Pronto, metrics say {:?}:\n{text}",
        served(),
        received(&text)
    );
    let fetched = |purpose: &str| {
        sample(
            &text,
            &format!("pronto_fetched_bytes_total{{purpose=\"{purpose}\"}}"),
        )
        .unwrap_or(0.0)
    };
    let (on_demand, index, whole) = (
        fetched("on_demand"),
        fetched("index"),
        fetched("whole_layer"),
    );
    assert!(
        on_demand >= head as f64 / 2.0,
        "reads were fetched on demand:\n{text}"
    );
    assert!(on_demand < image.layers_size() as f64 / 4.0, "{text}");
    assert!(
        index > 0.0,
        "the index prefix came from the registry:\n{text}"
    );
    // The busybox layer has no index of its own: fetched whole by Pronto.
    assert_eq!(whole, image.layers[0].size as f64, "{text}");
    assert!(
        on_demand + index + whole <= received(&text).unwrap(),
        "layer bytes are part of all bytes received:\n{text}"
    );
    // Every request the registry answered Pronto is counted, and each
    // round trip of its own is one of them.
    let answered = stack.registry.access_log().unwrap()[before..]
        .iter()
        .filter(|entry| entry.user_agent.starts_with("pronto/"))
        .count();
    let requests = sample(&text, "pronto_registry_requests_total").unwrap();
    let trips = sample(&text, "pronto_registry_round_trips_total").unwrap();
    assert_eq!(requests, answered as f64, "{text}");
    assert!(trips >= 1.0 && trips <= requests, "{text}");
    for (series, value) in [
        ("pronto_fallbacks_total{reason=\"layer-not-indexed\"}", 1.0),
        ("pronto_lazy_mounts", 1.0),
        ("pronto_fetched_bytes_total{purpose=\"background\"}", 0.0),
    ] {
        assert_eq!(
            sample(&text, series).unwrap_or(0.0),
            value,
            "{series}:\n{text}"
        );
    }
    assert!(sample(&text, "pronto_cache_hits_total").is_some(), "{text}");
    assert!(
        sample(&text, "pronto_cache_misses_total").unwrap() > 0.0,
        "{text}"
    );
    assert!(
        sample(&text, "pronto_cache_usage_bytes").unwrap() > 0.0,
        "{text}"
    );
    assert!(
        sample(&text, "pronto_range_request_duration_seconds_count").unwrap() > 0.0,
        "{text}"
    );
    for kind in ["read", "verification", "registry"] {
        let series = format!("pronto_errors_total{{kind=\"{kind}\"}}");
        assert_eq!(sample(&text, &series), None, "{text}");
    }

    // `pronto status` names the image and how much of its layer is here.
    let status: serde_json::Value =
        serde_json::from_str(&stack.pronto_ok(&["status", "--json"])).unwrap();
    let images = status["images"].as_array().unwrap();
    assert_eq!(images.len(), 1, "{status}");
    assert_eq!(images[0]["reference"], reference.as_str(), "{status}");
    let layer = &images[0]["layers"][0];
    let (local, size) = (
        layer["local_bytes"].as_u64().unwrap(),
        layer["size"].as_u64().unwrap(),
    );
    assert!(local >= head as u64 / 2 && local < size / 4, "{status}");
    assert_eq!(
        layer["fetched_on_demand"].as_f64().unwrap(),
        on_demand,
        "{status}"
    );
    assert_eq!(layer["background"], "off", "{status}");
    assert_eq!(status["fallbacks"]["layer-not-indexed"], 1, "{status}");
    let table = stack.pronto_ok(&["status"]);
    assert!(
        table.contains(&reference) && table.contains("1 lazy layer,"),
        "{table}"
    );
}

/// What the daemon logs when it leaves a layer to containerd.
const CONTAINERD_PULLS: &str = "containerd fetches and unpacks this layer";

#[test]
fn an_image_without_an_index_is_pulled_in_parallel_and_runs() {
    require!(NEEDS);
    let stack = Stack::start();
    let (reference, image) = stack.push_model_image("plain/model", false);
    stack.relay.reset();
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    cri.pull_image(&reference).unwrap();
    assert!(
        stack.relay.bytes_down() >= image.layers_size(),
        "every layer came whole"
    );
    stack.assert_new_container_reads_model(&reference);
    let log = stack.serve_log();
    let not_lazy = log
        .lines()
        .filter(|l| l.contains("not lazy") && l.contains("no-index"))
        .count();
    assert_eq!(
        not_lazy,
        2,
        "each layer's fallback is logged:\n{}",
        tail(&log, 30)
    );
    let pulled = log
        .matches("layer fetched in parallel and unpacked")
        .count();
    assert_eq!(pulled, 2, "{}", tail(&log, 30));
    assert!(log.contains("plain/model"));
    assert!(stack.lazy_mounts().is_empty());
}

#[test]
fn an_image_with_a_large_config_is_pulled_in_parallel() {
    // Configs up to the registry client's limit (16 MiB) resolve, so the
    // parallel pull must take them too.
    require!(NEEDS);
    let stack = Stack::start();
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat"]))
        .label("dev.pronto.test.padding", &"p".repeat(5 << 20))
        .cmd(&["cat", "/bin/sh"])
        .build(&stack.layout)
        .unwrap();
    // skopeo refuses configs over 4 MiB: push the blobs and the manifest
    // with Pronto's registry client.
    let repo = pronto_registry::Repository::new(&stack.registry.host(), "plain/large-config");
    let client = pronto_registry::RegistryClient::new(Default::default()).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let blobs =
            std::iter::once(&image.config_digest).chain(image.layers.iter().map(|l| &l.digest));
        for digest in blobs {
            let bytes = std::fs::read(stack.layout.blob_path(digest)).unwrap();
            client.push_blob(&repo, bytes.into()).await.unwrap();
        }
        client
            .push_manifest(
                &repo,
                "v1",
                "application/vnd.oci.image.manifest.v1+json",
                image.manifest.clone().into(),
            )
            .await
            .unwrap();
    });
    let reference = format!("{}/plain/large-config:v1", stack.relay.host());
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    cri.pull_image(&reference).unwrap();
    let log = stack.serve_log();
    assert!(!log.contains("parallel-pull-failed"), "{}", tail(&log, 30));
    assert_eq!(
        log.matches("layer fetched in parallel and unpacked")
            .count(),
        1,
        "{}",
        tail(&log, 30)
    );
}

#[test]
fn pronto_pull_has_containerd_unpack_what_pronto_does_not_fetch() {
    // With the parallel pull off and no index, every layer goes through
    // containerd's content store and diff service.
    require!(NEEDS);
    let stack = Stack::start_with("[pull]\nparallel = false\n");
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat"]))
        .layer(Layer::new().file("etc/greeting", "hello from containerd\n"))
        .cmd(&["cat", "/etc/greeting"])
        .build(&stack.layout)
        .unwrap();
    let reference = stack.push(&image, "plain/unpacked");
    let pulled = stack.pronto_pull(&reference);
    assert!(
        pulled.contains("0 layers lazy, 0 fetched whole by Pronto, 2 unpacked by containerd"),
        "{pulled}"
    );
    assert!(
        pulled.contains("phases: resolve ")
            && pulled.contains("layers unpacked by containerd ")
            && pulled.contains("image records "),
        "{pulled}"
    );
    let out = stack.run(&reference, &[]);
    assert_eq!(stdout(&out), "hello from containerd\n");
    // Pulled again: everything is present.
    let again = stack.pronto_pull(&reference);
    assert!(again.contains("2 already present"), "{again}");
}

#[test]
fn a_restarted_daemon_serves_existing_snapshots_again() {
    require!(NEEDS);
    let mut stack = Stack::start();
    let (reference, _) = stack.push_model_image("restart/model", true);
    let pulled = stack.pronto_pull(&reference);
    assert!(
        pulled.contains("1 layers lazy, 1 fetched whole by Pronto, 0 unpacked by containerd"),
        "the snapshotter made both layers: {pulled}"
    );
    assert!(
        pulled.contains("lazy layers ") && pulled.contains("layers fetched whole by Pronto "),
        "each way a layer was made is timed: {pulled}"
    );
    // The round trips of the pull, here (the manifests) and in the daemon
    // (the index and the layer fetched whole), each at most its requests.
    let trips = round_trips(&pulled);
    assert!(
        matches!(trips.as_slice(), &[here, here_requests, daemon, daemon_requests]
            if here >= 1 && here <= here_requests && daemon >= 1 && daemon <= daemon_requests),
        "{trips:?}: {pulled}"
    );
    // A container that keeps running across the restart.
    let running = stack.start_container(&reference, &[], &["sleep", "600"]);
    let before = stack.lazy_mounts();
    // A second daemon started by mistake stops at once and disturbs
    // nothing: the node's cache is the first one's.
    let second = stack.node.output(&["serve"]);
    assert!(
        !second.status.success()
            && String::from_utf8_lossy(&second.stderr).contains("only one pronto process"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(stack.lazy_mounts(), before);
    stack.assert_model_reads_back(&running);
    stack.stop_serve();
    stack.start_serve();
    stack.assert_logged("lazy mount taken over from the previous daemon");
    assert_eq!(stack.lazy_mounts(), before, "the same mount, not a new one");
    // The running container reads its lazy file through the mount it has
    // had since before the restart.
    stack.assert_model_reads_back(&running);
    let status: serde_json::Value =
        serde_json::from_str(&stack.pronto_ok(&["status", "--json"])).unwrap();
    let layer = &status["images"][0]["layers"][0];
    assert_eq!(layer["handovers"], 1, "{status}");
    stack.assert_new_container_reads_model(&reference);
    stack.kill_container(&running);
    assert_eq!(stack.serve_starts, 2);
}

#[test]
fn removing_the_image_unmounts_and_releases_everything() {
    require!(NEEDS);
    let stack = Stack::start();
    let (reference, _) = stack.push_model_image("remove/model", true);
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    cri.pull_image(&reference).unwrap();
    let out = stack.run(&reference, &["head", "-c", "1000000", "/model/weights.bin"]);
    assert_eq!(
        out.stdout.len(),
        1_000_000,
        "{}",
        tail(&stack.serve_log(), 30)
    );
    // The config's span is local now: opening it again makes a local copy
    // that the kernel reads directly (where passthrough is available).
    let out = stack.run(&reference, &["cat", "/model/config.json"]);
    assert_eq!(stdout(&out), "{\"ready\": true}\n");
    assert_eq!(stack.lazy_mounts().len(), 1);
    assert_eq!(stack.snapshots().len(), 2, "{:?}", stack.snapshots());
    let cache = stack.root().join("cache");
    assert!(files_below(&cache) > 0, "reading filled the cache");

    cri.remove_image(&reference).unwrap();
    // containerd collects garbage in the background after a removal.
    wait_until("snapshots removed", Duration::from_secs(60), || {
        Ok(stack.snapshots().is_empty() && stack.lazy_mounts().is_empty())
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}",
            stack.snapshots(),
            tail(&stack.serve_log(), 20)
        )
    });
    let dirs: Vec<_> = std::fs::read_dir(stack.root().join("snapshotter/snapshots"))
        .unwrap()
        .collect();
    assert!(dirs.is_empty(), "snapshot directories left: {dirs:?}");
    assert_eq!(files_below(&cache.join("data")), 0, "cached data released");
    assert!(stack.serve_log().contains("cache released"));
}

fn files_below(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                files_below(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn a_parallel_pull_unpacks_exactly_what_containerd_unpacks() {
    require!(NEEDS);
    let stack = Stack::start();
    let image = pronto_testbed::image::edge_image(&stack.layout);
    let reference = stack.push(&image, "edge/layers");
    let containerd = stack.containerd();

    // containerd's own pull and unpack, in its overlayfs snapshotter.
    containerd.pull(&reference, "overlayfs").unwrap();
    let expected_dir = stack.work.path().join("containerd-view");
    std::fs::create_dir_all(&expected_dir).unwrap();
    containerd
        .ctr_ok(&[
            "images",
            "mount",
            &reference,
            expected_dir.to_str().unwrap(),
        ])
        .unwrap();
    let expected =
        without_dir_link_counts(snapshot(&expected_dir, SnapshotOptions::default()).unwrap());
    containerd
        .ctr_ok(&["images", "unmount", expected_dir.to_str().unwrap()])
        .unwrap();

    // Kubernetes' pull into Pronto: no index, so Pronto fetches and unpacks.
    let cri = Cri::connect(&containerd.socket()).unwrap();
    cri.pull_image(&reference).unwrap();
    let log = stack.serve_log();
    assert_eq!(
        log.matches("layer fetched in parallel and unpacked")
            .count(),
        2,
        "{}",
        tail(&log, 30)
    );
    // A read-only view of the top layer, mounted as containerd would.
    let top = stack
        .snapshots()
        .iter()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() == 3).then(|| fields[0].to_owned())
        })
        .next()
        .expect("a committed snapshot with a parent");
    let actual_dir = stack.work.path().join("pronto-view");
    std::fs::create_dir_all(&actual_dir).unwrap();
    let ctr = |args: &[&str]| {
        containerd
            .ctr_in("k8s.io")
            .args(["snapshots", "--snapshotter", "pronto"])
            .args(args)
            .output()
            .unwrap()
    };
    // One call creates the view and prints its mount: the view has no lease,
    // so containerd's garbage collector may remove it at any time after.
    let out = ctr(&[
        "view",
        "-t",
        actual_dir.to_str().unwrap(),
        "pronto-check",
        &top,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mount = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = Command::new("sh")
        .args(["-c", mount.trim()])
        .status()
        .unwrap();
    assert!(status.success(), "{mount}");
    let actual =
        without_dir_link_counts(snapshot(&actual_dir, SnapshotOptions::default()).unwrap());
    nix::mount::umount2(&actual_dir, nix::mount::MntFlags::MNT_DETACH).unwrap();
    let out = ctr(&["rm", "pronto-check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() || stderr.contains("not found"),
        "{stderr}"
    );
    let differences = diff(&expected, &actual);
    assert!(differences.is_empty(), "{}", differences.join("\n"));
    assert!(actual.contains_key("data/opaque/new") && !actual.contains_key("data/gone"));
    assert!(!actual.contains_key("data/opaque/old"));
}

#[test]
fn a_hostile_layer_is_refused_through_containerd_and_nothing_escapes() {
    require!(NEEDS);
    let stack = Stack::start();
    // A layer whose second entry writes through a symlink to `/`. Without an
    // index, Pronto fetches and unpacks it itself, as it arrives.
    let target = format!("tmp/pronto-escape-{}", rand_suffix());
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["sh"]))
        .layer(
            Layer::new()
                .symlink("root-link", "/")
                .file(&format!("root-link/{target}"), "escaped\n"),
        )
        .build(&stack.layout)
        .unwrap();
    let reference = stack.push(&image, "hostile/image");
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    let err = format!("{:#}", cri.pull_image(&reference).unwrap_err());
    assert!(
        err.contains("layer rejected") && err.contains(&format!("root-link/{target}")),
        "the pull fails naming the entry: {err}\nkeeper pid: {:?}\n{}",
        stack.node.keeper_pid(),
        tail(&stack.serve_log(), 40)
    );
    assert!(
        !Path::new("/").join(&target).exists(),
        "the layer wrote outside Pronto's directories"
    );
    // The daemon is still there and serves the next image.
    let (good, _) = stack.push_model_image("after/hostile", true);
    cri.pull_image(&good).unwrap();
    let out = stack.run(&good, &[]);
    assert_eq!(stdout(&out), "{\"ready\": true}\n");
}

#[test]
fn kept_layers_are_verified_blobs_and_serve_the_next_pull() {
    require!(NEEDS);
    let stack = Stack::start_with("[pull]\ndiscard_unpacked_layers = false\n");
    let (reference, image) = stack.push_model_image("kept/model", false);
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    cri.pull_image(&reference).unwrap();
    for layer in &image.layers {
        let hex = layer.digest.strip_prefix("sha256:").unwrap();
        let kept = std::fs::read(stack.root().join("layers").join(hex)).unwrap();
        assert_eq!(
            format!("sha256:{}", hex::encode(Sha256::digest(&kept))),
            layer.digest
        );
    }
    // After the image is gone, a new pull unpacks from the kept blobs
    // without fetching them again.
    cri.remove_image(&reference).unwrap();
    wait_until("snapshots removed", Duration::from_secs(60), || {
        Ok(stack.snapshots().is_empty())
    })
    .unwrap();
    stack.relay.reset();
    cri.pull_image(&reference).unwrap();
    assert!(
        stack.relay.bytes_down() < image.layers[1].size / 10,
        "{} bytes fetched again",
        stack.relay.bytes_down()
    );
    stack.assert_new_container_reads_model(&reference);
}

#[test]
fn a_layer_that_would_fill_the_disk_fails_the_pull_instead() {
    require!(NEEDS);
    // More free space asked for than the disk has: every unpack must stop.
    let stack = Stack::start_with("[pull]\nmin_free_space = \"1000000GiB\"\n");
    let (reference, _) = stack.push_model_image("full/disk", false);
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    let err = format!("{:#}", cri.pull_image(&reference).unwrap_err());
    assert!(err.contains("pull.min_free_space"), "{err}");
    // Not handed to containerd, which would fill the disk in its place.
    let log = stack.serve_log();
    assert!(!log.contains(CONTAINERD_PULLS), "{}", tail(&log, 30));
    // The partly unpacked directories are deleted (the job of the layer
    // above may still be stopping when the pull has failed).
    stack.wait_for_unpack_dirs_deleted();
}

/// Lines of `path` (empty when it does not exist yet).
fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A container reads a lazy file over and over and checks every byte,
/// while `pronto serve` is killed in the middle of a span fetch, killed
/// with SIGKILL, and restarted gracefully: the container sees no error and
/// no wrong byte, containerd's calls during a handover succeed, and a new
/// container of the image starts afterwards.
#[test]
fn a_running_container_reads_correct_bytes_across_daemon_restarts() {
    require!(NEEDS);
    let mut stack = Stack::start();
    let (reference, _) = stack.push_model_image("survive/model", true);
    // Through the proxy that can stall the registry.
    let reference = reference.replace(&stack.relay.host(), &stack.faults.host());
    stack.pronto_pull(&reference);
    let out = stack.work.path().join("reader");
    std::fs::create_dir_all(&out).unwrap();
    let (sums, errors) = (out.join("sums"), out.join("errors"));
    // From here on the registry answers no blob request: the container's
    // first read waits on it.
    stack.faults.inject_for(
        Some("GET"),
        "/blobs/",
        1000,
        Fault::Silent(Duration::from_secs(120)),
    );
    let seen_before = stack.faults.requests().len();
    let bind = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
    let reader = stack.start_container(
        &reference,
        &["--mount", &bind],
        &[
            "sh",
            "-c",
            "while :; do sha256sum /model/weights.bin >> /out/sums 2>> /out/errors; done",
        ],
    );
    wait_until(
        "a read waits on the registry",
        Duration::from_secs(60),
        || {
            Ok(stack.faults.requests()[seen_before..]
                .iter()
                .any(|r| r.method == "GET" && r.range.is_some()))
        },
    )
    .unwrap();

    // 1. Killed while a read waits for its span.
    stack.kill_serve();
    // containerd's calls while no daemon answers wait for the next one
    // (for as long as containerd waits for a handshake: 1 s and more).
    let during = {
        let mut ls = stack.containerd().ctr_in("k8s.io");
        ls.args(["snapshots", "--snapshotter", "pronto", "ls"]);
        std::thread::spawn(move || ls.output().unwrap())
    };
    std::thread::sleep(Duration::from_millis(200));
    stack.faults.clear();
    stack.start_serve();
    let listed = during.join().unwrap();
    assert!(
        listed.status.success(),
        "a call during the handover failed: {}\n{}",
        String::from_utf8_lossy(&listed.stderr),
        tail(&stack.serve_log(), 40)
    );
    let wait_for_sums = |stack: &Stack, count: usize| {
        wait_until("the reader to go on", Duration::from_secs(120), || {
            Ok(lines_of(&sums).len() >= count || !lines_of(&errors).is_empty())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&stack.serve_log(), 30)));
    };
    wait_for_sums(&stack, 1);
    // The read the killed daemon had taken was sent again by the kernel.
    let (_, text) = http_get(stack.metrics, "/metrics").unwrap();
    assert!(
        sample(&text, "pronto_resent_requests_total").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(sample(&text, "pronto_handovers_total"), Some(1.0), "{text}");

    // 2. Killed while the container reads local data.
    let count = lines_of(&sums).len();
    stack.kill_serve();
    std::thread::sleep(Duration::from_millis(500));
    stack.start_serve();
    wait_for_sums(&stack, count + 2);

    // 3. A graceful restart (an upgrade).
    let count = lines_of(&sums).len();
    stack.stop_serve();
    stack.start_serve();
    wait_for_sums(&stack, count + 2);

    stack.kill_container(&reader);
    let errors = lines_of(&errors);
    assert!(errors.is_empty(), "the reader saw errors: {errors:?}");
    let sums = lines_of(&sums);
    assert!(sums.len() >= 5, "{sums:?}");
    for line in &sums {
        assert!(line.starts_with(&model_sha256()), "a wrong sum: {line}");
    }
    let status: serde_json::Value =
        serde_json::from_str(&stack.pronto_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["images"][0]["layers"][0]["handovers"], 3, "{status}");
    stack.assert_new_container_reads_model(&reference);
}

/// When no daemon comes back within `serve.handover_timeout`, reads of a
/// lazy mount fail with EIO instead of hanging; the mount serves again as
/// soon as a daemon starts.
#[test]
fn without_a_daemon_reads_fail_after_the_handover_timeout_then_recover() {
    require!(NEEDS);
    let mut stack = Stack::start_with("[serve]\nhandover_timeout = \"2s\"\n");
    let (reference, _) = stack.push_model_image("orphan/model", true);
    stack.pronto_pull(&reference);
    let running = stack.start_container(&reference, &[], &["sleep", "600"]);
    let exec = |stack: &Stack| {
        let mut command = stack.exec(&running, &["cat", "/model/config.json"]);
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(command.output().unwrap()));
        result
            .recv_timeout(Duration::from_secs(60))
            .expect("the read must not hang")
    };
    stack.kill_serve();
    std::thread::sleep(Duration::from_secs(3));
    let failed = exec(&stack);
    assert!(!failed.status.success(), "{}", stdout(&failed));
    assert!(
        String::from_utf8_lossy(&failed.stderr).contains("Input/output error"),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    stack.start_serve();
    let served = exec(&stack);
    assert_eq!(
        stdout(&served),
        "{\"ready\": true}\n",
        "{}",
        String::from_utf8_lossy(&served.stderr)
    );
    stack.kill_container(&running);
}

/// A lazy mount whose connection no process holds any more (the daemon and
/// its keeper both killed, as a reboot of the keeper's process would) is
/// detached by the next daemon, not left as a dead mount, and the layer is
/// mounted again when a container of the image starts.
#[test]
fn a_dead_mount_is_detached_at_start_and_mounted_again_when_used() {
    require!(NEEDS);
    let mut stack = Stack::start();
    let (reference, _) = stack.push_model_image("dead/model", true);
    stack.pronto_pull(&reference);
    let before = stack.lazy_mounts();
    assert_eq!(before.len(), 1);
    assert!(stack.node.keeper_pid().is_some(), "a keeper runs");
    stack.kill_serve();
    stack.node.kill_keeper();
    stack.start_serve();
    assert!(
        stack.lazy_mounts().is_empty(),
        "{:?}\n{}",
        stack.lazy_mounts(),
        tail(&stack.serve_log(), 20)
    );
    stack.assert_logged("detaching a lazy mount no daemon serves");
    stack.assert_new_container_reads_model(&reference);
    assert_eq!(stack.lazy_mounts(), before, "mounted again where it was");
}

/// A whole-layer pull interrupted by a crash of the daemon goes on from
/// the bytes it has when the layer is pulled again: the registry sends the
/// rest, not the whole layer again, and the layer is right.
#[test]
fn an_interrupted_parallel_pull_resumes_from_the_bytes_it_has() {
    require!(NEEDS);
    let mut stack = Stack::start_with(
        "[pull]\nconcurrent_download_chunk_size = \"1MiB\"\nmax_concurrent_downloads_per_image = 1\n",
    );
    let (reference, image) = stack.push_model_image("resume/model", false);
    let reference = reference.replace(&stack.relay.host(), &stack.faults.host());
    let layer = &image.layers[1];
    let blob = format!("/blobs/{}", layer.digest);
    // The first 40 MiB come; then the registry stops answering.
    stack.faults.inject_after(
        "GET",
        &blob,
        40,
        1000,
        Fault::Silent(Duration::from_secs(120)),
    );
    let address = stack.containerd().socket();
    let mut pull = stack
        .node
        .command(&["pull", "--address", address.to_str().unwrap(), &reference])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_until(
        "the pull to stall at 40 MiB",
        Duration::from_secs(60),
        || {
            Ok(stack
                .faults
                .requests()
                .iter()
                .any(|r| r.path.contains(&blob) && r.fault.is_some()))
        },
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    stack.kill_serve();
    let _ = pull.kill();
    let _ = pull.wait();
    stack.faults.clear();
    let seen = stack.faults.requests().len();
    stack.start_serve();
    stack.pronto_pull(&reference);
    let requested: u64 = stack.faults.requests()[seen..]
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains(&blob))
        .filter_map(|r| {
            let (start, end) = r
                .range
                .as_deref()?
                .strip_prefix("bytes=")?
                .split_once('-')?;
            Some(end.parse::<u64>().ok()? + 1 - start.parse::<u64>().ok()?)
        })
        .sum();
    assert!(
        requested < layer.size - (38 << 20),
        "{requested} of {} bytes fetched again:\n{}",
        layer.size,
        tail(&stack.serve_log(), 20)
    );
    stack.assert_logged("resuming an interrupted pull of the layer");
    stack.assert_new_container_reads_model(&reference);
}

/// What systemd's file descriptor store does for a `Type=notify` service:
/// takes the descriptors sent with `FDSTORE=1` and `FDNAME=`, forgets
/// those named with `FDSTOREREMOVE=1`, and hands the rest to the next
/// process as descriptors 3… (`LISTEN_FDS`, `LISTEN_FDNAMES`,
/// `LISTEN_PID`). A stand-in: the machines this runs on have no systemd.
struct DescriptorStore {
    socket: PathBuf,
    held:
        std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, std::os::fd::OwnedFd>>>,
}

impl DescriptorStore {
    fn start(socket: PathBuf) -> Self {
        use std::os::fd::AsRawFd;
        let listener = std::os::unix::net::UnixDatagram::bind(&socket).unwrap();
        let held = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let store = held.clone();
        std::thread::spawn(move || {
            loop {
                let mut buf = vec![0u8; 4096];
                let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 4]);
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                let Ok(msg) = nix::sys::socket::recvmsg::<()>(
                    listener.as_raw_fd(),
                    &mut iov,
                    Some(&mut cmsg),
                    nix::sys::socket::MsgFlags::MSG_CMSG_CLOEXEC,
                ) else {
                    return;
                };
                let mut fds = Vec::new();
                for c in msg.cmsgs().unwrap() {
                    if let nix::sys::socket::ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: the kernel installed these for us.
                        fds.extend(raw.into_iter().map(|fd| unsafe {
                            <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
                        }));
                    }
                }
                let len = msg.bytes;
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                let name = text
                    .lines()
                    .find_map(|l| l.strip_prefix("FDNAME="))
                    .unwrap_or("stored")
                    .to_owned();
                let mut held = store.lock().unwrap();
                if text.contains("FDSTOREREMOVE=1") {
                    held.remove(&name);
                } else if text.contains("FDSTORE=1")
                    && let Some(fd) = fds.pop()
                {
                    held.insert(name, fd);
                }
            }
        });
        Self { socket, held }
    }

    fn names(&self) -> Vec<String> {
        self.held.lock().unwrap().keys().cloned().collect()
    }

    /// `command` run as systemd runs a service with a descriptor store.
    fn command(&self, command: &Command) -> Command {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let held = self.held.lock().unwrap();
        let names: Vec<String> = held.keys().cloned().collect();
        let raw: Vec<i32> = held.values().map(|fd| fd.as_raw_fd()).collect();
        let mut wrapped = Command::new("sh");
        wrapped
            .args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\""])
            .arg(command.get_program())
            .args(command.get_args())
            .env("NOTIFY_SOCKET", &self.socket)
            .env("LISTEN_FDS", raw.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        for (key, value) in command.get_envs() {
            match value {
                Some(value) => wrapped.env(key, value),
                None => wrapped.env_remove(key),
            };
        }
        // SAFETY: only dup2 and fcntl, which are async-signal-safe, run
        // between fork and exec; the descriptors stay open in the parent.
        unsafe {
            wrapped.pre_exec(move || {
                let mut high = Vec::with_capacity(raw.len());
                for fd in &raw {
                    let moved = nix::libc::fcntl(*fd, nix::libc::F_DUPFD, 1000);
                    if moved < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high.push(moved);
                }
                for (i, fd) in high.iter().enumerate() {
                    if nix::libc::dup2(*fd, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        wrapped
    }
}

/// Run as a systemd service, the daemon stores every mount's connection in
/// systemd's descriptor store too: with its keeper killed as well, the next
/// daemon takes the mounts over from what systemd hands it, and a running
/// container reads on.
#[test]
fn mounts_survive_a_killed_keeper_through_systemds_descriptor_store() {
    require!(NEEDS);
    let mut stack = Stack::start();
    stack.stop_serve();
    let store = DescriptorStore::start(stack.work.path().join("notify.sock"));
    let log = stack.work.path().join("serve.log");
    let run_serve = |stack: &Stack| {
        let mut command = store.command(&stack.node.command(&["serve"]));
        command.env("PRONTO_LOG", "info");
        let mut daemon = Daemon::spawn("pronto serve", command, &log).unwrap();
        wait_until("pronto serve answers", Duration::from_secs(60), || {
            assert!(daemon.is_running(), "{}", daemon.log_tail(30));
            Ok(stack.node.output(&["status", "--json"]).status.success())
        })
        .unwrap();
        daemon
    };
    stack.serve = Some(run_serve(&stack));
    let (reference, _) = stack.push_model_image("stored/model", true);
    stack.pronto_pull(&reference);
    let running = stack.start_container(&reference, &[], &["sleep", "600"]);
    let before = stack.lazy_mounts();
    assert_eq!(before.len(), 1);
    wait_until("systemd holds the mount", Duration::from_secs(10), || {
        Ok(store.names().iter().any(|n| n.starts_with("fuse/")))
    })
    .unwrap();
    assert!(
        store.names().contains(&"listener".to_owned()),
        "{:?}",
        store.names()
    );

    assert!(stack.node.keeper_pid().is_some(), "a keeper runs");
    stack.kill_serve();
    stack.node.kill_keeper();
    stack.serve = Some(run_serve(&stack));
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("taken from systemd's descriptor store")
            && log_text.contains("lazy mount taken over from the previous daemon"),
        "{}",
        tail(&log_text, 30)
    );
    assert_eq!(stack.lazy_mounts(), before);
    stack.assert_model_reads_back(&running);
    stack.kill_container(&running);
}

/// An application layer of many small modules, of which its entrypoint
/// imports every third, and a big file it never reads. Returns the
/// reference, the image and the paths the entrypoint reads.
fn push_app_image(stack: &Stack, repo: &str) -> (String, BuiltImage, Vec<String>, String) {
    let mut layer = Layer::new().compression(Compression::Gzip(6)).dir("app");
    let mut read = Vec::new();
    let mut read_bytes = Sha256::new();
    for i in 0..60u64 {
        let path = format!("app/mod{i:02}.py");
        let content = Content::Random {
            seed: 100 + i,
            len: 48 << 10,
        };
        if i % 3 == 0 {
            read.push(path.clone());
            read_bytes.update(content.to_vec().unwrap());
        }
        layer = layer.file(&path, content);
    }
    layer = layer.file(
        "app/unused.bin",
        Content::Random {
            seed: 99,
            len: 24 << 20,
        },
    );
    let script = app_script(&read);
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat", "sha256sum"]))
        .layer(layer)
        .cmd(&["sh", "-c", &script])
        .build(&stack.layout)
        .unwrap();
    let reference = stack.push(&image, repo);
    stack.pronto_ok(&["index", "create", &reference, "--bind"]);
    let output = format!("{}  -\n", hex::encode(read_bytes.finalize()));
    (reference, image, read, output)
}

/// What the application's entrypoint runs: it reads `read` in order.
fn app_script(read: &[String]) -> String {
    format!(
        "cat {} | sha256sum",
        read.iter()
            .map(|p| format!("/{p}"))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// The layers' status of the one image mounted, as `pronto status --json`
/// gives it.
fn layer_status(stack: &Stack) -> Vec<serde_json::Value> {
    let status: serde_json::Value =
        serde_json::from_str(&stack.pronto_ok(&["status", "--json"])).unwrap();
    status["images"][0]["layers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn total(layers: &[serde_json::Value], key: &str) -> u64 {
    layers.iter().map(|l| l[key].as_u64().unwrap()).sum()
}

/// Removes `reference` through CRI and waits until its snapshots, lazy
/// mounts and cached data are gone: the next pull is a cold start.
fn remove_and_wait(stack: &Stack, cri: &Cri, reference: &str) {
    cri.remove_image(reference).unwrap();
    wait_until("snapshots removed", Duration::from_secs(60), || {
        Ok(stack.snapshots().is_empty() && stack.lazy_mounts().is_empty())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&stack.serve_log(), 20)));
}

#[test]
fn a_first_start_records_a_startup_profile_that_a_later_cold_start_fetches_ahead() {
    require!(NEEDS);
    let stack = Stack::start_with("[profile]\nquiet = \"1s\"\n");
    let (reference, image, read, output) = push_app_image(&stack, "profile/app");
    let script = app_script(&read);
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();

    // First start: recorded.
    cri.pull_image(&reference).unwrap();
    let first = stack.run(&reference, &["sh", "-c", &script]);
    assert_eq!(stdout(&first), output);
    let layers = layer_status(&stack);
    assert_eq!(layers[0]["profile"], "recording", "{layers:?}");
    let first_misses = total(&layers, "on_demand_requests");
    assert!(first_misses > 0);
    wait_until("the profile is recorded", Duration::from_secs(90), || {
        Ok(stack.serve_log().contains("startup profile recorded"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&stack.serve_log(), 30)));
    let shown = stack.pronto_ok(&["profile", "show", &image.manifest_digest, "--json"]);
    let profile: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let recorded: std::collections::BTreeSet<String> = profile["layers"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|l| l["ranges"].as_array().unwrap().iter())
        .map(|r| r["path"].as_str().unwrap().to_owned())
        .collect();
    // Exactly what the entrypoint read: the files it named, nothing else
    // (the background fetch is off here; it would not be recorded anyway).
    let expected: std::collections::BTreeSet<String> = read.iter().cloned().collect();
    assert_eq!(recorded, expected, "{shown}");
    assert!(
        stack
            .pronto_ok(&["profile", "list"])
            .contains(&image.manifest_digest)
    );

    // A cold start on an empty cache: the profile's ranges are fetched
    // ahead, the container reads the same bytes, few reads wait.
    remove_and_wait(&stack, &cri, &reference);
    cri.pull_image(&reference).unwrap();
    wait_until("the profile is fetched", Duration::from_secs(60), || {
        Ok(stack
            .serve_log()
            .contains("fetched ahead from the startup profile"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&stack.serve_log(), 30)));
    let second = stack.run(&reference, &["sh", "-c", &script]);
    assert_eq!(stdout(&second), output);
    let layers = layer_status(&stack);
    assert!(
        layers[0]["profile"]
            .as_str()
            .unwrap()
            .contains("prefetched"),
        "{layers:?}"
    );
    let by_profile = total(&layers, "fetched_by_profile");
    assert!(by_profile > 0, "{layers:?}");
    assert!(
        total(&layers, "on_demand_requests") < first_misses,
        "{layers:?} (first start: {first_misses} misses)"
    );
    // The unread big file was not fetched ahead.
    assert!(by_profile < 8 << 20, "{by_profile} bytes fetched ahead");
    let (_, text) = http_get(stack.metrics, "/metrics").unwrap();
    assert!(
        text.contains("purpose=\"profile\""),
        "no profile series in the metrics"
    );
    assert!(stack.pronto_ok(&["status"]).contains("startup profile:"));
}

#[test]
fn a_bad_startup_profile_is_refused_and_the_start_goes_on_without_it() {
    require!(NEEDS);
    let stack = Stack::start_with("[profile]\nquiet = \"1s\"\nrecord = false\n");
    let (reference, image, read, output) = push_app_image(&stack, "profile/bad");
    let script = app_script(&read);
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    let profiles = stack.root().join("profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    let file = profiles.join(format!("{}.json", image.manifest_digest.replace(':', "-")));
    let layer = &image.layers[1].digest;
    let profile = |manifest: &str, path: &str| {
        serde_json::json!({
            "version": 1, "manifest": manifest, "starts": 1,
            "layers": [{"digest": layer, "ranges": [{"path": path, "offset": 0, "len": 4096, "seen": 1}]}],
        })
        .to_string()
    };
    let cases = [
        ("corrupt", "{\"version\": 1, \"manif".to_owned(), "not used"),
        (
            "of another image",
            profile(&format!("sha256:{}", "0".repeat(64)), &read[0]),
            "not used",
        ),
        (
            "of files the layer does not have",
            profile(&image.manifest_digest, "app/../../etc/shadow"),
            "does not have",
        ),
        (
            "too large",
            format!(
                "{}{}",
                profile(&image.manifest_digest, &read[0]),
                " ".repeat(17 << 20)
            ),
            "not used",
        ),
    ];
    for (kind, text, warning) in cases {
        std::fs::write(&file, text).unwrap();
        let log_before = stack.serve_log().len();
        cri.pull_image(&reference).unwrap();
        let out = stack.run(&reference, &["sh", "-c", &script]);
        assert_eq!(stdout(&out), output, "{kind}");
        let log = stack.serve_log()[log_before..].to_owned();
        assert!(
            log.contains(warning),
            "{kind}: no warning\n{}",
            tail(&log, 20)
        );
        assert!(
            !log.contains("fetched ahead from the startup profile"),
            "{kind}\n{log}"
        );
        remove_and_wait(&stack, &cri, &reference);
    }
}

#[test]
fn profile_record_pushes_a_profile_that_a_node_without_one_finds_in_the_registry() {
    require!(NEEDS);
    let stack = Stack::start_with("[profile]\nquiet = \"1s\"\n");
    let (reference, image, read, output) = push_app_image(&stack, "profile/ci");
    let address = stack.containerd().socket();
    // As a CI step would, after pushing the image.
    let recorded = stack.node.output(&[
        "profile",
        "record",
        &reference,
        "--address",
        address.to_str().unwrap(),
        "--time-limit",
        "30s",
        "--push",
    ]);
    let said = String::from_utf8_lossy(&recorded.stdout).into_owned();
    assert!(
        recorded.status.success(),
        "{said}{}\n{}",
        String::from_utf8_lossy(&recorded.stderr),
        tail(&stack.serve_log(), 30)
    );
    assert!(said.contains("pushed as sha256:"), "{said}");
    let inspect = stack.pronto_ok(&["image", "inspect", &reference, "--json"]);
    assert!(
        inspect.contains("application/vnd.pronto.profile.v1"),
        "{inspect}"
    );

    // A second node, which has never run the image: it finds the
    // profile in the registry and fetches its ranges ahead.
    let other = stack.beside("[profile]\nquiet = \"1s\"\n");
    assert!(
        !other
            .pronto_ok(&["profile", "list"])
            .contains(&image.manifest_digest)
    );
    let log_before = other.serve_log().len();
    let cri = Cri::connect(&other.containerd().socket()).unwrap();
    cri.pull_image(&reference).unwrap();
    wait_until("the profile is fetched", Duration::from_secs(60), || {
        Ok(other.serve_log()[log_before..].contains("fetched ahead from the startup profile"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", tail(&other.serve_log(), 30)));
    assert!(other.serve_log()[log_before..].contains("startup profile found in the registry"));
    let out = other.run(&reference, &["sh", "-c", &app_script(&read)]);
    assert_eq!(stdout(&out), output);
    assert!(total(&layer_status(&other), "fetched_by_profile") > 0);
}

#[test]
fn names_a_layer_does_not_have_are_remembered_by_the_kernel() {
    require!(NEEDS);
    let stack = Stack::start();
    let (reference, _) = stack.push_model_image("lazy/names", true);
    let cri = Cri::connect(&stack.containerd().socket()).unwrap();
    cri.pull_image(&reference).unwrap();
    // As an interpreter searching its module path does: many names that
    // are not there, looked up again by every container of the image.
    let missing = 50;
    let script = (0..missing)
        .map(|i| format!("[ -e /model/missing-{i}.py ] || "))
        .collect::<String>()
        + "echo none";
    let lookups = || {
        let (_, text) = http_get(stack.metrics, "/metrics").unwrap();
        sample(&text, "pronto_fuse_requests_total{op=\"lookup\"}").unwrap_or(0.0)
    };
    let before = lookups();
    assert_eq!(
        stdout(&stack.run(&reference, &["sh", "-c", &script])),
        "none\n"
    );
    let first = lookups() - before;
    assert!(first >= f64::from(missing), "{first} lookups");
    let before = lookups();
    assert_eq!(
        stdout(&stack.run(&reference, &["sh", "-c", &script])),
        "none\n"
    );
    let second = lookups() - before;
    assert!(
        second < f64::from(missing),
        "the second container looked the missing names up again: {second} lookups"
    );
}

#[test]
fn a_converted_image_starts_lazily_without_an_index_and_its_mounts_survive_a_restart() {
    require!(NEEDS);
    let mut stack = Stack::start();
    // Not indexed: the converted image's layers carry their own TOC.
    let (reference, image) = stack.push_model_image("chunked/model", false);
    let converted = reference.replace("chunked/model", "chunked/model-converted");
    stack.pronto_ok(&["convert", &reference, &converted]);
    stack.relay.reset();
    let pulled = stack.pronto_pull(&converted);
    assert!(
        pulled.contains("2 layers lazy"),
        "both chunked layers are lazy: {pulled}\n{}",
        tail(&stack.serve_log(), 20)
    );
    let out = stack.run(&converted, &[]);
    assert_eq!(stdout(&out), "{\"ready\": true}\n");
    let fetched = stack.relay.bytes_down();
    assert!(
        fetched < image.layers_size() / 4,
        "{fetched} bytes fetched to read a small file of a {}-byte image",
        image.layers_size()
    );
    let running = stack.start_container(&converted, &[], &["sleep", "600"]);
    stack.assert_model_reads_back(&running);
    let before = stack.lazy_mounts();
    stack.stop_serve();
    stack.start_serve();
    stack.assert_logged("lazy mount taken over from the previous daemon");
    assert_eq!(stack.lazy_mounts(), before, "the same mounts, not new ones");
    stack.assert_model_reads_back(&running);
    stack.assert_new_container_reads_model(&converted);
    stack.kill_container(&running);
}

#[test]
fn the_next_version_of_a_converted_image_fetches_only_what_changed() {
    require!(NEEDS);
    let stack = Stack::start();
    let (v1, image) = stack.push_model_image("dedup/app", false);
    // Version 2: the same weights with 100 bytes inserted in the middle,
    // and a new version file.
    let mut weights = MODEL.to_vec().unwrap();
    weights.splice(50 << 20..50 << 20, [7u8; 100]);
    let expected = hex::encode(Sha256::digest(&weights));
    let next = ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat", "sha256sum", "sleep", "head"]))
        .layer(
            Layer::new()
                .compression(Compression::Gzip(6))
                .dir("model")
                .file("model/config.json", "{\"ready\": 2}\n")
                .file("model/weights.bin", weights),
        )
        .build(&stack.layout)
        .unwrap();
    let v2 = stack.push(&next, "dedup/app-next");
    let (c1, c2) = (
        v1.replace("dedup/app", "dedup/app-chunked"),
        v2.replace("dedup/app-next", "dedup/app-chunked-next"),
    );
    stack.pronto_ok(&["convert", &v1, &c1, "--compression", "zstd"]);
    stack.pronto_ok(&["convert", &v2, &c2, "--compression", "zstd"]);

    stack.relay.reset();
    stack.pronto_pull(&c1);
    let out = stack.run(&c1, &["sha256sum", "/model/weights.bin"]);
    assert!(
        stdout(&out).starts_with(&model_sha256()),
        "{}",
        stdout(&out)
    );
    let first = stack.relay.bytes_down();
    let model_len = MODEL.len().unwrap();
    assert!(first > model_len, "{first} bytes for the first version");

    // The registry's byte count for the second version: its changed
    // chunks, its TOC and its manifest, not its weights again.
    stack.relay.reset();
    let pulled = stack.pronto_pull(&c2);
    assert!(pulled.contains("lazy"), "{pulled}");
    let out = stack.run(&c2, &["sha256sum", "/model/weights.bin"]);
    assert!(stdout(&out).starts_with(&expected), "{}", stdout(&out));
    let second = stack.relay.bytes_down();
    assert!(
        second < model_len / 20,
        "{second} bytes fetched for the second version (the first took {first}; {} in the image):\n{}",
        image.layers_size(),
        tail(&stack.serve_log(), 20)
    );
}

#[test]
fn estargz_and_zstd_chunked_images_made_by_ctr_remote_start_lazily_without_an_index() {
    require!(&[NEEDS, &[Prereq::CtrRemote]].concat());
    let stack = Stack::start();
    let (reference, image) = stack.push_model_image("estargz/model", false);
    // As a user converts an image with stargz-snapshotter's tool.
    let ctr_remote = |args: &[&str]| {
        let out = Command::new("ctr-remote")
            .arg("--address")
            .arg(stack.containerd().socket())
            .args(["--namespace", "convert"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ctr-remote {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ctr_remote(&["images", "pull", "--plain-http", &reference]);
    for (name, flags) in [
        ("esgz", &["--estargz"][..]),
        ("zstdchunked", &["--zstdchunked"][..]),
    ] {
        let converted = reference.replace("estargz/model", &format!("estargz/model-{name}"));
        let mut args = vec!["images", "convert"];
        args.extend(flags);
        args.extend(["--oci", &reference, &converted]);
        ctr_remote(&args);
        ctr_remote(&["images", "push", "--plain-http", &converted]);

        stack.relay.reset();
        let pulled = stack.pronto_pull(&converted);
        assert!(
            pulled.contains("2 layers lazy"),
            "{name}: {pulled}\n{}",
            tail(&stack.serve_log(), 20)
        );
        let out = stack.run(&converted, &["sha256sum", "/model/weights.bin"]);
        assert!(
            stdout(&out).starts_with(&model_sha256()),
            "{name}: {}",
            stdout(&out)
        );
        // The whole model was read, nothing else: verified chunk by chunk.
        let fetched = stack.relay.bytes_down();
        assert!(
            fetched < image.layers_size() + image.layers_size() / 10,
            "{name}: {fetched} bytes for a {}-byte image",
            image.layers_size()
        );
    }
}

#[test]
fn in_an_image_of_plain_and_chunked_layers_only_the_plain_ones_come_whole() {
    require!(NEEDS);
    // (The background fetch is off in this suite: what is fetched of the
    // chunked layer before a container reads it is what the pull fetched.)
    let stack = Stack::start();
    let (reference, image) = stack.push_model_image("mixed/model", false);
    let converted = reference.replace("mixed/model", "mixed/model-converted");
    stack.pronto_ok(&["convert", &reference, &converted]);
    // An image of the plain busybox layer under the converted model layer,
    // as a build that adds a chunked layer to a plain base makes.
    let json = |digest: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(stored_blob(&stack, digest)).unwrap()).unwrap()
    };
    let tag_link = stack.registry.storage_dir().join(
        "docker/registry/v2/repositories/mixed/model-converted/_manifests/tags/v1/current/link",
    );
    let converted_manifest = json(std::fs::read_to_string(tag_link).unwrap().trim());
    let chunked = converted_manifest["layers"][1].clone();
    let chunked_digest = chunked["digest"].as_str().unwrap().to_owned();
    let chunked_size = chunked["size"].as_u64().unwrap();
    let converted_config = json(converted_manifest["config"]["digest"].as_str().unwrap());
    std::fs::copy(
        stored_blob(&stack, &chunked_digest),
        stack.layout.blob_path(&chunked_digest),
    )
    .unwrap();
    let mut config = json(&image.config_digest);
    config["rootfs"]["diff_ids"][1] = converted_config["rootfs"]["diff_ids"][1].clone();
    let config = serde_json::to_vec(&config).unwrap();
    let config_digest = stack.layout.write_blob(&config).unwrap();
    let mut manifest = json(&image.manifest_digest);
    manifest["config"]["digest"] = config_digest.clone().into();
    manifest["config"]["size"] = config.len().into();
    manifest["layers"][1] = chunked;
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mixed = BuiltImage {
        manifest_digest: stack.layout.write_blob(&manifest).unwrap(),
        manifest,
        config_digest,
        layers: Vec::new(),
        platform: image.platform.clone(),
    };
    let mixed = stack.push(&mixed, "mixed/model-mixed");
    let before = stack.registry.access_log().unwrap().len();
    let pulled = stack.pronto_pull(&mixed);
    assert!(
        pulled.contains("1 layers lazy, 1 fetched whole by Pronto"),
        "{pulled}\n{}",
        tail(&stack.serve_log(), 20)
    );
    // No job fetches the chunked layer whole on the side (one would take
    // well under this on loopback): only its TOC was read.
    std::thread::sleep(Duration::from_secs(2));
    let path = format!("/v2/mixed/model-mixed/blobs/{chunked_digest}");
    let chunked_bytes: u64 = stack.registry.access_log().unwrap()[before..]
        .iter()
        .filter(|e| e.method == "GET" && e.path == path)
        .map(|e| e.bytes)
        .sum();
    assert!(
        chunked_bytes < chunked_size / 4,
        "{chunked_bytes} of the chunked layer's {chunked_size} bytes fetched by the pull\n{}",
        tail(&stack.serve_log(), 30)
    );
    let log = stack.serve_log();
    assert_eq!(
        log.matches("layer fetched in parallel and unpacked")
            .count(),
        1,
        "{}",
        tail(&log, 30)
    );
    stack.assert_new_container_reads_model(&mixed);
}

#[test]
fn a_plain_zstd_image_is_pulled_whole_in_parallel_and_runs() {
    require!(NEEDS);
    let stack = Stack::start();
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat", "sha256sum"]).compression(Compression::Zstd(3)))
        .layer(
            Layer::new()
                .compression(Compression::Zstd(3))
                .dir("model")
                .file("model/weights.bin", MODEL),
        )
        .build(&stack.layout)
        .unwrap();
    let reference = stack.push(&image, "zstd/model");
    let pulled = stack.pronto_pull(&reference);
    let log = stack.serve_log();
    assert!(
        log.matches("layer fetched in parallel and unpacked")
            .count()
            >= 2,
        "{pulled}\n{}",
        tail(&log, 30)
    );
    assert!(!log.contains(CONTAINERD_PULLS), "{}", tail(&log, 30));
    let out = stack.run(&reference, &["sha256sum", "/model/weights.bin"]);
    assert!(
        stdout(&out).starts_with(&model_sha256()),
        "{}",
        stdout(&out)
    );
}
