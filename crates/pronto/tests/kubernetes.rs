//! What the Kubernetes install does on a node, with the real parts:
//! `pronto node install|uninstall` against a running containerd 1.6 whose
//! configuration has settings of its own, then a lazy pull through CRI.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use pronto_testbed::cri::{AuthConfig, Cri};
use pronto_testbed::kubeapi::FakeApiServer;
use pronto_testbed::net::{free_loopback_port, http_get, wait_until};
use pronto_testbed::process::Daemon;
use pronto_testbed::{
    Compression, Containerd, ContainerdOptions, Content, Credentials, CriOptions, ImageBuilder,
    KeeperGuard, Layer, NodeConfig, OciLayout, Prereq, ProntoNode, Registry, RegistryOptions,
    TokenServer, TokenServerOptions, require,
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

/// The data file of the test image (24 MiB, incompressible).
const MODEL: Content = Content::Random {
    seed: 17,
    len: 24 << 20,
};

/// Settings a node's containerd has before Pronto arrives, which the
/// install must keep.
const NODE_SETTINGS: &str = r#"
# Provisioned by the node image; Pronto must keep all of this.
[plugins."io.containerd.grpc.v1.cri".containerd]
  default_runtime_name = "runc"
  snapshotter = "overlayfs"
  disable_snapshot_annotations = true

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.gc.v1.scheduler"]
  pause_threshold = 0.03
  deletion_threshold = 7
"#;

/// Detaches what a test left mounted below its directory when it ends:
/// Pronto's lazy mounts outlive the daemon (the keeper holds them).
struct UnmountBelow(std::path::PathBuf);

impl Drop for UnmountBelow {
    fn drop(&mut self) {
        pronto_testbed::process::unmount_below(&self.0);
    }
}

/// Pushes an image of a busybox layer and a layer holding MODEL as
/// `repo_tag`; returns its reference.
fn push_model_image(layout: &OciLayout, registry: &Registry, repo_tag: &str) -> String {
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat", "sha256sum"]))
        .layer(
            Layer::new()
                .compression(Compression::Gzip(6))
                .file("model/weights.bin", MODEL),
        )
        .build(layout)
        .unwrap();
    let tag = repo_tag.replace(['/', ':'], "-");
    layout.tag(&tag, &image).unwrap();
    registry.push(layout, &tag, repo_tag).unwrap();
    format!("{}/{repo_tag}", registry.host())
}

fn run_pronto(node: &ProntoNode, args: &[&str]) -> std::process::Output {
    node.output(args)
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `pronto node install|uninstall`'s arguments for a test containerd.
fn node_args<'a>(config: &'a str, socket: &'a str, restart: &'a [String]) -> Vec<&'a str> {
    let mut args = vec![
        "--containerd-config",
        config,
        "--containerd-address",
        socket,
        "--restart",
    ];
    args.extend(restart.iter().map(String::as_str));
    args
}

