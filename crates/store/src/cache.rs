//! [`ContentCache`]: files named by key under `<root>/cache/data`, their
//! sizes in a redb database, recency and pins in memory.
//!
//! Crash safety: data is written to a temporary file and renamed before
//! its entry is committed; entries are removed before their files. Entry
//! commits are made durable in batches (every [`DURABLE_EVERY`] puts, on
//! a thread of their own, and when the cache closes), not one by one, and
//! a batch's data files are synced just before its durable commit, never
//! on a reader's path: after a crash the entries of the last puts may be
//! missing, and their files are then deleted as leftovers. At open, files
//! without an entry and entries without a file are dropped, so the
//! database and the directory always agree after a restart, and no entry
//! ever names data that was not synced.
//! Recency is not persisted: after a restart every entry counts as used at
//! start-up.
//!
//! The hot path (every read of every mount) takes one of [`SHARDS`] locks,
//! chosen by key, and reads through a file kept open; eviction walks the
//! oldest entries of each shard (kept in order), never sorting them all.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use pronto_metrics::metrics;
use redb::{Database, Durability, ReadableTable, TableDefinition};

/// A content key: 32 bytes, typically a SHA-256.
pub type CacheKey = [u8; 32];

const ENTRIES: TableDefinition<&[u8; 32], u64> = TableDefinition::new("entries");

/// Independent parts of the in-memory state, by the key's first byte.
const SHARDS: usize = 16;

/// Files kept open per shard for reads (up to 16 × this descriptors).
const OPEN_FILES_PER_SHARD: usize = 32;

/// Every this many puts, the entries committed so far are made durable
/// (their files synced first).
const DURABLE_EVERY: u64 = 64;

/// Candidates each shard offers per eviction round.
const VICTIMS_PER_SHARD: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error(
        "the disk holding the node cache is full (writing {path}): free space on it, or lower cache.budget"
    )]
    DiskFull { path: PathBuf },
    #[error("cache I/O failed on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cache metadata database {path} failed: {message}")]
    Db { path: PathBuf, message: String },
}

/// Counters for `pronto cache stats` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: u64,
    pub bytes: u64,
    pub budget: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub pinned: u64,
}

#[derive(Debug, Default)]
struct Shard {
    /// key → (size, last use tick)
    entries: HashMap<CacheKey, (u64, u64)>,
    /// last use tick → key: the shard's entries oldest first.
    recency: BTreeMap<u64, CacheKey>,
    /// key → number of pins (open files using it)
    pins: HashMap<CacheKey, u64>,
    /// Data files kept open for reads.
    open: HashMap<CacheKey, Arc<File>>,
}

impl Shard {
    /// Marks `key` used at `tick`; false when it is not cached.
    fn touch(&mut self, key: &CacheKey, tick: u64) -> bool {
        let Some(entry) = self.entries.get_mut(key) else {
            return false;
        };
        self.recency.remove(&entry.1);
        entry.1 = tick;
        self.recency.insert(tick, *key);
        true
    }

    /// Records `key` as cached; false when it already was.
    fn insert(&mut self, key: &CacheKey, size: u64, tick: u64) -> bool {
        if self.touch(key, tick) {
            return false;
        }
        self.entries.insert(*key, (size, tick));
        self.recency.insert(tick, *key);
        true
    }

    /// Forgets `key`; its size if it was cached.
    fn remove(&mut self, key: &CacheKey) -> Option<u64> {
        let (size, tick) = self.entries.remove(key)?;
        self.recency.remove(&tick);
        self.open.remove(key);
        Some(size)
    }
}

/// Entries committed but not durable yet, with their data files, which
/// are synced only when a durable commit is about to cover them.
#[derive(Debug, Default)]
struct Pending {
    /// Data files of entries committed since the last durable commit.
    files: Mutex<Vec<PathBuf>>,
    /// Held shared by a put from its entry's commit until its file is in
    /// `files`, exclusively by a durable commit: no entry becomes durable
    /// before its file is synced.
    gate: RwLock<()>,
    /// A durable commit is running on its own thread.
    flushing: AtomicBool,
}

