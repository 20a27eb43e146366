//! The keeper: a small process that holds the daemon's FUSE connections
//! and its listening socket while `pronto serve` restarts, so that neither
//! running containers nor containerd notice.
//!
//! The kernel keeps a FUSE connection alive while any process holds its
//! `/dev/fuse` descriptor. The daemon hands every connection (after INIT)
//! and its listening socket to the keeper over a Unix socket
//! (SCM_RIGHTS); a new daemon takes them back and serves on. While no
//! daemon is there, requests wait in the kernel's queue; if none comes
//! back within the handover timeout, the keeper answers them with EIO
//! (keeping the mounts) until one does.
//!
//! The keeper knows nothing else: what a connection serves is recorded by
//! the daemon under its root. It is started by `pronto serve` when none
//! runs (in a process group of its own, so stopping the daemon leaves it),
//! and it stops when asked (`pronto keeper stop`).

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr, accept4, bind, connect, listen, recvmsg, sendmsg, socket,
};
use serde::{Deserialize, Serialize};

use crate::systemd::Notifier;

/// The name the listening socket is kept under.
pub const LISTENER: &str = "listener";
/// The name the CRI image service's listening socket is kept under.
pub const CRI_LISTENER: &str = "cri-listener";
/// Names of FUSE connections start with this.
pub const FUSE_PREFIX: &str = "fuse/";

/// One message each way.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Message {
    /// Keep the attached descriptor under `name` (replacing one there).
    Keep {
        name: String,
    },
    /// Close what is kept under `name`.
    Forget {
        name: String,
    },
    /// The sender is the daemon: send everything kept, then `End`.
    Take,
    /// One kept descriptor, attached.
    Kept {
        name: String,
    },
    End,
    Ok,
    Error {
        problem: String,
    },
    /// Exit, closing everything kept.
    Stop,
}

const MAX_MESSAGE: usize = 64 * 1024;

fn send(sock: BorrowedFd<'_>, message: &Message, fd: Option<RawFd>) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    let iov = [IoSlice::new(&bytes)];
    let fds = fd.map(|fd| [fd]);
    let cmsgs: Vec<ControlMessage<'_>> = fds
        .as_ref()
        .map(|fds| vec![ControlMessage::ScmRights(fds)])
        .unwrap_or_default();
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// The next message and the descriptor attached to it; `None` when the
/// peer is gone.
fn receive(sock: BorrowedFd<'_>) -> std::io::Result<Option<(Message, Option<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let (len, fd) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = loop {
            match recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Err(Errno::EINTR) => continue,
                other => break other?,
            }
        };
        let mut fd = None;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: the kernel installed this descriptor for us.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    fd.get_or_insert(owned);
                }
            }
        }
        (msg.bytes, fd)
    };
    if len == 0 {
        return Ok(None);
    }
    let message = serde_json::from_slice(&buf[..len]).map_err(std::io::Error::other)?;
    Ok(Some((message, fd)))
}

