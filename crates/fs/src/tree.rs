//! The directory tree a mount shows, built once from the layers' entries
//! (the tree is immutable, so the kernel may cache it without limit).
//!
//! - Merged: layers applied bottom to top as a container runtime would:
//!   `.wh.<name>` hides `<name>` of lower layers, `.wh..wh..opq` hides all
//!   lower children of its directory, later entries replace earlier ones.
//! - Single layer, as an overlayfs lower directory: whiteouts become
//!   character devices 0/0 and opaque markers the `trusted.overlay.opaque`
//!   xattr, exactly what overlayfs expects of a layer.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

use pronto_layer::{Entry, EntryKind};

pub const ROOT: u64 = 1;
use pronto_layer::{Marker, OPAQUE_XATTR};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeMode {
    /// All layers merged, whiteouts applied.
    Merged,
    /// One layer, whiteouts in overlayfs form.
    OverlayLower,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One inode.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission and special bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub size: u64,
    pub rdev: u32,
    pub nlink: u32,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub link: Vec<u8>,
    /// Directory children by name.
    pub children: BTreeMap<OsString, u64>,
    pub parent: u64,
    /// For regular files: (layer, entry) whose data this is.
    pub data: Option<(usize, usize)>,
}

impl Node {
    fn dir(parent: u64) -> Self {
        Node {
            kind: NodeKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            rdev: 0,
            nlink: 2,
            xattrs: Vec::new(),
            link: Vec::new(),
            children: BTreeMap::new(),
            parent,
            data: None,
        }
    }
}

