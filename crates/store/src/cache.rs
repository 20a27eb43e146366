//! [`ContentCache`]: files named by key under `<root>/cache/data`, their
//! sizes in a redb database, recency and pins in memory.
//!
//! Crash safety: data is written to a temporary file, synced and renamed
//! before its entry is committed; entries are removed before their files.
//! At open, files without an entry and entries without a file are dropped,
//! so the database and the directory always agree after a restart. Recency
//! is not persisted: after a restart every entry counts as used at start-up.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use pronto_metrics::metrics;
use redb::{Database, ReadableTable, TableDefinition};

/// A content key: 32 bytes, typically a SHA-256.
pub type CacheKey = [u8; 32];

const ENTRIES: TableDefinition<&[u8; 32], u64> = TableDefinition::new("entries");

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

#[derive(Debug)]
struct State {
    /// key → (size, last use tick)
    entries: HashMap<CacheKey, (u64, u64)>,
    /// key → number of pins (open files using it)
    pins: HashMap<CacheKey, u64>,
    tick: u64,
}

#[derive(Debug)]
pub struct ContentCache {
    data: PathBuf,
    db_path: PathBuf,
    db: Database,
    budget: u64,
    usage: AtomicU64,
    state: Mutex<State>,
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
        let db = Database::create(&db_path).map_err(db_error(&db_path))?;
        let cache = Self {
            data,
            db_path,
            db,
            budget,
            usage: AtomicU64::new(0),
            state: Mutex::new(State {
                entries: HashMap::new(),
                pins: HashMap::new(),
                tick: 0,
            }),
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
        // commit (put) or between commit and unlink (eviction), or temporary
        // files: delete them. Entries without a file can only come from
        // outside interference: drop them.
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
        let mut state = self.lock();
        let total: u64 = present.values().sum();
        state.entries = present
            .into_iter()
            .map(|(k, size)| (k, (size, 0)))
            .collect();
        self.usage.store(total, Ordering::Relaxed);
        drop(state);
        self.report_size();
        Ok(())
    }

    /// Publishes usage and budget as `pronto_cache_usage_bytes` and
    /// `pronto_cache_budget_bytes`.
    fn report_size(&self) {
        metrics().cache_size(self.usage.load(Ordering::Relaxed), self.budget);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, key: &CacheKey) -> PathBuf {
        self.data.join(hex::encode(key))
    }

