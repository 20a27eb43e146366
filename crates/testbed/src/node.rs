//! A Pronto node for tests, benchmarks and the demo: a state directory with
//! its `config.toml`, the `pronto` binary run against it, and `pronto
//! serve` started and waited for the way an operator checks it — `pronto
//! status` answering over the daemon's Status RPC.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::net::wait_until;
use crate::process::{Daemon, mounts_below};

/// The settings a node's `config.toml` gets. Paths left unset lie in the
/// node's directory.
#[derive(Debug, Clone, Default)]
pub struct NodeConfig {
    /// `root`; default `DIR/root`.
    pub root: Option<PathBuf>,
    /// `address`, the snapshotter socket; default `DIR/pronto.sock`.
    pub address: Option<PathBuf>,
    /// `registry.hosts_dir` (containerd's `certs.d`); default `DIR/hosts`.
    pub hosts_dir: Option<PathBuf>,
    /// `metrics_address`; off when unset.
    pub metrics_address: Option<SocketAddr>,
    /// `fetch.background`.
    pub background: bool,
    /// More keys of the `[fetch]` table, one `key = value` a line.
    pub fetch: String,
    /// `index.trust`; Pronto's default when unset.
    pub trust: Option<Vec<String>>,
    /// More TOML after the tables above (new tables only).
    pub extra: String,
    /// `cri_address`: where the daemon serves CRI's image service.
    pub cri_address: Option<PathBuf>,
}

/// A node: a directory holding `config.toml`, `root/`, the snapshotter
/// socket and logs, and the `pronto` binary that runs against it.
#[derive(Debug)]
pub struct ProntoNode {
    dir: PathBuf,
    binary: PathBuf,
    root: PathBuf,
    socket: PathBuf,
}

