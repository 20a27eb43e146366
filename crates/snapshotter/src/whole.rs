//! Layers that must come whole (no index, or too small to have one) are
//! fetched and unpacked by Pronto itself: parallel range requests, several
//! layers at once, verified, then committed as a snapshot, and containerd
//! is told the layer exists. containerd would fetch them a few at a time
//! over single connections and unpack them one by one.
//!
//! containerd prepares layers bottom up, one after the other. When it asks
//! for the first whole layer of an image, Pronto starts jobs for it and
//! every whole layer above it (from the image's manifest), so downloads and
//! unpacks overlap; each later `Prepare` waits for its layer's job. A pull
//! announced ahead starts them earlier still, once the image manifest and
//! its index are known ([`WholeLayers::start_ahead`]): a job needs only the
//! manifest, and the unpacked tar is checked against the config's diff ID
//! when its `Prepare` claims it. The settings mirror SOCI's parallel pull
//! mode.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_spec::image::ImageConfiguration;
use pronto_registry::{
    ManifestKind, ParallelFetch, RegistryClient, RegistryError, Repository, parse_reference,
};
use tokio::sync::{Semaphore, watch};

use crate::SnapshotError;
use crate::local::{LocalSnapshots, disk_usage};
use crate::remote::LazyServed;
use crate::unpack::{Compression, UnpackError, unpack};
use pronto_containerd::labels::{
    LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_PRONTO_LAYER, LABEL_TARGET,
};
use pronto_metrics::{ErrorKind, Purpose, metrics};
use pronto_registry::feed;

/// Layers of one image downloading at once. The lowest layers go first and
/// get all the image's ranges, so they finish (and unpack) early instead of
/// every layer finishing at the end on a bandwidth-limited link.
const LAYERS_DOWNLOADING_PER_IMAGE: usize = 2;
/// Unpacked layers nobody asked for are dropped this long after their job
/// ended.
const UNCLAIMED_TTL: Duration = Duration::from_secs(600);

/// Limits and behaviour of whole-layer pulls (`[pull]` in the config).
#[derive(Debug, Clone)]
pub struct PullSettings {
    /// Range requests in flight on the node.
    pub max_concurrent_downloads: usize,
    /// Range requests in flight for one image.
    pub max_concurrent_downloads_per_image: usize,
    /// Bytes per range request.
    pub concurrent_download_chunk_size: u64,
    /// Layers being unpacked at once on the node.
    pub max_concurrent_unpacks: usize,
    /// Layers of one image being unpacked at once.
    pub max_concurrent_unpacks_per_image: usize,
    /// Delete a layer's compressed blob once it is unpacked (otherwise it
    /// stays under `<root>/layers`).
    pub discard_unpacked_layers: bool,
    /// Bytes an unpack leaves free on the filesystem of the snapshots; a
    /// layer that would eat into them fails (0: no check).
    pub min_free_space: u64,
}

impl Default for PullSettings {
    fn default() -> Self {
        Self {
            max_concurrent_downloads: 64,
            max_concurrent_downloads_per_image: 32,
            concurrent_download_chunk_size: 8 << 20,
            max_concurrent_unpacks: 4,
            max_concurrent_unpacks_per_image: 2,
            discard_unpacked_layers: true,
            min_free_space: 1 << 30,
        }
    }
}

/// Why a whole-layer pull did not produce a snapshot.
#[derive(Debug, Clone)]
pub enum WholeError {
    /// The layer is hostile or malformed, or does not fit on the node: the
    /// pull must fail.
    Rejected(String),
    /// Anything else (network, registry, disk): containerd may try itself.
    Failed(String),
}

#[derive(Debug)]
struct Layer {
    digest: String,
    size: u64,
    media_type: String,
}

#[derive(Debug)]
struct ImageInfo {
    repository: Repository,
    /// The image config, which holds the layers' diff IDs.
    config: String,
    /// The config's diff IDs, once a `Prepare` has read them.
    diff_ids: tokio::sync::OnceCell<Vec<String>>,
    layers: Vec<Layer>,
    downloads: Arc<Semaphore>,
    unpacks: Arc<Semaphore>,
    /// Layers downloading at once (FIFO: bottom layers first).
    layer_slots: Arc<Semaphore>,
}