#[test]
fn install_merges_into_containerds_config_restarts_it_and_uninstall_restores_it() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(work.path().to_owned());
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let registry = Registry::start().unwrap();
    let containerd = Containerd::start_with(ContainerdOptions {
        cri: Some(CriOptions {
            // The table is the node's own (NODE_SETTINGS).
            snapshotter: String::new(),
            sandbox_image: "pronto.test/pause:3.9".into(),
        }),
        plain_http_registries: vec![registry.host()],
        extra_config: NODE_SETTINGS.into(),
        supervised: true,
        ..Default::default()
    })
    .unwrap();
    let node = ProntoNode::new(
        work.path(),
        Path::new(env!("CARGO_BIN_EXE_pronto")),
        &NodeConfig {
            hosts_dir: Some(containerd.hosts_dir()),
            ..Default::default()
        },
    )
    .unwrap();
    let _keeper: KeeperGuard = node.keeper_guard();
    let config_path = containerd.config_path();
    let config = config_path.to_str().unwrap();
    let original = std::fs::read_to_string(&config_path).unwrap();
    let restart = containerd.restart_command();
    let socket = containerd.socket();
    let args = node_args(config, socket.to_str().unwrap(), &restart);
    let first_pid = containerd.pid().unwrap();

    // Install: the file gains Pronto's settings and keeps the rest.
    let out = run_pronto(&node, &[&["node", "install"][..], &args].concat());
    assert!(out.status.success(), "{}", text(&out));
    let installed = std::fs::read_to_string(&config_path).unwrap();
    let value: toml::Table = toml::from_str(&installed).unwrap();
    let cri = &value["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
    assert_eq!(cri["snapshotter"].as_str(), Some("pronto"));
    assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
    assert_eq!(cri["default_runtime_name"].as_str(), Some("runc"));
    assert_eq!(
        value["proxy_plugins"]["pronto"]["address"].as_str(),
        node.socket().to_str()
    );
    for line in original.lines().filter(|l| {
        !l.contains("snapshotter = \"overlayfs\"") && !l.contains("disable_snapshot_annotations")
    }) {
        assert!(
            installed.lines().any(|l| l == line),
            "lost {line:?}:\n{installed}"
        );
    }
    let backup = std::fs::read_to_string(format!("{config}.pronto-backup")).unwrap();
    assert_eq!(backup, original);
    // containerd was restarted and came back with the settings it had.
    let second_pid = containerd.pid().unwrap();
    assert_ne!(first_pid, second_pid, "containerd was not restarted");
    let log = std::fs::read_to_string(containerd.dir().join("containerd.log")).unwrap();
    assert!(!log.contains("level=fatal"), "{log}");

    // Installing again changes nothing and restarts nothing.
    let out = run_pronto(&node, &[&["node", "install"][..], &args].concat());
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("already has Pronto's settings"),
        "{}",
        text(&out)
    );
    assert_eq!(containerd.pid(), Some(second_pid));
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), installed);

    // A lazy pull through CRI, as kubelet's.
    let log_path = work.path().join("serve.log");
    let mut serve: Daemon = node.serve(&log_path, "info").unwrap();
    let reference = push_model_image(&layout, &registry, "k8s/model:v1");
    node.ok(&["index", "create", &reference, "--bind"]);
    let cri_client = Cri::connect(&containerd.socket()).unwrap();
    wait_until("CRI pull through Pronto", Duration::from_secs(60), || {
        Ok(cri_client.pull_image(&reference).is_ok())
    })
    .unwrap();
    let serve_log = std::fs::read_to_string(&log_path).unwrap();
    assert!(serve_log.contains("layer mounted lazily"), "{serve_log}");
    serve.stop();

    // An edit made after the install survives the uninstall; the rest of
    // the file is the original again.
    let edited = installed.replace("pause_threshold = 0.03", "pause_threshold = 0.05");
    std::fs::write(&config_path, &edited).unwrap();
    let out = run_pronto(&node, &[&["node", "uninstall"][..], &args].concat());
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(&config_path).unwrap(),
        original.replace("pause_threshold = 0.03", "pause_threshold = 0.05")
    );
    assert!(!Path::new(&format!("{config}.pronto-backup")).exists());
    assert_ne!(
        containerd.pid(),
        Some(second_pid),
        "containerd was not restarted"
    );

    // Installed and uninstalled with no edit in between: byte for byte.
    std::fs::write(&config_path, &original).unwrap();
    for verb in ["install", "uninstall"] {
        let out = run_pronto(&node, &[&["node", verb][..], &args].concat());
        assert!(out.status.success(), "{verb}: {}", text(&out));
    }
    assert_eq!(std::fs::read_to_string(&config_path).unwrap(), original);
}

#[test]
fn a_config_the_installer_cannot_read_is_left_untouched_with_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let node = ProntoNode::new(
        work.path(),
        Path::new(env!("CARGO_BIN_EXE_pronto")),
        &NodeConfig::default(),
    )
    .unwrap();
    let etc = work.path().join("etc-containerd");
    std::fs::create_dir(&etc).unwrap();
    let config = etc.join("config.toml");
    for broken in [
        "version = 2\n[plugins\n",
        "# version 1: no version key\n[plugins.cri]\n  sandbox_image = \"pause\"\n",
    ] {
        std::fs::write(&config, broken).unwrap();
        let out = node.output(&[
            "node",
            "install",
            "--containerd-config",
            config.to_str().unwrap(),
            "--restart",
            "false",
        ]);
        assert!(!out.status.success());
        let said = text(&out);
        assert!(said.contains("was left as it is"), "{said}");
        assert!(
            said.contains("not valid TOML") || said.contains("containerd config migrate"),
            "{said}"
        );
        assert_eq!(std::fs::read_to_string(&config).unwrap(), broken);
        assert!(!etc.join("config.toml.pronto-backup").exists());
    }
}

