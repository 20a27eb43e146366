//! Startup profiles: which file ranges of an image's lazy layers its
//! containers read when they start, in first-read order, learned from real
//! starts and prefetched at later ones.
//!
//! A profile is bound to one image manifest digest and names, per layer
//! (by digest), file paths and byte ranges within them. Paths rather than
//! offsets in the layer keep it independent of the layer's format: any
//! layer that can be mounted lazily can resolve a path and fetch a range
//! of it. A profile read from disk or a registry is checked before use;
//! whatever it names that the image does not have is dropped with a
//! warning, never failing a start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::LayerSource;

/// The document's version; a reader refuses any other.
pub const PROFILE_VERSION: u32 = 1;

/// At most this many ranges per layer and bytes in all are kept: a start
/// that reads everything does not make a profile that fetches everything.
pub const MAX_RANGES_PER_LAYER: usize = 20_000;
pub const MAX_PROFILE_BYTES: u64 = 2 << 30;
/// A profile file larger than this is not read at all.
pub const MAX_DOCUMENT_BYTES: u64 = 16 << 20;
/// Reads of one file closer than this are recorded as one range.
const JOIN_GAP: u64 = 64 * 1024;

/// A learned startup profile of one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub version: u32,
    /// The image manifest digest the profile was recorded for.
    pub manifest: String,
    /// How many starts were merged into it.
    pub starts: u32,
    pub layers: Vec<LayerProfile>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerProfile {
    /// The layer's digest.
    pub digest: String,
    /// In first-read order.
    pub ranges: Vec<FileRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRange {
    /// The file's path in the layer, as in its tar (no leading `/`).
    pub path: String,
    pub offset: u64,
    pub len: u64,
    /// How many of the merged starts read it.
    #[serde(default = "one")]
    pub seen: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProfileError {
    #[error("not a Pronto profile: {0}")]
    Invalid(String),
    #[error("profile version {0} is not understood (this Pronto reads version {PROFILE_VERSION})")]
    Version(u32),
    #[error("the profile is of image {found}, not {expected}")]
    OtherImage { found: String, expected: String },
    #[error("the profile is {0} bytes, more than a profile may be")]
    TooLarge(u64),
}

impl Profile {
    /// Parses and checks a profile document for image `manifest`.
    pub fn parse(bytes: &[u8], manifest: &str) -> Result<Self, ProfileError> {
        if bytes.len() as u64 > MAX_DOCUMENT_BYTES {
            return Err(ProfileError::TooLarge(bytes.len() as u64));
        }
        let profile: Profile =
            serde_json::from_slice(bytes).map_err(|e| ProfileError::Invalid(e.to_string()))?;
        if profile.version != PROFILE_VERSION {
            return Err(ProfileError::Version(profile.version));
        }
        if profile.manifest != manifest {
            return Err(ProfileError::OtherImage {
                found: profile.manifest,
                expected: manifest.to_owned(),
            });
        }
        Ok(profile)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a profile serialises")
    }

    /// Total bytes the profile asks for.
    pub fn bytes(&self) -> u64 {
        self.layers
            .iter()
            .flat_map(|l| &l.ranges)
            .map(|r| r.len)
            .sum()
    }

    /// The ranges of layer `digest` that at least half of the merged
    /// starts read, in order.
    pub fn wanted(&self, digest: &str) -> Vec<FileRange> {
        self.layer(digest)
            .map(|l| {
                l.ranges
                    .iter()
                    .filter(|r| r.seen * 2 >= self.starts)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The ranges of layer `digest`.
    pub fn layer(&self, digest: &str) -> Option<&LayerProfile> {
        self.layers.iter().find(|l| l.digest == digest)
    }

    /// This profile and `other` (a later start of the same image) as one,
    /// counting how many starts read each range; the order is this
    /// profile's, then what only `other` read. [`Self::wanted`] picks the
    /// ranges to prefetch.
    pub fn merge(&self, other: &Profile) -> Profile {
        let starts = self.starts + other.starts;
        let mut layers: Vec<LayerProfile> = Vec::new();
        let digests = self
            .layers
            .iter()
            .chain(&other.layers)
            .map(|l| l.digest.clone());
        for digest in digests {
            if layers.iter().any(|l| l.digest == digest) {
                continue;
            }
            let mut ranges: Vec<FileRange> = Vec::new();
            let mut at: HashMap<(String, u64, u64), usize> = HashMap::new();
            for layer in [self.layer(&digest), other.layer(&digest)]
                .into_iter()
                .flatten()
            {
                for range in &layer.ranges {
                    let key = (range.path.clone(), range.offset, range.len);
                    match at.get(&key) {
                        Some(&i) => ranges[i].seen += range.seen,
                        None => {
                            at.insert(key, ranges.len());
                            ranges.push(range.clone());
                        }
                    }
                }
            }
            layers.push(LayerProfile { digest, ranges });
        }
        layers.retain(|l| !l.ranges.is_empty());
        Profile {
            version: PROFILE_VERSION,
            manifest: self.manifest.clone(),
            starts,
            layers,
        }
    }
}

/// Where a node keeps its profiles: `<dir>/<algorithm>-<hex>.json`.
#[derive(Debug, Clone)]
pub struct ProfileStore {
    dir: PathBuf,
}

impl ProfileStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn path(&self, manifest: &str) -> Option<PathBuf> {
        let (algorithm, hex) = manifest.split_once(':')?;
        let valid = matches!(algorithm, "sha256" | "sha512")
            && !hex.is_empty()
            && hex.bytes().all(|b| b.is_ascii_hexdigit());
        valid.then(|| self.dir.join(format!("{algorithm}-{hex}.json")))
    }

    /// The profile of `manifest`; `Ok(None)` when there is none, an error
    /// (to be logged) when the file is bad.
    pub fn load(&self, manifest: &str) -> Result<Option<Profile>, ProfileError> {
        let Some(path) = self.path(manifest) else {
            return Err(ProfileError::Invalid(format!(
                "{manifest:?} is not a digest"
            )));
        };
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() > MAX_DOCUMENT_BYTES => {
                return Err(ProfileError::TooLarge(meta.len()));
            }
            Ok(_) => {}
            Err(_) => return Ok(None),
        }
        match std::fs::read(&path) {
            Ok(bytes) => Profile::parse(&bytes, manifest).map(Some),
            Err(_) => Ok(None),
        }
    }

    /// Stores `profile`, merged with the one already there (if readable).
    pub fn save(&self, profile: &Profile) -> std::io::Result<Profile> {
        let path = self
            .path(&profile.manifest)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a digest"))?;
        let merged = match self.load(&profile.manifest) {
            Ok(Some(old)) => old.merge(profile),
            _ => profile.clone(),
        };
        std::fs::create_dir_all(&self.dir)?;
        let mut file = tempfile::NamedTempFile::new_in(&self.dir)?;
        std::io::Write::write_all(&mut file, &merged.to_bytes())?;
        file.persist(&path).map_err(|e| e.error)?;
        Ok(merged)
    }

    pub fn remove(&self, manifest: &str) -> std::io::Result<bool> {
        let Some(path) = self.path(manifest) else {
            return Ok(false);
        };
        match std::fs::remove_file(path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Every stored profile: (manifest digest, file).
    pub fn list(&self) -> Vec<(String, PathBuf)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found: Vec<(String, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let stem = name.strip_suffix(".json")?;
                let (algorithm, hex) = stem.split_once('-')?;
                Some((format!("{algorithm}:{hex}"), e.path()))
            })
            .collect();
        found.sort();
        found
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The ranges of `profile` for `layer`, as (entry, offset, len) the layer
/// can read: paths it does not have, and ranges past a file's end, are
/// dropped (counted in the second value).
pub fn resolve(layer: &dyn LayerSource, ranges: &[FileRange]) -> (Vec<(usize, u64, u64)>, usize) {
    let by_path: HashMap<&str, usize> = layer
        .entries()
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == pronto_layer::EntryKind::File)
        .map(|(i, e)| (e.path.as_str(), i))
        .collect();
    let mut resolved = Vec::new();
    let mut dropped = 0;
    let mut total = 0u64;
    for range in ranges.iter().take(MAX_RANGES_PER_LAYER) {
        let Some(&entry) = by_path.get(range.path.trim_start_matches('/')) else {
            dropped += 1;
            continue;
        };
        let size = layer.entries()[entry].size;
        if range.offset >= size || range.len == 0 || total >= MAX_PROFILE_BYTES {
            dropped += 1;
            continue;
        }
        let len = range.len.min(size - range.offset);
        total += len;
        resolved.push((entry, range.offset, len));
    }
    dropped += ranges.len().saturating_sub(MAX_RANGES_PER_LAYER);
    (resolved, dropped)
}

/// What one start of an image reads, recorded until it has been quiet for
/// `quiet` or `limit` has passed since the first mount.
#[derive(Debug)]
pub struct Recorder {
    manifest: String,
    started: Instant,
    quiet: Duration,
    limit: Duration,
    state: Mutex<RecorderState>,
}

#[derive(Debug, Default)]
struct RecorderState {
    /// Layer digest → ranges in first-read order.
    layers: Vec<(String, Vec<FileRange>)>,
    /// (layer, path) → index of its last range, to extend it.
    last: HashMap<(usize, String), usize>,
    bytes: u64,
    last_read: Option<Instant>,
    /// The longest time between two reads so far: what `quiet` must
    /// exceed not to cut a start short.
    longest_gap: Duration,
    done: bool,
}

impl Recorder {
    pub fn new(manifest: &str, quiet: Duration, limit: Duration) -> Self {
        Self {
            manifest: manifest.to_owned(),
            started: Instant::now(),
            quiet,
            limit,
            state: Mutex::default(),
        }
    }

    pub fn manifest(&self) -> &str {
        &self.manifest
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes a read of `len` bytes at `offset` of `path` in layer
    /// `digest`.
    pub fn read(&self, digest: &str, path: &str, offset: u64, len: u64) {
        let now = Instant::now();
        let mut state = self.lock();
        if state.done || now.duration_since(self.started) > self.limit {
            return;
        }
        if let Some(last) = state.last_read {
            state.longest_gap = state.longest_gap.max(now.duration_since(last));
        }
        state.last_read = Some(now);
        if state.bytes >= MAX_PROFILE_BYTES {
            return;
        }
        let layer = match state.layers.iter().position(|(d, _)| d == digest) {
            Some(i) => i,
            None => {
                state.layers.push((digest.to_owned(), Vec::new()));
                state.layers.len() - 1
            }
        };
        let key = (layer, path.to_owned());
        if let Some(&i) = state.last.get(&key) {
            let range = &mut state.layers[layer].1[i];
            let (start, end) = (range.offset, range.offset + range.len);
            if offset + len >= start && offset <= end + JOIN_GAP {
                let new_start = start.min(offset);
                let new_end = end.max(offset + len);
                let grown = (new_end - new_start) - range.len;
                range.offset = new_start;
                range.len = new_end - new_start;
                state.bytes += grown;
                return;
            }
        }
        if state.layers[layer].1.len() >= MAX_RANGES_PER_LAYER {
            return;
        }
        let ranges = &mut state.layers[layer].1;
        ranges.push(FileRange {
            path: path.to_owned(),
            offset,
            len,
            seen: 1,
        });
        let i = ranges.len() - 1;
        state.last.insert(key, i);
        state.bytes += len;
    }

    /// True once the start has been quiet long enough, or ran out of time.
    pub fn finished(&self) -> bool {
        let state = self.lock();
        let now = Instant::now();
        state.done
            || now.duration_since(self.started) > self.limit
            || state
                .last_read
                .is_some_and(|last| now.duration_since(last) >= self.quiet)
    }

    /// How long until [`Self::finished`] may turn true.
    pub fn next_check(&self) -> Duration {
        let state = self.lock();
        let now = Instant::now();
        let by_limit = (self.started + self.limit).saturating_duration_since(now);
        let by_quiet = match state.last_read {
            Some(last) => (last + self.quiet).saturating_duration_since(now),
            None => self.quiet,
        };
        by_limit.min(by_quiet).max(Duration::from_millis(100))
    }

    /// How the recorded start went in time: the longest pause between two
    /// reads, and when the last read came after the recording began. The
    /// log shows both, to tune `quiet` and `limit`.
    pub fn timing(&self) -> (Duration, Duration) {
        let state = self.lock();
        let last = state
            .last_read
            .map_or(Duration::ZERO, |last| last.duration_since(self.started));
        (state.longest_gap, last)
    }

    /// Ends the recording; `None` when nothing was read.
    pub fn finish(&self) -> Option<Profile> {
        let mut state = self.lock();
        state.done = true;
        let layers: Vec<LayerProfile> = state
            .layers
            .drain(..)
            .filter(|(_, ranges)| !ranges.is_empty())
            .map(|(digest, ranges)| LayerProfile { digest, ranges })
            .collect();
        (!layers.is_empty()).then(|| Profile {
            version: PROFILE_VERSION,
            manifest: self.manifest.clone(),
            starts: 1,
            layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: &str = "sha256:aaaa";

    fn range(path: &str, offset: u64, len: u64) -> FileRange {
        FileRange {
            path: path.into(),
            offset,
            len,
            seen: 1,
        }
    }

    #[test]
    fn the_longest_pause_between_reads_is_kept() {
        let recorder = Recorder::new(M, Duration::from_secs(5), Duration::from_secs(60));
        recorder.read("sha256:l1", "bin/app", 0, 4096);
        std::thread::sleep(Duration::from_millis(60));
        recorder.read("sha256:l1", "lib/a.so", 0, 4096);
        recorder.read("sha256:l1", "lib/b.so", 0, 4096);
        let (gap, last) = recorder.timing();
        assert!(gap >= Duration::from_millis(60), "{gap:?}");
        assert!(last >= gap, "{last:?}");
    }

    #[test]
    fn reads_are_kept_in_first_read_order_and_neighbours_join() {
        let recorder = Recorder::new(M, Duration::from_secs(5), Duration::from_secs(60));
        recorder.read("sha256:l1", "bin/app", 0, 4096);
        recorder.read("sha256:l1", "lib/a.so", 0, 131072);
        recorder.read("sha256:l1", "bin/app", 4096, 4096);
        recorder.read("sha256:l2", "model/w", 1 << 20, 4096);
        recorder.read("sha256:l1", "bin/app", 10 << 20, 4096);
        let profile = recorder.finish().unwrap();
        assert_eq!(profile.layers[0].digest, "sha256:l1");
        assert_eq!(
            profile.layers[0].ranges,
            vec![
                range("bin/app", 0, 8192),
                range("lib/a.so", 0, 131072),
                range("bin/app", 10 << 20, 4096)
            ]
        );
        assert_eq!(
            profile.layers[1].ranges,
            vec![range("model/w", 1 << 20, 4096)]
        );
        // Nothing more once finished.
        recorder.read("sha256:l1", "x", 0, 1);
        assert!(recorder.finish().is_none());
    }

    #[test]
    fn a_recording_ends_when_quiet_or_at_its_limit() {
        let recorder = Recorder::new(M, Duration::from_millis(50), Duration::from_secs(60));
        assert!(!recorder.finished());
        recorder.read("sha256:l1", "a", 0, 1);
        assert!(!recorder.finished());
        std::thread::sleep(Duration::from_millis(80));
        assert!(recorder.finished());
        let limited = Recorder::new(M, Duration::from_secs(60), Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(50));
        assert!(limited.finished());
        limited.read("sha256:l1", "a", 0, 1);
        assert!(limited.finish().is_none());
    }

    #[test]
    fn bad_documents_are_refused() {
        let good = Profile {
            version: PROFILE_VERSION,
            manifest: M.into(),
            starts: 1,
            layers: vec![LayerProfile {
                digest: "sha256:l1".into(),
                ranges: vec![range("a", 0, 10)],
            }],
        };
        assert_eq!(Profile::parse(&good.to_bytes(), M).unwrap(), good);
        assert!(matches!(
            Profile::parse(&good.to_bytes(), "sha256:bbbb"),
            Err(ProfileError::OtherImage { .. })
        ));
        assert!(matches!(
            Profile::parse(b"{not json", M),
            Err(ProfileError::Invalid(_))
        ));
        let mut future = good.clone();
        future.version = 9;
        assert_eq!(
            Profile::parse(&future.to_bytes(), M),
            Err(ProfileError::Version(9))
        );
        let huge = vec![b' '; (MAX_DOCUMENT_BYTES + 1) as usize];
        assert!(matches!(
            Profile::parse(&huge, M),
            Err(ProfileError::TooLarge(_))
        ));
    }

    #[test]
    fn merged_starts_keep_what_most_of_them_read() {
        let start = |paths: &[&str]| Profile {
            version: PROFILE_VERSION,
            manifest: M.into(),
            starts: 1,
            layers: vec![LayerProfile {
                digest: "sha256:l1".into(),
                ranges: paths.iter().map(|p| range(p, 0, 10)).collect(),
            }],
        };
        let merged = start(&["a", "b"])
            .merge(&start(&["a", "c"]))
            .merge(&start(&["a", "b"]));
        assert_eq!(merged.starts, 3);
        let paths: Vec<String> = merged
            .wanted("sha256:l1")
            .into_iter()
            .map(|r| r.path)
            .collect();
        assert_eq!(paths, ["a", "b"]);
        assert!(merged.wanted("sha256:other").is_empty());
    }

    #[test]
    fn the_store_keeps_profiles_by_digest_and_refuses_odd_names() {
        let dir = tempfile::tempdir().unwrap();
        let store = ProfileStore::new(dir.path());
        assert_eq!(store.load(M), Ok(None));
        let recorder = Recorder::new(M, Duration::from_secs(5), Duration::from_secs(60));
        recorder.read("sha256:l1", "a", 0, 10);
        let profile = recorder.finish().unwrap();
        store.save(&profile).unwrap();
        assert_eq!(store.load(M).unwrap().unwrap(), profile);
        assert_eq!(store.list().len(), 1);
        assert!(store.load("../../etc/passwd").is_err());
        assert!(
            store
                .save(&Profile {
                    manifest: "sha256:../x".into(),
                    ..profile.clone()
                })
                .is_err()
        );
        assert!(store.remove(M).unwrap());
        assert_eq!(store.load(M), Ok(None));
    }
}
