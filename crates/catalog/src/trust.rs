//! Which index a node may use for an image, and indexes bound into the
//! image index.
//!
//! An index decides what a lazily started container sees (its file table,
//! modes, owners, the windows data is decoded with), so it must come from
//! whoever published the image. A *bound* index is listed in the image
//! index the image's reference names, next to the image manifest
//! (`pronto index create --bind`): changing it means moving the tag, which
//! changes the image anyway. A *referrer* can be added by anyone who can
//! push to the repository, without touching the image or its tag. A *local*
//! index was built on this node from the layers themselves. The node's
//! [`IndexTrust`] says which of these it accepts; indexes found wrong once
//! a layer is complete are *poisoned* in the local store and never used
//! again.

use pronto_index::ARTIFACT_TYPE;
use pronto_registry::{Manifest, ManifestKind, RegistryClient, Repository};
use serde_json::{Value, json};

use crate::artifact::{IndexSet, Location, OCI_MANIFEST, parse_artifact};
use crate::error::CatalogError;
use crate::local::LocalIndexStore;

/// Annotation on an index artifact's descriptor in a binding image index:
/// the image manifest the artifact indexes.
pub const ANNOTATION_SUBJECT: &str = "dev.pronto.index.subject";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// The node's `index.trust` policy: the kinds of index it accepts, in the
/// order it looks for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexTrust {
    accepted: Vec<Location>,
}

impl Default for IndexTrust {
    /// Bound and local indexes: nobody who cannot change the image can
    /// change what its containers see.
    fn default() -> Self {
        Self {
            accepted: vec![Location::Bound, Location::Local],
        }
    }
}

impl IndexTrust {
    /// A policy accepting `kinds` (looked up bound first, then local,
    /// then referrers, whatever order they are given in).
    pub fn new(kinds: &[Location]) -> Self {
        let accepted = [Location::Bound, Location::Local, Location::Registry]
            .into_iter()
            .filter(|l| kinds.contains(l))
            .collect();
        Self { accepted }
    }

    pub fn accepts(&self, location: Location) -> bool {
        self.accepted.contains(&location)
    }

    pub fn accepted(&self) -> &[Location] {
        &self.accepted
    }
}

/// What a node found for an image: the index set it may use, or why none.
#[derive(Debug, Clone, Default)]
pub struct TrustedIndex {
    pub set: Option<IndexSet>,
    /// Index sets that exist but were not used, each with its reason.
    pub refused: Vec<String>,
}

/// The index set a node with policy `trust` uses for image manifest
/// `subject`. `image_index` is the document the image's reference names
/// when that is an image index (bound indexes are looked up there).
/// Referrers are asked for only when the policy accepts them, or, when
/// nothing acceptable was found, to say that one was refused.
pub async fn find_trusted(
    client: &RegistryClient,
    store: &LocalIndexStore,
    repo: &Repository,
    subject: &str,
    image_index: Option<&Manifest>,
    trust: &IndexTrust,
) -> Result<TrustedIndex, CatalogError> {
    let mut found = TrustedIndex::default();
    for location in Location::ALL {
        let accepted = trust.accepts(location);
        if !accepted && (found.set.is_some() || location != Location::Registry) {
            continue;
        }
        let sets = match location {
            Location::Bound => match image_index {
                Some(top) => bound_sets(client, repo, top, subject).await?,
                None => Vec::new(),
            },
            Location::Local => store.sets_for(subject)?,
            Location::Registry => referrer_sets(client, repo, subject).await?,
        };
        for set in sets {
            if let Some(reason) = store.poisoned(&set.manifest_digest) {
                found.refused.push(format!(
                    "index {} ({location}) was found not to match its layers: {reason}",
                    set.manifest_digest
                ));
            } else if !accepted {
                found.refused.push(format!(
                    "index {} is a referrer of the image, which index.trust does not accept (bind it with `pronto index create --bind`, or add \"referrers\" to index.trust)",
                    set.manifest_digest
                ));
            } else if found.set.is_none() {
                found.set = Some(set);
            }
        }
        if found.set.is_some() {
            break;
        }
    }
    Ok(found)
}

/// Index sets among the referrers of `subject`. A referrer that is not a
/// valid index set is skipped with a warning.
pub(crate) async fn referrer_sets(
    client: &RegistryClient,
    repo: &Repository,
    subject: &str,
) -> Result<Vec<IndexSet>, CatalogError> {
    let mut sets = Vec::new();
    for referrer in client.referrers(repo, subject, Some(ARTIFACT_TYPE)).await? {
        let digest = referrer.digest().to_string();
        let manifest = client.manifest(repo, &digest).await?;
        match parse_artifact(&digest, &manifest.bytes, subject, Location::Registry) {
            Ok(set) => sets.push(set),
            Err(err) => tracing::warn!(%repo, subject, "ignoring a referrer: {err}"),
        }
    }
    Ok(sets)
}

