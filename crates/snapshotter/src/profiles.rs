//! Startup profiles on the node (see `pronto_fs::profile`): recorded while
//! an image's first containers start, prefetched when the image's layers
//! are mounted again (on this node after its cache was emptied, or on any
//! node the profile reaches).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pronto_catalog::Subject;
use pronto_catalog::profiles::{find_profiles, push_profile};
use pronto_fs::profile::{Profile, ProfileStore, Recorder, resolve};
use pronto_fs::{LazyLayer, ReadObserver};
use pronto_registry::{RegistryClient, Repository};

#[derive(Debug, Clone)]
pub struct ProfileOptions {
    /// Record what starting containers read.
    pub record: bool,
    /// Fetch a profile's ranges when an image's layers are mounted.
    pub prefetch: bool,
    /// A recording ends after this long without a new read...
    pub quiet: Duration,
    /// ...or this long after it began.
    pub limit: Duration,
    /// Range requests in flight per layer for a prefetch.
    pub parallel: usize,
    /// Starts recorded and merged into a profile; later starts only use it.
    pub record_starts: u32,
    /// Look for a profile among the image manifest's referrers when the
    /// node has none.
    pub fetch: bool,
    /// Push each recorded profile to the image's repository as a
    /// referrer of its manifest (needs push credentials).
    pub push: bool,
}

impl Default for ProfileOptions {
    fn default() -> Self {
        Self {
            record: true,
            prefetch: true,
            quiet: Duration::from_secs(3),
            limit: Duration::from_secs(60),
            parallel: 8,
            record_starts: 3,
            fetch: true,
            push: false,
        }
    }
}

/// The profiles of this node's images and the recordings in progress.
#[derive(Debug)]
pub struct Profiles {
    store: ProfileStore,
    options: ProfileOptions,
    client: RegistryClient,
    runtime: tokio::runtime::Handle,
    /// Recordings in progress by manifest digest, with the repository.
    recording: Mutex<HashMap<String, (Arc<Recorder>, Repository)>>,
    /// Lookups of a manifest's profile in the registry, by manifest: in
    /// flight (the layers of one image mounted together ask once), or
    /// found missing, and when (the other layers of the image, mounted one
    /// after another, do not ask again for [`MISS_KEPT`]).
    lookups: Mutex<HashMap<String, Lookup>>,
}

#[derive(Debug, Clone)]
enum Lookup {
    InFlight(Arc<tokio::sync::OnceCell<Option<Profile>>>),
    Missed(Instant),
}

/// How long a registry lookup that found no profile stands: long enough
/// for an image's layers to be prepared one after another (each mount
/// would otherwise ask the registry again, two requests where the
/// referrers API is missing), short enough that a profile pushed later is
/// found by a later start.
const MISS_KEPT: Duration = Duration::from_secs(60);

/// What a profile does for one mounted layer, for `pronto status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProfileUse {
    pub prefetched: bool,
    pub recording: bool,
}

impl ProfileUse {
    pub fn describe(self) -> &'static str {
        match (self.prefetched, self.recording) {
            (true, true) => "prefetched, recording",
            (true, false) => "prefetched",
            (false, true) => "recording",
            (false, false) => "",
        }
    }
}

