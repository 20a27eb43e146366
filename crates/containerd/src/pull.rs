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
use std::path::PathBuf;
use std::time::{Duration, Instant};

use containerd_client::services::v1::ApplyRequest;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, PrepareSnapshotRequest, RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::tonic::Code;
use containerd_client::tonic::transport::Channel;
use containerd_client::types::{Descriptor, Mount};
use oci_spec::image::Descriptor as LayerDescriptor;
use pronto_registry::{ParallelFetch, Platform, RegistryClient, ResolvedImage, parse_reference};
use sha2::{Digest, Sha256};

use crate::content::{Blob, Source, has_content, write_content};
use crate::labels::{LABEL_PRONTO_LAYER, LABEL_TARGET, layer_labels};
use crate::records::write_records;
use crate::session::{Session, containerd};

/// How often, and how far apart, `Prepare` is tried while containerd
/// reconnects to a restarted snapshotter (its backoff is at most 3 s).
const PREPARE_ATTEMPTS: u32 = 10;
const PREPARE_RETRY: Duration = Duration::from_millis(500);

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
}

impl From<pronto_registry::RegistryError> for PullError {
    fn from(e: pronto_registry::RegistryError) -> Self {
        PullError::Registry(Box::new(e))
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
    /// The digest the image record names: the index of a multi-platform
    /// image, else the image manifest.
    pub target: String,
    /// The image manifest pulled (the platform's).
    pub manifest: String,
    pub layers: Vec<(String, LayerOutcome)>,
    pub bytes_fetched: u64,
    /// Where the time went, in order: resolving the reference, the
    /// layers by how they were made, writing the image records.
    pub phases: Vec<(Phase, Duration)>,
}

/// A part of a pull, as [`PullReport::phases`] times it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Manifests and config from the registry.
    Resolve,
    /// Layers the snapshotter mounted lazily (the index prefixes fetched
    /// and the mounts made inside `Prepare`).
    LazyLayers,
    /// Layers the snapshotter fetched whole and unpacked itself.
    PulledByPronto,
    /// Layers fetched here and unpacked by containerd.
    Unpacked,
    /// Layers already there.
    Present,
    /// Content and image records in containerd.
    Records,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Resolve => "resolve",
            Phase::LazyLayers => "lazy layers",
            Phase::PulledByPronto => "layers fetched whole by Pronto",
            Phase::Unpacked => "layers unpacked by containerd",
            Phase::Present => "layers present",
            Phase::Records => "image records",
        }
    }

    fn of(outcome: LayerOutcome) -> Self {
        match outcome {
            LayerOutcome::Remote => Phase::LazyLayers,
            LayerOutcome::PulledByPronto => Phase::PulledByPronto,
            LayerOutcome::Unpacked => Phase::Unpacked,
            LayerOutcome::Present => Phase::Present,
        }
    }
}

