//! `pronto doctor [REF]`: why is (or would) an image not be pulled lazily?
//! One line per check, each failure with a fix; exit status 1 when
//! something is wrong.

use std::path::{Path, PathBuf};

use anyhow::Result;
use pronto_catalog::{LocalIndexStore, find_trusted};
use pronto_registry::{Platform, Repository, parse_reference};
use serde_json::json;

use crate::commands::image::registry_client;
use crate::config::Config;

/// The result of one check.
#[derive(Debug)]
struct Check {
    name: &'static str,
    ok: bool,
    /// What was found.
    detail: String,
    /// How to fix it (failures only).
    hint: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            ok: true,
            detail: detail.into(),
            hint: None,
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            name,
            ok: false,
            detail: detail.into(),
            hint: Some(hint.into()),
        }
    }
}

#[derive(Debug)]
pub struct DoctorArgs {
    pub reference: Option<String>,
    pub json: bool,
    pub containerd_config: PathBuf,
    pub fuse_device: PathBuf,
    pub platform: String,
}

pub fn run(config: &Config, args: &DoctorArgs) -> Result<bool> {
    let runtime = super::runtime()?;
    let mut checks = vec![fuse(&args.fuse_device), kernel()];
    checks.extend(containerd_config(&args.containerd_config, &config.address));
    checks.push(runtime.block_on(socket(&config.address)));
    checks.push(keeper(&config.keeper_socket()));
    if let Some(reference) = &args.reference {
        checks.extend(runtime.block_on(image(config, reference, &args.platform)));
    }
    let healthy = checks.iter().all(|c| c.ok);
    if args.json {
        let report: Vec<_> = checks
            .iter()
            .map(|c| json!({"check": c.name, "ok": c.ok, "detail": c.detail, "hint": c.hint}))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"ok": healthy, "checks": report}))?
        );
    } else {
        for c in &checks {
            let mark = if c.ok { "ok  " } else { "FAIL" };
            println!("{mark} {:<18} {}", c.name, c.detail);
            if let Some(hint) = &c.hint {
                println!("     {:<18} fix: {hint}", "");
            }
        }
    }
    Ok(healthy)
}

fn fuse(device: &Path) -> Check {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
    {
        Ok(_) => Check::pass("fuse", format!("{} opens", device.display())),
        Err(e) => Check::fail(
            "fuse",
            format!("cannot open {}: {e}", device.display()),
            "load the module (modprobe fuse), install fuse3, and run as root (in a container: --device /dev/fuse)",
        ),
    }
}

/// FUSE passthrough (Linux 6.9+) lets fully fetched files bypass the
/// daemon; Pronto works without it, so this never fails.
fn kernel() -> Check {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim();
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if (major, minor) >= (6, 9) {
        Check::pass(
            "kernel",
            format!("Linux {release}: FUSE passthrough available"),
        )
    } else {
        Check::pass(
            "kernel",
            format!(
                "Linux {release}: no FUSE passthrough (6.9+); local files are served by the daemon"
            ),
        )
    }
}