impl ProntoNode {
    /// Sets up a node in `dir` (created if missing) for `binary` (a test's
    /// `env!("CARGO_BIN_EXE_pronto")`).
    pub fn new(dir: &Path, binary: &Path, config: &NodeConfig) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let node = Self {
            dir: dir.to_owned(),
            binary: binary.to_owned(),
            root: config.root.clone().unwrap_or_else(|| dir.join("root")),
            socket: config
                .address
                .clone()
                .unwrap_or_else(|| dir.join("pronto.sock")),
        };
        std::fs::write(node.config_path(), node.config_text(config))
            .with_context(|| format!("write {}", node.config_path().display()))?;
        Ok(node)
    }

    fn config_text(&self, config: &NodeConfig) -> String {
        let hosts = config
            .hosts_dir
            .clone()
            .unwrap_or_else(|| self.dir.join("hosts"));
        let mut text = format!(
            "root = \"{}\"\naddress = \"{}\"\n",
            self.root().display(),
            self.socket().display()
        );
        if let Some(metrics) = config.metrics_address {
            text.push_str(&format!("metrics_address = \"{metrics}\"\n"));
        }
        if let Some(cri) = &config.cri_address {
            text.push_str(&format!("cri_address = \"{}\"\n", cri.display()));
        }
        text.push_str(&format!(
            "[registry]\nhosts_dir = \"{}\"\n[fetch]\nbackground = {}\n{}",
            hosts.display(),
            config.background,
            config.fetch
        ));
        if let Some(trust) = &config.trust {
            let kinds: Vec<String> = trust.iter().map(|t| format!("{t:?}")).collect();
            text.push_str(&format!("[index]\ntrust = [{}]\n", kinds.join(", ")));
        }
        text.push_str(&config.extra);
        text
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// Pronto's `root`.
    pub fn root(&self) -> PathBuf {
        self.root.clone()
    }

    /// The snapshotter socket `pronto serve` listens on.
    pub fn socket(&self) -> PathBuf {
        self.socket.clone()
    }

    /// `pronto --config DIR/config.toml ARGS`, with docker's credentials
    /// looked up in the node's directory.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--config")
            .arg(self.config_path())
            .args(args)
            .env("DOCKER_CONFIG", &self.dir)
            .env_remove("PRONTO_CONFIG");
        cmd
    }

    /// Runs `pronto ARGS` to the end.
    pub fn output(&self, args: &[&str]) -> Output {
        self.command(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.display()))
    }

    /// Runs `pronto ARGS`; its standard output, or an error with its
    /// standard error when it failed.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command(args)
            .output()
            .with_context(|| format!("run {}", self.binary.display()))?;
        if !out.status.success() {
            bail!("pronto {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `pronto ARGS`, which must succeed; returns its standard output.
    pub fn ok(&self, args: &[&str]) -> String {
        self.run(args).unwrap_or_else(|e| panic!("{e:#}"))
    }

    /// The socket of the keeper `pronto serve` starts to hold its mounts
    /// across restarts.
    pub fn keeper_socket(&self) -> PathBuf {
        self.socket.with_extension("keeper.sock")
    }

    /// The process id of the node's keeper, while one runs.
    pub fn keeper_pid(&self) -> Option<i32> {
        keeper_pid(&self.keeper_socket())
    }

    /// Kills the node's keeper (SIGKILL, by its process id) and waits until
    /// it is gone: every mount no daemon serves is let go.
    pub fn kill_keeper(&self) {
        stop_keeper(&self.keeper_socket());
    }

    /// Stops the node's keeper when the guard is dropped.
    pub fn keeper_guard(&self) -> KeeperGuard {
        KeeperGuard {
            socket: self.keeper_socket(),
        }
    }

    /// Starts `pronto serve` logging to `log` at `log_filter`, and waits
    /// until `pronto status` gets an answer from it.
    pub fn serve(&self, log: &Path, log_filter: &str) -> Result<Daemon> {
        self.serve_with_env(log, log_filter, &[])
    }

    /// Like [`Self::serve`], with more environment variables.
    pub fn serve_with_env(
        &self,
        log: &Path,
        log_filter: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Daemon> {
        let mut cmd = self.command(&["serve"]);
        cmd.env("PRONTO_LOG", log_filter).envs(env.iter().copied());
        let mut daemon = Daemon::spawn("pronto serve", cmd, log)?;
        wait_until(
            "pronto serve answers status",
            Duration::from_secs(60),
            || {
                if !daemon.is_running() {
                    bail!("pronto serve exited:\n{}", daemon.log_tail(30));
                }
                Ok(self.output(&["status", "--json"]).status.success())
            },
        )?;
        Ok(daemon)
    }

    /// Runs `pronto mount REFERENCE DIR EXTRA…` in the background, logging
    /// to `DIR.log` at `log_filter`, and waits until the mount is there
    /// and `pronto mount` has said how it mounted the image.
    pub fn mount(
        &self,
        reference: &str,
        dir: &Path,
        extra: &[&str],
        log_filter: &str,
    ) -> Result<MountedImage> {
        std::fs::create_dir_all(dir)?;
        let mut cmd = self.command(&["mount", reference, &dir.to_string_lossy()]);
        cmd.args(extra).env("PRONTO_LOG", log_filter);
        let log = dir.with_extension("log");
        let mut daemon = Daemon::spawn("pronto mount", cmd, &log)?;
        wait_until("pronto mount", Duration::from_secs(60), || {
            if !daemon.is_running() {
                bail!("pronto mount exited:\n{}", daemon.log_tail(30));
            }
            Ok(!mounts_below(dir).is_empty() && daemon.log_tail(50).contains("layers lazy"))
        })?;
        Ok(MountedImage {
            dir: dir.to_owned(),
            daemon,
            umount: self.command(&["umount", &dir.to_string_lossy()]),
        })
    }
}

/// Stops a node's keeper (by its process id) when dropped: what a test
/// or benchmark that runs `pronto serve` holds for as long as it uses the
/// node, since the keeper outlives each `pronto serve`.
#[derive(Debug)]
pub struct KeeperGuard {
    socket: PathBuf,
}

impl Drop for KeeperGuard {
    fn drop(&mut self) {
        stop_keeper(&self.socket);
    }
}

/// Stops the keeper listening on `socket`, if one runs.
fn stop_keeper(socket: &Path) {
    let Some(pid) = keeper_pid(socket) else {
        return;
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    let _ = wait_until("the keeper to exit", Duration::from_secs(10), || {
        Ok(nix::sys::signal::kill(pid, None).is_err()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")))
    });
}

/// The keeper's process id: from its pid file, or, when that is gone
/// (the node's directory was removed first), from the processes'
/// command lines.
fn keeper_pid(socket: &Path) -> Option<i32> {
    let from_file = std::fs::read_to_string(socket.with_extension("pid"))
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())
        .filter(|pid| Path::new(&format!("/proc/{pid}")).exists());
    from_file.or_else(|| {
        let socket = socket.to_str()?;
        crate::process::pids_with_args(&["keeper", "--socket", socket])
            .into_iter()
            .next()
    })
}

/// A `pronto mount` running in the background; unmounted and stopped when
/// dropped.
#[derive(Debug)]
pub struct MountedImage {
    pub dir: PathBuf,
    pub daemon: Daemon,
    umount: Command,
}

impl MountedImage {
    /// Everything `pronto mount` has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.daemon.log_path()).unwrap_or_default()
    }
}

impl Drop for MountedImage {
    fn drop(&mut self) {
        let _ = self.umount.output();
        self.daemon.stop();
        for point in mounts_below(&self.dir) {
            let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
