//! `pronto node install|uninstall`: containerd's configuration on this
//! node. The file is edited, not rewritten (see
//! `pronto_containerd::node_config`); the original is kept beside it as
//! `config.toml.pronto-backup` (or `config.toml.pronto-absent` when there
//! was none) until `uninstall` puts it back. containerd is restarted only
//! when the file changed, and then asked until it lists Pronto's plugin.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use pronto_containerd::node_config::{self, ProntoPlugin};

use crate::cli::{NodeArgs, NodeCommand, WatchArgs};
use crate::config::Config;
use crate::kube::{ApiServer, LAZY_PULL_LABEL};

/// The proxy plugin's name in containerd's configuration.
pub const PLUGIN: &str = "pronto";

/// How long a restarted containerd has to answer.
const RESTART_WAIT: Duration = Duration::from_secs(60);

pub fn run(command: NodeCommand, config: &Config) -> Result<()> {
    let plugin = ProntoPlugin {
        name: PLUGIN.to_owned(),
        address: config
            .address
            .to_str()
            .context("Pronto's address is not UTF-8")?
            .to_owned(),
    };
    match command {
        NodeCommand::Install(args) => install(&args, &plugin),
        NodeCommand::Uninstall(args) => uninstall(&args, &plugin),
        NodeCommand::Watch(args) => {
            if watch(&args, config)? {
                tracing::info!(
                    "the DaemonSet was deleted: putting containerd's configuration back"
                );
                uninstall(&args.containerd, &plugin)?;
            }
            Ok(())
        }
    }
}

/// Checks between two label writes while the daemon is healthy, so that
/// a label removed by hand comes back.
const REASSERT_EVERY: u32 = 30;

/// Runs until SIGTERM or SIGINT, keeping the node label in step with the
/// daemon's health; returns whether the DaemonSet is gone (uninstall).
fn watch(args: &WatchArgs, config: &Config) -> Result<bool> {
    let runtime = super::runtime()?;
    let api = match &args.api_server {
        Some(url) => ApiServer::new(
            url,
            args.token_file.as_deref().context("--token-file")?,
            None,
        )?,
        None => ApiServer::in_cluster()?,
    };
    let daemonset = match &args.daemonset {
        Some(text) => Some(
            text.split_once('/')
                .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
                .with_context(|| format!("--daemonset {text:?} is not NAMESPACE/NAME"))?,
        ),
        None => None,
    };
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut tick = tokio::time::interval(args.interval);
        let (mut labelled, mut failed, mut checks) = (None::<bool>, 0u32, 0u32);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = term.recv() => break,
                _ = int.recv() => break,
            }
            checks += 1;
            // A daemon that stopped leaves its socket with the keeper:
            // connecting works, answering does not.
            let limit = args.interval.clamp(Duration::from_secs(1), Duration::from_secs(5));
            let health = match tokio::time::timeout(
                limit,
                pronto_snapshotter::status::query(&config.address),
            )
            .await
            {
                Ok(answer) => answer,
                Err(_) => Err(format!("no answer within {}s", limit.as_secs())),
            };
            match &health {
                Ok(_) => failed = 0,
                Err(problem) => {
                    failed += 1;
                    tracing::warn!(failed, "the daemon does not answer: {problem}");
                }
            }
            let want = match health {
                Ok(_) => Some(true),
                Err(_) if failed >= args.failures => Some(false),
                Err(_) => None,
            };
            if want == Some(true) && checks % REASSERT_EVERY == 0 {
                labelled = None;
            }
            if let Some(want) = want
                && labelled != Some(want)
            {
                match api
                    .set_node_label(&args.node, LAZY_PULL_LABEL, want.then_some("true"))
                    .await
                {
                    Ok(()) => {
                        if labelled != Some(want) {
                            tracing::info!(
                                node = %args.node,
                                "{LAZY_PULL_LABEL} {}",
                                if want { "set: the daemon is ready" } else { "removed: the daemon is not healthy" }
                            );
                        }
                        labelled = Some(want);
                    }
                    Err(e) => tracing::error!("cannot update the node label: {e:#}"),
                }
            }
        }
        tracing::info!("stopping: removing {LAZY_PULL_LABEL} from {}", args.node);
        if let Err(e) = api.set_node_label(&args.node, LAZY_PULL_LABEL, None).await {
            tracing::error!("cannot remove the node label: {e:#}");
        }
        match &daemonset {
            Some((namespace, name)) => api.daemonset_gone(namespace, name).await,
            None => Ok(false),
        }
    })
}

/// The files beside containerd's configuration that hold its original.
struct Backup {
    /// A copy of the original.
    copy: PathBuf,
    /// Present when there was no original file.
    absent: PathBuf,
}

