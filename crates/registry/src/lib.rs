//! OCI distribution client: resolving references, reading manifests and
//! blobs (whole or by range), pushing, referrers, authentication and retries.
//!
//! This crate owns everything Pronto says to a registry. It must not know
//! about FUSE, the node cache or containerd: callers hand it references and
//! digests and get verified bytes back (range reads return raw bytes that
//! the caller verifies against its own span digests).

mod auth;
mod client;
mod digest;
mod documents;
mod error;
pub mod feed;
mod hosts;
mod manifest;
mod parallel;
mod push;
mod reference;
mod referrers;

pub use parallel::{ChunkSink, ParallelFetch, Resume};
pub use push::{PushedManifest, UPLOAD_PART};
pub use reference::parse_reference;
pub use referrers::fallback_tag;

pub use auth::{
    CredentialChain, CredentialSource, Credentials, DockerConfigCredentials, StaticCredentials,
};
pub use client::{ClientConfig, RegistryClient, RetryPolicy};
pub use digest::{sha256_digest, verify_digest};
pub use error::{RegistryError, Target};
pub use hosts::{Endpoint, HostSettings, Hosts, HostsError};
pub use manifest::{
    MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, Manifest, ManifestKind, OCI_INDEX, OCI_MANIFEST, Platform,
    ResolvedImage, platform_manifest,
};
pub use oci_spec::distribution::Reference;
pub use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

/// Result of registry operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

/// A repository in a registry, as the distribution API addresses it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repository {
    /// Registry host as written in references (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// Repository name (`library/busybox`).
    pub name: String,
}

impl Repository {
    pub fn new(registry: &str, name: &str) -> Self {
        Self {
            registry: registry.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The repository a (normalised) reference points into.
    pub fn of(reference: &Reference) -> Self {
        Self::new(reference.registry(), reference.repository())
    }
}

impl std::fmt::Display for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.registry, self.name)
    }
}