/// kubelet's side of a private registry: a token-auth registry, no
/// credentials on the node, and a pull secret sent with `PullImage` to
/// Pronto's CRI socket.
#[test]
fn kubelets_pull_credentials_reach_lazy_fetches_and_never_the_logs() {
    require!(NEEDS);
    const PASSWORD: &str = "kubelet-s3cret-pw";
    let work = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(work.path().to_owned());
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let creds = Credentials::new("robot", PASSWORD);
    let tokens = TokenServer::start(TokenServerOptions {
        credentials: Some(creds.clone()),
        ..Default::default()
    })
    .unwrap();
    let registry = Registry::start_with(RegistryOptions {
        token_auth: Some(tokens.auth().clone()),
        push_credentials: Some(creds.clone()),
        ..Default::default()
    })
    .unwrap();
    let socket = work.path().join("pronto.sock");
    let containerd = Containerd::start_with(ContainerdOptions {
        proxy_snapshotters: vec![("pronto".into(), socket)],
        cri: Some(CriOptions {
            snapshotter: "pronto".into(),
            sandbox_image: "pronto.test/pause:3.9".into(),
        }),
        plain_http_registries: vec![registry.host()],
        ..Default::default()
    })
    .unwrap();
    let cri_socket = work.path().join("cri.sock");
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_loopback_port().unwrap()));
    let node = ProntoNode::new(
        work.path(),
        Path::new(env!("CARGO_BIN_EXE_pronto")),
        &NodeConfig {
            hosts_dir: Some(containerd.hosts_dir()),
            metrics_address: Some(metrics),
            cri_address: Some(cri_socket.clone()),
            extra: format!(
                "[cri]\ncontainerd_address = \"{}\"\n",
                containerd.socket().display()
            ),
            ..Default::default()
        },
    )
    .unwrap();
    let _keeper = node.keeper_guard();

    // The publisher has credentials; the node has none.
    let publisher = work.path().join("publisher");
    std::fs::create_dir_all(&publisher).unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("robot:{PASSWORD}"));
    std::fs::write(
        publisher.join("config.json"),
        format!(
            "{{\"auths\": {{\"{}\": {{\"auth\": \"{auth}\"}}}}}}",
            registry.host()
        ),
    )
    .unwrap();
    let reference = push_model_image(&layout, &registry, "team/private:v1");
    let out = node
        .command(&["index", "create", &reference, "--bind"])
        .env("DOCKER_CONFIG", &publisher)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let nothing = work.path().join("no-docker-config");
    std::fs::create_dir_all(&nothing).unwrap();
    let log_path = work.path().join("serve.log");
    let _serve = node
        .serve_with_env(
            &log_path,
            "debug",
            &[("DOCKER_CONFIG", nothing.as_os_str())],
        )
        .unwrap();
    let kubelet = Cri::connect(&cri_socket).unwrap();

    // Wrong credentials: containerd's clear error comes back through Pronto.
    let wrong = kubelet
        .pull_image_with(&reference, Some(auth_config("robot", "not-the-password")))
        .unwrap_err();
    let wrong = format!("{wrong:#}");
    assert!(
        wrong.contains("401") || wrong.contains("nauthorized"),
        "{wrong}"
    );
    assert!(!wrong.contains("not-the-password"), "{wrong}");

    // The pod's pull secret: the image is pulled lazily with it. kubelet
    // retries a pull that failed as unavailable, and so does this test.
    let image_id =
        pull_retrying(|| kubelet.pull_image_with(&reference, Some(auth_config("robot", PASSWORD))));
    assert!(image_id.starts_with("sha256:"), "{image_id}");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("layer mounted lazily"), "{log}");
    // The container reads every byte through lazy fetches that needed
    // the remembered credentials.
    let expected = hex::encode(Sha256::digest(MODEL.to_vec().unwrap()));
    let out = containerd
        .ctr_in("k8s.io")
        .args([
            "run",
            "--rm",
            "--snapshotter",
            "pronto",
            &reference,
            "reader",
        ])
        .args(["sha256sum", "/model/weights.bin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&expected),
        "{}\n{}",
        text(&out),
        log
    );
    // Other calls are forwarded too.
    assert!(
        kubelet
            .list_image_refs()
            .unwrap()
            .iter()
            .any(|r| r.contains("team/private"))
    );

    // Nowhere to be read: logs at debug level, status, metrics.
    let status = node.ok(&["status", "--json"]);
    let (_, scraped) = http_get(metrics, "/metrics").unwrap();
    let log = std::fs::read_to_string(&log_path).unwrap();
    for (what, said) in [("log", &log), ("status", &status), ("metrics", &scraped)] {
        assert!(!said.contains(PASSWORD), "the password is in the {what}");
        assert!(!said.contains(&auth), "the credentials are in the {what}");
    }
}