/// containerd's config: the proxy plugin and the CRI settings.
fn containerd_config(path: &Path, address: &Path) -> Vec<Check> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            return vec![Check::fail(
                "containerd-config",
                format!("cannot read {}: {e}", path.display()),
                "point --containerd-config at containerd's config file",
            )];
        }
    };
    let value: toml::Value = match toml::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return vec![Check::fail(
                "containerd-config",
                format!("{} is not valid TOML: {}", path.display(), e.message()),
                "fix the file; containerd will not start with it either",
            )];
        }
    };
    let mut checks = Vec::new();
    let plugin = value.get("proxy_plugins").and_then(|p| p.get("pronto"));
    let plugin_address = plugin
        .and_then(|p| p.get("address"))
        .and_then(|a| a.as_str());
    let snippet = format!(
        "add [proxy_plugins.pronto] type = \"snapshot\" address = \"{}\" to {} and restart containerd (deploy/containerd/)",
        address.display(),
        path.display()
    );
    checks.push(match (plugin, plugin_address) {
        (None, _) => Check::fail("proxy-plugin", "no [proxy_plugins.pronto]", snippet),
        (Some(p), _) if p.get("type").and_then(|t| t.as_str()) != Some("snapshot") => Check::fail(
            "proxy-plugin",
            "[proxy_plugins.pronto] is not type \"snapshot\"",
            snippet,
        ),
        (Some(_), Some(a)) if Path::new(a) == address => {
            Check::pass("proxy-plugin", format!("[proxy_plugins.pronto] at {a}"))
        }
        (Some(_), a) => Check::fail(
            "proxy-plugin",
            format!(
                "[proxy_plugins.pronto] address is {}, Pronto listens on {}",
                a.unwrap_or("missing"),
                address.display()
            ),
            "make containerd's address and Pronto's `address` key the same",
        ),
    });
    // containerd 1.6/1.7 (version 2) and 2.x (version 3) keep CRI's
    // snapshotter settings in different tables.
    let plugins = value.get("plugins");
    let cri = plugins
        .and_then(|p| p.get("io.containerd.grpc.v1.cri"))
        .and_then(|c| c.get("containerd"))
        .or_else(|| plugins.and_then(|p| p.get("io.containerd.cri.v1.images")));
    let snapshotter = cri
        .and_then(|c| c.get("snapshotter"))
        .and_then(|s| s.as_str());
    checks.push(if snapshotter == Some("pronto") {
        Check::pass("cri-snapshotter", "CRI unpacks into pronto")
    } else {
        Check::fail(
            "cri-snapshotter",
            format!("CRI snapshotter is {}", snapshotter.unwrap_or("the default (overlayfs)")),
            "set snapshotter = \"pronto\" in [plugins.\"io.containerd.grpc.v1.cri\".containerd] (2.x: [plugins.\"io.containerd.cri.v1.images\"])",
        )
    });
    let annotations = cri
        .and_then(|c| c.get("disable_snapshot_annotations"))
        .and_then(|d| d.as_bool());
    checks.push(if annotations == Some(false) {
        Check::pass("cri-annotations", "CRI passes image labels to the snapshotter")
    } else {
        Check::fail(
            "cri-annotations",
            "disable_snapshot_annotations is not false: Pronto cannot tell which image a layer belongs to",
            "set disable_snapshot_annotations = false next to snapshotter = \"pronto\"",
        )
    });
    checks
}

/// The snapshotter socket answers containerd's snapshots API.
async fn socket(address: &Path) -> Check {
    use containerd_client::services::v1::snapshots::ListSnapshotsRequest;
    use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
    let hint = "start the daemon: systemctl start pronto (or pronto serve)";
    let channel = match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        containerd_client::connect(address),
    )
    .await
    {
        Ok(Ok(channel)) => channel,
        Ok(Err(e)) => {
            return Check::fail(
                "socket",
                format!("cannot connect to {}: {e}", address.display()),
                hint,
            );
        }
        Err(_) => {
            return Check::fail(
                "socket",
                format!("{} does not answer", address.display()),
                hint,
            );
        }
    };
    let listed = SnapshotsClient::new(channel)
        .list(ListSnapshotsRequest {
            snapshotter: "pronto".into(),
            filters: Vec::new(),
        })
        .await;
    match listed {
        Ok(_) => Check::pass("socket", format!("{} answers", address.display())),
        Err(status) => Check::fail(
            "socket",
            format!("{}: {}", address.display(), status.message()),
            hint,
        ),
    }
}

