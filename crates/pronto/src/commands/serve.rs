//! `pronto serve`: the node daemon. containerd reaches it as the proxy
//! snapshotter `pronto`.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use pronto_catalog::LocalIndexStore;
use pronto_fs::profile::ProfileStore;
use pronto_snapshotter::keeper::{self, Holders, KeeperClient};
use pronto_snapshotter::systemd::Notifier;
use pronto_snapshotter::{
    LocalSnapshots, Profiles, Remote, RemoteOptions, Snapshotter, StatusService, WholeLayers,
};

use pronto_containerd::cri::KubeletCredentials;

use crate::commands::image::registry_client_with;
use crate::commands::mount::open_cache;
use crate::config::Config;
use crate::metrics_endpoint;
use crate::warm::WarmEngine;

pub fn run(config: &Config, config_path: Option<&Path>) -> Result<()> {
    let runtime = super::runtime()?;
    let kubelet_credentials = (!config.cri_address.is_empty())
        .then(|| KubeletCredentials::new(config.cri.credential_ttl()));
    let client = registry_client_with(
        config,
        kubelet_credentials
            .clone()
            .map(|c| Arc::new(c) as Arc<dyn pronto_registry::CredentialSource>),
    )?;
    let whole_client = client.clone();
    let profile_client = client.clone();
    let warm_client = client.clone();
    let store = LocalIndexStore::open(&config.root)?;
    // Only one daemon can use a node's cache and snapshots: a second one
    // fails here, before it touches the keeper or the socket.
    let cache = Arc::new(open_cache(config)?);
    let snapshots_root = config.root.join("snapshotter");
    let local = Arc::new(
        LocalSnapshots::open(&snapshots_root)
            .with_context(|| format!("open snapshots under {}", snapshots_root.display()))?,
    );
    // The keeper holds the mounts and the socket across restarts. Without
    // one (it cannot start), the daemon still serves, but its mounts end
    // with it.
    let keeper_socket = config.keeper_socket();
    let connected = if config.serve.start_keeper {
        KeeperClient::connect_or_start(&keeper_socket, || start_keeper(config_path, &keeper_socket))
    } else {
        KeeperClient::connect_or_start_within(
            &keeper_socket,
            || {
                tracing::info!(socket = %keeper_socket.display(), "waiting for the keeper (serve.start_keeper is off)");
                Ok(())
            },
            std::time::Duration::from_secs(60),
        )
    };
    let keeper_client = match connected {
        Ok(keeper) => Some(keeper),
        Err(e) => {
            tracing::error!("no keeper: {e}");
            None
        }
    };
    let systemd = Notifier::from_env();
    let keeper = Holders::new(keeper_client, systemd.clone()).map(Arc::new);
    if keeper.is_none() {
        tracing::error!("lazy mounts will not survive a restart of the daemon");
    }
    let mut kept = match &keeper {
        Some(keeper) => keeper.take().context("take over from the keeper")?,
        None => Default::default(),
    };
    let listener = kept_listener(
        &config.address,
        keeper::LISTENER,
        kept.remove(keeper::LISTENER),
        keeper.as_deref(),
    )?;
    let cri_listener = match &kubelet_credentials {
        Some(_) => Some(kept_listener(
            Path::new(&config.cri_address),
            keeper::CRI_LISTENER,
            kept.remove(keeper::CRI_LISTENER),
            keeper.as_deref(),
        )?),
        None => {
            kept.remove(keeper::CRI_LISTENER);
            None
        }
    };
    let mut remote = Remote::new(
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
    );
    if let Some(keeper) = &keeper {
        remote = remote.with_keeper(keeper.clone(), config.root.join("mounts"));
    }
    if config.profile.record || config.profile.prefetch {
        remote = remote.with_profiles(Arc::new(Profiles::new(
            ProfileStore::new(config.profiles_dir()),
            config.profile.options(),
            profile_client,
            runtime.handle().clone(),
        )));
    }
    let whole = config.pull.parallel.then(|| {
        Arc::new(WholeLayers::new(
            whole_client,
            config.root.join("layers"),
            config.pull.settings(),
        ))
    });
    if let Some(whole) = &whole {
        remote = remote.with_whole(whole.clone(), local.clone());
    }
    let remote = Arc::new(remote);
    let snapshotter = Snapshotter {
        local: local.clone(),
        remote: Some(remote.clone()),
        whole,
    };
    let warm = Arc::new(WarmEngine::new(
        config.warm.clone(),
        warm_client,
        remote.clone(),
        config.root.clone(),
        config.pull.settings().min_free_space,
    ));
    let status = StatusService {
        remote: remote.clone(),
        cache,
        warm: Some(warm.clone()),
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
        // Mounts of the daemon before this one are taken over before
        // containerd is answered; the other lazy layers are mounted again
        // when containerd next uses them.
        let adopted = tokio::task::block_in_place(|| remote.adopt(&local, kept));
        tracing::info!(adopted, "lazy mounts taken over from the previous daemon");
        // Node join: the warm set is warmed while containerd is served.
        warm.start();
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
        if let Some(systemd) = &systemd
            && let Err(e) =
                systemd.notify("READY=1\nSTATUS=serving containerd's snapshots API", None)
        {
            tracing::warn!("cannot tell systemd the daemon is ready: {e}");
        }
        let cri = match (cri_listener, kubelet_credentials) {
            (Some(listener), Some(credentials)) => {
                let stopped = stop.subscribe();
                // kubelet's pulls are looked ahead of, as `pronto pull`'s.
                let (remote, platform) = (remote.clone(), super::host_platform());
                let handle = tokio::runtime::Handle::current();
                let announce: pronto_containerd::cri::PullAnnounce =
                    Arc::new(move |image: &str| {
                        let (remote, image, platform) =
                            (remote.clone(), image.to_owned(), platform.clone());
                        handle.spawn(async move { remote.expect(&image, &platform).await });
                    });
                Some(tokio::spawn(serve_cri(
                    config.clone(),
                    listener,
                    credentials,
                    announce,
                    stopped,
                )))
            }
            _ => None,
        };
        let served = pronto_snapshotter::serve(snapshotter, Some(status), listener, shutdown)
            .await
            .with_context(|| format!("serve on {}", config.address.display()));
        // Also when serving failed without a signal.
        let _ = stop.send(true);
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        if let Some(cri) = cri {
            match cri.await {
                Ok(Err(e)) => tracing::error!("CRI image service: {e:#}"),
                Err(e) => tracing::error!("CRI image service: {e}"),
                Ok(Ok(())) => {}
            }
        }
        served
    })?;
    remote.finish_profiles();
    let counts = remote.fallback_counts();
    if !counts.is_empty() {
        let summary: Vec<String> = counts
            .iter()
            .map(|(reason, n)| format!("{}={n}", reason.as_str()))
            .collect();
        tracing::info!("fallbacks while running: {}", summary.join(" "));
    }
    if keeper.is_some() {
        // The keeper holds the mounts and the socket for the next daemon.
        tracing::info!(
            lazy_layers = remote.mounted_count(),
            "stopped; the keeper holds the lazy mounts for the next daemon"
        );
    } else {
        remote.release_all();
        let _ = std::fs::remove_file(&config.address);
    }
    Ok(())
}