/// A layer unpacked into a reserved snapshot directory, not yet checked
/// against the image config.
#[derive(Debug, Clone)]
struct Done {
    id: u64,
    usage: (i64, i64),
    /// The digest of the tar the layer unpacked to.
    diff_id: String,
}

type JobResult = Option<Result<Done, WholeError>>;

struct Job {
    result: watch::Receiver<JobResult>,
    /// Tells this job from a later one of the same layer.
    number: u64,
}

pub struct WholeLayers {
    client: RegistryClient,
    layers_dir: PathBuf,
    settings: PullSettings,
    downloads: Arc<Semaphore>,
    unpacks: Arc<Semaphore>,
    /// Images being pulled, by manifest digest, with when they were last
    /// asked for; pruned by [`prune_images`].
    images: tokio::sync::Mutex<HashMap<String, (Instant, Arc<ImageInfo>)>>,
    jobs: Mutex<HashMap<String, Job>>,
    jobs_started: std::sync::atomic::AtomicU64,
    /// [`UNCLAIMED_TTL`], shorter in tests.
    unclaimed_ttl: Duration,
}

/// An image's layer list is kept this long after its last use, so the
/// layers of one pull share its limits.
const IMAGE_KEPT: Duration = Duration::from_secs(600);
/// At most this many images are remembered; unused ones go first.
const MAX_IMAGES: usize = 256;

/// Forgets images nobody uses that were last asked for longer ago than
/// [`IMAGE_KEPT`], and unused ones beyond [`MAX_IMAGES`], oldest first.
fn prune_images<T>(images: &mut HashMap<String, (Instant, Arc<T>)>, now: Instant) {
    images.retain(|_, (used, info)| {
        Arc::strong_count(info) > 1 || now.duration_since(*used) < IMAGE_KEPT
    });
    if images.len() <= MAX_IMAGES {
        return;
    }
    let mut unused: Vec<(Instant, String)> = images
        .iter()
        .filter(|(_, (_, info))| Arc::strong_count(info) == 1)
        .map(|(k, (used, _))| (*used, k.clone()))
        .collect();
    unused.sort();
    let excess = images.len() - MAX_IMAGES;
    for (_, key) in unused.into_iter().take(excess) {
        images.remove(&key);
    }
}