    /// Marks `key` as just used; false (and a miss) when it is not cached.
    fn touch(&self, key: &CacheKey) -> bool {
        let mut state = self.lock();
        state.tick += 1;
        let tick = state.tick;
        match state.entries.get_mut(key) {
            Some(entry) => {
                entry.1 = tick;
                true
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
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

    /// Reads `len` bytes at `offset` of the data of `key` (fewer at its
    /// end), without loading the rest; `None` when not cached.
    pub fn read_at(
        &self,
        key: &CacheKey,
        offset: u64,
        len: usize,
    ) -> Result<Option<Vec<u8>>, CacheError> {
        use std::os::unix::fs::FileExt;
        if !self.touch(key) {
            return Ok(None);
        }
        let path = self.path(key);
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(io(&path)(e)),
        };
        let mut out = vec![0u8; len];
        let mut filled = 0;
        while filled < len {
            let n = file
                .read_at(&mut out[filled..], offset + filled as u64)
                .map_err(io(&path))?;
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
        self.lock().entries.contains_key(key)
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
        fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
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
            let mut file = std::fs::File::create(&temp).map_err(io(&temp))?;
            let filled = fill(&mut file).and_then(|()| file.sync_all());
            if let Err(e) = filled {
                let _ = std::fs::remove_file(&temp);
                return Err(io(&temp)(e));
            }
            file.metadata().map_err(io(&temp))?.len()
        };
        self.commit(key, &temp, size)
    }

    /// Renames a synced temporary file into place and records it.
    fn commit(&self, key: &CacheKey, temp: &Path, size: u64) -> Result<(), CacheError> {
        let path = self.path(key);
        std::fs::rename(temp, &path).map_err(io(&path))?;
        let txn = self.db.begin_write().map_err(db_error(&self.db_path))?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(db_error(&self.db_path))?;
            table.insert(key, size).map_err(db_error(&self.db_path))?;
        }
        txn.commit().map_err(db_error(&self.db_path))?;
        {
            let mut state = self.lock();
            state.tick += 1;
            let tick = state.tick;
            // Two readers may have put the same key at once; count it once.
            if state.entries.insert(*key, (size, tick)).is_none() {
                self.usage.fetch_add(size, Ordering::Relaxed);
            }
        }
        self.report_size();
        self.evict_to(self.budget)
    }

    /// Marks `key` as in use (by an open file); pinned data is never
    /// evicted. Keys may be pinned before their data arrives.
    pub fn pin(&self, key: &CacheKey) {
        *self.lock().pins.entry(*key).or_insert(0) += 1;
    }

    /// Releases a pin; data that was kept over budget only because it was
    /// pinned is evicted now.
    pub fn unpin(&self, key: &CacheKey) {
        {
            let mut state = self.lock();
            if let Some(count) = state.pins.get_mut(key) {
                *count -= 1;
                if *count == 0 {
                    state.pins.remove(key);
                }
            }
        }
        if let Err(err) = self.evict_to(self.budget) {
            tracing::warn!("eviction after closing a file failed: {err}");
        }
    }

    /// Evicts least recently used, unpinned entries until usage is at most
    /// `target` bytes (or nothing unpinned is left).
    pub fn evict_to(&self, target: u64) -> Result<(), CacheError> {
        if self.usage.load(Ordering::Relaxed) <= target {
            return Ok(());
        }
        // One eviction at a time, so two never pick the same victims.
        let _evicting = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        let victims: Vec<(CacheKey, u64)> = {
            let state = self.lock();
            let mut candidates: Vec<(CacheKey, u64, u64)> = state
                .entries
                .iter()
                .filter(|(k, _)| !state.pins.contains_key(*k))
                .map(|(k, (size, tick))| (*k, *size, *tick))
                .collect();
            candidates.sort_by_key(|c| c.2);
            let mut excess = self.usage.load(Ordering::Relaxed).saturating_sub(target);
            candidates
                .into_iter()
                .take_while(|(_, size, _)| {
                    let take = excess > 0;
                    excess = excess.saturating_sub(*size);
                    take
                })
                .map(|(k, size, _)| (k, size))
                .collect()
        };
        let (entries, bytes) = self.delete(victims)?;
        self.evictions.fetch_add(entries, Ordering::Relaxed);
        metrics().cache_evicted(entries, bytes);
        Ok(())
    }

    /// Drops `keys` from the cache (those not pinned by an open file), e.g.
    /// when the image they belong to is removed. Returns the bytes freed.
    pub fn remove(&self, keys: &[CacheKey]) -> Result<u64, CacheError> {
        let _evicting = self.evicting.lock().unwrap_or_else(|e| e.into_inner());
        let victims: Vec<(CacheKey, u64)> = {
            let state = self.lock();
            keys.iter()
                .filter(|k| !state.pins.contains_key(*k))
                .filter_map(|k| state.entries.get(k).map(|(size, _)| (*k, *size)))
                .collect()
        };
        let (_, freed) = self.delete(victims)?;
        Ok(freed)
    }

    /// Deletes entries from the database, then their files, and returns
    /// how many entries and bytes went. The caller holds the eviction lock.
    fn delete(&self, victims: Vec<(CacheKey, u64)>) -> Result<(u64, u64), CacheError> {
        if victims.is_empty() {
            return Ok((0, 0));
        }
        let txn = self.db.begin_write().map_err(db_error(&self.db_path))?;
        {
            let mut table = txn.open_table(ENTRIES).map_err(db_error(&self.db_path))?;
            for (key, _) in &victims {
                table.remove(key).map_err(db_error(&self.db_path))?;
            }
        }
        txn.commit().map_err(db_error(&self.db_path))?;
        let (mut entries, mut bytes) = (0, 0);
        {
            let mut state = self.lock();
            for (key, size) in victims {
                // Pinned meanwhile: the entry is gone from the database, so
                // keep nothing half-way; the data will be fetched again if
                // needed.
                if state.entries.remove(&key).is_some() {
                    let _ = std::fs::remove_file(self.path(&key));
                    self.usage.fetch_sub(size, Ordering::Relaxed);
                    entries += 1;
                    bytes += size;
                }
            }
        }
        self.report_size();
        Ok((entries, bytes))
    }

    pub fn stats(&self) -> CacheStats {
        let state = self.lock();
        CacheStats {
            entries: state.entries.len() as u64,
            bytes: self.usage.load(Ordering::Relaxed),
            budget: self.budget,
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
            pinned: state.pins.len() as u64,
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
