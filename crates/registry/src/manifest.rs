//! Pulling: manifests (OCI and Docker schema 2, single or multi-platform),
//! resolution of a reference to one platform's image, and blobs, whole and
//! by byte range.

use std::ops::Range;
use std::time::Instant;

use bytes::Bytes;
use oci_spec::image::{ImageConfiguration, ImageIndex, ImageManifest};
use pronto_metrics::metrics;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, CONTENT_TYPE};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::client::{Fetched, Request};
use crate::digest::{StreamDigest, check_algorithm, mismatch, sha256_digest, verify_digest};
use crate::documents::Kept;
use crate::error::{RegistryError, Target};
use crate::{Reference, RegistryClient, Repository, Result};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Manifests larger than this are refused (containerd's limit too).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Image configs larger than this are refused.
pub const MAX_CONFIG_SIZE: u64 = 16 << 20;

/// An operating system and architecture, as in `linux/amd64` or
/// `linux/arm64/v8`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl std::str::FromStr for Platform {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Self {
                os: (*os).into(),
                architecture: (*arch).into(),
                variant: None,
            }),
            [os, arch, variant] if !os.is_empty() && !arch.is_empty() && !variant.is_empty() => {
                Ok(Self {
                    os: (*os).into(),
                    architecture: (*arch).into(),
                    variant: Some((*variant).into()),
                })
            }
            _ => Err(format!("platform {text:?} is not OS/ARCH[/VARIANT]")),
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

impl Platform {
    /// True when an index entry's platform serves this one. A wanted
    /// variant must match; an unspecified one accepts any.
    fn matches(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == arch
            && (self.variant.is_none() || self.variant.as_deref() == variant)
    }
}

/// What a manifest document is.
#[derive(Debug, Clone)]
pub enum ManifestKind {
    Image(Box<ImageManifest>),
    Index(Box<ImageIndex>),
}

/// A manifest as fetched: verified bytes, media type and parsed form.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub digest: String,
    pub media_type: String,
    pub bytes: Bytes,
    pub kind: ManifestKind,
}

/// A reference resolved to one platform's image.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub repository: Repository,
    /// The multi-platform index the reference named, if it named one.
    pub index: Option<Manifest>,
    /// The image manifest for the wanted platform.
    pub manifest: Manifest,
    pub image: ImageManifest,
    pub config: ImageConfiguration,
    /// The config exactly as fetched (verified against its digest).
    pub config_bytes: Bytes,
}

impl RegistryClient {
    /// Fetches the manifest `reference` (a tag or digest) of `repo`. When
    /// the reference is a digest, the bytes are verified against it.
    pub async fn manifest(&self, repo: &Repository, reference: &str) -> Result<Manifest> {
        let target = Target::new(repo, format!("manifest {reference}"));
        if reference.contains(':') {
            check_algorithm(&target, reference)?;
            if let Some(Kept::Manifest(kept)) = self.documents().get(repo, reference) {
                return Ok(kept);
            }
        }
        let request = Request::get(self.url(repo, &format!("manifests/{reference}"))).header(
            "accept",
            [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].join(", "),
        );
        let fetched = self
            .fetch(repo, &target, &request, MAX_MANIFEST_SIZE)
            .await?;
        let fetched = expect_status(&target, fetched, &[StatusCode::OK])?;
        let digest = sha256_digest(&fetched.body);
        if reference.contains(':') {
            verify_digest(&target, reference, &fetched.body)?;
        } else if let Some(header) = fetched
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            && header.starts_with("sha256:")
            && header != digest
        {
            return Err(mismatch(&target, header, digest));
        }
        let header_type = fetched
            .headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let manifest = parse_manifest(&target, digest, header_type, fetched.body)?;
        self.documents()
            .put(repo, &manifest.digest, Kept::Manifest(manifest.clone()));
        Ok(manifest)
    }

