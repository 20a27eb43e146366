//! The FUSE adapter: kernel requests in, tree lookups and layer reads out.
//! The only place that knows FUSE requests; every failure of a read becomes
//! `EIO` here, with a log line naming the layer.
//!
//! A mount is served by one task on the node's shared runtime, so mounts
//! add no threads. Reads that wait for the network run as tasks of their
//! own and answer when their bytes are verified.

use std::collections::HashMap;
use std::ffi::{CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use pronto_metrics::FuseOp;
use pronto_store::{CacheKey, ContentCache};
use zerocopy::{FromBytes, IntoBytes};

use crate::kernel::{
    self, Attr, AttrOut, Channel, Dirent, EntryOut, GetxattrIn, GetxattrOut, InHeader, MountSpec,
    OpenIn, OpenOut, ReadIn, ReleaseIn, StatfsOut, fopen, opcode,
};
use crate::source::LayerSource;
use crate::tree::{Node, NodeKind, Tree};

/// The tree never changes, so the kernel may keep entries and attributes
/// for as long as it likes (seconds).
const TTL: u64 = 24 * 3600;

#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Name shown as the mount source (e.g. the image reference).
    pub fs_name: String,
    /// Let every user read the mount (containers run as any uid).
    pub allow_other: bool,
    /// Where the mount is served, and reads that wait for the network
    /// run: one runtime for every mount of the node.
    pub runtime: tokio::runtime::Handle,
    /// A file recording, per inode, how the kernel has it open, so that a
    /// daemon adopting the connection after a restart answers new opens
    /// the way the kernel accepts (see [`OpenFiles`]). None: kept in
    /// memory only.
    pub opens_file: Option<PathBuf>,
    /// Told of the reads the mount serves (to record a startup profile).
    pub observer: Option<Arc<dyn ReadObserver>>,
}

/// Watches what a mount's readers read: every read the daemon answers, and
/// for a file handed to the kernel (passthrough, whose reads the daemon no
/// longer sees) its first [`PASSTHROUGH_SEEN`] bytes when it is opened.
pub trait ReadObserver: Send + Sync + std::fmt::Debug {
    /// `len` bytes at `offset` of entry `entry` of layer `layer` (the
    /// mount's layer list).
    fn read(&self, layer: usize, entry: usize, offset: u64, len: u64);
}

/// What an open handed to the kernel counts as read.
pub const PASSTHROUGH_SEEN: u64 = 1 << 20;

impl MountOptions {
    pub fn new(fs_name: impl Into<String>, runtime: tokio::runtime::Handle) -> Self {
        Self {
            fs_name: fs_name.into(),
            allow_other: true,
            runtime,
            opens_file: None,
            observer: None,
        }
    }
}

/// How the kernel reads an open file. It refuses to mix page-cached and
/// passthrough opens of one inode, and passthrough opens of one inode with
/// different backing files (the open fails with EIO), so every open of an
/// inode stays compatible with those already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IoMode {
    /// Through the daemon and the page cache.
    Cached = 0,
    /// The kernel reads the inode's local copy itself.
    Passthrough = 1,
    /// Through the daemon, bypassing the page cache: what a file open in
    /// passthrough mode is given when this open cannot be (a program).
    Direct = 2,
}

