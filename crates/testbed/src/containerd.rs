//! A private `containerd` (Debian's 1.6) with its own root, state, socket
//! and configuration, optionally with Pronto's proxy snapshotter and the CRI
//! settings Kubernetes nodes use, plus `ctr` helpers to pull and run.
//!
//! Dropping it kills the shims of its containers (they outlive containerd),
//! stops containerd, unmounts what is left below its directory and removes
//! the cgroups of its namespace.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::net::wait_until;
use crate::process::{Daemon, kill_trees, pids_with_args, remove_cgroups, unmount_below};

/// The CRI plugin's settings, as a Kubernetes node running Pronto has them.
#[derive(Debug, Clone)]
pub struct CriOptions {
    /// `plugins."io.containerd.grpc.v1.cri".containerd.snapshotter`; empty
    /// to leave that table to `ContainerdOptions::extra_config`.
    pub snapshotter: String,
    /// The pod sandbox ("pause") image reference. The harness builds it
    /// locally; see [`Containerd::import`].
    pub sandbox_image: String,
}

#[derive(Debug, Clone, Default)]
pub struct ContainerdOptions {
    /// `[proxy_plugins.NAME] type = "snapshot", address = SOCKET`.
    pub proxy_snapshotters: Vec<(String, PathBuf)>,
    /// Enable the CRI plugin with these settings; `None` disables it, which
    /// makes containerd start faster.
    pub cri: Option<CriOptions>,
    /// Registries (`host:port`) reached over plain HTTP, written as
    /// `hosts.toml` files that both CRI and `ctr --hosts-dir` read.
    pub plain_http_registries: Vec<String>,
    /// TOML appended to the configuration as is (e.g. an install snippet).
    pub extra_config: String,
    /// Run containerd under a supervisor that starts it again whenever it
    /// exits, as systemd does on a node; see [`Containerd::restart_command`].
    pub supervised: bool,
}

/// A running containerd. Each instance uses its own namespace for `ctr`,
/// so containers of parallel tests never share cgroup paths.
#[derive(Debug)]
pub struct Containerd {
    daemon: Daemon,
    namespace: String,
    dir: TempDir,
}

static INSTANCE: AtomicU64 = AtomicU64::new(0);

impl Containerd {
    pub fn start() -> Result<Self> {
        Self::start_with(ContainerdOptions::default())
    }

