//! The install files under `deploy/`: the systemd unit passes
//! `systemd-analyze verify`, and containerd 1.6 starts with the containerd
//! snippet, uses Pronto for CRI pulls and passes the image labels.

use std::path::Path;
use std::process::Command;

use pronto_testbed::cri::Cri;
use pronto_testbed::process::unmount_below;
use pronto_testbed::{
    Containerd, ContainerdOptions, CriOptions, ImageBuilder, Layer, NodeConfig, OciLayout, Prereq,
    ProntoNode, Registry, require,
};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");

#[test]
fn systemd_unit_verifies() {
    require!(&[Prereq::SystemdAnalyze]);
    let unit = std::fs::read_to_string(Path::new(DEPLOY).join("systemd/pronto.service")).unwrap();
    // No --config: a node without /etc/pronto/config.toml runs on defaults.
    assert!(unit.contains("ExecStart=/usr/local/bin/pronto serve\n"));
    assert!(unit.contains("Restart=always") && unit.contains("Before=containerd.service"));
    // The keeper, which holds the mounts across restarts, is not killed
    // with the daemon; systemd learns when the daemon is ready.
    assert!(unit.contains("KillMode=process\n") && unit.contains("Type=notify\n"));
    assert!(unit.contains("FileDescriptorStoreMax="));
    // Verified as installed, with the binary where the unit expects it.
    let dir = tempfile::tempdir().unwrap();
    let installed = dir.path().join("pronto.service");
    std::fs::write(
        &installed,
        unit.replace("/usr/local/bin/pronto", env!("CARGO_BIN_EXE_pronto")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&installed)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("pronto.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
}

#[test]
fn containerd_starts_with_the_snippet_and_pulls_through_pronto() {
    require!(&[
        Prereq::Root,
        Prereq::Fuse,
        Prereq::Containerd,
        Prereq::Runc,
        Prereq::Registry,
        Prereq::Skopeo,
        Prereq::Busybox
    ]);
    let work = tempfile::tempdir().unwrap();
    let socket = work.path().join("pronto.sock");
    let snippet = std::fs::read_to_string(Path::new(DEPLOY).join("containerd/config-1.6.toml"))
        .unwrap()
        .replace("/run/pronto/pronto.sock", socket.to_str().unwrap());
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["echo"]))
        .cmd(&["echo", "hello"])
        .build(&layout)
        .unwrap();
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry.push(&layout, "v1", "deploy/hello:v1").unwrap();
    let containerd = Containerd::start_with(ContainerdOptions {
        cri: Some(CriOptions {
            // The snippet provides the CRI snapshotter settings.
            snapshotter: String::new(),
            sandbox_image: "pronto.test/pause:3.9".into(),
        }),
        plain_http_registries: vec![registry.host()],
        extra_config: format!("\n{snippet}"),
        ..Default::default()
    })
    .unwrap();
    let config = NodeConfig {
        hosts_dir: Some(containerd.hosts_dir()),
        background: true,
        ..Default::default()
    };
    let node = ProntoNode::new(
        work.path(),
        Path::new(env!("CARGO_BIN_EXE_pronto")),
        &config,
    )
    .unwrap();
    let log = work.path().join("serve.log");
    let _keeper = node.keeper_guard();
    // As systemd runs it (Type=notify): ready is said on NOTIFY_SOCKET.
    let notify = work.path().join("notify.sock");
    let systemd = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    systemd
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut serve = node
        .serve_with_env(&log, "info", &[("NOTIFY_SOCKET", notify.as_os_str())])
        .unwrap();
    // What the daemon told systemd until it said it is ready: its socket
    // went to the descriptor store first.
    let mut told = Vec::new();
    while !told.iter().any(|m: &String| m.starts_with("READY=1")) {
        let mut said = [0u8; 256];
        let n = systemd
            .recv(&mut said)
            .unwrap_or_else(|e| panic!("{e}; told so far: {told:?}"));
        told.push(String::from_utf8_lossy(&said[..n]).into_owned());
    }
    assert!(
        told.iter()
            .any(|m| m.contains("FDSTORE=1") && m.contains("FDNAME=listener")),
        "{told:?}"
    );

    let plugins = containerd.ctr_ok(&["plugins", "ls"]).unwrap();
    let pronto = plugins
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("pronto"))
        .unwrap_or_else(|| panic!("no pronto plugin:\n{plugins}"));
    assert!(pronto.contains("io.containerd.snapshotter.v1") && pronto.trim_end().ends_with("ok"));

    // A CRI pull goes to Pronto with the image labels (the image has no
    // index, so Pronto pulls it whole and says why it is not lazy).
    Cri::connect(&containerd.socket())
        .unwrap()
        .pull_image(&reference)
        .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("reason=\"no-index\""), "{text}");
    assert!(!text.contains("no-image-labels"), "{text}");
    let out = containerd
        .ctr_in("k8s.io")
        .args([
            "run",
            "--rm",
            "--snapshotter",
            "pronto",
            &reference,
            "deploy-hello",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(containerd);
    serve.stop();
    unmount_below(work.path());
}
