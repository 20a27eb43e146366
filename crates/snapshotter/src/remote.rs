//! Remote layers: the lazy half of the snapshotter. When containerd
//! prepares a layer snapshot (`containerd.io/snapshot.ref`) and the image
//! has a Pronto index, the layer is mounted through FUSE, recorded as a
//! committed snapshot, and containerd is told it already exists.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pronto_catalog::{IndexSet, IndexTrust, LocalIndexStore, TrustedIndex, find_trusted};
use pronto_fs::{
    FuseMount, IndexedLayer, LayerSource, MountOptions, NodeContext, Scheduler, Tree, TreeMode,
    mounts, open_lazy_layer,
};
use pronto_registry::{Reference, RegistryClient, Repository, parse_reference};
use pronto_store::ContentCache;

use crate::local::{LocalSnapshots, RemoteLayer};
use crate::status::{ImageStatus, LayerStatus};
use pronto_metrics::metrics;

use pronto_containerd::labels::{
    LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_PRONTO_LAYER, LABEL_TARGET,
};

/// How long "this image has no index" is remembered, so that the layers of
/// one pull ask the registry once.
const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// How long a found index set is remembered (a tag moved to a new binding
/// is seen after this).
const POSITIVE_TTL: Duration = Duration::from_secs(600);
/// At most this many images' index lookups are remembered.
const MAX_REMEMBERED_SETS: usize = 512;

/// Why a layer was not served lazily. Every fallback is logged with its
/// reason and counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fallback {
    /// containerd sent no image labels (CRI annotations are off, or the
    /// client pulled without them).
    NoImageLabels,
    /// Neither the node nor the registry has an index for the image.
    NoIndex,
    /// The image's index set does not cover this layer (too small).
    LayerNotIndexed,
    /// The index could not be fetched or verified.
    IndexUnavailable,
    /// An index exists but this node does not use it: `index.trust` does
    /// not accept how it is bound to the image, or it was found not to
    /// match its layers (poisoned).
    IndexRefused,
    /// The lazy mount could not be set up.
    MountFailed,
    /// Pronto's own whole-layer pull failed (containerd takes over).
    ParallelPullFailed,
}

impl Fallback {
    pub const ALL: [Fallback; 7] = [
        Fallback::NoImageLabels,
        Fallback::NoIndex,
        Fallback::LayerNotIndexed,
        Fallback::IndexUnavailable,
        Fallback::IndexRefused,
        Fallback::MountFailed,
        Fallback::ParallelPullFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fallback::NoImageLabels => "no-image-labels",
            Fallback::NoIndex => "no-index",
            Fallback::LayerNotIndexed => "layer-not-indexed",
            Fallback::IndexUnavailable => "index-unavailable",
            Fallback::IndexRefused => "index-refused",
            Fallback::MountFailed => "mount-failed",
            Fallback::ParallelPullFailed => "parallel-pull-failed",
        }
    }
}

/// One image's index-set lookup: in flight, or done and remembered.
struct IndexLookup {
    started: Instant,
    found: tokio::sync::OnceCell<Result<TrustedIndex, String>>,
}

impl IndexLookup {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            found: tokio::sync::OnceCell::new(),
        }
    }

    /// In flight, or done recently enough: a found set for
    /// [`POSITIVE_TTL`] unless poisoned since, no set for
    /// [`NEGATIVE_TTL`]; an error never.
    fn usable(&self, store: &LocalIndexStore) -> bool {
        let Some(found) = self.found.get() else {
            return true;
        };
        let age = self.started.elapsed();
        match found {
            Err(_) => false,
            Ok(TrustedIndex { set: Some(set), .. }) => {
                age < POSITIVE_TTL && store.poisoned(&set.manifest_digest).is_none()
            }
            Ok(_) => age < NEGATIVE_TTL,
        }
    }
}

struct OpenLayer {
    layer: Arc<IndexedLayer>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

/// A live lazy mount.
struct Mounted {
    image_ref: String,
    layer: Arc<IndexedLayer>,
    dir: PathBuf,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// The task serving the mount; it ends when the mount goes.
    _serving: tokio::task::JoinHandle<()>,
}

#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// Fetch the rest of each lazy layer in the background.
    pub background: bool,
    /// Bytes per second for background fetching (`None`: unlimited).
    pub background_rate: Option<u64>,
    /// Which indexes this node accepts (`index.trust`).
    pub trust: IndexTrust,
    /// How long one read may wait for the registry (`fetch.read_timeout`).
    pub read_timeout: std::time::Duration,
    /// How far ahead of an in-order reader to fetch (`fetch.read_ahead`).
    pub read_ahead: u64,
}

