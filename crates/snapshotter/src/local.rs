//! Snapshots with the semantics of containerd's overlayfs snapshotter:
//! metadata in a redb database (crash-safe), one directory per snapshot
//! (`snapshots/<id>/fs` and, for active snapshots, `work`), overlay mounts
//! over the committed parents.
//!
//! A committed snapshot may be *remote*: its `fs` directory is a lazy FUSE
//! mount of one image layer. This module only records that; `remote.rs`
//! mounts it.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::SnapshotError;
use crate::filter::Filters;

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// (parent name, child key): who depends on a committed snapshot.
const CHILDREN: TableDefinition<(&str, &str), ()> = TableDefinition::new("children");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    View = 1,
    Active = 2,
    Committed = 3,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Where a remote snapshot's data comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    pub image_ref: String,
    pub manifest_digest: String,
    pub layer_digest: String,
}

/// What the database keeps for each snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    pub created: (i64, u32),
    pub updated: (i64, u32),
    pub size: i64,
    pub inodes: i64,
    pub remote: Option<RemoteLayer>,
}

/// A snapshot as containerd sees it.
#[derive(Debug, Clone)]
pub struct Info {
    pub name: String,
    pub record: Record,
}

/// One mount containerd performs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

fn now() -> (i64, u32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos())
}

fn db_error(e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Internal(format!("snapshot database: {e}"))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> SnapshotError {
    SnapshotError::Internal(format!("{what} {}: {e}", path.display()))
}

fn decode(bytes: &[u8]) -> Result<Record, SnapshotError> {
    postcard::from_bytes(bytes).map_err(db_error)
}

fn encode(record: &Record) -> Result<Vec<u8>, SnapshotError> {
    postcard::to_stdvec(record).map_err(db_error)
}

pub struct LocalSnapshots {
    root: PathBuf,
    db: Database,
    /// Ids reserved for snapshots being made (a lazy mount, an unpack) and
    /// not yet recorded: `Cleanup` leaves their directories alone.
    pending: std::sync::Mutex<HashSet<u64>>,
}

impl std::fmt::Debug for LocalSnapshots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSnapshots")
            .field("root", &self.root)
            .finish()
    }
}

impl LocalSnapshots {
    /// Opens (or creates) the snapshot store under `root`.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        let snapshots = root.join("snapshots");
        std::fs::create_dir_all(&snapshots)
            .map_err(|e| io_error("cannot create", &snapshots, e))?;
        let db = Database::create(root.join("metadata.redb")).map_err(|e| {
            SnapshotError::Internal(format!(
                "cannot open {}: {e} (is another pronto serve using this root?)",
                root.join("metadata.redb").display()
            ))
        })?;
        let txn = db.begin_write().map_err(db_error)?;
        txn.open_table(SNAPSHOTS).map_err(db_error)?;
        txn.open_table(CHILDREN).map_err(db_error)?;
        txn.open_table(COUNTERS).map_err(db_error)?;
        txn.commit().map_err(db_error)?;
        Ok(Self {
            root: root.to_owned(),
            db,
            pending: std::sync::Mutex::new(HashSet::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `snapshots/<id>/fs`: the snapshot's files (the upper directory).
    pub fn fs_path(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string()).join("fs")
    }

    fn work_path(&self, id: u64) -> PathBuf {
        self.root
            .join("snapshots")
            .join(id.to_string())
            .join("work")
    }

    pub fn get(&self, key: &str) -> Result<Option<Record>, SnapshotError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_error)?;
        match table.get(key).map_err(db_error)? {
            Some(v) => Ok(Some(decode(v.value())?)),
            None => Ok(None),
        }
    }

    pub fn stat(&self, key: &str) -> Result<Info, SnapshotError> {
        match self.get(key)? {
            Some(record) => Ok(Info {
                name: key.to_owned(),
                record,
            }),
            None => Err(SnapshotError::NotFound(format!(
                "snapshot {key} does not exist"
            ))),
        }
    }