impl IoMode {
    /// File handles carry their mode in the low two bits, so that a
    /// handle opened by an earlier daemon is released correctly.
    fn of_handle(fh: u64) -> IoMode {
        match fh & 3 {
            1 => IoMode::Passthrough,
            2 => IoMode::Direct,
            _ => IoMode::Cached,
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

/// The backing file passthrough opens of an inode share: the kernel's id
/// for it and its cache key (unknown when an earlier daemon made it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Backing {
    id: u32,
    key: Option<CacheKey>,
}

/// Open handles of one inode, by mode, and the backing file its
/// passthrough opens share.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct InodeOpens {
    cached: u32,
    passthrough: u32,
    backing: Option<Backing>,
}

/// Bytes per inode in the opens file: cached, passthrough, backing id.
const OPENS_RECORD: u64 = 16;

/// What is open: handles, and per inode how. The per-inode counts are
/// the kernel's state, which outlives this process when the connection is
/// handed over, so they are written through to a file (one fixed slot per
/// inode) that the next daemon reads. A crash can leave a count too high
/// (an open counted but not answered, or a release answered but not
/// counted), never too low: that only costs passthrough for the inode.
#[derive(Default)]
struct OpenFiles {
    handles: HashMap<u64, OpenFile>,
    inodes: HashMap<u64, InodeOpens>,
    file: Option<std::fs::File>,
}

impl OpenFiles {
    /// Opens (or creates) the record at `path`, reading what an earlier
    /// daemon left there.
    fn load(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let bytes = std::fs::read(path)?;
        let mut inodes = HashMap::new();
        for (i, record) in bytes.chunks_exact(OPENS_RECORD as usize).enumerate() {
            let word = |at: usize| u32::from_le_bytes(record[at..at + 4].try_into().unwrap());
            let opens = InodeOpens {
                cached: word(0),
                passthrough: word(4),
                backing: (word(8) != 0).then(|| Backing {
                    id: word(8),
                    key: None,
                }),
            };
            if opens != InodeOpens::default() {
                inodes.insert(i as u64, opens);
            }
        }
        Ok(Self {
            handles: HashMap::new(),
            inodes,
            file: Some(file),
        })
    }

    fn record(&self, ino: u64) {
        let Some(file) = &self.file else {
            return;
        };
        let opens = self.inodes.get(&ino).copied().unwrap_or_default();
        let mut record = [0u8; OPENS_RECORD as usize];
        record[0..4].copy_from_slice(&opens.cached.to_le_bytes());
        record[4..8].copy_from_slice(&opens.passthrough.to_le_bytes());
        let id = opens.backing.map_or(0, |b| b.id);
        record[8..12].copy_from_slice(&id.to_le_bytes());
        if let Err(e) = file.write_all_at(&record, ino * OPENS_RECORD) {
            tracing::warn!(ino, "cannot record open files: {e}");
        }
    }

    /// True when a new open of `ino` could start passthrough: nothing has
    /// it open, or only passthrough opens (whose backing file it reuses).
    fn may_start_passthrough(&self, ino: u64) -> bool {
        self.inodes
            .get(&ino)
            .is_none_or(|o| o.cached == 0 && o.passthrough == 0)
    }

    /// The mode for a new open of `ino` that `wants` passthrough, with a
    /// `backing` file made for it if one could be; records it. Returns
    /// the backing file when it was not used, for the caller to close.
    fn admit(
        &mut self,
        ino: u64,
        wants: bool,
        backing: Option<Backing>,
    ) -> (IoMode, Option<Backing>) {
        let opens = self.inodes.entry(ino).or_default();
        let mut unused = backing;
        let mode = if opens.passthrough > 0 {
            if wants {
                IoMode::Passthrough
            } else {
                IoMode::Direct
            }
        } else if opens.cached == 0 && backing.is_some() {
            opens.backing = unused.take();
            IoMode::Passthrough
        } else {
            IoMode::Cached
        };
        match mode {
            IoMode::Passthrough => opens.passthrough += 1,
            IoMode::Cached => opens.cached += 1,
            IoMode::Direct => {}
        }
        if mode != IoMode::Direct {
            self.record(ino);
        }
        (mode, unused)
    }

    /// The backing file passthrough opens of `ino` share.
    fn backing(&self, ino: u64) -> Option<Backing> {
        self.inodes.get(&ino)?.backing
    }

