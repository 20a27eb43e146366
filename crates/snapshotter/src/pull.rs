//! `pronto pull`: pulls an image through containerd's API the way
//! containerd's own client does (content, snapshots, diff, images, under a
//! lease), passing the image labels that let Pronto's snapshotter mount
//! indexed layers lazily. What `soci image rpull` and `ctr-remote image
//! rpull` do, for nodes where no kubelet drives CRI.
//!
//! For each layer, bottom first: if the snapshotter already has the
//! layer's chain ID, nothing happens. Otherwise `Prepare` is called with
//! `containerd.io/snapshot.ref` and the CRI labels; a remote snapshotter
//! that can serve the layer answers `ALREADY_EXISTS`. Any other answer
//! means the layer must come whole: Pronto fetches it (parallel range
//! requests), writes it into containerd's content store, applies it with
//! containerd's diff service, and commits the snapshot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::{
    ApplyRequest, CreateImageRequest, DeleteRequest, Image, InfoRequest, UpdateImageRequest,
    WriteAction, WriteContentRequest, content_client::ContentClient, diff_client::DiffClient,
    images_client::ImagesClient, leases_client::LeasesClient,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::Descriptor;
use pronto_registry::{
    ParallelFetch, Platform, Reference, RegistryClient, ResolvedImage, parse_reference,
};
use sha2::{Digest, Sha256};

use crate::remote::{
    LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_PRONTO_LAYER, LABEL_TARGET,
};

const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// CRI keeps the layer list label under this size.
const IMAGE_LAYERS_MAX: usize = 4 << 10;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(
        "{0:?} is not a containerd namespace (letters and digits, joined by single '.', '_' or '-', at most 76 characters)"
    )]
    Namespace(String),
    #[error("cannot connect to containerd at {address}: {message}")]
    Connect { address: PathBuf, message: String },
    #[error("containerd: {what}: {status}")]
    Containerd { what: String, status: String },
    #[error(transparent)]
    Registry(Box<pronto_registry::RegistryError>),
    #[error("layer {layer}: {problem}")]
    Layer { layer: String, problem: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<pronto_registry::RegistryError> for PullError {
    fn from(e: pronto_registry::RegistryError) -> Self {
        PullError::Registry(Box::new(e))
    }
}

fn containerd(what: impl Into<String>) -> impl FnOnce(Status) -> PullError {
    let what = what.into();
    move |status| PullError::Containerd {
        what,
        status: format!("{:?}: {}", status.code(), status.message()),
    }
}

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// containerd's socket.
    pub address: PathBuf,
    pub namespace: String,
    /// The snapshotter to unpack into (Pronto's proxy plugin name).
    pub snapshotter: String,
    pub platform: Platform,
    /// Scratch space for layers fetched whole.
    pub work_dir: PathBuf,
}

/// How each layer ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerOutcome {
    /// Served by the snapshotter without download (lazily).
    Remote,
    /// Fetched whole and unpacked by Pronto itself (parallel pull).
    PulledByPronto,
    /// The snapshot existed already.
    Present,
    /// Fetched whole and unpacked through containerd.
    Unpacked,
}

#[derive(Debug, Clone)]
pub struct PullReport {
    pub name: String,
    pub target: String,
    pub layers: Vec<(String, LayerOutcome)>,
    pub bytes_fetched: u64,
}

/// One containerd connection, scoped to a namespace and a lease.
struct Session {
    channel: Channel,
    namespace: String,
    lease: Option<String>,
}

impl Session {
    fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let md = request.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.namespace
                .parse()
                .expect("validated namespaces are metadata values"),
        );
        if let Some(lease) = &self.lease {
            md.insert(
                "containerd-lease",
                lease.parse().expect("lease id is ASCII"),
            );
        }
        request
    }
}

/// Chain IDs of a stack of layers, as containerd computes them.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Vec<String> = Vec::with_capacity(diff_ids.len());
    for diff in diff_ids {
        let next = match chain.last() {
            None => diff.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{parent} {diff}").as_bytes()))
            ),
        };
        chain.push(next);
    }
    chain
}

