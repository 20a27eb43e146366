//! Pronto's Prometheus metrics: every counter, gauge and histogram the
//! daemon exports on `/metrics`, in one place, so their names and meanings
//! are documented together (docs/operations.md lists them).
//!
//! The crates that do the work record into the process-wide set returned by
//! [`metrics`]; `pronto serve` encodes it for scrapers. This crate knows
//! nothing about registries, FUSE or containerd beyond the label values the
//! callers pass.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Why layer bytes were fetched from a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A read of a lazily mounted file was waiting for them.
    OnDemand,
    /// Fetched ahead of a reader reading a file in order.
    ReadAhead,
    /// The low-priority fetch of the rest of a lazily mounted layer.
    Background,
    /// Fetched ahead of a container's start from the image's startup
    /// profile.
    Profile,
    /// Index data: the index prefix and the decompression windows.
    Index,
    /// A layer that could not be lazy, fetched whole in parallel.
    WholeLayer,
}

impl Purpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::OnDemand => "on_demand",
            Purpose::ReadAhead => "read_ahead",
            Purpose::Background => "background",
            Purpose::Profile => "profile",
            Purpose::Index => "index",
            Purpose::WholeLayer => "whole_layer",
        }
    }
}

/// What failed, for `pronto_errors_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A registry request failed after its retries.
    Registry,
    /// Fetched bytes did not match their digest.
    Verification,
    /// A read of a lazily mounted file failed (the reader got `EIO`).
    Read,
    /// The node cache could not store or read data.
    Cache,
    /// The background fetch of a layer stopped.
    BackgroundFetch,
    /// A layer could not be fetched and unpacked by the parallel pull.
    ParallelPull,
    /// A call of containerd's snapshots API failed for a reason other than
    /// "not found" or "already exists".
    SnapshotApi,
    /// An index was found not to match its layer once the layer was
    /// complete (the index is poisoned).
    IndexMismatch,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Registry => "registry",
            ErrorKind::Verification => "verification",
            ErrorKind::Read => "read",
            ErrorKind::Cache => "cache",
            ErrorKind::BackgroundFetch => "background_fetch",
            ErrorKind::ParallelPull => "parallel_pull",
            ErrorKind::SnapshotApi => "snapshot_api",
            ErrorKind::IndexMismatch => "index_mismatch",
        }
    }
}

/// A kind of FUSE request, for `pronto_fuse_requests_total{op}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FuseOp {
    Lookup,
    Getattr,
    Open,
    Read,
    Readdir,
    Readlink,
    /// `getxattr` and `listxattr`.
    Xattr,
    /// Everything else (release, forget, statfs, ...).
    Other,
}