fn auth_config(username: &str, password: &str) -> AuthConfig {
    AuthConfig {
        username: username.into(),
        password: password.into(),
        ..Default::default()
    }
}

/// The node label follows the daemon's health, and stopping the watcher
/// removes it; stopping because the DaemonSet was deleted also puts
/// containerd's configuration back.
#[test]
fn the_node_label_follows_the_daemon_and_goes_with_the_daemonset() {
    require!(&[Prereq::Root, Prereq::Containerd]);
    const LABEL: &str = "pronto.dev/lazy-pull";
    let work = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(work.path().to_owned());
    let api = FakeApiServer::start("sa-t0ken", &["node-a"]).unwrap();
    api.add_daemonset("pronto-system", "pronto");
    let token = work.path().join("token");
    std::fs::write(&token, "sa-t0ken\n").unwrap();
    // containerd answers the uninstall's restart check.
    let containerd = Containerd::start().unwrap();
    let etc = work.path().join("etc-containerd");
    std::fs::create_dir_all(&etc).unwrap();
    let config = etc.join("config.toml");
    let original = "version = 2\n# the node's own\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause:3.9\"\n";
    let node = ProntoNode::new(
        &work.path().join("node"),
        Path::new(env!("CARGO_BIN_EXE_pronto")),
        &NodeConfig::default(),
    )
    .unwrap();
    let _keeper = node.keeper_guard();
    std::fs::write(&config, original).unwrap();
    let socket = containerd.socket();
    // Installed as the init container does, without a restart.
    let out = node
        .command(&[
            "node",
            "install",
            "--containerd-config",
            config.to_str().unwrap(),
        ])
        .arg("--no-restart")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("[proxy_plugins.pronto]")
    );

    let watch = |daemon_log: &Path| {
        let mut command = node.command(&["node", "watch", "--node", "node-a"]);
        command
            .args(["--interval", "200ms", "--failures", "2"])
            .args([
                "--api-server",
                &api.url(),
                "--token-file",
                token.to_str().unwrap(),
            ])
            .args(["--daemonset", "pronto-system/pronto"])
            .args(["--containerd-config", config.to_str().unwrap()])
            .args([
                "--containerd-address",
                socket.to_str().unwrap(),
                "--restart",
                "true",
            ]);
        Daemon::spawn("pronto node watch", command, daemon_log).unwrap()
    };
    let labelled = |want: bool| {
        wait_until(
            if want {
                "the label is set"
            } else {
                "the label is removed"
            },
            Duration::from_secs(30),
            || Ok(api.labels("node-a").get(LABEL).map(String::as_str) == want.then_some("true")),
        )
    };
    let serve_log = work.path().join("serve.log");
    let watch_log = work.path().join("watch.log");
    let mut serve = node.serve(&serve_log, "info").unwrap();
    let mut watcher = watch(&watch_log);
    labelled(true).unwrap_or_else(|e| panic!("{e}\n{}", watcher.log_tail(20)));
    // The node's other labels are untouched.
    assert_eq!(
        api.labels("node-a")
            .get("kubernetes.io/hostname")
            .map(String::as_str),
        Some("node-a")
    );

    // The daemon dies: the label goes; it comes back with the daemon.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serve.pid().unwrap() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    serve.stop();
    labelled(false).unwrap_or_else(|e| panic!("{e}\n{}", watcher.log_tail(20)));
    let mut serve = node.serve(&serve_log, "info").unwrap();
    labelled(true).unwrap_or_else(|e| panic!("{e}\n{}", watcher.log_tail(20)));

    // Stopped while the DaemonSet exists (an upgrade): label removed,
    // containerd's configuration kept.
    watcher.stop();
    assert_eq!(api.labels("node-a").get(LABEL), None);
    assert!(
        std::fs::read_to_string(&config)
            .unwrap()
            .contains("[proxy_plugins.pronto]")
    );

    // Stopped after the DaemonSet was deleted (an uninstall): label
    // removed and containerd's configuration put back.
    let mut watcher = watch(&watch_log);
    labelled(true).unwrap();
    api.delete_daemonset("pronto-system", "pronto");
    watcher.stop();
    assert_eq!(api.labels("node-a").get(LABEL), None);
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        original,
        "{}",
        watcher.log_tail(20)
    );
    serve.stop();
    // Every call carried the service account's token and was one of the
    // two Pronto makes.
    for request in api.requests() {
        assert!(
            request == "PATCH /api/v1/nodes/node-a"
                || request == "GET /apis/apps/v1/namespaces/pronto-system/daemonsets/pronto",
            "{request}"
        );
    }
}