/// CRI's image service on `listener` until `stopped`.
async fn serve_cri(
    config: Config,
    listener: std::os::unix::net::UnixListener,
    credentials: KubeletCredentials,
    announce: pronto_containerd::cri::PullAnnounce,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    tracing::info!(
        address = %config.cri_address,
        containerd = %config.cri.containerd_address.display(),
        "serving CRI's image service for kubelet"
    );
    let stopped = async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    pronto_containerd::cri::serve(
        listener,
        &config.cri.containerd_address,
        credentials,
        Some(announce),
        stopped,
    )
    .await
    .with_context(|| format!("serve CRI on {}", config.cri_address))
}

/// A socket kept under `name`: the one the previous daemon handed to the
/// keeper when it is still at `address`, else a new one (handed to the
/// keeper in turn).
fn kept_listener(
    address: &Path,
    name: &str,
    kept: Option<std::os::fd::OwnedFd>,
    keeper: Option<&Holders>,
) -> Result<std::os::unix::net::UnixListener> {
    let previous = kept
        .map(std::os::unix::net::UnixListener::from)
        .filter(|listener| {
            let bound = listener.local_addr().ok();
            let path = bound.as_ref().and_then(|a| a.as_pathname());
            path == Some(address) && address.exists()
        });
    let listener = match previous {
        Some(listener) => {
            tracing::info!(address = %address.display(), "serving on the socket the previous daemon listened on");
            listener
        }
        None => pronto_snapshotter::bind(address)
            .with_context(|| format!("listen on {}", address.display()))?,
    };
    // Kept again: a holder that lacks it (systemd's store after the
    // daemon ran without systemd) gets it too.
    if let Some(keeper) = keeper
        && let Err(e) = keeper.keep(name, listener.as_fd())
    {
        tracing::warn!("cannot hand the socket to the keeper: {e}");
    }
    Ok(listener)
}

/// Starts `pronto keeper` for `socket` in a process group of its own, so
/// that stopping the daemon (or its process group) leaves it running. It
/// logs where the daemon logs (the journal, a file, a terminal), except
/// into a pipe: whoever reads the daemon's output through a pipe waits
/// for every writer to close it, and the keeper outlives the daemon, so it
/// logs to `<socket>.log` (extension replaced) instead.
fn start_keeper(config_path: Option<&Path>, socket: &Path) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    let stderr_is_pipe = nix::sys::stat::fstat(std::io::stderr())
        .map(|st| (st.st_mode & nix::libc::S_IFMT) == nix::libc::S_IFIFO)
        .unwrap_or(false);
    let stderr = if stderr_is_pipe {
        let log = socket.with_extension("log");
        std::process::Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?,
        )
    } else {
        std::process::Stdio::inherit()
    };
    let mut command = std::process::Command::new(std::env::current_exe()?);
    if let Some(path) = config_path {
        command.arg("--config").arg(path);
    }
    command
        .arg("keeper")
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .process_group(0);
    let child = command.spawn()?;
    tracing::info!(pid = child.id(), socket = %socket.display(), "keeper started");
    Ok(())
}

/// `pronto keeper`: runs the keeper, or with `stop` asks it to exit.
pub fn keeper(config: &Config, stop: bool, socket: Option<PathBuf>) -> Result<()> {
    let socket = socket.unwrap_or_else(|| config.keeper_socket());
    if stop {
        let client = KeeperClient::connect(&socket)
            .with_context(|| format!("no keeper answers at {}", socket.display()))?;
        client.stop().context("stop the keeper")?;
        println!("keeper at {} stopped", socket.display());
        return Ok(());
    }
    keeper::run(&socket, config.serve.handover_timeout())
        .with_context(|| format!("keeper on {}", socket.display()))
}