/// Adds `spent` to `phase` in `phases` (kept in first-seen order).
fn add_time(phases: &mut Vec<(Phase, Duration)>, phase: Phase, spent: Duration) {
    match phases.iter_mut().find(|(p, _)| *p == phase) {
        Some((_, total)) => *total += spent,
        None => phases.push((phase, spent)),
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

/// Pulls `reference` into containerd: resolves it, then under a lease
/// makes each layer's snapshot and writes the image records.
pub async fn pull(
    client: &RegistryClient,
    reference: &str,
    options: &PullOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<PullReport, PullError> {
    let mut session = Session::connect(&options.address, &options.namespace).await?;
    let parsed = parse_reference(reference)?;
    let resolving = Instant::now();
    let image = client.resolve(&parsed, &options.platform).await?;
    let resolved = resolving.elapsed();
    let chain = chain_ids(check_diff_ids(&image)?);
    // The lease keeps what is written from garbage collection until the
    // image record holds it.
    session.start_lease().await?;
    let result = Pull {
        session: &session,
        client,
        image: &image,
        name: parsed.whole(),
        chain,
        options,
        progress,
    }
    .run(&parsed)
    .await;
    session.end_lease().await;
    let mut report = result?;
    report.phases.insert(0, (Phase::Resolve, resolved));
    Ok(report)
}

/// The manifest's layers must match the config's diff IDs one to one.
fn check_diff_ids(image: &ResolvedImage) -> Result<&[String], PullError> {
    let layers = image.image.layers().len();
    let diff_ids = image.config.rootfs().diff_ids();
    if diff_ids.len() != layers {
        return Err(PullError::Layer {
            layer: image.manifest.digest.clone(),
            problem: format!(
                "the manifest has {layers} layers but the config {} diff IDs",
                diff_ids.len()
            ),
        });
    }
    Ok(diff_ids)
}

/// One pull in progress.
struct Pull<'a> {
    session: &'a Session,
    client: &'a RegistryClient,
    image: &'a ResolvedImage,
    name: String,
    /// The chain ID of every layer, bottom first.
    chain: Vec<String>,
    options: &'a PullOptions,
    progress: &'a (dyn Fn(&str) + Sync),
}

/// What `Prepare` of a layer's snapshot gave.
enum Prepared {
    /// The snapshotter made the layer itself (lazily, or whole).
    Made(LayerOutcome),
    /// An active snapshot to unpack the layer into.
    Mounts(Vec<Mount>),
}

impl Pull<'_> {
    async fn run(&self, reference: &pronto_registry::Reference) -> Result<PullReport, PullError> {
        let mut report = PullReport {
            name: self.name.clone(),
            target: self
                .image
                .index
                .as_ref()
                .unwrap_or(&self.image.manifest)
                .digest
                .clone(),
            manifest: self.image.manifest.digest.clone(),
            layers: Vec::new(),
            bytes_fetched: 0,
            phases: Vec::new(),
        };
        for (i, layer) in self.image.image.layers().iter().enumerate() {
            let started = Instant::now();
            let (outcome, fetched) = self.layer(i, layer).await?;
            add_time(&mut report.phases, Phase::of(outcome), started.elapsed());
            report.layers.push((layer.digest().to_string(), outcome));
            report.bytes_fetched += fetched;
        }
        let snapshotter = &self.options.snapshotter;
        let top = self.chain.last();
        let started = Instant::now();
        write_records(
            self.session,
            self.image,
            reference,
            &self.name,
            top,
            snapshotter,
        )
        .await?;
        add_time(&mut report.phases, Phase::Records, started.elapsed());
        Ok(report)
    }

    fn snapshots(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(self.session.channel.clone())
    }

    /// Makes the snapshot of layer `i`; returns how, and the bytes fetched.
    async fn layer(
        &self,
        i: usize,
        layer: &LayerDescriptor,
    ) -> Result<(LayerOutcome, u64), PullError> {
        let digest = layer.digest().to_string();
        if self.exists(&self.chain[i]).await {
            (self.progress)(&format!("{digest}: present"));
            return Ok((LayerOutcome::Present, 0));
        }
        let key = format!("extract-{}-{}", crate::unique(), self.chain[i]);
        let mounts = match self.prepare(i, &key).await? {
            Prepared::Made(outcome) => return Ok((outcome, 0)),
            Prepared::Mounts(mounts) => mounts,
        };
        let fetched = self.unpack_and_commit(i, layer, &key, mounts).await?;
        (self.progress)(&format!("{digest}: fetched and unpacked"));
        Ok((LayerOutcome::Unpacked, fetched))
    }

    async fn exists(&self, chain_id: &str) -> bool {
        self.snapshots()
            .stat(self.session.request(StatSnapshotRequest {
                snapshotter: self.options.snapshotter.clone(),
                key: chain_id.to_owned(),
            }))
            .await
            .is_ok()
    }

    /// Prepares layer `i`'s snapshot as `key` with the CRI labels, retrying
    /// while containerd reconnects to the snapshotter.
    async fn prepare(&self, i: usize, key: &str) -> Result<Prepared, PullError> {
        let layers = self.image.image.layers();
        let digest = layers[i].digest().to_string();
        let above: Vec<String> = layers[i..].iter().map(|l| l.digest().to_string()).collect();
        let labels = layer_labels(
            &self.chain[i],
            &self.name,
            &self.image.manifest.digest,
            &digest,
            &above,
        );
        let parent = if i == 0 {
            String::new()
        } else {
            self.chain[i - 1].clone()
        };
        let mut attempt = 0;
        let prepared = loop {
            attempt += 1;
            let request = PrepareSnapshotRequest {
                snapshotter: self.options.snapshotter.clone(),
                key: key.to_owned(),
                parent: parent.clone(),
                labels: labels.clone(),
            };
            match self
                .snapshots()
                .prepare(self.session.request(request))
                .await
            {
                Err(s) if s.code() == Code::Unavailable && attempt < PREPARE_ATTEMPTS => {
                    (self.progress)(&format!(
                        "{digest}: the snapshotter is not available yet ({}); retrying",
                        s.message()
                    ));
                    tokio::time::sleep(PREPARE_RETRY).await;
                }
                other => break other,
            }
        };
        match prepared {
            Ok(response) => Ok(Prepared::Mounts(response.into_inner().mounts)),
            Err(s) if s.code() == Code::AlreadyExists => {
                Ok(Prepared::Made(self.made_by_snapshotter(i, &digest).await))
            }
            Err(s) => Err(containerd(format!("prepare layer {digest}"))(s)),
        }
    }

    /// How the snapshotter made layer `i`, from its `pronto/layer` label.
    async fn made_by_snapshotter(&self, i: usize, digest: &str) -> LayerOutcome {
        let info = self
            .snapshots()
            .stat(self.session.request(StatSnapshotRequest {
                snapshotter: self.options.snapshotter.clone(),
                key: self.chain[i].clone(),
            }))
            .await
            .ok()
            .and_then(|r| r.into_inner().info);
        let how = info.as_ref().and_then(|i| i.labels.get(LABEL_PRONTO_LAYER));
        if how.is_some_and(|how| how == "parallel") {
            (self.progress)(&format!("{digest}: fetched whole in parallel by Pronto"));
            LayerOutcome::PulledByPronto
        } else {
            (self.progress)(&format!("{digest}: lazy (no download)"));
            LayerOutcome::Remote
        }
    }

    /// Unpacks layer `i` into the active snapshot `key` and commits it;
    /// removes the active snapshot when either fails.
    async fn unpack_and_commit(
        &self,
        i: usize,
        layer: &LayerDescriptor,
        key: &str,
        mounts: Vec<Mount>,
    ) -> Result<u64, PullError> {
        let diff_id = &self.image.config.rootfs().diff_ids()[i];
        let result = match self.unpack(layer, diff_id, mounts).await {
            Ok(fetched) => self.commit(i, key).await.map(|()| fetched),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = self
                .snapshots()
                .remove(self.session.request(RemoveSnapshotRequest {
                    snapshotter: self.options.snapshotter.clone(),
                    key: key.to_owned(),
                }))
                .await;
        }
        result
    }

    async fn commit(&self, i: usize, key: &str) -> Result<(), PullError> {
        let chain_id = self.chain[i].clone();
        let committed = self
            .snapshots()
            .commit(self.session.request(CommitSnapshotRequest {
                snapshotter: self.options.snapshotter.clone(),
                name: chain_id.clone(),
                key: key.to_owned(),
                labels: HashMap::from([(LABEL_TARGET.to_owned(), chain_id)]),
            }))
            .await;
        match committed {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(containerd(format!("commit layer {}", self.chain[i]))(s)),
        }
    }

    /// Fetches a whole layer, writes it into containerd's content store
    /// and applies it to `mounts`. Returns the bytes fetched.
    async fn unpack(
        &self,
        layer: &LayerDescriptor,
        diff_id: &str,
        mounts: Vec<Mount>,
    ) -> Result<u64, PullError> {
        let digest = layer.digest().to_string();
        let fetched = self.store_layer(layer).await?;
        let request = ApplyRequest {
            diff: Some(Descriptor {
                media_type: layer.media_type().to_string(),
                digest: digest.clone(),
                size: layer.size() as i64,
                annotations: HashMap::new(),
            }),
            mounts,
            payloads: HashMap::new(),
            sync_fs: false,
        };
        let applied = DiffClient::new(self.session.channel.clone())
            .apply(self.session.request(request))
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

    /// Puts the layer blob into containerd's content store unless it is
    /// there; returns the bytes fetched for it.
    async fn store_layer(&self, layer: &LayerDescriptor) -> Result<u64, PullError> {
        let digest = layer.digest().to_string();
        if has_content(self.session, &digest).await? {
            return Ok(0);
        }
        let path = self
            .client
            .blob_in_dir(
                &self.image.repository,
                &digest,
                layer.size(),
                &self.options.work_dir,
                ParallelFetch::default(),
            )
            .await?;
        let blob = Blob {
            digest: &digest,
            size: layer.size(),
            source: Source::File(&path),
        };
        let written = write_content(self.session, blob, HashMap::new()).await;
        let _ = std::fs::remove_file(&path);
        written?;
        Ok(layer.size())
    }
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
        use crate::validate_namespace;
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
