//! [`IndexedLayer`]: a layer read through its seekable index. The read path:
//! file range → spans → node cache hit? serve : fetch the missing spans (one
//! range request per run of neighbours; one fetch per span however many
//! readers wait for it) → decompress from the checkpoint → verify → cache →
//! serve.

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pronto_catalog::LocalIndexStore;
use pronto_index::{Entry, IndexError, LayerIndex, LayerTruth};

use crate::layout::{ChunkedLayout, IndexLayout, Layout};
use pronto_metrics::{ErrorKind, Purpose, metrics};
use pronto_registry::{ChunkSink, RegistryClient, Repository};
use pronto_store::{CacheKey, ContentCache};
use sha2::{Digest, Sha256};

use crate::readahead::{Ahead, SequentialReads};
use crate::schedule::Scheduler;
use crate::source::{LayerSource, LazyLayer, PrefetchResult, ReadError, ReadResult};

/// Boxed future returned by [`BlobReader::read`].
pub type ReadFuture<'a> = Pin<Box<dyn Future<Output = Result<Bytes, String>> + Send + 'a>>;

/// Where a blob's bytes come from: the registry or a local file.
pub trait BlobReader: Send + Sync {
    fn read(&self, range: Range<u64>) -> ReadFuture<'_>;
}

/// A blob read with range requests from its registry.
#[derive(Debug, Clone)]
pub struct RegistryBlob {
    pub client: RegistryClient,
    pub repository: Repository,
    pub digest: String,
    pub size: u64,
}

impl BlobReader for RegistryBlob {
    fn read(&self, range: Range<u64>) -> ReadFuture<'_> {
        Box::pin(async move {
            self.client
                .blob_range(&self.repository, &self.digest, range, self.size)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

/// A blob in a local file (a layer fetched whole, or an index in the local
/// store).
#[derive(Debug, Clone)]
pub struct LocalBlob {
    pub path: PathBuf,
}

impl BlobReader for LocalBlob {
    fn read(&self, range: Range<u64>) -> ReadFuture<'_> {
        Box::pin(async move {
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || {
                use std::os::unix::fs::FileExt;
                let file =
                    std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let mut out = vec![0u8; (range.end - range.start) as usize];
                file.read_exact_at(&mut out, range.start)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(Bytes::from(out))
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }
}

/// What a layer has fetched, for tests, status and metrics.
#[derive(Debug, Default)]
pub struct LayerFetchStats {
    /// Bytes of the layer blob fetched for reads waiting on them.
    pub layer_bytes: AtomicU64,
    /// Bytes of the layer blob fetched ahead of readers reading in order.
    pub read_ahead_bytes: AtomicU64,
    /// Bytes of the index blob fetched (windows).
    pub index_bytes: AtomicU64,
    /// Range requests to the layer blob.
    pub requests: AtomicU64,
    /// Bytes of the layer blob read by the background fetch.
    pub background_bytes: AtomicU64,
    /// Bytes of the layer blob fetched ahead from the startup profile.
    pub profile_bytes: AtomicU64,
    /// Range requests made for reads waiting on them (misses).
    pub on_demand_requests: AtomicU64,
    /// The background fetch has read the whole layer and its digest matched.
    pub complete: AtomicBool,
    /// The background fetch stopped with an error (logged); on-demand reads
    /// go on.
    pub background_failed: AtomicBool,
    /// The whole layer was compared with its index and they matched.
    pub index_verified: AtomicBool,
}

/// Where a layer's index came from, so that an index found not to match
/// its layer can be poisoned where the next pull looks for it.
#[derive(Debug, Clone)]
pub struct IndexOrigin {
    pub store: LocalIndexStore,
    /// The artifact manifest (index set) the index belongs to.
    pub set: String,
    /// The index is not vouched for by the image (a referrer): the
    /// background fetch reads the whole layer to check it. A bound or
    /// node-made index is as trustworthy as the image, and the background
    /// fetch only fills what is missing, each span verified.
    pub check_whole: bool,
}

/// The compressed bytes the background fetch holds for spans not decoded
/// yet.
#[derive(Debug, Default)]
struct SpanBuffer {
    bytes: Vec<u8>,
    /// Layer offset of `bytes[0]`.
    start: u64,
    /// The next span to decode.
    next: usize,
    /// The first span that did not decode as the index says.
    failure: Option<String>,
}

/// How long one read waits for the registry unless told otherwise.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// How far ahead of a reader reading a file in order spans are fetched at
/// most, unless told otherwise (`fetch.read_ahead`).
pub const DEFAULT_READ_AHEAD: u64 = 64 << 20;

/// Files up to this size get their local copy (for passthrough) when
/// opened; bigger ones in the background.
const INLINE_COPY: u64 = 8 << 20;

/// The most a decompression window holds (deflate's 32 KiB).
const WINDOW: usize = 32 * 1024;

/// Read-ahead requests are at least this long (neighbouring small spans
/// go together).
const READ_AHEAD_REQUEST: u64 = 2 << 20;

/// A reader's request for at least this much is split into parts of at
/// least [`SPLIT_PART`] sent at once: registries behind object stores and
/// CDNs cap each connection (32 MiB/s is common), and one 4 MiB span over
/// one connection would keep the reader waiting 125 ms.
const SPLIT_FROM: u64 = 2 << 20;
const SPLIT_PART: u64 = 1 << 20;
/// At most this many parts.
const SPLIT_PARTS: u64 = 4;
/// Heads fetched ahead that a layer keeps for their spans' fetches.
const MAX_HEADS_AHEAD: usize = 4;

/// A span's head followed by the rest of the span.
fn joined(head: &[u8], rest: &[u8]) -> Bytes {
    let mut bytes = Vec::with_capacity(head.len() + rest.len());
    bytes.extend_from_slice(head);
    bytes.extend_from_slice(rest);
    Bytes::from(bytes)
}

/// Reads `range` of `blob` as parallel parts when it is long enough (see
/// [`SPLIT_FROM`]), joined in order.
async fn read_split(blob: &dyn BlobReader, range: Range<u64>) -> Result<Bytes, String> {
    let len = range.end - range.start;
    let parts = split_parts(len);
    if parts == 1 {
        return blob.read(range).await;
    }
    let part = len.div_ceil(parts);
    let reads = (0..parts).map(|i| {
        let start = range.start + i * part;
        blob.read(start..(start + part).min(range.end))
    });
    let parts = futures_util::future::try_join_all(reads).await?;
    let mut joined = Vec::with_capacity(len as usize);
    for part in parts {
        joined.extend_from_slice(&part);
    }
    Ok(Bytes::from(joined))
}

/// How many range requests [`read_split`] makes for `len` bytes.
fn split_parts(len: u64) -> u64 {
    if len < SPLIT_FROM {
        1
    } else {
        (len / SPLIT_PART).clamp(1, SPLIT_PARTS)
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// A layer served lazily through an index of where its bytes lie: the
/// seekable index over an unmodified layer, or a chunked layer's table of
/// contents (see [`Layout`]).
pub struct IndexedLayer {
    layout: Arc<dyn Layout>,
    /// The seekable index, when the layout is one: the whole layer can be
    /// checked against it.
    index: Option<Arc<LayerIndex>>,
    layer: Box<dyn BlobReader>,
    /// Where the seekable index's windows are read from.
    index_blob: Option<Box<dyn BlobReader>>,
    cache: Arc<ContentCache>,
    runtime: tokio::runtime::Handle,
    /// One lock per span: holding it means "I fetch this span".
    span_locks: Vec<tokio::sync::Mutex<()>>,
    stats: LayerFetchStats,
    /// Foreground (reads, read-ahead) and background work of the node.
    scheduler: Arc<Scheduler>,
    /// Files being read in order, to fetch ahead of.
    sequential: SequentialReads,
    /// This layer, for read-ahead tasks (set by [`Self::shared`]).
    me: Weak<Self>,
    /// Files whose local copy is being made.
    copying: std::sync::Mutex<std::collections::HashSet<usize>>,
    /// Becomes true when the mount goes away: reads still waiting on the
    /// network give up, so the daemon can exit.
    shutdown: tokio::sync::watch::Receiver<bool>,
    origin: Option<IndexOrigin>,
    /// How long one read may wait for the registry, retries included.
    read_timeout: Duration,
    /// Why the index was found not to match the layer: every read fails.
    poisoned: std::sync::OnceLock<String>,
    /// Spans whose head is fetched first or ahead (see [`Layout::head_input`]).
    heads: std::sync::Mutex<Heads>,
}

/// A span's head, checked and decoded.
#[derive(Debug)]
struct Head {
    /// The start of the span's output: what readers that need no more of
    /// it are answered from.
    start: Bytes,
    /// The layer bytes it came from: the span's fetch starts with them.
    input: Bytes,
    /// The span's window it was decoded with.
    window: Vec<u8>,
}

/// Publishes the head of a span (`None` until it has arrived and been
/// checked); closed when the span's fetch ends.
type HeadSender = tokio::sync::watch::Sender<Option<Arc<Head>>>;

/// The heads a layer publishes, by span.
#[derive(Debug, Default)]
struct Heads {
    senders: HashMap<usize, Arc<HeadSender>>,
    /// Spans whose head was fetched ahead of their fetch, oldest first: at
    /// most [`MAX_HEADS_AHEAD`] are kept for a fetch to take over.
    ahead: std::collections::VecDeque<usize>,
}

/// Ends the publication of the heads of spans being fetched when dropped
/// (see [`IndexedLayer::end_head`]).
struct HeadPublication<'a> {
    layer: &'a IndexedLayer,
    spans: Range<usize>,
}

impl Drop for HeadPublication<'_> {
    fn drop(&mut self) {
        for i in self.spans.clone() {
            self.layer.end_head(i);
        }
    }
}

impl std::fmt::Debug for IndexedLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexedLayer")
            .field("layer", &self.layout.layer_digest())
            .field("spans", &self.span_locks.len())
            .finish()
    }
}

impl IndexedLayer {
    pub fn new(
        index: LayerIndex,
        layer: Box<dyn BlobReader>,
        index_blob: Box<dyn BlobReader>,
        cache: Arc<ContentCache>,
        runtime: tokio::runtime::Handle,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let index = Arc::new(index);
        let mut layer = Self::with_layout(
            Arc::new(IndexLayout(index.clone())),
            layer,
            cache,
            runtime,
            shutdown,
        );
        layer.index = Some(index);
        layer.index_blob = Some(index_blob);
        layer
    }

    /// A chunked layer (eStargz), read through its table of contents.
    pub fn chunked(
        layout: ChunkedLayout,
        layer: Box<dyn BlobReader>,
        cache: Arc<ContentCache>,
        runtime: tokio::runtime::Handle,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self::with_layout(Arc::new(layout), layer, cache, runtime, shutdown)
    }

    fn with_layout(
        layout: Arc<dyn Layout>,
        layer: Box<dyn BlobReader>,
        cache: Arc<ContentCache>,
        runtime: tokio::runtime::Handle,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let span_locks = (0..layout.span_count())
            .map(|_| tokio::sync::Mutex::new(()))
            .collect();
        Self {
            layout,
            index: None,
            layer,
            index_blob: None,
            cache,
            runtime,
            span_locks,
            stats: LayerFetchStats::default(),
            scheduler: Arc::default(),
            sequential: SequentialReads::new(1, 0),
            me: Weak::new(),
            copying: std::sync::Mutex::default(),
            shutdown,
            origin: None,
            read_timeout: DEFAULT_READ_TIMEOUT,
            poisoned: std::sync::OnceLock::new(),
            heads: std::sync::Mutex::default(),
        }
    }

    /// Puts the layer under the node's scheduler (one for every mount), so
    /// that its background fetch waits for every mount's reads.
    pub fn with_scheduler(mut self, scheduler: Arc<Scheduler>) -> Self {
        self.scheduler = scheduler;
        self
    }

    /// Fetches up to `bytes` ahead of a reader reading a file in order (0:
    /// no read-ahead). Takes effect once the layer is [`Self::shared`].
    pub fn with_read_ahead(mut self, bytes: u64) -> Self {
        let span = self.layout.span_size().max(1);
        let max = bytes.div_ceil(span) as usize;
        self.sequential = SequentialReads::new(span, max);
        self
    }

    /// The layer, shared: read-ahead spawns tasks that hold it.
    pub fn shared(self) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            ..self
        })
    }