/// The keeper that holds the lazy mounts while the daemon restarts.
fn keeper(socket: &Path) -> Check {
    match pronto_snapshotter::keeper::KeeperClient::connect(socket) {
        Ok(_) => Check::pass(
            "keeper",
            format!(
                "{} answers: lazy mounts survive restarts of pronto serve",
                socket.display()
            ),
        ),
        Err(e) => Check::fail(
            "keeper",
            format!("no keeper at {}: {e}", socket.display()),
            "pronto serve starts one; without it, restarting the daemon breaks running containers' lazy mounts (see docs/operations.md)",
        ),
    }
}

/// The registry, the credentials and the index of one image.
async fn image(config: &Config, reference: &str, platform: &str) -> Vec<Check> {
    let client = match registry_client(config) {
        Ok(c) => c,
        Err(e) => {
            return vec![Check::fail(
                "registry",
                format!("{e:#}"),
                "fix [registry] in the configuration",
            )];
        }
    };
    let platform: Platform = match platform.parse() {
        Ok(p) => p,
        Err(e) => return vec![Check::fail("registry", e, "use --platform OS/ARCH")],
    };
    let parsed = match parse_reference(reference) {
        Ok(r) => r,
        Err(e) => {
            return vec![Check::fail(
                "registry",
                e.to_string(),
                "give an image reference like registry/repo:tag",
            )];
        }
    };
    let resolved = match client.resolve(&parsed, &platform).await {
        Ok(r) => r,
        Err(e) => {
            let text = e.to_string();
            let hint = if text.contains("401")
                || text.contains("403")
                || text.to_lowercase().contains("auth")
            {
                "check the credentials for this registry in docker's config.json (docker login; the file is registry.docker_config, else $DOCKER_CONFIG/config.json or ~/.docker/config.json)"
            } else {
                "check that the registry is reachable from this node (hosts.toml mirrors, network, the reference)"
            };
            return vec![Check::fail("registry", text, hint)];
        }
    };
    let mut checks = vec![Check::pass(
        "registry",
        format!("{reference} resolves to {}", resolved.manifest.digest),
    )];
    let repository = Repository::of(&parsed);
    let store = match LocalIndexStore::open(&config.root) {
        Ok(store) => store,
        Err(e) => {
            checks.push(Check::fail(
                "index",
                format!("cannot open the local index store: {e}"),
                "check that `root` is writable by Pronto",
            ));
            return checks;
        }
    };
    let chunked = resolved
        .image
        .layers()
        .iter()
        .filter(|l| {
            l.annotations()
                .as_ref()
                .is_some_and(|a| a.contains_key(pronto_toc::TOC_DIGEST_ANNOTATION))
        })
        .count();
    if chunked > 0 {
        checks.push(Check::pass(
            "index",
            format!(
                "{chunked} of {} layers are chunked (eStargz): read lazily through their own tables of contents",
                resolved.image.layers().len()
            ),
        ));
        if chunked == resolved.image.layers().len() {
            return checks;
        }
    }
    let trust = config.index.trust();
    let bind_hint = format!("pronto index create {reference} --bind");
    checks.push(
        match find_trusted(
            &client,
            &store,
            &repository,
            &resolved.manifest.digest,
            resolved.index.as_ref(),
            &trust,
        )
        .await
        {
            Ok(found) => match (found.set, found.refused) {
                (Some(set), _) => Check::pass(
                    "index",
                    format!(
                        "index {} ({}) covers {} of {} layers",
                        set.manifest_digest,
                        set.location,
                        set.layers.len(),
                        resolved.image.layers().len()
                    ),
                ),
                (None, refused) if !refused.is_empty() => Check::fail(
                    "index",
                    format!("an index exists but is not used: {}", refused.join("; ")),
                    bind_hint,
                ),
                (None, _) => Check::fail(
                    "index",
                    format!("no Pronto index for {reference}: it will be pulled whole"),
                    bind_hint,
                ),
            },
            Err(e) => Check::fail(
                "index",
                format!("cannot look up indexes: {e}"),
                "check that the registry serves the referrers API or its tag fallback",
            ),
        },
    );
    checks
}
