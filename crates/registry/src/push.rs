//! Pushing: blobs (monolithic or in chunks), cross-repository mounts, and
//! manifests.

use bytes::Bytes;
use reqwest::header::LOCATION;
use reqwest::{Method, StatusCode};

use crate::client::{Request, RequestUrl};
use crate::digest::sha256_digest;
use crate::error::{RegistryError, Target};
use crate::manifest::{expect_status, status_error};
use crate::{RegistryClient, Repository, Result};

/// What the registry said when a manifest was pushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedManifest {
    pub digest: String,
    /// The registry processed the manifest's `subject` itself (it answered
    /// with `OCI-Subject`), so the referrers API lists it.
    pub subject_accepted: bool,
}

impl Request {
    fn push(method: Method, url: RequestUrl) -> Self {
        Self {
            method,
            url,
            headers: Vec::new(),
            body: None,
            actions: "pull,push",
        }
    }

    fn with_body(mut self, body: Bytes) -> Self {
        self.body = Some(body);
        self
    }
}

impl RegistryClient {
    /// True when `repo` already has blob `digest`.
    pub async fn blob_exists(&self, repo: &Repository, digest: &str) -> Result<bool> {
        let target = Target::new(repo, format!("blob {digest}"));
        let mut request = Request::get(self.url(repo, &format!("blobs/{digest}")));
        request.method = Method::HEAD;
        let fetched = self.fetch(repo, &target, &request, 0).await?;
        match fetched.status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => Err(status_error(&target, status, fetched.body)),
        }
    }

    /// Uploads `bytes` as one blob (POST, then one PUT) unless the
    /// repository has it already. Returns its digest.
    pub async fn push_blob(&self, repo: &Repository, bytes: Bytes) -> Result<String> {
        let digest = sha256_digest(&bytes);
        if self.blob_exists(repo, &digest).await? {
            return Ok(digest);
        }
        let target = Target::new(repo, format!("upload of blob {digest}"));
        let location = self.start_upload(repo, &target).await?;
        let put = Request::push(Method::PUT, location.with_query("digest", &digest))
            .header("content-type", "application/octet-stream")
            .with_body(bytes);
        let fetched = self.fetch(repo, &target, &put, 1 << 20).await?;
        expect_status(&target, fetched, &[StatusCode::CREATED])?;
        Ok(digest)
    }

    /// Uploads `bytes` in PATCH requests of `chunk_size` bytes, then
    /// commits the upload with its digest.
    pub async fn push_blob_chunked(
        &self,
        repo: &Repository,
        bytes: Bytes,
        chunk_size: usize,
    ) -> Result<String> {
        let digest = sha256_digest(&bytes);
        let target = Target::new(repo, format!("chunked upload of blob {digest}"));
        let mut location = self.start_upload(repo, &target).await?;
        for (i, chunk) in bytes.chunks(chunk_size.max(1)).enumerate() {
            let start = i * chunk_size.max(1);
            let end = start + chunk.len() - 1;
            let patch = Request::push(Method::PATCH, location.clone())
                .header("content-type", "application/octet-stream")
                .header("content-range", format!("{start}-{end}"))
                .with_body(bytes.slice(start..=end));
            let fetched = self.fetch(repo, &target, &patch, 1 << 20).await?;
            let fetched = expect_status(&target, fetched, &[StatusCode::ACCEPTED])?;
            location = self.location(repo, &target, &fetched.headers)?;
        }
        let put = Request::push(Method::PUT, location.with_query("digest", &digest));
        let fetched = self.fetch(repo, &target, &put, 1 << 20).await?;
        expect_status(&target, fetched, &[StatusCode::CREATED])?;
        Ok(digest)
    }

    /// Asks the registry to link blob `digest` from repository `from` into
    /// `repo` without uploading it. Returns false when the registry did not
    /// mount it (the caller then uploads).
    pub async fn mount_blob(&self, repo: &Repository, from: &str, digest: &str) -> Result<bool> {
        let target = Target::new(repo, format!("mount of blob {digest} from {from}"));
        let url = self
            .url(repo, "blobs/uploads/")
            .with_query("mount", digest)
            .with_query("from", from);
        let fetched = self
            .fetch(repo, &target, &Request::push(Method::POST, url), 1 << 20)
            .await?;
        match fetched.status {
            StatusCode::CREATED => Ok(true),
            StatusCode::ACCEPTED => Ok(false),
            status => Err(status_error(&target, status, fetched.body)),
        }
    }

    /// Puts a manifest under `reference` (a tag, or its own digest).
    pub async fn push_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<PushedManifest> {
        let digest = sha256_digest(&bytes);
        let target = Target::new(repo, format!("push of manifest {reference}"));
        if reference.contains(':') && reference != digest {
            return Err(RegistryError::Invalid {
                target,
                problem: format!("the manifest's digest is {digest}"),
            });
        }
        let put = Request::push(
            Method::PUT,
            self.url(repo, &format!("manifests/{reference}")),
        )
        .header("content-type", media_type)
        .with_body(bytes);
        let fetched = self.fetch(repo, &target, &put, 1 << 20).await?;
        let fetched = expect_status(&target, fetched, &[StatusCode::CREATED])?;
        Ok(PushedManifest {
            digest,
            subject_accepted: fetched.headers.contains_key("oci-subject"),
        })
    }

    /// Deletes manifest `digest` (registries may refuse: HTTP 405).
    pub async fn delete_manifest(&self, repo: &Repository, digest: &str) -> Result<()> {
        let target = Target::new(repo, format!("delete of manifest {digest}"));
        let request = Request::push(
            Method::DELETE,
            self.url(repo, &format!("manifests/{digest}")),
        );
        let fetched = self.fetch(repo, &target, &request, 1 << 20).await?;
        expect_status(&target, fetched, &[StatusCode::ACCEPTED, StatusCode::OK])?;
        Ok(())
    }

    async fn start_upload(&self, repo: &Repository, target: &Target) -> Result<RequestUrl> {
        let post = Request::push(Method::POST, self.url(repo, "blobs/uploads/"));
        let fetched = self.fetch(repo, target, &post, 1 << 20).await?;
        let fetched = expect_status(target, fetched, &[StatusCode::ACCEPTED])?;
        self.location(repo, target, &fetched.headers)
    }

    fn location(
        &self,
        repo: &Repository,
        target: &Target,
        headers: &reqwest::header::HeaderMap,
    ) -> Result<RequestUrl> {
        let location = headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| RegistryError::Invalid {
                target: target.clone(),
                problem: "the upload response has no Location header".into(),
            })?;
        Ok(self.absolute(repo, location))
    }
}