    /// The digest tag `tag` of `repo` names now, asked with a HEAD request
    /// (no manifest body), conditional on `known` (the digest seen last):
    /// `Ok(None)` when the registry answers 304 Not Modified, or does not
    /// say (no `Docker-Content-Digest`). What tag polling asks.
    pub async fn tag_digest(
        &self,
        repo: &Repository,
        tag: &str,
        known: Option<&str>,
    ) -> Result<Option<String>> {
        let target = Target::new(repo, format!("manifest {tag}"));
        let mut request = Request::get(self.url(repo, &format!("manifests/{tag}"))).header(
            "accept",
            [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].join(", "),
        );
        request.method = reqwest::Method::HEAD;
        if let Some(known) = known {
            request = request.header("if-none-match", format!("\"{known}\""));
        }
        let fetched = self.fetch(repo, &target, &request, 0).await?;
        let fetched = expect_status(
            &target,
            fetched,
            &[StatusCode::OK, StatusCode::NOT_MODIFIED],
        )?;
        if fetched.status == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        Ok(fetched
            .headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| d.starts_with("sha256:") && d.len() == 71)
            .map(str::to_owned))
    }

    /// Resolves `reference` to the image for `platform`: follows an index
    /// to the matching manifest, verifies every document by digest, and
    /// fetches the config.
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedImage> {
        let repo = Repository::of(reference);
        let wanted = reference
            .digest()
            .map(str::to_owned)
            .or_else(|| reference.tag().map(str::to_owned))
            .unwrap_or_else(|| "latest".to_owned());
        let top = self.manifest(&repo, &wanted).await?;
        let (index, manifest) = match &top.kind {
            ManifestKind::Image(_) => (None, top),
            ManifestKind::Index(index) => {
                let target = Target::new(&repo, format!("manifest {wanted}"));
                let chosen = choose_platform(&target, index, platform)?;
                let manifest = self.manifest(&repo, &chosen).await?;
                (Some(top), manifest)
            }
        };
        let ManifestKind::Image(image) = manifest.kind.clone() else {
            return Err(RegistryError::Invalid {
                target: Target::new(&repo, format!("manifest {}", manifest.digest)),
                problem: "an image index points to another index, not to an image".into(),
            });
        };
        let config_digest = image.config().digest().to_string();
        let config_bytes = self.blob(&repo, &config_digest, MAX_CONFIG_SIZE).await?;
        let config: ImageConfiguration =
            serde_json::from_slice(&config_bytes).map_err(|e| RegistryError::Invalid {
                target: Target::new(&repo, format!("config {config_digest}")),
                problem: format!("the image config is not valid JSON: {e}"),
            })?;
        if index.is_none() {
            // A single-platform image: its config says which platform.
            let (os, arch) = (config.os().to_string(), config.architecture().to_string());
            let variant = config.variant().clone();
            if !platform.matches(&os, &arch, variant.as_deref()) {
                let mut available = format!("{os}/{arch}");
                if let Some(v) = variant {
                    available = format!("{available}/{v}");
                }
                return Err(RegistryError::Platform {
                    target: Target::new(&repo, format!("manifest {wanted}")),
                    wanted: platform.to_string(),
                    available,
                });
            }
        }
        Ok(ResolvedImage {
            repository: repo,
            index,
            manifest,
            image: *image,
            config,
            config_bytes,
        })
    }

    /// Fetches a whole blob of at most `max_len` bytes into memory,
    /// verified against `digest`.
    pub async fn blob(&self, repo: &Repository, digest: &str, max_len: u64) -> Result<Bytes> {
        let target = Target::new(repo, format!("blob {digest}"));
        check_algorithm(&target, digest)?;
        if let Some(Kept::Blob(kept)) = self.documents().get(repo, digest)
            && kept.len() as u64 <= max_len
        {
            return Ok(kept);
        }
        let request = Request::get(self.url(repo, &format!("blobs/{digest}")));
        let fetched = self.fetch(repo, &target, &request, max_len).await?;
        let fetched = expect_status(&target, fetched, &[StatusCode::OK])?;
        verify_digest(&target, digest, &fetched.body)?;
        self.documents()
            .put(repo, digest, Kept::Blob(fetched.body.clone()));
        Ok(fetched.body)
    }

    /// Streams blob `digest` of `size` bytes into `out`, verifying its
    /// digest at the end. A connection that breaks mid-way is resumed
    /// with a range request from where it stopped. Returns the byte count.
    /// On a digest mismatch the bytes already written are not to be used.
    pub async fn blob_to_writer<W: AsyncWrite + Unpin>(
        &self,
        repo: &Repository,
        digest: &str,
        size: u64,
        out: &mut W,
    ) -> Result<u64> {
        let target = Target::new(repo, format!("blob {digest}"));
        check_algorithm(&target, digest)?;
        let mut hasher = StreamDigest::default();
        let mut written = 0u64;
        let mut resumes = 0;
        while written < size || size == 0 {
            let mut request = Request::get(self.url(repo, &format!("blobs/{digest}")));
            if written > 0 {
                request = request.header("range", format!("bytes={written}-"));
            }
            let mut opened = self.open(repo, &target, &request).await?;
            let status = opened.response.status();
            match (written, status) {
                (0, StatusCode::OK) => {}
                (_, StatusCode::PARTIAL_CONTENT) if written > 0 => {
                    check_content_range(&target, opened.response.headers(), written, size)?;
                }
                (_, StatusCode::NOT_FOUND) => return Err(RegistryError::NotFound { target }),
                _ => return Err(status_error(&target, status, Bytes::new())),
            }
            let mut failed = None;
            loop {
                match self
                    .next_chunk(&target, &mut opened.response, resumes + 1)
                    .await
                {
                    Ok(Some(chunk)) => {
                        if written + chunk.len() as u64 > size && size != 0 {
                            return Err(RegistryError::Invalid {
                                target,
                                problem: format!(
                                    "the blob is larger than the {size} bytes the manifest says"
                                ),
                            });
                        }
                        hasher.update(&chunk);
                        out.write_all(&chunk)
                            .await
                            .map_err(|source| RegistryError::Write {
                                target: target.clone(),
                                source,
                            })?;
                        written += chunk.len() as u64;
                    }
                    Ok(None) => break,
                    Err(err) => {
                        failed = Some(err);
                        break;
                    }
                }
            }
            match failed {
                Some(err) if resumes + 1 < self.config().retry.attempts => {
                    resumes += 1;
                    tracing::warn!(%target, written, "resuming an interrupted download: {err}");
                }
                Some(err) => return Err(err),
                None if written < size => {
                    resumes += 1;
                    if resumes >= self.config().retry.attempts {
                        return Err(RegistryError::Invalid {
                            target,
                            problem: format!("the body ended at byte {written} of {size}"),
                        });
                    }
                }
                None => break,
            }
        }
        out.flush().await.map_err(|source| RegistryError::Write {
            target: target.clone(),
            source,
        })?;
        let actual = hasher.finish();
        if actual != digest {
            return Err(mismatch(&target, digest, actual));
        }
        Ok(written)
    }

    /// Reads `range` of blob `digest` (whose full size is `blob_size`).
    /// The bytes are not verified here: a range is checked by the caller
    /// against the digest of the span it belongs to. A `206` answer must
    /// carry the matching `Content-Range`; a registry that ignores ranges
    /// and answers `200` is coped with by reading the whole blob as it
    /// streams by up to the end of the range, keeping only the range.
    ///
    /// An answer that does not match the range asked for (a wrong
    /// `Content-Range` or length) is retried like a network fault: caches
    /// and proxies in front of registries produce them transiently.
    pub async fn blob_range(
        &self,
        repo: &Repository,
        digest: &str,
        range: Range<u64>,
        blob_size: u64,
    ) -> Result<Bytes> {
        let attempts = self.config().retry.attempts;
        let mut attempt = 1;
        loop {
            match self
                .blob_range_once(repo, digest, range.clone(), blob_size)
                .await
            {
                Err(err @ RegistryError::RangeMismatch { .. }) if attempt < attempts => {
                    tracing::warn!(attempt, "retrying: {err}");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn blob_range_once(
        &self,
        repo: &Repository,
        digest: &str,
        range: Range<u64>,
        blob_size: u64,
    ) -> Result<Bytes> {
        let target = Target::new(
            repo,
            format!("bytes {}-{} of blob {digest}", range.start, range.end),
        );
        check_algorithm(&target, digest)?;
        if range.start >= range.end || range.end > blob_size {
            return Err(RegistryError::Invalid {
                target,
                problem: format!("range is outside the blob's {blob_size} bytes"),
            });
        }
        let request = Request::get(self.url(repo, &format!("blobs/{digest}")))
            .header("range", format!("bytes={}-{}", range.start, range.end - 1));
        let started = Instant::now();
        let fetched = self
            .fetch_range(repo, &target, &request, range.clone(), blob_size)
            .await?;
        metrics().range_request(started.elapsed());
        let len = range.end - range.start;
        match fetched.status {
            StatusCode::PARTIAL_CONTENT => {
                check_content_range(&target, &fetched.headers, range.start, blob_size)?;
                if fetched.body.len() as u64 != len {
                    return Err(RegistryError::RangeMismatch {
                        target,
                        problem: format!("got {} bytes for a {len}-byte range", fetched.body.len()),
                    });
                }
                Ok(fetched.body)
            }
            StatusCode::OK => {
                // Only the range was kept of the whole blob streaming by.
                if fetched.body.len() as u64 != len {
                    return Err(RegistryError::RangeMismatch {
                        target,
                        problem: format!(
                            "the registry ignored the range and its answer ended {} bytes into the range",
                            fetched.body.len()
                        ),
                    });
                }
                tracing::debug!(%target, "registry ignored the range request; read the range from the whole blob");
                Ok(fetched.body)
            }
            StatusCode::NOT_FOUND => Err(RegistryError::NotFound { target }),
            status => Err(status_error(&target, status, fetched.body)),
        }
    }
}

/// Checks `Content-Range: bytes START-END/TOTAL` starts where asked and
/// names the blob's size.
fn check_content_range(
    target: &Target,
    headers: &reqwest::header::HeaderMap,
    start: u64,
    total: u64,
) -> Result<()> {
    let value = headers
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parsed = value
        .strip_prefix("bytes ")
        .and_then(|rest| rest.split_once('/'))
        .and_then(|(span, size)| {
            let (first, _) = span.split_once('-')?;
            Some((first.parse::<u64>().ok()?, size))
        });
    match parsed {
        Some((first, size)) if first == start && (size == "*" || size.parse() == Ok(total)) => {
            Ok(())
        }
        _ => Err(RegistryError::RangeMismatch {
            target: target.clone(),
            problem: format!(
                "Content-Range {value:?} does not match the request from byte {start} of {total}"
            ),
        }),
    }
}

/// The image manifest `top` names for `platform`: `top` itself when it is
/// an image manifest, else the entry of the image index for the platform.
pub fn platform_manifest(repo: &Repository, top: &Manifest, platform: &Platform) -> Result<String> {
    match &top.kind {
        ManifestKind::Image(_) => Ok(top.digest.clone()),
        ManifestKind::Index(index) => {
            let target = Target::new(repo, format!("manifest {}", top.digest));
            choose_platform(&target, index, platform)
        }
    }
}

fn choose_platform(target: &Target, index: &ImageIndex, platform: &Platform) -> Result<String> {
    let mut available = Vec::new();
    for entry in index.manifests() {
        let Some(p) = entry.platform() else { continue };
        let os = p.os().to_string();
        let arch = p.architecture().to_string();
        if platform.matches(&os, &arch, p.variant().as_deref()) {
            return Ok(entry.digest().to_string());
        }
        available.push(match p.variant() {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        });
    }
    Err(RegistryError::Platform {
        target: target.clone(),
        wanted: platform.to_string(),
        available: if available.is_empty() {
            "no platforms listed".into()
        } else {
            available.join(", ")
        },
    })
}

/// Parses manifest bytes by their media type (from the document, else
/// from `Content-Type`). Schema 1 and unknown types are refused.
fn parse_manifest(
    target: &Target,
    digest: String,
    header_type: Option<String>,
    bytes: Bytes,
) -> Result<Manifest> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
        manifests: Option<serde_json::Value>,
    }
    let invalid = |problem: String| RegistryError::Invalid {
        target: target.clone(),
        problem,
    };
    let probe: Probe = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("the manifest is not valid JSON: {e}")))?;
    match probe.schema_version {
        Some(2) => {}
        Some(1) => {
            return Err(invalid(
                "it is a Docker schema 1 manifest, which Pronto does not read (push the image again with a current client to convert it)".into(),
            ));
        }
        Some(version) => {
            return Err(invalid(format!(
                "its schema version is {version}; Pronto reads version 2"
            )));
        }
        None => return Err(invalid("it has no schemaVersion".into())),
    }
    let media_type = probe.media_type.or(header_type).unwrap_or_else(|| {
        if probe.manifests.is_some() {
            OCI_INDEX
        } else {
            OCI_MANIFEST
        }
        .to_owned()
    });
    let kind = match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => ManifestKind::Image(Box::new(
            serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("the image manifest is malformed: {e}")))?,
        )),
        OCI_INDEX | DOCKER_LIST => ManifestKind::Index(Box::new(
            serde_json::from_slice(&bytes)
                .map_err(|e| invalid(format!("the image index is malformed: {e}")))?,
        )),
        other => {
            return Err(invalid(format!(
                "unsupported manifest media type {other:?}"
            )));
        }
    };
    Ok(Manifest {
        digest,
        media_type,
        bytes,
        kind,
    })
}

