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

/// One inode. Kept small: a layer of 100,000 files has as many.
#[derive(Debug, Clone)]
pub struct Node {
    pub kind: NodeKind,
    /// Permission and special bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_nsec: u32,
    pub rdev: u32,
    pub nlink: u32,
    pub mtime: i64,
    pub size: u64,
    pub parent: u64,
    /// For regular files: (layer, entry) whose data this is.
    data: Option<(u32, u32)>,
    /// Extended attributes and symlink target, which few nodes have.
    extra: Option<Box<Extra>>,
    /// A directory's children: `count` slots of the tree from `first`.
    children: (u32, u32),
}

#[derive(Debug, Clone, Default)]
struct Extra {
    xattrs: Vec<(String, Vec<u8>)>,
    link: Vec<u8>,
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
            parent,
            data: None,
            extra: None,
            children: (0, 0),
        }
    }

    /// Extended attributes, as (name, value).
    pub fn xattrs(&self) -> &[(String, Vec<u8>)] {
        self.extra.as_deref().map_or(&[], |e| &e.xattrs)
    }

    /// For regular files: (layer, entry) whose data this is.
    pub fn data(&self) -> Option<(usize, usize)> {
        self.data
            .map(|(layer, entry)| (layer as usize, entry as usize))
    }

    /// A symlink's target.
    pub fn link(&self) -> &[u8] {
        self.extra.as_deref().map_or(&[], |e| &e.link)
    }

    fn extra_mut(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }
}

/// One child of a directory: its name in the tree's name bytes, and inode
/// (a tree has fewer than 2^32 inodes: at most 8 million entries a layer).
#[derive(Debug, Clone, Copy)]
struct Slot {
    name: u64,
    len: u32,
    ino: u32,
}

/// The inodes of a mount; inode `n` is `nodes[n - 1]`. Every directory's
/// children are a run of `slots` sorted by name, their names one byte
/// string: about 30 bytes a child where a map per directory took 80.
#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
    slots: Vec<Slot>,
    names: Vec<u8>,
}

impl Tree {
    /// Builds the tree of `layers` (bottom first), each given as its entries.
    pub fn build(layers: &[&[Entry]], mode: TreeMode) -> Self {
        let mut builder = Builder {
            nodes: vec![Node::dir(ROOT)],
            children: vec![BTreeMap::new()],
        };
        for (index, entries) in layers.iter().enumerate() {
            builder.apply_layer(index, entries, mode);
        }
        builder.finish()
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

    fn slots_of(&self, dir: u64) -> &[Slot] {
        match self.get(dir) {
            Some(node) => {
                let (first, count) = node.children;
                &self.slots[first as usize..(first + count) as usize]
            }
            None => &[],
        }
    }

    fn name(&self, slot: &Slot) -> &OsStr {
        use std::os::unix::ffi::OsStrExt;
        let start = slot.name as usize;
        OsStr::from_bytes(&self.names[start..start + slot.len as usize])
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        let slots = self.slots_of(parent);
        slots
            .binary_search_by(|slot| self.name(slot).cmp(name))
            .ok()
            .map(|i| u64::from(slots[i].ino))
    }

    /// The inode at `path` (relative, `/`-separated), if any.
    pub fn resolve(&self, path: &str) -> Option<u64> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(ROOT, |ino, name| self.lookup(ino, OsStr::new(name)))
    }

    /// Children of `dir` in name order, for readdir.
    pub fn children(&self, dir: u64) -> impl Iterator<Item = (&OsStr, u64)> {
        self.slots_of(dir)
            .iter()
            .map(|slot| (self.name(slot), u64::from(slot.ino)))
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

/// A tree being built: every directory's children in a map, until
/// [`Builder::finish`] packs them.
struct Builder {
    nodes: Vec<Node>,
    /// By inode - 1, like `nodes`.
    children: Vec<BTreeMap<OsString, u64>>,
}

impl Builder {
    fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(usize::try_from(ino).ok()?.checked_sub(1)?)
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.children
            .get(usize::try_from(parent).ok()?.checked_sub(1)?)?
            .get(name)
            .copied()
    }

    fn resolve(&self, path: &str) -> Option<u64> {
        path.split('/')
            .filter(|c| !c.is_empty())
            .try_fold(ROOT, |ino, name| self.lookup(ino, OsStr::new(name)))
    }

    fn node_mut(&mut self, ino: u64) -> &mut Node {
        &mut self.nodes[(ino - 1) as usize]
    }

    fn children_mut(&mut self, ino: u64) -> &mut BTreeMap<OsString, u64> {
        &mut self.children[(ino - 1) as usize]
    }

    fn add(&mut self, node: Node) -> u64 {
        self.nodes.push(node);
        self.children.push(BTreeMap::new());
        self.nodes.len() as u64
    }

    /// The packed tree, with directory link counts.
    fn finish(self) -> Tree {
        let Builder {
            mut nodes,
            children,
        } = self;
        let mut slots = Vec::with_capacity(children.iter().map(BTreeMap::len).sum());
        let mut names = Vec::new();
        for (i, map) in children.into_iter().enumerate() {
            let first = slots.len() as u32;
            let mut dirs = 0;
            for (name, ino) in map {
                use std::os::unix::ffi::OsStrExt;
                let bytes = name.as_bytes();
                slots.push(Slot {
                    name: names.len() as u64,
                    len: bytes.len() as u32,
                    ino: ino as u32,
                });
                names.extend_from_slice(bytes);
                if nodes[(ino - 1) as usize].kind == NodeKind::Dir {
                    dirs += 1;
                }
            }
            let node = &mut nodes[i];
            node.children = (first, slots.len() as u32 - first);
            if node.kind == NodeKind::Dir {
                node.nlink = 2 + dirs;
            }
        }
        // Built by pushing: up to half of each would be spare capacity.
        nodes.shrink_to_fit();
        names.shrink_to_fit();
        Tree {
            nodes,
            slots,
            names,
        }
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
                        .extra_mut()
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
                node.data = Some((layer as u32, index as u32));
            }
            NodeKind::Symlink => {
                node.extra_mut().link = entry.link.as_bytes().to_vec();
                node.size = entry.link.len() as u64;
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
        self.children_mut(dir).insert(name.to_os_string(), ino);
        self.node_mut(ino).parent = dir;
    }

    fn unlink(&mut self, dir: u64, name: &OsStr) {
        if let Some(old) = self.children_mut(dir).remove(name) {
            let node = self.node_mut(old);
            if node.kind != NodeKind::Dir {
                node.nlink = node.nlink.saturating_sub(1);
            }
        }
    }

    fn clear_children(&mut self, dir: u64) {
        let names: Vec<OsString> = self.children_mut(dir).keys().cloned().collect();
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
}

fn set_attrs(node: &mut Node, entry: &Entry) {
    node.mode = entry.mode & 0o7777;
    node.uid = entry.uid as u32;
    node.gid = entry.gid as u32;
    node.mtime = entry.mtime;
    node.mtime_nsec = entry.mtime_nsec;
    if !entry.xattrs.is_empty() {
        node.extra_mut().xattrs = entry.xattrs.to_vec();
    } else if let Some(extra) = &mut node.extra {
        extra.xattrs.clear();
    }
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
            uname: Box::default(),
            gname: Box::default(),
            mtime: 0,
            mtime_nsec: 0,
            size: 0,
            offset: 0,
            link: Box::default(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Box::default(),
            pax: Box::default(),
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
            d.xattrs(),
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
