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
mod referrers;

pub use parallel::{ChunkSink, ParallelFetch, Resume};
pub use push::{PushedManifest, UPLOAD_PART};
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

/// Parses an image reference the way containerd normalises it:
/// `busybox` → `docker.io/library/busybox:latest`.
pub fn parse_reference(text: &str) -> Result<Reference> {
    text.parse::<Reference>()
        .map_err(|err| RegistryError::Reference {
            reference: text.to_owned(),
            problem: err.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_normalised_like_containerd() {
        let r = parse_reference("busybox").unwrap();
        assert_eq!(r.to_string(), "docker.io/library/busybox:latest");
        let r = parse_reference("127.0.0.1:5000/team/app@sha256:0123456789012345678901234567890123456789012345678901234567890123").unwrap();
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "team/app");
        assert!(r.digest().is_some());
        assert!(parse_reference("app:bad tag").is_err());
        assert!(parse_reference("a//b").is_err());
    }
}
