//! Warming nodes before pods arrive, with the real parts: docker-registry
//! sends its push notifications to `pronto warm-hub`, which passes them on
//! to node daemons, each with its own containerd, node root and cache, and
//! its own counting relay to the registry.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use pronto_testbed::net::{free_loopback_port, http_get, wait_until};
use pronto_testbed::process::Daemon;
use pronto_testbed::{
    Compression, Containerd, ContainerdOptions, Content, ImageBuilder, KeeperGuard, Layer,
    NodeConfig, Notifications, OciLayout, Prereq, ProntoNode, Registry, RegistryOptions, Relay,
    require,
};
use serde_json::Value;

const NEEDS: &[Prereq] = &[
    Prereq::Root,
    Prereq::Fuse,
    Prereq::Registry,
    Prereq::Skopeo,
    Prereq::Containerd,
    Prereq::Runc,
];

const TOKEN: &str = "pronto-warm-test-token";

/// One node: containerd, `pronto serve` warming `[warm] images`, and a
/// relay that counts what the node fetches from the registry.
struct WarmNode {
    work: tempfile::TempDir,
    relay: Relay,
    containerd: Containerd,
    node: ProntoNode,
    serve: Option<Daemon>,
    /// Where the daemon answers Prometheus scrapes.
    metrics: SocketAddr,
    _keeper: KeeperGuard,
}

impl WarmNode {
    /// A node warming `repository:tag` of `registry`, following `hub`,
    /// checking its warm set every `check`.
    fn start(registry: &Registry, image: &str, hub: SocketAddr, check: &str) -> Self {
        let work = tempfile::tempdir().unwrap();
        let relay = Relay::start(registry.addr()).unwrap();
        let socket = work.path().join("pronto.sock");
        let containerd = Containerd::start_with(ContainerdOptions {
            proxy_snapshotters: vec![("pronto".into(), socket)],
            plain_http_registries: vec![relay.host()],
            ..Default::default()
        })
        .unwrap();
        let extra = format!(
            "[warm]\nimages = [\"{}/{image}\"]\ncontainerd_address = \"{}\"\nnamespace = \"{}\"\nhub = \"http://{hub}\"\njitter = \"300ms\"\ncheck_interval = \"{check}\"\nstartup_bytes = \"2MiB\"\n",
            relay.host(),
            containerd.socket().display(),
            containerd.namespace(),
        );
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_loopback_port().unwrap()));
        let config = NodeConfig {
            hosts_dir: Some(containerd.hosts_dir()),
            metrics_address: Some(metrics),
            extra,
            ..Default::default()
        };
        let binary = Path::new(env!("CARGO_BIN_EXE_pronto"));
        let node = ProntoNode::new(work.path(), binary, &config).unwrap();
        let log = work.path().join("serve.log");
        let serve = node.serve(&log, "info").unwrap();
        WarmNode {
            _keeper: node.keeper_guard(),
            work,
            relay,
            containerd,
            node,
            serve: Some(serve),
            metrics,
        }
    }

    fn reference(&self, image: &str) -> String {
        format!("{}/{image}", self.relay.host())
    }

    /// The warm set as `pronto status --json` reports it.
    fn warm_set(&self) -> Vec<Value> {
        let out = self.node.output(&["status", "--json"]);
        if !out.status.success() {
            return Vec::new();
        }
        let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        status["warm"].as_array().cloned().unwrap_or_default()
    }

    /// Waits until the node's one warm image is warm at `digest`.
    fn wait_warm(&self, digest: &str, what: &str) -> Value {
        let mut last = Vec::new();
        let found = wait_until(what, Duration::from_secs(60), || {
            last = self.warm_set();
            Ok(last
                .first()
                .is_some_and(|w| w["state"] == "warm" && w["digest"] == digest))
        });
        if let Err(e) = found {
            panic!("{e}: warm set {last:?}\n{}", self.log_tail(30));
        }
        last.remove(0)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.work.path().join("serve.log")).unwrap_or_default()
    }

    fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for WarmNode {
    fn drop(&mut self) {
        // The images go first, so that the daemon unmounts their layers.
        let _ = self
            .containerd
            .ctr()
            .args(["images", "rm", "--sync"])
            .args(
                String::from_utf8_lossy(
                    &self
                        .containerd
                        .ctr()
                        .args(["images", "ls", "-q"])
                        .output()
                        .map(|o| o.stdout)
                        .unwrap_or_default(),
                )
                .lines(),
            )
            .output();
        let _ = Command::new("sync").status();
        if let Some(mut serve) = self.serve.take() {
            serve.stop();
        }
    }
}

