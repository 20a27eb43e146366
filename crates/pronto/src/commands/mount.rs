//! `pronto mount` and `pronto umount`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use pronto_catalog::LocalIndexStore;
use pronto_fs::{LayerMode, LayerSource, MountOptions, NodeContext, Tree, TreeMode, open_image};
use pronto_registry::Platform;
use pronto_store::ContentCache;

use crate::commands::image::registry_client;
use crate::config::Config;

pub fn run(
    config: &Config,
    reference: &str,
    dir: &Path,
    platform: &str,
    layer: Option<&str>,
) -> Result<()> {
    let platform: Platform = platform.parse().map_err(|e: String| anyhow!(e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    let client = registry_client(config)?;
    let store = LocalIndexStore::open(&config.root)?;
    let cache = Arc::new(open_cache(config)?);
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    // Resolved before mounting: afterwards it would ask the mount itself.
    let canonical_dir =
        std::fs::canonicalize(dir).with_context(|| format!("no directory {}", dir.display()))?;
    let node = NodeContext {
        client: &client,
        store: &store,
        cache: cache.clone(),
        layers_dir: config.root.join("layers"),
        runtime: runtime.handle().clone(),
        shutdown,
    };
    let opened = runtime.block_on(open_image(&node, reference, &platform))?;
    let sources: Vec<Arc<dyn LayerSource>> = opened
        .layers
        .iter()
        .map(|l| l.clone() as Arc<dyn LayerSource>)
        .collect();
    let (tree, sources) = match layer {
        None => {
            let entries: Vec<&[pronto_index::Entry]> =
                sources.iter().map(|s| s.entries()).collect();
            (Tree::build(&entries, TreeMode::Merged), sources)
        }
        Some(digest) => {
            let Some(source) = sources.iter().find(|s| s.digest() == digest) else {
                bail!("image {reference} has no layer {digest}");
            };
            (
                Tree::build(&[source.entries()], TreeMode::OverlayLower),
                vec![source.clone()],
            )
        }
    };
    let mut session = pronto_fs::mount(
        tree,
        sources,
        cache,
        dir,
        &MountOptions {
            fs_name: format!("pronto:{reference}"),
            ..Default::default()
        },
    )
    .with_context(|| format!("mount FUSE at {}", dir.display()))?;
    let lazy = opened
        .modes
        .iter()
        .filter(|m| **m == LayerMode::Lazy)
        .count();
    eprintln!(
        "mounted {reference} ({}) at {}: {lazy} of {} layers lazy{}",
        opened.image.manifest.digest,
        dir.display(),
        opened.modes.len(),
        match &opened.index_set {
            Some(set) => format!(", index {} ({})", set.manifest_digest, set.location),
            None => ", no index: every layer was fetched whole".to_owned(),
        }
    );
    if config.fetch.background {
        let rate = config.fetch.rate();
        for (layer, mode) in opened.layers.iter().zip(&opened.modes) {
            if *mode != LayerMode::Lazy {
                continue;
            }
            let layer = layer.clone();
            runtime.spawn(async move {
                if let Err(err) = layer.fetch_in_background(4 << 20, rate).await {
                    tracing::error!("background fetch stopped: {err}");
                }
            });
        }
    }
    // When the mount disappears (pronto umount, umount -l, an abort), tell
    // reads still waiting on the network to give up, so this process exits.
    let watched = canonical_dir;
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            if !is_mounted(&watched) {
                let _ = shutdown_tx.send(true);
                return;
            }
        }
    });
    let mut unmounter = session.unmount_callable();
    runtime.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("signal received; unmounting");
        if let Err(e) = unmounter.unmount() {
            tracing::error!("unmount failed: {e}");
        }
    });
    session.run().context("serve the FUSE mount")?;
    Ok(())
}

pub fn open_cache(config: &Config) -> Result<ContentCache> {
    ContentCache::open(&config.root, config.cache.budget_bytes()).with_context(|| {
        format!(
            "open the node cache under {} (only one pronto process can use it at a time)",
            config.root.display()
        )
    })
}

/// Unmounts a `pronto mount` at `dir`: detaches it, then aborts its FUSE
/// connection so that readers blocked on the network return at once.
pub fn unmount(dir: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir =
        std::fs::canonicalize(dir).with_context(|| format!("no directory {}", dir.display()))?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    // A FUSE mount whose source is the `pronto:<reference>` we name mounts.
    let is_pronto = mountinfo.lines().any(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let after = fields.iter().position(|f| *f == "-");
        let field = |offset: usize| {
            after
                .and_then(|i| fields.get(i + offset))
                .copied()
                .unwrap_or("")
        };
        fields.get(4).copied() == dir.to_str()
            && field(1).starts_with("fuse")
            && field(2).starts_with("pronto:")
    });
    if !is_pronto {
        bail!("{} is not a pronto mount", dir.display());
    }
    let dev = std::fs::metadata(&dir).map(|m| m.dev()).ok();
    nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("unmount {}", dir.display()))?;
    if let Some(dev) = dev {
        abort_connection(dev, &mountinfo);
    }
    println!("unmounted {}", dir.display());
    Ok(())
}

/// Aborts the FUSE connection of the mount whose device is `dev`, so that
/// requests still waiting on the daemon (a read stuck on a stalled
/// registry) fail at once. Mounts the fusectl filesystem if needed.
fn abort_connection(dev: u64, mountinfo: &str) {
    let connections = Path::new("/sys/fs/fuse/connections");
    let fusectl_mounted = mountinfo
        .lines()
        .any(|line| line.split(' ').nth(4) == Some("/sys/fs/fuse/connections"));
    if !fusectl_mounted && connections.is_dir() {
        let mounted = nix::mount::mount(
            Some("fusectl"),
            connections,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        if let Err(err) = mounted {
            tracing::warn!("cannot mount fusectl to abort the connection: {err}");
            return;
        }
    }
    // Anonymous devices have major 0, so the connection is named by minor.
    let abort = connections
        .join(nix::sys::stat::minor(dev).to_string())
        .join("abort");
    if let Err(err) = std::fs::write(&abort, "1") {
        // Gone already when nothing held the mount open.
        tracing::debug!("cannot abort FUSE connection {}: {err}", abort.display());
    }
}

/// True while `dir` (an absolute, resolved path) is a mount point.
fn is_mounted(dir: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines()
            .any(|line| line.split(' ').nth(4) == dir.to_str())
    })
}