    pub fn start_with(options: ContainerdOptions) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("pronto-containerd-")
            .tempdir()?;
        let hosts_dir = dir.path().join("certs.d");
        for host in &options.plain_http_registries {
            let host_dir = hosts_dir.join(host);
            std::fs::create_dir_all(&host_dir)?;
            std::fs::write(
                host_dir.join("hosts.toml"),
                format!(
                    "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\", \"push\"]\n"
                ),
            )?;
        }
        std::fs::create_dir_all(dir.path().join("cni"))?;
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml(dir.path(), &options))?;
        let mut command = Command::new("containerd");
        command.arg("--config").arg(&config);
        if options.supervised {
            command = supervisor(&config, &dir.path().join("containerd.pid"));
        }
        let daemon = Daemon::spawn("containerd", command, &dir.path().join("containerd.log"))?;
        let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
        let mut containerd = Self {
            daemon,
            namespace: format!("pronto-test-{}-{n}", std::process::id()),
            dir,
        };
        containerd.wait_ready()?;
        Ok(containerd)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let socket = self.socket();
        let daemon = &mut self.daemon;
        wait_until("containerd", Duration::from_secs(30), || {
            if !daemon.is_running() {
                bail!("containerd exited:\n{}", daemon.log_tail(30));
            }
            if !socket.exists() {
                return Ok(false);
            }
            let out = Command::new("ctr")
                .arg("--address")
                .arg(&socket)
                .arg("version")
                .output()?;
            Ok(out.status.success())
        })
    }

    /// PID of the containerd process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        match std::fs::read_to_string(self.pid_file()) {
            Ok(pid) => pid.trim().parse().ok(),
            Err(_) => self.daemon.pid(),
        }
    }

    /// Written by the supervisor of a supervised containerd.
    fn pid_file(&self) -> PathBuf {
        self.dir.path().join("containerd.pid")
    }

    /// The configuration file containerd reads at start.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    /// A command that restarts a supervised containerd the way
    /// `systemctl restart containerd` does: it stops containerd, waits
    /// until it has exited, and the supervisor starts it again.
    pub fn restart_command(&self) -> Vec<String> {
        let pid_file = self.pid_file();
        vec![
            "sh".into(),
            "-c".into(),
            format!(
                "pid=$(cat {0}); kill $pid; while kill -0 $pid 2>/dev/null; do sleep 0.05; done; \
                 while [ \"$(cat {0})\" = \"$pid\" ]; do sleep 0.05; done",
                pid_file.display()
            ),
        ]
    }

    /// The temporary directory holding everything of this instance.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// The containerd namespace `ctr` commands of this instance use.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The directory holding `<host>/hosts.toml` registry settings.
    pub fn hosts_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    /// containerd's `root` (content store, snapshots, metadata).
    pub fn root_dir(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.daemon.log_tail(lines)
    }

    /// `ctr --address SOCKET --namespace NS`, ready for more arguments.
    pub fn ctr(&self) -> Command {
        self.ctr_in(&self.namespace)
    }

    /// `ctr` in another namespace, such as `k8s.io`.
    pub fn ctr_in(&self, namespace: &str) -> Command {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(namespace);
        command
    }

    /// Runs `ctr ARGS` in this instance's namespace; fails with ctr's
    /// stderr unless it exits 0. Returns stdout.
    pub fn ctr_ok(&self, args: &[&str]) -> Result<String> {
        let mut command = self.ctr();
        command.args(args);
        let out = command.output().context("run ctr")?;
        check_output(&format!("ctr {}", args.join(" ")), &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Pulls (fetches and unpacks) `reference` with containerd's own
    /// puller into `snapshotter`.
    pub fn pull(&self, reference: &str, snapshotter: &str) -> Result<()> {
        let hosts_dir = self.hosts_dir();
        self.ctr_ok(&[
            "images",
            "pull",
            "--snapshotter",
            snapshotter,
            "--hosts-dir",
            path_str(&hosts_dir)?,
            reference,
        ])
        .map(drop)
    }

    /// Imports an OCI archive (see [`crate::OciLayout::write_archive`])
    /// into `namespace`, unpacked for `snapshotter`. Its images are named
    /// `BASE_NAME:TAG` after the layout's names.
    pub fn import(
        &self,
        namespace: &str,
        archive: &Path,
        base_name: &str,
        snapshotter: &str,
    ) -> Result<()> {
        let out = self
            .ctr_in(namespace)
            .args(["images", "import", "--base-name", base_name])
            .args(["--snapshotter", snapshotter])
            .arg(archive)
            .output()
            .context("run ctr images import")?;
        check_output("ctr images import", &out)
    }

    /// Runs a container from `image` to completion with
    /// `ctr run --rm` and returns its output; `args` replace the image's
    /// command when not empty. Fails if the container exits non-zero.
    pub fn run(&self, image: &str, snapshotter: &str, args: &[&str]) -> Result<Output> {
        let id = format!("c{}", INSTANCE.fetch_add(1, Ordering::Relaxed));
        let started = Instant::now();
        let out = self
            .ctr()
            .args(["run", "--rm", "--snapshotter", snapshotter, image, &id])
            .args(args)
            .output()
            .context("run ctr run")?;
        check_output(
            &format!(
                "container {id} from {image} (after {:?})",
                started.elapsed()
            ),
            &out,
        )?;
        Ok(out)
    }

    /// Stops containerd and everything it started; also done on drop.
    pub fn stop(&mut self) {
        let socket = self.socket();
        let shims = pids_with_args(&["-address", path_str(&socket).unwrap_or_default()]);
        kill_trees(&shims);
        self.daemon.stop();
        let stuck = unmount_below(self.dir.path());
        if !stuck.is_empty() {
            eprintln!(
                "could not unmount below {}: {stuck:?}",
                self.dir.path().display()
            );
        }
        remove_cgroups(&self.namespace);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str()
        .with_context(|| format!("path {} is not UTF-8", path.display()))
}

fn check_output(what: &str, out: &Output) -> Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// `containerd --config CONFIG` in a loop, its PID in `pid_file`; SIGTERM
/// stops the loop and containerd.
fn supervisor(config: &Path, pid_file: &Path) -> Command {
    let mut command = Command::new("sh");
    command.arg("-c").arg(format!(
        "trap 'kill $child; wait $child; exit 0' TERM; \
         while :; do containerd --config '{}' & child=$!; echo $child > '{}'; wait $child; done",
        config.display(),
        pid_file.display()
    ));
    command
}

/// containerd's config (version 2, read by containerd 1.6 and 1.7). Every
/// path is below `dir` and every listener is a unix socket or loopback.
fn config_toml(dir: &Path, options: &ContainerdOptions) -> String {
    let d = dir.display();
    let mut disabled = vec![
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.snapshotter.v1.btrfs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
    ];
    if options.cri.is_none() {
        disabled.push("io.containerd.grpc.v1.cri");
    }
    let mut toml = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = {disabled:?}

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[debug]
  address = ""
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#
    );
    for (name, socket) in &options.proxy_snapshotters {
        toml.push_str(&format!(
            "\n[proxy_plugins.{name}]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            socket.display()
        ));
    }
    if let Some(cri) = &options.cri {
        toml.push_str(&format!(
            r#"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false

{containerd_table}
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "/usr/lib/cni"
  conf_dir = "{d}/cni"

[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "{d}/certs.d"
"#,
            sandbox = cri.sandbox_image,
            // An empty snapshotter leaves the table to `extra_config`.
            containerd_table = if cri.snapshotter.is_empty() {
                String::new()
            } else {
                format!(
                    "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"{}\"\n  disable_snapshot_annotations = false\n",
                    cri.snapshotter
                )
            },
        ));
    }
    toml.push_str(&options.extra_config);
    toml
}
