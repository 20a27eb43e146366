//! The system under measurement: Debian's registry behind a shaping relay
//! (and optionally a tc HTB bandwidth cap), containerd with Pronto's proxy
//! snapshotter, and `pronto serve`, all on loopback. Cold starts are timed
//! from the start of the pull to the workload's `ready` line, with the
//! bytes the registry served counted by the relay, outside the system.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use pronto_testbed::process::Daemon;
use pronto_testbed::{
    Containerd, ContainerdOptions, NodeConfig, OciLayout, ProntoNode, Registry, Relay, RelayOptions,
};

/// How the link to the registry is shaped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Link {
    /// Bandwidth of the registry's port (tc HTB on `lo`), Mbit/s.
    pub bandwidth_mbit: Option<u64>,
    /// Added to every request by the relay.
    pub latency: Option<Duration>,
    /// Throughput cap of each connection, MiB/s.
    pub per_connection_mib: Option<u64>,
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or = |v: Option<String>| v.unwrap_or_else(|| "none".into());
        write!(
            f,
            "bandwidth {}, latency {}, per-connection cap {}",
            or(self.bandwidth_mbit.map(|b| format!("{b} Mbit/s"))),
            or(self.latency.map(|l| format!("{} ms", l.as_millis()))),
            or(self.per_connection_mib.map(|c| format!("{c} MiB/s"))),
        )
    }
}

/// Bytes of disk the files under `dir` take (allocated blocks), on `dir`'s
/// own filesystem: mounts below it (the lazy layers) are not counted.
pub fn dir_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(top) = std::fs::metadata(dir) else {
        return 0;
    };
    let mut total = 0;
    let mut pending = vec![dir.to_owned()];
    while let Some(next) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&next) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.dev() != top.dev() {
                continue;
            }
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// Which system starts the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// `ctr images pull` into overlayfs, then `ctr run`.
    Containerd,
    /// `pronto pull` of the indexed image, then `ctr run --snapshotter pronto`.
    ProntoLazy,
    /// `pronto pull` of the same image without an index: Pronto's parallel
    /// pull.
    ProntoParallel,
    /// As `ProntoLazy`, with the startup profile an earlier (unmeasured)
    /// start of the image recorded on the node.
    ProntoProfile,
    /// `pronto warm` of the indexed image first (its startup set fetched
    /// ahead, as a node warmed on push or join), then as `ProntoLazy`.
    ProntoWarmed,
    /// `pronto pull` of the image converted by `pronto convert` (chunked,
    /// eStargz TOC, no index), then `ctr run --snapshotter pronto`.
    ProntoConverted,
    /// As `ProntoConverted`, converted with `--compression zstd`
    /// (zstd:chunked).
    ProntoConvertedZstd,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Containerd => "containerd default",
            System::ProntoLazy => "Pronto lazy",
            System::ProntoParallel => "Pronto parallel pull",
            System::ProntoProfile => "Pronto lazy + profile",
            System::ProntoConverted => "Pronto converted",
            System::ProntoConvertedZstd => "Pronto converted zstd",
            System::ProntoWarmed => "Pronto warmed",
        }
    }

    /// The name `cold-start --systems` takes.
    pub fn short_name(self) -> &'static str {
        match self {
            System::Containerd => "containerd",
            System::ProntoLazy => "lazy",
            System::ProntoParallel => "parallel",
            System::ProntoProfile => "profile",
            System::ProntoConverted => "converted",
            System::ProntoConvertedZstd => "converted-zstd",
            System::ProntoWarmed => "warmed",
        }
    }
}

/// One cold start.
#[derive(Debug, Clone)]
pub struct Sample {
    /// From the start of the pull to the workload's `ready`.
    pub ready: Duration,
    /// From the start of the pull to its end (the rest is the run).
    pub pulled: Duration,
    pub fetched: u64,
    /// `pronto pull`'s own account of its time ("resolve 0.02s, …").
    pub phases: Option<String>,
    /// For a warmed start: the warm before it.
    pub warm: Option<WarmSample>,
    /// Registry round trips of Pronto's start (`pronto pull`'s own and
    /// those of `pronto serve` from the pull to `ready`): requests sent
    /// while no other of the same process waited for its answer.
    pub round_trips: Option<u64>,
    /// The same pull and start again at once, with the image local and the
    /// page cache dropped (as before the measured start): what the start
    /// costs on this machine besides the registry (the puller, containerd,
    /// runc, the workload reading its files from the node's disk).
    pub again: Duration,
}

/// What warming an image cost before a start.
#[derive(Debug, Clone, Copy)]
pub struct WarmSample {
    pub took: Duration,
    /// Bytes fetched from the registry while warming.
    pub fetched: u64,
    /// Bytes under Pronto's root after warming (node cache, indexes,
    /// layers pulled whole, records).
    pub disk: u64,
}

