//! The node-local content cache: verified data kept by content key, shared
//! by every image on the node, with a disk budget, eviction of data not in
//! use, and crash-safe metadata under Pronto's `root`.
//!
//! It must not know about containerd or FUSE, nor what the bytes are: the
//! filesystem decides keys (for index spans, a hash of the span digest and
//! its window digest) and verifies data before putting it here.

mod cache;

pub use cache::{CacheError, CacheKey, CacheStats, ContentCache, scan_usage};
