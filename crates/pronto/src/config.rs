//! Pronto's configuration file: TOML, every key optional, unknown keys and
//! invalid values rejected with a message that names them.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where `pronto` looks for its configuration when none is named.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/pronto/config.toml";

/// Default state directory: caches, indexes and snapshot metadata.
pub const DEFAULT_ROOT: &str = "/var/lib/pronto";

/// Default socket of `pronto serve`.
pub const DEFAULT_ADDRESS: &str = "/run/pronto/pronto.sock";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("configuration file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("configuration file {path}: key `{key}` {problem}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        problem: String,
    },
}

/// The settings Pronto runs with. Fields map one-to-one to TOML keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Pronto's state directory. Everything Pronto writes on a node lives
    /// below it.
    pub root: PathBuf,
    /// Unix socket where `pronto serve` answers containerd's snapshots API
    /// (created with mode 0600; containerd's `[proxy_plugins.pronto]`
    /// `address` must name it).
    pub address: PathBuf,
    /// `HOST:PORT` where `pronto serve` answers Prometheus scrapes on
    /// `/metrics`; empty turns the endpoint off.
    pub metrics_address: String,
    /// How Pronto talks to registries.
    pub registry: RegistryConfig,
    /// The node cache.
    pub cache: CacheConfig,
    /// Fetching of layer data.
    pub fetch: FetchConfig,
    /// Layers that cannot be lazy, fetched and unpacked by Pronto.
    pub pull: PullConfig,
    /// Which indexes this node uses.
    pub index: IndexConfig,
    /// The daemon's restarts.
    pub serve: ServeConfig,
    /// Unix socket where `pronto serve` also answers CRI's image service
    /// (kubelet's `--image-service-endpoint`), forwarding every call to
    /// containerd and keeping `PullImage`'s credentials in memory for the
    /// lazy fetches of those images; empty turns it off.
    pub cri_address: String,
    /// The CRI image service in front of containerd.
    pub cri: CriConfig,
    /// Startup profiles.
    pub profile: ProfileConfig,
    /// Images this node warms before pods ask for them.
    pub warm: WarmConfig,
}

/// The `[warm]` table: images made ready on this node ahead of their pods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WarmConfig {
    /// The warm set: references by tag or digest, each a string (lazy) or
    /// a table `{ image = "...", mode = "lazy" | "full" }`.
    pub images: Vec<WarmImage>,
    /// containerd's socket; images are pulled into `namespace` (kubelet's
    /// is `k8s.io`) with Pronto's snapshotter.
    pub containerd_address: PathBuf,
    pub namespace: String,
    /// The platform pulled, e.g. `linux/amd64`.
    pub platform: String,
    /// Without a startup profile, a lazy warm fetches the image's smallest
    /// files up to this many bytes.
    pub startup_bytes: String,
    /// Images warmed at once.
    pub concurrency: usize,
    /// Range requests per layer while warming.
    pub parallel: usize,
    /// A warm started by a push or a poll waits a random time up to this
    /// long first, so that many nodes do not ask the registry at once.
    pub jitter: String,
    /// How often each tag is checked for a new digest (a conditional
    /// request); `"0s"` turns polling off (push notifications only).
    pub poll_interval: String,
    /// How often the warm set is checked against containerd: an image
    /// removed or evicted (kubelet's image GC) is warmed again.
    pub check_interval: String,
    /// URL of the `pronto warm-hub` to take push notifications from;
    /// empty for none.
    pub hub: String,
    /// Remove the previous digest of a tag from containerd once the new
    /// one is warm (running containers keep what they use).
    pub release_previous: bool,
}

/// One image of the warm set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WarmImage {
    Reference(String),
    Table {
        image: String,
        #[serde(default = "lazy")]
        mode: String,
    },
}

fn lazy() -> String {
    "lazy".to_owned()
}

impl WarmImage {
    pub fn reference(&self) -> &str {
        match self {
            WarmImage::Reference(image) | WarmImage::Table { image, .. } => image,
        }
    }

