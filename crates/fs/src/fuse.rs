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
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyXattr, Request, Session,
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
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            fs_name: "pronto".into(),
            allow_other: true,
            threads: 8,
        }
    }
}

struct OpenFile {
    layer: usize,
    entry: usize,
    keys: Vec<CacheKey>,
    /// The kernel reads this file itself (passthrough) while it is held.
    _backing: Option<fuser::BackingId>,
}

struct ProntoFs {
    tree: Tree,
    layers: Vec<Arc<dyn LayerSource>>,
    cache: Arc<ContentCache>,
    open: Mutex<HashMap<u64, OpenFile>>,
    next_fh: AtomicU64,
    /// The kernel accepted FUSE passthrough (Linux 6.9 and later).
    passthrough: bool,
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
        tree,
        layers,
        cache,
        open: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        passthrough: false,
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
        tracing::info!(passthrough = self.passthrough, "FUSE session initialised");
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
        let backing = if self.passthrough && node.size > 0 && !program {
            self.backing_file(layer, entry, &reply).map(|(key, id)| {
                keys.push(key);
                id
            })
        } else {
            None
        };
        for key in &keys {
            self.cache.pin(key);
        }
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        match &backing {
            Some(id) => {
                tracing::debug!(ino = ino.0, "opened with passthrough");
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), id);
            }
            None => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
        }
        open.insert(
            fh,
            OpenFile {
                layer,
                entry,
                keys,
                _backing: backing,
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
            let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.get(&fh.0).map(|f| (f.layer, f.entry))
        };
        let Some((layer, entry)) = target.or_else(|| self.node(ino).ok().and_then(|n| n.data))
        else {
            return reply.error(Errno::EBADF);
        };
        match self.layers[layer].read(entry, offset, size as usize) {
            Ok(bytes) => reply.data(&bytes),
            Err(err) => {
                tracing::error!(
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
        let closed = self
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh.0);
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
        let node = match self.node(ino) {
            Ok(node) if node.kind == NodeKind::Dir => node,
            Ok(_) => return reply.error(Errno::ENOTDIR),
            Err(e) => return reply.error(e),
        };
        let dots = [(OsStr::new("."), ino.0), (OsStr::new(".."), node.parent)];
        let entries = dots.into_iter().chain(self.tree.children(ino.0));
        for (i, (name, child)) in entries.enumerate().skip(offset as usize) {
            let kind = self
                .tree
                .get(child)
                .map_or(FileType::RegularFile, |n| file_type(n.kind));
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
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
