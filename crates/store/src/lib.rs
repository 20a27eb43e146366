//! The node-local content cache: fetched spans and chunks kept by digest,
//! shared by every image on the node, with a disk budget, eviction and
//! crash-safe metadata under Pronto's `root`.
//!
//! It must not know about containerd or FUSE.
