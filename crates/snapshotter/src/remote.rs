//! Remote layers: the lazy half of the snapshotter. When containerd
//! prepares a layer snapshot (`containerd.io/snapshot.ref`) and the layer
//! is chunked (eStargz, its TOC named in the manifest) or the image has a
//! Pronto index, the layer is mounted through FUSE, recorded as a
//! committed snapshot, and containerd is told it already exists.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pronto_catalog::{
    IndexSet, IndexTrust, LayerIndexRef, LocalIndexStore, TrustedIndex, find_trusted, prefix_bytes,
    verify_prefix,
};
use pronto_fs::{
    ChunkedToc, FuseMount, LazyLayer, MountOptions, Negotiated, NodeContext, OpenError, Scheduler,
    Tree, TreeMode, chunked_layer, fetch_toc, lazy_layer, mounts,
};
use pronto_registry::{
    MAX_CONFIG_SIZE, Manifest, ManifestKind, Platform, Reference, RegistryClient, Repository,
    parse_reference, platform_manifest,
};
use pronto_store::ContentCache;

use crate::ahead::Ahead;
use crate::keeper::{FUSE_PREFIX, Holders};
use crate::local::{LocalSnapshots, RemoteLayer};
use crate::profiles::{ProfileUse, Profiles};
use crate::status::{ImageStatus, LayerStatus};
use crate::whole::WholeLayers;
use pronto_metrics::metrics;

use pronto_containerd::labels::{
    LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER, LABEL_MANIFEST, LABEL_PRONTO_LAYER,
    LABEL_TARGET,
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

/// A manifest's chunked layers: layer digest → (where its TOC is and what
/// vouches for it, or why its annotations cannot be used; blob size).
type ChunkedLayers = HashMap<String, (Result<pronto_toc::TocRef, String>, u64)>;

/// Which layers of an image Pronto serves lazily: those its index set
/// covers, and the chunked ones with a usable TOC. The others come whole.
#[derive(Debug, Default, Clone)]
pub struct LazyServed {
    set: Option<IndexSet>,
    chunked: Option<Arc<ChunkedLayers>>,
}

impl LazyServed {
    pub fn serves(&self, layer: &str) -> bool {
        let chunked = self
            .chunked
            .as_ref()
            .and_then(|c| c.get(layer))
            .is_some_and(|(toc, _)| toc.is_ok());
        chunked || self.set.as_ref().is_some_and(|s| s.layer(layer).is_some())
    }
}

/// One manifest's chunked layers: being read, or read.
type ChunkedLookup = tokio::sync::OnceCell<Result<Arc<ChunkedLayers>, String>>;

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
    layer: Arc<dyn LazyLayer>,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// How it was opened, and the verified bytes it was opened from (the
    /// index prefix or the TOC): what a later daemon needs to serve it
    /// again without the registry.
    opened: Opened,
    bytes: Vec<u8>,
}

/// How a lazy layer was opened.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
enum Opened {
    /// Through a Pronto index: the set that lists it and its entry there.
    Index {
        set: IndexSet,
        layer_ref: LayerIndexRef,
    },
    /// Through a chunked layer's own TOC (eStargz or zstd:chunked).
    Chunked { chunked: ChunkedRecord },
}

/// What reopening a chunked layer needs besides its TOC.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct ChunkedRecord {
    /// `sha256:<hex>` of the TOC's JSON, as checked against the manifest.
    toc_digest: String,
    /// Where the chunks end.
    toc_offset: u64,
    /// Size of the layer blob.
    size: u64,
    /// How the chunks are compressed (records before zstd:chunked have
    /// none: gzip).
    #[serde(default = "gzip")]
    compression: pronto_toc::Compression,
}

fn gzip() -> pronto_toc::Compression {
    pronto_toc::Compression::Gzip
}

impl Opened {
    /// The file of the mount's record directory holding the verified bytes.
    fn file_name(&self) -> &'static str {
        match self {
            Opened::Index { .. } => "prefix",
            Opened::Chunked { .. } => "toc",
        }
    }
}

/// What a live mount's directory under `<root>/mounts/<id>/` records, so
/// that a later daemon can take its connection over without the registry:
/// `mount.json` (this), `prefix` (the index prefix) or `toc` (a chunked
/// layer's TOC), and `opens` (how the
/// kernel has each inode open).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct MountRecord {
    dir: PathBuf,
    /// The mount's device in the mount table: the same connection.
    device: String,
    remote: RemoteLayer,
    #[serde(flatten)]
    opened: Opened,
    negotiated: Negotiated,
    /// When the layer was mounted (seconds since the epoch).
    since: u64,
    /// How many times a new daemon took the mount over.
    handovers: u32,
}

/// How a mount is served by this daemon.
struct Serving {
    shutdown: tokio::sync::watch::Sender<bool>,
    serving: tokio::task::JoinHandle<()>,
    since: u64,
    handovers: u32,
}

/// A live lazy mount.
struct Mounted {
    image_ref: String,
    layer: Arc<dyn LazyLayer>,
    /// What the image's startup profile does for it.
    profile: ProfileUse,
    dir: PathBuf,
    since: u64,
    handovers: u32,
    /// The background fetch waits until a container uses the layer (the
    /// image was pulled to warm the node).
    background_waits: bool,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// The task serving the mount; it ends when the mount goes.
    _serving: tokio::task::JoinHandle<()>,
}

/// What warming makes local of a lazily pulled image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WarmSet {
    /// What its containers read at start: its startup profile's ranges,
    /// or, without a profile, its smallest files up to `without_profile`
    /// bytes.
    Startup { without_profile: u64 },
    /// Every byte.
    Everything,
}