pub struct Remote {
    client: RegistryClient,
    store: LocalIndexStore,
    cache: Arc<ContentCache>,
    layers_dir: PathBuf,
    runtime: tokio::runtime::Handle,
    options: RemoteOptions,
    /// One for every mount: background fetches wait for any mount's reads.
    scheduler: Arc<Scheduler>,
    mounted: Mutex<HashMap<u64, Mounted>>,
    sets: Mutex<HashMap<String, Arc<IndexLookup>>>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote").finish_non_exhaustive()
    }
}

/// The image a layer snapshot belongs to, from containerd's labels.
struct LayerLabels<'a> {
    image_ref: &'a str,
    manifest: &'a str,
    layer: &'a str,
}

impl Remote {
    pub fn new(
        client: RegistryClient,
        store: LocalIndexStore,
        cache: Arc<ContentCache>,
        layers_dir: PathBuf,
        runtime: tokio::runtime::Handle,
        options: RemoteOptions,
    ) -> Self {
        Self {
            client,
            store,
            cache,
            layers_dir,
            runtime,
            options,
            scheduler: Arc::default(),
            mounted: Mutex::new(HashMap::new()),
            sets: Mutex::new(HashMap::new()),
        }
    }

    /// Fallbacks so far in this process, by reason (those that happened),
    /// as `pronto_fallbacks_total` counts them.
    pub fn fallback_counts(&self) -> BTreeMap<Fallback, u64> {
        Fallback::ALL
            .into_iter()
            .map(|reason| (reason, metrics().fallback_count(reason.as_str())))
            .filter(|(_, count)| *count > 0)
            .collect()
    }

    /// Number of live lazy mounts.
    pub fn mounted_count(&self) -> usize {
        self.lock_mounted().len()
    }

