//! Startup profiles on the node (see `pronto_fs::profile`): recorded while
//! an image's first containers start, prefetched when the image's layers
//! are mounted again (on this node after its cache was emptied, or on any
//! node the profile reaches).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pronto_fs::profile::{Profile, ProfileStore, Recorder, resolve};
use pronto_fs::{IndexedLayer, LayerSource, ReadObserver};

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
        }
    }
}

/// The profiles of this node's images and the recordings in progress.
#[derive(Debug)]
pub struct Profiles {
    store: ProfileStore,
    options: ProfileOptions,
    runtime: tokio::runtime::Handle,
    recording: Mutex<HashMap<String, Arc<Recorder>>>,
}

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
        runtime: tokio::runtime::Handle,
    ) -> Self {
        Self {
            store,
            options,
            runtime,
            recording: Mutex::default(),
        }
    }

    pub fn store(&self) -> &ProfileStore {
        &self.store
    }

    /// The usable profile of `manifest`, read from the store at every
    /// mount (it is small, and `pronto profile rm` or a new recording may
    /// have changed it). A bad one is logged and treated as none.
    fn profile(&self, manifest: &str) -> Option<Profile> {
        match self.store.load(manifest) {
            Ok(profile) => profile,
            Err(e) => {
                tracing::warn!(manifest, "the startup profile is not used: {e}");
                None
            }
        }
    }

    /// A new lazy mount of `layer`, of image `manifest`: starts fetching
    /// the layer's part of the image's profile, and returns the observer
    /// that records this start (when recording).
    pub fn on_mount(
        self: &Arc<Self>,
        manifest: &str,
        layer: &Arc<IndexedLayer>,
    ) -> (Option<Arc<dyn ReadObserver>>, ProfileUse) {
        let profile = self.profile(manifest);
        let mut used = ProfileUse::default();
        if self.options.prefetch
            && let Some(profile) = &profile
        {
            let wanted = profile.wanted(layer.digest());
            let (ranges, dropped) = resolve(layer.as_ref(), &wanted);
            if dropped > 0 {
                tracing::warn!(
                    manifest,
                    layer = layer.digest(),
                    dropped,
                    "the startup profile names ranges this layer does not have; they are skipped"
                );
            }
            if !ranges.is_empty() {
                used.prefetched = true;
                let (layer, parallel) = (layer.clone(), self.options.parallel);
                let manifest = manifest.to_owned();
                self.runtime.spawn(async move {
                    let fetched = layer.prefetch(&ranges, parallel).await;
                    tracing::info!(
                        manifest,
                        layer = layer.digest(),
                        ranges = ranges.len(),
                        bytes = fetched,
                        "fetched ahead from the startup profile"
                    );
                });
            }
        }
        let wants_recording = self.options.record
            && profile
                .as_ref()
                .is_none_or(|p| p.starts < self.options.record_starts);
        if !wants_recording {
            return (None, used);
        }
        let recorder = self.recorder(manifest);
        used.recording = true;
        let observer: Arc<dyn ReadObserver> = Arc::new(LayerObserver {
            recorder,
            layer: layer.clone(),
        });
        (Some(observer), used)
    }

    /// The recording of `manifest`'s start in progress, begun now if none.
    fn recorder(self: &Arc<Self>, manifest: &str) -> Arc<Recorder> {
        let mut recording = self.recording.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(recorder) = recording.get(manifest) {
            return recorder.clone();
        }
        let recorder = Arc::new(Recorder::new(
            manifest,
            self.options.quiet,
            self.options.limit,
        ));
        recording.insert(manifest.to_owned(), recorder.clone());
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
            .cloned()
            .collect();
        for recorder in recorders {
            self.finish(&recorder);
        }
    }

    /// Ends a recording and stores what it saw, merged with the profile
    /// already there.
    fn finish(&self, recorder: &Recorder) {
        let manifest = recorder.manifest().to_owned();
        self.recording
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&manifest);
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
                    "startup profile recorded"
                );
            }
            Err(e) => tracing::warn!(manifest, "cannot store the startup profile: {e}"),
        }
    }
}

/// Records one mounted layer's reads into its image's recording.
#[derive(Debug)]
struct LayerObserver {
    recorder: Arc<Recorder>,
    layer: Arc<IndexedLayer>,
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
