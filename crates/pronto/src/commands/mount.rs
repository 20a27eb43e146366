//! `pronto mount` and `pronto umount`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use pronto_catalog::LocalIndexStore;
use pronto_fs::{
    FuseMount, LayerMode, LayerSource, MountOptions, NodeContext, Tree, TreeMode, mounts,
    open_image,
};
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
    let runtime = super::runtime()?;
    let client = registry_client(config)?;
    let store = LocalIndexStore::open(&config.root)?;
    let cache = Arc::new(open_cache(config)?);
    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    // Resolved before mounting: afterwards it would ask the mount itself.
    let canonical_dir =
        std::fs::canonicalize(dir).with_context(|| format!("no directory {}", dir.display()))?;
    let trust = config.index.trust();
    let node = NodeContext {
        client: &client,
        store: &store,
        trust: &trust,
        cache: cache.clone(),
        layers_dir: config.root.join("layers"),
        runtime: runtime.handle().clone(),
        shutdown,
        read_timeout: config.fetch.read_timeout(),
        read_ahead: config.fetch.read_ahead(),
        scheduler: Arc::default(),
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
    let mount = FuseMount::mount(
        tree,
        sources,
        cache,
        dir,
        &MountOptions::new(format!("pronto:{reference}"), runtime.handle().clone()),
    )
    .with_context(|| format!("mount FUSE at {}", dir.display()))?;
    for refused in &opened.refused {
        eprintln!("not used: {refused}");
    }
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
        match (&opened.index_set, lazy) {
            (Some(set), _) => format!(", index {} ({})", set.manifest_digest, set.location),
            (None, 0) => ", no index: every layer was fetched whole".to_owned(),
            (None, _) => ", chunked layers read through their own tables of contents".to_owned(),
        }
    );
    if config.fetch.background {
        for (layer, mode) in opened.layers.iter().zip(&opened.modes) {
            if *mode == LayerMode::Lazy {
                layer.start_background_fetch(config.fetch.rate());
            }
        }
    }
    // When the mount disappears (pronto umount, umount -l, an abort), tell
    // reads still waiting on the network to give up, so this process exits.
    let watched = canonical_dir;
    runtime.spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            if !mounts::is_mounted(&watched) {
                let _ = shutdown_tx.send(true);
                return;
            }
        }
    });
    let unmounted = dir.to_owned();
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
        if let Err(e) = mounts::detach_and_abort(&unmounted) {
            tracing::error!("unmount failed: {e}");
        }
    });
    runtime.block_on(mount.serve());
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
    let dir =
        std::fs::canonicalize(dir).with_context(|| format!("no directory {}", dir.display()))?;
    if !mounts::is_pronto_mount(&dir) {
        bail!("{} is not a pronto mount", dir.display());
    }
    mounts::detach_and_abort(&dir).with_context(|| format!("unmount {}", dir.display()))?;
    println!("unmounted {}", dir.display());
    Ok(())
}