/// containerd's rule for namespace names (`namespaces.Validate`): what it
/// accepts is also a valid gRPC metadata value.
pub fn validate_namespace(name: &str) -> Result<(), PullError> {
    let valid = name.len() <= 76
        && name
            .split(['.', '_', '-'])
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()));
    if valid {
        Ok(())
    } else {
        Err(PullError::Namespace(name.to_owned()))
    }
}

pub async fn pull(
    client: &RegistryClient,
    reference: &str,
    options: &PullOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PullReport, PullError> {
    validate_namespace(&options.namespace)?;
    let channel = containerd_client::connect(&options.address)
        .await
        .map_err(|e| PullError::Connect {
            address: options.address.clone(),
            message: e.to_string(),
        })?;
    let parsed = parse_reference(reference)?;
    let name = parsed.whole();
    let image = client.resolve(&parsed, &options.platform).await?;
    let mut session = Session {
        channel,
        namespace: options.namespace.clone(),
        lease: None,
    };
    let lease = format!(
        "pronto-pull-{}",
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    // The lease keeps what is written from garbage collection until the
    // image record holds it; it expires by itself if this process dies.
    let expire = time::OffsetDateTime::from(SystemTime::now() + Duration::from_secs(24 * 3600))
        .format(&time::format_description::well_known::Rfc3339)
        .expect("RFC 3339 formatting of a valid time");
    LeasesClient::new(session.channel.clone())
        .create(
            session.request(containerd_client::services::v1::CreateRequest {
                id: lease.clone(),
                labels: HashMap::from([("containerd.io/gc.expire".to_owned(), expire)]),
            }),
        )
        .await
        .map_err(containerd("create lease"))?;
    session.lease = Some(lease.clone());
    let result = pull_leased(&session, client, &parsed, &name, &image, options, progress).await;
    session.lease = None;
    let deleted = LeasesClient::new(session.channel.clone())
        .delete(session.request(DeleteRequest {
            id: lease,
            sync: false,
        }))
        .await;
    if let Err(e) = deleted {
        tracing::warn!("cannot delete lease: {}", e.message());
    }
    result
}

async fn pull_leased(
    session: &Session,
    client: &RegistryClient,
    reference: &Reference,
    name: &str,
    image: &ResolvedImage,
    options: &PullOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PullReport, PullError> {
    let layers = image.image.layers();
    let diff_ids = image.config.rootfs().diff_ids();
    if diff_ids.len() != layers.len() {
        return Err(PullError::Layer {
            layer: image.manifest.digest.clone(),
            problem: format!(
                "the manifest has {} layers but the config {} diff IDs",
                layers.len(),
                diff_ids.len()
            ),
        });
    }
    let chain = chain_ids(diff_ids);
    let mut snapshots = SnapshotsClient::new(session.channel.clone());
    let mut report = PullReport {
        name: name.to_owned(),
        target: image
            .index
            .as_ref()
            .unwrap_or(&image.manifest)
            .digest
            .clone(),
        layers: Vec::new(),
        bytes_fetched: 0,
    };
    for (i, layer) in layers.iter().enumerate() {
        let digest = layer.digest().to_string();
        let parent = if i == 0 {
            String::new()
        } else {
            chain[i - 1].clone()
        };
        let stat = snapshots
            .stat(session.request(StatSnapshotRequest {
                snapshotter: options.snapshotter.clone(),
                key: chain[i].clone(),
            }))
            .await;
        if stat.is_ok() {
            progress(&format!("{digest}: present"));
            report.layers.push((digest, LayerOutcome::Present));
            continue;
        }
        let mut labels = HashMap::from([
            (LABEL_TARGET.to_owned(), chain[i].clone()),
            (LABEL_IMAGE_REF.to_owned(), name.to_owned()),
            (LABEL_MANIFEST.to_owned(), image.manifest.digest.clone()),
            (LABEL_LAYER.to_owned(), digest.clone()),
        ]);
        let mut rest = String::new();
        for l in &layers[i..] {
            let d = l.digest().to_string();
            if rest.len() + d.len() + 1 > IMAGE_LAYERS_MAX {
                break;
            }
            if !rest.is_empty() {
                rest.push(',');
            }
            rest.push_str(&d);
        }
        labels.insert(LABEL_IMAGE_LAYERS.to_owned(), rest);
        let key = format!("extract-{}-{}", unique(), chain[i]);
        // containerd answers UNAVAILABLE while it reconnects to a
        // restarted snapshotter (its backoff is at most 3 s).
        let mut attempt = 0;
        let prepared = loop {
            attempt += 1;
            let result = snapshots
                .prepare(session.request(PrepareSnapshotRequest {
                    snapshotter: options.snapshotter.clone(),
                    key: key.clone(),
                    parent: parent.clone(),
                    labels: labels.clone(),
                }))
                .await;
            match result {
                Err(status) if status.code() == Code::Unavailable && attempt < 10 => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                other => break other,
            }
        };
        let mounts = match prepared {
            Err(status) if status.code() == Code::AlreadyExists => {
                let info = snapshots
                    .stat(session.request(StatSnapshotRequest {
                        snapshotter: options.snapshotter.clone(),
                        key: chain[i].clone(),
                    }))
                    .await
                    .ok()
                    .and_then(|r| r.into_inner().info);
                let how = info.as_ref().and_then(|i| i.labels.get(LABEL_PRONTO_LAYER));
                let outcome = if how.is_some_and(|how| how == "parallel") {
                    progress(&format!("{digest}: fetched whole in parallel by Pronto"));
                    LayerOutcome::PulledByPronto
                } else {
                    progress(&format!("{digest}: lazy (no download)"));
                    LayerOutcome::Remote
                };
                report.layers.push((digest, outcome));
                continue;
            }
            Err(status) => return Err(containerd(format!("prepare layer {digest}"))(status)),
            Ok(response) => response.into_inner().mounts,
        };
        let unpacked = unpack(session, client, image, layer, &diff_ids[i], mounts, options).await;
        let committed = match unpacked {
            Ok(bytes) => {
                report.bytes_fetched += bytes;
                snapshots
                    .commit(session.request(CommitSnapshotRequest {
                        snapshotter: options.snapshotter.clone(),
                        name: chain[i].clone(),
                        key: key.clone(),
                        labels: HashMap::from([(LABEL_TARGET.to_owned(), chain[i].clone())]),
                    }))
                    .await
                    .or_else(|s| {
                        if s.code() == Code::AlreadyExists {
                            Ok(tonic::Response::new(()))
                        } else {
                            Err(containerd(format!("commit layer {digest}"))(s))
                        }
                    })
                    .map(|_| ())
            }
            Err(e) => Err(e),
        };
        if let Err(e) = committed {
            let _ = snapshots
                .remove(session.request(RemoveSnapshotRequest {
                    snapshotter: options.snapshotter.clone(),
                    key,
                }))
                .await;
            return Err(e);
        }
        progress(&format!("{digest}: fetched and unpacked"));
        report.layers.push((digest, LayerOutcome::Unpacked));
    }
    write_records(session, image, reference, name, chain.last(), options).await?;
    Ok(report)
}

/// Fetches a whole layer, writes it into containerd's content store and
/// applies it to `mounts`. Returns the bytes fetched.
async fn unpack(
    session: &Session,
    client: &RegistryClient,
    image: &ResolvedImage,
    layer: &oci_spec::image::Descriptor,
    diff_id: &str,
    mounts: Vec<containerd_client::types::Mount>,
    options: &PullOptions,
) -> Result<u64, PullError> {
    let digest = layer.digest().to_string();
    let size = layer.size();
    let mut fetched = 0;
    if !has_content(session, &digest).await? {
        let path = client
            .blob_in_dir(
                &image.repository,
                &digest,
                size,
                &options.work_dir,
                ParallelFetch::default(),
            )
            .await?;
        fetched = size;
        let written =
            write_content(session, &digest, size, Source::File(&path), HashMap::new()).await;
        let _ = std::fs::remove_file(&path);
        written?;
    }
    let applied = DiffClient::new(session.channel.clone())
        .apply(session.request(ApplyRequest {
            diff: Some(Descriptor {
                media_type: layer.media_type().to_string(),
                digest: digest.clone(),
                size: size as i64,
                annotations: HashMap::new(),
            }),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        }))
        .await
        .map_err(containerd(format!("apply layer {digest}")))?
        .into_inner()
        .applied
        .map(|d| d.digest)
        .unwrap_or_default();
    if applied != diff_id {
        return Err(PullError::Layer {
            layer: digest,
            problem: format!("unpacked to {applied}, but the config says {diff_id}"),
        });
    }
    Ok(fetched)
}

/// Manifest, config (and index) in the content store with the labels that
/// tie them together for containerd's garbage collector, then the image
/// records.
async fn write_records(
    session: &Session,
    image: &ResolvedImage,
    reference: &Reference,
    name: &str,
    top_chain: Option<&String>,
    options: &PullOptions,
) -> Result<(), PullError> {
    let config_digest = image.image.config().digest().to_string();
    let mut config_labels = HashMap::new();
    if let Some(top) = top_chain {
        config_labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", options.snapshotter),
            top.clone(),
        );
    }
    write_content(
        session,
        &config_digest,
        image.config_bytes.len() as u64,
        Source::Bytes(&image.config_bytes),
        config_labels,
    )
    .await?;
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        config_digest,
    )]);
    for (i, layer) in image.image.layers().iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            layer.digest().to_string(),
        );
    }
    let manifest = &image.manifest;
    write_content(
        session,
        &manifest.digest,
        manifest.bytes.len() as u64,
        Source::Bytes(&manifest.bytes),
        manifest_labels,
    )
    .await?;
    let target = match &image.index {
        Some(index) => {
            let labels = HashMap::from([(
                "containerd.io/gc.ref.content.m.0".to_owned(),
                manifest.digest.clone(),
            )]);
            write_content(
                session,
                &index.digest,
                index.bytes.len() as u64,
                Source::Bytes(&index.bytes),
                labels,
            )
            .await?;
            index
        }
        None => manifest,
    };
    let descriptor = Descriptor {
        media_type: target.media_type.clone(),
        digest: target.digest.clone(),
        size: target.bytes.len() as i64,
        annotations: HashMap::new(),
    };
    // As CRI does: the name pulled, and the repository at the digest.
    let mut names = vec![name.to_owned()];
    if reference.digest().is_none() {
        names.push(format!(
            "{}/{}@{}",
            reference.registry(),
            reference.repository(),
            target.digest
        ));
    }
    let mut images = ImagesClient::new(session.channel.clone());
    for name in names {
        let record = Image {
            name: name.clone(),
            labels: HashMap::from([("io.cri-containerd.image".to_owned(), "managed".to_owned())]),
            target: Some(descriptor.clone()),
            created_at: None,
            updated_at: None,
        };
        let created = images
            .create(session.request(CreateImageRequest {
                image: Some(record.clone()),
                source_date_epoch: None,
            }))
            .await;
        match created {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {
                images
                    .update(session.request(UpdateImageRequest {
                        image: Some(record),
                        update_mask: None,
                        source_date_epoch: None,
                    }))
                    .await
                    .map_err(containerd(format!("update image {name}")))?;
            }
            Err(s) => return Err(containerd(format!("create image {name}"))(s)),
        }
    }
    Ok(())
}