impl std::fmt::Debug for WholeLayers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WholeLayers")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl WholeLayers {
    pub fn new(client: RegistryClient, layers_dir: PathBuf, settings: PullSettings) -> Self {
        remove_stale_partials(&layers_dir);
        Self {
            client,
            layers_dir,
            downloads: Arc::new(Semaphore::new(settings.max_concurrent_downloads.max(1))),
            unpacks: Arc::new(Semaphore::new(settings.max_concurrent_unpacks.max(1))),
            settings,
            images: tokio::sync::Mutex::new(HashMap::new()),
            jobs: Mutex::new(HashMap::new()),
            jobs_started: std::sync::atomic::AtomicU64::new(0),
            unclaimed_ttl: UNCLAIMED_TTL,
        }
    }

    fn lock_jobs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Job>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the committed snapshot `target` (over `parent`) from the
    /// layer named in `labels`, fetched and unpacked by Pronto. `lazy`
    /// tells which layers above are served lazily and need no job.
    pub async fn prepare(
        self: &Arc<Self>,
        local: &Arc<LocalSnapshots>,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        lazy: &LazyServed,
    ) -> Result<(), WholeError> {
        let failed = |e: String| WholeError::Failed(e);
        let (Some(image_ref), Some(manifest), Some(digest)) = (
            labels.get(LABEL_IMAGE_REF),
            labels.get(LABEL_MANIFEST),
            labels.get(LABEL_LAYER),
        ) else {
            return Err(failed("no image labels".into()));
        };
        let image = self.image(image_ref, manifest).await.map_err(failed)?;
        let Some(position) = image.layers.iter().position(|l| &l.digest == digest) else {
            return Err(failed(format!("manifest {manifest} has no layer {digest}")));
        };
        // This layer and every whole layer above it start now.
        for layer in &image.layers[position..] {
            if layer.digest != *digest && lazy.serves(&layer.digest) {
                continue;
            }
            self.start(local, &image, layer);
        }
        let (mut result, number) = {
            let jobs = self.lock_jobs();
            match jobs.get(digest) {
                Some(job) => (job.result.clone(), job.number),
                None => return Err(failed("the layer's job vanished".into())),
            }
        };
        let finished = async {
            let done = match result.wait_for(Option::is_some).await {
                Ok(r) => r.clone().expect("waited for a result"),
                Err(_) => Err(failed("the layer's job stopped".into())),
            };
            // Claimed: nothing drops it now, and the next Prepare of this
            // layer starts afresh.
            let mut jobs = self.lock_jobs();
            match jobs.get(digest) {
                Some(job) if job.number == number => {
                    jobs.remove(digest);
                    done
                }
                // Claimed by another Prepare of the same layer, or dropped.
                _ => Err(failed(
                    "another Prepare of the same layer took its result".into(),
                )),
            }
        };
        let (done, expected) = tokio::join!(finished, self.diff_id(&image, position));
        let done = done?;
        // The snapshot is named by a chain ID made from the config's diff
        // IDs: what the layer unpacked to must be what the config says.
        let problem = match expected {
            Ok(expected) if expected == done.diff_id => None,
            Ok(expected) => Some(WholeError::Rejected(format!(
                "layer {digest}: unpacks to {}, but the image config says {expected}",
                done.diff_id
            ))),
            Err(e) => Some(failed(e)),
        };
        if let Some(problem) = problem {
            local.abandon(done.id);
            return Err(problem);
        }
        let mut stored = labels.clone();
        stored.insert(LABEL_TARGET.into(), target.into());
        stored.insert(LABEL_PRONTO_LAYER.into(), "parallel".into());
        match local.insert_committed(target, done.id, parent, stored, None, done.usage) {
            Ok(()) => Ok(()),
            Err(SnapshotError::AlreadyExists(_)) => {
                local.abandon(done.id);
                Ok(())
            }
            Err(e) => {
                local.abandon(done.id);
                Err(failed(e.to_string()))
            }
        }
    }

    /// Starts the jobs of the layers of image `manifest` (pulled as
    /// `image_ref`) that will come whole (`whole` says which) and are not
    /// on the node, before containerd prepares them. A pull's look-ahead
    /// calls this as soon as it has the manifest and the image's index,
    /// while the config is still on its way: the first whole layer's
    /// download then takes no round trip of its own on the way to the
    /// container's start. A layer counts as on the node when a committed
    /// snapshot carries its digest (the label containerd's CRI and
    /// `pronto pull` set). Returns how many jobs it asked for.
    pub async fn start_ahead(
        self: &Arc<Self>,
        local: &Arc<LocalSnapshots>,
        image_ref: &str,
        manifest: &str,
        whole: impl Fn(&str) -> bool,
    ) -> Result<usize, String> {
        let image = self.image(image_ref, manifest).await?;
        let present = {
            let local = local.clone();
            tokio::task::spawn_blocking(move || committed_layers(&local))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
        };
        let mut asked = 0;
        for layer in &image.layers {
            if whole(&layer.digest) && !present.contains(&layer.digest) {
                self.start(local, &image, layer);
                asked += 1;
            }
        }
        Ok(asked)
    }

    /// The diff ID the config of `image` gives its layer at `position`.
    async fn diff_id(&self, image: &ImageInfo, position: usize) -> Result<String, String> {
        let diff_ids = image
            .diff_ids
            .get_or_try_init(|| self.diff_ids(image))
            .await?;
        Ok(diff_ids[position].clone())
    }

    /// The layers' diff IDs in the config of `image`, one per layer.
    async fn diff_ids(&self, image: &ImageInfo) -> Result<Vec<String>, String> {
        let bytes = self
            .client
            .blob(
                &image.repository,
                &image.config,
                pronto_registry::MAX_CONFIG_SIZE,
            )
            .await
            .map_err(|e| e.to_string())?;
        let config: ImageConfiguration =
            serde_json::from_slice(&bytes).map_err(|e| format!("config {}: {e}", image.config))?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != image.layers.len() {
            return Err(format!(
                "config {} has {} diff IDs for {} layers",
                image.config,
                diff_ids.len(),
                image.layers.len()
            ));
        }
        Ok(diff_ids.clone())
    }

    /// The image's layers and its limits, from its manifest.
    async fn image(&self, image_ref: &str, manifest: &str) -> Result<Arc<ImageInfo>, String> {
        let mut images = self.images.lock().await;
        let now = Instant::now();
        if let Some((used, info)) = images.get_mut(manifest) {
            *used = now;
            return Ok(info.clone());
        }
        prune_images(&mut images, now);
        let reference = parse_reference(image_ref).map_err(|e| e.to_string())?;
        let repository = Repository::of(&reference);
        let fetched = self
            .client
            .manifest(&repository, manifest)
            .await
            .map_err(|e| e.to_string())?;
        let ManifestKind::Image(image) = &fetched.kind else {
            return Err(format!("{manifest} is not an image manifest"));
        };
        let info = Arc::new(ImageInfo {
            repository,
            config: image.config().digest().to_string(),
            diff_ids: tokio::sync::OnceCell::new(),
            layers: image
                .layers()
                .iter()
                .map(|l| Layer {
                    digest: l.digest().to_string(),
                    size: l.size(),
                    media_type: l.media_type().to_string(),
                })
                .collect(),
            downloads: Arc::new(Semaphore::new(
                self.settings.max_concurrent_downloads_per_image.max(1),
            )),
            unpacks: Arc::new(Semaphore::new(
                self.settings.max_concurrent_unpacks_per_image.max(1),
            )),
            layer_slots: Arc::new(Semaphore::new(LAYERS_DOWNLOADING_PER_IMAGE)),
        });
        images.insert(manifest.to_owned(), (now, info.clone()));
        Ok(info)
    }

    /// Starts the job of `layer` unless one is running or waiting to be
    /// claimed. A result nobody claims within [`UNCLAIMED_TTL`] of its end
    /// is dropped, and what it unpacked deleted.
    fn start(self: &Arc<Self>, local: &Arc<LocalSnapshots>, image: &Arc<ImageInfo>, layer: &Layer) {
        let mut jobs = self.lock_jobs();
        if jobs.contains_key(&layer.digest) {
            return;
        }
        let (tx, rx) = watch::channel(None);
        let number = self
            .jobs_started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        jobs.insert(layer.digest.clone(), Job { result: rx, number });
        let (this, local, image) = (self.clone(), local.clone(), image.clone());
        let digest = layer.digest.clone();
        tokio::spawn(async move {
            let layer = image
                .layers
                .iter()
                .find(|l| l.digest == digest)
                .expect("layer of this image");
            let started = Instant::now();
            let result = this.run(&local, &image, layer).await;
            match &result {
                Ok(done) => tracing::info!(
                    image = %image.repository,
                    layer = layer.digest,
                    bytes = layer.size,
                    id = done.id,
                    seconds = started.elapsed().as_secs_f64(),
                    "layer fetched in parallel and unpacked"
                ),
                Err(e) => {
                    metrics().error(ErrorKind::ParallelPull);
                    tracing::warn!(
                        image = %image.repository,
                        layer = layer.digest,
                        "whole-layer pull failed: {e:?}"
                    );
                }
            }
            let _ = tx.send(Some(result));
            tokio::time::sleep(this.unclaimed_ttl).await;
            this.drop_unclaimed(&local, &digest, number);
        });
    }

    /// Drops job `number` of layer `digest` if no `Prepare` has claimed
    /// it (an aborted pull, or a look-ahead whose pull never came),
    /// deleting what it unpacked.
    fn drop_unclaimed(&self, local: &LocalSnapshots, digest: &str, number: u64) {
        let mut jobs = self.lock_jobs();
        if jobs.get(digest).is_none_or(|job| job.number != number) {
            return;
        }
        let job = jobs.remove(digest).expect("just seen");
        if let Some(Ok(done)) = &*job.result.borrow() {
            local.abandon(done.id);
            tracing::info!(
                layer = digest,
                "an unpacked layer no pull claimed was deleted"
            );
        }
    }

    async fn run(
        &self,
        local: &Arc<LocalSnapshots>,
        image: &ImageInfo,
        layer: &Layer,
    ) -> Result<Done, WholeError> {
        let failed = |e: String| WholeError::Failed(e);
        let compression = Compression::from_media_type(&layer.media_type).ok_or_else(|| {
            failed(format!(
                "layer media type {} is not supported",
                layer.media_type
            ))
        })?;
        std::fs::create_dir_all(&self.layers_dir)
            .map_err(|e| failed(format!("{}: {e}", self.layers_dir.display())))?;
        let hex = layer
            .digest
            .strip_prefix("sha256:")
            .unwrap_or(&layer.digest);
        let blob = self.layers_dir.join(hex);
        if blob.exists() {
            // Kept from an earlier pull (`discard_unpacked_layers = false`).
            let _node = self.unpacks.acquire().await.expect("never closed");
            let _image = image.unpacks.acquire().await.expect("never closed");
            let file = std::fs::File::open(&blob)
                .map_err(|e| failed(format!("{}: {e}", blob.display())))?;
            let reader = std::io::BufReader::with_capacity(1 << 20, file);
            let (id, unpacked) =
                unpack_reserved(local, compression, self.settings.min_free_space, reader).await?;
            return settle(local, layer, id, Ok(()), unpacked);
        }
        let _slot = image.layer_slots.acquire().await.expect("never closed");
        let _node = self.unpacks.acquire().await.expect("never closed");
        let _image = image.unpacks.acquire().await.expect("never closed");
        // The blob is written to `<hex>.pulling` as it arrives, in order,
        // so that a pull interrupted (a crash, a restart, a lost registry)
        // goes on from the bytes it has: they are read back, and checked
        // with the rest against the layer digest.
        let partial = self.layers_dir.join(format!("{hex}.pulling"));
        let (keep, resume) = tokio::task::block_in_place(|| open_partial(&partial, layer.size))
            .map_err(|e| failed(format!("{}: {e}", partial.display())))?;
        if let Some(resume) = &resume {
            tracing::info!(
                layer = layer.digest,
                have = resume.len,
                size = layer.size,
                "resuming an interrupted pull of the layer"
            );
        }
        let resumed = resume.as_ref().map_or(0, |r| r.len);
        let plan = ParallelFetch {
            chunk_size: self.settings.concurrent_download_chunk_size.max(1 << 20),
            concurrency: self.settings.max_concurrent_downloads_per_image.max(1),
            limits: vec![self.downloads.clone(), image.downloads.clone()],
        };
        // The layer is unpacked while it downloads, into a reserved
        // directory nobody sees; it is committed (by `prepare`) only when
        // the blob matched the layer digest and the tar the config's diff
        // ID.
        let (mut feed, reader) = feed::channel(Some(keep));
        let asked = Instant::now();
        let downloading = async {
            let fetched = self
                .client
                .blob_parallel_into(
                    &image.repository,
                    &layer.digest,
                    layer.size,
                    plan,
                    &mut feed,
                    resume,
                )
                .await;
            if matches!(fetched, Err(RegistryError::DigestMismatch { .. })) {
                // The kept bytes may be what did not match: start over.
                let _ = std::fs::remove_file(&partial);
            }
            let fetched = fetched.map_err(|e| e.to_string());
            let kept = feed
                .finish()
                .await
                .map_err(|e| format!("{}: {e}", partial.display()));
            tracing::debug!(
                layer = layer.digest,
                ms = asked.elapsed().as_millis() as u64,
                "whole layer downloaded"
            );
            fetched.and(kept)
        };
        let (unpacking, downloaded) = tokio::join!(
            unpack_reserved(local, compression, self.settings.min_free_space, reader),
            downloading
        );
        let (id, unpacked) = unpacking?;
        tracing::debug!(
            layer = layer.digest,
            ms = asked.elapsed().as_millis() as u64,
            "whole layer unpacked"
        );
        match (&downloaded, &unpacked) {
            (Ok(()), Ok(_)) if !self.settings.discard_unpacked_layers => {
                std::fs::rename(&partial, &blob).map_err(|e| failed(e.to_string()))?;
            }
            // Done with, or the layer itself is bad (its download was
            // complete and verified, its unpack failed).
            (Ok(()), _) => {
                let _ = std::fs::remove_file(&partial);
            }
            // Kept for the next pull of the layer to go on from (a digest
            // mismatch removed it above).
            (Err(_), _) => {}
        }
        if downloaded.is_ok() {
            metrics().fetched(Purpose::WholeLayer, layer.size - resumed);
        }
        settle(local, layer, id, downloaded, unpacked)
    }
}

