//! A comparable description of a directory tree: every path with its type,
//! permissions, owner, mtime, size, link target, device number, xattrs,
//! content digest and hardlink group. Used to compare a Pronto mount with a
//! reference extraction (`tar -x`, containerd's unpack).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

/// What is compared of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    pub kind: &'static str,
    /// Permission and special bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub size: u64,
    pub link: Option<String>,
    pub rdev: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
    pub content: Option<String>,
    /// Index of the hardlink group (paths sharing an inode get the same
    /// number; numbering follows path order so trees compare).
    pub inode_group: usize,
    pub nlink: u64,
}

/// Options for [`snapshot`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SnapshotOptions {
    /// Compare directory mtimes (extraction tools set them after filling
    /// the directory; some layers leave them unset).
    pub dir_mtimes: bool,
}

/// Describes every path below `root` (not `root` itself).
pub fn snapshot(root: &Path, options: SnapshotOptions) -> Result<BTreeMap<String, PathInfo>> {
    let mut out = BTreeMap::new();
    let mut groups: HashMap<(u64, u64), usize> = HashMap::new();
    walk(root, root, options, &mut out, &mut groups)?;
    Ok(out)
}

fn walk(
    root: &Path,
    dir: &Path,
    options: SnapshotOptions,
    out: &mut BTreeMap<String, PathInfo>,
    groups: &mut HashMap<(u64, u64), usize>,
) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("list {}", dir.display()))?
        .collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let meta = std::fs::symlink_metadata(&path)?;
        let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
        let file_type = meta.file_type();
        let kind = if file_type.is_dir() {
            "dir"
        } else if file_type.is_symlink() {
            "symlink"
        } else if file_type.is_file() {
            "file"
        } else if file_type.is_char_device() {
            "char"
        } else if file_type.is_block_device() {
            "block"
        } else if file_type.is_fifo() {
            "fifo"
        } else {
            "other"
        };
        let next = groups.len();
        let inode_group = if kind == "file" {
            *groups.entry((meta.dev(), meta.ino())).or_insert(next)
        } else {
            0
        };
        let content = if kind == "file" {
            let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
            Some(hex::encode(Sha256::digest(&bytes)))
        } else {
            None
        };
        let mut xattrs = BTreeMap::new();
        if kind != "symlink"
            && let Ok(names) = xattr::list(&path)
        {
            for name in names {
                let name = name.to_string_lossy().into_owned();
                if let Ok(Some(value)) = xattr::get(&path, &name) {
                    xattrs.insert(name, value);
                }
            }
        }
        out.insert(
            rel,
            PathInfo {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                mtime: if kind == "dir" && !options.dir_mtimes {
                    0
                } else {
                    meta.mtime()
                },
                size: if kind == "dir" { 0 } else { meta.size() },
                link: if kind == "symlink" {
                    Some(std::fs::read_link(&path)?.to_string_lossy().into_owned())
                } else {
                    None
                },
                rdev: meta.rdev(),
                xattrs,
                content,
                inode_group,
                nlink: if kind == "dir" { 0 } else { meta.nlink() },
            },
        );
        if kind == "dir" {
            walk(root, &path, options, out, groups)?;
        }
    }
    Ok(())
}

/// Renumbers hardlink groups by first appearance in path order, so trees
/// edited after their snapshot still compare.
fn renumber(tree: &BTreeMap<String, PathInfo>) -> BTreeMap<String, PathInfo> {
    let mut seen: HashMap<usize, usize> = HashMap::new();
    tree.iter()
        .map(|(path, info)| {
            let mut info = info.clone();
            if info.kind == "file" {
                let next = seen.len();
                info.inode_group = *seen.entry(info.inode_group).or_insert(next);
            }
            (path.clone(), info)
        })
        .collect()
}

/// Differences between two snapshots, as readable lines (empty when equal).
/// `tree` with directory link counts left out: overlayfs reports 1 for
/// merged directories, so they differ between equal trees.
pub fn without_dir_link_counts(mut tree: BTreeMap<String, PathInfo>) -> BTreeMap<String, PathInfo> {
    for info in tree.values_mut() {
        if info.kind == "dir" {
            info.nlink = 0;
        }
    }
    tree
}

pub fn diff(
    expected: &BTreeMap<String, PathInfo>,
    actual: &BTreeMap<String, PathInfo>,
) -> Vec<String> {
    let (expected, actual) = (&renumber(expected), &renumber(actual));
    let mut lines = Vec::new();
    for (path, want) in expected {
        match actual.get(path) {
            None => lines.push(format!("missing: {path}")),
            Some(got) if got != want => lines.push(format!(
                "differs: {path}\n  expected {want:?}\n  actual   {got:?}"
            )),
            Some(_) => {}
        }
    }
    for path in actual.keys().filter(|p| !expected.contains_key(*p)) {
        lines.push(format!("unexpected: {path}"));
    }
    lines
}