/// `pronto warm-hub` on `addr`, requiring [`TOKEN`].
fn start_hub(work: &Path, addr: SocketAddr) -> Daemon {
    let token = work.join("hub-token");
    std::fs::write(&token, TOKEN).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_pronto"));
    command
        .args(["warm-hub", "--listen", &addr.to_string(), "--token-file"])
        .arg(&token)
        .env("RUST_LOG", "info");
    let hub = Daemon::spawn("pronto warm-hub", command, &work.join("hub.log")).unwrap();
    wait_until("the warm hub listens", Duration::from_secs(20), || {
        Ok(std::net::TcpStream::connect(addr).is_ok())
    })
    .unwrap();
    hub
}

/// An app image: busybox, 24 MiB of weights, and 200 small files its
/// start reads.
fn app_image(layout: &OciLayout, version: u64) -> pronto_testbed::image::BuiltImage {
    let mut layer = Layer::new()
        .compression(Compression::Gzip(6))
        .dir("app")
        .file("app/version", format!("{version}\n"))
        .file("app/weights.bin", Content::random(version, 24 << 20));
    for i in 0..200u64 {
        if i % 50 == 0 {
            layer = layer.dir(&format!("app/lib/d{}", i / 50));
        }
        layer = layer.file(
            &format!("app/lib/d{}/m{i:03}.py", i / 50),
            Content::random(1000 + i + version * 7919, 1024 + (i * 37) % 3000),
        );
    }
    ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat", "echo"]))
        .layer(layer)
        .cmd(&[
            "/bin/sh",
            "-c",
            "cat /app/version /app/lib/*/* > /dev/null && echo ready",
        ])
        .build(layout)
        .unwrap()
}

/// Pushes `version` of the app plain, converts it (chunked: lazy without
/// an index) and tags the result `warm/app:latest`, which the registry
/// notifies. Returns the converted manifest's digest.
fn publish(
    registry: &Registry,
    layout: &OciLayout,
    converter: &ProntoNode,
    version: u64,
) -> String {
    let image = app_image(layout, version);
    layout.tag(&format!("v{version}"), &image).unwrap();
    let plain = registry
        .push(
            layout,
            &format!("v{version}"),
            &format!("warm/src:v{version}"),
        )
        .unwrap();
    let said = converter.ok(&[
        "convert",
        &plain,
        &format!("{}/warm/app:latest", registry.host()),
    ]);
    let at = said.find("@sha256:").expect("a digest") + 1;
    said[at..at + 71].to_owned()
}

