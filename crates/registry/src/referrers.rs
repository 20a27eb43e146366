//! OCI 1.1 referrers: the referrers API where the registry has it, and the
//! referrers tag schema (`sha256-<hex>` tag holding an image index) where it
//! does not — Debian's docker-registry 2.8 among them. Pushing keeps the
//! fallback index correct.

use bytes::Bytes;
use oci_spec::image::Descriptor;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::client::Request;
use crate::digest::check_algorithm;
use crate::error::{RegistryError, Target};
use crate::manifest::{MAX_MANIFEST_SIZE, OCI_INDEX, status_error};
use crate::push::PushedManifest;
use crate::{RegistryClient, Repository, Result};

/// The tag the referrers tag schema keeps the index of `subject`'s
/// referrers under.
pub fn fallback_tag(subject: &str) -> String {
    subject.replacen(':', "-", 1)
}

impl RegistryClient {
    /// Manifests whose `subject` is `subject`, optionally only those of
    /// `artifact_type`.
    pub async fn referrers(
        &self,
        repo: &Repository,
        subject: &str,
        artifact_type: Option<&str>,
    ) -> Result<Vec<Descriptor>> {
        let target = Target::new(repo, format!("referrers of {subject}"));
        check_algorithm(&target, subject)?;
        let request = Request::get(self.url(repo, &format!("referrers/{subject}")))
            .header("accept", OCI_INDEX);
        let fetched = self
            .fetch(repo, &target, &request, MAX_MANIFEST_SIZE)
            .await?;
        let index = match fetched.status {
            StatusCode::OK if is_index(&fetched.headers) => parse_index(&target, &fetched.body)?,
            // No referrers API: 404 (distribution 2.8) or a non-index answer.
            StatusCode::OK | StatusCode::NOT_FOUND => self.fallback_index(repo, subject).await?,
            status => return Err(status_error(&target, status, fetched.body)),
        };
        let descriptors = index["manifests"].as_array().cloned().unwrap_or_default();
        descriptors
            .into_iter()
            .map(|d| {
                serde_json::from_value::<Descriptor>(d).map_err(|e| RegistryError::Invalid {
                    target: target.clone(),
                    problem: format!("a referrer descriptor is malformed: {e}"),
                })
            })
            .filter(|d| match (artifact_type, d) {
                (None, _) => true,
                (Some(wanted), Ok(d)) => d
                    .artifact_type()
                    .as_ref()
                    .is_some_and(|t| t.to_string() == wanted),
                (Some(_), Err(_)) => true,
            })
            .collect()
    }

    /// Pushes `manifest` (which has a `subject`) by digest and makes it
    /// findable as a referrer: if the registry did not take the subject
    /// itself, adds it to the fallback index tag.
    pub async fn push_referrer(
        &self,
        repo: &Repository,
        subject: &str,
        media_type: &str,
        artifact_type: &str,
        manifest: Bytes,
    ) -> Result<PushedManifest> {
        let digest = crate::digest::sha256_digest(&manifest);
        let size = manifest.len();
        let pushed = self
            .push_manifest(repo, &digest, media_type, manifest)
            .await?;
        if pushed.subject_accepted {
            return Ok(pushed);
        }
        let descriptor = json!({
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "artifactType": artifact_type,
        });
        self.update_fallback(repo, subject, |manifests| {
            if manifests.iter().any(|m| m["digest"] == json!(digest)) {
                return false;
            }
            manifests.push(descriptor);
            true
        })
        .await?;
        Ok(pushed)
    }

    /// Removes referrer `digest` of `subject` from the fallback index (if
    /// the registry uses one) and deletes its manifest.
    pub async fn remove_referrer(
        &self,
        repo: &Repository,
        subject: &str,
        digest: &str,
    ) -> Result<()> {
        self.update_fallback(repo, subject, |manifests| {
            let before = manifests.len();
            manifests.retain(|m| m["digest"] != json!(digest));
            manifests.len() != before
        })
        .await?;
        match self.delete_manifest(repo, digest).await {
            Err(RegistryError::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    async fn fallback_index(&self, repo: &Repository, subject: &str) -> Result<Value> {
        let tag = fallback_tag(subject);
        let target = Target::new(repo, format!("referrers index {tag}"));
        let request =
            Request::get(self.url(repo, &format!("manifests/{tag}"))).header("accept", OCI_INDEX);
        let fetched = self
            .fetch(repo, &target, &request, MAX_MANIFEST_SIZE)
            .await?;
        match fetched.status {
            StatusCode::OK => parse_index(&target, &fetched.body),
            StatusCode::NOT_FOUND => Ok(empty_index()),
            status => Err(status_error(&target, status, fetched.body)),
        }
    }

    /// Read-modify-write of the fallback index; `edit` returns whether it
    /// changed anything. Two writers racing can lose an entry, as with every
    /// client of the tag schema; the index is re-read right before writing
    /// to keep that window small.
    async fn update_fallback(
        &self,
        repo: &Repository,
        subject: &str,
        edit: impl FnOnce(&mut Vec<Value>) -> bool,
    ) -> Result<()> {
        let mut index = self.fallback_index(repo, subject).await?;
        let mut manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        if !edit(&mut manifests) {
            return Ok(());
        }
        index["manifests"] = Value::Array(manifests);
        let bytes = Bytes::from(serde_json::to_vec(&index).expect("JSON values serialise"));
        self.push_manifest(repo, &fallback_tag(subject), OCI_INDEX, bytes)
            .await
            .map(drop)
    }
}

fn is_index(headers: &reqwest::header::HeaderMap) -> bool {
    headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(OCI_INDEX))
}

fn empty_index() -> Value {
    json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
}

fn parse_index(target: &Target, body: &[u8]) -> Result<Value> {
    let value: Value = serde_json::from_slice(body).map_err(|e| RegistryError::Invalid {
        target: target.clone(),
        problem: format!("the referrers index is not valid JSON: {e}"),
    })?;
    if !value["manifests"].is_array() {
        return Err(RegistryError::Invalid {
            target: target.clone(),
            problem: "the referrers index has no manifests list".into(),
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tags_follow_the_spec() {
        let subject = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            fallback_tag(&subject),
            format!("sha256-{}", "ab".repeat(32))
        );
    }
}
