//! Command-line surface of `pronto`: global options and subcommands.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("100"), Ok(100));
        assert!(parse_size("4 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }
}

/// Pronto starts containers from large images in seconds: it mounts image
/// layers lazily and fetches file data on demand from any OCI registry.
#[derive(Debug, Parser)]
#[command(name = "pronto", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML) [default: /etc/pronto/config.toml].
    /// When the default file does not exist, built-in defaults apply; a file
    /// named here or in PRONTO_CONFIG must exist.
    #[arg(long, global = true, value_name = "FILE", env = "PRONTO_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log filter, as a level (`debug`) or per-module directives
    /// (`info,pronto_registry=debug`). Logs are written to stderr.
    #[arg(
        long,
        global = true,
        value_name = "FILTER",
        env = "PRONTO_LOG",
        default_value = "info"
    )]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show or check Pronto's configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Look at images in a registry.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Mount an image read-only over FUSE: all layers merged, or one layer
    /// in overlayfs lower-directory form. Files are fetched on demand.
    /// Runs until unmounted (`pronto umount DIR`, or SIGINT/SIGTERM).
    Mount {
        reference: String,
        dir: std::path::PathBuf,
        #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
        platform: String,
        /// Mount only this layer, with whiteouts as overlayfs expects them.
        #[arg(long, value_name = "DIGEST")]
        layer: Option<String>,
    },
    /// Run the containerd snapshotter (proxy plugin) on the `address`
    /// socket until SIGINT/SIGTERM. Indexed layers are mounted lazily;
    /// everything else behaves like containerd's overlayfs snapshotter.
    Serve,
    /// Hold the FUSE connections of `pronto serve`'s lazy mounts and its
    /// socket while the daemon restarts (started by `pronto serve` when
    /// none runs; see docs/operations.md). `--stop` asks a running keeper
    /// to exit, letting go of every mount no daemon serves.
    Keeper {
        #[arg(long)]
        stop: bool,
        /// The keeper's socket; default beside the daemon's `address`.
        #[arg(long)]
        socket: Option<std::path::PathBuf>,
    },
    /// Pull an image through containerd so that indexed layers are mounted
    /// lazily by `pronto serve` (what kubelet's pull does through CRI).
    /// Layers without an index are fetched in parallel and unpacked by
    /// containerd.
    Pull {
        reference: String,
        /// containerd's socket.
        #[arg(long, default_value = "/run/containerd/containerd.sock")]
        address: std::path::PathBuf,
        /// containerd namespace; `k8s.io` makes the image visible to
        /// Kubernetes.
        #[arg(long, short = 'n', default_value = "k8s.io")]
        namespace: String,
        /// The name of Pronto's proxy plugin in containerd's config.
        #[arg(long, default_value = "pronto")]
        snapshotter: String,
        #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
        platform: String,
    },
    /// Check this node: FUSE, the kernel, containerd's proxy-plugin and CRI
    /// settings, the snapshotter socket, and for REF the registry, the
    /// credentials and the index. One line per check, a fix for each
    /// failure; exit status 1 when something is wrong.
    Doctor {
        reference: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// containerd's configuration file.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        containerd_config: std::path::PathBuf,
        /// The FUSE device to check.
        #[arg(long, default_value = "/dev/fuse", hide = true)]
        fuse_device: std::path::PathBuf,
        #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
        platform: String,
    },
    /// Ask the running `pronto serve` what it has mounted lazily: per
    /// image, each layer's bytes on this node against its size and the
    /// background fetch's progress; also the cache and fallbacks.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Unmount a directory mounted by `pronto mount`, even with readers
    /// blocked in it.
    Umount { dir: std::path::PathBuf },
    /// Show or shrink the node cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// The startup profiles this node learned: which file ranges an
    /// image's containers read as they start, fetched ahead at later starts.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Set this node's containerd up for Pronto, or back as it was
    /// (what the Kubernetes DaemonSet runs; see docs/kubernetes.md).
    #[command(subcommand)]
    Node(NodeCommand),
    /// Create, list, inspect and remove the seekable indexes that let
    /// nodes start unmodified images lazily.
    #[command(subcommand)]
    Index(IndexCommand),
    /// Convert an image into its chunked form, registry to registry, every
    /// platform of a multi-platform image: each layer stays a tar+gzip
    /// (eStargz) or tar+zstd (zstd:chunked) layer that any runtime unpacks
    /// to the same tree, with file data in content-defined chunks and a
    /// table of contents, so Pronto reads it lazily with no index and
    /// fetches a chunk shared by images once. Pushed by digest, read back,
    /// then tagged.
    Convert {
        /// The image to convert.
        source: String,
        /// Where to push the converted image (a tag).
        target: String,
        /// Convert this platform only (default: every platform).
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
        #[command(flatten)]
        chunks: ChunkArgs,
    },
    /// Pack a directory into a one-layer image in the chunked form, pushed
    /// to a registry (as `nydusify pack` does): files, directories,
    /// symlinks, hard links, devices, modes, owners, times and extended
    /// attributes as they are. Pushed by digest, read back, then tagged.
    Pack {
        /// The directory to pack.
        dir: std::path::PathBuf,
        /// Where to push the image (a tag).
        #[arg(long)]
        target: String,
        /// The platform the image says it is for (default: this machine's).
        #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
        platform: Option<String>,
        #[command(flatten)]
        chunks: ChunkArgs,
    },
    /// Warm an image on this node now, through the running `pronto serve`:
    /// pulled lazily into containerd's namespace (`[warm] namespace`) and
    /// its startup set fetched (`--mode full`: every byte). Waits until it
    /// is warm and says what was fetched.
    Warm {
        /// The image, by tag or digest.
        reference: String,
        /// `lazy` (the startup set) or `full` (every byte).
        #[arg(long, default_value = "lazy", value_parser = ["lazy", "full"])]
        mode: String,
    },
    /// Take a registry's push notifications (its `notifications` webhook)
    /// and pass them on to the node daemons that follow this hub
    /// (`[warm] hub`), so that pushed images are warm on every node within
    /// seconds (see docs/warming.md).
    WarmHub {
        /// Where to listen, HOST:PORT.
        #[arg(long, default_value = "0.0.0.0:8090")]
        listen: std::net::SocketAddr,
        /// A file holding the token the registry must send as
        /// `Authorization: Bearer TOKEN`; without one, any notification
        /// is taken.
        #[arg(long)]
        token_file: Option<std::path::PathBuf>,
    },
}