/// The inodes of a mount; inode `n` is `nodes[n - 1]`.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Builds the tree of `layers` (bottom first), each given as its entries.
    pub fn build(layers: &[&[Entry]], mode: TreeMode) -> Self {
        let mut tree = Tree {
            nodes: vec![Node::dir(ROOT)],
        };
        for (index, entries) in layers.iter().enumerate() {
            tree.apply_layer(index, entries, mode);
        }
        tree.count_dir_links();
        tree
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(usize::try_from(ino).ok()?.checked_sub(1)?)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.get(parent)?.children.get(name).copied()
    }

    /// The inode at `path` (relative, `/`-separated), if any.
    pub fn resolve(&self, path: &str) -> Option<u64> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(ROOT, |ino, name| self.lookup(ino, OsStr::new(name)))
    }

    fn node_mut(&mut self, ino: u64) -> &mut Node {
        &mut self.nodes[(ino - 1) as usize]
    }

    fn add(&mut self, node: Node) -> u64 {
        self.nodes.push(node);
        self.nodes.len() as u64
    }

    fn apply_layer(&mut self, layer: usize, entries: &[Entry], mode: TreeMode) {
        if mode == TreeMode::Merged {
            // Whiteouts and opaque markers hide what lower layers have; they
            // must not hide entries of their own layer, so they go first.
            for entry in entries {
                let (parent, name) = split(&entry.path);
                let Some(dir) = self.resolve(parent) else {
                    continue;
                };
                match Marker::of(name) {
                    Marker::Opaque => self.clear_children(dir),
                    Marker::Whiteout(hidden) => self.unlink(dir, OsStr::new(hidden)),
                    Marker::Entry | Marker::Ignored => {}
                }
            }
        }
        for (index, entry) in entries.iter().enumerate() {
            let (parent, name) = split(&entry.path);
            let marker = Marker::of(name);
            if marker == Marker::Ignored {
                continue;
            }
            if marker == Marker::Opaque {
                if mode == TreeMode::OverlayLower {
                    let dir = self.ensure_dirs(parent);
                    self.node_mut(dir)
                        .xattrs
                        .push((OPAQUE_XATTR.into(), b"y".to_vec()));
                }
                continue;
            }
            if let Marker::Whiteout(hidden) = marker {
                if mode == TreeMode::OverlayLower {
                    let dir = self.ensure_dirs(parent);
                    let mut node = self.node_from(entry, dir, layer, index);
                    node.kind = NodeKind::CharDevice;
                    node.mode = 0;
                    node.rdev = 0;
                    node.size = 0;
                    node.data = None;
                    let ino = self.add(node);
                    self.link(dir, OsStr::new(hidden), ino);
                }
                continue;
            }
            if entry.path.is_empty() {
                let root = self.node_mut(ROOT);
                set_attrs(root, entry);
                continue;
            }
            let dir = self.ensure_dirs(parent);
            let name = OsStr::new(name);
            match entry.kind {
                EntryKind::Dir => match self.lookup(dir, name) {
                    Some(existing)
                        if self.get(existing).is_some_and(|n| n.kind == NodeKind::Dir) =>
                    {
                        set_attrs(self.node_mut(existing), entry);
                    }
                    _ => {
                        let node = self.node_from(entry, dir, layer, index);
                        let ino = self.add(node);
                        self.link(dir, name, ino);
                    }
                },
                EntryKind::Hardlink => {
                    let Some(target) = self.resolve(&entry.link) else {
                        tracing::warn!(
                            path = entry.path,
                            target = entry.link,
                            "hardlink to a missing file; skipped"
                        );
                        continue;
                    };
                    if self.get(target).is_none_or(|n| n.kind == NodeKind::Dir) {
                        continue;
                    }
                    self.link(dir, name, target);
                    self.node_mut(target).nlink += 1;
                }
                _ => {
                    let node = self.node_from(entry, dir, layer, index);
                    let ino = self.add(node);
                    self.link(dir, name, ino);
                }
            }
        }
    }

    fn node_from(&self, entry: &Entry, parent: u64, layer: usize, index: usize) -> Node {
        let mut node = Node::dir(parent);
        node.kind = match entry.kind {
            EntryKind::Dir => NodeKind::Dir,
            EntryKind::File | EntryKind::Hardlink => NodeKind::File,
            EntryKind::Symlink => NodeKind::Symlink,
            EntryKind::CharDevice => NodeKind::CharDevice,
            EntryKind::BlockDevice => NodeKind::BlockDevice,
            EntryKind::Fifo => NodeKind::Fifo,
        };
        node.nlink = if node.kind == NodeKind::Dir { 2 } else { 1 };
        set_attrs(&mut node, entry);
        match node.kind {
            NodeKind::File => {
                node.size = entry.size;
                node.data = Some((layer, index));
            }
            NodeKind::Symlink => {
                node.link = entry.link.as_bytes().to_vec();
                node.size = node.link.len() as u64;
            }
            NodeKind::CharDevice | NodeKind::BlockDevice => {
                node.rdev = encode_dev(entry.dev_major, entry.dev_minor);
            }
            _ => {}
        }
        node
    }

    /// Puts `ino` at `dir/name`, replacing what was there.
    fn link(&mut self, dir: u64, name: &OsStr, ino: u64) {
        self.unlink(dir, name);
        self.node_mut(dir).children.insert(name.to_os_string(), ino);
        self.node_mut(ino).parent = dir;
    }

    fn unlink(&mut self, dir: u64, name: &OsStr) {
        if let Some(old) = self.node_mut(dir).children.remove(name) {
            let node = self.node_mut(old);
            if node.kind != NodeKind::Dir {
                node.nlink = node.nlink.saturating_sub(1);
            }
        }
    }

    fn clear_children(&mut self, dir: u64) {
        let names: Vec<OsString> = self.node_mut(dir).children.keys().cloned().collect();
        for name in names {
            self.unlink(dir, &name);
        }
    }

    /// The directory at `path`, creating missing ones (as runtimes do for
    /// entries whose parents the tar lacks).
    fn ensure_dirs(&mut self, path: &str) -> u64 {
        let mut ino = ROOT;
        for name in path.split('/').filter(|c| !c.is_empty()) {
            let name = OsStr::new(name);
            ino = match self.lookup(ino, name) {
                Some(child) if self.get(child).is_some_and(|n| n.kind == NodeKind::Dir) => child,
                _ => {
                    let child = self.add(Node::dir(ino));
                    self.link(ino, name, child);
                    child
                }
            };
        }
        ino
    }

    fn count_dir_links(&mut self) {
        let counts: Vec<u32> = self
            .nodes
            .iter()
            .map(|n| {
                2 + n
                    .children
                    .values()
                    .filter(|c| self.get(**c).is_some_and(|c| c.kind == NodeKind::Dir))
                    .count() as u32
            })
            .collect();
        for (node, count) in self.nodes.iter_mut().zip(counts) {
            if node.kind == NodeKind::Dir {
                node.nlink = count;
            }
        }
    }

    /// Children of `dir` in name order, for readdir.
    pub fn children(&self, dir: u64) -> impl Iterator<Item = (&OsStr, u64)> {
        self.get(dir).into_iter().flat_map(|n| {
            n.children
                .iter()
                .map(|(name, ino)| (name.as_os_str(), *ino))
        })
    }

    /// A path of `ino` from the root, for messages (a hard-linked file has
    /// several; this is one of them).
    pub fn path_of(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut current = ino;
        while current != ROOT {
            let Some(node) = self.get(current) else { break };
            let name = self
                .children(node.parent)
                .find(|(_, child)| *child == current)
                .map(|(name, _)| name.to_string_lossy().into_owned());
            parts.push(name.unwrap_or_else(|| format!("<inode {current}>")));
            current = node.parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }
}

