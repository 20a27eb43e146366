//! Pronto's side of the FUSE kernel protocol (`include/uapi/linux/fuse.h`):
//! mounting, the INIT handshake, reading requests and writing replies on a
//! `/dev/fuse` connection, and adopting a connection that another process
//! mounted and initialised.
//!
//! Written here rather than taken from a crate because adopting is the
//! point: a connection handed over from a previous daemon is already
//! initialised, so the first thing the new daemon does is ask the kernel to
//! send again what the old one read but never answered (FUSE_NOTIFY_RESEND,
//! Linux 6.9), then serve. fuser 0.18 always expects INIT first.
//! fuse-backend-rs can resume a session, but brings its own filesystem
//! trait and buffer model for virtio; Pronto needs ten request types on a
//! read-only tree, served from the node's shared async runtime so that
//! mounts add no threads.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use serde::{Deserialize, Serialize};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// The protocol version Pronto speaks: 7.41 (passthrough, resend).
const KERNEL_VERSION: u32 = 7;
const KERNEL_MINOR: u32 = 41;

/// Requests whose arguments do not fit are answered EIO by the kernel; the
/// largest Pronto can be sent is a SETXATTR of 64 KiB (refused with EROFS).
pub(crate) const BUFFER_SIZE: usize = 64 * 1024 + 4096;

/// Pages per read request the kernel may send (1 MiB).
const MAX_PAGES: u16 = 256;

pub(crate) mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const BATCH_FORGET: u32 = 42;
    pub const READDIRPLUS: u32 = 44;
}

/// Requests the kernel expects no answer to.
pub(crate) fn needs_no_reply(op: u32) -> bool {
    matches!(
        op,
        opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT | opcode::DESTROY
    )
}

mod init_flags {
    pub const ASYNC_READ: u64 = 1 << 0;
    pub const BIG_WRITES: u64 = 1 << 5;
    pub const DO_READDIRPLUS: u64 = 1 << 13;
    pub const PARALLEL_DIROPS: u64 = 1 << 18;
    pub const MAX_PAGES: u64 = 1 << 22;
    pub const CACHE_SYMLINKS: u64 = 1 << 23;
    pub const INIT_EXT: u64 = 1 << 30;
    pub const PASSTHROUGH: u64 = 1 << 37;
    pub const HAS_RESEND: u64 = 1 << 39;
}

pub(crate) mod fopen {
    pub const DIRECT_IO: u32 = 1 << 0;
    pub const KEEP_CACHE: u32 = 1 << 1;
    pub const CACHE_DIR: u32 = 1 << 3;
    pub const PASSTHROUGH: u32 = 1 << 7;
}

const NOTIFY_RESEND: i32 = 7;
/// Set in the id of a request the kernel sends again.
pub(crate) const UNIQUE_RESEND: u64 = 1 << 63;

#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
    pub padding: u16,
}

#[repr(C)]
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
struct OutHeader {
    len: u32,
    error: i32,
    unique: u64,
}

#[repr(C)]
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
struct InitIn {
    major: u32,
    minor: u32,
    max_readahead: u32,
    flags: u32,
}

#[repr(C)]
#[derive(Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
struct InitOut {
    major: u32,
    minor: u32,
    max_readahead: u32,
    flags: u32,
    max_background: u16,
    congestion_threshold: u16,
    max_write: u32,
    time_gran: u32,
    max_pages: u16,
    map_alignment: u16,
    flags2: u32,
    max_stack_depth: u32,
    unused: [u32; 6],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub atime: i64,
    pub mtime: i64,
    pub ctime: i64,
    pub atimensec: u32,
    pub mtimensec: u32,
    pub ctimensec: u32,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub blksize: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct EntryOut {
    pub nodeid: u64,
    pub generation: u64,
    pub entry_valid: u64,
    pub attr_valid: u64,
    pub entry_valid_nsec: u32,
    pub attr_valid_nsec: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct AttrOut {
    pub attr_valid: u64,
    pub attr_valid_nsec: u32,
    pub dummy: u32,
    pub attr: Attr,
}

#[repr(C)]
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct OpenIn {
    pub flags: u32,
    pub open_flags: u32,
}

#[repr(C)]
#[derive(Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct OpenOut {
    pub fh: u64,
    pub open_flags: u32,
    pub backing_id: i32,
}

#[repr(C)]
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
    pub release_flags: u32,
    pub lock_owner: u64,
}

#[repr(C)]
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct GetxattrIn {
    pub size: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct GetxattrOut {
    pub size: u32,
    pub padding: u32,
}

#[repr(C)]
#[derive(Debug, Default, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct StatfsOut {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
    pub padding: u32,
    pub spare: [u32; 6],
}

#[repr(C)]
#[derive(Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
pub(crate) struct Dirent {
    pub ino: u64,
    pub off: u64,
    pub namelen: u32,
    pub kind: u32,
}

#[repr(C)]
struct BackingMap {
    fd: i32,
    flags: u32,
    padding: u64,
}

