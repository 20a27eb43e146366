//! `pronto doctor`: passes on a correctly set-up node and, for each broken
//! setting, fails the right check with a fix.

use std::path::Path;

use base64::Engine;
use pronto_testbed::{
    Credentials, ImageBuilder, Layer, NodeConfig, OciLayout, Prereq, ProntoNode, Registry,
    RegistryOptions, require,
};
use serde_json::Value;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");

struct Node {
    dir: tempfile::TempDir,
}

impl Node {
    /// A Pronto config (socket `address`) and a containerd config made
    /// from the install snippet pointing at `proxy_address`.
    fn write(
        &self,
        name: &str,
        address: &Path,
        snippet: bool,
        password: &str,
        host: &str,
    ) -> ProntoNode {
        let dir = self.dir.path().join(name);
        let config = NodeConfig {
            root: Some(self.dir.path().join("root")),
            address: Some(address.to_owned()),
            hosts_dir: Some(self.dir.path().join("hosts")),
            background: true,
            ..Default::default()
        };
        let node = ProntoNode::new(&dir, Path::new(env!("CARGO_BIN_EXE_pronto")), &config).unwrap();
        let containerd = if snippet {
            std::fs::read_to_string(Path::new(DEPLOY).join("containerd/config-1.6.toml"))
                .unwrap()
                .replace("/run/pronto/pronto.sock", address.to_str().unwrap())
        } else {
            "version = 2\n".to_owned()
        };
        std::fs::write(dir.join("containerd.toml"), containerd).unwrap();
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("ann:{password}"));
        std::fs::write(
            dir.join("config.json"),
            serde_json::json!({"auths": {host: {"auth": auth}}}).to_string(),
        )
        .unwrap();
        node
    }
}

/// Runs `pronto doctor --json` and returns (exit ok, checks by name).
fn doctor(node: &ProntoNode, extra: &[&str]) -> (bool, Vec<(String, bool, String)>) {
    let containerd = node.dir().join("containerd.toml");
    let mut args = vec![
        "doctor",
        "--json",
        "--containerd-config",
        containerd.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = node.output(&args);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    let checks = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["check"].as_str().unwrap().to_owned(),
                c["ok"].as_bool().unwrap(),
                c["hint"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(out.status.success(), report["ok"].as_bool().unwrap());
    (out.status.success(), checks)
}

/// The failed checks, with their hints.
fn failures(checks: &[(String, bool, String)]) -> Vec<(&str, &str)> {
    checks
        .iter()
        .filter(|c| !c.1)
        .map(|c| (c.0.as_str(), c.2.as_str()))
        .collect()
}

#[test]
fn doctor_passes_a_good_node_and_names_each_broken_setting() {
    require!(&[Prereq::Root, Prereq::Fuse, Prereq::Registry, Prereq::Skopeo]);
    let node = Node {
        dir: tempfile::tempdir().unwrap(),
    };
    let layout = OciLayout::create(&node.dir.path().join("layout")).unwrap();
    let image = ImageBuilder::new()
        .layer(Layer::new().file("app", "app\n"))
        .build(&layout)
        .unwrap();
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start_with(RegistryOptions {
        basic_auth: Some(Credentials::new("ann", "s3cret")),
        ..Default::default()
    })
    .unwrap();
    let indexed = registry.push(&layout, "v1", "doctor/indexed:v1").unwrap();
    let plain = registry.push(&layout, "v1", "doctor/plain:v1").unwrap();
    let host = registry.host();
    let socket = node.dir.path().join("pronto.sock");

    let good = node.write("good", &socket, true, "s3cret", &host);
    let out = good.output(&[
        "index",
        "create",
        &indexed,
        "--bind",
        "--min-layer-size",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _keeper = good.keeper_guard();
    let mut serve = good
        .serve(&node.dir.path().join("serve.log"), "info")
        .unwrap();

    let (ok, checks) = doctor(&good, &[&indexed]);
    assert!(ok, "{checks:?}");
    let names: Vec<&str> = checks.iter().map(|c| c.0.as_str()).collect();
    for name in [
        "fuse",
        "kernel",
        "proxy-plugin",
        "cri-snapshotter",
        "cri-annotations",
        "socket",
        "keeper",
        "registry",
        "index",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }

    // FUSE missing.
    let (ok, checks) = doctor(&good, &["--fuse-device", "/nonexistent/fuse", &indexed]);
    assert!(!ok);
    assert_eq!(failures(&checks), vec![("fuse", failures(&checks)[0].1)]);
    assert!(failures(&checks)[0].1.contains("modprobe fuse"));

    // The snapshotter socket does not answer.
    let wrong = node.write(
        "wrong-socket",
        &node.dir.path().join("nobody.sock"),
        true,
        "s3cret",
        &host,
    );
    let (ok, checks) = doctor(&wrong, &[&indexed]);
    assert!(!ok);
    let failed = failures(&checks);
    let names: Vec<&str> = failed.iter().map(|f| f.0).collect();
    assert_eq!(names, ["socket", "keeper"], "{failed:?}");
    assert!(failed[0].1.contains("pronto serve"));
    assert!(failed[1].1.contains("pronto serve starts one"));

    // containerd has no proxy plugin (nor CRI settings).
    let bare = node.write("no-plugin", &socket, false, "s3cret", &host);
    let (ok, checks) = doctor(&bare, &[&indexed]);
    assert!(!ok);
    let failed = failures(&checks);
    let names: Vec<&str> = failed.iter().map(|f| f.0).collect();
    assert_eq!(
        names,
        ["proxy-plugin", "cri-snapshotter", "cri-annotations"]
    );
    assert!(failed[0].1.contains("[proxy_plugins.pronto]"));
    assert!(failed[2].1.contains("disable_snapshot_annotations = false"));

    // Bad credentials: the password never shows.
    let bad = node.write("bad-credentials", &socket, true, "wrong-password", &host);
    let out = bad.output(&[
        "doctor",
        "--containerd-config",
        bad.dir().join("containerd.toml").to_str().unwrap(),
        &indexed,
    ]);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("wrong-password"));
    let (ok, checks) = doctor(&bad, &[&indexed]);
    assert!(!ok);
    let failed = failures(&checks);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "registry");
    assert!(failed[0].1.contains("credentials"), "{failed:?}");

    // No index for the image.
    let (ok, checks) = doctor(&good, &[&plain]);
    assert!(!ok);
    let failed = failures(&checks);
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, "index");
    assert_eq!(failed[0].1, format!("pronto index create {plain} --bind"));

    serve.stop();
}