impl Backup {
    fn of(config: &Path) -> Self {
        let name = config
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "config.toml".into());
        Self {
            copy: config.with_file_name(format!("{name}.pronto-backup")),
            absent: config.with_file_name(format!("{name}.pronto-absent")),
        }
    }

    /// The original: `Some(None)` when there was no file.
    fn read(&self) -> Result<Option<Option<String>>> {
        if self.absent.exists() {
            return Ok(Some(None));
        }
        Ok(read(&self.copy)?.map(Some))
    }

    fn write(&self, original: Option<&str>) -> Result<()> {
        match original {
            Some(text) => write_atomic(&self.copy, text, None),
            None => write_atomic(&self.absent, "", None),
        }
    }

    fn remove(&self) -> Result<()> {
        for path in [&self.copy, &self.absent] {
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("remove {}", path.display()));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn install(args: &NodeArgs, plugin: &ProntoPlugin) -> Result<()> {
    let path = &args.containerd_config;
    let original = read(path)?;
    let merged = node_config::merge(original.as_deref().unwrap_or(""), plugin)
        .with_context(|| format!("{} was left as it is", path.display()))?;
    if original.as_deref() == Some(merged.as_str()) {
        println!(
            "{} already has Pronto's settings; containerd was not restarted",
            path.display()
        );
        return Ok(());
    }
    let backup = Backup::of(path);
    // A backup from an earlier install is the true original: keep it.
    if backup.read()?.is_none() {
        backup.write(original.as_deref())?;
    }
    write_atomic(path, &merged, original.as_ref().map(|_| path.as_path()))?;
    println!(
        "{}: added Pronto's proxy plugin and CRI settings (original kept in {})",
        path.display(),
        if original.is_some() {
            backup.copy.display()
        } else {
            backup.absent.display()
        }
    );
    restart(args, true)
}

fn uninstall(args: &NodeArgs, plugin: &ProntoPlugin) -> Result<()> {
    let path = &args.containerd_config;
    let backup = Backup::of(path);
    let Some(current) = read(path)? else {
        println!("{} does not exist; nothing to undo", path.display());
        return backup.remove();
    };
    let original = backup.read()?;
    let restored = match &original {
        // Unchanged since install: the original, exactly.
        Some(before)
            if node_config::merge(before.as_deref().unwrap_or(""), plugin)
                .ok()
                .as_ref()
                == Some(&current) =>
        {
            before.clone()
        }
        // Edited since: Pronto's settings back to their old values only.
        Some(before) => Some(
            node_config::revert(&current, before.as_deref().unwrap_or(""), plugin)
                .with_context(|| format!("{} was left as it is", path.display()))?,
        ),
        None if node_config::is_configured(&current, plugin).unwrap_or(false) => Some(
            node_config::revert(&current, "", plugin)
                .with_context(|| format!("{} was left as it is", path.display()))?,
        ),
        None => {
            println!(
                "{} has no Pronto settings to remove; containerd was not restarted",
                path.display()
            );
            return Ok(());
        }
    };
    match &restored {
        Some(text) if *text == current => {
            println!("{} is as it was before Pronto", path.display());
            return backup.remove();
        }
        Some(text) => write_atomic(path, text, Some(path))?,
        None => std::fs::remove_file(path).with_context(|| format!("remove {}", path.display()))?,
    }
    backup.remove()?;
    println!("{}: Pronto's settings removed", path.display());
    restart(args, false)
}

fn read(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Writes `text` to `path` through a temporary file in the same directory
/// and a rename, so that containerd never reads half a file; with the
/// permissions of `like` when given.
fn write_atomic(path: &Path, text: &str, like: Option<&Path>) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("create a file in {}", dir.display()))?;
    file.write_all(text.as_bytes())?;
    let permissions = match like {
        Some(like) => std::fs::metadata(like)?.permissions(),
        None => std::os::unix::fs::PermissionsExt::from_mode(0o644),
    };
    file.as_file().set_permissions(permissions)?;
    file.as_file().sync_all()?;
    file.persist(path)
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// Restarts containerd and waits until it answers, listing Pronto's
/// plugin when `expect_plugin`.
fn restart(args: &NodeArgs, expect_plugin: bool) -> Result<()> {
    if args.no_restart {
        println!(
            "containerd was not restarted (--no-restart): it reads the file when it next starts"
        );
        return Ok(());
    }
    let Some((program, rest)) = args.restart.split_first() else {
        bail!("no restart command");
    };
    let mut command = std::process::Command::new(program);
    command.args(rest);
    if args.host_namespaces {
        enter_host_mount_namespace(&mut command)?;
    }
    let status = command
        .status()
        .with_context(|| format!("run `{}`", args.restart.join(" ")))?;
    if !status.success() {
        bail!("`{}` failed ({status})", args.restart.join(" "));
    }
    let runtime = super::runtime()?;
    let deadline = Instant::now() + RESTART_WAIT;
    let mut last = String::new();
    while Instant::now() < deadline {
        match runtime.block_on(lists_plugin(&args.containerd_address)) {
            Ok(listed) if listed || !expect_plugin => {
                println!("containerd restarted");
                return Ok(());
            }
            Ok(_) => last = format!("containerd does not list the proxy plugin {PLUGIN}"),
            Err(e) => last = format!("{e:#}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!(
        "containerd did not come back within {}s: {last}",
        RESTART_WAIT.as_secs()
    )
}

/// Whether containerd at `address` lists the snapshotter `pronto`.
async fn lists_plugin(address: &Path) -> Result<bool> {
    use containerd_client::services::v1::PluginsRequest;
    let channel = containerd_client::connect(address)
        .await
        .with_context(|| format!("connect to {}", address.display()))?;
    let mut client =
        containerd_client::services::v1::introspection_client::IntrospectionClient::new(channel);
    let plugins = client
        .plugins(PluginsRequest {
            filters: vec![format!("type==io.containerd.snapshotter.v1,id=={PLUGIN}")],
        })
        .await
        .context("list containerd's plugins")?
        .into_inner()
        .plugins;
    Ok(!plugins.is_empty())
}

/// Makes `command` run in PID 1's mount namespace, where the host's
/// `systemctl` and systemd's socket are.
fn enter_host_mount_namespace(command: &mut std::process::Command) -> Result<()> {
    use std::os::fd::AsFd;
    use std::os::unix::process::CommandExt;
    let ns = std::fs::File::open("/proc/1/ns/mnt")
        .context("open the host's mount namespace (/proc/1/ns/mnt; the pod needs hostPID)")?;
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setns(2), which is async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNS)
                .map_err(std::io::Error::from)
        });
    }
    Ok(())
}
