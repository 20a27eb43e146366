//! containerd snapshot semantics for Pronto: local overlay snapshots, the
//! remote-layer handshake that mounts indexed layers lazily, overlay mount
//! options, fallback with a logged reason, and parallel pull.
//!
//! It must not know FUSE internals: it asks the filesystem to mount a layer
//! and gets a directory back.
