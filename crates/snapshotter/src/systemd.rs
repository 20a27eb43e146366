//! systemd's side of keeping descriptors across restarts: its file
//! descriptor store (`FileDescriptorStoreMax=`). A daemon run as a systemd
//! service stores every descriptor it hands to its keeper there too
//! (`sd_notify` `FDSTORE=1` with `FDNAME=`), and systemd hands them back
//! at the next start (`LISTEN_FDS`, `LISTEN_FDNAMES`), so the mounts
//! survive even a keeper that was killed.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{ControlMessage, MsgFlags, UnixAddr, sendmsg};

/// The service manager's notification socket (`NOTIFY_SOCKET`).
#[derive(Debug, Clone)]
pub struct Notifier {
    path: PathBuf,
}

impl Notifier {
    /// The notification socket systemd set up, when run by systemd.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        Some(Notifier { path: path.into() })
    }

    /// Sends `state` (e.g. `READY=1`), with `fd` attached if given.
    pub fn notify(&self, state: &str, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        let bytes = self.path.as_os_str().as_encoded_bytes();
        let address = match bytes.strip_prefix(b"@") {
            Some(name) => UnixAddr::new_abstract(name)?,
            None => UnixAddr::new(&self.path)?,
        };
        let fds: Vec<RawFd> = fd.iter().map(|fd| fd.as_raw_fd()).collect();
        let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&fds)]
        };
        sendmsg(
            socket.as_raw_fd(),
            &[IoSlice::new(state.as_bytes())],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(&address),
        )?;
        Ok(())
    }

    /// Stores `fd` in the service's file descriptor store as `name`.
    pub fn store(&self, name: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.notify(&format!("FDSTORE=1\nFDNAME={name}"), Some(fd))
    }

    /// Removes what the store holds as `name`.
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        self.notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}"), None)
    }
}

/// The descriptors systemd handed this process at start, by name
/// (`LISTEN_FDS` from descriptor 3 on, `LISTEN_FDNAMES`, for this process
/// only: `LISTEN_PID`). They are made close-on-exec, so that processes the
/// daemon starts do not inherit them.
pub fn listen_fds() -> BTreeMap<String, OwnedFd> {
    let var = |name: &str| std::env::var(name).ok();
    let mut fds = BTreeMap::new();
    let for_us = var("LISTEN_PID").and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let Some(count) = var("LISTEN_FDS").and_then(|n| n.parse::<i32>().ok()) else {
        return fds;
    };
    if !for_us {
        return fds;
    }
    let names = var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    for fd in 3..3 + count {
        let name = names.next().unwrap_or("unknown").to_owned();
        // SAFETY: systemd passed descriptors 3..3+LISTEN_FDS to this
        // process, and nothing else has taken them.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = nix::fcntl::fcntl(
            &owned,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        fds.insert(name, owned);
    }
    fds
}