impl Profiles {
    pub fn new(
        store: ProfileStore,
        options: ProfileOptions,
        client: RegistryClient,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            store,
            options,
            client,
            runtime,
            recording: Mutex::default(),
            lookups: Mutex::default(),
        }
    }

    pub fn store(&self) -> &ProfileStore {
        &self.store
    }

    /// The usable profile of `manifest`, read from the store at every
    /// mount (it is small, and `pronto profile rm` or a new recording may
    /// have changed it). A bad one is logged and treated as none.
    pub(crate) fn profile(&self, manifest: &str) -> Option<Profile> {
        match self.store.load(manifest) {
            Ok(profile) => profile,
            Err(e) => {
                tracing::warn!(manifest, "the startup profile is not used: {e}");
                None
            }
        }
    }

    /// A new lazy mount of `layer`, of image `manifest` in `repository`:
    /// starts fetching the layer's part of the image's profile (the
    /// node's, else one found in the registry), and returns the observer
    /// that records this start (when recording).
    pub fn on_mount(
        self: &Arc<Self>,
        repository: &Repository,
        manifest: &str,
        layer: &Arc<dyn LazyLayer>,
    ) -> (Option<Arc<dyn ReadObserver>>, ProfileUse) {
        let local = self.profile(manifest);
        let mut used = ProfileUse::default();
        if self.options.prefetch && (local.is_some() || self.options.fetch) {
            // With a profile from the registry, the layer's status says so
            // once bytes arrive.
            used.prefetched = local.is_some();
            let (profiles, layer) = (self.clone(), layer.clone());
            let (repository, manifest) = (repository.clone(), manifest.to_owned());
            let local = local.clone();
            self.runtime.spawn(async move {
                let profile = match local {
                    Some(profile) => Some(profile),
                    None => profiles.find_in_registry(&repository, &manifest).await,
                };
                if let Some(profile) = profile {
                    profiles.prefetch(&manifest, &profile, layer.as_ref()).await;
                }
            });
        }
        let wants_recording = self.options.record
            && local
                .as_ref()
                .is_none_or(|p| p.starts < self.options.record_starts);
        if !wants_recording {
            return (None, used);
        }
        let recorder = self.recorder(repository, manifest);
        used.recording = true;
        let observer: Arc<dyn ReadObserver> = Arc::new(LayerObserver {
            recorder,
            layer: layer.clone(),
        });
        (Some(observer), used)
    }

    /// Starts looking for the profile of image `manifest` in the registry,
    /// when this node fetches profiles and has none for it: the image is
    /// about to be mounted, and a mount finds the lookup done or in flight.
    pub fn look_ahead(self: &Arc<Self>, repository: &Repository, manifest: &str) {
        if !(self.options.prefetch && self.options.fetch)
            || matches!(self.store.load(manifest), Ok(Some(_)))
        {
            return;
        }
        let (profiles, repository, manifest) =
            (self.clone(), repository.clone(), manifest.to_owned());
        self.runtime.spawn(async move {
            profiles.find_in_registry(&repository, &manifest).await;
        });
    }

    /// Fetches `layer`'s ranges of `profile`.
    async fn prefetch(&self, manifest: &str, profile: &Profile, layer: &dyn LazyLayer) {
        let wanted = profile.wanted(layer.digest());
        let (ranges, dropped) = resolve(layer, &wanted);
        if dropped > 0 {
            tracing::warn!(
                manifest,
                layer = layer.digest(),
                dropped,
                "the startup profile names ranges this layer does not have; they are skipped"
            );
        }
        if ranges.is_empty() {
            return;
        }
        let fetched = layer.prefetch(&ranges, self.options.parallel).await;
        tracing::info!(
            manifest,
            layer = layer.digest(),
            ranges = ranges.len(),
            bytes = fetched,
            "fetched ahead from the startup profile"
        );
    }

    /// The profile of `manifest` among its referrers in `repository`
    /// (every one found, checked and merged), kept on the node. `None`
    /// when there is none or none is usable; asked again after
    /// [`MISS_KEPT`].
    pub(crate) async fn find_in_registry(
        &self,
        repository: &Repository,
        manifest: &str,
    ) -> Option<Profile> {
        let cell = {
            let mut lookups = self.lock_lookups();
            match lookups.get(manifest) {
                Some(Lookup::InFlight(cell)) => cell.clone(),
                Some(Lookup::Missed(at)) if at.elapsed() < MISS_KEPT => return None,
                _ => {
                    let cell = Arc::default();
                    lookups.insert(manifest.to_owned(), Lookup::InFlight(Arc::clone(&cell)));
                    cell
                }
            }
        };
        let found = cell
            .get_or_init(|| async {
                let merged = match registry_profile(&self.client, repository, manifest).await {
                    Ok(merged) => merged,
                    Err(e) => {
                        tracing::debug!(manifest, "no startup profile from the registry: {e}");
                        return None;
                    }
                };
                let profile = merged?;
                tracing::info!(
                    manifest,
                    starts = profile.starts,
                    "startup profile found in the registry"
                );
                if let Err(e) = self.store.save(&profile) {
                    tracing::warn!(manifest, "cannot keep the startup profile: {e}");
                }
                Some(profile)
            })
            .await
            .clone();
        let mut lookups = self.lock_lookups();
        lookups.retain(|_, l| !matches!(l, Lookup::Missed(at) if at.elapsed() >= MISS_KEPT));
        if found.is_none() {
            lookups.insert(manifest.to_owned(), Lookup::Missed(Instant::now()));
        } else {
            lookups.remove(manifest);
        }
        found
    }

    fn lock_lookups(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lookup>> {
        self.lookups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The recording of `manifest`'s start in progress, begun now if none.
    fn recorder(self: &Arc<Self>, repository: &Repository, manifest: &str) -> Arc<Recorder> {
        let mut recording = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((recorder, _)) = recording.get(manifest) {
            return recorder.clone();
        }
        let recorder = Arc::new(Recorder::new(
            manifest,
            self.options.quiet,
            self.options.limit,
        ));
        recording.insert(manifest.to_owned(), (recorder.clone(), repository.clone()));
        let (profiles, watched) = (self.clone(), recorder.clone());
        self.runtime.spawn(async move {
            while !watched.finished() {
                tokio::time::sleep(watched.next_check()).await;
            }
            profiles.finish(&watched);
        });
        recorder
    }

    /// Ends every recording in progress and stores what each saw (the
    /// daemon is stopping).
    pub fn finish_all(&self) {
        let recorders: Vec<Arc<Recorder>> = self
            .recording
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|(recorder, _)| recorder.clone())
            .collect();
        for recorder in recorders {
            self.finish(&recorder);
        }
    }

    /// Ends a recording and stores what it saw, merged with the profile
    /// already there.
    fn finish(&self, recorder: &Recorder) {
        let manifest = recorder.manifest().to_owned();
        let repository = self
            .recording
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&manifest)
            .map(|(_, repository)| repository);
        let (longest_gap, last_read) = recorder.timing();
        let Some(profile) = recorder.finish() else {
            tracing::debug!(manifest, "the start read nothing lazily: no profile");
            return;
        };
        match self.store.save(&profile) {
            Ok(merged) => {
                tracing::info!(
                    manifest,
                    starts = merged.starts,
                    ranges = merged.layers.iter().map(|l| l.ranges.len()).sum::<usize>(),
                    bytes = merged.bytes(),
                    longest_gap_ms = longest_gap.as_millis() as u64,
                    last_read_ms = last_read.as_millis() as u64,
                    "startup profile recorded"
                );
                if self.options.push
                    && let Some(repository) = repository
                {
                    let client = self.client.clone();
                    self.runtime.spawn(async move {
                        match push(&client, &repository, &merged).await {
                            Ok(digest) => tracing::info!(
                                manifest = merged.manifest,
                                artifact = digest,
                                "startup profile pushed to the registry"
                            ),
                            Err(e) => tracing::warn!(
                                manifest = merged.manifest,
                                "cannot push the startup profile: {e}"
                            ),
                        }
                    });
                }
            }
            Err(e) => tracing::warn!(manifest, "cannot store the startup profile: {e}"),
        }
    }
}