/// How `pronto convert` and `pronto pack` cut and compress chunks.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct ChunkArgs {
    /// The average uncompressed size of a chunk of a file (64KiB to 4MiB).
    #[arg(long, default_value = "1MiB", value_parser = parse_chunk_size)]
    pub chunk_size: u64,
    /// How chunks are compressed: gzip (eStargz) or zstd (zstd:chunked).
    #[arg(long, value_enum, default_value_t = ChunkCompression::Gzip)]
    pub compression: ChunkCompression,
}

impl ChunkArgs {
    /// The options of the chunked layer writer.
    pub fn options(self) -> pronto_toc::WriteOptions {
        pronto_toc::WriteOptions {
            chunk_size: self.chunk_size,
            compression: self.compression.into(),
            level: None,
        }
    }
}

/// How `pronto convert` compresses chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChunkCompression {
    Gzip,
    Zstd,
}

impl From<ChunkCompression> for pronto_layer::Compression {
    fn from(c: ChunkCompression) -> Self {
        match c {
            ChunkCompression::Gzip => pronto_layer::Compression::Gzip,
            ChunkCompression::Zstd => pronto_layer::Compression::Zstd,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Every profile on this node: image manifest, starts merged, ranges
    /// and bytes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One profile: per layer, its ranges in first-read order. IMAGE is a
    /// reference (resolved in the registry) or a manifest digest.
    Show {
        image: String,
        #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
        platform: String,
        #[arg(long)]
        json: bool,
    },
    /// Start REF once through containerd and `pronto serve` (as a CI step
    /// would, after pushing the image), let the daemon record what its
    /// entrypoint reads until it goes quiet or `--time-limit` passes, and
    /// with `--push` store the profile in the registry as a referrer of the
    /// image, where every node finds it.
    Record(RecordArgs),
    /// Remove an image's profile from this node; its next start records a
    /// new one.
    Rm {
        image: String,
        #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
        platform: String,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct RecordArgs {
    pub reference: String,
    /// containerd's socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub address: std::path::PathBuf,
    /// containerd namespace the image is pulled into (and removed from
    /// afterwards).
    #[arg(long, short = 'n', default_value = "pronto-profile")]
    pub namespace: String,
    /// The container is stopped after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub time_limit: std::time::Duration,
    /// Push the profile to the image's repository.
    #[arg(long)]
    pub push: bool,
    #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
    pub platform: String,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Add Pronto's proxy plugin, CRI's snapshotter and
    /// `disable_snapshot_annotations = false` to containerd's
    /// configuration, keeping everything else in it and a backup of it,
    /// then restart containerd. Does nothing when all is set already.
    Install(NodeArgs),
    /// Put containerd's configuration back as it was before `install`
    /// (edits made since are kept) and restart containerd.
    Uninstall(NodeArgs),
    /// Keep this node's `pronto.dev/lazy-pull=true` label in step with
    /// the daemon: set while `pronto serve` answers, removed after
    /// `--failures` failed checks in a row and when this stops. With
    /// `--daemonset`, stopping because that DaemonSet was deleted (an
    /// uninstall, not an upgrade) also runs `pronto node uninstall`.
    Watch(WatchArgs),
}

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// This node's name (the downward API's `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// How often the daemon is asked.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub interval: std::time::Duration,
    /// Failed checks in a row before the label is removed.
    #[arg(long, default_value_t = 3)]
    pub failures: u32,
    /// The DaemonSet this runs in, as NAMESPACE/NAME.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pub daemonset: Option<String>,
    /// The API server; default: the cluster this pod runs in.
    #[arg(long, value_name = "URL", requires = "token_file")]
    pub api_server: Option<String>,
    /// The bearer token for `--api-server`.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub containerd: NodeArgs,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e}, e.g. \"10s\""))
}

#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// containerd's configuration file.
    #[arg(long, default_value = "/etc/containerd/config.toml")]
    pub containerd_config: std::path::PathBuf,
    /// containerd's socket, asked once it has restarted.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub containerd_address: std::path::PathBuf,
    /// The command that restarts containerd.
    #[arg(
        long,
        num_args = 1..,
        allow_hyphen_values = true,
        default_values = ["systemctl", "restart", "containerd"],
        value_name = "COMMAND"
    )]
    pub restart: Vec<String>,
    /// Run the restart command in the host's mount namespace (that of
    /// PID 1), as a pod with `hostPID` must to reach the host's systemd.
    #[arg(long)]
    pub host_namespaces: bool,
    /// Change the file only; containerd reads it when it next starts (for
    /// node images built with Pronto).
    #[arg(long, conflicts_with = "restart")]
    pub no_restart: bool,
}

