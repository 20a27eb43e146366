//! `pronto serve`: the node daemon. containerd reaches it as the proxy
//! snapshotter `pronto`.

use std::sync::Arc;

use anyhow::{Context, Result};
use pronto_catalog::LocalIndexStore;
use pronto_snapshotter::{
    LocalSnapshots, Remote, RemoteOptions, Snapshotter, StatusService, WholeLayers,
};

use crate::commands::image::registry_client;
use crate::commands::mount::open_cache;
use crate::config::Config;
use crate::metrics_endpoint;

pub fn run(config: &Config) -> Result<()> {
    let runtime = super::runtime()?;
    let client = registry_client(config)?;
    let whole_client = client.clone();
    let store = LocalIndexStore::open(&config.root)?;
    let cache = Arc::new(open_cache(config)?);
    let snapshots_root = config.root.join("snapshotter");
    let local = Arc::new(
        LocalSnapshots::open(&snapshots_root)
            .with_context(|| format!("open snapshots under {}", snapshots_root.display()))?,
    );
    let remote = Arc::new(Remote::new(
        client,
        store,
        cache.clone(),
        config.root.join("layers"),
        runtime.handle().clone(),
        RemoteOptions {
            background: config.fetch.background,
            background_rate: config.fetch.rate(),
            trust: config.index.trust(),
            read_timeout: config.fetch.read_timeout(),
            read_ahead: config.fetch.read_ahead(),
        },
    ));
    let whole = config.pull.parallel.then(|| {
        Arc::new(WholeLayers::new(
            whole_client,
            config.root.join("layers"),
            config.pull.settings(),
        ))
    });
    let snapshotter = Snapshotter {
        local: local.clone(),
        remote: Some(remote.clone()),
        whole,
    };
    let status = StatusService {
        remote: remote.clone(),
        cache,
    };
    let metrics_address = config
        .metrics_socket()
        .map_err(|problem| anyhow::anyhow!("metrics_address {problem}"))?;
    runtime.block_on(async {
        let (stop, mut stopping) = tokio::sync::watch::channel(false);
        let metrics = match metrics_address {
            Some(address) => {
                let stopped = async move {
                    let _ = stopping.wait_for(|stop| *stop).await;
                };
                Some(metrics_endpoint::bind(address, stopped).await?)
            }
            None => None,
        };
        // Lazy layers of existing snapshots come back before containerd is
        // answered, so no overlay is ever built on an empty directory.
        let failed = remote.restore(&local).await;
        if !failed.is_empty() {
            tracing::error!(
                "{} lazy layers could not be mounted again; they are retried when used",
                failed.len()
            );
        }
        tracing::info!(
            address = %config.address.display(),
            root = %config.root.display(),
            lazy_layers = remote.mounted_count(),
            "serving containerd's snapshots API"
        );
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("signal received; stopping");
            let _ = stop.send(true);
        };
        let served =
            pronto_snapshotter::serve(snapshotter, Some(status), &config.address, shutdown)
                .await
                .with_context(|| format!("serve on {}", config.address.display()));
        // Also when serving failed without a signal.
        let _ = stop.send(true);
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        served
    })?;
    let counts = remote.fallback_counts();
    if !counts.is_empty() {
        let summary: Vec<String> = counts
            .iter()
            .map(|(reason, n)| format!("{}={n}", reason.as_str()))
            .collect();
        tracing::info!("fallbacks while running: {}", summary.join(" "));
    }
    remote.release_all();
    let _ = std::fs::remove_file(&config.address);
    Ok(())
}