/// The startup profiles of image manifest `manifest` among its referrers
/// in `repository`, checked and merged into one; unusable ones are skipped
/// with a warning. `None` when there is none.
pub async fn registry_profile(
    client: &RegistryClient,
    repository: &Repository,
    manifest: &str,
) -> Result<Option<Profile>, pronto_catalog::CatalogError> {
    let mut merged: Option<Profile> = None;
    for document in find_profiles(client, repository, manifest).await? {
        match Profile::parse(&document, manifest) {
            Ok(profile) => {
                merged = Some(match merged {
                    Some(m) => m.merge(&profile),
                    None => profile,
                })
            }
            Err(e) => tracing::warn!(
                manifest,
                "a startup profile in the registry is not used: {e}"
            ),
        }
    }
    Ok(merged)
}

/// Pushes `profile` to `repository` as a referrer of its image manifest.
pub async fn push(
    client: &RegistryClient,
    repository: &Repository,
    profile: &Profile,
) -> Result<String, pronto_catalog::CatalogError> {
    let manifest = client.manifest(repository, &profile.manifest).await?;
    let subject = Subject {
        media_type: manifest.media_type.clone(),
        digest: manifest.digest.clone(),
        size: manifest.bytes.len() as u64,
    };
    push_profile(client, repository, &subject, profile.to_bytes().into()).await
}

/// Records one mounted layer's reads into its image's recording.
#[derive(Debug)]
struct LayerObserver {
    recorder: Arc<Recorder>,
    layer: Arc<dyn LazyLayer>,
}

impl ReadObserver for LayerObserver {
    fn read(&self, _layer: usize, entry: usize, offset: u64, len: u64) {
        let Some(file) = self.layer.entries().get(entry) else {
            return;
        };
        let end = offset.saturating_add(len).min(file.size);
        if offset < end {
            self.recorder
                .read(self.layer.digest(), &file.path, offset, end - offset);
        }
    }
}