    /// Forgets handle `fh` of inode `ino`. Returns the handle if this
    /// process opened it, and the backing file to close when its last
    /// passthrough open went.
    fn close(&mut self, fh: u64, ino: u64) -> (Option<OpenFile>, Option<Backing>) {
        let file = self.handles.remove(&fh);
        let (ino, mode) = match &file {
            Some(f) => (f.ino, f.mode),
            None => (ino, IoMode::of_handle(fh)),
        };
        let mut released = None;
        if let Some(opens) = self.inodes.get_mut(&ino) {
            match mode {
                IoMode::Passthrough => opens.passthrough = opens.passthrough.saturating_sub(1),
                IoMode::Cached => opens.cached = opens.cached.saturating_sub(1),
                IoMode::Direct => return (file, None),
            }
            if opens.passthrough == 0 {
                released = opens.backing.take();
            }
            if opens.cached == 0 && opens.passthrough == 0 {
                self.inodes.remove(&ino);
            }
            self.record(ino);
        }
        (file, released)
    }
}

/// A mounted (or adopted) filesystem and its kernel connection.
pub struct FuseMount {
    fs: Arc<ProntoFs>,
    channel: Arc<Channel>,
}

impl std::fmt::Debug for FuseMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FuseMount")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

struct ProntoFs {
    tree: Arc<Tree>,
    layers: Vec<Arc<dyn LayerSource>>,
    cache: Arc<ContentCache>,
    open: Mutex<OpenFiles>,
    next_fh: AtomicU64,
    runtime: tokio::runtime::Handle,
    observer: Option<Arc<dyn ReadObserver>>,
}

impl FuseMount {
    /// Mounts `tree` over `layers` at `dir`, read-only, and completes the
    /// kernel's INIT. Nothing is served until [`Self::spawn`].
    pub fn mount(
        tree: Tree,
        layers: Vec<Arc<dyn LayerSource>>,
        cache: Arc<ContentCache>,
        dir: &Path,
        options: &MountOptions,
    ) -> std::io::Result<FuseMount> {
        let fs = ProntoFs::new(tree, layers, cache, options)?;
        let channel = Channel::mount(
            dir,
            &MountSpec {
                source: &options.fs_name,
                allow_other: options.allow_other,
            },
        )?;
        let negotiated = channel.negotiated();
        tracing::debug!(
            passthrough = negotiated.passthrough,
            readdirplus = negotiated.readdirplus,
            resend = negotiated.resend,
            "FUSE connection initialised"
        );
        Ok(FuseMount {
            fs: Arc::new(fs),
            channel: Arc::new(channel),
        })
    }

    /// Takes over a connection an earlier daemon mounted and initialised
    /// (`fd`, with what its INIT settled). The tree must be the one that
    /// daemon served: inode numbers are positions in it.
    pub fn adopt(
        fd: std::os::fd::OwnedFd,
        negotiated: kernel::Negotiated,
        tree: Tree,
        layers: Vec<Arc<dyn LayerSource>>,
        cache: Arc<ContentCache>,
        options: &MountOptions,
    ) -> std::io::Result<FuseMount> {
        let fs = ProntoFs::new(tree, layers, cache, options)?;
        let channel = Channel::adopt(fd, negotiated)?;
        Ok(FuseMount {
            fs: Arc::new(fs),
            channel: Arc::new(channel),
        })
    }

    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Serves the mount on its runtime until it is unmounted.
    pub fn spawn(self) -> tokio::task::JoinHandle<()> {
        let runtime = self.fs.runtime.clone();
        runtime.spawn(self.serve())
    }

