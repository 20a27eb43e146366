//! The interface between the filesystem and a layer format.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use pronto_layer::Entry;
use pronto_store::CacheKey;

use crate::indexed::LayerFetchStats;

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

/// What [`LazyLayer::prefetch`] returns: the bytes the prefetch made local.
pub type PrefetchResult<'a> = Pin<Box<dyn Future<Output = u64> + Send + 'a>>;

/// A layer mounted lazily, as the snapshotter sees it whatever its format:
/// the filesystem's [`LayerSource`] plus what the node does with a layer
/// over its life (account for it, prefetch a startup profile, fetch the
/// rest in the background, release its cache). The seekable index over
/// unmodified layers ([`crate::IndexedLayer`]) is one implementation; a
/// new format adds another and touches neither FUSE nor snapshotter code.
pub trait LazyLayer: LayerSource + std::fmt::Debug {
    /// Size of the layer blob in bytes.
    fn size(&self) -> u64;

    /// What the layer has fetched, and how.
    fn stats(&self) -> &LayerFetchStats;

    /// Bytes of the layer blob this node has in its cache.
    fn local_bytes(&self) -> u64;

    /// Every cache key the layer may have filled, to release with it.
    fn all_cache_keys(&self) -> Vec<CacheKey>;

    /// Starts fetching the rest of the layer when the node is quiet, at
    /// most `rate` bytes per second when set.
    fn start_background_fetch(self: Arc<Self>, rate: Option<u64>);

    /// Fetches `ranges` (entry, offset, length) ahead of the container's
    /// reads, at most `parallel` requests at once.
    fn prefetch<'a>(
        &'a self,
        ranges: &'a [(usize, u64, u64)],
        parallel: usize,
    ) -> PrefetchResult<'a>;

    /// The same layer as the filesystem's read interface.
    fn as_source(self: Arc<Self>) -> Arc<dyn LayerSource>;
}