    /// Sets how long one read may wait for the registry before it fails.
    pub fn with_read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }

    /// Records where the index came from (see [`IndexOrigin`]).
    pub fn with_origin(mut self, origin: IndexOrigin) -> Self {
        self.origin = Some(origin);
        self
    }

    /// Why this layer's index was poisoned, if it was.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.get().map(String::as_str)
    }

    /// The index does not describe the layer: drop everything decoded
    /// through it, fail every later read, and make later pulls on this
    /// node fall back.
    fn poison(&self, problem: String) {
        if self.poisoned.set(problem.clone()).is_err() {
            return;
        }
        let layer = self.layout.layer_digest();
        metrics().error(ErrorKind::IndexMismatch);
        let freed = self.cache.remove(&self.all_cache_keys()).unwrap_or(0);
        let set = self.origin.as_ref().map_or("-", |o| o.set.as_str());
        tracing::error!(
            layer = %layer,
            index = set,
            freed,
            "the index does not match the layer; it is poisoned, its cached data dropped, and reads of the layer fail: {problem}"
        );
        if let Some(origin) = &self.origin
            && let Err(err) = origin.store.poison(&origin.set, &problem)
        {
            tracing::error!(index = set, "cannot record the poisoned index: {err}");
        }
    }

    pub fn stats(&self) -> &LayerFetchStats {
        &self.stats
    }

    /// Whether the layer's mount was told to shut down (unmounted).
    fn shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Waits for the background fetch's turn on the node; an error when
    /// the mount shuts down first, so that the fetch of an unmounted layer
    /// stops (and lets go of the layer) instead of waiting for a quiet
    /// node to fetch what nobody will read.
    async fn background_turn(&self) -> Result<(), ReadError> {
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            () = self.scheduler.background_turn() => {}
            _ = shutdown.wait_for(|down| *down) => {}
        }
        if self.shutting_down() {
            return Err(self.error("the mount is shutting down".into()));
        }
        Ok(())
    }

    fn error(&self, problem: String) -> ReadError {
        ReadError {
            layer: self.layout.layer_digest().to_owned(),
            problem,
        }
    }

    /// Fetched bytes that do not decode to what the index promises.
    fn verification_error(&self, problem: String) -> ReadError {
        metrics().error(ErrorKind::Verification);
        self.error(problem)
    }

    fn cache_error(&self, problem: String) -> ReadError {
        metrics().error(ErrorKind::Cache);
        self.error(problem)
    }

    /// Bytes of the compressed layer whose spans are in the node cache:
    /// how much of the layer this node has.
    pub fn local_bytes(&self) -> u64 {
        let local: u64 = (0..self.span_locks.len())
            .filter(|i| self.cache.contains(&self.span_key(*i)))
            .map(|i| {
                let input = self.layout.span_input(i);
                input.end - input.start
            })
            .sum();
        local.min(self.layout.layer_size())
    }

    /// Every cache key this layer may have filled: its spans, windows and
    /// the local copies of its files (for passthrough).
    pub fn all_cache_keys(&self) -> Vec<CacheKey> {
        let spans = (0..self.layout.span_count())
            .flat_map(|i| std::iter::once(self.span_key(i)).chain(self.window_key(i)));
        let files = (0..self.layout.entries().len()).filter_map(|e| self.file_key(e));
        spans.chain(files).collect()
    }

    /// The cache key of the local copy of regular file `entry`, made from
    /// where it lies and the keys of the spans that hold it.
    fn file_key(&self, entry: usize) -> Option<CacheKey> {
        let entry = &self.layout.entries()[entry];
        if entry.kind != pronto_index::EntryKind::File || entry.size == 0 {
            return None;
        }
        let mut hasher = Sha256::new();
        hasher.update(b"pronto file v1");
        hasher.update(entry.offset.to_le_bytes());
        hasher.update(entry.size.to_le_bytes());
        for i in self
            .layout
            .spans_for(entry.offset..entry.offset + entry.size)
        {
            hasher.update(self.span_key(i));
        }
        Some(hasher.finalize().into())
    }

    /// The cache key of span `i`'s decoded bytes.
    fn span_key(&self, i: usize) -> CacheKey {
        self.layout.span_key(i)
    }

    fn window_key(&self, i: usize) -> Option<CacheKey> {
        self.layout.window_key(i)
    }

    /// `spans` and the missing spans after them, while the request stays
    /// within the layout's [`Layout::min_fetch`]: small chunks come
    /// several to a request, as files an interpreter imports one after
    /// another lie next to each other.
    fn with_neighbours(&self, spans: Range<usize>) -> Range<usize> {
        let min = self.layout.min_fetch();
        if min == 0 || spans.is_empty() {
            return spans;
        }
        let first = self.layout.span_input(spans.start).start;
        let mut end = spans.end;
        while end < self.span_locks.len()
            && self.layout.span_input(end).end - first <= min
            && !self.cache.contains(&self.span_key(end))
        {
            end += 1;
        }
        spans.start..end
    }

    /// Makes spans `run` local: waits for whoever is fetching them, then
    /// fetches the still-missing ones with one range request per run of
    /// neighbours. A reader's spans (on demand, or from its profile) go
    /// as parallel parts with their window alongside, as someone waits.
    async fn ensure_spans(&self, run: Range<usize>, purpose: Purpose) -> Result<(), ReadError> {
        let waited = matches!(purpose, Purpose::OnDemand | Purpose::Profile);
        self.ensure_spans_as(run, purpose, waited).await
    }

    /// [`Self::ensure_spans`], saying whether a reader waits (or is about
    /// to wait) for the spans: then each request goes as parallel parts
    /// and the first span's window is fetched alongside, not after.
    async fn ensure_spans_as(
        &self,
        run: Range<usize>,
        purpose: Purpose,
        waited: bool,
    ) -> Result<(), ReadError> {
        let mut guards = Vec::with_capacity(run.len());
        // Ascending order: two readers never wait on each other in a cycle.
        for i in run.clone() {
            if self.cache.contains(&self.span_key(i)) {
                continue;
            }
            guards.push((i, self.span_locks[i].lock().await));
        }
        let missing: Vec<usize> = guards
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| !self.cache.contains(&self.span_key(*i)))
            .collect();
        if purpose == Purpose::OnDemand {
            metrics().cache_lookups((run.len() - missing.len()) as u64, missing.len() as u64);
        }
        let mut start = 0;
        while start < missing.len() {
            let mut end = start + 1;
            while end < missing.len() && missing[end] == missing[end - 1] + 1 {
                end += 1;
            }
            self.fetch_run(missing[start]..missing[end - 1] + 1, purpose, waited)
                .await?;
            start = end;
        }
        drop(guards);
        Ok(())
    }

    /// Fetches neighbouring spans `run` with one range request (retrying
    /// once if the bytes fail verification), decodes and caches them;
    /// `waited`: see [`Self::ensure_spans_as`].
    async fn fetch_run(
        &self,
        run: Range<usize>,
        purpose: Purpose,
        waited: bool,
    ) -> Result<(), ReadError> {
        // However the fetch ends (also when its reader gives up and drops
        // it), readers waiting for its heads stop waiting.
        let _heads = HeadPublication {
            layer: self,
            spans: run.clone(),
        };
        // A head fetched ahead: the fetch starts after it.
        let stored = self.take_head(run.start);
        let first = self.layout.span_input(run.start).start;
        let last = self.layout.span_input(run.end - 1).end;
        tracing::debug!(
            layer = %self.layout.layer_digest(),
            spans = ?run,
            bytes = last - first,
            ?purpose,
            "fetching spans"
        );
        let mut last_error = None;
        for attempt in 1..=2 {
            let asked = Instant::now();
            // A reader waits: the first span's window is fetched alongside
            // its bytes, not after them, and its head on its own, to be
            // served first. Later spans take their windows from the span
            // before.
            let stored = stored.as_ref().filter(|_| attempt == 1);
            let head = self
                .layout
                .head_input(run.start)
                .filter(|head| waited && head.end < last && stored.is_none());
            let requests = match (&head, stored) {
                (Some(head), _) => 1 + split_parts(last - head.end),
                (None, Some(stored)) if waited => {
                    split_parts(last - first - stored.input.len() as u64)
                }
                (None, None) if waited => split_parts(last - first),
                (None, _) => 1,
            };
            let (bytes, window) = if let Some(stored) = stored {
                let from = first + stored.input.len() as u64;
                let rest = if waited {
                    read_split(self.layer.as_ref(), from..last).await
                } else {
                    self.layer.read(from..last).await
                };
                let bytes = rest.map(|rest| joined(&stored.input, &rest));
                (bytes, Some(stored.window.clone()))
            } else if let Some(head) = head {
                let (head, rest) = tokio::join!(
                    self.fetch_head(run.start, head.clone()),
                    read_split(self.layer.as_ref(), head.end..last)
                );
                let (head, window) = head?;
                let bytes = rest.map(|rest| joined(&head, &rest));
                (bytes, Some(window))
            } else if waited {
                let (bytes, window) = tokio::join!(
                    read_split(self.layer.as_ref(), first..last),
                    self.window(run.start)
                );
                (bytes, Some(window?))
            } else {
                (self.layer.read(first..last).await, None)
            };
            let bytes =
                bytes.map_err(|e| self.error(format!("spans {}..{}: {e}", run.start, run.end)))?;
            let counter = match purpose {
                Purpose::Background => &self.stats.background_bytes,
                Purpose::ReadAhead => &self.stats.read_ahead_bytes,
                Purpose::Profile => &self.stats.profile_bytes,
                _ => &self.stats.layer_bytes,
            };
            // A head fetched ahead was counted then.
            let fetched = (bytes.len() - stored.map_or(0, |s| s.input.len())) as u64;
            counter.fetch_add(fetched, Ordering::Relaxed);
            if purpose == Purpose::OnDemand {
                self.stats
                    .on_demand_requests
                    .fetch_add(requests, Ordering::Relaxed);
            }
            self.stats.requests.fetch_add(requests, Ordering::Relaxed);
            metrics().fetched(purpose, fetched);
            let arrived = asked.elapsed();
            match self.decode_and_store(&run, first, &bytes, window).await {
                Ok(()) => {
                    tracing::debug!(
                        layer = %self.layout.layer_digest(),
                        spans = ?run,
                        fetch_ms = arrived.as_millis() as u64,
                        total_ms = asked.elapsed().as_millis() as u64,
                        "spans fetched and cached"
                    );
                    return Ok(());
                }
                Err(err) => {
                    tracing::warn!(layer = %self.layout.layer_digest(), attempt, "{err}");
                    last_error = Some(err);
                }
            }
        }
        Err(last_error.expect("two attempts ran"))
    }

    /// Fetches span `i`'s head (layer bytes `head`) and its window, checks
    /// and decodes the head on a blocking thread and publishes the result
    /// to readers waiting for the start of the span (see [`Self::heads`]).
    /// A head that fails its check is not published; the span's own check
    /// then fails too, and the span is fetched again.
    async fn fetch_head(&self, i: usize, head: Range<u64>) -> Result<(Bytes, Vec<u8>), ReadError> {
        // Readers arriving from now on wait for this head.
        let sender = self.head_sender(i, false);
        let (bytes, window) = tokio::join!(self.layer.read(head), self.window(i));
        let bytes = bytes.map_err(|e| self.error(format!("head of span {i}: {e}")))?;
        let window = window?;
        let (layout, input, win) = (self.layout.clone(), bytes.clone(), window.clone());
        let decoded = tokio::task::spawn_blocking(move || layout.decode_head(i, &input, &win))
            .await
            .map_err(|e| self.error(format!("head of span {i}: {e}")))?;
        match decoded {
            Ok(start) => {
                tracing::debug!(
                    layer = %self.layout.layer_digest(),
                    span = i,
                    bytes = start.len(),
                    "head of span served"
                );
                sender.send_replace(Some(Arc::new(Head {
                    start: Bytes::from(start),
                    input: bytes.clone(),
                    window: window.clone(),
                })));
            }
            Err(err) => tracing::warn!(layer = %self.layout.layer_digest(), "{err}"),
        }
        Ok((bytes, window))
    }

    /// The sender readers of span `i`'s head wait on, made if none is;
    /// `ahead`: the head is fetched ahead of its span, and kept for the
    /// span's fetch (the oldest such head beyond [`MAX_HEADS_AHEAD`] is
    /// let go).
    fn head_sender(&self, i: usize, ahead: bool) -> Arc<HeadSender> {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        let sender = heads
            .senders
            .entry(i)
            .or_insert_with(|| Arc::new(HeadSender::new(None)))
            .clone();
        if ahead && !heads.ahead.contains(&i) {
            // Heads whose span became local another way (the background
            // fetch) are of no more use.
            let Heads { senders, ahead } = &mut *heads;
            ahead.retain(|&j| {
                let keep = !self.cache.contains(&self.span_key(j));
                if !keep {
                    senders.remove(&j);
                }
                keep
            });
            heads.ahead.push_back(i);
            while heads.ahead.len() > MAX_HEADS_AHEAD {
                let oldest = heads.ahead.pop_front().expect("longer than the maximum");
                heads.senders.remove(&oldest);
            }
        }
        sender
    }

    /// Ends the publication of span `i`'s head: its readers stop waiting
    /// for it (the span is local, or its fetch failed).
    fn end_head(&self, i: usize) {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        heads.senders.remove(&i);
        heads.ahead.retain(|&j| j != i);
    }

    /// The head of span `i` fetched ahead, if there is one, for the span's
    /// fetch to start from: no longer let go to make room for others.
    fn take_head(&self, i: usize) -> Option<Arc<Head>> {
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        let position = heads.ahead.iter().position(|&j| j == i)?;
        heads.ahead.remove(position);
        heads.senders.get(&i)?.borrow().clone()
    }

    /// Fetches the head of span `i` ahead of the span, for a reader going
    /// through the span before it in order, which will need the start of
    /// span `i` soon: a read crossing into a span is then answered from
    /// its head, at once, and the span's own fetch starts after the head
    /// (each byte is fetched once). Nothing happens when the span has no
    /// head, is local, or is being fetched.
    fn head_ahead(&self, i: usize) {
        let Some(head) = self.layout.head_input(i) else {
            return;
        };
        if self.cache.contains(&self.span_key(i)) || self.span_locks[i].try_lock().is_err() {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        self.runtime.spawn(async move {
            // Holding the span's lock: a fetch of the span waits for the
            // head and starts from it.
            let Ok(_fetching) = me.span_locks[i].try_lock() else {
                return;
            };
            if me.cache.contains(&me.span_key(i)) {
                return;
            }
            let _foreground = me.scheduler.foreground();
            let sender = me.head_sender(i, true);
            me.stats.requests.fetch_add(1, Ordering::Relaxed);
            let fetched = me.bounded(me.fetch_head(i, head)).await;
            if let Some(Ok((bytes, _))) = &fetched {
                let len = bytes.len() as u64;
                me.stats.read_ahead_bytes.fetch_add(len, Ordering::Relaxed);
                metrics().fetched(Purpose::ReadAhead, len);
            }
            // Failed its check, or did not come: the span's fetch fetches
            // it again.
            if !matches!(fetched, Some(Ok(_))) || sender.borrow().is_none() {
                me.end_head(i);
            }
        });
    }

    /// Span `i`'s head for a reader that needs only its output up to
    /// `to` (relative to the span's start), when the span has a head that
    /// likely reaches that far and is not local: joins the fetch under way,
    /// or starts one that fetches the head first. `None`: read the span
    /// whole.
    fn head_for(
        &self,
        i: usize,
        to: u64,
    ) -> Option<tokio::sync::watch::Receiver<Option<Arc<Head>>>> {
        let head = self.layout.head_input(i)?;
        let input = self.layout.span_input(i);
        let output = self.layout.span_output(i);
        // What the head decodes to, as far as the span's ratio tells.
        let reach = (u128::from(head.end - head.start) * u128::from(output.end - output.start)
            / u128::from((input.end - input.start).max(1))) as u64;
        if to > reach || self.cache.contains(&self.span_key(i)) {
            return None;
        }
        let mut heads = self.heads.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = heads.senders.get(&i) {
            return Some(sender.subscribe());
        }
        let me = self.me.upgrade()?;
        let sender = Arc::new(HeadSender::new(None));
        let receiver = sender.subscribe();
        heads.senders.insert(i, sender);
        drop(heads);
        self.runtime.spawn(async move {
            let _foreground = me.scheduler.foreground();
            let fetched = me
                .bounded(me.ensure_spans_as(i..i + 1, Purpose::OnDemand, true))
                .await;
            me.end_head(i);
            if let Some(Err(err)) = fetched {
                tracing::debug!(
                    layer = me.digest(),
                    span = i,
                    "fetching a span for its head: {err}"
                );
            }
        });
        Some(receiver)
    }

    /// The head `receiver` publishes, once it has arrived, if it holds the
    /// span's output up to `to`; `None` when it does not reach or its
    /// fetch ended without it.
    async fn wait_for_head(
        mut receiver: tokio::sync::watch::Receiver<Option<Arc<Head>>>,
        to: u64,
    ) -> Option<Bytes> {
        let head = receiver.wait_for(Option::is_some).await.ok()?.clone()?;
        (head.start.len() as u64 >= to).then(|| head.start.clone())
    }

    /// Verifies, decodes and caches spans `run` from `bytes` (which start
    /// at layer offset `first`); `window` is the first span's, if known.
    async fn decode_and_store(
        &self,
        run: &Range<usize>,
        first: u64,
        bytes: &Bytes,
        mut window: Option<Vec<u8>>,
    ) -> Result<(), ReadError> {
        for i in run.clone() {
            let input = self.layout.span_input(i);
            let compressed =
                bytes.slice((input.start - first) as usize..(input.end - first) as usize);
            let this = match window.take() {
                Some(window) => window,
                None => self.window(i).await?,
            };
            let tail = self
                .decode_and_cache(i, compressed, this)
                .await?
                .map_err(|e| self.verification_error(e.to_string()))?;
            window = self.window_from_tail(i + 1, &tail);
        }
        Ok(())
    }

    /// Span `i`'s window taken from `tail`, the last bytes span `i - 1`
    /// decoded to, when they hold all of it: the window is the stream's
    /// last bytes before the span, so nothing needs fetching.
    fn window_from_tail(&self, i: usize, tail: &[u8]) -> Option<Vec<u8>> {
        let size = self.layout.window_size(i)?;
        (tail.len() >= size).then(|| tail[tail.len() - size..].to_vec())
    }

    /// Decodes span `i` from its compressed bytes and caches what it
    /// holds, on a blocking thread (inflating and writing to disk block).
    /// Returns the last 32 KiB it decoded to (the next span's window). The
    /// outer error is the cache's, the inner one the span's.
    async fn decode_and_cache(
        &self,
        i: usize,
        compressed: Bytes,
        window: Vec<u8>,
    ) -> Result<Result<Vec<u8>, String>, ReadError> {
        let (layout, cache, key) = (self.layout.clone(), self.cache.clone(), self.span_key(i));
        let done = tokio::task::spawn_blocking(move || {
            let data = match layout.decode_span(i, &compressed, &window) {
                Ok(data) => data,
                Err(err) => return Ok(Err(err)),
            };
            let tail = data[data.len().saturating_sub(WINDOW)..].to_vec();
            cache.put(&key, &data).map(|()| Ok(tail))
        })
        .await
        .map_err(|e| self.error(format!("span {i}: {e}")))?;
        done.map_err(|e| self.cache_error(format!("cannot cache span {i}: {e}")))
    }

    /// Span `i`'s decompression window: from the cache, from the end of
    /// span `i - 1` when that is local, or else fetched from the index.
    async fn window(&self, i: usize) -> Result<Vec<u8>, ReadError> {
        let (Some(range), Some(key), Some(index_blob)) = (
            self.layout.window_range(i),
            self.window_key(i),
            self.index_blob.as_ref(),
        ) else {
            return Ok(Vec::new());
        };
        if let Some(window) = self
            .cache
            .get(&key)
            .map_err(|e| self.error(e.to_string()))?
        {
            return Ok(window);
        }
        if let Some(previous) = i.checked_sub(1)
            && self.cache.contains(&self.span_key(previous))
        {
            let output = self.layout.span_output(previous);
            let len = output.end - output.start;
            let tail = len.min(WINDOW as u64);
            let cached = self
                .cache
                .read_at(&self.span_key(previous), len - tail, tail as usize)
                .map_err(|e| self.error(e.to_string()))?;
            if let Some(window) = cached.and_then(|tail| self.window_from_tail(i, &tail)) {
                return Ok(window);
            }
        }
        let bytes = index_blob
            .read(range)
            .await
            .map_err(|e| self.error(format!("window of span {i}: {e}")))?;
        self.stats
            .index_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        metrics().fetched(Purpose::Index, bytes.len() as u64);
        let window = self
            .layout
            .decode_window(i, &bytes)
            .map_err(|e| self.verification_error(e))?;
        self.cache
            .put(&key, &window)
            .map_err(|e| self.cache_error(format!("cannot cache a window: {e}")))?;
        Ok(window)
    }

    async fn read_stream(&self, range: Range<u64>) -> Result<Vec<u8>, ReadError> {
        if let Some(problem) = self.poisoned() {
            return Err(self.error(format!("its index is poisoned: {problem}")));
        }
        let _foreground = self.scheduler.foreground();
        self.bounded(self.read_stream_inner(range))
            .await
            .unwrap_or_else(|| Err(self.error("the mount is shutting down".into())))
    }

    /// Runs `work` for at most `fetch.read_timeout` (then it fails), and
    /// not past the mount's shutdown (`None` then).
    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, ReadError>>,
    ) -> Option<Result<T, ReadError>> {
        let mut shutdown = self.shutdown.clone();
        let timeout = self.read_timeout;
        tokio::select! {
            result = tokio::time::timeout(timeout, work) => {
                Some(result.unwrap_or_else(|_| Err(self.error(format!(
                    "gave up after {} waiting for the registry (fetch.read_timeout)",
                    seconds(timeout)
                )))))
            }
            _ = shutdown.wait_for(|down| *down) => None,
        }
    }

    /// The tar-stream range a read of `len` bytes at `offset` of file
    /// `index` covers (`None` past the end of the file), and what to fetch
    /// ahead of it when the file is being read in order.
    fn begin_read(&self, index: usize, offset: u64, len: usize) -> Option<(Range<u64>, Ahead)> {
        let entry = &self.layout.entries()[index];
        if offset >= entry.size {
            return None;
        }
        let end = (offset + len as u64).min(entry.size);
        let range = entry.offset + offset..entry.offset + end;
        let file = self
            .layout
            .spans_for(entry.offset..entry.offset + entry.size);
        let ahead = self.sequential.on_read(
            index,
            range.clone(),
            self.layout.spans_for(range.clone()),
            file,
        );
        Some((range, ahead))
    }

    /// A read of file `index`, with the read-ahead it calls for (see
    /// [`Ahead`]: a young reader's starts once the read has its bytes).
    async fn read_file(&self, index: usize, offset: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        let Some((range, ahead)) = self.begin_read(index, offset, len) else {
            return Ok(Vec::new());
        };
        if !ahead.after_read {
            self.read_ahead(ahead.spans.clone(), false);
        }
        // A reader going through the file in order that waits for the
        // read's last span: the next span's head comes alongside, so that
        // the read crossing into it is answered at once.
        if let Some(next) = ahead.next_head
            && !self.cache.contains(&self.span_key(next - 1))
        {
            self.head_ahead(next);
        }
        let last = (ahead.after_read && !ahead.spans.is_empty())
            .then(|| self.layout.spans_for(range.clone()).end.checked_sub(1))
            .flatten();
        let bytes = self.read_stream(range).await?;
        if ahead.after_read {
            match last.filter(|last| !self.cache.contains(&self.span_key(*last))) {
                // Answered from the head of a span still on its way: the
                // reader's next reads wait for the rest of it, which must
                // not share the link with what comes after.
                Some(last) => self.read_ahead_after(last, ahead.spans),
                // The reader is about to need these: as fast as a read of
                // its own.
                None => self.read_ahead(ahead.spans, true),
            }
        }
        Ok(bytes)
    }

    /// [`Self::read_ahead`] of `ahead` for a young reader, once span
    /// `span` is local.
    fn read_ahead_after(&self, span: usize, ahead: Range<usize>) {
        if ahead.is_empty() {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        self.runtime.spawn(async move {
            let local = me
                .bounded(me.ensure_spans_as(span..span + 1, Purpose::ReadAhead, true))
                .await;
            if matches!(local, Some(Ok(()))) {
                me.read_ahead(ahead, true);
            }
        });
    }

    /// Fetches the spans holding `ranges` (entry, offset in the file,
    /// length) ahead of the container's reads, from its startup profile:
    /// neighbouring spans in one request of up to a few MiB, the requests
    /// in the ranges' first-read order, `parallel` at a time, as
    /// foreground work (the background fetch waits). A read that needs a
    /// span being fetched waits for that fetch (span locks) instead of
    /// asking again; local spans are skipped. Returns the bytes the
    /// profile made local; a failure is logged and leaves the rest to
    /// on-demand reads.
    pub async fn prefetch(&self, ranges: &[(usize, u64, u64)], parallel: usize) -> u64 {
        use futures_util::StreamExt as _;
        let entries = self.layout.entries();
        let mut runs: Vec<Range<usize>> = Vec::new();
        let mut taken = std::collections::HashSet::new();
        for &(entry, offset, len) in ranges {
            let Some(file) = entries.get(entry) else {
                continue;
            };
            let end = offset.saturating_add(len).min(file.size);
            if offset >= end {
                continue;
            }
            for i in self
                .layout
                .spans_for(file.offset + offset..file.offset + end)
            {
                if !taken.insert(i) || self.cache.contains(&self.span_key(i)) {
                    continue;
                }
                match runs.last_mut() {
                    Some(run)
                        if run.end == i
                            && self.layout.span_input(i).end
                                - self.layout.span_input(run.start).start
                                <= READ_AHEAD_REQUEST =>
                    {
                        run.end = i + 1;
                    }
                    _ => runs.push(i..i + 1),
                }
            }
        }
        let before = self.stats.profile_bytes.load(Ordering::Relaxed);
        let _foreground = self.scheduler.foreground();
        let mut fetches = futures_util::stream::iter(runs)
            .map(|run| async move {
                let result = tokio::time::timeout(
                    self.read_timeout,
                    self.ensure_spans(run.clone(), Purpose::Profile),
                )
                .await
                .unwrap_or_else(|_| Err(self.error("profile fetch timed out".into())));
                (run, result)
            })
            .buffer_unordered(parallel.max(1));
        let mut failed = 0usize;
        while let Some((run, result)) = fetches.next().await {
            if let Err(err) = result {
                failed += 1;
                if failed == 1 {
                    tracing::warn!(layer = self.digest(), spans = ?run, "profile prefetch: {err}");
                }
            }
        }
        self.stats.profile_bytes.load(Ordering::Relaxed) - before
    }

    /// Fetches spans `ahead` for a reader reading a file in order: in
    /// requests of a few MiB, run in parallel as foreground work (the
    /// background fetch waits), at most as many at once as the scheduler
    /// allows. A span someone else is fetching or has fetched is not
    /// fetched again; a failure only means the reader fetches it itself.
    /// `soon`: the reader will wait for these spans next (a young run's
    /// next span), so each request goes as parallel parts.
    fn read_ahead(&self, ahead: Range<usize>, soon: bool) {
        if ahead.is_empty() {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let mut start = ahead.start;
        while start < ahead.end {
            let first = self.layout.span_input(start).start;
            let mut end = start + 1;
            while end < ahead.end
                && self.layout.span_input(end - 1).end - first < READ_AHEAD_REQUEST
            {
                end += 1;
            }
            let run = start..end;
            start = end;
            if run.clone().all(|i| self.cache.contains(&self.span_key(i))) {
                continue;
            }
            let layer = me.clone();
            self.runtime.spawn(async move {
                let _foreground = layer.scheduler.foreground();
                let fetched = layer
                    .bounded(async {
                        let _slot = layer.scheduler.read_ahead_slot().await;
                        layer
                            .ensure_spans_as(run.clone(), Purpose::ReadAhead, soon)
                            .await
                    })
                    .await;
                if let Some(Err(err)) = fetched {
                    tracing::debug!(layer = layer.digest(), spans = ?run, "read-ahead stopped: {err}");
                }
            });
        }
    }

    /// Reads the whole layer blob in order at low priority (pausing while
    /// on-demand reads run, and at most `rate` bytes per second when set),
    /// caches every span not cached yet, checks the blob against the layer
    /// digest from the image manifest, and checks the index against the
    /// layer (poisoning it when they differ).
    pub async fn fetch_in_background(
        &self,
        chunk: u64,
        rate: Option<u64>,
    ) -> Result<(), ReadError> {
        let index = match &self.index {
            Some(index) if self.origin.as_ref().is_some_and(|o| o.check_whole) => index.clone(),
            _ => return self.fill_in_background(chunk, rate).await,
        };
        let layer = &index.meta().layer;
        let (feed, reader) = pronto_registry::feed::channel(None);
        let scanned = index.clone();
        let scan = tokio::task::spawn_blocking(move || LayerTruth::scan(&scanned, reader));
        let mut feed = Some(feed);
        let mut hasher = Sha256::new();
        let mut spans = SpanBuffer::default();
        let started = Instant::now();
        let mut offset = 0;
        while offset < layer.size {
            if let Some(problem) = self.poisoned() {
                return Err(self.error(format!("its index is poisoned: {problem}")));
            }
            self.background_turn().await?;
            let end = (offset + chunk).min(layer.size);
            let bytes = self
                .layer
                .read(offset..end)
                .await
                .map_err(|e| self.error(format!("background fetch at byte {offset}: {e}")))?;
            hasher.update(&bytes);
            self.stats
                .background_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            metrics().fetched(Purpose::Background, bytes.len() as u64);
            if let Some(to_scan) = &mut feed
                && to_scan.write(bytes.clone()).await.is_err()
            {
                // The scan stopped early; its result says why.
                feed = None;
            }
            spans.bytes.extend_from_slice(&bytes);
            offset = end;
            self.cache_complete_spans(&mut spans, offset).await?;
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(offset as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        drop(feed);
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        if digest != layer.digest {
            return Err(self.error(format!(
                "the whole layer hashes to {digest}, not to the manifest's digest"
            )));
        }
        self.stats.complete.store(true, Ordering::SeqCst);
        self.check_index(&index, scan).await?;
        if let Some(err) = spans.failure {
            return Err(self.verification_error(err));
        }
        tracing::info!(
            layer = %layer.digest,
            bytes = layer.size,
            "layer fetched completely; its digest and its index were verified"
        );
        Ok(())
    }

    /// Fetches the spans not yet local, in order, in requests of up to
    /// `chunk` bytes, at low priority (pausing while on-demand reads run,
    /// at most `rate` bytes per second when set). Every span is verified
    /// against its digest; nothing local is fetched again.
    async fn fill_in_background(&self, chunk: u64, rate: Option<u64>) -> Result<(), ReadError> {
        let spans = self.span_locks.len();
        let started = Instant::now();
        let mut fetched = 0u64;
        let mut next = 0;
        while next < spans {
            if let Some(problem) = self.poisoned() {
                return Err(self.error(format!("its index is poisoned: {problem}")));
            }
            if self.cache.contains(&self.span_key(next)) {
                next += 1;
                continue;
            }
            let first = self.layout.span_input(next).start;
            let mut end = next + 1;
            while end < spans
                && self.layout.span_input(end).end - first <= chunk
                && !self.cache.contains(&self.span_key(end))
            {
                end += 1;
            }
            self.background_turn().await?;
            self.ensure_spans(next..end, Purpose::Background).await?;
            fetched += self.layout.span_input(end - 1).end - first;
            next = end;
            if let Some(rate) = rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(fetched as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
        }
        self.stats.complete.store(true, Ordering::SeqCst);
        tracing::info!(
            layer = %self.layout.layer_digest(),
            bytes = self.layout.layer_size(),
            fetched,
            "layer local completely; every span verified against its index"
        );
        Ok(())
    }

    /// Decodes and caches every span `spans` now holds completely (the
    /// layer having been read up to `offset`), keeping only what later
    /// spans still need.
    async fn cache_complete_spans(
        &self,
        spans: &mut SpanBuffer,
        offset: u64,
    ) -> Result<(), ReadError> {
        while spans.next < self.span_locks.len() && self.layout.span_input(spans.next).end <= offset
        {
            let i = spans.next;
            let input = self.layout.span_input(i);
            let key = self.span_key(i);
            if !self.cache.contains(&key) {
                let _guard = self.span_locks[i].lock().await;
                if !self.cache.contains(&key) {
                    let from = (input.start - spans.start) as usize;
                    let to = (input.end - spans.start) as usize;
                    let compressed = Bytes::copy_from_slice(&spans.bytes[from..to]);
                    let window = self.window(i).await?;
                    // Whether the bytes or the index are wrong is known
                    // once the whole layer is checked.
                    if let Err(err) = self.decode_and_cache(i, compressed, window).await? {
                        spans.failure.get_or_insert(err);
                    }
                }
            }
            spans.next += 1;
            // Neighbouring spans may share a byte.
            let keep_from = if spans.next < self.span_locks.len() {
                self.layout.span_input(spans.next).start
            } else {
                offset
            };
            let drop = (keep_from.saturating_sub(spans.start) as usize).min(spans.bytes.len());
            spans.bytes.drain(..drop);
            spans.start += drop as u64;
        }
        Ok(())
    }

    /// Starts [`Self::fetch_in_background`] on the layer's runtime in
    /// 4 MiB requests; a failure is logged, counted and shown in the
    /// layer's stats, and on-demand reads go on.
    pub fn start_background_fetch(self: &Arc<Self>, rate: Option<u64>) {
        let layer = self.clone();
        self.runtime.spawn(async move {
            if let Err(err) = layer.fetch_in_background(4 << 20, rate).await {
                if layer.shutting_down() {
                    tracing::debug!(
                        layer = layer.digest(),
                        "background fetch stopped: unmounted"
                    );
                    return;
                }
                metrics().error(ErrorKind::BackgroundFetch);
                layer
                    .stats()
                    .background_failed
                    .store(true, Ordering::SeqCst);
                tracing::warn!(layer = layer.digest(), "background fetch stopped: {err}");
            }
        });
    }

    /// Finishes the comparison of the index with the whole layer: poisons
    /// the index if they differ.
    async fn check_index(
        &self,
        index: &Arc<LayerIndex>,
        scan: tokio::task::JoinHandle<Result<LayerTruth, IndexError>>,
    ) -> Result<(), ReadError> {
        let truth = match scan.await {
            Ok(Ok(truth)) => truth,
            Ok(Err(err @ IndexError::Mismatch { .. })) => {
                self.poison(err.to_string());
                return Err(self.error(err.to_string()));
            }
            Ok(Err(err)) => return Err(self.error(format!("cannot check the index: {err}"))),
            Err(err) => return Err(self.error(format!("the index check stopped: {err}"))),
        };
        let range = index.windows_range();
        let windows = match &self.index_blob {
            Some(index_blob) if !range.is_empty() => index_blob
                .read(range)
                .await
                .map_err(|e| self.error(format!("cannot fetch the index's windows: {e}")))?,
            _ => Bytes::new(),
        };
        let index = index.clone();
        let compared = tokio::task::spawn_blocking(move || truth.compare(&index, &windows)).await;
        match compared.map_err(|e| self.error(format!("the index check stopped: {e}")))? {
            Ok(()) => {
                self.stats.index_verified.store(true, Ordering::SeqCst);
                Ok(())
            }
            Err(err @ IndexError::Mismatch { .. }) => {
                self.poison(err.to_string());
                Err(self.error(err.to_string()))
            }
            Err(err) => Err(self.error(format!("cannot check the index: {err}"))),
        }
    }

    async fn read_stream_inner(&self, range: Range<u64>) -> Result<Vec<u8>, ReadError> {
        let spans = self.layout.spans_for(range.clone());
        if spans.is_empty() {
            return Ok(Vec::new());
        }
        // The read needs only the start of its last span: that span's head
        // may answer it before the rest of the span arrives.
        let last = spans.end - 1;
        let mut head = self.head_for(last, range.end - self.layout.span_output(last).start);
        let whole = if head.is_some() {
            spans.start..last
        } else {
            spans.clone()
        };
        let with_neighbours = self.with_neighbours(whole.clone());
        if with_neighbours == whole {
            self.ensure_spans(whole, Purpose::OnDemand).await?;
        } else if let Err(err) = self.ensure_spans(with_neighbours, Purpose::OnDemand).await {
            // A neighbour that fails must not fail this read: the spans it
            // needs, on their own.
            tracing::debug!(layer = %self.layout.layer_digest(), "fetching with neighbours: {err}");
            self.ensure_spans(whole, Purpose::OnDemand).await?;
        }
        let mut out = Vec::with_capacity((range.end - range.start) as usize);
        for i in spans {
            let output = self.layout.span_output(i);
            let from = range.start.max(output.start) - output.start;
            let to = range.end.min(output.end) - output.start;
            if i == last
                && let Some(receiver) = head.take()
            {
                if let Some(start) = Self::wait_for_head(receiver, to).await {
                    out.extend_from_slice(&start[from as usize..to as usize]);
                    continue;
                }
                // The head did not reach, or its fetch ended: the span whole.
                self.ensure_spans(i..i + 1, Purpose::OnDemand).await?;
            }
            let key = self.span_key(i);
            let part = match self.cache.read_at(&key, from, (to - from) as usize) {
                Ok(Some(part)) => part,
                // Evicted between fetch and read (budget smaller than one
                // read): fetch again.
                Ok(None) => {
                    self.ensure_spans(i..i + 1, Purpose::OnDemand).await?;
                    self.cache
                        .read_at(&key, from, (to - from) as usize)
                        .map_err(|e| self.error(e.to_string()))?
                        .ok_or_else(|| {
                            self.error(format!("span {i} was evicted while being read"))
                        })?
                }
                Err(e) => return Err(self.error(e.to_string())),
            };
            if part.len() as u64 != to - from {
                return Err(self.error(format!("cached span {i} is shorter than its index says")));
            }
            out.extend_from_slice(&part);
        }
        Ok(out)
    }
}

impl LazyLayer for IndexedLayer {
    fn size(&self) -> u64 {
        self.layout.layer_size()
    }

    fn stats(&self) -> &LayerFetchStats {
        IndexedLayer::stats(self)
    }

    fn local_bytes(&self) -> u64 {
        IndexedLayer::local_bytes(self)
    }

    fn all_cache_keys(&self) -> Vec<CacheKey> {
        IndexedLayer::all_cache_keys(self)
    }

    fn start_background_fetch(self: Arc<Self>, rate: Option<u64>) {
        IndexedLayer::start_background_fetch(&self, rate);
    }

    fn prefetch<'a>(
        &'a self,
        ranges: &'a [(usize, u64, u64)],
        parallel: usize,
    ) -> PrefetchResult<'a> {
        Box::pin(IndexedLayer::prefetch(self, ranges, parallel))
    }

    fn as_source(self: Arc<Self>) -> Arc<dyn LayerSource> {
        self
    }
}

impl LayerSource for IndexedLayer {
    fn digest(&self) -> &str {
        self.layout.layer_digest()
    }

    fn entries(&self) -> &[Entry] {
        self.layout.entries()
    }

    fn read(&self, index: usize, offset: u64, len: usize) -> Result<Vec<u8>, ReadError> {
        self.runtime.block_on(self.read_file(index, offset, len))
    }

    fn read_async(self: Arc<Self>, index: usize, offset: u64, len: usize) -> ReadResult {
        Box::pin(async move { self.read_file(index, offset, len).await })
    }

    fn ready(&self, index: usize, offset: u64, len: usize) -> bool {
        if self.poisoned().is_some() {
            return true;
        }
        let entry = &self.layout.entries()[index];
        let end = (offset + len as u64).min(entry.size);
        self.layout
            .spans_for(entry.offset + offset.min(end)..entry.offset + end)
            .all(|i| self.cache.contains(&self.span_key(i)))
    }

    fn active(&self) {
        self.scheduler.active();
    }

    fn local_file(&self, index: usize) -> Option<CacheKey> {
        if self.poisoned().is_some() {
            return None;
        }
        let entry = &self.layout.entries()[index];
        let spans = self
            .layout
            .spans_for(entry.offset..entry.offset + entry.size);
        let keys: Vec<CacheKey> = spans.clone().map(|i| self.span_key(i)).collect();
        if keys.is_empty() || !keys.iter().all(|k| self.cache.contains(k)) {
            return None;
        }
        let file_key = self.file_key(index)?;
        if self.cache.contains(&file_key) {
            return Some(file_key);
        }
        if entry.size > INLINE_COPY {
            // An open does not wait for a big copy: this one is served
            // through the daemon, later ones by the kernel.
            self.copy_in_background(index);
            return None;
        }
        self.copy_file(index, file_key)
    }

    fn cache_keys(&self, entry: usize) -> Vec<CacheKey> {
        let entry = &self.layout.entries()[entry];
        self.layout
            .spans_for(entry.offset..entry.offset + entry.size)
            .map(|i| self.span_key(i))
            .collect()
    }
}

impl IndexedLayer {
    /// Makes the local copy of file `index` (for passthrough) on a
    /// blocking thread, once however many opens ask for it.
    fn copy_in_background(&self, index: usize) {
        let Some(me) = self.me.upgrade() else {
            return;
        };
        if !self
            .copying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(index)
        {
            return;
        }
        self.runtime.spawn_blocking(move || {
            if me.poisoned().is_none()
                && let Some(key) = me.file_key(index)
            {
                me.copy_file(index, key);
            }
            me.copying
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&index);
        });
    }

    /// Copies file `index` out of its cached spans into the cache under
    /// `file_key`.
    fn copy_file(&self, index: usize, file_key: CacheKey) -> Option<CacheKey> {
        let entry = &self.layout.entries()[index];
        let spans = self
            .layout
            .spans_for(entry.offset..entry.offset + entry.size);
        let copied = self.cache.put_with(&file_key, |file| {
            use std::io::Write;
            for i in spans {
                let output = self.layout.span_output(i);
                let from = entry.offset.max(output.start) - output.start;
                let to = (entry.offset + entry.size).min(output.end) - output.start;
                let part = self
                    .cache
                    .read_at(&self.span_key(i), from, (to - from) as usize)
                    .map_err(std::io::Error::other)?
                    .ok_or_else(|| std::io::Error::other("a span was evicted while copying"))?;
                file.write_all(&part)?;
            }
            Ok(())
        });
        match copied {
            Ok(()) => Some(file_key),
            Err(err) => {
                tracing::debug!(layer = %self.layout.layer_digest(), "cannot make a local file: {err}");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use pronto_index::{LayerCompression, LayerToIndex, build_index};
    use pronto_testbed::{Compression, Content, Layer};

    use super::*;

    /// A blob in memory that counts what is asked of it.
    #[derive(Clone)]
    struct Counted {
        bytes: Arc<Vec<u8>>,
        requests: Arc<AtomicU64>,
        served: Arc<AtomicU64>,
    }

    impl Counted {
        fn new(bytes: Vec<u8>) -> Self {
            Self {
                bytes: Arc::new(bytes),
                requests: Arc::default(),
                served: Arc::default(),
            }
        }

        fn requests(&self) -> u64 {
            self.requests.load(Ordering::SeqCst)
        }
    }

    impl BlobReader for Counted {
        fn read(&self, range: Range<u64>) -> ReadFuture<'_> {
            self.requests.fetch_add(1, Ordering::SeqCst);
            self.served
                .fetch_add(range.end - range.start, Ordering::SeqCst);
            let bytes =
                Bytes::copy_from_slice(&self.bytes[range.start as usize..range.end as usize]);
            Box::pin(async move {
                // A little latency, so that concurrent readers overlap.
                tokio::time::sleep(Duration::from_millis(2)).await;
                Ok(bytes)
            })
        }
    }

    #[tokio::test]
    async fn a_long_read_goes_as_parallel_parts_joined_in_order() {
        let data: Vec<u8> = (0..(9u32 << 20) / 4).flat_map(u32::to_le_bytes).collect();
        let blob = Counted::new(data.clone());
        // Short: one request.
        let short = read_split(&blob, 100..(1 << 20)).await.unwrap();
        assert_eq!(&short[..], &data[100..1 << 20]);
        assert_eq!(blob.requests(), 1);
        // 4 MiB and a bit, from an odd offset: four parts, every byte once.
        let range = 7..(4 << 20) + 12_345;
        let long = read_split(&blob, range.clone()).await.unwrap();
        assert_eq!(&long[..], &data[range.start as usize..range.end as usize]);
        assert_eq!(blob.requests(), 5);
        assert_eq!(
            blob.served.load(Ordering::SeqCst),
            (1 << 20) - 100 + range.end - range.start
        );
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        runtime: tokio::runtime::Runtime,
        layer: Arc<IndexedLayer>,
        blob: Counted,
        index_blob: Counted,
        _shutdown: tokio::sync::watch::Sender<bool>,
    }

    /// One gzip layer holding `weights` (random bytes), indexed with
    /// 64 KiB spans.
    fn fixture(weights: u64, read_ahead: u64) -> Fixture {
        fixture_under(weights, read_ahead, Arc::default())
    }

    /// [`fixture`] under the node scheduler `scheduler`.
    fn fixture_under(weights: u64, read_ahead: u64, scheduler: Arc<Scheduler>) -> Fixture {
        fixture_spans(weights, 64 << 10, read_ahead, scheduler, |blob| {
            Box::new(blob)
        })
    }

    /// One gzip layer holding `weights` (random bytes), indexed with
    /// spans of `span` bytes, under the node scheduler `scheduler`, its
    /// blob read through what `wrap` makes of it.
    fn fixture_spans(
        weights: u64,
        span: u64,
        read_ahead: u64,
        scheduler: Arc<Scheduler>,
        wrap: impl FnOnce(Counted) -> Box<dyn BlobReader>,
    ) -> Fixture {
        let layer = Layer::new()
            .compression(Compression::FAST)
            .file("weights", Content::random(5, weights));
        let mut blob = Vec::new();
        let digests = layer.write(&mut blob).unwrap();
        let target = LayerToIndex {
            digest: digests.digest,
            size: digests.size,
            compression: LayerCompression::Gzip,
        };
        let mut index_bytes = Vec::new();
        build_index(blob.as_slice(), &target, span, &mut index_bytes).unwrap();
        let index = LayerIndex::parse(&index_bytes).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ContentCache::open(dir.path(), 1 << 30).unwrap());
        let runtime = test_runtime();
        let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let blob = Counted::new(blob);
        let index_blob = Counted::new(index_bytes);
        let layer = IndexedLayer::new(
            index,
            wrap(blob.clone()),
            Box::new(index_blob.clone()),
            cache,
            runtime.handle().clone(),
            shutdown,
        )
        .with_read_ahead(read_ahead)
        .with_scheduler(scheduler)
        .shared();
        Fixture {
            _dir: dir,
            runtime,
            layer,
            blob,
            index_blob,
            _shutdown: shutdown_tx,
        }
    }

    /// A chunked (eStargz) layer of `files` in 64 KiB chunks, as
    /// `pronto convert` writes it, read through `cache`. `tamper` may
    /// change the blob first.
    fn chunked(
        files: &[(&str, Vec<u8>)],
        node: &Node,
        tamper: impl Fn(&mut Vec<u8>, &pronto_toc::Toc),
    ) -> (Arc<IndexedLayer>, Counted) {
        chunked_as(LayerCompression::Gzip, files, node, tamper)
    }

    /// [`chunked`], its chunks compressed with `compression`.
    fn chunked_as(
        compression: LayerCompression,
        files: &[(&str, Vec<u8>)],
        node: &Node,
        tamper: impl Fn(&mut Vec<u8>, &pronto_toc::Toc),
    ) -> (Arc<IndexedLayer>, Counted) {
        use std::io::Write as _;
        let mut builder = tar::Builder::new(Vec::new());
        for (path, data) in files {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o644);
            header.set_size(data.len() as u64);
            builder
                .append_data(&mut header, path, data.as_slice())
                .unwrap();
        }
        let mut tar = tempfile::tempfile().unwrap();
        tar.write_all(&builder.into_inner().unwrap()).unwrap();
        let mut blob = Vec::new();
        let options = pronto_toc::WriteOptions {
            chunk_size: 64 << 10,
            compression,
            level: Some(1),
        };
        let converted = pronto_toc::write_chunked(&tar, &mut blob, &options).unwrap();
        let limits = pronto_toc::Limits::default();
        let annotations = converted.annotations.iter().cloned().collect();
        let toc_ref = pronto_toc::TocRef::of(converted.media_type, &annotations)
            .unwrap()
            .unwrap();
        let toc = pronto_toc::blob_toc(&blob, &toc_ref, &limits).unwrap();
        tamper(&mut blob, &toc);
        let layout =
            ChunkedLayout::new(&converted.digest, converted.size, toc, compression).unwrap();
        let blob = Counted::new(blob);
        let layer = IndexedLayer::chunked(
            layout,
            Box::new(blob.clone()),
            node.cache.clone(),
            node.runtime.handle().clone(),
            node.shutdown.clone(),
        )
        .shared();
        (layer, blob)
    }

    fn entry_of(layer: &IndexedLayer, path: &str) -> usize {
        layer.entries().iter().position(|e| e.path == path).unwrap()
    }

    /// What chunked layers of one test share: a runtime, a node cache and
    /// the shutdown signal.
    struct Node {
        runtime: tokio::runtime::Runtime,
        cache: Arc<ContentCache>,
        shutdown: tokio::sync::watch::Receiver<bool>,
        _stop: tokio::sync::watch::Sender<bool>,
        _dir: tempfile::TempDir,
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(ContentCache::open(dir.path(), 1 << 30).unwrap());
        let runtime = test_runtime();
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        Node {
            runtime,
            cache,
            shutdown,
            _stop: stop,
            _dir: dir,
        }
    }

    #[test]
    fn a_chunked_layer_fetches_what_is_read_and_the_chunks_next_to_it() {
        let node = node();
        let model = Content::random(9, 4 << 20).to_vec().unwrap();
        let files = [
            ("app/config.json", b"{\"ready\": true}\n".to_vec()),
            ("app/model.bin", model.clone()),
        ];
        let (layer, blob) = chunked(&files, &node, |_, _| {});
        let config = entry_of(&layer, "app/config.json");
        assert_eq!(layer.read(config, 0, 4096).unwrap(), files[0].1);
        let served = blob.served.load(Ordering::SeqCst);
        assert_eq!(blob.requests(), 1);
        // The file and the chunks after it, up to 256 KiB in one request.
        assert!(
            served > 128 << 10 && served < 400 << 10,
            "{served} bytes fetched for a 16-byte file"
        );
        // The model's start came with it.
        let entry = entry_of(&layer, "app/model.bin");
        assert!(layer.read(entry, 0, 100_000).unwrap() == model[..100_000]);
        assert_eq!(blob.requests(), 1);
        // Far into the model: one more request, not the whole file.
        let read = layer.read(entry, 3 << 20, 100_000).unwrap();
        assert!(read[..] == model[3 << 20..(3 << 20) + 100_000]);
        assert_eq!(blob.requests(), 2);
        let served = blob.served.load(Ordering::SeqCst);
        assert!(served < 1200 << 10, "{served} bytes fetched");
        let whole = layer.read(entry, 0, 4 << 20).unwrap();
        assert!(whole == model);
    }

    #[test]
    fn a_chunk_another_layer_brought_is_not_fetched_again() {
        let node = node();
        let shared = Content::random(11, 300_000).to_vec().unwrap();
        let (v1, _) = chunked(
            &[
                ("lib/shared.so", shared.clone()),
                ("app/v1", b"one".to_vec()),
            ],
            &node,
            |_, _| {},
        );
        // The same bytes in a zstd:chunked layer have the same key.
        let (v2, v2_blob) = chunked_as(
            LayerCompression::Zstd,
            &[
                ("app/v2", b"two".to_vec()),
                ("lib/shared.so", shared.clone()),
            ],
            &node,
            |_, _| {},
        );
        assert_ne!(v1.digest(), v2.digest());
        let read = v1.read(entry_of(&v1, "lib/shared.so"), 0, 300_000).unwrap();
        assert!(read == shared);
        let read = v2.read(entry_of(&v2, "lib/shared.so"), 0, 300_000).unwrap();
        assert!(read == shared);
        assert_eq!(
            v2_blob.requests(),
            0,
            "the shared chunks came from the cache"
        );
        assert!(v2.ready(entry_of(&v2, "lib/shared.so"), 0, 300_000));
    }

    #[test]
    fn small_files_share_spans_that_the_same_files_elsewhere_share_too() {
        let node = node();
        let files: Vec<(String, Vec<u8>)> = (0..200u64)
            .map(|i| {
                let data = Content::random(100 + i, 1000 + (i * 37) % 3000)
                    .to_vec()
                    .unwrap();
                (format!("lib/m{i:03}.py"), data)
            })
            .collect();
        let named: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
        let (v1, _) = chunked(&named, &node, |_, _| {});
        let spans = v1.layout.span_count();
        assert!(
            spans * 4 < files.len(),
            "{spans} spans for {} small files",
            files.len()
        );
        for (path, data) in &files {
            let entry = entry_of(&v1, path);
            assert!(v1.read(entry, 0, data.len()).unwrap() == *data, "{path}");
        }
        // One file changed in the middle: the other runs keep their keys,
        // so only the run around the change is fetched.
        let mut changed = named.clone();
        changed[100].1 = b"changed\n".to_vec();
        let (v2, v2_blob) = chunked(&changed, &node, |_, _| {});
        for (path, data) in &changed {
            let entry = entry_of(&v2, path);
            assert!(v2.read(entry, 0, data.len()).unwrap() == *data, "{path}");
        }
        let served = v2_blob.served.load(Ordering::SeqCst);
        let total: u64 = files.iter().map(|(_, d)| d.len() as u64).sum();
        assert!(
            served * 4 < total,
            "{served} of {total} bytes fetched again after one file changed"
        );
    }

    #[test]
    fn a_tampered_chunk_is_refused_and_nothing_of_it_is_served() {
        let node = node();
        let data = Content::random(12, 200_000).to_vec().unwrap();
        let second = std::cell::Cell::new(0);
        let (layer, _) = chunked(&[("app/data", data.clone())], &node, |blob, toc| {
            // A byte in the middle of the second chunk's member.
            let chunk = &toc.chunks[0][1];
            second.set(chunk.file_offset);
            let at = (chunk.blob.start + chunk.blob.end) / 2;
            blob[at as usize] ^= 0x55;
        });
        let entry = entry_of(&layer, "app/data");
        assert!(layer.read(entry, 0, 1000).unwrap() == data[..1000]);
        let err = layer.read(entry, second.get() + 10, 1000).unwrap_err();
        assert!(err.to_string().contains("chunk 1"), "{err}");
        assert!(!layer.ready(entry, second.get() + 10, 1000));
    }

    /// The runtime a test's layers read on.
    fn test_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    fn weights_entry(layer: &IndexedLayer) -> usize {
        layer
            .entries()
            .iter()
            .position(|e| e.path == "weights")
            .unwrap()
    }

    #[test]
    fn a_span_takes_its_window_from_the_span_before_when_that_is_local() {
        let f = fixture(2 << 20, 0);
        let entry = weights_entry(&f.layer);
        let want = Content::random(5, 2 << 20).to_vec().unwrap();
        let span = f.layer.layout.span_size();
        // Several spans in one read, cold: one request for their bytes and
        // at most one for the first span's window.
        let read = f.layer.read(entry, span, 3 * span as usize).unwrap();
        assert!(read[..] == want[span as usize..4 * span as usize]);
        assert_eq!(f.blob.requests(), 1);
        assert!(f.index_blob.requests() <= 1, "{}", f.index_blob.requests());
        let windows = f.index_blob.requests();
        // The next spans follow local ones: no window is fetched.
        let read = f.layer.read(entry, 4 * span, 2 * span as usize).unwrap();
        assert!(read[..] == want[4 * span as usize..6 * span as usize]);
        assert_eq!(f.index_blob.requests(), windows);
        drop(f.runtime);
    }

    #[test]
    fn an_unmounted_layer_stops_its_background_fetch_and_lets_go_of_the_layer() {
        let scheduler = Arc::new(Scheduler::new(1, Duration::from_millis(20)));
        let f = fixture_under(1 << 20, 0, scheduler.clone());
        // Another mount's read keeps the node busy: the fetch waits.
        let busy = scheduler.foreground();
        IndexedLayer::start_background_fetch(&f.layer, None);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            Arc::strong_count(&f.layer),
            2,
            "the waiting fetch holds the layer"
        );
        f._shutdown.send(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Arc::strong_count(&f.layer) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            Arc::strong_count(&f.layer),
            1,
            "the fetch of an unmounted layer ended"
        );
        drop(busy);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            f.blob.requests(),
            0,
            "nothing fetched for an unmounted layer"
        );
    }

    #[test]
    fn readers_and_read_ahead_fetch_every_span_once() {
        let size = 8 << 20;
        let f = fixture(size, 1 << 20);
        let entry = weights_entry(&f.layer);
        let want = Arc::new(Content::random(5, size).to_vec().unwrap());
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let (layer, want) = (f.layer.clone(), want.clone());
                std::thread::spawn(move || {
                    let mut offset = 0;
                    while offset < size {
                        let read = layer.read(entry, offset, 128 << 10).unwrap();
                        assert!(read[..] == want[offset as usize..offset as usize + read.len()]);
                        offset += read.len() as u64;
                    }
                })
            })
            .collect();
        for reader in readers {
            reader.join().unwrap();
        }
        let spans = f.layer.layout.span_count() as u64;
        let layer = f.layer.layout.layer_size();
        // Neighbouring spans share at most one byte.
        let served = f.blob.served.load(Ordering::SeqCst);
        assert!(
            served <= layer + spans,
            "{served} bytes fetched for a {layer}-byte layer"
        );
        let stats = f.layer.stats();
        let (asked, ahead) = (
            stats.layer_bytes.load(Ordering::SeqCst),
            stats.read_ahead_bytes.load(Ordering::SeqCst),
        );
        assert!(ahead > 0, "spans were fetched ahead of the readers");
        assert!(
            asked + ahead >= layer - (64 << 10),
            "nearly all of the layer was read"
        );
        drop(f.runtime);
    }

    /// Requests with when they were asked and answered.
    type RequestLog = Arc<std::sync::Mutex<Vec<(Range<u64>, Instant, Instant)>>>;

    /// A blob whose requests take 40 ms and are logged.
    struct Timed {
        inner: Counted,
        log: RequestLog,
    }

    impl BlobReader for Timed {
        fn read(&self, range: Range<u64>) -> ReadFuture<'_> {
            Box::pin(async move {
                let asked = Instant::now();
                tokio::time::sleep(Duration::from_millis(40)).await;
                let bytes = self.inner.read(range.clone()).await;
                self.log
                    .lock()
                    .unwrap()
                    .push((range, asked, Instant::now()));
                bytes
            })
        }
    }

    /// A layer of `size` bytes of weights in 4 MiB spans, read-ahead on,
    /// whose blob requests are logged with when they were asked for and
    /// answered.
    fn logged_fixture(size: u64) -> (Fixture, RequestLog) {
        let log = RequestLog::default();
        let f = fixture_spans(size, 4 << 20, 64 << 20, Arc::default(), |blob| {
            Box::new(Timed {
                inner: blob,
                log: log.clone(),
            })
        });
        (f, log)
    }

    #[test]
    fn a_reader_waiting_for_a_span_is_not_made_to_share_the_link_with_spans_after_it() {
        let size = 24 << 20;
        let (f, log) = logged_fixture(size);
        let entry = weights_entry(&f.layer);
        let want = Content::random(5, size).to_vec().unwrap();
        // `head -c 9M`: the reader reaches span 1 while it is on its way
        // (asked for half way through span 0) and reads into span 2.
        let mut offset = 0;
        while offset < 9 << 20 {
            let read = f.layer.read(entry, offset, 128 << 10).unwrap();
            assert!(read[..] == want[offset as usize..offset as usize + read.len()]);
            offset += read.len() as u64;
        }
        let span = |i: usize| f.layer.layout.span_input(i);
        let log = log.lock().unwrap().clone();
        let of_span = |i: usize| {
            log.iter()
                .filter(|(r, _, _)| r.start >= span(i).start && r.start < span(i).end)
                .collect::<Vec<_>>()
        };
        let second = of_span(1);
        assert!(!second.is_empty(), "span 1 was fetched: {log:?}");
        let second_done = second.iter().map(|(_, _, done)| *done).max().unwrap();
        for later in 2..f.layer.layout.span_count() {
            // Only the head of the span after it, for the read crossing
            // into it.
            let head = (later == 2).then(|| f.layer.layout.head_input(2)).flatten();
            for (range, asked, _) in of_span(later) {
                assert!(
                    *asked >= second_done || Some(range) == head.as_ref(),
                    "span {later} ({range:?}) was asked for while the reader waited for span 1"
                );
            }
        }
        drop(f.runtime);
    }

    #[test]
    fn the_span_a_young_reader_needs_next_comes_as_parallel_parts() {
        let size = 24 << 20;
        let (f, log) = logged_fixture(size);
        let entry = weights_entry(&f.layer);
        // 3 MiB in order: span 1 is asked for ahead of the reader.
        let mut offset = 0;
        while offset < 3 << 20 {
            offset += f.layer.read(entry, offset, 128 << 10).unwrap().len() as u64;
        }
        let span = f.layer.layout.span_input(1);
        let of_span = || {
            log.lock()
                .unwrap()
                .iter()
                .filter(|(r, _, _)| r.start >= span.start && r.start < span.end)
                .map(|(r, _, _)| r.clone())
                .collect::<Vec<_>>()
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while of_span().iter().map(|r| r.end - r.start).sum::<u64>() < span.end - span.start {
            assert!(Instant::now() < deadline, "span 1 was not fetched ahead");
            std::thread::sleep(Duration::from_millis(5));
        }
        let parts = of_span();
        assert!(parts.len() > 1, "one request for span 1: {parts:?}");
        assert_eq!(
            parts.iter().map(|r| r.end - r.start).sum::<u64>(),
            span.end - span.start,
            "every byte of span 1 once: {parts:?}"
        );
        drop(f.runtime);
    }

    /// A blob whose requests other than span heads wait until `open`, and
    /// which may send one tampered head first.
    struct Gated {
        inner: Counted,
        open: tokio::sync::watch::Receiver<bool>,
        tamper_a_head: AtomicBool,
        hold_heads: bool,
        /// Every range asked for, in order.
        log: RangeLog,
    }

    /// Ranges asked of a blob, in order.
    type RangeLog = Arc<std::sync::Mutex<Vec<Range<u64>>>>;

    impl BlobReader for Gated {
        fn read(&self, range: Range<u64>) -> ReadFuture<'_> {
            Box::pin(async move {
                self.log.lock().unwrap().push(range.clone());
                let head = range.end - range.start == pronto_index::HEAD_SIZE;
                if !head || self.hold_heads {
                    let mut open = self.open.clone();
                    open.wait_for(|open| *open)
                        .await
                        .map_err(|e| e.to_string())?;
                }
                let bytes = self.inner.read(range).await?;
                if head && self.tamper_a_head.swap(false, Ordering::SeqCst) {
                    let mut tampered = bytes.to_vec();
                    tampered[100] ^= 1;
                    return Ok(Bytes::from(tampered));
                }
                Ok(bytes)
            })
        }
    }

    /// A layer of 3 MiB of weights in 1 MiB spans, no read-ahead, read
    /// through [`Gated`]; the sender opens the gate.
    fn gated_fixture(tamper_a_head: bool) -> (Fixture, tokio::sync::watch::Sender<bool>) {
        gated_fixture_as(tamper_a_head, false)
    }

    /// [`gated_fixture`]; `hold_heads`: heads wait for the gate too.
    fn gated_fixture_as(
        tamper_a_head: bool,
        hold_heads: bool,
    ) -> (Fixture, tokio::sync::watch::Sender<bool>) {
        let (f, open, _) = gated_fixture_with(tamper_a_head, hold_heads, 0);
        (f, open)
    }

    /// [`gated_fixture_as`] with `read_ahead`, and the log of the ranges
    /// asked for.
    fn gated_fixture_with(
        tamper_a_head: bool,
        hold_heads: bool,
        read_ahead: u64,
    ) -> (Fixture, tokio::sync::watch::Sender<bool>, RangeLog) {
        let (open_tx, open) = tokio::sync::watch::channel(false);
        let log = RangeLog::default();
        let asked = log.clone();
        let f = fixture_spans(3 << 20, 1 << 20, read_ahead, Arc::default(), |blob| {
            Box::new(Gated {
                inner: blob,
                open,
                tamper_a_head: AtomicBool::new(tamper_a_head),
                hold_heads,
                log: asked,
            })
        });
        assert!(f.layer.layout.head_input(0).is_some(), "span 0 has a head");
        (f, open_tx, log)
    }

    /// The weights file's bytes `range`, from the whole layer.
    fn weights_bytes(f: &Fixture, range: Range<usize>) -> Vec<u8> {
        let tar = pronto_index::decompress_layer(&f.blob.bytes, LayerCompression::Gzip).unwrap();
        let offset = f.layer.layout.entries()[weights_entry(&f.layer)].offset as usize;
        tar[offset + range.start..offset + range.end].to_vec()
    }

    #[test]
    fn the_start_of_a_span_is_served_from_its_head_before_the_rest_arrives() {
        let (f, open) = gated_fixture(false);
        let entry = weights_entry(&f.layer);
        let read = f.layer.read(entry, 0, 64 << 10).unwrap();
        assert_eq!(read, weights_bytes(&f, 0..64 << 10));
        assert!(
            !f.layer.cache.contains(&f.layer.span_key(0)),
            "span 0 is still on its way"
        );
        open.send_replace(true);
        // The rest arrives and the span is cached whole, each byte fetched once.
        let span = f.layer.layout.span_input(0);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f.layer.cache.contains(&f.layer.span_key(0)) {
            assert!(Instant::now() < deadline, "span 0 was not cached");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(f.blob.served.load(Ordering::SeqCst), span.end - span.start);
        // Every range request is counted, the head's and the parts'.
        assert_eq!(
            f.layer.stats.requests.load(Ordering::SeqCst),
            f.blob.requests()
        );
        assert_eq!(
            f.layer.stats.on_demand_requests.load(Ordering::SeqCst),
            f.blob.requests()
        );
        assert!(f.blob.requests() > 1, "the head came on its own");
        let far = f.layer.read(entry, 900 << 10, 4096).unwrap();
        assert_eq!(far, weights_bytes(&f, 900 << 10..(900 << 10) + 4096));
        assert_eq!(f.blob.served.load(Ordering::SeqCst), span.end - span.start);
        drop(f.runtime);
    }

    #[test]
    fn a_reader_crossing_into_the_next_span_is_answered_from_its_head_fetched_ahead() {
        let (f, open, log) = gated_fixture_with(false, false, 64 << 20);
        let entry = weights_entry(&f.layer);
        let head = f.layer.layout.head_input(1).expect("span 1 has a head");
        let span = f.layer.layout.span_input(1);
        // A reader going through the file in order (`head -c`) while the
        // registry holds everything but heads: it waits for the rest of
        // span 0, and the head of span 1 is asked for meanwhile.
        let layer = f.layer.clone();
        let upto = (1 << 20) + (64 << 10);
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            while out.len() < upto {
                out.extend(layer.read(entry, out.len() as u64, 128 << 10)?);
            }
            Ok::<_, ReadError>(out)
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !log.lock().unwrap().contains(&head) {
            assert!(
                Instant::now() < deadline,
                "span 1's head was not asked for: {:?}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!reader.is_finished(), "span 0 is still held back");
        open.send_replace(true);
        let read = reader.join().unwrap().unwrap();
        assert_eq!(read, weights_bytes(&f, 0..read.len()));
        // Span 1 whole, past its head: the fetch starts after the head,
        // each of its bytes fetched once.
        let far = (2 << 20) - (64 << 10);
        let tail = f.layer.read(entry, far, 4096).unwrap();
        assert_eq!(tail, weights_bytes(&f, far as usize..far as usize + 4096));
        let asked: u64 = log
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.start >= span.start && r.start < span.end)
            .map(|r| r.end - r.start)
            .sum();
        assert_eq!(asked, span.end - span.start, "{:?}", log.lock().unwrap());
        drop(f.runtime);
    }

    #[test]
    fn heads_kept_ahead_are_bounded_and_let_go_once_their_span_is_local() {
        let f = fixture_spans(24 << 20, 2 << 20, 0, Arc::default(), |blob| Box::new(blob));
        let kept = || {
            let heads = f.layer.heads.lock().unwrap();
            let mut spans: Vec<usize> = heads.ahead.iter().copied().collect();
            spans.sort_unstable();
            assert_eq!(heads.senders.len(), spans.len());
            spans
        };
        for i in 1..=6 {
            f.layer.head_sender(i, true);
        }
        assert_eq!(kept(), vec![3, 4, 5, 6], "the oldest go first");
        // Span 4 becomes local (as the background fetch makes it).
        f.layer.cache.put(&f.layer.span_key(4), &[0; 16]).unwrap();
        f.layer.head_sender(7, true);
        assert_eq!(kept(), vec![3, 5, 6, 7]);
        // A fetch that takes a head over keeps it until the fetch ends.
        assert!(f.layer.take_head(5).is_none(), "nothing arrived for it");
        assert_eq!(f.layer.heads.lock().unwrap().ahead.len(), 3);
        f.layer.end_head(5);
        assert_eq!(f.layer.heads.lock().unwrap().senders.len(), 3);
        drop(f.runtime);
    }

    #[test]
    fn a_head_that_fails_its_check_is_never_served() {
        let (f, open) = gated_fixture(true);
        let entry = weights_entry(&f.layer);
        let layer = f.layer.clone();
        let reader = std::thread::spawn(move || layer.read(entry, 0, 64 << 10));
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            !reader.is_finished(),
            "the read was answered from a head that does not match its digest"
        );
        open.send_replace(true);
        let read = reader.join().unwrap().unwrap();
        assert_eq!(read, weights_bytes(&f, 0..64 << 10));
        drop(f.runtime);
    }

    #[test]
    fn a_fetch_given_up_leaves_no_head_for_readers_to_wait_on() {
        let (f, open) = gated_fixture_as(false, true);
        let layer = f.layer.clone();
        // A fetch that publishes its head, dropped while the registry
        // holds it (as a reader's timeout or a read-ahead's does).
        let given_up = f.runtime.block_on(async move {
            tokio::time::timeout(
                Duration::from_millis(200),
                layer.ensure_spans_as(0..1, Purpose::ReadAhead, true),
            )
            .await
        });
        assert!(given_up.is_err(), "the fetch ended before it was dropped");
        open.send_replace(true);
        // The registry answers again: a reader of the span's start gets its
        // bytes (instead of waiting for a head nobody fetches any more).
        let entry = weights_entry(&f.layer);
        let read = f.layer.read(entry, 0, 4096).unwrap();
        assert_eq!(read, weights_bytes(&f, 0..4096));
        drop(f.runtime);
    }
}