    pub fn mode(&self) -> &str {
        match self {
            WarmImage::Reference(_) => "lazy",
            WarmImage::Table { mode, .. } => mode,
        }
    }
}

impl Default for WarmConfig {
    fn default() -> Self {
        Self {
            images: Vec::new(),
            containerd_address: PathBuf::from("/run/containerd/containerd.sock"),
            namespace: "k8s.io".to_owned(),
            platform: "linux/amd64".to_owned(),
            startup_bytes: "32MiB".to_owned(),
            concurrency: 2,
            parallel: 8,
            jitter: "2s".to_owned(),
            poll_interval: "0s".to_owned(),
            check_interval: "1m".to_owned(),
            hub: String::new(),
            release_previous: true,
        }
    }
}

impl WarmConfig {
    fn duration(text: &str) -> std::time::Duration {
        humantime::parse_duration(text).unwrap_or_default()
    }

    pub fn jitter(&self) -> std::time::Duration {
        Self::duration(&self.jitter)
    }

    /// `None`: polling is off.
    pub fn poll_interval(&self) -> Option<std::time::Duration> {
        Some(Self::duration(&self.poll_interval)).filter(|d| !d.is_zero())
    }

    pub fn check_interval(&self) -> std::time::Duration {
        Self::duration(&self.check_interval).max(std::time::Duration::from_secs(1))
    }

    pub fn startup_bytes(&self) -> u64 {
        crate::cli::parse_size(&self.startup_bytes).unwrap_or(32 << 20)
    }
}

/// The `[profile]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProfileConfig {
    /// Record which file ranges an image's first containers read at start.
    pub record: bool,
    /// Fetch those ranges ahead when the image's layers are mounted.
    pub prefetch: bool,
    /// A recording ends after this long without a new read, e.g. `"3s"`.
    pub quiet: String,
    /// ... or this long after the image's first layer was mounted.
    pub limit: String,
    /// Range requests in flight per layer while prefetching.
    pub parallel: usize,
    /// Starts recorded and merged into a profile.
    pub record_starts: u32,
    /// Look for a profile among the image's referrers in the registry
    /// when the node has none.
    pub fetch: bool,
    /// Push recorded profiles to the registry (needs push credentials).
    pub push: bool,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        Self {
            record: true,
            prefetch: true,
            quiet: "3s".to_owned(),
            limit: "60s".to_owned(),
            parallel: 8,
            record_starts: 3,
            fetch: true,
            push: false,
        }
    }
}

impl ProfileConfig {
    /// The options of the daemon's profiles (validated at load).
    pub fn options(&self) -> pronto_snapshotter::ProfileOptions {
        let duration = |text: &str, default: u64| {
            humantime::parse_duration(text).unwrap_or(std::time::Duration::from_secs(default))
        };
        pronto_snapshotter::ProfileOptions {
            record: self.record,
            prefetch: self.prefetch,
            quiet: duration(&self.quiet, 3),
            limit: duration(&self.limit, 60),
            parallel: self.parallel.max(1),
            record_starts: self.record_starts.max(1),
            fetch: self.fetch,
            push: self.push,
        }
    }
}

/// The `[cri]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CriConfig {
    /// containerd's socket, where CRI calls are forwarded.
    pub containerd_address: PathBuf,
    /// How long kubelet's pull credentials are kept after the last pull of
    /// an image of that repository, e.g. `"12h"`.
    pub credential_ttl: String,
}

impl Default for CriConfig {
    fn default() -> Self {
        Self {
            containerd_address: PathBuf::from("/run/containerd/containerd.sock"),
            credential_ttl: "12h".to_owned(),
        }
    }
}