fn seqpacket() -> std::io::Result<OwnedFd> {
    Ok(socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// The daemon's connection to its keeper.
#[derive(Debug)]
pub struct KeeperClient {
    sock: Mutex<OwnedFd>,
    path: PathBuf,
}

impl KeeperClient {
    /// Connects to the keeper at `path`, if one runs.
    pub fn connect(path: &Path) -> std::io::Result<KeeperClient> {
        let sock = seqpacket()?;
        connect(sock.as_raw_fd(), &UnixAddr::new(path)?)?;
        Ok(KeeperClient {
            sock: Mutex::new(sock),
            path: path.to_owned(),
        })
    }

    /// Connects to the keeper at `path`, starting one with `start` when
    /// none answers.
    pub fn connect_or_start(
        path: &Path,
        start: impl FnOnce() -> std::io::Result<()>,
    ) -> std::io::Result<KeeperClient> {
        Self::connect_or_start_within(path, start, Duration::from_secs(10))
    }

    /// Like [`Self::connect_or_start`], waiting up to `wait` for the
    /// keeper to answer after `start`.
    pub fn connect_or_start_within(
        path: &Path,
        start: impl FnOnce() -> std::io::Result<()>,
        wait: Duration,
    ) -> std::io::Result<KeeperClient> {
        if let Ok(client) = Self::connect(path) {
            return Ok(client);
        }
        start()?;
        let deadline = Instant::now() + wait;
        loop {
            match Self::connect(path) {
                Ok(client) => return Ok(client),
                Err(e) if Instant::now() > deadline => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("the keeper at {} did not start: {e}", path.display()),
                    ));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn request(&self, message: &Message, fd: Option<RawFd>) -> std::io::Result<()> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        send(sock.as_fd(), message, fd)?;
        match receive(sock.as_fd())? {
            Some((Message::Ok, _)) => Ok(()),
            Some((Message::Error { problem }, _)) => Err(std::io::Error::other(problem)),
            Some((other, _)) => Err(std::io::Error::other(format!(
                "unexpected answer from the keeper: {other:?}"
            ))),
            None => Err(std::io::Error::other("the keeper went away")),
        }
    }

    /// Hands `fd` to the keeper under `name`.
    pub fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.request(
            &Message::Keep {
                name: name.to_owned(),
            },
            Some(fd.as_raw_fd()),
        )
    }

    /// Tells the keeper to close what it keeps under `name`.
    pub fn forget(&self, name: &str) -> std::io::Result<()> {
        self.request(
            &Message::Forget {
                name: name.to_owned(),
            },
            None,
        )
    }

    /// Registers this process as the daemon and takes a copy of
    /// everything kept (the keeper goes on holding it).
    pub fn take(&self) -> std::io::Result<BTreeMap<String, OwnedFd>> {
        let sock = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        send(sock.as_fd(), &Message::Take, None)?;
        let mut kept = BTreeMap::new();
        loop {
            match receive(sock.as_fd())? {
                Some((Message::Kept { name }, Some(fd))) => {
                    kept.insert(name, fd);
                }
                Some((Message::End, _)) => return Ok(kept),
                Some((other, _)) => {
                    return Err(std::io::Error::other(format!(
                        "unexpected answer from the keeper: {other:?}"
                    )));
                }
                None => return Err(std::io::Error::other("the keeper went away")),
            }
        }
    }

    /// Asks the keeper to exit, closing everything it keeps.
    pub fn stop(&self) -> std::io::Result<()> {
        self.request(&Message::Stop, None)
    }
}

/// Where the daemon keeps descriptors across its restarts: its keeper,
/// and systemd's file descriptor store too when run by systemd (so that a
/// keeper killed with the daemon loses nothing).
#[derive(Debug)]
pub struct Holders {
    keeper: Option<KeeperClient>,
    systemd: Option<Notifier>,
}

impl Holders {
    /// None when there is neither.
    pub fn new(keeper: Option<KeeperClient>, systemd: Option<Notifier>) -> Option<Holders> {
        (keeper.is_some() || systemd.is_some()).then_some(Holders { keeper, systemd })
    }

    /// Hands `fd` over as `name`; fine when at least one holder took it.
    pub fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        let mut problems = Vec::new();
        let mut kept = false;
        if let Some(keeper) = &self.keeper {
            match keeper.keep(name, fd) {
                Ok(()) => kept = true,
                Err(e) => problems.push(format!("keeper: {e}")),
            }
        }
        if let Some(systemd) = &self.systemd {
            match systemd.store(name, fd) {
                Ok(()) => kept = true,
                Err(e) => problems.push(format!("systemd's descriptor store: {e}")),
            }
        }
        if kept {
            Ok(())
        } else {
            Err(std::io::Error::other(problems.join("; ")))
        }
    }

    /// Lets go of what is held as `name`.
    pub fn forget(&self, name: &str) -> std::io::Result<()> {
        if let Some(systemd) = &self.systemd {
            systemd.remove(name)?;
        }
        if let Some(keeper) = &self.keeper {
            keeper.forget(name)?;
        }
        Ok(())
    }

    /// Everything held for this daemon: the keeper's, and what systemd
    /// handed over at start (given to the keeper when it lacked it).
    pub fn take(&self) -> std::io::Result<BTreeMap<String, OwnedFd>> {
        let mut all = match &self.keeper {
            Some(keeper) => keeper.take()?,
            None => BTreeMap::new(),
        };
        for (name, fd) in crate::systemd::listen_fds() {
            if all.contains_key(&name) {
                continue;
            }
            if let Some(keeper) = &self.keeper
                && let Err(e) = keeper.keep(&name, fd.as_fd())
            {
                tracing::warn!(
                    name,
                    "cannot hand a descriptor systemd kept to the keeper: {e}"
                );
            }
            tracing::info!(name, "taken from systemd's descriptor store");
            all.insert(name, fd);
        }
        Ok(all)
    }
}