/// Fields drop in order: containerd (and its mounts) first, the work
/// directory last.
#[derive(Debug)]
pub struct Stack {
    pub containerd: Containerd,
    pub relay: Relay,
    pub registry: Registry,
    pub layout: OciLayout,
    work: tempfile::TempDir,
    pronto: PathBuf,
    serve: Option<Daemon>,
    /// The keeper the first `pronto serve` starts outlives each daemon.
    keeper: Option<pronto_testbed::KeeperGuard>,
    pull_settings: String,
    shaped: bool,
    background: bool,
}

impl Stack {
    /// Starts the stack; `background` is Pronto's `fetch.background`.
    pub fn start(pronto: &Path, link: Link, background: bool) -> Result<Self> {
        let mut work = tempfile::Builder::new().prefix("pronto-bench-").tempdir()?;
        if std::env::var_os("PRONTO_BENCH_KEEP").is_some() {
            // For a look at the logs afterwards (serve.log, containerd's).
            work.disable_cleanup(true);
            println!("work directory (kept): {}", work.path().display());
        }
        let layout = OciLayout::create(&work.path().join("layout"))?;
        let registry = Registry::start()?;
        let relay = Relay::start_with(
            registry.addr(),
            RelayOptions {
                down_bytes_per_sec_per_connection: link.per_connection_mib.map(|m| m << 20),
                request_latency: link.latency,
            },
        )?;
        let containerd = Containerd::start_with(ContainerdOptions {
            plain_http_registries: vec![relay.host(), registry.host()],
            proxy_snapshotters: vec![("pronto".into(), work.path().join("pronto.sock"))],
            ..Default::default()
        })?;
        let mut stack = Self {
            containerd,
            relay,
            registry,
            layout,
            work,
            pronto: pronto.to_owned(),
            serve: None,
            keeper: None,
            pull_settings: String::new(),
            shaped: false,
            background,
        };
        if let Some(mbit) = link.bandwidth_mbit {
            stack.shape(mbit)?;
        }
        Ok(stack)
    }

    /// Caps what the registry sends (its source port) with tc HTB on `lo`.
    fn shape(&mut self, mbit: u64) -> Result<()> {
        let port = self.registry.addr().port().to_string();
        let rate = format!("{mbit}mbit");
        let tc = |args: &[&str]| -> Result<()> {
            let out = Command::new("tc").args(args).output().context("run tc")?;
            ensure!(
                out.status.success(),
                "tc {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            Ok(())
        };
        let _ = Command::new("tc")
            .args(["qdisc", "del", "dev", "lo", "root"])
            .output();
        tc(&["qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb"])?;
        self.shaped = true;
        tc(&[
            "class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", &rate,
            "ceil", &rate,
        ])?;
        tc(&[
            "filter", "add", "dev", "lo", "protocol", "ip", "parent", "1:0", "prio", "1", "u32",
            "match", "ip", "sport", &port, "0xffff", "flowid", "1:1",
        ])
    }

    /// Pronto's node for this stack, with `pull` as its `[pull]` table.
    fn node(&self, pull: &str) -> Result<ProntoNode> {
        let config = NodeConfig {
            root: Some(self.work.path().join("pronto-root")),
            address: Some(self.work.path().join("pronto.sock")),
            hosts_dir: Some(self.containerd.hosts_dir()),
            background: self.background,
            // `pronto warm` pulls through this stack's containerd.
            extra: format!(
                "[pull]\n{pull}\n[warm]\ncontainerd_address = {:?}\nnamespace = {:?}\n",
                self.containerd.socket(),
                self.containerd.namespace()
            ),
            ..Default::default()
        };
        ProntoNode::new(&self.work.path().join("pronto"), &self.pronto, &config)
    }

    pub fn work(&self) -> &Path {
        self.work.path()
    }

    /// `reference` (through the relay) as the registry's own address: for
    /// work that is not measured, such as converting an image.
    pub fn direct(&self, reference: &str) -> String {
        reference.replace(&self.relay.host(), &self.registry.host())
    }

    /// Runs `pronto ARGS` with this stack's configuration.
    pub fn pronto(&self, args: &[&str]) -> Result<String> {
        self.node(&self.pull_settings)?.run(args)
    }

    /// Pushes `tag` of the layout as `repo` and returns its reference
    /// through the relay.
    pub fn push(&self, tag: &str, repo: &str) -> Result<String> {
        self.registry.push(&self.layout, tag, repo)?;
        Ok(format!("{}/{repo}", self.relay.host()))
    }

    /// (Re)starts `pronto serve` with `pull` as its `[pull]` table, and
    /// waits until containerd talks to it.
    pub fn start_serve(&mut self, pull: &str) -> Result<()> {
        self.stop_serve();
        self.pull_settings = pull.to_owned();
        let log = self.work.path().join("serve.log");
        // Each daemon's log is kept, in order, in serve-history.log.
        if let Ok(text) = std::fs::read(&log) {
            use std::io::Write as _;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.work.path().join("serve-history.log"))?
                .write_all(&text)?;
        }
        let filter = std::env::var("PRONTO_BENCH_LOG").unwrap_or_else(|_| "info".into());
        let node = self.node(pull)?;
        let serve = node.serve(&log, &filter)?;
        self.keeper.get_or_insert_with(|| node.keeper_guard());
        self.serve = Some(serve);
        // containerd reconnects to a restarted plugin after its backoff
        // (a second or more): a pull timed before that would wait for it.
        // Listing snapshots or asking for a missing one is answered from
        // containerd's own records; preparing one reaches Pronto.
        pronto_testbed::net::wait_until("containerd reconnects", Duration::from_secs(30), || {
            let ctr = |args: &[&str]| self.containerd.ctr().args(args).output();
            let probe = "bench-connection-probe";
            let prepared = ctr(&["snapshots", "--snapshotter", "pronto", "prepare", probe])?;
            let _ = ctr(&["snapshots", "--snapshotter", "pronto", "rm", probe])?;
            Ok(prepared.status.success())
        })
    }