impl FuseOp {
    const ALL: [FuseOp; 8] = [
        FuseOp::Lookup,
        FuseOp::Getattr,
        FuseOp::Open,
        FuseOp::Read,
        FuseOp::Readdir,
        FuseOp::Readlink,
        FuseOp::Xattr,
        FuseOp::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FuseOp::Lookup => "lookup",
            FuseOp::Getattr => "getattr",
            FuseOp::Open => "open",
            FuseOp::Read => "read",
            FuseOp::Readdir => "readdir",
            FuseOp::Readlink => "readlink",
            FuseOp::Xattr => "xattr",
            FuseOp::Other => "other",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabel {
    op: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PurposeLabel {
    purpose: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The daemon's metrics. Recording is lock-free (atomics).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    registry_bytes: Counter,
    registry_requests: Counter,
    registry_round_trips: Counter,
    range_requests: Histogram,
    fetched_bytes: Family<PurposeLabel, Counter>,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_usage: Gauge,
    cache_budget: Gauge,
    cache_evictions: Counter,
    cache_evicted_bytes: Counter,
    fallbacks: Family<ReasonLabel, Counter>,
    lazy_mounts: Gauge,
    handovers: Counter,
    resent_requests: Counter,
    /// One counter per [`FuseOp`], in [`FuseOp::ALL`]'s order, taken from
    /// the family once so that counting takes no lock.
    fuse_requests: Vec<Counter>,
    errors: Family<KindLabel, Counter>,
    warm_events: Family<SourceLabel, Counter>,
    warm_lag: Histogram,
    warm_failures: Counter,
    warm_images: Family<StateLabel, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set, all zero. The daemon uses the shared [`metrics`].
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("pronto");
        let registry_bytes = Counter::default();
        registry.register(
            "registry_received_bytes",
            "Bytes of response bodies received from registries (manifests, indexes, layer data).",
            registry_bytes.clone(),
        );
        let registry_requests = Counter::default();
        registry.register(
            "registry_requests",
            "Requests sent to registries (token requests included).",
            registry_requests.clone(),
        );
        let registry_round_trips = Counter::default();
        registry.register(
            "registry_round_trips",
            "Registry requests sent while no other request of the daemon was waiting for its answer: each begins a round trip nothing else hides. On a node starting one image, the round trips its start waited on one after another.",
            registry_round_trips.clone(),
        );
        // 1 ms to ~33 s.
        let range_requests = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "range_request_duration_seconds",
            "Time from sending a blob range request to having its last byte.",
            range_requests.clone(),
        );
        let fetched_bytes = Family::default();
        registry.register(
            "fetched_bytes",
            "Layer and index bytes fetched from registries, by purpose: on_demand, background, index, whole_layer.",
            fetched_bytes.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "cache_hits",
            "Spans a read found in the node cache.",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "cache_misses",
            "Spans a read had to fetch because the node cache did not hold them.",
            cache_misses.clone(),
        );
        let cache_usage = Gauge::default();
        registry.register(
            "cache_usage_bytes",
            "Bytes of data in the node cache.",
            cache_usage.clone(),
        );
        let cache_budget = Gauge::default();
        registry.register(
            "cache_budget_bytes",
            "The node cache's budget ([cache] budget).",
            cache_budget.clone(),
        );
        let cache_evictions = Counter::default();
        registry.register(
            "cache_evictions",
            "Entries evicted from the node cache to stay within its budget.",
            cache_evictions.clone(),
        );
        let cache_evicted_bytes = Counter::default();
        registry.register(
            "cache_evicted_bytes",
            "Bytes evicted from the node cache to stay within its budget.",
            cache_evicted_bytes.clone(),
        );
        let fallbacks = Family::default();
        registry.register(
            "fallbacks",
            "Layers not mounted lazily, by reason (the daemon's log says which image and layer).",
            fallbacks.clone(),
        );
        let lazy_mounts = Gauge::default();
        registry.register(
            "lazy_mounts",
            "Layers mounted lazily right now.",
            lazy_mounts.clone(),
        );
        let handovers = Counter::default();
        registry.register(
            "handovers",
            "Lazy mounts this daemon took over from the daemon before it (restart or upgrade).",
            handovers.clone(),
        );
        let resent_requests = Counter::default();
        registry.register(
            "resent_requests",
            "FUSE requests the kernel sent again after a handover (read but not answered by the daemon before).",
            resent_requests.clone(),
        );
        let fuse_family = Family::<OpLabel, Counter>::default();
        registry.register(
            "fuse_requests",
            "Requests the kernel sent to Pronto's lazy mounts, by op: lookup, getattr, open, read, readdir, readlink, xattr, other. Reads the kernel serves itself (page cache, passthrough) and names it remembers are not counted.",
            fuse_family.clone(),
        );
        let fuse_requests = FuseOp::ALL
            .iter()
            .map(|op| {
                fuse_family
                    .get_or_create(&OpLabel { op: op.as_str() })
                    .clone()
            })
            .collect();
        let errors = Family::default();
        registry.register(
            "errors",
            "Failures by kind: registry, verification, read, cache, background_fetch, parallel_pull, snapshot_api.",
            errors.clone(),
        );
        let warm_events = Family::default();
        registry.register(
            "warm_events",
            "Reasons to warm an image, by source: join (the daemon started), push (a registry notification through the warm hub), poll (tag polling found a new digest), refresh (a warm image was removed or evicted), manual (`pronto warm`).",
            warm_events.clone(),
        );
        // 0.1 s to ~1.8 h.
        let warm_lag = Histogram::new(exponential_buckets(0.1, 2.0, 16));
        registry.register(
            "warm_lag_seconds",
            "From a push the registry notified to the new digest being warm on this node.",
            warm_lag.clone(),
        );
        let warm_failures = Counter::default();
        registry.register(
            "warm_failures",
            "Warm attempts that failed (the daemon's log and `pronto status` say why).",
            warm_failures.clone(),
        );
        let warm_images = Family::default();
        registry.register(
            "warm_images",
            "Images of the warm set by state: warm, warming, failed, waiting.",
            warm_images.clone(),
        );
        Self {
            warm_events,
            warm_lag,
            warm_failures,
            warm_images,
            registry,
            registry_bytes,
            registry_requests,
            registry_round_trips,
            range_requests,
            fetched_bytes,
            cache_hits,
            cache_misses,
            cache_usage,
            cache_budget,
            cache_evictions,
            cache_evicted_bytes,
            fallbacks,
            lazy_mounts,
            handovers,
            resent_requests,
            fuse_requests,
            errors,
        }
    }

    /// The metrics in Prometheus' text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// A reason to warm an image arrived from `source`.
    pub fn warm_event(&self, source: &'static str) {
        self.warm_events
            .get_or_create(&SourceLabel { source })
            .inc();
    }

    /// An image became warm `lag` after the push that announced it.
    pub fn warm_lag(&self, lag: Duration) {
        self.warm_lag.observe(lag.as_secs_f64());
    }

    pub fn warm_failed(&self) {
        self.warm_failures.inc();
    }

    /// How many images of the warm set are in each state.
    pub fn warm_states(&self, counts: &[(&'static str, i64)]) {
        for (state, count) in counts {
            self.warm_images
                .get_or_create(&StateLabel { state })
                .set(*count);
        }
    }

    pub fn registry_received(&self, bytes: u64) {
        self.registry_bytes.inc_by(bytes);
    }

    /// A registry request was sent; `alone` when no other request of the
    /// process was waiting for its answer.
    pub fn registry_request(&self, alone: bool) {
        self.registry_requests.inc();
        if alone {
            self.registry_round_trips.inc();
        }
    }

    /// Registry requests sent so far, and how many of them were round
    /// trips of their own (see [`Metrics::registry_request`]).
    pub fn registry_requests(&self) -> (u64, u64) {
        (
            self.registry_requests.get(),
            self.registry_round_trips.get(),
        )
    }

    pub fn range_request(&self, took: Duration) {
        self.range_requests.observe(took.as_secs_f64());
    }

    pub fn fetched(&self, purpose: Purpose, bytes: u64) {
        self.fetched_bytes
            .get_or_create(&PurposeLabel {
                purpose: purpose.as_str(),
            })
            .inc_by(bytes);
    }

    pub fn cache_lookups(&self, hits: u64, misses: u64) {
        self.cache_hits.inc_by(hits);
        self.cache_misses.inc_by(misses);
    }

    pub fn cache_size(&self, usage: u64, budget: u64) {
        self.cache_usage.set(gauge_value(usage));
        self.cache_budget.set(gauge_value(budget));
    }

    pub fn cache_evicted(&self, entries: u64, bytes: u64) {
        self.cache_evictions.inc_by(entries);
        self.cache_evicted_bytes.inc_by(bytes);
    }

    /// Counts a fallback; returns how many there have been for `reason`.
    pub fn fallback(&self, reason: &'static str) -> u64 {
        self.fallbacks.get_or_create(&ReasonLabel { reason }).inc() + 1
    }

    /// Fallbacks for `reason` so far.
    pub fn fallback_count(&self, reason: &'static str) -> u64 {
        self.fallbacks
            .get(&ReasonLabel { reason })
            .map_or(0, |counter| counter.get())
    }

    pub fn lazy_mount_added(&self) {
        self.lazy_mounts.inc();
    }

    pub fn lazy_mount_removed(&self) {
        self.lazy_mounts.dec();
    }

    pub fn handover(&self) {
        self.handovers.inc();
    }

    pub fn resent_request(&self) {
        self.resent_requests.inc();
    }

    pub fn fuse_request(&self, op: FuseOp) {
        self.fuse_requests[op as usize].inc();
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors
            .get_or_create(&KindLabel {
                kind: kind.as_str(),
            })
            .inc();
    }
}

fn gauge_value(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics every crate records into.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the sample line that starts with `series` followed by a
    /// space.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|value| value.parse().ok())
    }

    #[test]
    fn recorded_values_appear_in_the_text_format() {
        let metrics = Metrics::new();
        metrics.registry_received(1000);
        metrics.fetched(Purpose::OnDemand, 600);
        metrics.fetched(Purpose::Background, 300);
        metrics.fetched(Purpose::OnDemand, 50);
        metrics.cache_lookups(3, 2);
        metrics.cache_size(4096, 1 << 30);
        metrics.cache_evicted(1, 512);
        metrics.fallback("no-index");
        metrics.lazy_mount_added();
        metrics.lazy_mount_added();
        metrics.lazy_mount_removed();
        metrics.error(ErrorKind::Verification);
        metrics.handover();
        metrics.resent_request();
        metrics.resent_request();
        metrics.fuse_request(FuseOp::Lookup);
        metrics.fuse_request(FuseOp::Lookup);
        metrics.fuse_request(FuseOp::Read);
        metrics.range_request(Duration::from_millis(3));
        metrics.registry_request(true);
        metrics.registry_request(false);
        let text = metrics.encode();
        let expect = [
            ("pronto_registry_received_bytes_total", 1000.0),
            ("pronto_registry_requests_total", 2.0),
            ("pronto_registry_round_trips_total", 1.0),
            ("pronto_fetched_bytes_total{purpose=\"on_demand\"}", 650.0),
            ("pronto_fetched_bytes_total{purpose=\"background\"}", 300.0),
            ("pronto_cache_hits_total", 3.0),
            ("pronto_cache_misses_total", 2.0),
            ("pronto_cache_usage_bytes", 4096.0),
            ("pronto_cache_budget_bytes", f64::from(1u32 << 30)),
            ("pronto_cache_evictions_total", 1.0),
            ("pronto_cache_evicted_bytes_total", 512.0),
            ("pronto_fallbacks_total{reason=\"no-index\"}", 1.0),
            ("pronto_lazy_mounts", 1.0),
            ("pronto_handovers_total", 1.0),
            ("pronto_resent_requests_total", 2.0),
            ("pronto_fuse_requests_total{op=\"lookup\"}", 2.0),
            ("pronto_fuse_requests_total{op=\"read\"}", 1.0),
            ("pronto_fuse_requests_total{op=\"open\"}", 0.0),
            ("pronto_errors_total{kind=\"verification\"}", 1.0),
            ("pronto_range_request_duration_seconds_count", 1.0),
            (
                "pronto_range_request_duration_seconds_bucket{le=\"0.004\"}",
                1.0,
            ),
            (
                "pronto_range_request_duration_seconds_bucket{le=\"0.002\"}",
                0.0,
            ),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
        }
        assert!(text.contains("# HELP pronto_fallbacks Layers not mounted lazily"));
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn fallbacks_are_counted_by_reason() {
        let metrics = Metrics::new();
        assert_eq!(metrics.fallback_count("no-index"), 0);
        assert_eq!(metrics.fallback("no-index"), 1);
        assert_eq!(metrics.fallback("no-index"), 2);
        assert_eq!(metrics.fallback_count("no-index"), 2);
        // Asking does not create a series.
        assert!(!metrics.encode().contains("mount-failed"));
    }

    #[test]
    fn a_cache_larger_than_a_gauge_saturates() {
        let metrics = Metrics::new();
        metrics.cache_size(u64::MAX, u64::MAX);
        assert!(
            metrics
                .encode()
                .contains(&format!("pronto_cache_usage_bytes {}", i64::MAX))
        );
    }
}
