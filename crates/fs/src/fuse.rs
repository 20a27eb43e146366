//! The FUSE adapter: kernel requests in, tree lookups and layer reads out.
//! The only place that knows FUSE; every failure of a read becomes `EIO`
//! here, with a log line naming the layer.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr,
    Request, Session,
};
use pronto_store::{CacheKey, ContentCache};

use crate::source::LayerSource;
use crate::tree::{Node, NodeKind, Tree};

/// The tree never changes, so the kernel may keep entries and attributes
/// for as long as it likes.
const TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Name shown as the mount source (e.g. the image reference).
    pub fs_name: String,
    /// Let every user read the mount (containers run as any uid).
    pub allow_other: bool,
    /// Threads answering kernel requests.
    pub threads: usize,
    /// Where reads that wait for the network run (one runtime for every
    /// mount of the node), so that they hold no FUSE thread: a mount then
    /// needs one. Without it, FUSE threads wait themselves.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            fs_name: "pronto".into(),
            allow_other: true,
            threads: 8,
            runtime: None,
        }
    }
}

struct OpenFile {
    ino: u64,
    layer: usize,
    entry: usize,
    keys: Vec<CacheKey>,
    mode: IoMode,
}

/// How the kernel reads an open file. It refuses to mix page-cached and
/// passthrough opens of one inode, and passthrough opens of one inode with
/// different backing files (the open fails with EIO), so every open of an
/// inode stays compatible with those already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoMode {
    /// Through the daemon and the page cache.
    Cached,
    /// The kernel reads the inode's local copy itself.
    Passthrough,
    /// Through the daemon, bypassing the page cache: what a file open in
    /// passthrough mode is given when this open cannot be (a program).
    Direct,
}

/// The backing file passthrough opens of an inode share: its cache key
/// and the kernel's id for it.
type Backing = (CacheKey, fuser::BackingId);

/// Open handles of one inode, by mode, and the backing file its
/// passthrough opens share.
struct InodeOpens<B> {
    cached: usize,
    passthrough: usize,
    backing: Option<B>,
}

impl<B> Default for InodeOpens<B> {
    fn default() -> Self {
        Self {
            cached: 0,
            passthrough: 0,
            backing: None,
        }
    }
}

/// What is open: handles, and per inode how.
struct OpenFiles<B = Backing> {
    handles: HashMap<u64, OpenFile>,
    inodes: HashMap<u64, InodeOpens<B>>,
}

impl<B> Default for OpenFiles<B> {
    fn default() -> Self {
        Self {
            handles: HashMap::new(),
            inodes: HashMap::new(),
        }
    }
}

impl<B> OpenFiles<B> {
    /// True when a new open of `ino` could start passthrough: nothing has
    /// it open, or only passthrough opens (whose backing file it reuses).
    fn may_start_passthrough(&self, ino: u64) -> bool {
        self.inodes
            .get(&ino)
            .is_none_or(|o| o.cached == 0 && o.passthrough == 0)
    }

    /// The mode for a new open of `ino` that `wants` passthrough, with a
    /// `backing` file made for it if one could be; records it.
    fn admit(&mut self, ino: u64, wants: bool, backing: Option<B>) -> IoMode {
        let opens = self.inodes.entry(ino).or_default();
        let mode = if opens.passthrough > 0 {
            if wants {
                IoMode::Passthrough
            } else {
                IoMode::Direct
            }
        } else if opens.cached == 0 && backing.is_some() {
            opens.backing = backing;
            IoMode::Passthrough
        } else {
            IoMode::Cached
        };
        match mode {
            IoMode::Passthrough => opens.passthrough += 1,
            IoMode::Cached => opens.cached += 1,
            IoMode::Direct => {}
        }
        mode
    }

    /// The backing file passthrough opens of `ino` share.
    fn backing(&self, ino: u64) -> Option<&B> {
        self.inodes.get(&ino)?.backing.as_ref()
    }