    /// Every snapshot, in name order.
    pub fn all(&self) -> Result<Vec<Info>, SnapshotError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_error)?;
        let mut out = Vec::new();
        for item in table.iter().map_err(db_error)? {
            let (k, v) = item.map_err(db_error)?;
            out.push(Info {
                name: k.value().to_owned(),
                record: decode(v.value())?,
            });
        }
        Ok(out)
    }

    pub fn walk(&self, filters: &Filters) -> Result<Vec<Info>, SnapshotError> {
        Ok(self
            .all()?
            .into_iter()
            .filter(|info| {
                filters.matches(|path| match path.first().map(String::as_str) {
                    Some("kind") => Some(info.record.kind.name().to_owned()),
                    Some("name") => Some(info.name.clone()),
                    Some("parent") => Some(info.record.parent.clone()),
                    Some("labels") if !info.record.labels.is_empty() => {
                        info.record.labels.get(&path[1..].join(".")).cloned()
                    }
                    _ => None,
                })
            })
            .collect())
    }

    /// A new snapshot's parent must exist and be committed (no parent is
    /// fine).
    fn check_parent(
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        parent: &str,
    ) -> Result<(), SnapshotError> {
        if parent.is_empty() {
            return Ok(());
        }
        let Some(p) = table.get(parent).map_err(db_error)? else {
            return Err(SnapshotError::NotFound(format!("missing parent {parent}")));
        };
        if decode(p.value())?.kind != Kind::Committed {
            return Err(SnapshotError::InvalidArgument(format!(
                "parent {parent} is not a committed snapshot"
            )));
        }
        Ok(())
    }

    /// Ids of `parent` and its ancestors, nearest first.
    fn parent_ids(
        table: &impl ReadableTable<&'static str, &'static [u8]>,
        parent: &str,
    ) -> Result<Vec<u64>, SnapshotError> {
        let mut ids = Vec::new();
        let mut next = parent.to_owned();
        while !next.is_empty() {
            let Some(v) = table.get(next.as_str()).map_err(db_error)? else {
                return Err(SnapshotError::NotFound(format!("missing parent {next}")));
            };
            let record = decode(v.value())?;
            ids.push(record.id);
            next = record.parent;
        }
        Ok(ids)
    }

    fn next_id(txn: &WriteTransaction) -> Result<u64, SnapshotError> {
        let mut counters = txn.open_table(COUNTERS).map_err(db_error)?;
        let id = counters
            .get("id")
            .map_err(db_error)?
            .map_or(0, |v| v.value())
            + 1;
        counters.insert("id", id).map_err(db_error)?;
        Ok(id)
    }

    /// Reserves an id and its directory for a snapshot made outside the
    /// normal path (a lazy layer, a layer unpacked by Pronto). Until it is
    /// recorded or given up (`abandon`), `Cleanup` leaves it alone; after
    /// a crash, `Cleanup` removes it.
    pub fn reserve(&self) -> Result<(u64, PathBuf), SnapshotError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        let id = Self::next_id(&txn)?;
        txn.commit().map_err(db_error)?;
        self.lock_pending().insert(id);
        let fs = self.fs_path(id);
        std::fs::create_dir_all(&fs).map_err(|e| io_error("cannot create", &fs, e))?;
        Ok((id, fs))
    }

    /// Gives up a reserved id and removes its directory.
    pub fn abandon(&self, id: u64) {
        self.remove_dir(id);
        self.lock_pending().remove(&id);
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Prepare (active) or View: a new snapshot `key` over `parent`.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let snapshots = self.root.join("snapshots");
        let temp = tempdir_in(&snapshots)?;
        let result = self.create_in(kind, key, parent, labels, &temp);
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&temp);
        }
        result
    }

    fn create_in(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        temp: &Path,
    ) -> Result<Vec<Mount>, SnapshotError> {
        use std::os::unix::fs::DirBuilderExt;
        let mut builder = std::fs::DirBuilder::new();
        builder
            .mode(0o755)
            .create(temp.join("fs"))
            .map_err(|e| io_error("cannot create", temp, e))?;
        if kind == Kind::Active {
            builder
                .mode(0o711)
                .create(temp.join("work"))
                .map_err(|e| io_error("cannot create", temp, e))?;
        }
        let txn = self.db.begin_write().map_err(db_error)?;
        let (record, parent_ids) = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_error)?;
            Self::check_parent(&table, parent)?;
            if table.get(key).map_err(db_error)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {key}")));
            }
            let parent_ids = Self::parent_ids(&table, parent)?;
            let id = Self::next_id(&txn)?;
            let t = now();
            let record = Record {
                id,
                kind,
                parent: parent.to_owned(),
                labels,
                created: t,
                updated: t,
                size: 0,
                inodes: 0,
                remote: None,
            };
            table
                .insert(key, encode(&record)?.as_slice())
                .map_err(db_error)?;
            if !parent.is_empty() {
                let mut children = txn.open_table(CHILDREN).map_err(db_error)?;
                children.insert((parent, key), ()).map_err(db_error)?;
            }
            (record, parent_ids)
        };
        if let Some(nearest) = parent_ids.first() {
            // The new upper directory is owned like its parent's root.
            let parent_fs = self.fs_path(*nearest);
            let meta = std::fs::metadata(&parent_fs)
                .map_err(|e| io_error("cannot stat", &parent_fs, e))?;
            std::os::unix::fs::lchown(temp.join("fs"), Some(meta.uid()), Some(meta.gid()))
                .map_err(|e| io_error("cannot chown", temp, e))?;
        }
        let path = self.root.join("snapshots").join(record.id.to_string());
        std::fs::rename(temp, &path).map_err(|e| io_error("cannot rename", temp, e))?;
        if let Err(e) = txn.commit() {
            let _ = std::fs::remove_dir_all(&path);
            return Err(db_error(e));
        }
        Ok(self.mounts_of(&record, &parent_ids))
    }

    /// Records a committed snapshot whose files are already at
    /// `fs_path(id)` of a reserved id (a lazy layer, or one unpacked by
    /// Pronto), with its usage.
    pub fn insert_committed(
        &self,
        name: &str,
        id: u64,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: Option<RemoteLayer>,
        (size, inodes): (i64, i64),
    ) -> Result<(), SnapshotError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_error)?;
            if table.get(name).map_err(db_error)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!("snapshot {name}")));
            }
            Self::check_parent(&table, parent)?;
            let t = now();
            let record = Record {
                id,
                kind: Kind::Committed,
                parent: parent.to_owned(),
                labels,
                created: t,
                updated: t,
                size,
                inodes,
                remote,
            };
            table
                .insert(name, encode(&record)?.as_slice())
                .map_err(db_error)?;
            if !parent.is_empty() {
                let mut children = txn.open_table(CHILDREN).map_err(db_error)?;
                children.insert((parent, name), ()).map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)?;
        self.lock_pending().remove(&id);
        Ok(())
    }

    /// The mounts of an active or view snapshot.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_error)?;
        let Some(v) = table.get(key).map_err(db_error)? else {
            return Err(SnapshotError::NotFound(format!(
                "snapshot {key} does not exist"
            )));
        };
        let record = decode(v.value())?;
        if record.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition(format!(
                "snapshot {key} is not active or view"
            )));
        }
        let parent_ids = Self::parent_ids(&table, &record.parent)?;
        Ok(self.mounts_of(&record, &parent_ids))
    }

    /// Ids of the committed snapshots a snapshot stacks on, nearest first.
    pub fn lower_ids(&self, key: &str) -> Result<Vec<u64>, SnapshotError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let table = txn.open_table(SNAPSHOTS).map_err(db_error)?;
        Self::parent_ids(&table, key)
    }

    fn mounts_of(&self, record: &Record, parent_ids: &[u64]) -> Vec<Mount> {
        let path = |id: u64| self.fs_path(id).display().to_string();
        if parent_ids.is_empty() {
            let flag = if record.kind == Kind::View {
                "ro"
            } else {
                "rw"
            };
            return vec![Mount {
                kind: "bind".into(),
                source: path(record.id),
                options: vec![flag.into(), "rbind".into()],
            }];
        }
        let mut options = Vec::new();
        if record.kind == Kind::Active {
            options.push(format!("workdir={}", self.work_path(record.id).display()));
            options.push(format!("upperdir={}", path(record.id)));
        } else if parent_ids.len() == 1 {
            return vec![Mount {
                kind: "bind".into(),
                source: path(parent_ids[0]),
                options: vec!["ro".into(), "rbind".into()],
            }];
        }
        let lower: Vec<String> = parent_ids.iter().map(|id| path(*id)).collect();
        options.push(format!("lowerdir={}", lower.join(":")));
        vec![Mount {
            kind: "overlay".into(),
            source: "overlay".into(),
            options,
        }]
    }

    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<(), SnapshotError> {
        let Some(active) = self.get(key)? else {
            return Err(SnapshotError::NotFound(format!(
                "active snapshot {key} does not exist"
            )));
        };
        let (size, inodes) = disk_usage(&self.fs_path(active.id))?;
        let txn = self.db.begin_write().map_err(db_error)?;
        {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_error)?;
            if table.get(name).map_err(db_error)?.is_some() {
                return Err(SnapshotError::AlreadyExists(format!(
                    "committed snapshot {name}"
                )));
            }
            let Some(v) = table.get(key).map_err(db_error)? else {
                return Err(SnapshotError::NotFound(format!(
                    "active snapshot {key} does not exist"
                )));
            };
            let mut record = decode(v.value())?;
            drop(v);
            if record.kind != Kind::Active {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "snapshot {key} is not active"
                )));
            }
            record.kind = Kind::Committed;
            record.created = now();
            record.updated = record.created;
            record.labels = labels;
            record.size = size;
            record.inodes = inodes;
            table.remove(key).map_err(db_error)?;
            table
                .insert(name, encode(&record)?.as_slice())
                .map_err(db_error)?;
            if !record.parent.is_empty() {
                let mut children = txn.open_table(CHILDREN).map_err(db_error)?;
                children
                    .remove((record.parent.as_str(), key))
                    .map_err(db_error)?;
                children
                    .insert((record.parent.as_str(), name), ())
                    .map_err(db_error)?;
            }
        }
        txn.commit().map_err(db_error)
    }

    /// Removes `key` from the database and returns its record; the caller
    /// removes the directory (after unmounting it if remote).
    pub fn remove(&self, key: &str) -> Result<Record, SnapshotError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        let record = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_error)?;
            let Some(v) = table.get(key).map_err(db_error)? else {
                return Err(SnapshotError::NotFound(format!(
                    "snapshot {key} does not exist"
                )));
            };
            let record = decode(v.value())?;
            drop(v);
            let mut children = txn.open_table(CHILDREN).map_err(db_error)?;
            let has_child = children
                .range((key, "")..)
                .map_err(db_error)?
                .next()
                .transpose()
                .map_err(db_error)?
                .is_some_and(|(k, _)| k.value().0 == key);
            if has_child {
                return Err(SnapshotError::FailedPrecondition(format!(
                    "cannot remove snapshot {key} with child"
                )));
            }
            if !record.parent.is_empty() {
                children
                    .remove((record.parent.as_str(), key))
                    .map_err(db_error)?;
            }
            table.remove(key).map_err(db_error)?;
            record
        };
        txn.commit().map_err(db_error)?;
        Ok(record)
    }

    /// Removes a snapshot's directory.
    pub fn remove_dir(&self, id: u64) {
        let dir = self.root.join("snapshots").join(id.to_string());
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    }

    pub fn update(
        &self,
        name: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info, SnapshotError> {
        let txn = self.db.begin_write().map_err(db_error)?;
        let record = {
            let mut table = txn.open_table(SNAPSHOTS).map_err(db_error)?;
            let Some(v) = table.get(name).map_err(db_error)? else {
                return Err(SnapshotError::NotFound(format!(
                    "snapshot {name} does not exist"
                )));
            };
            let mut record = decode(v.value())?;
            drop(v);
            if paths.is_empty() {
                record.labels = labels;
            } else {
                for path in paths {
                    if let Some(label) = path.strip_prefix("labels.") {
                        // As in containerd, an absent or empty value removes it.
                        match labels.get(label).filter(|v| !v.is_empty()) {
                            Some(v) => record.labels.insert(label.to_owned(), v.clone()),
                            None => record.labels.remove(label),
                        };
                    } else if path == "labels" {
                        record.labels = labels.clone();
                    } else {
                        return Err(SnapshotError::InvalidArgument(format!(
                            "cannot update {path:?} field on snapshot {name:?}"
                        )));
                    }
                }
            }
            record.updated = now();
            table
                .insert(name, encode(&record)?.as_slice())
                .map_err(db_error)?;
            record
        };
        txn.commit().map_err(db_error)?;
        Ok(Info {
            name: name.to_owned(),
            record,
        })
    }

    /// Disk usage: measured for active snapshots, recorded at commit for
    /// committed ones.
    pub fn usage(&self, key: &str) -> Result<(i64, i64), SnapshotError> {
        let info = self.stat(key)?;
        if info.record.kind == Kind::Active {
            return disk_usage(&self.fs_path(info.record.id));
        }
        Ok((info.record.size, info.record.inodes))
    }

    /// Directories under `snapshots/` that no snapshot owns (and no
    /// reservation in progress).
    pub fn orphan_dirs(&self) -> Result<Vec<PathBuf>, SnapshotError> {
        let mut ids: HashSet<String> = self
            .all()?
            .into_iter()
            .map(|i| i.record.id.to_string())
            .collect();
        ids.extend(self.lock_pending().iter().map(u64::to_string));
        let dir = self.root.join("snapshots");
        let entries = std::fs::read_dir(&dir).map_err(|e| io_error("cannot read", &dir, e))?;
        Ok(entries
            .flatten()
            .filter(|e| !ids.contains(e.file_name().to_string_lossy().as_ref()))
            .map(|e| e.path())
            .collect())
    }
}

/// A new, uniquely named directory `new-*` in `dir`.
fn tempdir_in(dir: &Path) -> Result<PathBuf, SnapshotError> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("new-{}-{n}", std::process::id()));
        match std::fs::create_dir(&path) {
            Ok(()) => return Ok(path),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_error("cannot create", &path, e)),
        }
    }
}

/// Bytes (allocated blocks) and inodes under `path`, each inode once, as
/// containerd's `fs.DiskUsage` counts them.
pub fn disk_usage(path: &Path) -> Result<(i64, i64), SnapshotError> {
    let mut seen = HashSet::new();
    let mut size = 0i64;
    let mut stack = vec![path.to_owned()];
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).map_err(|e| io_error("cannot stat", &p, e))?;
        if seen.insert((meta.dev(), meta.ino())) {
            size += meta.blocks() as i64 * 512;
        }
        if meta.is_dir() {
            let entries = std::fs::read_dir(&p).map_err(|e| io_error("cannot read", &p, e))?;
            for entry in entries {
                stack.push(entry.map_err(|e| io_error("cannot read", &p, e))?.path());
            }
        }
    }
    Ok((size, seen.len() as i64))
}