fn set_attrs(node: &mut Node, entry: &Entry) {
    node.mode = entry.mode & 0o7777;
    node.uid = entry.uid as u32;
    node.gid = entry.gid as u32;
    node.mtime = entry.mtime;
    node.mtime_nsec = entry.mtime_nsec;
    node.xattrs = entry.xattrs.clone();
}

/// Device numbers as FUSE carries them (the kernel's `new_encode_dev`).
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// `a/b/c` → (`a/b`, `c`).
fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            uname: String::new(),
            gname: String::new(),
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            offset: 0,
            link: String::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            pax: Vec::new(),
        }
    }

    fn file(path: &str) -> Entry {
        entry(path, EntryKind::File)
    }

    #[test]
    fn whiteouts_and_opaque_dirs_merge_like_a_runtime() {
        let lower = vec![
            entry("a", EntryKind::Dir),
            file("a/old"),
            file("a/keep"),
            entry("b", EntryKind::Dir),
            file("b/x"),
            file("gone"),
        ];
        let upper = vec![
            entry("b", EntryKind::Dir),
            file("b/.wh..wh..opq"),
            file("b/new"),
            file("a/.wh.old"),
            file(".wh.gone"),
        ];
        let tree = Tree::build(&[&lower, &upper], TreeMode::Merged);
        assert!(tree.resolve("a/keep").is_some());
        assert!(tree.resolve("a/old").is_none());
        assert!(tree.resolve("gone").is_none());
        assert!(tree.resolve("b/x").is_none());
        assert!(
            tree.resolve("b/new").is_some(),
            "same-layer entries survive the opaque marker"
        );
    }

    #[test]
    fn overlay_lower_form() {
        let layer = vec![
            entry("d", EntryKind::Dir),
            file("d/.wh..wh..opq"),
            file(".wh.gone"),
        ];
        let tree = Tree::build(&[&layer], TreeMode::OverlayLower);
        let gone = tree.get(tree.resolve("gone").unwrap()).unwrap();
        assert_eq!((gone.kind, gone.rdev), (NodeKind::CharDevice, 0));
        let d = tree.get(tree.resolve("d").unwrap()).unwrap();
        assert_eq!(
            d.xattrs,
            [("trusted.overlay.opaque".to_owned(), b"y".to_vec())]
        );
        assert!(tree.resolve("d/.wh..wh..opq").is_none());
    }

    #[test]
    fn hardlinks_share_an_inode_and_missing_parents_are_made() {
        let mut link = entry("x/y/hard", EntryKind::Hardlink);
        link.link = "x/y/file".into();
        let layer = vec![file("x/y/file"), link];
        let tree = Tree::build(&[&layer], TreeMode::Merged);
        let a = tree.resolve("x/y/file").unwrap();
        assert_eq!(tree.resolve("x/y/hard"), Some(a));
        assert_eq!(tree.get(a).unwrap().nlink, 2);
        assert_eq!(tree.get(tree.resolve("x").unwrap()).unwrap().nlink, 3);
        let path = tree.path_of(a);
        assert!(path == "/x/y/file" || path == "/x/y/hard", "{path}");
        assert_eq!(tree.path_of(tree.resolve("x/y").unwrap()), "/x/y");
        assert_eq!(tree.path_of(ROOT), "/");
    }
}