/// Which platforms of an image a command works on.
#[derive(Debug, Clone, clap::Args)]
pub struct PlatformArgs {
    /// Platform of a multi-platform image.
    #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
    pub platform: String,
    /// Every platform of a multi-platform image.
    #[arg(long, conflicts_with = "platform")]
    pub all_platforms: bool,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Entries, bytes used and the budget.
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Evict cached data not in use, down to SIZE (default: everything).
    Prune {
        #[arg(long, default_value = "0", value_parser = parse_size)]
        to: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum IndexCommand {
    /// Build indexes for an image's layers. Each layer is downloaded once
    /// and indexed in one pass; the image itself is not changed. With
    /// --push the indexes are stored in the registry as a referrer of the
    /// image manifest; otherwise in the node's local store (under `root`).
    Create {
        reference: String,
        #[command(flatten)]
        platforms: PlatformArgs,
        /// Uncompressed bytes per span: the unit fetched on demand (at
        /// least 64KiB).
        #[arg(long, default_value = "4MiB", value_parser = parse_span_size)]
        span_size: u64,
        /// Layers smaller than this get no index and are fetched whole.
        #[arg(long, default_value = "10MiB", value_parser = parse_size)]
        min_layer_size: u64,
        /// Push the indexes to the image's repository as referrers of the
        /// image (used only by nodes whose `index.trust` accepts
        /// "referrers").
        #[arg(long, conflicts_with = "bind")]
        push: bool,
        /// Push the indexes and bind them to the image: the tag moves to an
        /// image index listing the unchanged image manifests and their
        /// indexes. Nodes use bound indexes by default.
        #[arg(long)]
        bind: bool,
    },
    /// List the index sets of an image, in the local store and the registry.
    List {
        reference: String,
        #[command(flatten)]
        platforms: PlatformArgs,
    },
    /// Show an index set per layer: spans, files and size overhead. Takes an
    /// image reference, or the digest of an index set in the local store.
    Inspect {
        #[arg(value_name = "REF|DIGEST")]
        target: String,
        #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
        platform: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove index sets of an image from the local store and the registry.
    Rm {
        reference: String,
        #[command(flatten)]
        platforms: PlatformArgs,
        /// Remove only this index set.
        #[arg(long, value_name = "DIGEST")]
        index: Option<String>,
    },
}

/// Parses sizes such as `4194304`, `4MiB`, `512k`, `1G`.
/// A span size: a size of at least 64 KiB, checked before anything is
/// downloaded.
fn parse_chunk_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if !(64 * 1024..=4 << 20).contains(&size) {
        return Err(format!("{text} is outside 64KiB to 4MiB"));
    }
    Ok(size)
}

fn parse_span_size(text: &str) -> Result<u64, String> {
    let size = parse_size(text)?;
    if size < 64 * 1024 {
        return Err(format!("{text} is below the 64KiB minimum span size"));
    }
    Ok(size)
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size (try 4MiB or 4194304)"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("unknown size unit {other:?} (use KiB, MiB or GiB)")),
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Show an image's platforms, layers, config and referrers, read from
    /// its registry (nothing is pulled). Credentials come from docker's
    /// config.json and its credential helpers.
    Inspect {
        /// Image reference; short names are normalised as containerd does
        /// (`busybox` is `docker.io/library/busybox:latest`).
        reference: String,
        /// Platform to show from a multi-platform image.
        #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
        platform: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (file values over defaults) as TOML.
    Show,
    /// Load the configuration and report whether it is valid.
    Check,
}