enum Source<'a> {
    Bytes(&'a [u8]),
    File(&'a Path),
}

async fn has_content(session: &Session, digest: &str) -> Result<bool, PullError> {
    match ContentClient::new(session.channel.clone())
        .info(session.request(InfoRequest {
            digest: digest.to_owned(),
        }))
        .await
    {
        Ok(_) => Ok(true),
        Err(s) if s.code() == Code::NotFound => Ok(false),
        Err(s) => Err(containerd(format!("content info {digest}"))(s)),
    }
}

/// Writes a blob into containerd's content store (which verifies it
/// against `digest`), with `labels`. Content already there only gets the
/// labels.
async fn write_content(
    session: &Session,
    digest: &str,
    size: u64,
    source: Source<'_>,
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    let mut content = ContentClient::new(session.channel.clone());
    if has_content(session, digest).await? {
        if labels.is_empty() {
            return Ok(());
        }
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        content
            .update(
                session.request(containerd_client::services::v1::UpdateRequest {
                    info: Some(containerd_client::services::v1::Info {
                        digest: digest.to_owned(),
                        size: size as i64,
                        created_at: None,
                        updated_at: None,
                        labels,
                    }),
                    update_mask: Some(prost_types::FieldMask { paths }),
                }),
            )
            .await
            .map_err(containerd(format!("label content {digest}")))?;
        return Ok(());
    }
    const CHUNK: usize = 1 << 20;
    let reference = format!("pronto-{}-{digest}", unique());
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteContentRequest>(4);
    let message = |action: WriteAction, offset: u64, data: Vec<u8>, labels| WriteContentRequest {
        action: action as i32,
        r#ref: reference.clone(),
        total: size as i64,
        expected: digest.to_owned(),
        offset: offset as i64,
        data,
        labels,
    };
    let mut chunks: Vec<WriteContentRequest> = Vec::new();
    let file = match source {
        Source::Bytes(bytes) => {
            for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
                chunks.push(message(
                    WriteAction::Write,
                    (i * CHUNK) as u64,
                    chunk.to_vec(),
                    HashMap::new(),
                ));
            }
            None
        }
        Source::File(path) => Some(path.to_owned()),
    };
    let commit = message(WriteAction::Commit, size, Vec::new(), labels);
    let feeder = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        for chunk in chunks {
            if tx.send(chunk).await.is_err() {
                return Ok(());
            }
        }
        if let Some(path) = file {
            let mut f = tokio::fs::File::open(&path).await?;
            let mut offset = 0u64;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = f.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                let mut m = commit.clone();
                m.action = WriteAction::Write as i32;
                m.offset = offset as i64;
                m.data = buf;
                m.labels = HashMap::new();
                offset += n as u64;
                if tx.send(m).await.is_err() {
                    return Ok(());
                }
            }
        }
        let _ = tx.send(commit).await;
        Ok::<(), std::io::Error>(())
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let result = async {
        let mut responses = content.write(session.request(stream)).await?.into_inner();
        while let Some(response) = responses.message().await? {
            if response.action == WriteAction::Commit as i32 {
                break;
            }
        }
        Ok::<(), Status>(())
    }
    .await;
    feeder.abort();
    match result {
        Ok(()) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
        Err(s) => Err(containerd(format!("write content {digest}"))(s)),
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_oci_definition() {
        let diffs = vec!["sha256:a".to_owned(), "sha256:b".to_owned()];
        let chain = chain_ids(&diffs);
        assert_eq!(chain[0], "sha256:a");
        assert_eq!(
            chain[1],
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(b"sha256:a sha256:b"))
            )
        );
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn namespaces_follow_containerds_rule() {
        for good in ["k8s.io", "default", "a-b_c.d", "moby"] {
            validate_namespace(good).unwrap();
        }
        for bad in [
            "",
            "bad name",
            "a..b",
            "-a",
            "a-",
            "ns\n",
            "émoji",
            &"a".repeat(77),
        ] {
            let err = validate_namespace(bad).unwrap_err().to_string();
            assert!(err.contains("is not a containerd namespace"), "{err}");
        }
    }
}