impl CriConfig {
    /// [`Self::credential_ttl`] (validated when the configuration is
    /// loaded).
    pub fn credential_ttl(&self) -> std::time::Duration {
        humantime::parse_duration(&self.credential_ttl)
            .unwrap_or(std::time::Duration::from_secs(12 * 3600))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: PathBuf::from(DEFAULT_ROOT),
            address: PathBuf::from(DEFAULT_ADDRESS),
            metrics_address: String::new(),
            registry: RegistryConfig::default(),
            cache: CacheConfig::default(),
            fetch: FetchConfig::default(),
            pull: PullConfig::default(),
            index: IndexConfig::default(),
            serve: ServeConfig::default(),
            cri_address: String::new(),
            cri: CriConfig::default(),
            profile: ProfileConfig::default(),
            warm: WarmConfig::default(),
        }
    }
}

/// The `[serve]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// While `pronto serve` is down (restart, upgrade, crash), reads of
    /// lazy mounts wait for the next daemon; after this long without one
    /// they fail with EIO until one starts, e.g. `"60s"`.
    pub handover_timeout: String,
    /// Whether `pronto serve` starts the keeper when none runs. Off where
    /// something else runs it and it must outlive the daemon's container:
    /// in Kubernetes its own DaemonSet, which rolling updates of Pronto do
    /// not restart. The daemon then waits up to a minute for it.
    pub start_keeper: bool,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            handover_timeout: "60s".to_owned(),
            start_keeper: true,
        }
    }
}

impl ServeConfig {
    /// [`Self::handover_timeout`] (validated when the configuration is
    /// loaded).
    pub fn handover_timeout(&self) -> std::time::Duration {
        humantime::parse_duration(&self.handover_timeout)
            .unwrap_or(std::time::Duration::from_secs(60))
    }
}

/// The `[index]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IndexConfig {
    /// The indexes this node accepts: `bound` (listed in the image index
    /// next to the image, `pronto index create --bind`), `local` (built on
    /// this node) and `referrers` (found among the referrers of the image
    /// manifest: anyone who can push to the repository can add one, so
    /// this is an explicit opt-in).
    pub trust: Vec<String>,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            trust: vec!["bound".into(), "local".into()],
        }
    }
}

impl IndexConfig {
    /// The policy these settings describe (validated when loaded).
    pub fn trust(&self) -> pronto_catalog::IndexTrust {
        let kinds: Vec<pronto_catalog::Location> =
            self.trust.iter().filter_map(|t| t.parse().ok()).collect();
        pronto_catalog::IndexTrust::new(&kinds)
    }
}

/// The `[cache]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Disk space the node cache may use, e.g. `"20GiB"`. Data of open
    /// files is never evicted, so usage can exceed it while they are open.
    pub budget: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            budget: "20GiB".to_owned(),
        }
    }
}

impl CacheConfig {
    /// The budget in bytes (validated when the configuration is loaded).
    pub fn budget_bytes(&self) -> u64 {
        crate::cli::parse_size(&self.budget).unwrap_or(20 << 30)
    }
}

/// The `[fetch]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// After mounting, fetch the rest of each lazy layer in the background
    /// (pausing while on-demand reads run) and verify the whole layer.
    pub background: bool,
    /// Bandwidth cap of the background fetch per layer, per second, e.g.
    /// `"50MiB"`; `"0"` means no cap.
    pub background_rate: String,
    /// How long a read of a lazily mounted file may wait for the registry,
    /// retries included, before it fails with EIO, e.g. `"20s"`.
    pub read_timeout: String,
    /// How far ahead of a program reading a file in order (a model server
    /// loading its weights) Pronto fetches at most, e.g. `"64MiB"`; `"0"`
    /// turns read-ahead off.
    pub read_ahead: String,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            background: true,
            background_rate: "50MiB".to_owned(),
            read_timeout: "20s".to_owned(),
            read_ahead: "64MiB".to_owned(),
        }
    }
}

impl FetchConfig {
    /// [`Self::read_timeout`] (validated when the configuration is loaded).
    pub fn read_timeout(&self) -> std::time::Duration {
        humantime::parse_duration(&self.read_timeout).unwrap_or(std::time::Duration::from_secs(20))
    }

    /// [`Self::read_ahead`] in bytes (validated when the configuration is
    /// loaded).
    pub fn read_ahead(&self) -> u64 {
        crate::cli::parse_size(&self.read_ahead).unwrap_or(pronto_fs::DEFAULT_READ_AHEAD)
    }