nix::ioctl_write_ptr!(ioc_backing_open, 229, 1, BackingMap);
nix::ioctl_write_ptr!(ioc_backing_close, 229, 2, u32);

/// What INIT settled for a connection; kept with the connection so that a
/// daemon adopting it knows without asking the kernel again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    pub minor: u32,
    /// The kernel reads local files itself (FUSE passthrough).
    pub passthrough: bool,
    pub readdirplus: bool,
    /// The kernel can send unanswered requests again (Linux 6.9).
    pub resend: bool,
}

/// One `/dev/fuse` connection: requests in, replies out.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    negotiated: Negotiated,
}

/// Mount options Pronto passes to the kernel.
#[derive(Debug, Clone)]
pub struct MountSpec<'a> {
    /// Shown as the mount's source, e.g. `pronto:<image>@<layer>`.
    pub source: &'a str,
    /// Let every user read the mount (containers run as any uid).
    pub allow_other: bool,
}

impl Channel {
    /// Mounts a new read-only FUSE filesystem at `dir` and answers the
    /// kernel's INIT. The channel is ready to serve.
    pub fn mount(dir: &Path, spec: &MountSpec<'_>) -> std::io::Result<Channel> {
        use nix::fcntl::{OFlag, open};
        use nix::mount::MsFlags;
        let fd = open(
            "/dev/fuse",
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| {
            std::io::Error::new(
                std::io::Error::from(e).kind(),
                format!("open /dev/fuse: {e}"),
            )
        })?;
        let mut data = format!(
            "fd={},rootmode=40000,user_id={},group_id={},default_permissions",
            fd.as_raw_fd(),
            nix::unistd::geteuid(),
            nix::unistd::getegid()
        );
        if spec.allow_other {
            data.push_str(",allow_other");
        }
        nix::mount::mount(
            Some(spec.source),
            dir,
            Some("fuse.pronto"),
            MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOATIME,
            Some(data.as_str()),
        )
        .map_err(|e| {
            std::io::Error::new(std::io::Error::from(e).kind(), format!("mount(2): {e}"))
        })?;
        match Self::initialise(fd) {
            Ok(channel) => Ok(channel),
            Err(e) => {
                let _ = nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH);
                Err(e)
            }
        }
    }

    /// Reads the kernel's INIT on a fresh connection and answers it.
    fn initialise(fd: OwnedFd) -> std::io::Result<Channel> {
        let mut buf = vec![0u8; BUFFER_SIZE];
        let n = loop {
            match nix::unistd::read(&fd, &mut buf) {
                Ok(n) => break n,
                Err(Errno::EINTR | Errno::ENOENT) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let (header, body) = InHeader::read_from_prefix(&buf[..n])
            .map_err(|_| std::io::Error::other("short FUSE request"))?;
        if header.opcode != opcode::INIT {
            return Err(std::io::Error::other(format!(
                "expected FUSE INIT, the kernel sent opcode {}",
                header.opcode
            )));
        }
        let (init, rest) =
            InitIn::read_from_prefix(body).map_err(|_| std::io::Error::other("short FUSE INIT"))?;
        if init.major != KERNEL_VERSION || init.minor < 31 {
            return Err(std::io::Error::other(format!(
                "FUSE protocol {}.{} is too old (7.31 or later needed)",
                init.major, init.minor
            )));
        }
        let flags2 = if init.flags as u64 & init_flags::INIT_EXT != 0 {
            u32::read_from_prefix(rest).map(|(f, _)| f).unwrap_or(0)
        } else {
            0
        };
        let offered = init.flags as u64 | ((flags2 as u64) << 32);
        let wanted = init_flags::ASYNC_READ
            | init_flags::BIG_WRITES
            | init_flags::MAX_PAGES
            | init_flags::DO_READDIRPLUS
            | init_flags::PARALLEL_DIROPS
            | init_flags::CACHE_SYMLINKS
            | init_flags::INIT_EXT
            | init_flags::PASSTHROUGH;
        let flags = offered & wanted;
        let negotiated = Negotiated {
            minor: init.minor.min(KERNEL_MINOR),
            passthrough: flags & init_flags::PASSTHROUGH != 0,
            readdirplus: flags & init_flags::DO_READDIRPLUS != 0,
            resend: offered & init_flags::HAS_RESEND != 0,
        };
        let out = InitOut {
            major: KERNEL_VERSION,
            minor: negotiated.minor,
            max_readahead: init.max_readahead,
            flags: flags as u32,
            max_background: 16,
            congestion_threshold: 12,
            // Read-only: writes never come, and a small max_write keeps
            // the buffer the kernel asks readers to offer small.
            max_write: 4096,
            time_gran: 1,
            max_pages: MAX_PAGES,
            flags2: (flags >> 32) as u32,
            // The mount is used as an overlayfs lower layer.
            max_stack_depth: if negotiated.passthrough { 1 } else { 0 },
            ..Default::default()
        };
        let channel = Channel { fd, negotiated };
        channel.reply(header.unique, &[out.as_bytes()])?;
        Ok(channel)
    }

    /// A connection mounted and initialised by an earlier daemon. Asks the
    /// kernel to send again every request that daemon read but did not
    /// answer.
    pub fn adopt(fd: OwnedFd, negotiated: Negotiated) -> std::io::Result<Channel> {
        if negotiated.resend {
            request_resend(fd.as_fd())?;
        }
        Ok(Channel { fd, negotiated })
    }

    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// The connection's file descriptor, to hand to whoever keeps it
    /// across restarts.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Reads one request into `buf`: `Ok(None)` when none is waiting
    /// (non-blocking), `Err(ENODEV)` once the filesystem is unmounted.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> Result<Option<usize>, Errno> {
        loop {
            match nix::unistd::read(&self.fd, buf) {
                Ok(n) => return Ok(Some(n)),
                Err(Errno::EAGAIN) => return Ok(None),
                // ENOENT: the request was interrupted while being read.
                Err(Errno::EINTR | Errno::ENOENT) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn set_nonblocking(&self) -> std::io::Result<()> {
        use nix::fcntl::{FcntlArg, OFlag, fcntl};
        let flags = OFlag::from_bits_retain(fcntl(&self.fd, FcntlArg::F_GETFL)?);
        fcntl(&self.fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(())
    }

    /// Answers request `unique` with `parts` (the reply's body).
    pub(crate) fn reply(&self, unique: u64, parts: &[&[u8]]) -> std::io::Result<()> {
        let len = size_of::<OutHeader>() + parts.iter().map(|p| p.len()).sum::<usize>();
        let header = OutHeader {
            len: len as u32,
            error: 0,
            unique,
        };
        let mut slices = Vec::with_capacity(parts.len() + 1);
        slices.push(IoSlice::new(header.as_bytes()));
        slices.extend(parts.iter().map(|p| IoSlice::new(p)));
        self.write(&slices)
    }

    /// Answers request `unique` with an error.
    pub(crate) fn reply_error(&self, unique: u64, errno: Errno) -> std::io::Result<()> {
        let header = OutHeader {
            len: size_of::<OutHeader>() as u32,
            error: -(errno as i32),
            unique,
        };
        self.write(&[IoSlice::new(header.as_bytes())])
    }

    fn write(&self, slices: &[IoSlice<'_>]) -> std::io::Result<()> {
        match nix::sys::uio::writev(&self.fd, slices) {
            Ok(_) => Ok(()),
            // The request was interrupted and is gone: nothing to answer.
            Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Registers `file` as a backing file for passthrough opens; returns
    /// its id.
    pub(crate) fn backing_open(&self, file: &std::fs::File) -> std::io::Result<u32> {
        let map = BackingMap {
            fd: file.as_raw_fd(),
            flags: 0,
            padding: 0,
        };
        // SAFETY: the ioctl reads a `fuse_backing_map` from the pointer,
        // which is valid for the duration of the call.
        let id = unsafe { ioc_backing_open(self.fd.as_raw_fd(), &map) }?;
        Ok(id as u32)
    }

    /// Releases backing file `id`; opens using it keep it.
    pub(crate) fn backing_close(&self, id: u32) {
        // SAFETY: the ioctl reads one u32 from the pointer.
        if let Err(e) = unsafe { ioc_backing_close(self.fd.as_raw_fd(), &id) } {
            tracing::debug!(id, "cannot close FUSE backing file: {e}");
        }
    }
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Asks the kernel to queue again every request of connection `fd` that
/// was read but not answered (by a daemon that is gone).
pub fn request_resend(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let header = OutHeader {
        len: size_of::<OutHeader>() as u32,
        error: NOTIFY_RESEND,
        unique: 0,
    };
    nix::unistd::write(fd, header.as_bytes())?;
    Ok(())
}

/// Reads the next request waiting on connection `fd` (non-blocking or
/// known readable) and answers it with `errno`, for when no daemon serves
/// the connection. False once the connection is gone.
pub fn refuse_one(fd: BorrowedFd<'_>, errno: Errno) -> bool {
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        match nix::unistd::read(fd, &mut buf) {
            Ok(n) => {
                let Ok((header, _)) = InHeader::read_from_prefix(&buf[..n]) else {
                    return true;
                };
                if !needs_no_reply(header.opcode) {
                    let out = OutHeader {
                        len: size_of::<OutHeader>() as u32,
                        error: -(errno as i32),
                        unique: header.unique,
                    };
                    let _ = nix::unistd::write(fd, out.as_bytes());
                }
                return true;
            }
            Err(Errno::EINTR | Errno::ENOENT) => continue,
            Err(Errno::EAGAIN) => return true,
            Err(_) => return false,
        }
    }
}

/// The 8-byte aligned length of a directory entry with a name of `len`.
pub(crate) fn dirent_size(len: usize) -> usize {
    (size_of::<Dirent>() + len).div_ceil(8) * 8
}