/// Builds `tests/chart-render` (Go; Helm's template libraries).
fn chart_renderer(dir: &Path) -> std::path::PathBuf {
    let package = dir.join("src/pronto.test/chart-render");
    std::fs::create_dir_all(&package).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/chart-render/main.go"),
        package.join("main.go"),
    )
    .unwrap();
    let binary = dir.join("chart-render");
    let out = std::process::Command::new("go")
        .args(["build", "-o"])
        .arg(&binary)
        .arg(".")
        .current_dir(&package)
        .env("GO111MODULE", "off")
        .env("GOPATH", format!("{}:/usr/share/gocode", dir.display()))
        .env("GOCACHE", dir.join("cache"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    binary
}

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/kubernetes/chart");
const MANIFEST: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../deploy/kubernetes/pronto.yaml"
);

/// The plain manifest: the namespace, then the chart rendered with its
/// defaults as release `pronto` in `pronto-system`.
const MANIFEST_HEAD: &str = "\
# Pronto on every node: `kubectl apply -f deploy/kubernetes/pronto.yaml`.
# Generated from deploy/kubernetes/chart with its default values (the
# kubernetes test checks it; PRONTO_BLESS=1 rewrites it). See
# docs/kubernetes.md.
---
apiVersion: v1
kind: Namespace
metadata:
  name: pronto-system
  labels:
    app.kubernetes.io/name: pronto
    pod-security.kubernetes.io/enforce: privileged
";

