//! Warming: images made ready on this node before their pods arrive
//! (`[warm]`). A lazy warm pulls the image into containerd's namespace
//! with Pronto's snapshotter (so kubelet sees it present) and fetches its
//! startup set into the node cache: the startup profile's ranges, or
//! without one its smallest files up to `warm.startup_bytes`. A full warm
//! makes every byte local.
//!
//! Reasons to warm: the daemon starting (node join), a push the registry
//! notified through `pronto warm-hub`, a tag poll finding a new digest, a
//! warm image gone from containerd (kubelet's image GC, or removed by
//! hand), and `pronto warm REF`. One image is warmed by one task at a time
//! and at most `warm.concurrency` images at once; pushes and polls wait a
//! random jitter first, so that many nodes do not ask the registry at once.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pronto_containerd::{LayerOutcome, PullOptions};
use pronto_registry::{Platform, RegistryClient, Repository, parse_reference};
use pronto_snapshotter::status::{WarmStatus, Warmer};
use pronto_snapshotter::{Remote, WarmSet};

use crate::config::WarmConfig;
use crate::warm_hub::{EventsPage, PushEvent, now};

/// What started a warm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Source {
    Join,
    /// A push notified at this time (seconds since the epoch).
    Push(f64),
    Poll,
    Refresh,
    Manual,
    /// The hub connection came (back): every tag is checked.
    Resync,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Join => "join",
            Source::Push(_) => "push",
            Source::Poll => "poll",
            Source::Refresh => "refresh",
            Source::Manual => "manual",
            Source::Resync => "resync",
        }
    }
}

/// One image of the warm set.
#[derive(Debug, Clone)]
struct Entry {
    mode: String,
    /// From `[warm]`; images warmed by hand are not refreshed.
    configured: bool,
    status: WarmStatus,
    /// The digest the tag named when it was last warmed (an index for a
    /// multi-platform image), and the image manifest warmed.
    tag_digest: Option<String>,
}

/// The daemon's warming.
pub struct WarmEngine {
    config: WarmConfig,
    client: RegistryClient,
    remote: Arc<Remote>,
    work_dir: PathBuf,
    /// Where the node's data lives, and the free space warming leaves.
    root: PathBuf,
    min_free_space: u64,
    platform: Platform,
    entries: Mutex<BTreeMap<String, Entry>>,
    /// One warm per image at a time.
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    permits: tokio::sync::Semaphore,
}

impl std::fmt::Debug for WarmEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmEngine").finish_non_exhaustive()
    }
}

