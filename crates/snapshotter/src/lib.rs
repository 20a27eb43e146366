//! containerd snapshotter for Pronto, served over containerd's snapshots
//! gRPC API as a proxy plugin (`[proxy_plugins.pronto]`).
//!
//! Local snapshots behave exactly like containerd's overlayfs snapshotter.
//! Layer snapshots of indexed images are *remote*: mounted lazily through
//! FUSE and reported to containerd as already there, so it neither
//! downloads nor unpacks them (the remote-snapshotter handshake).

mod ahead;
mod choice;
pub mod filter;
pub mod keeper;
pub mod local;
pub mod profiles;
pub mod remote;
mod service;
pub mod status;
pub mod systemd;
pub mod unpack;
pub mod whole;

#[allow(clippy::all, missing_docs)]
mod generated {
    pub type Empty = ();
    include!(concat!(
        env!("OUT_DIR"),
        "/containerd.services.snapshots.v1.Snapshots.rs"
    ));

    pub mod status {
        include!(concat!(env!("OUT_DIR"), "/pronto.v1.Status.rs"));
    }
}

use std::path::Path;

pub use local::LocalSnapshots;
pub use profiles::{ProfileOptions, Profiles};
pub use remote::{Fallback, Remote, RemoteOptions, WarmSet, Warmed};
pub use service::Snapshotter;
pub use status::StatusService;
pub use whole::{PullSettings, WholeLayers};

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}: not found")]
    NotFound(String),
    #[error("{0}: already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

/// Listens on the unix socket `address` (mode 0600). A stale socket file
/// is replaced.
pub fn bind(address: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = address.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(address) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = std::os::unix::net::UnixListener::bind(address)?;
    std::fs::set_permissions(address, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `snapshotter` and `status` on `listener` until `shutdown`
/// completes. The listener may have been handed over by an earlier daemon.
pub async fn serve(
    snapshotter: Snapshotter,
    status: Option<StatusService>,
    listener: std::os::unix::net::UnixListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    tonic::transport::Server::builder()
        .add_service(generated::snapshots_server::SnapshotsServer::new(
            snapshotter,
        ))
        .add_optional_service(status.map(generated::status::status_server::StatusServer::new))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}
