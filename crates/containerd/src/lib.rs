//! Pronto's side of containerd's API that is not the snapshotter: `pronto
//! pull`, which pulls an image through containerd's content, snapshots,
//! diff, images and leases services the way CRI does, and the snapshot
//! labels containerd and Pronto exchange.
//!
//! It must not know about FUSE, indexes or how Pronto makes snapshots: it
//! talks to containerd, which talks to the snapshotter.

mod content;
pub mod cri;
pub mod labels;
pub mod node_config;
mod pull;
mod records;
mod session;

pub use pull::{LayerOutcome, Phase, PullError, PullOptions, PullReport, chain_ids, pull};
pub use records::{image_target, remove_image};
pub use session::validate_namespace;

/// A name no other call of this process (or another) uses.
pub(crate) fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::SystemTime;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}