/// Accepts `fetched` if its status is one of `ok`, else turns it into the
/// error that names the status and the registry's message.
pub(crate) fn expect_status(
    target: &Target,
    fetched: Fetched,
    ok: &[StatusCode],
) -> Result<Fetched> {
    if ok.contains(&fetched.status) {
        return Ok(fetched);
    }
    if fetched.status == StatusCode::NOT_FOUND {
        return Err(RegistryError::NotFound {
            target: target.clone(),
        });
    }
    Err(status_error(target, fetched.status, fetched.body))
}

/// The distribution API's error body, `{"errors":[{"code","message"}]}`,
/// shortened into the error's detail.
pub(crate) fn status_error(target: &Target, status: StatusCode, body: Bytes) -> RegistryError {
    let detail = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            let first = v.get("errors")?.get(0)?.clone();
            let code = first.get("code")?.as_str()?.to_owned();
            let message = first.get("message").and_then(|m| m.as_str()).unwrap_or("");
            Some(format!(": {code} {message}").trim_end().to_owned())
        })
        .unwrap_or_default();
    RegistryError::Status {
        target: target.clone(),
        status: status.as_u16(),
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target::new(&Repository::new("r", "n"), "manifest x")
    }

    #[test]
    fn platforms_parse_and_print() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//".parse::<Platform>().is_err());
    }

    #[test]
    fn content_range_must_match() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(CONTENT_RANGE, "bytes 10-19/100".parse().unwrap());
        check_content_range(&target(), &headers, 10, 100).unwrap();
        assert!(check_content_range(&target(), &headers, 11, 100).is_err());
        assert!(check_content_range(&target(), &headers, 10, 101).is_err());
        headers.insert(CONTENT_RANGE, "garbage".parse().unwrap());
        assert!(check_content_range(&target(), &headers, 10, 100).is_err());
    }

    #[test]
    fn schema1_and_garbage_are_refused() {
        let s1 = Bytes::from_static(br#"{"schemaVersion":1,"name":"x"}"#);
        let err = parse_manifest(&target(), "d".into(), None, s1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("schema 1"), "{err}");
        assert!(!err.contains("Some("), "{err}");
        let junk = Bytes::from_static(b"\x00\x01");
        assert!(parse_manifest(&target(), "d".into(), None, junk).is_err());
    }

    #[test]
    fn registry_error_bodies_become_details() {
        let body = Bytes::from_static(br#"{"errors":[{"code":"DENIED","message":"no push"}]}"#);
        let err = status_error(&target(), StatusCode::FORBIDDEN, body).to_string();
        assert!(err.ends_with("HTTP 403: DENIED no push"), "{err}");
    }
}