impl WarmEngine {
    pub fn new(
        config: WarmConfig,
        client: RegistryClient,
        remote: Arc<Remote>,
        root: PathBuf,
        min_free_space: u64,
    ) -> Self {
        let platform = config.platform.parse().unwrap_or_default();
        // Set before the previous daemon's mounts are taken over.
        for image in &config.images {
            if let Ok(parsed) = parse_reference(image.reference()) {
                remote.background_waits_for_use(&parsed.whole());
            }
        }
        let entries = config
            .images
            .iter()
            .map(|image| {
                (
                    image.reference().to_owned(),
                    Entry {
                        mode: image.mode().to_owned(),
                        configured: true,
                        status: WarmStatus {
                            reference: image.reference().to_owned(),
                            mode: image.mode().to_owned(),
                            state: "waiting".into(),
                            ..Default::default()
                        },
                        tag_digest: None,
                    },
                )
            })
            .collect();
        Self {
            permits: tokio::sync::Semaphore::new(config.concurrency.max(1)),
            work_dir: root.join("pull"),
            config,
            client,
            remote,
            root,
            min_free_space,
            platform,
            entries: Mutex::new(entries),
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn lock_entries(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts warming: every configured image now (without delaying the
    /// snapshots API: this returns at once), then the checks, tag polls
    /// and the hub subscription, until the runtime stops.
    pub fn start(self: &Arc<Self>) {
        if self.config.images.is_empty() {
            return;
        }
        tracing::info!(
            images = self.config.images.len(),
            hub = self.config.hub,
            poll = self.config.poll_interval,
            "warming the node's warm set"
        );
        self.warm_all(Source::Join);
        let engine = self.clone();
        tokio::spawn(async move { engine.check_loop().await });
        if !self.config.hub.is_empty() {
            let engine = self.clone();
            tokio::spawn(async move { engine.follow_hub().await });
        }
    }

    /// Warms every configured image (each task checks whether it must).
    fn warm_all(self: &Arc<Self>, source: Source) {
        let configured: Vec<(String, String)> = self
            .lock_entries()
            .iter()
            .filter(|(_, e)| e.configured)
            .map(|(r, e)| (r.clone(), e.mode.clone()))
            .collect();
        for (reference, mode) in configured {
            let engine = self.clone();
            tokio::spawn(async move { engine.warm(&reference, &mode, source).await });
        }
    }

    /// Every `check_interval`: warm images gone from containerd are warmed
    /// again, and, every `poll_interval`, tags are asked for a new digest.
    async fn check_loop(self: Arc<Self>) {
        let check = self.config.check_interval();
        let poll = self.config.poll_interval();
        let mut last_poll = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(check.min(poll.unwrap_or(check))).await;
            let polling = poll.is_some_and(|p| last_poll.elapsed() >= p);
            if polling {
                last_poll = tokio::time::Instant::now();
            }
            let warm: Vec<(String, String, String)> = self
                .lock_entries()
                .iter()
                .filter(|(_, e)| e.configured && e.status.state != "warming")
                .map(|(r, e)| (r.clone(), e.mode.clone(), e.status.digest.clone()))
                .collect();
            for (reference, mode, digest) in warm {
                let engine = self.clone();
                tokio::spawn(async move {
                    let present = engine.present(&reference, &digest).await;
                    if !present {
                        engine.warm(&reference, &mode, Source::Refresh).await;
                    } else if polling {
                        engine.warm(&reference, &mode, Source::Poll).await;
                    }
                });
            }
        }
    }

    /// Whether image `reference` is in containerd at `digest`.
    async fn present(&self, reference: &str, digest: &str) -> bool {
        if digest.is_empty() {
            return false;
        }
        let Ok(parsed) = parse_reference(reference) else {
            return false;
        };
        let by_digest = format!("{}/{}@{digest}", parsed.registry(), parsed.repository());
        for name in [parsed.whole(), by_digest] {
            match pronto_containerd::image_target(
                &self.config.containerd_address,
                &self.config.namespace,
                &name,
            )
            .await
            {
                Ok(Some(_)) => return true,
                Ok(None) => {}
                // containerd away: not a reason to pull again.
                Err(_) => return true,
            }
        }
        false
    }

    /// Subscribes to the warm hub: each push of a tag of the warm set is
    /// warmed; on (re)connecting, every tag is checked.
    async fn follow_hub(self: Arc<Self>) {
        let http = reqwest::Client::new();
        let base = self.config.hub.trim_end_matches('/').to_owned();
        let (mut hub, mut next, mut backoff) = (String::new(), 0u64, Duration::from_secs(1));
        let mut connected = false;
        loop {
            let url = format!("{base}/events?after={next}&hub={hub}");
            let page: Result<EventsPage, reqwest::Error> = async {
                http.get(&url)
                    .timeout(Duration::from_secs(40))
                    .send()
                    .await?
                    .error_for_status()?
                    .json()
                    .await
            }
            .await;
            match page {
                Ok(page) => {
                    backoff = Duration::from_secs(1);
                    if !connected || page.resync || page.hub != hub {
                        tracing::info!(hub = base, "following the warm hub; checking every tag");
                        connected = true;
                        self.warm_all(Source::Resync);
                    }
                    hub = page.hub;
                    next = page.next;
                    for push in page.events {
                        self.on_push(&push);
                    }
                }
                Err(e) => {
                    if connected {
                        tracing::warn!(hub = base, "the warm hub is unreachable: {e}; retrying");
                    }
                    connected = false;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    /// A push the hub passed on: the configured images of that repository
    /// and tag are warmed. The registry host is not compared: nodes often
    /// reach the registry through another name (a mirror, a cluster
    /// address) than the pusher did.
    fn on_push(self: &Arc<Self>, push: &PushEvent) {
        let matching: Vec<(String, String)> = self
            .lock_entries()
            .iter()
            .filter(|(_, e)| e.configured)
            .filter(|(reference, _)| {
                parse_reference(reference).is_ok_and(|r| {
                    r.repository() == push.repository
                        && r.digest().is_none()
                        && r.tag().unwrap_or("latest") == push.tag
                })
            })
            .map(|(r, e)| (r.clone(), e.mode.clone()))
            .collect();
        for (reference, mode) in matching {
            let engine = self.clone();
            let at = push.pushed_at;
            tokio::spawn(async move { engine.warm(&reference, &mode, Source::Push(at)).await });
        }
    }

    /// Warms `reference` unless it is warm at the digest its tag names
    /// now; returns its status after.
    pub async fn warm(&self, reference: &str, mode: &str, source: Source) -> WarmStatus {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reference.to_owned())
            .or_default()
            .clone();
        let _one = lock.lock().await;
        if matches!(source, Source::Push(_) | Source::Poll | Source::Resync) {
            tokio::time::sleep(jitter(self.config.jitter(), reference)).await;
        }
        let _permit = self.permits.acquire().await.expect("never closed");
        let result = self.warm_once(reference, mode, source).await;
        let mut entries = self.lock_entries();
        let entry = entries
            .entry(reference.to_owned())
            .or_insert_with(|| Entry {
                mode: mode.to_owned(),
                configured: false,
                status: WarmStatus {
                    reference: reference.to_owned(),
                    mode: mode.to_owned(),
                    ..Default::default()
                },
                tag_digest: None,
            });
        match result {
            Ok(Some((tag_digest, status))) => {
                entry.tag_digest = Some(tag_digest);
                entry.status = status;
            }
            Ok(None) => {}
            Err(reason) => {
                pronto_metrics::metrics().warm_failed();
                tracing::error!(
                    reference,
                    source = source.as_str(),
                    "warming failed: {reason}"
                );
                entry.status.state = "failed".into();
                entry.status.reason = reason;
                entry.status.source = source.as_str().into();
            }
        }
        let status = entry.status.clone();
        let counts = ["warm", "warming", "failed", "waiting"].map(|state| {
            (
                state,
                entries.values().filter(|e| e.status.state == state).count() as i64,
            )
        });
        drop(entries);
        pronto_metrics::metrics().warm_states(&counts);
        status
    }

    /// One attempt: `Ok(None)` when the image is warm at the current
    /// digest already; otherwise the tag's digest and the new status.
    async fn warm_once(
        &self,
        reference: &str,
        mode: &str,
        source: Source,
    ) -> Result<Option<(String, WarmStatus)>, String> {
        let parsed = parse_reference(reference).map_err(|e| e.to_string())?;
        let repository = Repository::of(&parsed);
        let (known, warmed) = {
            let entries = self.lock_entries();
            let entry = entries.get(reference);
            (
                entry.and_then(|e| e.tag_digest.clone()),
                entry
                    .filter(|e| e.status.state == "warm")
                    .map(|e| e.status.digest.clone()),
            )
        };
        // What the tag names now: one HEAD request, conditional on the
        // digest seen last (304: unchanged).
        let tag_digest = match (parsed.digest(), parsed.tag()) {
            (Some(digest), _) => digest.to_owned(),
            (None, tag) => {
                let tag = tag.unwrap_or("latest");
                match self
                    .client
                    .tag_digest(&repository, tag, known.as_deref())
                    .await
                    .map_err(|e| format!("ask the registry for {reference}: {e}"))?
                {
                    Some(digest) => digest,
                    None => known.clone().unwrap_or_default(),
                }
            }
        };
        let unchanged = !tag_digest.is_empty() && known.as_deref() == Some(tag_digest.as_str());
        if let Some(digest) = &warmed
            && unchanged
            && source != Source::Refresh
            && (source != Source::Manual || self.present(reference, digest).await)
        {
            return Ok(None);
        }
        pronto_metrics::metrics().warm_event(source.as_str());
        self.check_space()?;
        self.set_state(reference, "warming");
        // The image's data beyond its startup set comes when a container
        // uses it, not now.
        self.remote.background_waits_for_use(&parsed.whole());
        tracing::info!(reference, source = source.as_str(), mode, "warming");
        let (remote, image, platform) = (
            self.remote.clone(),
            reference.to_owned(),
            self.platform.clone(),
        );
        tokio::spawn(async move { remote.expect(&image, &platform).await });
        let report = pronto_containerd::pull(
            &self.client,
            reference,
            &PullOptions {
                address: self.config.containerd_address.clone(),
                namespace: self.config.namespace.clone(),
                snapshotter: "pronto".into(),
                platform: self.platform.clone(),
                work_dir: self.work_dir.clone(),
            },
            &|_| {},
        )
        .await
        .map_err(|e| format!("pull {reference}: {e}"))?;
        let lazy: Vec<String> = report
            .layers
            .iter()
            .filter(|(_, o)| matches!(o, LayerOutcome::Remote | LayerOutcome::Present))
            .map(|(digest, _)| digest.clone())
            .collect();
        let set = if mode == "full" {
            WarmSet::Everything
        } else {
            WarmSet::Startup {
                without_profile: self.config.startup_bytes(),
            }
        };
        let warmed_now = self
            .remote
            .warm(
                &repository,
                &report.manifest,
                &lazy,
                set,
                self.config.parallel,
            )
            .await;
        let lag = match source {
            Source::Push(at) => (now() - at).max(0.0),
            _ => 0.0,
        };
        if lag > 0.0 {
            pronto_metrics::metrics().warm_lag(Duration::from_secs_f64(lag));
        }
        tracing::info!(
            reference,
            digest = report.target,
            source = source.as_str(),
            lazy_layers = lazy.len(),
            bytes = warmed_now.bytes,
            by_profile = warmed_now.by_profile,
            lag_seconds = lag,
            "warm"
        );
        if self.config.release_previous
            && let Some(previous) = warmed.filter(|d| *d != report.target)
        {
            let name = format!("{}/{}@{previous}", parsed.registry(), parsed.repository());
            match pronto_containerd::remove_image(
                &self.config.containerd_address,
                &self.config.namespace,
                &name,
            )
            .await
            {
                Ok(()) => tracing::info!(reference, previous, "released the previous digest"),
                Err(e) => tracing::warn!(
                    reference,
                    previous,
                    "cannot release the previous digest: {e}"
                ),
            }
        }
        Ok(Some((
            tag_digest,
            WarmStatus {
                reference: reference.to_owned(),
                mode: mode.to_owned(),
                state: "warm".into(),
                digest: report.target,
                reason: String::new(),
                lag_seconds: lag,
                bytes: warmed_now.bytes,
                warmed_at: now() as u64,
                source: source.as_str().into(),
            },
        )))
    }

    fn set_state(&self, reference: &str, state: &str) {
        if let Some(entry) = self.lock_entries().get_mut(reference) {
            entry.status.state = state.into();
        }
    }

    /// Warming stops short of the free space `pull.min_free_space` keeps.
    fn check_space(&self) -> Result<(), String> {
        let Ok(free) = pronto_snapshotter::unpack::free_space(&self.root) else {
            return Ok(());
        };
        if free < self.min_free_space {
            return Err(format!(
                "{} has {} free, under pull.min_free_space ({}): not warming",
                self.root.display(),
                crate::text::human_size(free),
                crate::text::human_size(self.min_free_space)
            ));
        }
        Ok(())
    }
}

/// A delay up to `max`, different per node and image.
fn jitter(max: Duration, reference: &str) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    if max.is_zero() {
        return Duration::ZERO;
    }
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write(reference.as_bytes());
    let fraction = (hasher.finish() % 1000) as f64 / 1000.0;
    max.mul_f64(fraction)
}

#[pronto_snapshotter::status::async_trait]
impl Warmer for WarmEngine {
    fn states(&self) -> Vec<WarmStatus> {
        self.lock_entries()
            .values()
            .map(|e| e.status.clone())
            .collect()
    }

    async fn warm_now(&self, reference: String, mode: String) -> Result<WarmStatus, String> {
        let mode = if mode.is_empty() {
            "lazy".to_owned()
        } else {
            mode
        };
        if !matches!(mode.as_str(), "lazy" | "full") {
            return Err(format!("mode {mode:?} is neither \"lazy\" nor \"full\""));
        }
        parse_reference(&reference).map_err(|e| e.to_string())?;
        Ok(self.warm(&reference, &mode, Source::Manual).await)
    }
}
