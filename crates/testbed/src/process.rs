//! Daemons the harness starts, and how they are stopped: by PID, TERM first,
//! KILL after a grace period, always on drop. Also the clean-up helpers for
//! what daemons leave behind (orphaned shims, mounts, cgroups).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::mount::{MntFlags, umount2};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// How long a daemon gets to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(10);

/// A child process running in the background with its output in a log file.
#[derive(Debug)]
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    /// Starts `command` with stdin closed and stdout and stderr appended to
    /// `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> Result<Self> {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open log file {}", log.display()))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {name} ({command:?})"))?;
        Ok(Self {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log file the daemon writes to.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// The last `lines` lines of the daemon's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the daemon: SIGTERM, then SIGKILL after the grace period.
    /// Stopping twice is harmless.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < GRACE {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "{} (pid {pid}) ignored SIGTERM for {GRACE:?}; killing it",
            self.name
        );
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// PIDs of processes whose command line contains `args` as consecutive
/// arguments, e.g. `["-address", "/tmp/x/containerd.sock"]`.
pub fn pids_with_args(args: &[&str]) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let argv: Vec<&[u8]> = raw.split(|b| *b == 0).collect();
            argv.windows(args.len())
                .any(|w| w.iter().zip(args).all(|(a, b)| *a == b.as_bytes()))
        })
        .collect()
}

/// Kills `roots` and all their descendants with SIGKILL and waits (up to
/// five seconds) until they are gone. Used for processes that are not our
/// children, such as containerd shims, which outlive containerd.
pub fn kill_trees(roots: &[i32]) {
    if roots.is_empty() {
        return;
    }
    let parents = parent_map();
    let mut victims: Vec<i32> = roots.to_vec();
    let mut i = 0;
    while i < victims.len() {
        let pid = victims[i];
        victims.extend(
            parents
                .iter()
                .filter(|(_, ppid)| **ppid == pid)
                .map(|(child, _)| *child),
        );
        i += 1;
    }
    for pid in &victims {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
    }
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) && victims.iter().any(|pid| is_alive(*pid)) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_alive(pid: i32) -> bool {
    // A zombie still has a /proc entry but state Z; it holds no resources.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat_fields(&stat).is_some_and(|(state, _)| state != "Z"))
}

/// (state, ppid) from a /proc/PID/stat line. The command name may contain
/// spaces and parentheses, so parse after the last ')'.
fn stat_fields(stat: &str) -> Option<(&str, i32)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

fn parent_map() -> HashMap<i32, i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|entry| {
            let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, stat_fields(&stat)?.1))
        })
        .collect()
}

/// Mount points at or below `dir`, deepest first.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|escaped| PathBuf::from(unescape_mountinfo(escaped)))
        .filter(|point| point.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Detaches every mount at or below `dir`. Returns the mount points that
/// could not be unmounted.
pub fn unmount_below(dir: &Path) -> Vec<PathBuf> {
    mounts_below(dir)
        .into_iter()
        .filter(|point| umount2(point, MntFlags::MNT_DETACH).is_err())
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Removes the cgroup directories named `group` under every cgroup
/// hierarchy (v1 controllers and the v2 tree), deepest first. Only empty
/// cgroups can be removed; errors are ignored because a test's clean-up
/// must not fail on what the kernel still holds.
pub fn remove_cgroups(group: &str) {
    let root = Path::new("/sys/fs/cgroup");
    let mut hierarchies = vec![root.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(root) {
        hierarchies.extend(entries.filter_map(|e| Some(e.ok()?.path())));
    }
    for hierarchy in hierarchies {
        let top = hierarchy.join(group);
        if top.is_dir() {
            remove_dirs_bottom_up(&top);
        }
    }
}

fn remove_dirs_bottom_up(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_dirs_bottom_up(&entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_line_with_odd_command_name() {
        let stat = "42 (a) b (c)) S 7 42 42 0 -1";
        assert_eq!(stat_fields(stat), Some(("S", 7)));
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\134c"), "/tmp/a b\\c");
        assert_eq!(unescape_mountinfo(r"/plain\0"), "/plain\\0");
    }

    #[test]
    fn daemon_is_stopped_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let daemon = Daemon::spawn("sleep", cmd, &dir.path().join("log")).unwrap();
        let pid = daemon.pid().unwrap() as i32;
        assert!(is_alive(pid));
        drop(daemon);
        assert!(!is_alive(pid));
    }

    #[test]
    fn orphaned_trees_are_found_by_args_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker").display().to_string();
        // A shell that forks a child and is then orphaned from us, like a shim.
        let status = Command::new("sh")
            .args([
                "-c",
                "sh -c 'sleep 600 & wait' -marker \"$0\" >/dev/null 2>&1 &",
                &marker,
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let mut roots = Vec::new();
        net_wait(|| {
            roots = pids_with_args(&["-marker", &marker]);
            !roots.is_empty()
        });
        assert_eq!(roots.len(), 1);
        let child = parent_map()
            .into_iter()
            .find(|(_, ppid)| *ppid == roots[0])
            .map(|(pid, _)| pid);
        kill_trees(&roots);
        assert!(!is_alive(roots[0]));
        if let Some(child) = child {
            assert!(!is_alive(child));
        }
    }

    fn net_wait(mut done: impl FnMut() -> bool) {
        crate::net::wait_until("test process", Duration::from_secs(5), || Ok(done())).unwrap();
    }
}
