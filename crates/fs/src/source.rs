//! The interface between the filesystem and a layer format.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use pronto_index::Entry;
use pronto_store::CacheKey;

/// What [`LayerSource::read_async`] returns.
pub type ReadResult = Pin<Box<dyn Future<Output = Result<Vec<u8>, ReadError>> + Send>>;

/// Why a read failed. The FUSE adapter answers every one with `EIO`; the
/// message goes to the log.
#[derive(Debug, thiserror::Error)]
#[error("layer {layer}: {problem}")]
pub struct ReadError {
    pub layer: String,
    pub problem: String,
}

/// One layer as the filesystem sees it.
pub trait LayerSource: Send + Sync {
    /// The layer's digest, for logs.
    fn digest(&self) -> &str;

    /// The layer's tar entries, in tar order.
    fn entries(&self) -> &[Entry];

    /// Reads up to `len` bytes at `offset` of regular-file entry `entry`.
    /// Returns fewer bytes only at the end of the file. Every byte returned
    /// has been verified.
    fn read(&self, entry: usize, offset: u64, len: usize) -> Result<Vec<u8>, ReadError>;

    /// [`Self::read`] as a future, so that a read waiting for the network
    /// holds no thread: the FUSE adapter answers it from a task on the
    /// node's shared runtime.
    fn read_async(self: Arc<Self>, entry: usize, offset: u64, len: usize) -> ReadResult;

    /// True when [`Self::read`] of this range would not wait for the
    /// network (its data is local): it is answered at once.
    fn ready(&self, _entry: usize, _offset: u64, _len: usize) -> bool {
        true
    }

    /// A container is using the layer now (it opened a file): work that
    /// waits for the node to be quiet, such as the background fetch,
    /// waits longer. Reads the kernel serves itself (passthrough, page
    /// cache) never reach the layer, so opens are the sign of use.
    fn active(&self) {}

    /// The cache keys holding `entry`'s data, to pin while it is open.
    fn cache_keys(&self, entry: usize) -> Vec<CacheKey>;

    /// If all of `entry`'s data is local, a cache key whose file holds
    /// exactly that data (made now if needed), so the kernel can read it
    /// directly (FUSE passthrough). `None` when not local or unsupported.
    fn local_file(&self, _entry: usize) -> Option<CacheKey> {
        None
    }
}
