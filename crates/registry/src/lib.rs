//! OCI distribution client: resolving references, reading manifests and
//! blobs (whole or by range), pushing, referrers, authentication and retries.
//!
//! This crate owns everything Pronto says to a registry. It must not know
//! about FUSE, the node cache or containerd: callers hand it references and
//! digests and get verified bytes back.