/// POSTs `body` to the hub's webhook with `token`; returns the status.
fn post_notification(hub: SocketAddr, token: Option<&str>, body: &str) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(hub).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "POST /notifications HTTP/1.1\r\nHost: {hub}\r\nContent-Type: application/vnd.docker.distribution.events.v1+json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_push_warms_every_node_and_a_node_that_joins_later() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let hub_addr = SocketAddr::from(([127, 0, 0, 1], free_loopback_port().unwrap()));
    let mut hub = start_hub(work.path(), hub_addr);
    let registry = Registry::start_with(RegistryOptions {
        notifications: Some(Notifications {
            url: format!("http://{hub_addr}/notifications"),
            token: Some(TOKEN.into()),
        }),
        ..Default::default()
    })
    .unwrap();
    let converter = ProntoNode::new(
        &work.path().join("converter"),
        Path::new(env!("CARGO_BIN_EXE_pronto")),
        &NodeConfig::default(),
    )
    .unwrap();

    // Three nodes join before the image exists: nothing to warm yet.
    let nodes: Vec<WarmNode> = (0..3)
        .map(|_| WarmNode::start(&registry, "warm/app:latest", hub_addr, "1h"))
        .collect();
    for node in &nodes {
        wait_until("the first warm attempt", Duration::from_secs(30), || {
            Ok(node
                .warm_set()
                .first()
                .is_some_and(|w| w["state"] == "failed"))
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log_tail(20)));
    }

    // The push: every node warms it, told by the hub.
    let v1 = publish(&registry, &layout, &converter, 1);
    for node in &nodes {
        let warm = node.wait_warm(&v1, "warm after the push");
        assert_eq!(warm["source"], "push", "{warm}");
        assert!(warm["lag_seconds"].as_f64().unwrap() > 0.0, "{warm}");
        // The startup set only: not the 24 MiB of weights.
        assert!(warm["bytes"].as_u64().unwrap() < 4 << 20, "{warm}");
    }
    let (_, metrics) = http_get(nodes[0].metrics, "/metrics").unwrap();
    for series in [
        "pronto_warm_events_total{source=\"push\"} 1",
        "pronto_warm_lag_seconds_count 1",
        "pronto_warm_images{state=\"warm\"} 1",
    ] {
        assert!(metrics.contains(series), "{series}:\n{metrics}");
    }
    // kubelet would find the image present; the start fetches (nearly)
    // nothing more from the registry.
    let image_size = 24 << 20;
    for node in &nodes {
        node.relay.reset();
        let out = node
            .containerd
            .run(&node.reference("warm/app:latest"), "pronto", &[])
            .unwrap();
        assert_ready(&out);
        let fetched = node.relay.bytes_down();
        assert!(
            fetched < image_size / 20,
            "{fetched} bytes fetched by a start after warming\n{}",
            node.log_tail(20)
        );
    }

    // A node that joins later warms on join.
    let late = WarmNode::start(&registry, "warm/app:latest", hub_addr, "1s");
    let warm = late.wait_warm(&v1, "warm on join");
    assert!(
        matches!(warm["source"].as_str(), Some("join" | "resync")),
        "{warm}"
    );

    // Removed (as kubelet's image GC would): warmed again.
    late.containerd
        .ctr()
        .args(["images", "rm", "--sync", &late.reference("warm/app:latest")])
        .args([format!("{}/warm/app@{v1}", late.relay.host())])
        .output()
        .unwrap();
    wait_until("warm again after removal", Duration::from_secs(30), || {
        Ok(late
            .warm_set()
            .first()
            .is_some_and(|w| w["state"] == "warm" && w["source"] == "refresh"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", late.log_tail(20)));

    // Webhooks without the token, or not the registry's envelope, are
    // refused with a log line and change nothing.
    let envelope = format!(
        r#"{{"events":[{{"action":"push","timestamp":"2026-12-03T10:00:00Z","target":{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{}","repository":"warm/app","tag":"latest"}}}}]}}"#,
        "0".repeat(64)
    );
    assert_eq!(post_notification(hub_addr, None, &envelope), 401);
    assert_eq!(post_notification(hub_addr, Some("wrong"), &envelope), 401);
    assert_eq!(
        post_notification(hub_addr, Some(TOKEN), "{\"events\": 7}"),
        400
    );
    let hub_log = std::fs::read_to_string(work.path().join("hub.log")).unwrap();
    assert!(
        hub_log.matches("rejected a notification").count() >= 3,
        "{hub_log}"
    );
    for node in nodes.iter().chain([&late]) {
        let warm = &node.warm_set()[0];
        assert_eq!(warm["digest"], v1.as_str(), "{warm}");
        assert_eq!(warm["state"], "warm", "{warm}");
    }

    // The hub goes away; a push meanwhile is not lost: the registry
    // delivers it again, and the nodes check their tags on reconnecting.
    hub.stop();
    let v2 = publish(&registry, &layout, &converter, 2);
    std::thread::sleep(Duration::from_secs(2));
    let _hub = start_hub(work.path(), hub_addr);
    for node in nodes.iter().chain([&late]) {
        node.wait_warm(&v2, "warm at the new digest after the hub came back");
        // The previous digest was released from containerd.
        let images = node
            .containerd
            .ctr()
            .args(["images", "ls", "-q"])
            .output()
            .unwrap();
        let images = String::from_utf8_lossy(&images.stdout);
        assert!(!images.contains(&v1), "{images}");
    }
}

#[test]
fn an_image_is_warmed_by_hand_in_full() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let registry = Registry::start().unwrap();
    let converter = ProntoNode::new(
        &work.path().join("converter"),
        Path::new(env!("CARGO_BIN_EXE_pronto")),
        &NodeConfig::default(),
    )
    .unwrap();
    let digest = publish(&registry, &layout, &converter, 3);
    // A node with no warm set and no hub.
    let hub = SocketAddr::from(([127, 0, 0, 1], free_loopback_port().unwrap()));
    let node = WarmNode::start(&registry, "warm/other:latest", hub, "1h");
    let reference = node.reference("warm/app:latest");
    let said = node.node.ok(&["warm", &reference, "--mode", "full"]);
    assert!(
        said.contains("is warm (full)") && said.contains(&digest),
        "{said}"
    );
    let warm = node.warm_set();
    let entry = warm
        .iter()
        .find(|w| w["reference"] == reference.as_str())
        .unwrap_or_else(|| panic!("{warm:?}"));
    assert_eq!(entry["source"], "manual");
    // Every byte of the lazy layers: the weights too.
    assert!(entry["bytes"].as_u64().unwrap() > 24 << 20, "{entry}");
    node.relay.reset();
    let out = node.containerd.run(&reference, "pronto", &[]).unwrap();
    assert_ready(&out);
    assert!(
        node.relay.bytes_down() < 64 << 10,
        "{}",
        node.relay.bytes_down()
    );
    // A bad reference or mode is refused with the reason.
    let out = node.node.output(&["warm", "not a reference"]);
    assert!(!out.status.success());
}

#[test]
fn a_pull_during_a_warm_shares_its_snapshots_and_fetches() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let registry = Registry::start().unwrap();
    let converter = ProntoNode::new(
        &work.path().join("converter"),
        Path::new(env!("CARGO_BIN_EXE_pronto")),
        &NodeConfig::default(),
    )
    .unwrap();
    publish(&registry, &layout, &converter, 4);
    let hub = SocketAddr::from(([127, 0, 0, 1], free_loopback_port().unwrap()));
    let snapshots = |node: &WarmNode| {
        let out = node
            .containerd
            .ctr()
            .args(["snapshots", "--snapshotter", "pronto", "ls"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };

    // One node warms alone: what warming costs.
    let alone = WarmNode::start(&registry, "warm/other:latest", hub, "1h");
    alone.relay.reset();
    alone
        .node
        .ok(&["warm", &alone.reference("warm/app:latest")]);
    let warm_bytes = alone.relay.bytes_down();

    // Another warms while a pull of the same image runs.
    let racing = WarmNode::start(&registry, "warm/other:latest", hub, "1h");
    let reference = racing.reference("warm/app:latest");
    racing.relay.reset();
    let address = racing.containerd.socket();
    let mut pull = racing.node.command(&[
        "pull",
        "--address",
        address.to_str().unwrap(),
        "--namespace",
        racing.containerd.namespace(),
        &reference,
    ]);
    let pulling = pull
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    racing.node.ok(&["warm", &reference]);
    let pulled = pulling.wait_with_output().unwrap();
    assert!(pulled.status.success(), "{pulled:?}");
    let both_bytes = racing.relay.bytes_down();
    assert!(
        both_bytes <= warm_bytes + warm_bytes / 4 + (256 << 10),
        "warm and pull fetched {both_bytes} bytes; the warm alone {warm_bytes}\n{}",
        racing.log_tail(30)
    );
    assert_eq!(snapshots(&racing), snapshots(&alone));
    let out = racing.containerd.run(&reference, "pronto", &[]).unwrap();
    assert_ready(&out);
}

/// The workload read its files and said `ready`. Its exit status, which
/// `run` checks, says so too (`cat … && echo ready`): `ctr run` now and
/// then loses the output of a task that exits right after printing
/// (containerd#770), so empty output is not a failure.
fn assert_ready(out: &std::process::Output) {
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.is_empty() || stdout.contains("ready"),
        "the workload printed {stdout:?}"
    );
}