/// The layers of the node's committed snapshots, by the layer digest their
/// labels carry.
fn committed_layers(
    local: &LocalSnapshots,
) -> Result<std::collections::HashSet<String>, SnapshotError> {
    Ok(local
        .all()?
        .into_iter()
        .filter(|info| info.record.kind == crate::local::Kind::Committed)
        .filter_map(|info| info.record.labels.get(LABEL_LAYER).cloned())
        .collect())
}

/// How long the bytes of an interrupted pull are kept for a pull of the
/// same layer to go on from.
const PARTIAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Removes interrupted pulls no pull went on from within [`PARTIAL_TTL`].
fn remove_stale_partials(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = path.extension().is_some_and(|e| e == "pulling")
            && entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > PARTIAL_TTL);
        if stale {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Opens the partial download of a layer of `size` bytes at `path`: the
/// file to append to, and what it already holds to resume from.
fn open_partial(
    path: &std::path::Path,
    size: u64,
) -> std::io::Result<(std::fs::File, Option<pronto_registry::Resume>)> {
    use std::io::Seek;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    let len = file.metadata()?.len();
    if len > size {
        file.set_len(0)?;
    }
    let have = file.seek(std::io::SeekFrom::End(0))?;
    let resume = if have > 0 {
        let mut reader = std::fs::File::open(path)?;
        reader.rewind()?;
        Some(pronto_registry::Resume {
            file: reader,
            len: have,
        })
    } else {
        None
    };
    Ok((file, resume))
}

/// What an unpack into a reserved directory left: its disk usage and the
/// digest of its tar.
type Unpacked = ((i64, i64), String);

/// Reserves a snapshot directory and unpacks `blob` into it on a blocking
/// thread. The caller checks the diff ID and commits or abandons the
/// returned snapshot ID.
async fn unpack_reserved(
    local: &Arc<LocalSnapshots>,
    compression: Compression,
    min_free: u64,
    blob: impl std::io::Read + Send + 'static,
) -> Result<(u64, Result<Unpacked, UnpackError>), WholeError> {
    let (id, dir) = local
        .reserve()
        .map_err(|e| WholeError::Failed(e.to_string()))?;
    let unpacked = tokio::task::spawn_blocking(move || {
        let unpacked = unpack(blob, compression, &dir, min_free)?;
        let usage = disk_usage(&dir).map_err(|e| UnpackError::Read(e.to_string()))?;
        Ok((usage, unpacked.diff_id))
    })
    .await;
    match unpacked {
        Ok(result) => Ok((id, result)),
        Err(e) => {
            local.abandon(id);
            Err(WholeError::Failed(format!("the unpack task failed: {e}")))
        }
    }
}

/// The outcome of a layer whose download and unpack have both ended: done
/// only if both succeeded; otherwise its directory is abandoned and a
/// rejected tar is reported before a failed download (which the rejection
/// may have caused by no longer reading).
fn settle(
    local: &LocalSnapshots,
    layer: &Layer,
    id: u64,
    downloaded: Result<(), String>,
    unpacked: Result<Unpacked, UnpackError>,
) -> Result<Done, WholeError> {
    match (downloaded, unpacked) {
        (Ok(()), Ok((usage, diff_id))) => Ok(Done { id, usage, diff_id }),
        // Handing the layer to containerd would not help: it is hostile,
        // or it would fill the disk there too.
        (_, Err(e @ (UnpackError::Rejected { .. } | UnpackError::NoSpace { .. }))) => {
            local.abandon(id);
            Err(WholeError::Rejected(format!("layer {}: {e}", layer.digest)))
        }
        (Err(e), _) => {
            local.abandon(id);
            Err(WholeError::Failed(e))
        }
        (Ok(()), Err(e)) => {
            local.abandon(id);
            Err(WholeError::Failed(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole_layers(dir: &std::path::Path, unclaimed_ttl: Duration) -> Arc<WholeLayers> {
        let client = RegistryClient::new(pronto_registry::ClientConfig::default()).unwrap();
        let mut whole = WholeLayers::new(client, dir.join("layers"), PullSettings::default());
        whole.unclaimed_ttl = unclaimed_ttl;
        Arc::new(whole)
    }

    /// A job of `digest` that has ended with `result`, as `start` leaves it.
    fn ended_job(whole: &WholeLayers, digest: &str, result: Result<Done, WholeError>) -> u64 {
        // The result stays readable after its sender is gone.
        let (_, rx) = watch::channel(Some(result));
        let number = whole
            .jobs_started
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        whole
            .lock_jobs()
            .insert(digest.to_owned(), Job { result: rx, number });
        number
    }

    #[test]
    fn an_unpacked_layer_no_pull_claims_is_deleted_and_a_later_job_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let local = LocalSnapshots::open(&dir.path().join("snapshots")).unwrap();
        let whole = whole_layers(dir.path(), UNCLAIMED_TTL);
        let (id, unpacked) = local.reserve().unwrap();
        std::fs::write(unpacked.join("file"), "unpacked").unwrap();
        let done = Done {
            id,
            usage: (1, 1),
            diff_id: "sha256:tar".into(),
        };
        let first = ended_job(&whole, "sha256:layer", Ok(done.clone()));
        // A job that is not the one the timer was set for stays.
        whole.drop_unclaimed(&local, "sha256:layer", first + 1);
        assert!(whole.lock_jobs().contains_key("sha256:layer"));
        assert!(unpacked.exists());
        whole.drop_unclaimed(&local, "sha256:layer", first);
        assert!(whole.lock_jobs().is_empty());
        assert!(!unpacked.exists(), "what the job unpacked is deleted");
        // Claimed (gone from the map) before its time: nothing to drop.
        let (id, kept) = local.reserve().unwrap();
        let second = ended_job(&whole, "sha256:layer", Ok(Done { id, ..done }));
        whole.lock_jobs().remove("sha256:layer");
        whole.drop_unclaimed(&local, "sha256:layer", second);
        assert!(kept.exists(), "a claimed layer's directory stays");
    }

    #[tokio::test]
    async fn a_job_nobody_claims_is_let_go_after_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let local = Arc::new(LocalSnapshots::open(&dir.path().join("snapshots")).unwrap());
        let whole = whole_layers(dir.path(), Duration::from_millis(300));
        let reference = parse_reference("127.0.0.1:1/none/image:v1").unwrap();
        let image = Arc::new(ImageInfo {
            repository: Repository::of(&reference),
            config: "sha256:config".into(),
            diff_ids: tokio::sync::OnceCell::new(),
            // A media type Pronto does not unpack: the job ends at once.
            layers: vec![Layer {
                digest: "sha256:layer".into(),
                size: 1,
                media_type: "application/x-not-a-layer".into(),
            }],
            downloads: Arc::new(Semaphore::new(1)),
            unpacks: Arc::new(Semaphore::new(1)),
            layer_slots: Arc::new(Semaphore::new(1)),
        });
        whole.start(&local, &image, &image.layers[0]);
        let mut result = whole.lock_jobs()["sha256:layer"].result.clone();
        let ended = result.wait_for(Option::is_some).await.unwrap().clone();
        assert!(
            matches!(ended, Some(Err(WholeError::Failed(_)))),
            "{ended:?}"
        );
        assert!(
            whole.lock_jobs().contains_key("sha256:layer"),
            "kept to be claimed"
        );
        // Asked for again meanwhile: the job in the map answers.
        whole.start(&local, &image, &image.layers[0]);
        assert_eq!(whole.lock_jobs().len(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(whole.lock_jobs().is_empty(), "let go after its time");
    }

    #[test]
    fn remembered_images_are_bounded_and_the_ones_in_use_stay() {
        let start = Instant::now();
        let mut images = HashMap::new();
        let in_use = Arc::new(());
        images.insert("busy".to_owned(), (start, in_use.clone()));
        for i in 0..MAX_IMAGES + 10 {
            let when = start + Duration::from_millis(i as u64);
            images.insert(format!("image{i}"), (when, Arc::new(())));
        }
        let soon = start + Duration::from_secs(1);
        prune_images(&mut images, soon);
        assert_eq!(images.len(), MAX_IMAGES);
        assert!(images.contains_key("busy"), "in use: kept");
        assert!(!images.contains_key("image0"), "the oldest unused go first");
        assert!(images.contains_key(&format!("image{}", MAX_IMAGES + 9)));

        let later = soon + IMAGE_KEPT;
        prune_images(&mut images, later);
        assert_eq!(images.len(), 1, "only the image in use is left");
        drop(in_use);
        prune_images(&mut images, later);
        assert!(images.is_empty());
    }
}
