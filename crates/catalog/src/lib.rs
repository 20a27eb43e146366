//! Where layer indexes live and how they are found: creating them for an
//! image's layers, the OCI artifact manifest that carries them (its
//! `subject` is the image manifest), pushing it as a referrer, keeping it in
//! the node's local store instead, and finding, fetching and removing it.
//!
//! It joins the registry client and the index format; it must not know
//! about FUSE or containerd.

mod artifact;
mod create;
mod error;
mod local;
pub mod profiles;
mod remote;
mod trust;

pub use artifact::{IndexSet, LayerIndexRef, Location, Subject, artifact_manifest, parse_artifact};
pub use create::{CreateOptions, CreatedIndexes, Event, Skipped, create_indexes};
pub use error::CatalogError;
pub use local::LocalIndexStore;
pub use remote::{
    fetch_prefix, find_indexes, prefix_bytes, push_bound, push_indexes, remove_remote, save_local,
    verify_prefix,
};
pub use trust::{
    ANNOTATION_SUBJECT, BindTarget, Binding, IndexTrust, OCI_INDEX, TrustedIndex, binding_index,
    bound_sets, find_trusted, unbind_index,
};

/// The digest of the empty JSON object `{}`, the config of artifacts.
pub const EMPTY_CONFIG_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
pub const EMPTY_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