    /// Forgets handle `fh`; returns it. The inode's backing file goes
    /// with its last passthrough open.
    fn close(&mut self, fh: u64) -> Option<OpenFile> {
        let file = self.handles.remove(&fh)?;
        if let Some(opens) = self.inodes.get_mut(&file.ino) {
            match file.mode {
                IoMode::Passthrough => opens.passthrough -= 1,
                IoMode::Cached => opens.cached -= 1,
                IoMode::Direct => {}
            }
            if opens.passthrough == 0 {
                opens.backing = None;
            }
            if opens.cached == 0 && opens.passthrough == 0 {
                self.inodes.remove(&file.ino);
            }
        }
        Some(file)
    }
}

struct ProntoFs {
    tree: Arc<Tree>,
    layers: Vec<Arc<dyn LayerSource>>,
    cache: Arc<ContentCache>,
    open: Mutex<OpenFiles>,
    next_fh: AtomicU64,
    /// The kernel accepted FUSE passthrough (Linux 6.9 and later).
    passthrough: bool,
    runtime: Option<tokio::runtime::Handle>,
}

/// Mounts `tree` over `layers` at `dir`, read-only. Call `run()` on the
/// session to serve in this thread until unmounted, or `spawn()` to serve
/// in the background (dropping the handle unmounts).
pub fn mount(
    tree: Tree,
    layers: Vec<Arc<dyn LayerSource>>,
    cache: Arc<ContentCache>,
    dir: &Path,
    options: &MountOptions,
) -> std::io::Result<Session<impl Filesystem>> {
    let fs = ProntoFs {
        tree: Arc::new(tree),
        layers,
        cache,
        open: Mutex::new(OpenFiles::default()),
        next_fh: AtomicU64::new(1),
        passthrough: false,
        runtime: options.runtime.clone(),
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(options.fs_name.clone()),
        MountOption::Subtype("pronto".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
    ];
    if options.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;
    Session::new(fs, dir, &config)
}

impl ProntoFs {
    /// A backing file for passthrough, when the file's data is all local.
    fn backing_file(
        &self,
        layer: usize,
        entry: usize,
        reply: &ReplyOpen,
    ) -> Option<(CacheKey, fuser::BackingId)> {
        let key = self.layers[layer].local_file(entry)?;
        let path = self.cache.path_of(&key)?;
        let file = std::fs::File::open(&path).ok()?;
        match reply.open_backing(&file) {
            Ok(id) => Some((key, id)),
            Err(err) => {
                tracing::debug!("passthrough not possible for {}: {err}", path.display());
                None
            }
        }
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, OpenFiles> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entries of directory `ino` from `offset` on, `.` and `..`
    /// first: the offset of the entry after each, its name, inode and node.
    fn listing(
        &self,
        ino: INodeNo,
        offset: u64,
    ) -> Result<impl Iterator<Item = (u64, &OsStr, u64, &Node)>, Errno> {
        let node = self.node(ino)?;
        if node.kind != NodeKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let dots = [(OsStr::new("."), ino.0), (OsStr::new(".."), node.parent)];
        let entries = dots.into_iter().chain(self.tree.children(ino.0));
        Ok(entries
            .enumerate()
            .skip(offset as usize)
            .filter_map(|(i, (name, child))| {
                let node = self.tree.get(child)?;
                Some(((i + 1) as u64, name, child, node))
            }))
    }

    fn node(&self, ino: INodeNo) -> Result<&Node, Errno> {
        self.tree.get(ino.0).ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64, node: &Node) -> FileAttr {
        let mtime = if node.mtime >= 0 {
            UNIX_EPOCH + Duration::new(node.mtime as u64, node.mtime_nsec)
        } else {
            UNIX_EPOCH - Duration::from_secs(node.mtime.unsigned_abs())
        };
        FileAttr {
            ino: INodeNo(ino),
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind: file_type(node.kind),
            perm: (node.mode & 0o7777) as u16,
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: node.rdev,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// Answers a read with its bytes, or with `EIO` logged at ERROR with the
/// file and why, and counted.
fn answer_read(
    tree: &Tree,
    ino: INodeNo,
    offset: u64,
    size: u32,
    result: Result<Vec<u8>, crate::source::ReadError>,
    reply: ReplyData,
) {
    match result {
        Ok(bytes) => reply.data(&bytes),
        Err(err) => {
            tracing::error!(
                file = tree.path_of(ino.0),
                ino = ino.0,
                offset,
                size,
                "read failed, answering EIO: {err}"
            );
            pronto_metrics::metrics().error(pronto_metrics::ErrorKind::Read);
            reply.error(Errno::EIO);
        }
    }
}

fn file_type(kind: NodeKind) -> FileType {
    match kind {
        NodeKind::Dir => FileType::Directory,
        NodeKind::File => FileType::RegularFile,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::CharDevice => FileType::CharDevice,
        NodeKind::BlockDevice => FileType::BlockDevice,
        NodeKind::Fifo => FileType::NamedPipe,
    }
}

impl Filesystem for ProntoFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Passthrough lets the kernel read local files without us. A stack
        // depth of 1 keeps the mount usable as an overlayfs lower layer.
        self.passthrough = config
            .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
            .is_ok()
            && config.set_max_stack_depth(1).is_ok();
        // The tree is immutable and in memory: listing a directory answers
        // every lookup of its entries at once.
        let readdirplus = config
            .add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS)
            .is_ok();
        tracing::info!(
            passthrough = self.passthrough,
            readdirplus,
            "FUSE session initialised"
        );
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.tree.lookup(parent.0, name) {
            Some(ino) => match self.tree.get(ino) {
                Some(node) => reply.entry(&TTL, &self.attr(ino, node), Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino) {
            Ok(node) => reply.attr(&TTL, &self.attr(ino.0, node)),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino) {
            Ok(node) if node.kind == NodeKind::Symlink => reply.data(&node.link),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let Some((layer, entry)) = node.data else {
            return reply.error(Errno::EINVAL);
        };
        // Pin the file's data while it is open, so eviction never takes it.
        let mut keys = self.layers[layer].cache_keys(entry);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        // On Linux 6.18, a passthrough open of a file that a process is
        // executing fails with EIO (and executing a file through one does
        // too). Programs are therefore always served by the daemon (and
        // then the page cache): opens for execve (FMODE_EXEC, 0x20) and
        // files with an execute bit never use passthrough.
        const FMODE_EXEC: i32 = 0x20;
        let program = flags.0 & FMODE_EXEC != 0 || node.mode & 0o111 != 0;
        let wants = self.passthrough && node.size > 0 && !program;
        let backing = if wants && self.lock_open().may_start_passthrough(ino.0) {
            self.backing_file(layer, entry, &reply)
        } else {
            None
        };
        let mut open = self.lock_open();
        let mode = open.admit(ino.0, wants, backing);
        let shared = open.backing(ino.0).filter(|_| mode == IoMode::Passthrough);
        if let Some((key, _)) = shared {
            keys.push(*key);
        }
        for key in &keys {
            self.cache.pin(key);
        }
        match (shared, mode) {
            (Some((_, id)), _) => {
                tracing::debug!(ino = ino.0, "opened with passthrough");
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
            }
            (None, IoMode::Direct) => {
                tracing::debug!(
                    ino = ino.0,
                    "opened for direct I/O beside passthrough opens"
                );
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            (None, _) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
        open.handles.insert(
            fh,
            OpenFile {
                ino: ino.0,
                layer,
                entry,
                keys,
                mode,
            },
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let target = {
            let open = self.lock_open();
            open.handles.get(&fh.0).map(|f| (f.layer, f.entry))
        };
        let Some((layer, entry)) = target.or_else(|| self.node(ino).ok().and_then(|n| n.data))
        else {
            return reply.error(Errno::EBADF);
        };
        let source = &self.layers[layer];
        if let Some(runtime) = &self.runtime
            && !source.ready(entry, offset, size as usize)
        {
            let read = source.clone().read_async(entry, offset, size as usize);
            let tree = self.tree.clone();
            runtime.spawn(async move { answer_read(&tree, ino, offset, size, read.await, reply) });
            return;
        }
        answer_read(
            &self.tree,
            ino,
            offset,
            size,
            source.read(entry, offset, size as usize),
            reply,
        );
    }

    /// Nothing to write back on a read-only filesystem. Answered rather
    /// than left to fuser, which logs a warning for every mount.
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let closed = self.lock_open().close(fh.0);
        if let Some(file) = closed {
            for key in &file.keys {
                self.cache.unpin(key);
            }
        }
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.listing(ino, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        for (next, name, child, node) in entries {
            if reply.add(INodeNo(child), next, file_type(node.kind), name) {
                break;
            }
        }
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let entries = match self.listing(ino, offset) {
            Ok(entries) => entries,
            Err(e) => return reply.error(e),
        };
        for (next, name, child, node) in entries {
            let attr = self.attr(child, node);
            if reply.add(INodeNo(child), next, name, &TTL, &attr, Generation(0)) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let Some((_, value)) = node
            .xattrs
            .iter()
            .find(|(k, _)| k.as_bytes() == name.as_bytes())
        else {
            return reply.error(Errno::ENODATA);
        };
        if size == 0 {
            reply.size(value.len() as u32);
        } else if value.len() <= size as usize {
            reply.data(value);
        } else {
            reply.error(Errno::ERANGE);
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let node = match self.node(ino) {
            Ok(node) => node,
            Err(e) => return reply.error(e),
        };
        let mut names = Vec::new();
        for (name, _) in &node.xattrs {
            names.extend_from_slice(name.as_bytes());
            names.push(0);
        }
        if size == 0 {
            reply.size(names.len() as u32);
        } else if names.len() <= size as usize {
            reply.data(&names);
        } else {
            reply.error(Errno::ERANGE);
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, self.tree.len() as u64, 0, 4096, 255, 4096);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(open: &mut OpenFiles<u64>, fh: u64, ino: u64, wants: bool, local: bool) -> IoMode {
        let backing = (local && wants && open.may_start_passthrough(ino)).then_some(fh);
        let mode = open.admit(ino, wants, backing);
        open.handles.insert(
            fh,
            OpenFile {
                ino,
                layer: 0,
                entry: 0,
                keys: Vec::new(),
                mode,
            },
        );
        mode
    }

    #[test]
    fn opens_of_one_inode_stay_compatible() {
        let mut open = OpenFiles::<u64>::default();
        // Open through the page cache while not local; local later.
        assert_eq!(admit(&mut open, 1, 7, true, false), IoMode::Cached);
        assert_eq!(admit(&mut open, 2, 7, true, true), IoMode::Cached);
        // Another inode is on its own; its passthrough opens share one
        // backing file, and a program beside them goes direct.
        assert_eq!(admit(&mut open, 3, 8, true, true), IoMode::Passthrough);
        assert_eq!(admit(&mut open, 4, 8, true, true), IoMode::Passthrough);
        assert_eq!(open.backing(8), Some(&3), "the first open's backing file");
        assert_eq!(admit(&mut open, 5, 8, false, true), IoMode::Direct);
        open.close(1);
        open.close(2);
        assert!(open.may_start_passthrough(7));
        assert_eq!(admit(&mut open, 6, 7, true, true), IoMode::Passthrough);
        for fh in [3, 4, 5] {
            open.close(fh);
        }
        assert!(!open.inodes.contains_key(&8), "nothing left of inode 8");
    }
}