/// Index sets for `subject` bound into the image index `top`: listed in it
/// with [`ANNOTATION_SUBJECT`] naming `subject`, in an image index that
/// also lists `subject` itself.
pub async fn bound_sets(
    client: &RegistryClient,
    repo: &Repository,
    top: &Manifest,
    subject: &str,
) -> Result<Vec<IndexSet>, CatalogError> {
    if !matches!(top.kind, ManifestKind::Index(_)) {
        return Ok(Vec::new());
    }
    let Ok(value) = serde_json::from_slice::<Value>(&top.bytes) else {
        return Ok(Vec::new());
    };
    let entries = value["manifests"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !entries.iter().any(|e| e["digest"] == subject) {
        return Ok(Vec::new());
    }
    let mut sets = Vec::new();
    for entry in entries {
        if entry["artifactType"] != ARTIFACT_TYPE
            || entry["annotations"][ANNOTATION_SUBJECT] != subject
        {
            continue;
        }
        let Some(digest) = entry["digest"].as_str() else {
            continue;
        };
        let manifest = client.manifest(repo, digest).await?;
        match parse_artifact(digest, &manifest.bytes, subject, Location::Bound) {
            Ok(set) => sets.push(set),
            Err(err) => tracing::warn!(%repo, subject, "ignoring a bound index: {err}"),
        }
    }
    Ok(sets)
}

/// One index artifact to bind: the image manifest it indexes and the
/// artifact manifest's digest and size.
#[derive(Debug, Clone)]
pub struct Binding {
    pub subject: String,
    pub artifact: String,
    pub artifact_size: u64,
}

/// The image to bind indexes into, as its reference names it today.
#[derive(Debug, Clone)]
pub enum BindTarget<'a> {
    /// The reference names an image index (or Docker manifest list): its
    /// bytes.
    Index(&'a [u8]),
    /// The reference names one image manifest, for `platform`
    /// (`os`, `architecture`, optional `variant`).
    Image {
        digest: &'a str,
        media_type: &'a str,
        size: u64,
        platform: Value,
    },
}

/// The OCI image index that binds `bindings` to the image `target`: the
/// image's manifests unchanged (an image index's other entries and
/// annotations too), index artifacts bound earlier for the same images
/// replaced by the new ones. The image itself does not change; its tag is
/// moved to this document.
pub fn binding_index(target: &BindTarget<'_>, bindings: &[Binding]) -> Vec<u8> {
    let (mut manifests, annotations) = match target {
        BindTarget::Index(top) => {
            let value: Value = serde_json::from_slice(top).unwrap_or(Value::Null);
            let manifests = value["manifests"].as_array().cloned().unwrap_or_default();
            (manifests, value.get("annotations").cloned())
        }
        BindTarget::Image {
            digest,
            media_type,
            size,
            platform,
        } => (
            vec![json!({
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                "platform": platform,
            })],
            None,
        ),
    };
    manifests.retain(|entry| {
        entry["artifactType"] != ARTIFACT_TYPE
            || !bindings
                .iter()
                .any(|b| entry["annotations"][ANNOTATION_SUBJECT] == b.subject.as_str())
    });
    for binding in bindings {
        // No platform: containerd and other clients choosing a platform's
        // image skip it, and Pronto finds it by its annotation.
        manifests.push(json!({
            "mediaType": OCI_MANIFEST,
            "artifactType": ARTIFACT_TYPE,
            "digest": binding.artifact,
            "size": binding.artifact_size,
            "annotations": {ANNOTATION_SUBJECT: binding.subject},
        }));
    }
    let mut index = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    });
    if let Some(annotations) = annotations.filter(|a| a.is_object()) {
        index["annotations"] = annotations;
    }
    serde_json::to_vec(&index).expect("JSON values serialise")
}

/// Image index `top` without the index artifact `artifact`.
pub fn unbind_index(top: &[u8], artifact: &str) -> Result<Vec<u8>, CatalogError> {
    let mut value: Value = serde_json::from_slice(top).map_err(|e| CatalogError::Artifact {
        digest: artifact.to_owned(),
        problem: format!("the image index binding it is not JSON: {e}"),
    })?;
    if let Some(manifests) = value["manifests"].as_array_mut() {
        manifests.retain(|entry| entry["digest"] != artifact);
    }
    Ok(serde_json::to_vec(&value).expect("JSON values serialise"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_accepts_no_referrers() {
        let trust = IndexTrust::default();
        assert!(trust.accepts(Location::Bound) && trust.accepts(Location::Local));
        assert!(!trust.accepts(Location::Registry));
        let all = IndexTrust::new(&[Location::Registry, Location::Bound]);
        assert_eq!(all.accepted(), [Location::Bound, Location::Registry]);
    }

    #[test]
    fn binding_replaces_an_earlier_binding_and_keeps_the_rest() {
        let image = format!("sha256:{}", "1".repeat(64));
        let platform = json!({"os": "linux", "architecture": "amd64"});
        let first = Binding {
            subject: image.clone(),
            artifact: format!("sha256:{}", "a".repeat(64)),
            artifact_size: 10,
        };
        let bytes = binding_index(
            &BindTarget::Image {
                digest: &image,
                media_type: OCI_MANIFEST,
                size: 500,
                platform,
            },
            std::slice::from_ref(&first),
        );
        let second = Binding {
            artifact: format!("sha256:{}", "b".repeat(64)),
            ..first
        };
        let again: Value = serde_json::from_slice(&binding_index(
            &BindTarget::Index(&bytes),
            std::slice::from_ref(&second),
        ))
        .unwrap();
        let entries = again["manifests"].as_array().unwrap();
        assert_eq!(entries.len(), 2, "{again}");
        assert_eq!(entries[0]["digest"], image);
        assert_eq!(entries[0]["platform"]["architecture"], "amd64");
        assert_eq!(entries[1]["digest"], second.artifact);
        assert!(entries[1].get("platform").is_none());
    }
}