    /// The cap in bytes per second; `None` for no cap.
    pub fn rate(&self) -> Option<u64> {
        crate::cli::parse_size(&self.background_rate)
            .ok()
            .filter(|r| *r > 0)
    }
}

/// The `[pull]` table: how layers that cannot be served lazily (no index,
/// or too small to have one) are fetched. Key names follow SOCI's parallel
/// pull mode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PullConfig {
    /// Pronto fetches such layers itself, with parallel range requests,
    /// unpacking several at once; `false` leaves them to containerd.
    pub parallel: bool,
    /// Range requests in flight on the node.
    pub max_concurrent_downloads: usize,
    /// Range requests in flight for one image.
    pub max_concurrent_downloads_per_image: usize,
    /// Bytes per range request, e.g. `"16MiB"`.
    pub concurrent_download_chunk_size: String,
    /// Layers being unpacked at once on the node.
    pub max_concurrent_unpacks: usize,
    /// Layers of one image being unpacked at once.
    pub max_concurrent_unpacks_per_image: usize,
    /// Delete a layer's compressed blob once it is unpacked.
    pub discard_unpacked_layers: bool,
    /// Free space an unpack leaves on the filesystem of `root`, e.g.
    /// `"1GiB"`; `"0"` turns the check off.
    pub min_free_space: String,
}

impl Default for PullConfig {
    fn default() -> Self {
        let d = pronto_snapshotter::PullSettings::default();
        Self {
            parallel: true,
            max_concurrent_downloads: d.max_concurrent_downloads,
            max_concurrent_downloads_per_image: d.max_concurrent_downloads_per_image,
            concurrent_download_chunk_size: format!(
                "{}MiB",
                d.concurrent_download_chunk_size >> 20
            ),
            max_concurrent_unpacks: d.max_concurrent_unpacks,
            max_concurrent_unpacks_per_image: d.max_concurrent_unpacks_per_image,
            discard_unpacked_layers: d.discard_unpacked_layers,
            min_free_space: format!("{}MiB", d.min_free_space >> 20),
        }
    }
}

impl PullConfig {
    /// The settings the snapshotter runs with (validated at load).
    pub fn settings(&self) -> pronto_snapshotter::PullSettings {
        pronto_snapshotter::PullSettings {
            max_concurrent_downloads: self.max_concurrent_downloads,
            max_concurrent_downloads_per_image: self.max_concurrent_downloads_per_image,
            concurrent_download_chunk_size: crate::cli::parse_size(
                &self.concurrent_download_chunk_size,
            )
            .unwrap_or(16 << 20),
            max_concurrent_unpacks: self.max_concurrent_unpacks,
            max_concurrent_unpacks_per_image: self.max_concurrent_unpacks_per_image,
            discard_unpacked_layers: self.discard_unpacked_layers,
            min_free_space: crate::cli::parse_size(&self.min_free_space).unwrap_or(1 << 30),
        }
    }
}

/// The `[registry]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Directory of containerd-style `<host>/hosts.toml` files (mirrors,
    /// plain HTTP, skip_verify). Defaults to containerd's own, so mirrors
    /// configured for containerd apply to Pronto as well.
    pub hosts_dir: PathBuf,
    /// Requests in flight to one registry at a time.
    pub max_concurrent_per_registry: usize,
    /// Docker `config.json` to read credentials from; unset means
    /// `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub docker_config: Option<PathBuf>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            hosts_dir: PathBuf::from("/etc/containerd/certs.d"),
            max_concurrent_per_registry: 32,
            docker_config: None,
        }
    }
}

/// A configuration together with where it came from, for messages.
#[derive(Debug)]
pub struct LoadedConfig {
    pub config: Config,
    /// The file it was read from, or `None` for built-in defaults.
    pub path: Option<PathBuf>,
}