    fn lock_mounted(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Mounted>> {
        self.mounted.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records and logs a fallback.
    pub fn fall_back(
        &self,
        reason: Fallback,
        target: &str,
        labels: &BTreeMap<String, String>,
        detail: &str,
        action: &str,
    ) {
        let count = metrics().fallback(reason.as_str());
        let image = labels
            .get(LABEL_IMAGE_REF)
            .map(String::as_str)
            .unwrap_or("-");
        let layer = labels.get(LABEL_LAYER).map(String::as_str).unwrap_or("-");
        macro_rules! log {
            ($level:ident) => {
                tracing::$level!(
                    reason = reason.as_str(),
                    count,
                    image,
                    layer,
                    chain = target,
                    "not lazy: {action}: {detail}"
                )
            };
        }
        // Small layers are left out of indexes on purpose: worth a line,
        // not a warning.
        if reason == Fallback::LayerNotIndexed {
            log!(info);
        } else {
            log!(warn);
        }
    }

    /// Tries to serve the layer snapshot `target` (over `parent`) lazily.
    /// On success the committed snapshot `target` exists.
    pub async fn mount_layer(
        &self,
        local: &LocalSnapshots,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), (Fallback, String)> {
        let (Some(image_ref), Some(manifest), Some(layer)) = (
            labels.get(LABEL_IMAGE_REF),
            labels.get(LABEL_MANIFEST),
            labels.get(LABEL_LAYER),
        ) else {
            return Err((
                Fallback::NoImageLabels,
                "no cri.image-ref/manifest-digest/layer-digest labels (set disable_snapshot_annotations = false, or pull with `pronto pull`)".into(),
            ));
        };
        let image = LayerLabels {
            image_ref,
            manifest,
            layer,
        };
        let remote = RemoteLayer {
            image_ref: image.image_ref.to_owned(),
            manifest_digest: image.manifest.to_owned(),
            layer_digest: image.layer.to_owned(),
        };
        let indexed = self.open_layer(&remote).await?;
        // Database commits and mount(2) block: this worker thread is
        // handed over to them.
        tokio::task::block_in_place(|| {
            self.commit_lazy(local, target, parent, labels, remote, indexed)
        })
    }

    /// Mounts an opened layer and records it as the committed snapshot
    /// `target`.
    fn commit_lazy(
        &self,
        local: &LocalSnapshots,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
        remote: RemoteLayer,
        indexed: OpenLayer,
    ) -> Result<(), (Fallback, String)> {
        let (id, dir) = local
            .reserve()
            .map_err(|e| (Fallback::MountFailed, e.to_string()))?;
        let inodes = indexed.layer.index().meta().entries.len() as i64;
        if let Err(e) = self.mount_at(id, &dir, &remote, indexed) {
            local.abandon(id);
            return Err((Fallback::MountFailed, e));
        }
        let mut stored = labels.clone();
        stored.insert(LABEL_TARGET.into(), target.into());
        stored.insert(LABEL_PRONTO_LAYER.into(), "lazy".into());
        let (image, layer) = (remote.image_ref.clone(), remote.layer_digest.clone());
        match local.insert_committed(target, id, parent, stored, Some(remote), (0, inodes)) {
            Ok(()) => {
                tracing::info!(image, layer, chain = target, id, "layer mounted lazily");
                Ok(())
            }
            Err(e) => {
                // Another Prepare committed the same layer meanwhile.
                self.release(id, false);
                local.abandon(id);
                match local.get(target) {
                    Ok(Some(_)) => Ok(()),
                    _ => Err((Fallback::MountFailed, e.to_string())),
                }
            }
        }
    }

    /// Opens a layer through its index (fetching the index prefix), with
    /// the sender that shuts its pending reads down.
    async fn open_layer(&self, remote: &RemoteLayer) -> Result<OpenLayer, (Fallback, String)> {
        let reference = parse_reference(&remote.image_ref)
            .map_err(|e| (Fallback::NoImageLabels, e.to_string()))?;
        let repository = Repository::of(&reference);
        let found = self
            .index_set(&reference, &remote.manifest_digest)
            .await
            .map_err(|e| (Fallback::IndexUnavailable, e))?;
        let set = match found.set {
            Some(set) => set,
            None if !found.refused.is_empty() => {
                return Err((Fallback::IndexRefused, found.refused.join("; ")));
            }
            None => {
                return Err((
                    Fallback::NoIndex,
                    format!(
                        "no Pronto index for {}@{} (create one with `pronto index create --bind`)",
                        remote.image_ref, remote.manifest_digest
                    ),
                ));
            }
        };
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let node = NodeContext {
            client: &self.client,
            store: &self.store,
            trust: &self.options.trust,
            read_timeout: self.options.read_timeout,
            read_ahead: self.options.read_ahead,
            scheduler: self.scheduler.clone(),
            cache: self.cache.clone(),
            layers_dir: self.layers_dir.clone(),
            runtime: self.runtime.clone(),
            shutdown,
        };
        let Some(layer_ref) = set.layer(&remote.layer_digest) else {
            return Err((
                Fallback::LayerNotIndexed,
                format!(
                    "index {} does not cover layer {} (layers under the minimum size are not indexed)",
                    set.manifest_digest, remote.layer_digest
                ),
            ));
        };
        let layer = open_lazy_layer(&node, &repository, &set, layer_ref)
            .await
            .map_err(|e| (Fallback::IndexUnavailable, e.to_string()))?;
        Ok(OpenLayer {
            layer: layer.shared(),
            shutdown: shutdown_tx,
        })
    }

    /// The index set of the image a layer snapshot's labels name, if any.
    pub(crate) async fn index_set_for(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> Option<IndexSet> {
        let reference = parse_reference(labels.get(LABEL_IMAGE_REF)?).ok()?;
        let manifest = labels.get(LABEL_MANIFEST)?;
        self.index_set(&reference, manifest).await.ok()?.set
    }

    /// The index set this node uses for image manifest `manifest` of
    /// `reference`: remembered for a while once found, its absence for a
    /// short while, and never once it is poisoned.
    pub(crate) async fn index_set(
        &self,
        reference: &Reference,
        manifest: &str,
    ) -> Result<TrustedIndex, String> {
        // The lock is held only to find or start a lookup, never across
        // the network: Prepares of other images go on, and those of the
        // same image join the lookup in flight.
        let lookup = {
            let mut sets = self.sets.lock().unwrap_or_else(|e| e.into_inner());
            match sets.get(manifest) {
                Some(lookup) if lookup.usable(&self.store) => lookup.clone(),
                _ => {
                    if sets.len() >= MAX_REMEMBERED_SETS {
                        sets.retain(|_, l| l.started.elapsed() < NEGATIVE_TTL);
                        if sets.len() >= MAX_REMEMBERED_SETS {
                            sets.clear();
                        }
                    }
                    let lookup = Arc::new(IndexLookup::new());
                    sets.insert(manifest.to_owned(), lookup.clone());
                    lookup
                }
            }
        };
        lookup
            .found
            .get_or_init(|| self.look_up_index_set(reference, manifest))
            .await
            .clone()
    }

    /// Asks the registry (and the local store) for the index set this node
    /// uses for `manifest`.
    async fn look_up_index_set(
        &self,
        reference: &Reference,
        manifest: &str,
    ) -> Result<TrustedIndex, String> {
        let repository = Repository::of(reference);
        // Bound indexes are listed in the image index the reference names.
        let image_index = match reference.digest().or(reference.tag()) {
            Some(name) if self.options.trust.accepts(pronto_catalog::Location::Bound) => Some(
                self.client
                    .manifest(&repository, name)
                    .await
                    .map_err(|e| e.to_string())?,
            ),
            _ => None,
        };
        find_trusted(
            &self.client,
            &self.store,
            &repository,
            manifest,
            image_index.as_ref(),
            &self.options.trust,
        )
        .await
        .map_err(|e| e.to_string())
    }

    fn mount_at(
        &self,
        id: u64,
        dir: &Path,
        remote: &RemoteLayer,
        opened: OpenLayer,
    ) -> Result<(), String> {
        let OpenLayer { layer, shutdown } = opened;
        let tree = Tree::build(&[layer.entries()], TreeMode::OverlayLower);
        let source: Arc<dyn LayerSource> = layer.clone();
        let options = MountOptions::new(
            format!("pronto:{}@{}", remote.image_ref, remote.layer_digest),
            self.runtime.clone(),
        );
        let mount = FuseMount::mount(tree, vec![source], self.cache.clone(), dir, &options)
            .map_err(|e| format!("cannot mount FUSE at {}: {e}", dir.display()))?;
        let serving = mount.spawn();
        // A new mount: its container is about to start reading.
        self.scheduler.active();
        if self.options.background {
            layer.start_background_fetch(self.options.background_rate);
        }
        metrics().lazy_mount_added();
        self.lock_mounted().insert(
            id,
            Mounted {
                image_ref: remote.image_ref.clone(),
                layer,
                dir: dir.to_owned(),
                shutdown,
                _serving: serving,
            },
        );
        Ok(())
    }

    /// Mounts again, after a restart, every remote snapshot that is not
    /// mounted. A stale mount left by the previous process is detached
    /// first. Returns the snapshots that could not be mounted.
    pub async fn restore(&self, local: &LocalSnapshots) -> Vec<(String, String)> {
        let mut failed = Vec::new();
        let Ok(all) = local.all() else {
            return failed;
        };
        for info in all {
            let Some(remote) = &info.record.remote else {
                continue;
            };
            if let Err(e) = self.ensure_mounted(local, info.record.id, remote).await {
                tracing::error!(
                    snapshot = info.name,
                    layer = remote.layer_digest,
                    "cannot mount the layer again: {e}"
                );
                failed.push((info.name.clone(), e));
            }
        }
        failed
    }

    /// Makes sure the remote snapshot `id` is served by this process.
    pub async fn ensure_mounted(
        &self,
        local: &LocalSnapshots,
        id: u64,
        remote: &RemoteLayer,
    ) -> Result<(), String> {
        if self.lock_mounted().contains_key(&id) {
            return Ok(());
        }
        let dir = local.fs_path(id);
        tokio::task::block_in_place(|| {
            if mounts::is_mounted(&dir) {
                // Left by a previous process: its connection is dead.
                mounts::detach_and_abort(&dir)
                    .map_err(|e| format!("cannot detach stale mount {}: {e}", dir.display()))?;
            }
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))
        })?;
        let layer = self.open_layer(remote).await.map_err(|(_, e)| e)?;
        if self.lock_mounted().contains_key(&id) {
            return Ok(());
        }
        tokio::task::block_in_place(|| self.mount_at(id, &dir, remote, layer))?;
        tracing::info!(id, layer = remote.layer_digest, "layer mounted again");
        Ok(())
    }

    /// Unmounts remote snapshot `id`; with `drop_cache`, its cached data
    /// is removed too unless another mount serves the same layer.
    pub fn release(&self, id: u64, drop_cache: bool) {
        let Some(mounted) = self.lock_mounted().remove(&id) else {
            return;
        };
        metrics().lazy_mount_removed();
        let _ = mounted.shutdown.send(true);
        if let Err(e) = mounts::detach_and_abort(&mounted.dir) {
            tracing::warn!("cannot unmount {}: {e}", mounted.dir.display());
        }
        let digest = mounted.layer.digest().to_owned();
        let shared = self
            .lock_mounted()
            .values()
            .any(|m| m.layer.digest() == digest);
        if drop_cache && !shared {
            match self.cache.remove(&mounted.layer.all_cache_keys()) {
                Ok(freed) => {
                    tracing::info!(layer = digest, freed, "layer unmounted, cache released")
                }
                Err(e) => tracing::warn!(layer = digest, "cannot release cached data: {e}"),
            }
        }
    }

    /// Unmounts everything (daemon shutdown). Cached data stays.
    pub fn release_all(&self) {
        let ids: Vec<u64> = self.lock_mounted().keys().copied().collect();
        for id in ids {
            self.release(id, false);
        }
    }

    pub fn is_mounted(&self, id: u64) -> bool {
        self.lock_mounted().contains_key(&id)
    }

    /// What is mounted lazily, by image, and how much of it is local.
    pub fn status(&self) -> Vec<ImageStatus> {
        let mut images: BTreeMap<String, Vec<LayerStatus>> = BTreeMap::new();
        for (id, mounted) in self.lock_mounted().iter() {
            let layer = &mounted.layer;
            let stats = layer.stats();
            let background = if stats.complete.load(Ordering::SeqCst) {
                "complete"
            } else if stats.background_failed.load(Ordering::SeqCst) {
                "failed"
            } else if self.options.background {
                "running"
            } else {
                "off"
            };
            images
                .entry(mounted.image_ref.clone())
                .or_default()
                .push(LayerStatus {
                    digest: layer.digest().to_owned(),
                    size: layer.index().meta().layer.size,
                    local_bytes: layer.local_bytes(),
                    fetched_on_demand: stats.layer_bytes.load(Ordering::Relaxed),
                    fetched_in_background: stats.background_bytes.load(Ordering::Relaxed),
                    fetched_ahead: stats.read_ahead_bytes.load(Ordering::Relaxed),
                    background: background.to_owned(),
                    snapshot_id: *id,
                    mountpoint: mounted.dir.display().to_string(),
                });
        }
        images
            .into_iter()
            .map(|(reference, mut layers)| {
                layers.sort_by_key(|l| l.snapshot_id);
                ImageStatus { reference, layers }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(digest: &str) -> IndexSet {
        IndexSet {
            manifest_digest: digest.to_owned(),
            subject: format!("sha256:{}", "1".repeat(64)),
            span_size: 4 << 20,
            layers: Vec::new(),
            location: pronto_catalog::Location::Bound,
        }
    }

    #[tokio::test]
    async fn lookups_are_joined_while_in_flight_and_dropped_when_poisoned_or_failed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalIndexStore::open(dir.path()).unwrap();
        let digest = format!("sha256:{}", "a".repeat(64));

        let in_flight = IndexLookup::new();
        assert!(in_flight.usable(&store), "joined while in flight");

        let failed = IndexLookup::new();
        failed.found.set(Err("registry down".into())).unwrap();
        assert!(!failed.usable(&store), "an error is asked again");

        let found = IndexLookup::new();
        let trusted = TrustedIndex {
            set: Some(set(&digest)),
            refused: Vec::new(),
        };
        found.found.set(Ok(trusted)).unwrap();
        assert!(found.usable(&store));
        store.poison(&digest, "forged").unwrap();
        assert!(!found.usable(&store), "a poisoned set is not used again");

        let none = IndexLookup::new();
        none.found.set(Ok(TrustedIndex::default())).unwrap();
        assert!(none.usable(&store), "no index is remembered briefly");
    }
}