    /// Serves requests until the filesystem is unmounted.
    pub async fn serve(self) {
        let FuseMount { fs, channel } = self;
        if let Err(e) = serve(fs, channel).await {
            tracing::error!("FUSE connection failed: {e}");
        }
    }
}

/// Requests, and the end of the connection: an unmounted or aborted
/// connection polls as an error only.
const INTEREST: tokio::io::Interest = tokio::io::Interest::READABLE.add(tokio::io::Interest::ERROR);

async fn serve(fs: Arc<ProntoFs>, channel: Arc<Channel>) -> std::io::Result<()> {
    channel.set_nonblocking()?;
    // SAFETY: the registered descriptor is the channel's, which the
    // AsyncFd holds (an Arc): it stays open while it is registered.
    let ready =
        unsafe { tokio::io::unix::AsyncFd::register_with_interest(channel.clone(), INTEREST) }?;
    let mut buf = vec![0u8; kernel::BUFFER_SIZE];
    loop {
        let mut guard = ready.ready(INTEREST).await?;
        match channel.try_read(&mut buf) {
            Ok(Some(n)) => {
                drop(guard);
                fs.dispatch(&channel, &buf[..n]).await;
            }
            Ok(None) => guard.clear_ready(),
            // Unmounted, or the connection aborted.
            Err(Errno::ENODEV | Errno::ECONNABORTED) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Reads a request's fixed-size argument.
fn arg<T: FromBytes>(body: &[u8]) -> Result<T, Errno> {
    T::read_from_prefix(body)
        .map(|(value, _)| value)
        .map_err(|_| Errno::EINVAL)
}

/// The NUL-terminated name at the start of `bytes`.
fn name(bytes: &[u8]) -> Result<&OsStr, Errno> {
    CStr::from_bytes_until_nul(bytes)
        .map(|c| OsStr::from_bytes(c.to_bytes()))
        .map_err(|_| Errno::EINVAL)
}

impl ProntoFs {
    fn new(
        tree: Tree,
        layers: Vec<Arc<dyn LayerSource>>,
        cache: Arc<ContentCache>,
        options: &MountOptions,
    ) -> std::io::Result<Self> {
        let open = match &options.opens_file {
            Some(path) => OpenFiles::load(path)?,
            None => OpenFiles::default(),
        };
        // Handles of an earlier daemon were numbered from an earlier time.
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        Ok(Self {
            tree: Arc::new(tree),
            layers,
            cache,
            open: Mutex::new(open),
            next_fh: AtomicU64::new(start),
            runtime: options.runtime.clone(),
            observer: options.observer.clone(),
        })
    }

    async fn dispatch(&self, channel: &Arc<Channel>, request: &[u8]) {
        let Ok((header, body)) = InHeader::read_from_prefix(request) else {
            return;
        };
        if header.unique & kernel::UNIQUE_RESEND != 0 {
            pronto_metrics::metrics().resent_request();
        }
        pronto_metrics::metrics().fuse_request(fuse_op(header.opcode));
        if kernel::needs_no_reply(header.opcode) {
            return;
        }
        let unique = header.unique;
        let answered = match self.answer(channel, header, body).await {
            Ok(()) => Ok(()),
            Err(errno) => channel.reply_error(unique, errno),
        };
        if let Err(e) = answered {
            tracing::debug!(opcode = header.opcode, "cannot answer FUSE request: {e}");
        }
    }

    /// Answers one request; an error is answered by the caller.
    async fn answer(
        &self,
        channel: &Arc<Channel>,
        header: InHeader,
        body: &[u8],
    ) -> Result<(), Errno> {
        let (unique, ino) = (header.unique, header.nodeid);
        let reply = |parts: &[&[u8]]| channel.reply(unique, parts).map_err(|_| Errno::EIO);
        match header.opcode {
            opcode::LOOKUP => {
                self.node(ino)?;
                let entry = match self.tree.lookup(ino, name(body)?) {
                    Some(child) => self.entry(child, self.node(child)?),
                    // A layer never changes: the kernel may remember that
                    // the name is missing (node 0) as long as it remembers
                    // names that exist, and not ask again.
                    None => EntryOut {
                        entry_valid: TTL,
                        ..Default::default()
                    },
                };
                reply(&[entry.as_bytes()])
            }
            opcode::GETATTR => {
                let out = AttrOut {
                    attr_valid: TTL,
                    attr: self.attr(ino, self.node(ino)?),
                    ..Default::default()
                };
                reply(&[out.as_bytes()])
            }
            opcode::READLINK => {
                let node = self.node(ino)?;
                if node.kind != NodeKind::Symlink {
                    return Err(Errno::EINVAL);
                }
                reply(&[node.link()])
            }
            opcode::OPEN => {
                let open: OpenIn = arg(body)?;
                self.open(channel, unique, ino, open.flags)
            }
            opcode::READ => {
                let read: ReadIn = arg(body)?;
                self.read(channel, unique, ino, read).await;
                Ok(())
            }
            opcode::RELEASE => {
                let release: ReleaseIn = arg(body)?;
                reply(&[])?;
                self.release(channel, release.fh, ino);
                Ok(())
            }
            opcode::OPENDIR => {
                let out = OpenOut {
                    fh: 0,
                    // The listing never changes: the kernel may keep it.
                    open_flags: fopen::KEEP_CACHE | fopen::CACHE_DIR,
                    backing_id: 0,
                };
                reply(&[out.as_bytes()])
            }
            opcode::READDIR | opcode::READDIRPLUS => {
                let read: ReadIn = arg(body)?;
                let listing = self.listing(
                    ino,
                    read.offset,
                    read.size as usize,
                    header.opcode == opcode::READDIRPLUS,
                )?;
                reply(&[&listing])
            }
            opcode::FLUSH
            | opcode::FSYNC
            | opcode::FSYNCDIR
            | opcode::RELEASEDIR
            | opcode::ACCESS => reply(&[]),
            opcode::GETXATTR => {
                let get: GetxattrIn = arg(body)?;
                let wanted = name(&body[size_of::<GetxattrIn>()..])?;
                let node = self.node(ino)?;
                let (_, value) = node
                    .xattrs()
                    .iter()
                    .find(|(k, _)| k.as_bytes() == wanted.as_bytes())
                    .ok_or(Errno::ENODATA)?;
                self.xattr_reply(channel, unique, get.size, value)
            }
            opcode::LISTXATTR => {
                let get: GetxattrIn = arg(body)?;
                let node = self.node(ino)?;
                let mut names = Vec::new();
                for (name, _) in node.xattrs() {
                    names.extend_from_slice(name.as_bytes());
                    names.push(0);
                }
                self.xattr_reply(channel, unique, get.size, &names)
            }
            opcode::STATFS => {
                let out = StatfsOut {
                    files: self.tree.len() as u64,
                    bsize: 4096,
                    namelen: 255,
                    frsize: 4096,
                    ..Default::default()
                };
                reply(&[out.as_bytes()])
            }
            opcode::INIT => Err(Errno::EPROTO),
            opcode::SETATTR => Err(Errno::EROFS),
            op if is_write(op) => Err(Errno::EROFS),
            _ => Err(Errno::ENOSYS),
        }
    }

    fn xattr_reply(
        &self,
        channel: &Channel,
        unique: u64,
        size: u32,
        value: &[u8],
    ) -> Result<(), Errno> {
        let answered = if size == 0 {
            let out = GetxattrOut {
                size: value.len() as u32,
                padding: 0,
            };
            channel.reply(unique, &[out.as_bytes()])
        } else if value.len() <= size as usize {
            channel.reply(unique, &[value])
        } else {
            return Err(Errno::ERANGE);
        };
        answered.map_err(|_| Errno::EIO)
    }

    fn node(&self, ino: u64) -> Result<&Node, Errno> {
        self.tree.get(ino).ok_or(Errno::ENOENT)
    }

    fn attr(&self, ino: u64, node: &Node) -> Attr {
        Attr {
            ino,
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            atimensec: node.mtime_nsec,
            mtimensec: node.mtime_nsec,
            ctimensec: node.mtime_nsec,
            mode: type_bits(node.kind) | (node.mode & 0o7777),
            nlink: node.nlink,
            uid: node.uid,
            gid: node.gid,
            rdev: node.rdev,
            blksize: 4096,
            flags: 0,
        }
    }

    fn entry(&self, ino: u64, node: &Node) -> EntryOut {
        EntryOut {
            nodeid: ino,
            generation: 0,
            entry_valid: TTL,
            attr_valid: TTL,
            attr: self.attr(ino, node),
            ..Default::default()
        }
    }

    /// The entries of directory `ino` from `offset` on, `.` and `..`
    /// first, as the kernel reads them, up to `size` bytes.
    fn listing(&self, ino: u64, offset: u64, size: usize, plus: bool) -> Result<Vec<u8>, Errno> {
        let node = self.node(ino)?;
        if node.kind != NodeKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let dots = [(OsStr::new("."), ino), (OsStr::new(".."), node.parent)];
        let entries = dots.into_iter().chain(self.tree.children(ino));
        let mut out = Vec::with_capacity(size.min(64 * 1024));
        for (i, (name, child)) in entries.enumerate().skip(offset as usize) {
            let Some(child_node) = self.tree.get(child) else {
                continue;
            };
            let name = name.as_bytes();
            let dirent_len = kernel::dirent_size(name.len());
            let len = dirent_len + if plus { size_of::<EntryOut>() } else { 0 };
            if out.len() + len > size {
                break;
            }
            if plus {
                out.extend_from_slice(self.entry(child, child_node).as_bytes());
            }
            let dirent = Dirent {
                ino: child,
                off: (i + 1) as u64,
                namelen: name.len() as u32,
                kind: type_bits(child_node.kind) >> 12,
            };
            let start = out.len();
            out.extend_from_slice(dirent.as_bytes());
            out.extend_from_slice(name);
            out.resize(start + dirent_len, 0);
        }
        Ok(out)
    }

    fn lock_open(&self) -> std::sync::MutexGuard<'_, OpenFiles> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A backing file for passthrough, when the file's data is all local.
    fn backing_file(&self, channel: &Channel, layer: usize, entry: usize) -> Option<Backing> {
        let key = self.layers[layer].local_file(entry)?;
        let path = self.cache.path_of(&key)?;
        let file = std::fs::File::open(&path).ok()?;
        match channel.backing_open(&file) {
            Ok(id) => Some(Backing { id, key: Some(key) }),
            Err(err) => {
                tracing::debug!("passthrough not possible for {}: {err}", path.display());
                None
            }
        }
    }

    fn open(&self, channel: &Channel, unique: u64, ino: u64, flags: u32) -> Result<(), Errno> {
        if flags & O_ACCMODE != 0 {
            return Err(Errno::EROFS);
        }
        let node = self.node(ino)?;
        let Some((layer, entry)) = node.data() else {
            return Err(Errno::EINVAL);
        };
        self.layers[layer].active();
        // Pin the file's data while it is open, so eviction never takes it.
        let mut keys = self.layers[layer].cache_keys(entry);
        // On Linux 6.18, a passthrough open of a file that a process is
        // executing fails with EIO (and executing a file through one does
        // too). Programs are therefore always served by the daemon (and
        // then the page cache): opens for execve (FMODE_EXEC, 0x20) and
        // files with an execute bit never use passthrough.
        const FMODE_EXEC: u32 = 0x20;
        let program = flags & FMODE_EXEC != 0 || node.mode & 0o111 != 0;
        let wants = channel.negotiated().passthrough && node.size > 0 && !program;
        let backing = if wants && self.lock_open().may_start_passthrough(ino) {
            self.backing_file(channel, layer, entry)
        } else {
            None
        };
        let mut open = self.lock_open();
        let (mode, unused) = open.admit(ino, wants, backing);
        if let Some(unused) = unused {
            channel.backing_close(unused.id);
        }
        let shared = open.backing(ino).filter(|_| mode == IoMode::Passthrough);
        if let Some(key) = shared.and_then(|b| b.key) {
            keys.push(key);
        }
        for key in &keys {
            self.cache.pin(key);
        }
        let fh = (self.next_fh.fetch_add(1, Ordering::Relaxed) << 2) | mode as u64;
        let out = match (shared, mode) {
            (Some(backing), _) => {
                tracing::debug!(ino, "opened with passthrough");
                if let Some(observer) = &self.observer {
                    observer.read(layer, entry, 0, node.size.min(PASSTHROUGH_SEEN));
                }
                OpenOut {
                    fh,
                    open_flags: fopen::PASSTHROUGH,
                    backing_id: backing.id as i32,
                }
            }
            (None, IoMode::Direct) => {
                tracing::debug!(ino, "opened for direct I/O beside passthrough opens");
                OpenOut {
                    fh,
                    open_flags: fopen::DIRECT_IO,
                    backing_id: 0,
                }
            }
            (None, _) => OpenOut {
                fh,
                open_flags: fopen::KEEP_CACHE,
                backing_id: 0,
            },
        };
        open.handles.insert(
            fh,
            OpenFile {
                ino,
                layer,
                entry,
                keys,
                mode,
            },
        );
        drop(open);
        channel
            .reply(unique, &[out.as_bytes()])
            .map_err(|_| Errno::EIO)
    }

    fn release(&self, channel: &Channel, fh: u64, ino: u64) {
        let (file, backing) = self.lock_open().close(fh, ino);
        if let Some(file) = file {
            for key in &file.keys {
                self.cache.unpin(key);
            }
        }
        if let Some(backing) = backing {
            channel.backing_close(backing.id);
        }
    }

    async fn read(&self, channel: &Arc<Channel>, unique: u64, ino: u64, read: ReadIn) {
        let target = {
            let open = self.lock_open();
            open.handles.get(&read.fh).map(|f| (f.layer, f.entry))
        };
        // A handle of an earlier daemon: the inode says which file.
        let Some((layer, entry)) = target.or_else(|| self.node(ino).ok().and_then(|n| n.data()))
        else {
            let _ = channel.reply_error(unique, Errno::EBADF);
            return;
        };
        let source = self.layers[layer].clone();
        let (offset, size) = (read.offset, read.size);
        if let Some(observer) = &self.observer {
            observer.read(layer, entry, offset, u64::from(size));
        }
        let ready = source.ready(entry, offset, size as usize);
        let bytes = source.read_async(entry, offset, size as usize);
        let tree = self.tree.clone();
        let channel = channel.clone();
        let answer = async move {
            let result = bytes.await;
            answer_read(&tree, &channel, unique, ino, offset, size, result);
        };
        if ready {
            answer.await;
        } else {
            self.runtime.spawn(answer);
        }
    }
}

/// Any access but read-only is refused.
const O_ACCMODE: u32 = 0o3;

/// Requests that would change the filesystem.
fn is_write(op: u32) -> bool {
    // SYMLINK, MKNOD, MKDIR, UNLINK, RMDIR, RENAME, LINK, WRITE, SETXATTR,
    // REMOVEXATTR, CREATE, FALLOCATE, RENAME2, COPY_FILE_RANGE.
    matches!(op, 6 | 8..=13 | 16 | 21 | 24 | 35 | 43 | 45 | 47)
}

/// Answers a read with its bytes, or with `EIO` logged at ERROR with the
/// file and why, and counted.
fn answer_read(
    tree: &Tree,
    channel: &Channel,
    unique: u64,
    ino: u64,
    offset: u64,
    size: u32,
    result: Result<Vec<u8>, crate::source::ReadError>,
) {
    let answered = match result {
        Ok(bytes) => channel.reply(unique, &[&bytes]),
        Err(err) => {
            tracing::error!(
                file = tree.path_of(ino),
                ino,
                offset,
                size,
                "read failed, answering EIO: {err}"
            );
            pronto_metrics::metrics().error(pronto_metrics::ErrorKind::Read);
            channel.reply_error(unique, Errno::EIO)
        }
    };
    if let Err(e) = answered {
        tracing::debug!(ino, "cannot answer a read: {e}");
    }
}

/// The file type bits of `st_mode`.
fn type_bits(kind: NodeKind) -> u32 {
    match kind {
        NodeKind::Dir => 0o040000,
        NodeKind::File => 0o100000,
        NodeKind::Symlink => 0o120000,
        NodeKind::CharDevice => 0o020000,
        NodeKind::BlockDevice => 0o060000,
        NodeKind::Fifo => 0o010000,
    }
}

/// The kind of FUSE request `opcode` is, for the metrics.
fn fuse_op(opcode: u32) -> FuseOp {
    match opcode {
        opcode::LOOKUP => FuseOp::Lookup,
        opcode::GETATTR => FuseOp::Getattr,
        opcode::OPEN | opcode::OPENDIR => FuseOp::Open,
        opcode::READ => FuseOp::Read,
        opcode::READDIR | opcode::READDIRPLUS => FuseOp::Readdir,
        opcode::READLINK => FuseOp::Readlink,
        opcode::GETXATTR | opcode::LISTXATTR => FuseOp::Xattr,
        _ => FuseOp::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit(open: &mut OpenFiles, fh: u64, ino: u64, wants: bool, local: bool) -> IoMode {
        let backing = (local && wants && open.may_start_passthrough(ino)).then_some(Backing {
            id: fh as u32,
            key: None,
        });
        let (mode, _) = open.admit(ino, wants, backing);
        let fh = (fh << 2) | mode as u64;
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

    fn close(open: &mut OpenFiles, fh: u64, ino: u64) -> Option<Backing> {
        let handle = open
            .handles
            .keys()
            .copied()
            .find(|h| h >> 2 == fh)
            .expect("open handle");
        open.close(handle, ino).1
    }

    #[test]
    fn opens_of_one_inode_stay_compatible() {
        let mut open = OpenFiles::default();
        // Open through the page cache while not local; local later.
        assert_eq!(admit(&mut open, 1, 7, true, false), IoMode::Cached);
        assert_eq!(admit(&mut open, 2, 7, true, true), IoMode::Cached);
        // Another inode is on its own; its passthrough opens share one
        // backing file, and a program beside them goes direct.
        assert_eq!(admit(&mut open, 3, 8, true, true), IoMode::Passthrough);
        assert_eq!(admit(&mut open, 4, 8, true, true), IoMode::Passthrough);
        assert_eq!(open.backing(8).map(|b| b.id), Some(3), "the first open's");
        assert_eq!(admit(&mut open, 5, 8, false, true), IoMode::Direct);
        close(&mut open, 1, 7);
        close(&mut open, 2, 7);
        assert!(open.may_start_passthrough(7));
        assert_eq!(admit(&mut open, 6, 7, true, true), IoMode::Passthrough);
        assert_eq!(close(&mut open, 3, 8), None, "inode 8 is still open");
        assert_eq!(close(&mut open, 5, 8), None);
        assert_eq!(close(&mut open, 4, 8).map(|b| b.id), Some(3), "closed last");
        assert!(!open.inodes.contains_key(&8), "nothing left of inode 8");
    }

    #[test]
    fn a_later_daemon_reads_how_inodes_are_open_and_releases_earlier_handles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("opens");
        let handles: Vec<u64> = {
            let mut open = OpenFiles::load(&path).unwrap();
            admit(&mut open, 1, 7, true, false);
            admit(&mut open, 2, 9, true, true);
            admit(&mut open, 3, 9, true, true);
            open.handles.keys().copied().collect()
            // The daemon dies here: its handles are not closed.
        };
        let mut open = OpenFiles::load(&path).unwrap();
        // Inode 7 has a page-cached open: no passthrough may start on it.
        assert!(!open.may_start_passthrough(7));
        // Inode 9's passthrough opens share backing file 2: new ones must
        // use it.
        assert_eq!(admit(&mut open, 10, 9, true, true), IoMode::Passthrough);
        assert_eq!(open.backing(9).map(|b| b.id), Some(2));
        // The earlier daemon's handles are released by their mode bits.
        let mut closed = Vec::new();
        for fh in handles {
            let ino = if IoMode::of_handle(fh) == IoMode::Cached {
                7
            } else {
                9
            };
            closed.extend(open.close(fh, ino).1);
        }
        assert!(open.may_start_passthrough(7), "inode 7 is closed");
        assert!(closed.is_empty(), "inode 9 is still open by the new daemon");
        assert_eq!(close(&mut open, 10, 9).map(|b| b.id), Some(2));
        drop(open);
        let open = OpenFiles::load(&path).unwrap();
        assert!(open.inodes.is_empty(), "the record is empty again");
    }
}
