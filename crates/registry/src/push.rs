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

/// The largest request body of a blob upload: bigger blobs go up in parts,
/// so that no request outlasts the client's timeouts on a slow link.
pub const UPLOAD_PART: usize = 16 << 20;

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

    /// Uploads `bytes` as one blob unless the repository has it already,
    /// in parts of [`UPLOAD_PART`] bytes (see [`Self::push_blob_file`]).
    /// Returns its digest.
    pub async fn push_blob(&self, repo: &Repository, bytes: Bytes) -> Result<String> {
        self.push_blob_in_parts(repo, bytes, UPLOAD_PART).await
    }

    /// [`Self::push_blob`] in parts of `part_size` bytes.
    pub async fn push_blob_in_parts(
        &self,
        repo: &Repository,
        bytes: Bytes,
        part_size: usize,
    ) -> Result<String> {
        let digest = sha256_digest(&bytes);
        if self.blob_exists(repo, &digest).await? {
            return Ok(digest);
        }
        let target = Target::new(repo, format!("upload of blob {digest}"));
        let size = bytes.len() as u64;
        let read = |start: u64, len: usize| {
            let part = bytes.slice(start as usize..start as usize + len);
            async move { Ok(part) }
        };
        self.upload(repo, &target, size, &digest, part_size, read)
            .await?;
        Ok(digest)
    }

    /// Uploads the file at `path`, whose digest is `digest`, in PATCH
    /// requests of `part_size` bytes (one PUT when it is no bigger), then
    /// commits the upload with its digest, which the registry checks. One
    /// part is in memory at a time, so a layer of any size can be pushed,
    /// and no request outlasts the client's timeouts on a slow link.
    pub async fn push_blob_file(
        &self,
        repo: &Repository,
        path: &std::path::Path,
        digest: &str,
        part_size: usize,
    ) -> Result<()> {
        let target = Target::new(repo, format!("upload of blob {digest}"));
        let read = |start: u64, len: usize| {
            let (path, target) = (path.to_owned(), target.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    let mut part = vec![0u8; len];
                    std::fs::File::open(&path)
                        .and_then(|file| file.read_exact_at(&mut part, start))
                        .map(|()| Bytes::from(part))
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|read| read)
                .map_err(|source| RegistryError::Write { target, source })
            }
        };
        let size = std::fs::metadata(path)
            .map_err(|source| RegistryError::Write {
                target: target.clone(),
                source,
            })?
            .len();
        self.upload(repo, &target, size, digest, part_size, read)
            .await
    }

    /// One upload of `size` bytes whose digest is `digest`: POST, then
    /// PATCH requests of `part_size` bytes that `read(start, len)` gives
    /// (none when one part holds it all), then the PUT that commits it.
    async fn upload<F, Fut>(
        &self,
        repo: &Repository,
        target: &Target,
        size: u64,
        digest: &str,
        part_size: usize,
        read: F,
    ) -> Result<()>
    where
        F: Fn(u64, usize) -> Fut,
        Fut: std::future::Future<Output = Result<Bytes>>,
    {
        let part_size = part_size.max(1) as u64;
        let mut location = self.start_upload(repo, target).await?;
        let mut put = Request::push(Method::PUT, location.with_query("digest", digest))
            .header("content-type", "application/octet-stream");
        if size <= part_size {
            put = put.with_body(read(0, size as usize).await?);
        } else {
            let mut start = 0;
            while start < size {
                let len = (size - start).min(part_size);
                let patch = Request::push(Method::PATCH, location.clone())
                    .header("content-type", "application/octet-stream")
                    .header("content-range", format!("{start}-{}", start + len - 1))
                    .with_body(read(start, len as usize).await?);
                let fetched = self.fetch(repo, target, &patch, 1 << 20).await?;
                let fetched = expect_status(target, fetched, &[StatusCode::ACCEPTED])?;
                location = self.location(repo, target, &fetched.headers)?;
                start += len;
            }
            put = Request::push(Method::PUT, location.with_query("digest", digest));
        }
        let fetched = self.fetch(repo, target, &put, 1 << 20).await?;
        expect_status(target, fetched, &[StatusCode::CREATED])?;
        Ok(())
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