    pub fn stop_serve(&mut self) {
        if let Some(mut serve) = self.serve.take() {
            serve.stop();
        }
    }

    /// The running `pronto serve`'s process ID.
    pub fn serve_pid(&self) -> Option<u32> {
        self.serve.as_ref().and_then(|s| s.pid())
    }

    /// Everything cold: images removed from containerd with their content
    /// and snapshots, Pronto's node cache emptied, the page cache dropped,
    /// the relay's counters zeroed.
    pub fn cold(&mut self) -> Result<()> {
        self.cold_keeping(false)
    }

    /// [`Self::cold`], keeping the node's startup profiles when `profiles`
    /// (otherwise they go with the cache).
    pub fn cold_keeping(&mut self, profiles: bool) -> Result<()> {
        self.remove_images()?;
        let pronto_root = self.work.path().join("pronto-root");
        if self.serve.is_some() {
            self.stop_serve();
            let mut dirs = vec!["cache", "layers"];
            if !profiles {
                dirs.push("profiles");
            }
            for dir in dirs {
                let _ = std::fs::remove_dir_all(pronto_root.join(dir));
            }
            let pull = self.pull_settings.clone();
            self.start_serve(&pull)?;
        }
        let _ = Command::new("sync").status();
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache")?;
        self.relay.reset();
        Ok(())
    }

    /// Removes every image from containerd and waits until the
    /// snapshotters removed their snapshots (the daemon keeps running).
    pub fn remove_images(&mut self) -> Result<()> {
        let images = self.containerd.ctr_ok(&["images", "ls", "-q"])?;
        for name in images.lines().filter(|l| !l.is_empty()) {
            self.containerd
                .ctr_ok(&["images", "rm", "--sync", name])
                .with_context(|| format!("remove {name}"))?;
        }
        // Snapshotters remove the snapshots of collected images shortly
        // after; a leftover would make the next start warm.
        let pronto_root = self.work.path().join("pronto-root");
        let leftovers = [
            pronto_root.join("snapshotter/snapshots"),
            self.containerd
                .root_dir()
                .join("io.containerd.snapshotter.v1.overlayfs/snapshots"),
        ];
        pronto_testbed::net::wait_until("snapshots removed", Duration::from_secs(120), || {
            Ok(leftovers.iter().all(|dir| {
                std::fs::read_dir(dir)
                    .map(|mut entries| entries.next().is_none())
                    .unwrap_or(true)
            }))
        })?;
        Ok(())
    }

    /// One cold start of `reference` by `system`: pull, then run the
    /// image's command until it exits; it must print `ready`.
    pub fn cold_start(&mut self, system: System, reference: &str) -> Result<Sample> {
        self.cold_keeping(system == System::ProntoProfile)?;
        if system != System::ProntoWarmed {
            return self.start_image(system, reference);
        }
        let started = Instant::now();
        self.pronto(&["warm", reference])?;
        let warm = WarmSample {
            took: started.elapsed(),
            fetched: self.relay.bytes_down(),
            disk: dir_bytes(&self.work.path().join("pronto-root")),
        };
        self.relay.reset();
        let mut sample = self.start_image(system, reference)?;
        sample.warm = Some(warm);
        Ok(sample)
    }

    /// The round trips `pronto serve` has made since it started, from
    /// `pronto status --json`; `None` without a daemon.
    fn daemon_round_trips(&self) -> Option<u64> {
        let text = self.pronto(&["status", "--json"]).ok()?;
        let status: serde_json::Value = serde_json::from_str(&text).ok()?;
        status["registry"]["round_trips"].as_u64()
    }