/// Runs the keeper on `path` until it is asked to stop. When no daemon
/// has been connected for `handover_timeout`, FUSE requests are answered
/// with EIO until one is.
pub fn run(path: &Path, handover_timeout: Duration) -> std::io::Result<()> {
    if KeeperClient::connect(path).is_ok() {
        tracing::info!(path = %path.display(), "a keeper already runs");
        return Ok(());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = seqpacket()?;
    bind(listener.as_raw_fd(), &UnixAddr::new(path)?)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    listen(&listener, Backlog::new(16)?)?;
    let pid_file = pid_file(path);
    std::fs::write(&pid_file, format!("{}\n", std::process::id()))?;
    tracing::info!(path = %path.display(), "keeper started");
    let result = Keeper {
        kept: BTreeMap::new(),
        clients: Vec::new(),
        orphaned_since: Some(Instant::now()),
        answering: false,
        timeout: handover_timeout,
    }
    .run(&listener);
    let _ = std::fs::remove_file(path);
    let _ = std::fs::remove_file(&pid_file);
    tracing::info!("keeper stopped");
    result
}

/// Where the keeper at `socket` writes its process id.
pub fn pid_file(socket: &Path) -> PathBuf {
    socket.with_extension("pid")
}

struct Client {
    sock: OwnedFd,
    daemon: bool,
}

struct Keeper {
    kept: BTreeMap<String, OwnedFd>,
    clients: Vec<Client>,
    /// Since when no daemon is connected.
    orphaned_since: Option<Instant>,
    /// Answering FUSE requests with EIO (no daemon for too long).
    answering: bool,
    timeout: Duration,
}

enum Step {
    Go,
    Stop,
}

impl Keeper {
    fn run(mut self, listener: &OwnedFd) -> std::io::Result<()> {
        loop {
            if !self.answering
                && let Some(since) = self.orphaned_since
                && since.elapsed() >= self.timeout
            {
                self.start_answering();
            }
            let wait = match (self.answering, self.orphaned_since) {
                (false, Some(since)) => {
                    let left = self.timeout.saturating_sub(since.elapsed());
                    PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
                        .unwrap_or(PollTimeout::MAX)
                }
                _ => PollTimeout::NONE,
            };
            let fuse: Vec<(String, RawFd)> = if self.answering {
                self.kept
                    .iter()
                    .filter(|(name, _)| name.starts_with(FUSE_PREFIX))
                    .map(|(name, fd)| (name.clone(), fd.as_raw_fd()))
                    .collect()
            } else {
                Vec::new()
            };
            let (ready_listener, ready_clients, ready_fuse) = {
                let mut fds = vec![PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                fds.extend(
                    self.clients
                        .iter()
                        .map(|c| PollFd::new(c.sock.as_fd(), PollFlags::POLLIN)),
                );
                // SAFETY: the descriptors are owned by `self.kept`, which is
                // not changed while `fds` lives.
                let borrowed: Vec<BorrowedFd<'_>> = fuse
                    .iter()
                    .map(|(_, fd)| unsafe { BorrowedFd::borrow_raw(*fd) })
                    .collect();
                fds.extend(
                    borrowed
                        .iter()
                        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN)),
                );
                match poll(&mut fds, wait) {
                    Ok(_) => {}
                    Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
                let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
                let clients: Vec<bool> = fds[1..1 + self.clients.len()].iter().map(ready).collect();
                let fuse: Vec<bool> = fds[1 + self.clients.len()..].iter().map(ready).collect();
                (ready(&fds[0]), clients, fuse)
            };
            for ((name, fd), ready) in fuse.iter().zip(ready_fuse) {
                // SAFETY: the descriptor is kept open by `self.kept`.
                let borrowed = unsafe { BorrowedFd::borrow_raw(*fd) };
                if ready && !pronto_fs::refuse_one(borrowed, Errno::EIO) {
                    tracing::info!(name, "FUSE connection ended");
                    self.kept.remove(name);
                }
            }
            let mut gone = Vec::new();
            for (i, ready) in ready_clients.into_iter().enumerate() {
                if !ready {
                    continue;
                }
                match self.serve_client(i) {
                    Ok(Step::Go) => {}
                    Ok(Step::Stop) => return Ok(()),
                    Err(_) => gone.push(i),
                }
            }
            for i in gone.into_iter().rev() {
                let client = self.clients.remove(i);
                if client.daemon && !self.clients.iter().any(|c| c.daemon) {
                    tracing::info!(
                        "the daemon is gone; its mounts wait for the next one (EIO after {})",
                        humantime(self.timeout)
                    );
                    self.orphaned_since = Some(Instant::now());
                }
            }
            if ready_listener {
                match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
                    // SAFETY: accept4 returned a new descriptor we own.
                    Ok(fd) => self.clients.push(Client {
                        sock: unsafe { OwnedFd::from_raw_fd(fd) },
                        daemon: false,
                    }),
                    Err(e) => tracing::warn!("keeper cannot accept: {e}"),
                }
            }
        }
    }

    /// Answers one message of client `i`; an error drops the client.
    fn serve_client(&mut self, i: usize) -> std::io::Result<Step> {
        let sock = self.clients[i].sock.as_fd();
        let Some((message, fd)) = receive(sock)? else {
            return Err(std::io::Error::other("closed"));
        };
        let answer = match message {
            Message::Keep { name } => match fd {
                Some(fd) => {
                    self.kept.insert(name, fd);
                    Message::Ok
                }
                None => Message::Error {
                    problem: "no descriptor attached".into(),
                },
            },
            Message::Forget { name } => {
                self.kept.remove(&name);
                Message::Ok
            }
            Message::Take => {
                if self.answering {
                    tracing::info!("a daemon is back; FUSE requests go to it again");
                }
                self.answering = false;
                self.orphaned_since = None;
                self.clients[i].daemon = true;
                let sock = self.clients[i].sock.as_fd();
                for (name, fd) in &self.kept {
                    send(
                        sock,
                        &Message::Kept { name: name.clone() },
                        Some(fd.as_raw_fd()),
                    )?;
                }
                Message::End
            }
            Message::Stop => {
                send(sock, &Message::Ok, None)?;
                return Ok(Step::Stop);
            }
            other => Message::Error {
                problem: format!("not a request: {other:?}"),
            },
        };
        send(self.clients[i].sock.as_fd(), &answer, None)?;
        Ok(Step::Go)
    }

    /// No daemon came back in time: readers get EIO instead of waiting,
    /// including for the requests the last daemon read but never answered.
    fn start_answering(&mut self) {
        tracing::warn!(
            mounts = self
                .kept
                .keys()
                .filter(|n| n.starts_with(FUSE_PREFIX))
                .count(),
            "no daemon for {}: answering reads of lazy mounts with EIO until one starts",
            humantime(self.timeout)
        );
        self.answering = true;
        for (name, fd) in &self.kept {
            if name.starts_with(FUSE_PREFIX) {
                let _ = pronto_fs::request_resend(fd.as_fd());
            }
        }
    }
}

fn humantime(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_kept_are_taken_back_by_the_next_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.sock");
        let keeper = {
            let path = path.clone();
            std::thread::spawn(move || run(&path, Duration::from_secs(3600)))
        };
        let client = KeeperClient::connect_or_start(&path, || Ok(())).unwrap();
        assert!(client.take().unwrap().is_empty());
        let (read, write) = nix::unistd::pipe().unwrap();
        client.keep("fuse/7", write.as_fd()).unwrap();
        drop(write);
        // The daemon goes; the next one gets the pipe's write end back.
        drop(client);
        let client = KeeperClient::connect(&path).unwrap();
        let kept = client.take().unwrap();
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["fuse/7"]);
        nix::unistd::write(&kept["fuse/7"], b"x").unwrap();
        let mut byte = [0u8; 1];
        nix::unistd::read(&read, &mut byte).unwrap();
        assert_eq!(&byte, b"x");
        client.forget("fuse/7").unwrap();
        assert!(client.take().unwrap().is_empty());
        client.stop().unwrap();
        keeper.join().unwrap().unwrap();
        assert!(!path.exists(), "the socket is removed");
    }
}
