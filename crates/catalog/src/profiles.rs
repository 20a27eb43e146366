//! Startup profiles in the registry: an OCI artifact with `artifactType`
//! `application/vnd.pronto.profile.v1`, the empty config, the profile
//! document as its one blob, and the image manifest as `subject`, so that
//! every node pulling the image finds it among the manifest's referrers.
//!
//! The document is opaque here (`pronto_fs::profile` reads and checks it);
//! this module only moves it.

use bytes::Bytes;
use pronto_registry::{RegistryClient, Repository};
use serde_json::{Value, json};

use crate::artifact::{OCI_MANIFEST, Subject};
use crate::error::CatalogError;
use crate::{EMPTY_CONFIG_DIGEST, EMPTY_CONFIG_MEDIA_TYPE};

pub const PROFILE_ARTIFACT_TYPE: &str = "application/vnd.pronto.profile.v1";
pub const PROFILE_MEDIA_TYPE: &str = "application/vnd.pronto.profile.v1+json";

/// The largest profile document fetched.
pub const MAX_PROFILE_DOCUMENT: u64 = 16 << 20;

/// Pushes `document` as the startup profile of `subject` in `repo`.
/// Returns the artifact manifest's digest.
pub async fn push_profile(
    client: &RegistryClient,
    repo: &Repository,
    subject: &Subject,
    document: Bytes,
) -> Result<String, CatalogError> {
    client.push_blob(repo, Bytes::from_static(b"{}")).await?;
    let size = document.len();
    let blob = client.push_blob(repo, document).await?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": PROFILE_ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_CONFIG_MEDIA_TYPE, "digest": EMPTY_CONFIG_DIGEST, "size": 2},
        "layers": [{"mediaType": PROFILE_MEDIA_TYPE, "digest": blob, "size": size}],
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
    });
    let pushed = client
        .push_referrer(
            repo,
            &subject.digest,
            OCI_MANIFEST,
            PROFILE_ARTIFACT_TYPE,
            serde_json::to_vec(&manifest)
                .expect("JSON values serialise")
                .into(),
        )
        .await?;
    Ok(pushed.digest)
}

/// The profile documents among the referrers of image manifest `subject`,
/// newest listed last (the registry's order). Artifacts that are not
/// profiles of `subject`, or are malformed, are skipped.
pub async fn find_profiles(
    client: &RegistryClient,
    repo: &Repository,
    subject: &str,
) -> Result<Vec<Bytes>, CatalogError> {
    let mut documents = Vec::new();
    for referrer in client
        .referrers(repo, subject, Some(PROFILE_ARTIFACT_TYPE))
        .await?
    {
        let digest = referrer.digest().to_string();
        let manifest = client.manifest(repo, &digest).await?;
        let value: Value = match serde_json::from_slice(&manifest.bytes) {
            Ok(value) => value,
            Err(e) => {
                tracing::warn!(digest, "a profile artifact is not JSON: {e}");
                continue;
            }
        };
        if value["subject"]["digest"] != subject || value["artifactType"] != PROFILE_ARTIFACT_TYPE {
            tracing::warn!(
                digest,
                "a profile artifact belongs to another image; skipped"
            );
            continue;
        }
        let Some(blob) = value["layers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["mediaType"] == PROFILE_MEDIA_TYPE)
            .and_then(|l| l["digest"].as_str())
        else {
            continue;
        };
        documents.push(client.blob(repo, blob, MAX_PROFILE_DOCUMENT).await?);
    }
    Ok(documents)
}