impl LoadedConfig {
    /// Loads `explicit` if given (it must exist), else the default path if it
    /// exists, else the built-in defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Self, ConfigError> {
        let path = match explicit {
            Some(path) => path.to_path_buf(),
            None => {
                let default = PathBuf::from(DEFAULT_CONFIG_PATH);
                if !default.exists() {
                    return Ok(Self {
                        config: Config::default(),
                        path: None,
                    });
                }
                default
            }
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let config = Config::parse(&text, &path)?;
        Ok(Self {
            config,
            path: Some(path),
        })
    }

    /// Human-readable origin: the file path or "built-in defaults".
    pub fn source(&self) -> String {
        match &self.path {
            Some(path) => path.display().to_string(),
            None => "built-in defaults".to_owned(),
        }
    }
}

impl Config {
    /// The socket of the keeper that holds the daemon's mounts while it
    /// restarts: beside `address`.
    /// Where the node keeps startup profiles.
    pub fn profiles_dir(&self) -> PathBuf {
        self.root.join("profiles")
    }

    pub fn keeper_socket(&self) -> PathBuf {
        self.address.with_extension("keeper.sock")
    }

    /// The address of the metrics endpoint, `None` when it is off.
    pub fn metrics_socket(&self) -> Result<Option<std::net::SocketAddr>, String> {
        let text = self.metrics_address.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            format!("must be HOST:PORT with an IP address, like \"127.0.0.1:9746\", not {text:?}")
        })
    }

    /// Parses and validates TOML text; `path` is used only in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_error = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let document =
            toml::Deserializer::parse(text).map_err(|err| parse_error(err.message().to_owned()))?;
        // The path to the value that did not fit names the key.
        let config: Config = serde_path_to_error::deserialize(document).map_err(|err| {
            let key = err.path().to_string();
            let message = err.inner().message().to_owned();
            if key == "." {
                parse_error(message)
            } else {
                parse_error(format!("key `{key}`: {message}"))
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate_warm(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, problem| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            problem,
        };
        let warm = &self.warm;
        for image in &warm.images {
            if let Err(e) = pronto_registry::parse_reference(image.reference()) {
                return Err(invalid(
                    "warm.images",
                    format!("{:?}: {e}", image.reference()),
                ));
            }
            if !matches!(image.mode(), "lazy" | "full") {
                return Err(invalid(
                    "warm.images",
                    format!(
                        "{}: mode {:?} is neither \"lazy\" nor \"full\"",
                        image.reference(),
                        image.mode()
                    ),
                ));
            }
        }
        for (key, text) in [
            ("warm.jitter", &warm.jitter),
            ("warm.poll_interval", &warm.poll_interval),
            ("warm.check_interval", &warm.check_interval),
        ] {
            if let Err(e) = humantime::parse_duration(text) {
                return Err(invalid(key, format!("{e}, e.g. \"30s\"")));
            }
        }
        if let Err(problem) = crate::cli::parse_size(&warm.startup_bytes) {
            return Err(invalid("warm.startup_bytes", problem));
        }
        if let Err(e) = warm.platform.parse::<pronto_registry::Platform>() {
            return Err(invalid("warm.platform", e));
        }
        if warm.concurrency == 0 || warm.parallel == 0 {
            return Err(invalid(
                "warm.concurrency",
                "warm.concurrency and warm.parallel must be at least 1".into(),
            ));
        }
        if !warm.hub.is_empty()
            && !warm.hub.starts_with("http://")
            && !warm.hub.starts_with("https://")
        {
            return Err(invalid(
                "warm.hub",
                format!("{:?} is not an http:// or https:// URL", warm.hub),
            ));
        }
        if !warm.containerd_address.is_absolute() {
            return Err(invalid(
                "warm.containerd_address",
                format!(
                    "must be an absolute path, not {:?}",
                    warm.containerd_address
                ),
            ));
        }
        Ok(())
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key, problem| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            problem,
        };
        if !self.address.is_absolute() {
            return Err(invalid(
                "address",
                format!("must be an absolute path, not {:?}", self.address),
            ));
        }
        if !self.root.is_absolute() {
            return Err(invalid(
                "root",
                format!("must be an absolute path, not {:?}", self.root),
            ));
        }
        if !self.registry.hosts_dir.is_absolute() {
            return Err(invalid(
                "registry.hosts_dir",
                format!(
                    "must be an absolute path, not {:?}",
                    self.registry.hosts_dir
                ),
            ));
        }
        if let Some(path) = &self.registry.docker_config
            && !path.is_absolute()
        {
            return Err(invalid(
                "registry.docker_config",
                format!("must be an absolute path, not {path:?}"),
            ));
        }
        if let Err(problem) = self.metrics_socket() {
            return Err(invalid("metrics_address", problem));
        }
        if let Err(problem) = crate::cli::parse_size(&self.fetch.background_rate) {
            return Err(invalid("fetch.background_rate", problem));
        }
        for (key, text) in [
            ("profile.quiet", &self.profile.quiet),
            ("profile.limit", &self.profile.limit),
        ] {
            match humantime::parse_duration(text) {
                Err(e) => return Err(invalid(key, format!("{e}, e.g. \"3s\""))),
                Ok(d) if d.is_zero() => return Err(invalid(key, "must be more than 0".into())),
                Ok(_) => {}
            }
        }
        if self.profile.parallel == 0 {
            return Err(invalid("profile.parallel", "must be at least 1".into()));
        }
        match humantime::parse_duration(&self.cri.credential_ttl) {
            Err(e) => return Err(invalid("cri.credential_ttl", format!("{e}, e.g. \"12h\""))),
            Ok(d) if d.is_zero() => {
                return Err(invalid("cri.credential_ttl", "must be more than 0".into()));
            }
            Ok(_) => {}
        }
        if let Err(e) = humantime::parse_duration(&self.serve.handover_timeout) {
            return Err(invalid(
                "serve.handover_timeout",
                format!("{e}, e.g. \"60s\""),
            ));
        }
        if let Err(problem) = crate::cli::parse_size(&self.fetch.read_ahead) {
            return Err(invalid("fetch.read_ahead", problem));
        }
        match humantime::parse_duration(&self.fetch.read_timeout) {
            Err(e) => return Err(invalid("fetch.read_timeout", format!("{e}, e.g. \"20s\""))),
            Ok(d) if d.is_zero() => {
                return Err(invalid("fetch.read_timeout", "must be more than 0".into()));
            }
            Ok(_) => {}
        }
        if let Err(problem) = crate::cli::parse_size(&self.pull.min_free_space) {
            return Err(invalid("pull.min_free_space", problem));
        }
        if let Err(problem) = crate::cli::parse_size(&self.cache.budget) {
            return Err(invalid("cache.budget", problem));
        }
        match crate::cli::parse_size(&self.pull.concurrent_download_chunk_size) {
            Err(problem) => return Err(invalid("pull.concurrent_download_chunk_size", problem)),
            Ok(size) if size < 1 << 20 => {
                return Err(invalid(
                    "pull.concurrent_download_chunk_size",
                    "must be at least 1MiB".to_owned(),
                ));
            }
            Ok(_) => {}
        }
        for (key, value) in [
            (
                "pull.max_concurrent_downloads",
                self.pull.max_concurrent_downloads,
            ),
            (
                "pull.max_concurrent_downloads_per_image",
                self.pull.max_concurrent_downloads_per_image,
            ),
            (
                "pull.max_concurrent_unpacks",
                self.pull.max_concurrent_unpacks,
            ),
            (
                "pull.max_concurrent_unpacks_per_image",
                self.pull.max_concurrent_unpacks_per_image,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".to_owned()));
            }
        }
        for kind in &self.index.trust {
            if let Err(problem) = kind.parse::<pronto_catalog::Location>() {
                return Err(invalid("index.trust", problem));
            }
        }
        self.validate_warm(path)?;
        if self.registry.max_concurrent_per_registry == 0 {
            return Err(invalid(
                "registry.max_concurrent_per_registry",
                "must be at least 1".to_owned(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(Config::default().root, PathBuf::from("/var/lib/pronto"));
    }

    #[test]
    fn metrics_address_and_docker_config_are_checked() {
        assert_eq!(parse("").unwrap().metrics_socket(), Ok(None));
        let config = parse("metrics_address = \"127.0.0.1:9746\"\n").unwrap();
        assert_eq!(
            config.metrics_socket(),
            Ok(Some("127.0.0.1:9746".parse().unwrap()))
        );
        let err = parse("metrics_address = \"localhost\"\n").unwrap_err();
        assert!(err.to_string().contains("key `metrics_address`"), "{err}");
        let err = parse("[registry]\ndocker_config = \"config.json\"\n").unwrap_err();
        assert!(
            err.to_string().contains("key `registry.docker_config`"),
            "{err}"
        );
        let config = parse("[registry]\ndocker_config = \"/etc/pronto/docker.json\"\n").unwrap();
        assert_eq!(
            config.registry.docker_config,
            Some(PathBuf::from("/etc/pronto/docker.json"))
        );
    }

    #[test]
    fn pull_settings_are_validated_by_key() {
        let err = parse("[pull]\nmax_concurrent_unpacks = 0\n").unwrap_err();
        assert!(
            err.to_string().contains("pull.max_concurrent_unpacks"),
            "{err}"
        );
        let err = parse("[pull]\nconcurrent_download_chunk_size = \"4KiB\"\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("pull.concurrent_download_chunk_size"),
            "{err}"
        );
        let config =
            parse("[pull]\nconcurrent_download_chunk_size = \"32MiB\"\nparallel = false\n")
                .unwrap();
        assert_eq!(
            config.pull.settings().concurrent_download_chunk_size,
            32 << 20
        );
        assert!(!config.pull.parallel);
    }

    #[test]
    fn root_is_read() {
        let config = parse("root = \"/srv/pronto\"\n").unwrap();
        assert_eq!(config.root, PathBuf::from("/srv/pronto"));
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse("root = \"/x\"\nrooot = \"/y\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rooot"), "{err}");
        assert!(err.contains("test.toml"), "{err}");
    }

    #[test]
    fn wrong_type_is_reported() {
        let err = parse("root = 5\n").unwrap_err().to_string();
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("invalid type"), "{err}");
        let err = parse("[cache]\nbudget = 12\n").unwrap_err().to_string();
        assert!(err.contains("key `cache.budget`"), "{err}");
        let err = parse("[index]\ntrust = \"bound\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key `index.trust`"), "{err}");
        let err = parse("[index]\ntrust = [\"everyone\"]\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`index.trust`") && err.contains("everyone"),
            "{err}"
        );
    }

    #[test]
    fn relative_root_is_rejected_by_key() {
        let err = parse("root = \"var/pronto\"\n").unwrap_err().to_string();
        assert!(err.contains("`root`"), "{err}");
    }

    #[test]
    fn registry_table_is_read_and_checked() {
        let config = parse(
            "[registry]\nhosts_dir = \"/etc/pronto/hosts\"\nmax_concurrent_per_registry = 4\n",
        )
        .unwrap();
        assert_eq!(
            config.registry.hosts_dir,
            PathBuf::from("/etc/pronto/hosts")
        );
        assert_eq!(config.registry.max_concurrent_per_registry, 4);
        let err = parse("[registry]\nmax_concurrent_per_registry = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("registry.max_concurrent_per_registry"),
            "{err}"
        );
        let err = parse("[registry]\nmirrors = []\n").unwrap_err().to_string();
        assert!(err.contains("mirrors"), "{err}");
    }

    #[test]
    fn explicit_missing_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.toml");
        let err = LoadedConfig::load(Some(&missing)).unwrap_err().to_string();
        assert!(err.contains("nope.toml"), "{err}");
    }

    #[test]
    fn explicit_file_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, "root = \"/data/pronto\"\n").unwrap();
        let loaded = LoadedConfig::load(Some(&path)).unwrap();
        assert_eq!(loaded.config.root, PathBuf::from("/data/pronto"));
        assert_eq!(loaded.source(), path.display().to_string());
    }
}