impl Pending {
    /// Syncs the data files of every entry committed so far, then commits
    /// durably (which makes those entries durable). Files gone meanwhile
    /// (evicted) are skipped. A file that cannot be synced stays pending,
    /// and no durable commit is made.
    fn make_durable(&self, db: &Database) -> Result<(), String> {
        // Most files, without holding up puts.
        self.sync(std::mem::take(&mut *lock(&self.files)))?;
        let _gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        // Those put meanwhile.
        self.sync(std::mem::take(&mut *lock(&self.files)))?;
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate)
            .map_err(|e| e.to_string())?;
        txn.commit().map_err(|e| e.to_string())
    }

    fn sync(&self, files: Vec<PathBuf>) -> Result<(), String> {
        let mut failed = None;
        for (i, path) in files.iter().enumerate() {
            let synced = File::open(path).and_then(|file| file.sync_data());
            match synced {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    failed = Some((i, format!("cannot sync {}: {e}", path.display())));
                    break;
                }
            }
        }
        let Some((i, problem)) = failed else {
            return Ok(());
        };
        lock(&self.files).extend(files.into_iter().skip(i));
        Err(problem)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
pub struct ContentCache {
    data: PathBuf,
    db_path: PathBuf,
    db: Arc<Database>,
    pending: Arc<Pending>,
    /// The durable commit running on its own thread, if any.
    flusher: Mutex<Option<std::thread::JoinHandle<()>>>,
    budget: u64,
    usage: AtomicU64,
    shards: Vec<Mutex<Shard>>,
    tick: AtomicU64,
    puts: AtomicU64,
    evicting: Mutex<()>,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl ContentCache {
    /// Opens the cache below `root`, reconciling files and metadata.
    /// `budget` is the disk space (bytes) it may use.
    pub fn open(root: &Path, budget: u64) -> Result<Self, CacheError> {
        let dir = root.join("cache");
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(io(&data))?;
        let db_path = dir.join("cache.redb");
        let db = Arc::new(Database::create(&db_path).map_err(db_error(&db_path))?);
        let cache = Self {
            data,
            db_path,
            db,
            pending: Arc::default(),
            flusher: Mutex::new(None),
            budget,
            usage: AtomicU64::new(0),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            tick: AtomicU64::new(0),
            puts: AtomicU64::new(0),
            evicting: Mutex::new(()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        };
        cache.reconcile()?;
        Ok(cache)
    }

    fn reconcile(&self) -> Result<(), CacheError> {
        let mut recorded: HashMap<CacheKey, u64> = HashMap::new();
        {
            let txn = self.db.begin_write().map_err(db_error(&self.db_path))?;
            {
                let table = txn.open_table(ENTRIES).map_err(db_error(&self.db_path))?;
                for item in table.iter().map_err(db_error(&self.db_path))? {
                    let (key, size) = item.map_err(db_error(&self.db_path))?;
                    recorded.insert(*key.value(), size.value());
                }
            }
            txn.commit().map_err(db_error(&self.db_path))?;
        }
        // Files without an entry are leftovers of a crash between rename and
        // a durable commit (put) or between commit and unlink (eviction), or
        // temporary files: delete them. Entries without a file can only come
        // from outside interference: drop them.
        let mut present = HashMap::new();
        for entry in std::fs::read_dir(&self.data)
            .map_err(io(&self.data))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = parse_key(&name);
            match key.filter(|k| recorded.contains_key(k)) {
                Some(key) => {
                    present.insert(key, recorded[&key]);
                }
                None => {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let missing: Vec<CacheKey> = recorded
            .keys()
            .filter(|k| !present.contains_key(*k))
            .copied()
            .collect();
        if !missing.is_empty() {
            let txn = self.db.begin_write().map_err(db_error(&self.db_path))?;
            {
                let mut table = txn.open_table(ENTRIES).map_err(db_error(&self.db_path))?;
                for key in &missing {
                    table.remove(key).map_err(db_error(&self.db_path))?;
                }
            }
            txn.commit().map_err(db_error(&self.db_path))?;
        }
        let mut total = 0;
        for (key, size) in present {
            let tick = self.next_tick();
            self.shard(&key).insert(&key, size, tick);
            total += size;
        }
        self.usage.store(total, Ordering::Relaxed);
        self.report_size();
        Ok(())
    }

    /// Publishes usage and budget as `pronto_cache_usage_bytes` and
    /// `pronto_cache_budget_bytes`.
    fn report_size(&self) {
        metrics().cache_size(self.usage.load(Ordering::Relaxed), self.budget);
    }

    fn shard(&self, key: &CacheKey) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[key[0] as usize % SHARDS]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn next_tick(&self) -> u64 {
        self.tick.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        self.data.join(hex::encode(key))
    }

    /// Marks `key` as just used; false (and a miss) when it is not cached.
    fn touch(&self, key: &CacheKey) -> bool {
        let tick = self.next_tick();
        let found = self.shard(key).touch(key, tick);
        if !found {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// The cached bytes of `key`, if present.
    pub fn get(&self, key: &CacheKey) -> Result<Option<Vec<u8>>, CacheError> {
        if !self.touch(key) {
            return Ok(None);
        }
        let path = self.path(key);
        match std::fs::read(&path) {
            Ok(bytes) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(bytes))
            }
            // Evicted between the lookup and the read.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// The open data file of `key`, opened now if it is not open yet;
    /// `None` when the key is not cached.
    fn open_file(&self, key: &CacheKey) -> Result<Option<Arc<File>>, CacheError> {
        let tick = self.next_tick();
        {
            let mut shard = self.shard(key);
            if !shard.touch(key, tick) {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            if let Some(file) = shard.open.get(key) {
                return Ok(Some(file.clone()));
            }
        }
        let path = self.path(key);
        let file = match File::open(&path) {
            Ok(file) => Arc::new(file),
            // Evicted between the lookup and the open.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let mut shard = self.shard(key);
        // Kept only while the entry is there (not evicted meanwhile).
        if shard.entries.contains_key(key) {
            if shard.open.len() >= OPEN_FILES_PER_SHARD {
                let some = *shard.open.keys().next().expect("the map is full");
                shard.open.remove(&some);
            }
            shard.open.insert(*key, file.clone());
        }
        Ok(Some(file))
    }

    /// Reads `len` bytes at `offset` of the data of `key` (fewer at its
    /// end), without loading the rest; `None` when not cached.
    pub fn read_at(
        &self,
        key: &CacheKey,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        use std::os::unix::fs::FileExt;
        let Some(file) = self.open_file(key)? else {
            return Ok(None);
        };
        let mut out = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            let n = file
                .read_at(&mut out[filled..], offset + filled as u64)
                .map_err(io(&self.path(key)))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        out.truncate(filled);
        self.hits.fetch_add(1, Ordering::Relaxed);
        Ok(Some(out))
    }

    /// True when `key` is cached.
    pub fn contains(&self, key: &CacheKey) -> bool {
        self.shard(key).entries.contains_key(key)
    }

    /// Stores verified `bytes` under `key`, then evicts unpinned data
    /// until usage is within budget.
    pub fn put(&self, key: &CacheKey, bytes: &[u8]) -> Result<(), CacheError> {
        self.put_with(key, |file| file.write_all(bytes))
    }

    /// Where the data of `key` is, if cached: for opening it directly (FUSE
    /// passthrough). Pin the key while the file is open.
    pub fn path_of(&self, key: &CacheKey) -> Option<PathBuf> {
        self.contains(key).then(|| self.path(key))
    }

    /// Stores data of `key` that is being written by `fill` into a file,
    /// without holding it in memory (large files made local for
    /// passthrough). `fill` writes the verified bytes.
    pub fn put_with(
        &self,
        key: &CacheKey,
        fill: impl FnOnce(&mut File) -> std::io::Result<()>,
    ) -> Result<(), CacheError> {
        if self.contains(key) {
            return Ok(());
        }
        static TEMP: AtomicU64 = AtomicU64::new(0);
        let n = TEMP.fetch_add(1, Ordering::Relaxed);
        let temp = self.data.join(format!(
            ".{}.{}.{n}.tmp",
            hex::encode(key),
            std::process::id()
        ));
        let size = {
            let mut file = File::create(&temp).map_err(io(&temp))?;
            // Synced later, before a durable commit covers its entry.
            let filled = fill(&mut file);
            if let Err(e) = filled {
                let _ = std::fs::remove_file(&temp);
                return Err(io(&temp)(e));
            }
            file.metadata().map_err(io(&temp))?.len()
        };
        self.commit(key, &temp, size)
    }

    /// A write transaction that is not durable by itself (see [`Pending`]).
    fn write_txn(&self) -> Result<redb::WriteTransaction, CacheError> {
        let mut txn = self.db.begin_write().map_err(db_error(&self.db_path))?;
        txn.set_durability(Durability::None)
            .map_err(db_error(&self.db_path))?;
        Ok(txn)
    }

    /// Renames a written temporary file into place and records it (not
    /// durably: see [`Pending`]).
    fn commit(&self, key: &CacheKey, temp: &Path, size: u64) -> Result<(), CacheError> {
        let path = self.path(key);
        std::fs::rename(temp, &path).map_err(io(&path))?;
        {
            let _gate = self.pending.gate.read().unwrap_or_else(|e| e.into_inner());
            let txn = self.write_txn()?;
            {
                let mut table = txn.open_table(ENTRIES).map_err(db_error(&self.db_path))?;
                table.insert(key, size).map_err(db_error(&self.db_path))?;
            }
            txn.commit().map_err(db_error(&self.db_path))?;
            lock(&self.pending.files).push(path);
        }
        if self.puts.fetch_add(1, Ordering::Relaxed) % DURABLE_EVERY == DURABLE_EVERY - 1 {
            self.make_durable_later();
        }
        let tick = self.next_tick();
        // Two readers may have put the same key at once; count it once.
        if self.shard(key).insert(key, size, tick) {
            self.usage.fetch_add(size, Ordering::Relaxed);
        }
        self.report_size();
        self.evict_to(self.budget)
    }

    /// Makes every entry committed so far durable (syncing their files
    /// first), on a thread of its own unless one is at it already.
    fn make_durable_later(&self) {
        if self.pending.flushing.swap(true, Ordering::SeqCst) {
            return;
        }
        let (db, pending) = (self.db.clone(), self.pending.clone());
        let mut flusher = lock(&self.flusher);
        if let Some(done) = flusher.take() {
            let _ = done.join();
        }
        let spawned = std::thread::Builder::new()
            .name("cache-durable".into())
            .spawn(move || {
                if let Err(problem) = pending.make_durable(&db) {
                    tracing::warn!("cannot make the cache's entries durable yet: {problem}");
                }
                pending.flushing.store(false, Ordering::SeqCst);
            });
        match spawned {
            Ok(handle) => *flusher = Some(handle),
            Err(e) => {
                self.pending.flushing.store(false, Ordering::SeqCst);
                tracing::warn!("cannot start the cache's durable commit: {e}");
            }
        }
    }

    /// Makes every entry committed so far durable, syncing their data
    /// files first.
    pub fn flush(&self) -> Result<(), CacheError> {
        if let Some(running) = lock(&self.flusher).take() {
            let _ = running.join();
        }
        self.pending
            .make_durable(&self.db)
            .map_err(|message| CacheError::Db {
                path: self.db_path.clone(),
                message,
            })
    }

    /// Marks `key` as in use (by an open file); pinned data is never
    /// evicted. Keys may be pinned before their data arrives.
    pub fn pin(&self, key: &CacheKey) {
        *self.shard(key).pins.entry(*key).or_insert(0) += 1;
    }

    /// Releases a pin; data that was kept over budget only because it was
    /// pinned is evicted now.
    pub fn unpin(&self, key: &CacheKey) {
        {
            let mut shard = self.shard(key);
            if let Some(count) = shard.pins.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    shard.pins.remove(key);
                }
            }
        }
        if let Err(err) = self.evict_to(self.budget) {
            tracing::warn!("eviction after closing a file failed: {err}");
        }
    }

    /// Evicts least recently used, unpinned entries until usage is at most
    /// `target` bytes (or nothing unpinned is left). Each round takes the
    /// oldest unpinned entries of every shard and evicts the oldest of
    /// those until enough is freed.
    pub fn evict_to(&self, target: u64) -> Result<(), CacheError> {
        if self.usage.load(Ordering::Relaxed) <= target {
            return Ok(());
        }
        // One eviction at a time, so two never pick the same victims.
        let _evicting = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let excess = self.usage.load(Ordering::Relaxed).saturating_sub(target);
            if excess == 0 {
                return Ok(());
            }
            let mut candidates: Vec<(u64, CacheKey, u64)> = Vec::new();
            for shard in &self.shards {
                let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
                candidates.extend(
                    shard
                        .recency
                        .iter()
                        .filter(|(_, key)| !shard.pins.contains_key(*key))
                        .take(VICTIMS_PER_SHARD)
                        .map(|(tick, key)| (*tick, *key, shard.entries[key].0)),
                );
            }
            if candidates.is_empty() {
                return Ok(());
            }
            candidates.sort_unstable_by_key(|c| c.0);
            let mut left = excess;
            let victims: Vec<(CacheKey, u64)> = candidates
                .into_iter()
                .take_while(|(_, _, size)| {
                    let take = left > 0;
                    left = left.saturating_sub(*size);
                    take
                })
                .map(|(_, key, size)| (key, size))
                .collect();
            let (entries, bytes) = self.delete(victims)?;
            self.evictions.fetch_add(entries, Ordering::Relaxed);
            metrics().cache_evicted(entries, bytes);
            if entries == 0 {
                // Everything offered was pinned or gone meanwhile.
                return Ok(());
            }
        }
    }

    /// Drops `keys` from the cache (those not pinned by an open file), e.g.
    /// when the image they belong to is removed. Returns the bytes freed.
    pub fn remove(&self, keys: &[CacheKey]) -> Result<u64, CacheError> {
        let _evicting = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        let victims: Vec<(CacheKey, u64)> = keys
            .iter()
            .filter_map(|key| {
                let shard = self.shard(key);
                if shard.pins.contains_key(key) {
                    return None;
                }
                shard.entries.get(key).map(|(size, _)| (*key, *size))
            })
            .collect();
        let (_, freed) = self.delete(victims)?;
        Ok(freed)
    }

    /// Deletes entries from the database, then their files, and returns
    /// how many entries and bytes went. The caller holds the eviction lock.
    fn delete(&self, victims: Vec<(CacheKey, u64)>) -> Result<(u64, u64), CacheError> {
        if victims.is_empty() {
            return Ok((0, 0));
        }
        // Not durable: an entry that comes back after a crash finds its
        // file gone and is dropped at open.
        let txn = self.write_txn()?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(db_error(&self.db_path))?;
            for (key, _) in &victims {
                table.remove(key).map_err(db_error(&self.db_path))?;
            }
        }
        txn.commit().map_err(db_error(&self.db_path))?;
        let (mut entries, mut bytes) = (0, 0);
        for (key, size) in victims {
            // Pinned meanwhile: the entry is gone from the database, so
            // keep nothing half-way; the data will be fetched again if
            // needed.
            let removed = self.shard(&key).remove(&key);
            if removed.is_some() {
                let _ = std::fs::remove_file(self.path(&key));
                self.usage.fetch_sub(size, Ordering::Relaxed);
                entries += 1;
                bytes += size;
            }
        }
        self.report_size();
        Ok((entries, bytes))
    }

    pub fn stats(&self) -> CacheStats {
        let (mut entries, mut pinned) = (0, 0);
        for shard in &self.shards {
            let shard = shard.lock().unwrap_or_else(|e| e.into_inner());
            entries += shard.entries.len() as u64;
            pinned += shard.pins.len() as u64;
        }
        CacheStats {
            entries,
            bytes: self.usage.load(Ordering::Relaxed),
            budget: self.budget,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            pinned,
        }
    }
}

impl Drop for ContentCache {
    fn drop(&mut self) {
        if let Err(err) = self.flush() {
            tracing::warn!("cannot make the cache's last entries durable: {err}");
        }
    }
}

/// Entries and bytes of the cache below `root`, counted from its data
/// directory without opening the database: works while another process
/// (a running mount or daemon) holds the cache open.
pub fn scan_usage(root: &Path) -> Result<(u64, u64), CacheError> {
    let data = root.join("cache").join("data");
    let mut entries = 0;
    let mut bytes = 0;
    let listing = match std::fs::read_dir(&data) {
        Ok(listing) => listing,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((0, 0)),
        Err(e) => return Err(io(&data)(e)),
    };
    for entry in listing.flatten() {
        let name = entry.file_name();
        if parse_key(&name.to_string_lossy()).is_none() {
            continue;
        }
        if let Ok(meta) = entry.metadata() {
            entries += 1;
            bytes += meta.len();
        }
    }
    Ok((entries, bytes))
}

fn parse_key(name: &str) -> Option<CacheKey> {
    let bytes = hex::decode(name).ok()?;
    bytes.try_into().ok()
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CacheError + '_ {
    move |source| {
        let full = source.kind() == std::io::ErrorKind::StorageFull
            || source.kind() == std::io::ErrorKind::QuotaExceeded;
        if full {
            CacheError::DiskFull {
                path: path.to_path_buf(),
            }
        } else {
            CacheError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn db_error<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> CacheError + '_ {
    move |e| CacheError::Db {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_called_a_full_disk() {
        const ENOSPC: i32 = 28;
        let err = io(Path::new("/var/lib/pronto/cache/data/x"))(std::io::Error::from_raw_os_error(
            ENOSPC,
        ));
        let text = err.to_string();
        assert!(
            text.contains("disk holding the node cache is full"),
            "{text}"
        );
        assert!(text.contains("cache.budget"), "{text}");
        let other = io(Path::new("x"))(std::io::Error::other("boom")).to_string();
        assert!(other.starts_with("cache I/O failed"), "{other}");
    }

    fn key(n: u8) -> CacheKey {
        [n; 32]
    }

    #[test]
    fn put_get_and_survive_reopen() {
        let root = tempfile::tempdir().unwrap();
        {
            let cache = ContentCache::open(root.path(), 1 << 20).unwrap();
            cache.put(&key(1), b"hello").unwrap();
            assert_eq!(cache.get(&key(1)).unwrap().as_deref(), Some(&b"hello"[..]));
            assert_eq!(cache.get(&key(2)).unwrap(), None);
            assert_eq!(
                cache.read_at(&key(1), 1, 3).unwrap().as_deref(),
                Some(&b"ell"[..])
            );
            assert_eq!(
                cache.read_at(&key(1), 3, 10).unwrap().as_deref(),
                Some(&b"lo"[..])
            );
            let stats = cache.stats();
            assert_eq!(
                (stats.entries, stats.bytes, stats.hits, stats.misses),
                (1, 5, 3, 1)
            );
        }
        let cache = ContentCache::open(root.path(), 1 << 20).unwrap();
        assert_eq!(cache.get(&key(1)).unwrap().as_deref(), Some(&b"hello"[..]));
        assert_eq!(cache.stats().bytes, 5);
    }

    #[test]
    fn eviction_keeps_within_budget_and_spares_pinned_data() {
        let root = tempfile::tempdir().unwrap();
        let cache = ContentCache::open(root.path(), 250).unwrap();
        cache.pin(&key(1));
        for n in 1..=5 {
            cache.put(&key(n), &[n; 100]).unwrap();
            assert!(cache.stats().bytes <= 250 || n == 1);
        }
        let stats = cache.stats();
        assert!(stats.bytes <= 250, "{stats:?}");
        assert!(stats.evictions >= 3);
        assert!(cache.contains(&key(1)), "pinned data stays");
        assert!(cache.contains(&key(5)), "the newest stays");
        cache.unpin(&key(1));
        assert!(
            cache.stats().bytes <= 250,
            "unpinning evicts what was over budget"
        );
        cache.evict_to(0).unwrap();
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn eviction_takes_the_least_recently_used_across_shards() {
        let root = tempfile::tempdir().unwrap();
        let cache = ContentCache::open(root.path(), 1000).unwrap();
        // Keys in different shards (first byte), written in order.
        for n in 1..=10 {
            cache.put(&key(n), &[n; 100]).unwrap();
        }
        // Key 1 is read again: it is now the most recently used.
        assert!(cache.read_at(&key(1), 0, 1).unwrap().is_some());
        cache.put(&key(11), &[11; 100]).unwrap();
        cache.put(&key(12), &[12; 100]).unwrap();
        assert!(cache.contains(&key(1)), "recently read data stays");
        assert!(!cache.contains(&key(2)) && !cache.contains(&key(3)));
        assert!(cache.contains(&key(4)));
        assert_eq!(cache.stats().bytes, 1000);
        // Many rounds: everything unpinned goes.
        for n in 13..=200 {
            cache.put(&key(n), &[n; 10]).unwrap();
        }
        cache.pin(&key(200));
        cache.evict_to(0).unwrap();
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes), (1, 10), "{stats:?}");
        assert!(cache.contains(&key(200)));
    }

    #[test]
    fn reads_reuse_an_open_file() {
        let root = tempfile::tempdir().unwrap();
        let cache = ContentCache::open(root.path(), 1 << 20).unwrap();
        cache.put(&key(1), b"kept open").unwrap();
        assert_eq!(cache.read_at(&key(1), 0, 4).unwrap().unwrap(), b"kept");
        // The data file is opened once: later reads go through the same
        // descriptor, even if the name is gone.
        std::fs::remove_file(root.path().join("cache/data").join(hex::encode(key(1)))).unwrap();
        assert_eq!(cache.read_at(&key(1), 5, 4).unwrap().unwrap(), b"open");
        // Removing the entry closes it.
        cache.remove(&[key(1)]).unwrap();
        assert_eq!(cache.read_at(&key(1), 0, 4).unwrap(), None);
    }

    #[test]
    fn entries_survive_a_clean_close_between_durable_commits() {
        let root = tempfile::tempdir().unwrap();
        {
            let cache = ContentCache::open(root.path(), 1 << 20).unwrap();
            // Fewer puts than one durable batch.
            for n in 1..=3 {
                cache.put(&key(n), &[n; 8]).unwrap();
            }
        }
        let cache = ContentCache::open(root.path(), 1 << 20).unwrap();
        assert_eq!(cache.stats().entries, 3);
    }

    #[test]
    fn a_batch_of_puts_is_made_durable_off_the_putters_path() {
        let root = tempfile::tempdir().unwrap();
        let cache = ContentCache::open(root.path(), 1 << 30).unwrap();
        for n in 0..DURABLE_EVERY as u8 {
            cache.put(&key(n), &[n; 64]).unwrap();
        }
        // The last put of the batch started a durable commit and went on.
        let running = lock(&cache.flusher)
            .take()
            .expect("a durable commit started");
        running.join().unwrap();
        assert!(
            lock(&cache.pending.files).is_empty(),
            "every file of the batch was synced before its durable commit"
        );
        cache.put(&key(200), b"next").unwrap();
        assert_eq!(lock(&cache.pending.files).len(), 1);
    }

    #[test]
    fn an_entry_evicted_before_its_durable_commit_does_not_hold_it_up() {
        let root = tempfile::tempdir().unwrap();
        {
            let cache = ContentCache::open(root.path(), 1 << 20).unwrap();
            cache.put(&key(1), b"gone").unwrap();
            cache.put(&key(2), b"kept").unwrap();
            cache.remove(&[key(1)]).unwrap();
            cache.flush().unwrap();
            assert!(lock(&cache.pending.files).is_empty());
        }
        let cache = ContentCache::open(root.path(), 1 << 20).unwrap();
        assert_eq!(cache.stats().entries, 1);
        assert_eq!(cache.get(&key(2)).unwrap().as_deref(), Some(&b"kept"[..]));
    }

    #[test]
    fn crash_leftovers_are_reconciled() {
        let root = tempfile::tempdir().unwrap();
        {
            let cache = ContentCache::open(root.path(), 1 << 20).unwrap();
            cache.put(&key(1), b"kept").unwrap();
        }
        // A file that was renamed but never committed, and a temp file.
        let data = root.path().join("cache/data");
        std::fs::write(data.join(hex::encode(key(9))), b"orphan").unwrap();
        std::fs::write(data.join(".x.tmp"), b"partial").unwrap();
        // An entry whose file vanished.
        std::fs::remove_file(data.join(hex::encode(key(1)))).unwrap();
        let cache = ContentCache::open(root.path(), 1 << 20).unwrap();
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(std::fs::read_dir(&data).unwrap().count(), 0);
    }
}