fn render(renderer: &Path, json: bool, values: Option<&Path>) -> String {
    let mut command = std::process::Command::new(renderer);
    if json {
        command.arg("-json");
    }
    command.args([CHART, "pronto", "pronto-system"]);
    if let Some(values) = values {
        command.arg(values);
    }
    let out = command.output().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Reads `value` as the Kubernetes type its kind names and writes it back:
/// a field the API does not know, or a value of the wrong type, makes the
/// two differ or the read fail.
fn validate(value: &serde_json::Value) {
    use k8s_openapi::api::{apps::v1 as apps, core::v1 as core, rbac::v1 as rbac};
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(
        value: &serde_json::Value,
    ) -> serde_json::Value {
        let typed: T =
            serde_json::from_value(value.clone()).unwrap_or_else(|e| panic!("{e}: {value:#}"));
        serde_json::to_value(&typed).unwrap()
    }
    let back = match value["kind"].as_str().unwrap() {
        "Namespace" => round_trip::<core::Namespace>(value),
        "ServiceAccount" => round_trip::<core::ServiceAccount>(value),
        "ConfigMap" => round_trip::<core::ConfigMap>(value),
        "ClusterRole" => round_trip::<rbac::ClusterRole>(value),
        "ClusterRoleBinding" => round_trip::<rbac::ClusterRoleBinding>(value),
        "Role" => round_trip::<rbac::Role>(value),
        "RoleBinding" => round_trip::<rbac::RoleBinding>(value),
        "DaemonSet" => round_trip::<apps::DaemonSet>(value),
        "Deployment" => round_trip::<apps::Deployment>(value),
        "Service" => round_trip::<core::Service>(value),
        kind => panic!("unexpected kind {kind}"),
    };
    assert_eq!(&back, value, "not as the Kubernetes API reads it");
}

#[test]
fn the_manifests_and_the_chart_render_and_validate_against_the_kubernetes_api() {
    require!(&[Prereq::ChartTemplates]);
    let work = tempfile::tempdir().unwrap();
    let renderer = chart_renderer(work.path());
    let node = ProntoNode::new(
        &work.path().join("node"),
        Path::new(env!("CARGO_BIN_EXE_pronto")),
        &NodeConfig::default(),
    )
    .unwrap();

    // The plain manifest is the chart with its defaults.
    let expected = format!("{MANIFEST_HEAD}{}", render(&renderer, false, None));
    if std::env::var_os("PRONTO_BLESS").is_some() {
        std::fs::write(MANIFEST, &expected).unwrap();
    }
    assert_eq!(
        std::fs::read_to_string(MANIFEST).unwrap_or_default(),
        expected,
        "deploy/kubernetes/pronto.yaml is not the chart's rendering; PRONTO_BLESS=1 rewrites it"
    );

    let custom = work.path().join("values.yaml");
    std::fs::write(
        &custom,
        "nodeSelector: {pool: gpu}\nroot: /data/pronto\nextraConfig: |\n  [fetch]\n  background = false\nwarm:\n  images: [registry.example/app:v1, {image: registry.example/model:v2, mode: full}]\n  hub: {enabled: true, tokenSecret: hub-token}\n",
    )
    .unwrap();
    for values in [None, Some(custom.as_path())] {
        let docs: Vec<serde_json::Value> = render(&renderer, true, values)
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let namespace = serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "pronto-system"},
        });
        validate(&namespace);
        for doc in &docs {
            validate(doc);
        }
        let find = |kind: &str, name: &str| {
            docs.iter()
                .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("no {kind} {name}"))
        };

        // The configuration Pronto reads in the pod is valid.
        let config = find("ConfigMap", "pronto-config")["data"]["config.toml"]
            .as_str()
            .unwrap();
        let config_path = work.path().join("pod-config.toml");
        std::fs::write(&config_path, config).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pronto"))
            .arg("--config")
            .arg(&config_path)
            .args(["config", "check"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{config}\n{}", text(&out));

        if values.is_some() {
            assert!(
                config.contains("hub = \"http://pronto-warm-hub.pronto-system:8090\"")
                    && config
                        .contains("{ image = \"registry.example/model:v2\", mode = \"full\" }"),
                "{config}"
            );
            find("Service", "pronto-warm-hub");
        } else {
            assert!(!config.contains("[warm]"), "{config}");
        }
        let workloads: &[(&str, &str)] = if values.is_some() {
            &[
                ("DaemonSet", "pronto"),
                ("DaemonSet", "pronto-keeper"),
                ("Deployment", "pronto-warm-hub"),
            ]
        } else {
            &[("DaemonSet", "pronto"), ("DaemonSet", "pronto-keeper")]
        };
        // Every container's arguments are ones `pronto` takes.
        for (kind, name) in workloads {
            let spec = &find(kind, name)["spec"]["template"]["spec"];
            let containers = spec["containers"].as_array().unwrap().iter();
            let init = spec["initContainers"].as_array().into_iter().flatten();
            for container in containers.chain(init) {
                let args: Vec<String> = container["args"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|a| {
                        a.as_str()
                            .unwrap()
                            .replace("$(POD_NAMESPACE)", "pronto-system")
                    })
                    .collect();
                let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
                // `--help` after the flags checks them without running
                // anything; `--restart` takes all that follows.
                let at = args
                    .iter()
                    .position(|a| *a == "--restart")
                    .unwrap_or(args.len());
                args.insert(at, "--help");
                let out = node.output(&args);
                assert!(out.status.success(), "{args:?}: {}", text(&out));
            }
        }

        // What the node needs: FUSE, the containerd socket and config, and
        // Pronto's directories shared with the host both ways.
        let daemon = &find("DaemonSet", "pronto")["spec"]["template"]["spec"];
        let serve = &daemon["containers"][0];
        assert_eq!(serve["name"], "pronto");
        assert_eq!(serve["securityContext"]["privileged"], true);
        assert_eq!(daemon["hostPID"], true);
        let mounts = serve["volumeMounts"].as_array().unwrap();
        let mounted = |path: &str| mounts.iter().find(|m| m["mountPath"] == path);
        assert!(mounted("/dev/fuse").is_some());
        assert!(mounted("/run/containerd").is_some());
        for shared in [
            if values.is_some() {
                "/data/pronto"
            } else {
                "/var/lib/pronto"
            },
            "/run/pronto",
        ] {
            assert_eq!(
                mounted(shared).unwrap_or_else(|| panic!("{shared}"))["mountPropagation"],
                "Bidirectional"
            );
        }
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(
                serve[probe]["exec"]["command"],
                serde_json::json!(["/usr/bin/pronto", "status"])
            );
        }
        // Upgrades roll the daemon and never the keeper.
        assert_eq!(
            find("DaemonSet", "pronto")["spec"]["updateStrategy"]["type"],
            "RollingUpdate"
        );
        assert_eq!(
            find("DaemonSet", "pronto-keeper")["spec"]["updateStrategy"]["type"],
            "OnDelete"
        );
        // The service account may patch nodes (the label) and read its own
        // DaemonSet; nothing else.
        assert_eq!(
            find("ClusterRole", "pronto-node-label")["rules"],
            serde_json::json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}])
        );
        if values.is_some() {
            assert_eq!(daemon["nodeSelector"], serde_json::json!({"pool": "gpu"}));
            assert!(config.contains("background = false"), "{config}");
        }
    }
}