/// What [`Remote::warm`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Warmed {
    /// Bytes made local.
    pub bytes: u64,
    /// Lazily mounted layers found.
    pub layers: usize,
    /// A startup profile chose the ranges.
    pub by_profile: bool,
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
    /// Chunked layers by manifest digest.
    manifests: Mutex<HashMap<String, Arc<ChunkedLookup>>>,
    /// Index prefixes (by repository and index blob) and TOCs (by
    /// repository and layer) fetched ahead of their layers' `Prepare`.
    prefixes: Ahead<Result<Vec<u8>, (Fallback, String)>>,
    tocs: Ahead<Result<ChunkedToc, (Fallback, String)>>,
    /// Holds every mount's connection while the daemon restarts; with
    /// it, mounts are recorded under `records`.
    keeper: Option<Arc<Holders>>,
    records: PathBuf,
    /// Startup profiles: recorded and prefetched when set.
    profiles: Option<Arc<Profiles>>,
    /// Images (by the name pulled) whose new mounts start no background
    /// fetch until a container uses them: images pulled to warm the node.
    warm_images: Mutex<std::collections::HashSet<String>>,
    /// The parallel pull, which a pull's look-ahead starts for the layers
    /// that come whole.
    whole: Option<(Arc<WholeLayers>, Arc<LocalSnapshots>)>,
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
        let records = layers_dir.with_file_name("mounts");
        Self {
            keeper: None,
            profiles: None,
            whole: None,
            records,
            client,
            store,
            cache,
            layers_dir,
            runtime,
            options,
            scheduler: Arc::default(),
            mounted: Mutex::new(HashMap::new()),
            warm_images: Mutex::new(std::collections::HashSet::new()),
            sets: Mutex::new(HashMap::new()),
            manifests: Mutex::new(HashMap::new()),
            prefixes: Ahead::default(),
            tocs: Ahead::default(),
        }
    }

    /// Hands every new mount's connection to `keeper`, recording under
    /// `records` what a later daemon needs to take it over.
    pub fn with_keeper(mut self, keeper: Arc<Holders>, records: PathBuf) -> Self {
        self.keeper = Some(keeper);
        self.records = records;
        self
    }

    /// Records and prefetches startup profiles with `profiles`.
    pub fn with_profiles(mut self, profiles: Arc<Profiles>) -> Self {
        self.profiles = Some(profiles);
        self
    }

    /// Lets a pull's look-ahead start the whole-layer jobs of its image's
    /// layers that come whole (into `local`'s snapshots).
    pub fn with_whole(mut self, whole: Arc<WholeLayers>, local: Arc<LocalSnapshots>) -> Self {
        self.whole = Some((whole, local));
        self
    }

    /// Stores the startup profiles being recorded (the daemon stops).
    pub fn finish_profiles(&self) {
        if let Some(profiles) = &self.profiles {
            profiles.finish_all();
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
        // The layers containerd prepares after this one (this one first).
        let above: Vec<&str> = labels
            .get(LABEL_IMAGE_LAYERS)
            .map(|l| l.split(',').filter(|d| !d.is_empty()).collect())
            .unwrap_or_default();
        let indexed = self.open_layer(&remote, &above).await?;
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
        let inodes = indexed.layer.entries().len() as i64;
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

    /// Opens a layer through its own TOC when it is chunked, or else
    /// through its image's index (fetching the index prefix), with the
    /// sender that shuts its pending reads down. What the layers `above`
    /// (prepared next) need is fetched meanwhile.
    async fn open_layer(
        &self,
        remote: &RemoteLayer,
        above: &[&str],
    ) -> Result<OpenLayer, (Fallback, String)> {
        let reference = parse_reference(&remote.image_ref)
            .map_err(|e| (Fallback::NoImageLabels, e.to_string()))?;
        let repository = Repository::of(&reference);
        let manifest = remote.manifest_digest.as_str();
        self.look_for_profile(&repository, manifest);
        let above = above.iter().copied().filter(|l| *l != remote.layer_digest);
        // The layer annotations and the index are looked up at once: a
        // chunked layer needs no index, but waiting to learn that would
        // cost the others a round trip.
        let lookup = self.index_set(&reference, manifest, None);
        let mut lookup = std::pin::pin!(lookup);
        let mut found = None;
        let chunked = {
            let annotations = self.chunked_layers(&repository, manifest);
            let mut annotations = std::pin::pin!(annotations);
            loop {
                tokio::select! {
                    // Known already for the layers after the first: the
                    // index lookup is then not even started.
                    biased;
                    chunked = &mut annotations => break chunked,
                    index = &mut lookup, if found.is_none() => found = Some(index),
                }
            }
        };
        match &chunked {
            Ok(chunked) => match chunked.get(&remote.layer_digest) {
                Some((Ok(toc), size)) => {
                    self.fetch_ahead(&repository, Some(chunked), None, above);
                    return self.open_chunked(&repository, remote, toc, *size).await;
                }
                Some((Err(e), _)) => {
                    return Err((
                        Fallback::IndexRefused,
                        format!("layer {}: {e}", remote.layer_digest),
                    ));
                }
                None => {}
            },
            Err(e) => tracing::debug!(
                manifest,
                "cannot read the manifest's layer annotations; looking for an index: {e}"
            ),
        }
        let found = match found {
            Some(found) => found,
            None => lookup.await,
        }
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
        self.fetch_ahead(&repository, chunked.as_deref().ok(), Some(&set), above);
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let node = self.node_context(shutdown);
        let Some(layer_ref) = set.layer(&remote.layer_digest) else {
            return Err((
                Fallback::LayerNotIndexed,
                format!(
                    "index {} does not cover layer {} (layers under the minimum size are not indexed)",
                    set.manifest_digest, remote.layer_digest
                ),
            ));
        };
        let prefix = self
            .prefixes
            .take(&prefix_key(&repository, layer_ref), || {
                self.fetch_prefix(&repository, &set, layer_ref)
            })
            .await?;
        let index = verify_prefix(&set, layer_ref, &prefix)
            .map_err(|e| (Fallback::IndexUnavailable, e.to_string()))?;
        let layer = lazy_layer(&node, &repository, &set, layer_ref, index);
        Ok(OpenLayer {
            layer: layer.shared(),
            shutdown: shutdown_tx,
            opened: Opened::Index {
                set: set.clone(),
                layer_ref: layer_ref.clone(),
            },
            bytes: prefix,
        })
    }

    /// Fetches the index prefix of `layer` (from the registry, or the
    /// local store for a local set), not yet verified; owns what it needs,
    /// so it can run ahead on its own.
    fn fetch_prefix(
        &self,
        repository: &Repository,
        set: &IndexSet,
        layer: &LayerIndexRef,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, (Fallback, String)>> + Send + 'static
    {
        let (client, store) = (self.client.clone(), self.store.clone());
        let (repository, set, layer) = (repository.clone(), set.clone(), layer.clone());
        async move {
            prefix_bytes(&client, Some(&store), &repository, &set, &layer)
                .await
                .map_err(|e| (Fallback::IndexUnavailable, e.to_string()))
        }
    }

    /// Starts fetching what `layers` of an image need to be opened: the
    /// TOCs of chunked ones, the index prefixes of those `set` covers.
    fn fetch_ahead<'a>(
        &self,
        repository: &Repository,
        chunked: Option<&ChunkedLayers>,
        set: Option<&IndexSet>,
        layers: impl Iterator<Item = &'a str>,
    ) {
        for layer in layers {
            if let Some((Ok(toc), size)) = chunked.and_then(|c| c.get(layer)) {
                let (client, repository) = (self.client.clone(), repository.clone());
                let (layer, toc, size) = (layer.to_owned(), toc.clone(), *size);
                self.tocs.start(
                    &self.runtime,
                    &format!("{repository}@{layer}"),
                    async move { fetch_chunked_toc(&client, &repository, &layer, size, &toc).await },
                );
            } else if let Some(set) = set
                && let Some(layer_ref) = set.layer(layer)
                && set.location != pronto_catalog::Location::Local
            {
                self.prefixes.start(
                    &self.runtime,
                    &prefix_key(repository, layer_ref),
                    self.fetch_prefix(repository, set, layer_ref),
                );
            }
        }
    }

    /// Starts looking for the startup profile of image `manifest` in the
    /// registry, when this node fetches profiles and has none for it.
    fn look_for_profile(&self, repository: &Repository, manifest: &str) {
        if let Some(profiles) = &self.profiles {
            profiles.look_ahead(repository, manifest);
        }
    }

    /// An image is about to be pulled (`pronto pull`, or kubelet's pull
    /// through the CRI proxy): looks up its manifest, config, index and
    /// startup profile, and fetches its layers' index prefixes and TOCs,
    /// while the puller resolves it too. The `Prepare` calls that follow
    /// find them ready. Failures only mean the `Prepare` calls look again.
    pub async fn expect(&self, reference: &str, platform: &Platform) {
        if let Err(e) = self.look_ahead(reference, platform).await {
            tracing::debug!(reference, "looking ahead of a pull failed: {e}");
        }
    }

    async fn look_ahead(&self, reference: &str, platform: &Platform) -> Result<(), String> {
        let reference = parse_reference(reference).map_err(|e| e.to_string())?;
        let repository = Repository::of(&reference);
        let name = reference.digest().or(reference.tag()).unwrap_or("latest");
        let top = self
            .client
            .manifest(&repository, name)
            .await
            .map_err(|e| e.to_string())?;
        let manifest = platform_manifest(&repository, &top, platform).map_err(|e| e.to_string())?;
        self.look_for_profile(&repository, &manifest);
        let image = async {
            let chunked = self.chunked_layers(&repository, &manifest).await;
            // Read once: the annotations' lookup fetched it.
            let fetched = self
                .client
                .manifest(&repository, &manifest)
                .await
                .map_err(|e| e.to_string())?;
            let ManifestKind::Image(image) = fetched.kind else {
                return Err(format!("{manifest} is not an image manifest"));
            };
            Ok((image, chunked))
        };
        let (image, found) = tokio::join!(image, self.index_set(&reference, &manifest, Some(top)));
        let (image, chunked) = image?;
        // The config is read now, alongside what follows, so that the
        // layers' `Prepare` calls find it (their diff IDs) without asking.
        let config = self.client.blob(
            &repository,
            image.config().digest().as_ref(),
            MAX_CONFIG_SIZE,
        );
        let mounted: std::collections::HashSet<String> = self
            .lock_mounted()
            .values()
            .map(|m| m.layer.digest().to_owned())
            .collect();
        let layers: Vec<String> = image
            .layers()
            .iter()
            .map(|l| l.digest().to_string())
            .filter(|l| !mounted.contains(l))
            .collect();
        let found = found.ok();
        let lazy = LazyServed {
            set: found.as_ref().and_then(|f| f.set.clone()),
            chunked: chunked.ok(),
        };
        self.fetch_ahead(
            &repository,
            lazy.chunked.as_deref(),
            lazy.set.as_ref(),
            layers.iter().map(String::as_str),
        );
        // With the index known, the layers nothing serves lazily come
        // whole: their downloads start now, without waiting for the
        // config. Not when the lookup failed: the layers' `Prepare` calls
        // look again and may find an index.
        let start_whole = async {
            let (Some((whole, local)), Some(_)) = (&self.whole, &found) else {
                return Ok(0);
            };
            let comes_whole =
                |layer: &str| !lazy.serves(layer) && layers.iter().any(|l| l == layer);
            whole
                .start_ahead(local, &reference.whole(), &manifest, comes_whole)
                .await
        };
        let (config, started) = tokio::join!(config, start_whole);
        match started {
            Ok(0) => {}
            Ok(layers) => {
                tracing::debug!(%repository, manifest, layers, "whole layers started ahead of their Prepare")
            }
            Err(e) => tracing::debug!(%repository, manifest, "whole layers not started ahead: {e}"),
        }
        config.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// The chunked (eStargz) layers of manifest `manifest`: layer digest →
    /// (TOC digest, blob size), from the manifest's layer annotations. A
    /// manifest never changes: it is asked for once per daemon, however
    /// many layers are prepared at once.
    async fn chunked_layers(
        &self,
        repository: &Repository,
        manifest: &str,
    ) -> Result<Arc<ChunkedLayers>, String> {
        let cell = {
            let mut manifests = self.manifests.lock().unwrap_or_else(|e| e.into_inner());
            if manifests.len() > MAX_REMEMBERED_SETS {
                manifests.clear();
            }
            manifests.entry(manifest.to_owned()).or_default().clone()
        };
        let found = cell
            .get_or_init(|| async {
                let fetched = self
                    .client
                    .manifest(repository, manifest)
                    .await
                    .map_err(|e| e.to_string())?;
                let ManifestKind::Image(image) = fetched.kind else {
                    return Ok(Arc::default());
                };
                Ok(Arc::new(
                    image
                        .layers()
                        .iter()
                        .filter_map(|layer| {
                            let toc = pronto_toc::TocRef::of(
                                layer.media_type().as_ref(),
                                layer.annotations().as_ref()?,
                            )?
                            .map_err(|e| e.to_string());
                            Some((layer.digest().to_string(), (toc, layer.size())))
                        })
                        .collect(),
                ))
            })
            .await
            .clone();
        if found.is_err() {
            self.manifests
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(manifest);
        }
        found
    }

    /// Opens a chunked layer through its own TOC: one or two range
    /// requests, no index needed.
    async fn open_chunked(
        &self,
        repository: &Repository,
        remote: &RemoteLayer,
        toc: &pronto_toc::TocRef,
        size: u64,
    ) -> Result<OpenLayer, (Fallback, String)> {
        let fetched = self
            .tocs
            .take(&format!("{repository}@{}", remote.layer_digest), || {
                fetch_chunked_toc(&self.client, repository, &remote.layer_digest, size, toc)
            })
            .await?;
        let opened = Opened::Chunked {
            chunked: ChunkedRecord {
                toc_digest: fetched.json_digest,
                toc_offset: fetched.chunks_end,
                size,
                compression: fetched.compression,
            },
        };
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let layer = self
            .reopen(repository, remote, &opened, &fetched.json, shutdown)
            .map_err(|e| (Fallback::IndexRefused, e))?;
        Ok(OpenLayer {
            layer,
            shutdown: shutdown_tx,
            opened,
            bytes: fetched.json,
        })
    }

    /// The layer `opened` describes, from its verified bytes (checked
    /// again: they may come from a record on disk).
    fn reopen(
        &self,
        repository: &Repository,
        remote: &RemoteLayer,
        opened: &Opened,
        bytes: &[u8],
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Arc<dyn LazyLayer>, String> {
        let node = self.node_context(shutdown);
        Ok(match opened {
            Opened::Index { set, layer_ref } => {
                let index = verify_prefix(set, layer_ref, bytes)
                    .map_err(|e| format!("the index prefix: {e}"))?;
                lazy_layer(&node, repository, set, layer_ref, index).shared()
            }
            Opened::Chunked { chunked } => chunked_layer(
                &node,
                repository,
                &remote.layer_digest,
                chunked.size,
                &ChunkedToc {
                    compression: chunked.compression,
                    json: bytes.to_vec(),
                    json_digest: chunked.toc_digest.clone(),
                    chunks_end: chunked.toc_offset,
                },
            )
            .map_err(|e| e.to_string())?
            .shared(),
        })
    }

    /// The node context a layer of this daemon reads through.
    fn node_context(&self, shutdown: tokio::sync::watch::Receiver<bool>) -> NodeContext<'_> {
        NodeContext {
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
        }
    }

    /// Which layers of the image a layer snapshot's labels name are
    /// served lazily.
    pub(crate) async fn lazy_served_for(&self, labels: &BTreeMap<String, String>) -> LazyServed {
        let reference = labels
            .get(LABEL_IMAGE_REF)
            .and_then(|r| parse_reference(r).ok());
        let (Some(reference), Some(manifest)) = (reference, labels.get(LABEL_MANIFEST)) else {
            return LazyServed::default();
        };
        let repository = Repository::of(&reference);
        let (set, chunked) = tokio::join!(
            self.index_set(&reference, manifest, None),
            self.chunked_layers(&repository, manifest)
        );
        LazyServed {
            set: set.ok().and_then(|found| found.set),
            chunked: chunked.ok(),
        }
    }

    /// The index set this node uses for image manifest `manifest` of
    /// `reference`: remembered for a while once found, its absence for a
    /// short while, and never once it is poisoned. `top` is the document
    /// the reference names, when just fetched.
    pub(crate) async fn index_set(
        &self,
        reference: &Reference,
        manifest: &str,
        top: Option<Manifest>,
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
            .get_or_init(|| self.look_up_index_set(reference, manifest, top))
            .await
            .clone()
    }

    /// Asks the registry (and the local store) for the index set this node
    /// uses for `manifest`.
    async fn look_up_index_set(
        &self,
        reference: &Reference,
        manifest: &str,
        top: Option<Manifest>,
    ) -> Result<TrustedIndex, String> {
        let repository = Repository::of(reference);
        // Bound indexes are listed in the image index the reference names.
        let image_index = match reference.digest().or(reference.tag()) {
            Some(name) if self.options.trust.accepts(pronto_catalog::Location::Bound) => {
                match top {
                    Some(top) => Some(top),
                    None => Some(
                        self.client
                            .manifest(&repository, name)
                            .await
                            .map_err(|e| e.to_string())?,
                    ),
                }
            }
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
        let OpenLayer {
            layer,
            shutdown,
            opened,
            bytes,
        } = opened;
        let tree = Tree::build(&[layer.entries()], TreeMode::OverlayLower);
        let source = layer.clone().as_source();
        let mut options = MountOptions::new(
            format!("pronto:{}@{}", remote.image_ref, remote.layer_digest),
            self.runtime.clone(),
        );
        let record_dir = self.records.join(id.to_string());
        if self.keeper.is_some() {
            // A record left by an earlier mount of this id is stale.
            let _ = std::fs::remove_dir_all(&record_dir);
            std::fs::create_dir_all(&record_dir)
                .map_err(|e| format!("cannot create {}: {e}", record_dir.display()))?;
            options.opens_file = Some(record_dir.join("opens"));
        }
        let mut profile = ProfileUse::default();
        if let Some(profiles) = &self.profiles {
            let repository = parse_reference(&remote.image_ref)
                .map(|r| Repository::of(&r))
                .map_err(|e| e.to_string())?;
            let (observer, used) = profiles.on_mount(&repository, &remote.manifest_digest, &layer);
            options.observer = observer;
            profile = used;
        }
        let mount = FuseMount::mount(tree, vec![source], self.cache.clone(), dir, &options)
            .map_err(|e| format!("cannot mount FUSE at {}: {e}", dir.display()))?;
        let since = unix_now();
        if let Some(keeper) = &self.keeper {
            let record = MountRecord {
                dir: dir.to_owned(),
                device: mounts::pronto_mount_device(dir).unwrap_or_default(),
                remote: remote.clone(),
                opened,
                negotiated: mount.channel().negotiated(),
                since,
                handovers: 0,
            };
            let kept = write_record(&record_dir, &record, Some(&bytes))
                .and_then(|()| keeper.keep(&format!("{FUSE_PREFIX}{id}"), mount.channel().fd()));
            if let Err(e) = kept {
                tracing::warn!(
                    id,
                    "the mount will not survive a restart of the daemon: cannot hand it to the keeper: {e}"
                );
            }
        }
        let serving = mount.spawn();
        if layer.entries().len() >= TRIM_AFTER {
            drop(bytes);
            give_back_freed_memory();
        }
        self.started(
            id,
            dir,
            remote,
            layer,
            profile,
            Serving {
                shutdown,
                serving,
                since,
                handovers: 0,
            },
        );
        Ok(())
    }

    /// Records a mount served by this daemon.
    fn started(
        &self,
        id: u64,
        dir: &Path,
        remote: &RemoteLayer,
        layer: Arc<dyn LazyLayer>,
        profile: ProfileUse,
        serving: Serving,
    ) {
        // A new mount: its container is about to start reading.
        self.scheduler.active();
        let background_waits = self.options.background
            && self
                .warm_images
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&remote.image_ref);
        if self.options.background && !background_waits {
            layer
                .clone()
                .start_background_fetch(self.options.background_rate);
        }
        metrics().lazy_mount_added();
        self.lock_mounted().insert(
            id,
            Mounted {
                image_ref: remote.image_ref.clone(),
                layer,
                profile,
                dir: dir.to_owned(),
                since: serving.since,
                handovers: serving.handovers,
                background_waits,
                shutdown: serving.shutdown,
                _serving: serving.serving,
            },
        );
    }

    /// Takes over the connections an earlier daemon handed to the keeper
    /// (`kept`, by name): a connection whose mount is still there and
    /// whose snapshot still exists is served again, without a new mount;
    /// any other is let go and its mount detached. Pronto mounts under the
    /// snapshots directory that no one serves are detached too. Snapshots
    /// not taken over are mounted again when containerd next uses them.
    /// Returns how many mounts were taken over.
    pub fn adopt(
        &self,
        local: &LocalSnapshots,
        kept: BTreeMap<String, std::os::fd::OwnedFd>,
    ) -> usize {
        let snapshots: HashMap<u64, RemoteLayer> = local
            .all()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|info| Some((info.record.id, info.record.remote?)))
            .collect();
        let mut adopted = 0;
        for (name, fd) in kept {
            let Some(id) = name
                .strip_prefix(FUSE_PREFIX)
                .and_then(|id| id.parse::<u64>().ok())
            else {
                continue;
            };
            match self.adopt_one(id, fd, snapshots.get(&id)) {
                Ok(()) => adopted += 1,
                Err(why) => {
                    tracing::warn!(id, "not taking the mount over: {why}");
                    self.let_go(id, Some(&local.fs_path(id)));
                }
            }
        }
        // Mounts left by a daemon that died before handing them over, or
        // whose connection ended: nothing serves them.
        let snapshots_dir = local.root().join("snapshots");
        for entry in mounts::mount_table() {
            let dir = PathBuf::from(&entry.mount_point);
            if dir.starts_with(&snapshots_dir)
                && entry.source.starts_with("pronto:")
                && entry.fs_type.starts_with("fuse")
                && !self.lock_mounted().values().any(|m| m.dir == dir)
            {
                tracing::info!(dir = %dir.display(), "detaching a lazy mount no daemon serves");
                if let Err(e) = mounts::detach_and_abort(&dir) {
                    tracing::warn!(dir = %dir.display(), "cannot detach: {e}");
                }
            }
        }
        // Records of mounts that are gone.
        if let Ok(entries) = std::fs::read_dir(&self.records) {
            for entry in entries.flatten() {
                let id = entry.file_name().to_string_lossy().parse::<u64>().ok();
                if id.is_none_or(|id| !self.is_mounted(id)) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        adopted
    }

    fn adopt_one(
        &self,
        id: u64,
        fd: std::os::fd::OwnedFd,
        snapshot: Option<&RemoteLayer>,
    ) -> Result<(), String> {
        let record_dir = self.records.join(id.to_string());
        let mut record: MountRecord = std::fs::read(record_dir.join("mount.json"))
            .map_err(|e| format!("no record: {e}"))
            .and_then(|b| serde_json::from_slice(&b).map_err(|e| format!("bad record: {e}")))?;
        if snapshot != Some(&record.remote) {
            return Err("its snapshot was removed".into());
        }
        match mounts::pronto_mount_device(&record.dir) {
            Some(device) if device == record.device => {}
            _ => return Err(format!("{} is no longer mounted", record.dir.display())),
        }
        let name = record.opened.file_name();
        let bytes = std::fs::read(record_dir.join(name)).map_err(|e| format!("no {name}: {e}"))?;
        let reference = parse_reference(&record.remote.image_ref).map_err(|e| e.to_string())?;
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let layer = self
            .reopen(
                &Repository::of(&reference),
                &record.remote,
                &record.opened,
                &bytes,
                shutdown,
            )
            .map_err(|e| format!("recorded: {e}"))?;
        let tree = Tree::build(&[layer.entries()], TreeMode::OverlayLower);
        let source = layer.clone().as_source();
        let mut options = MountOptions::new(String::new(), self.runtime.clone());
        options.opens_file = Some(record_dir.join("opens"));
        let mount = FuseMount::adopt(
            fd,
            record.negotiated,
            tree,
            vec![source],
            self.cache.clone(),
            &options,
        )
        .map_err(|e| format!("cannot take the connection over: {e}"))?;
        record.handovers += 1;
        // Every holder has it again (e.g. systemd's store, when the
        // previous daemon ran without systemd).
        if let Some(keeper) = &self.keeper
            && let Err(e) = keeper.keep(&format!("{FUSE_PREFIX}{id}"), mount.channel().fd())
        {
            tracing::warn!(id, "cannot hand the mount to the keeper again: {e}");
        }
        if let Err(e) = write_record(&record_dir, &record, None) {
            tracing::warn!(id, "cannot update the mount's record: {e}");
        }
        let serving = mount.spawn();
        if layer.entries().len() >= TRIM_AFTER {
            drop(bytes);
            give_back_freed_memory();
        }
        metrics().handover();
        tracing::info!(
            id,
            layer = record.remote.layer_digest,
            handovers = record.handovers,
            "lazy mount taken over from the previous daemon"
        );
        self.started(
            id,
            &record.dir,
            &record.remote,
            layer,
            ProfileUse::default(),
            Serving {
                shutdown: shutdown_tx,
                serving,
                since: record.since,
                handovers: record.handovers,
            },
        );
        Ok(())
    }

    /// Lets go of a kept connection and its record, and detaches its
    /// mount at `dir` if one is there.
    fn let_go(&self, id: u64, dir: Option<&Path>) {
        if let Some(keeper) = &self.keeper
            && let Err(e) = keeper.forget(&format!("{FUSE_PREFIX}{id}"))
        {
            tracing::warn!(id, "cannot tell the keeper to let the mount go: {e}");
        }
        let _ = std::fs::remove_dir_all(self.records.join(id.to_string()));
        if let Some(dir) = dir
            && mounts::is_mounted(dir)
            && let Err(e) = mounts::detach_and_abort(dir)
        {
            tracing::warn!(dir = %dir.display(), "cannot detach: {e}");
        }
    }

    /// Layers of image `name` (as pulled) mounted from now on fetch the
    /// rest of their data only once a container uses them: warming the
    /// node costs the startup set, not the image.
    pub fn background_waits_for_use(&self, name: &str) {
        self.warm_images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned());
    }

    /// A container uses the remote snapshot `id`: its background fetch
    /// starts if it was waiting for that.
    pub fn in_use(&self, id: u64) {
        let mut mounted = self.lock_mounted();
        if let Some(m) = mounted.get_mut(&id)
            && m.background_waits
        {
            m.background_waits = false;
            tracing::info!(
                layer = m.layer.digest(),
                image = m.image_ref,
                "a container uses the warmed layer: background fetch starts"
            );
            m.layer
                .clone()
                .start_background_fetch(self.options.background_rate);
        }
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
        let layer = self.open_layer(remote, &[]).await.map_err(|(_, e)| e)?;
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
        self.let_go(id, None);
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

    /// Makes the `set` of image `manifest` (in `repository`) local ahead
    /// of its containers, from its lazily mounted layers `layers`
    /// (digests): what warming a node fetches once the image is pulled.
    /// At most `parallel` range requests per layer.
    pub async fn warm(
        &self,
        repository: &Repository,
        manifest: &str,
        layers: &[String],
        set: WarmSet,
        parallel: usize,
    ) -> Warmed {
        let mounted: Vec<Arc<dyn LazyLayer>> = {
            let all = self.lock_mounted();
            let mut found: Vec<Arc<dyn LazyLayer>> = Vec::new();
            for digest in layers {
                if let Some(m) = all.values().find(|m| m.layer.digest() == digest) {
                    found.push(m.layer.clone());
                }
            }
            found
        };
        let profile = match (&self.profiles, set) {
            (Some(profiles), WarmSet::Startup { .. }) => match profiles.profile(manifest) {
                Some(profile) => Some(profile),
                None => profiles.find_in_registry(repository, manifest).await,
            },
            _ => None,
        };
        // Per layer, the ranges to fetch: (entry, offset, length).
        let mut wanted: Vec<Vec<(usize, u64, u64)>> = vec![Vec::new(); mounted.len()];
        match (set, &profile) {
            (WarmSet::Everything, _) => {
                for (ranges, layer) in wanted.iter_mut().zip(&mounted) {
                    for (i, entry) in layer.entries().iter().enumerate() {
                        if entry.size > 0 {
                            ranges.push((i, 0, entry.size));
                        }
                    }
                }
            }
            (WarmSet::Startup { .. }, Some(profile)) => {
                for (ranges, layer) in wanted.iter_mut().zip(&mounted) {
                    let (resolved, _) = pronto_fs::profile::resolve(
                        layer.as_ref(),
                        &profile.wanted(layer.digest()),
                    );
                    *ranges = resolved;
                }
            }
            (WarmSet::Startup { without_profile }, None) => {
                // No profile: the smallest files first, until the budget
                // of fetched bytes is spent. A start pays a round trip per
                // small file it opens; big files are read ahead at link
                // speed. Small files are spread over the layer, so each
                // may cost a whole span: they go in small batches, and
                // the budget is checked between them.
                const BATCH: usize = 16;
                let mut files: Vec<(u64, usize, usize)> = Vec::new();
                for (l, layer) in mounted.iter().enumerate() {
                    for (i, entry) in layer.entries().iter().enumerate() {
                        if entry.size > 0 {
                            files.push((entry.size, l, i));
                        }
                    }
                }
                files.sort_unstable();
                let mut bytes = 0;
                let mut next = files.into_iter().peekable();
                loop {
                    let batch =
                        next_small_batch(&mut next, without_profile.saturating_sub(bytes), BATCH);
                    if batch.is_empty() {
                        break;
                    }
                    let mut ranges: Vec<Vec<(usize, u64, u64)>> = vec![Vec::new(); mounted.len()];
                    for (size, l, i) in batch {
                        ranges[l].push((i, 0, size));
                    }
                    bytes += prefetch_layers(&mounted, &ranges, parallel).await;
                }
                // What is left goes to the heads of the files too big to
                // take whole: readers of big files (model weights, archives,
                // databases) read their headers first.
                let big: Vec<(u64, usize, usize)> = next.collect();
                let heads = big_file_heads(&big, without_profile.saturating_sub(bytes));
                if !heads.is_empty() {
                    let mut ranges: Vec<Vec<(usize, u64, u64)>> = vec![Vec::new(); mounted.len()];
                    for (l, i, len) in heads {
                        ranges[l].push((i, 0, len));
                    }
                    bytes += prefetch_layers(&mounted, &ranges, parallel).await;
                }
                return Warmed {
                    bytes,
                    layers: mounted.len(),
                    by_profile: false,
                };
            }
        }
        let bytes = prefetch_layers(&mounted, &wanted, parallel).await;
        Warmed {
            bytes,
            layers: mounted.len(),
            by_profile: profile.is_some(),
        }
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
            } else if mounted.background_waits {
                "waiting for a container"
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
                    size: layer.size(),
                    local_bytes: layer.local_bytes(),
                    fetched_on_demand: stats.layer_bytes.load(Ordering::Relaxed),
                    fetched_in_background: stats.background_bytes.load(Ordering::Relaxed),
                    fetched_ahead: stats.read_ahead_bytes.load(Ordering::Relaxed),
                    background: background.to_owned(),
                    snapshot_id: *id,
                    mountpoint: mounted.dir.display().to_string(),
                    served_since: mounted.since,
                    handovers: mounted.handovers,
                    fetched_by_profile: stats.profile_bytes.load(Ordering::Relaxed),
                    on_demand_requests: stats.on_demand_requests.load(Ordering::Relaxed),
                    profile: ProfileUse {
                        prefetched: mounted.profile.prefetched
                            || stats.profile_bytes.load(Ordering::Relaxed) > 0,
                        ..mounted.profile
                    }
                    .describe()
                    .to_owned(),
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

/// Where the index prefix of `layer` is kept while fetched ahead.
fn prefix_key(repository: &Repository, layer: &LayerIndexRef) -> String {
    format!("{repository}@{}", layer.blob)
}

/// Fetches a chunked layer's TOC; a TOC that does not match what the
/// manifest says refuses the layer.
async fn fetch_chunked_toc(
    client: &RegistryClient,
    repository: &Repository,
    layer: &str,
    size: u64,
    toc: &pronto_toc::TocRef,
) -> Result<ChunkedToc, (Fallback, String)> {
    fetch_toc(client, repository, layer, size, toc)
        .await
        .map_err(|e| match e {
            OpenError::Layer { .. } => (Fallback::IndexRefused, e.to_string()),
            other => (Fallback::IndexUnavailable, other.to_string()),
        })
}

/// Layers of at least this many entries leave enough freed memory behind,
/// once opened and mounted, to hand back to the system.
const TRIM_AFTER: usize = 10_000;

/// Hands the heap's free pages back to the system. Opening a big layer
/// allocates a lot for a moment: its decompressed table, the table's
/// vector as it grows, a map per directory while the tree is built.
/// glibc keeps freed memory for later allocations, and on a node that is
/// resident memory the daemon does not use: with 100,000 files, 15 MiB.
fn give_back_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes a mount's record (and the bytes it was opened from) into `dir`, each file
/// whole or not at all.
fn write_record(dir: &Path, record: &MountRecord, bytes: Option<&[u8]>) -> std::io::Result<()> {
    let write = |name: &str, bytes: &[u8]| {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(name))
    };
    if let Some(bytes) = bytes {
        write(record.opened.file_name(), bytes)?;
    }
    write(
        "mount.json",
        &serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?,
    )
}

/// Fetches `ranges[l]` (entry, offset, length) of each layer `l` of
/// `layers` at once, at most `parallel` requests per layer; returns the
/// bytes fetched.
async fn prefetch_layers(
    layers: &[Arc<dyn LazyLayer>],
    ranges: &[Vec<(usize, u64, u64)>],
    parallel: usize,
) -> u64 {
    let fetches = layers
        .iter()
        .zip(ranges)
        .filter(|(_, r)| !r.is_empty())
        .map(|(layer, r)| layer.prefetch(r, parallel.max(1)));
    futures_util::future::join_all(fetches)
        .await
        .into_iter()
        .sum()
}

/// The next batch of a warm without a startup profile: up to `most` of the
/// smallest files left (`(size, layer, entry)`, sorted by size) whose sizes
/// fit in `left` bytes. A file bigger than what is left ends the warm.
fn next_small_batch(
    files: &mut std::iter::Peekable<impl Iterator<Item = (u64, usize, usize)>>,
    mut left: u64,
    most: usize,
) -> Vec<(u64, usize, usize)> {
    let mut batch = Vec::new();
    while batch.len() < most
        && let Some(&(size, l, i)) = files.peek()
        && size <= left
    {
        batch.push((size, l, i));
        left -= size;
        files.next();
    }
    batch
}

/// The heads of big files (`(size, layer, entry)`, smallest first) a warm
/// fetches with `left` bytes: an equal share each, at least
/// [`MIN_HEAD`] (so the smallest files get theirs when there are many),
/// as `(layer, entry, length)`.
fn big_file_heads(big: &[(u64, usize, usize)], left: u64) -> Vec<(usize, usize, u64)> {
    if big.is_empty() || left < MIN_HEAD {
        return Vec::new();
    }
    let count = (left / MIN_HEAD).min(big.len() as u64);
    let share = left / count;
    big.iter()
        .take(count as usize)
        .map(|&(size, l, i)| (l, i, share.min(size)))
        .collect()
}

/// The smallest head of a big file a warm fetches.
const MIN_HEAD: u64 = 1 << 20;

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

    #[test]
    fn a_warm_without_profile_takes_small_files_that_fit_and_never_a_big_one() {
        // Sorted by size: three scripts, then a 2 GiB weights file.
        let files = vec![(10, 0, 1), (20, 0, 2), (30, 1, 0), (2 << 30, 1, 1)];
        let mut next = files.into_iter().peekable();
        assert_eq!(
            next_small_batch(&mut next, 1 << 20, 2),
            vec![(10, 0, 1), (20, 0, 2)],
            "at most the batch size"
        );
        assert_eq!(next_small_batch(&mut next, 1 << 20, 2), vec![(30, 1, 0)]);
        assert!(
            next_small_batch(&mut next, 1 << 20, 2).is_empty(),
            "the weights file is bigger than the budget"
        );
        let mut next = vec![(10, 0, 1), (20, 0, 2)].into_iter().peekable();
        assert_eq!(next_small_batch(&mut next, 25, 16), vec![(10, 0, 1)]);
    }

    #[test]
    fn what_is_left_goes_to_the_heads_of_big_files() {
        let gib = 1 << 30;
        let big = [(3 << 20, 1, 5), (gib, 0, 1), (gib, 0, 2), (2 * gib, 1, 0)];
        // 32 MiB over four files: 8 MiB each, at most the file.
        assert_eq!(
            big_file_heads(&big, 32 << 20),
            vec![
                (1, 5, 3 << 20),
                (0, 1, 8 << 20),
                (0, 2, 8 << 20),
                (1, 0, 8 << 20)
            ]
        );
        // 2 MiB: the two smallest get 1 MiB each.
        assert_eq!(
            big_file_heads(&big, 2 << 20),
            vec![(1, 5, 1 << 20), (0, 1, 1 << 20)]
        );
        assert!(big_file_heads(&big, 1000).is_empty());
        assert!(big_file_heads(&[], 32 << 20).is_empty());
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