    /// Starts `reference` once, unmeasured, so that the node records its
    /// startup profile (stored when the daemon stops at the next cold
    /// start, if not before).
    pub fn record_profile(&mut self, reference: &str) -> Result<()> {
        self.cold_keeping(false)?;
        self.start_image(System::ProntoLazy, reference)?;
        self.cold_keeping(true)?;
        let profiles = self.work.path().join("pronto-root/profiles");
        let recorded = std::fs::read_dir(&profiles)
            .map(|mut entries| entries.next().is_some())
            .unwrap_or(false);
        ensure!(recorded, "no startup profile was recorded for {reference}");
        // How the recorded start went in time, to judge `[profile] quiet`.
        let history =
            std::fs::read_to_string(self.work.path().join("serve-history.log")).unwrap_or_default();
        if let Some(line) = history
            .lines()
            .rev()
            .find(|l| l.contains("startup profile recorded"))
        {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or("?")
                    .to_owned()
            };
            println!(
                "  profile recorded: longest pause between reads {} ms, last read {} ms after the first mount, {} ranges",
                field("longest_gap_ms="),
                field("last_read_ms="),
                field("ranges=")
            );
        }
        Ok(())
    }

    /// One start of `reference` by `system` as things are (warm or cold):
    /// pull, then run the image's command until it exits; it must print
    /// `ready`. Then the same start again with the image local and the
    /// page cache dropped (see [`Sample::again`]).
    pub fn start_image(&mut self, system: System, reference: &str) -> Result<Sample> {
        let pronto = system != System::Containerd;
        let daemon_before = if pronto {
            self.daemon_round_trips()
        } else {
            None
        };
        let started = Instant::now();
        let pull = self.pull(system, reference)?;
        let pulled = started.elapsed();
        let out = self.containerd.run(reference, pull.snapshotter, &[])?;
        let ready = started.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !stdout.lines().any(|l| l.trim() == "ready") {
            bail!("{reference} did not print ready: {stdout}");
        }
        let fetched = self.relay.bytes_down();
        let round_trips = match (pull.round_trips, daemon_before, self.daemon_round_trips()) {
            (Some(own), Some(before), Some(after)) => Some(own + after.saturating_sub(before)),
            _ => None,
        };
        let _ = Command::new("sync").status();
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache")?;
        let again = Instant::now();
        let local = self.pull(system, reference)?;
        self.containerd.run(reference, local.snapshotter, &[])?;
        let again = again.elapsed();
        Ok(Sample {
            ready,
            pulled,
            fetched,
            phases: pull.phases,
            warm: None,
            round_trips,
            again,
        })
    }

    /// Pulls `reference` as `system` does: containerd's own pull, or
    /// `pronto pull`.
    fn pull(&mut self, system: System, reference: &str) -> Result<Pulled> {
        if system == System::Containerd {
            self.containerd.pull(reference, "overlayfs")?;
            return Ok(Pulled {
                snapshotter: "overlayfs",
                phases: None,
                round_trips: None,
            });
        }
        let node = self.node(&self.pull_settings)?;
        let pulled = node.output(&[
            "pull",
            "--namespace",
            self.containerd.namespace(),
            "--address",
            &self.containerd.socket().to_string_lossy(),
            reference,
        ]);
        let out = String::from_utf8_lossy(&pulled.stdout);
        if std::env::var_os("PRONTO_BENCH_LOG").is_some() {
            print!("{out}{}", String::from_utf8_lossy(&pulled.stderr));
        }
        ensure!(
            pulled.status.success(),
            "pronto pull {reference}: {}",
            String::from_utf8_lossy(&pulled.stderr)
        );
        Ok(Pulled {
            snapshotter: "pronto",
            phases: out
                .lines()
                .find_map(|l| l.strip_prefix("phases: "))
                .map(str::to_owned),
            round_trips: out
                .lines()
                .find_map(|l| l.strip_prefix("registry round trips: "))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok()),
        })
    }
}

/// What one pull said.
struct Pulled {
    snapshotter: &'static str,
    /// `pronto pull`'s phases line.
    phases: Option<String>,
    /// `pronto pull`'s own registry round trips.
    round_trips: Option<u64>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        // Mounts outlive a stopped daemon (the keeper holds them): the
        // images go first, so that the daemon unmounts their layers.
        if self.serve.is_some()
            && let Err(e) = self.remove_images()
        {
            eprintln!("cannot remove the benchmark's images: {e:#}");
        }
        self.stop_serve();
        if self.shaped {
            let _ = Command::new("tc")
                .args(["qdisc", "del", "dev", "lo", "root"])
                .output();
        }
    }
}