/// Images buildah keeps, removed (with their containers) when the test
/// ends, passed or not.
struct Images(Vec<String>);

impl Drop for Images {
    fn drop(&mut self) {
        for image in &self.0 {
            let _ = std::process::Command::new("buildah")
                .args(["rmi", "--force", image])
                .output();
        }
    }
}

/// Runs `buildah ARGS`, failing the test with its output.
fn buildah(args: &[&str]) -> String {
    // At the lowest CPU priority: the build (a release build of Pronto on
    // a fresh machine) must not starve the daemons of the tests running
    // beside it, whose containerd gives up dialing a slow socket.
    let out = std::process::Command::new("nice")
        .args(["-n", "19", "buildah"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "buildah {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The Containerfile builds (both stages, with buildah, as on any Debian
/// 12 machine), the image holds only `pronto` and its libraries, and it
/// runs from the registry through containerd.
#[test]
fn the_containerfile_builds_an_image_that_runs_pronto_from_the_registry() {
    require!(&[
        Prereq::Root,
        Prereq::Buildah,
        Prereq::Debootstrap,
        Prereq::Containerd,
        Prereq::Runc,
        Prereq::Registry
    ]);
    let repo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."));
    // The first stage's image, as `rust:1.95-bookworm` would be: Debian
    // with a C toolchain (debootstrap, cached) and this machine's Rust
    // toolchain bound in at the official image's paths. This machine
    // reaches Debian's and crates.io's registries, not Docker Hub.
    let root = pronto_testbed::debian::bookworm_for_building().unwrap();
    let suffix = std::process::id();
    let builder = format!("localhost/pronto-test-rust:{suffix}");
    let image = format!("localhost/pronto-test:{suffix}");
    let _images = Images(vec![builder.clone(), image.clone()]);
    let working = buildah(&["from", "scratch"]);
    buildah(&["copy", "--quiet", &working, root.to_str().unwrap(), "/"]);
    buildah(&[
        "config",
        "--env",
        "PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--env",
        "CARGO_HOME=/usr/local/cargo",
        "--env",
        "RUSTUP_HOME=/usr/local/rustup",
        &working,
    ]);
    buildah(&["commit", "--quiet", "--rm", &working, &builder]);
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let rustup = std::env::var("RUSTUP_HOME").unwrap_or_else(|_| format!("{home}/.rustup"));
    let cargo = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo"));
    // The build's target directory is kept between runs on this machine.
    let target = pronto_testbed::debian::cache_dir().join("containerfile-target");
    std::fs::create_dir_all(&target).unwrap();
    let built = std::process::Command::new("buildah")
        .args(["build", "--network", "host", "--layers=false"])
        .arg(format!("--build-arg=RUST_IMAGE={builder}"))
        .arg(format!("--volume={rustup}:/usr/local/rustup:ro"))
        .arg(format!("--volume={cargo}:/usr/local/cargo"))
        .arg(format!("--volume={}:/src/target", target.display()))
        .args(["-f", "Containerfile", "-t", &image, "."])
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(built.status.success(), "{}", text(&built));

    // Only the binary and the libraries it loads (and empty directories).
    let mounted = buildah(&["from", &image]);
    let files = {
        let dir = buildah(&["mount", &mounted]);
        let mut files = Vec::new();
        let mut stack = vec![std::path::PathBuf::from(&dir)];
        while let Some(path) = stack.pop() {
            for entry in std::fs::read_dir(&path).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_dir() {
                    stack.push(entry.path());
                } else {
                    let rel = entry.path().strip_prefix(&dir).unwrap().to_owned();
                    files.push(rel.display().to_string());
                }
            }
        }
        buildah(&["umount", &mounted]);
        buildah(&["rm", &mounted]);
        files
    };
    assert!(files.contains(&"usr/bin/pronto".to_owned()), "{files:?}");
    for file in &files {
        assert!(
            file == "usr/bin/pronto"
                || (file.starts_with("lib") || file.starts_with("usr/lib")) && file.contains(".so"),
            "the image holds {file}: {files:?}"
        );
    }

    // Started as the DaemonSet starts it: `pronto ARGS`.
    assert_eq!(
        buildah(&[
            "inspect",
            "--format",
            "{{.OCIv1.Config.Entrypoint}} {{.OCIv1.Config.Cmd}}",
            &image
        ]),
        "[/usr/bin/pronto] [serve]"
    );

    // Pushed to the registry and run by containerd.
    let registry = Registry::start().unwrap();
    let pushed = format!("{}/pronto:test", registry.host());
    buildah(&[
        "push",
        "--quiet",
        "--tls-verify=false",
        &image,
        &format!("docker://{pushed}"),
    ]);
    let containerd = Containerd::start_with(ContainerdOptions {
        plain_http_registries: vec![registry.host()],
        ..Default::default()
    })
    .unwrap();
    containerd.pull(&pushed, "overlayfs").unwrap();
    let out = containerd
        .ctr()
        .args([
            "run",
            "--rm",
            &pushed,
            "pronto-version",
            "/usr/bin/pronto",
            "--version",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("pronto {}", env!("CARGO_PKG_VERSION"))
    );
}

/// `pull` until it succeeds, at most three times, as kubelet retries a pull
/// that failed as unavailable (containerd 1.6 gives up dialing a proxy
/// snapshotter after about a second on a loaded machine).
fn pull_retrying(pull: impl Fn() -> anyhow::Result<String>) -> String {
    let mut attempt = 1;
    loop {
        match pull() {
            Ok(id) => return id,
            Err(e) if attempt < 3 && format!("{e:#}").contains("unavailable") => {
                eprintln!("pull attempt {attempt} failed, retrying: {e:#}");
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            Err(e) => panic!("{e:#}"),
        }
    }
}
