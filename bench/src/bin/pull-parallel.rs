//! Pull-to-ready of an image without an index: containerd's default pull
//! (overlayfs snapshotter) against Pronto's parallel pull (`pronto serve`
//! fetching and unpacking the layers itself), through a relay that caps
//! each connection's throughput the way object stores behind registries do.
//!
//! Each run starts cold: the image and its content are removed from
//! containerd (with a synchronous garbage collection) and the page cache is
//! dropped. `--sweep` measures a grid of `[pull]` settings instead, to
//! choose the defaults.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use pronto_bench::{machine, summary};
use pronto_testbed::process::Daemon;
use pronto_testbed::{Containerd, ContainerdOptions, OciLayout, Registry, Relay, RelayOptions};

#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// The pronto binary.
    #[arg(long)]
    pronto: PathBuf,
    /// Total size of the image's data layers, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Number of data layers.
    #[arg(long, default_value_t = 4)]
    files: u64,
    /// Per-connection throughput cap of the relay, MiB/s.
    #[arg(long, default_value_t = 32)]
    cap_mib: u64,
    /// Runs per system (medians are reported).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Try a grid of download concurrency, chunk size and unpack
    /// concurrency for Pronto instead of comparing with containerd.
    #[arg(long)]
    sweep: bool,
}

#[derive(Debug, Clone)]
struct Settings {
    downloads_per_image: usize,
    chunk_mib: u64,
    unpacks_per_image: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::Builder::new().prefix("pronto-bench-").tempdir()?;
    let layout = OciLayout::create(&work.path().join("layout"))?;
    let image = pronto_testbed::image::model_image(&layout, args.size_mib, args.files, 4)?;
    layout.tag("v1", &image)?;
    let registry = Registry::start()?;
    registry.push(&layout, "v1", "bench/model:v1")?;
    let relay = Relay::start_with(
        registry.addr(),
        RelayOptions {
            down_bytes_per_sec_per_connection: Some(args.cap_mib << 20),
        },
    )?;
    let reference = format!("{}/bench/model:v1", relay.host());
    let socket = work.path().join("pronto.sock");
    let containerd = Containerd::start_with(ContainerdOptions {
        plain_http_registries: vec![relay.host()],
        proxy_snapshotters: vec![("pronto".into(), socket.clone())],
        ..Default::default()
    })?;
    println!("machine: {}", machine());
    println!(
        "image: {} layers, {:.0} MiB compressed, no index; relay caps each connection at {} MiB/s",
        image.layers.len(),
        image.layers_size() as f64 / (1 << 20) as f64,
        args.cap_mib
    );
    let bench = Bench {
        args: &args,
        work: work.path(),
        containerd: &containerd,
        relay: &relay,
        reference: &reference,
        socket: &socket,
    };
    println!("\n| system | settings | pull to ready, median (min–max) | fetched |");
    println!("|---|---|---|---|");
    if args.sweep {
        for downloads_per_image in [4, 8, 16, 32] {
            for chunk_mib in [8, 16, 32] {
                for unpacks_per_image in [1, 2, 4] {
                    bench.pronto(&Settings {
                        downloads_per_image,
                        chunk_mib,
                        unpacks_per_image,
                    })?;
                }
            }
        }
        return Ok(());
    }
    bench.containerd()?;
    bench.pronto(&Settings {
        downloads_per_image: 16,
        chunk_mib: 16,
        unpacks_per_image: 2,
    })?;
    Ok(())
}

struct Bench<'a> {
    args: &'a Args,
    work: &'a Path,
    containerd: &'a Containerd,
    relay: &'a Relay,
    reference: &'a str,
    socket: &'a Path,
}

impl Bench<'_> {
    fn containerd(&self) -> Result<()> {
        let mut times = Vec::new();
        let mut fetched = 0;
        for _ in 0..self.args.repeat {
            self.cold()?;
            let started = Instant::now();
            self.containerd.pull(self.reference, "overlayfs")?;
            self.ready("overlayfs")?;
            times.push(started.elapsed());
            fetched = self.relay.bytes_down();
        }
        self.row("containerd default (overlayfs)", "-", &times, fetched);
        Ok(())
    }

    fn pronto(&self, settings: &Settings) -> Result<()> {
        let config = self.work.join("pronto.toml");
        std::fs::write(
            &config,
            format!(
                "root = \"{}\"\naddress = \"{}\"\n[registry]\nhosts_dir = \"{}\"\n\
                 [pull]\nmax_concurrent_downloads_per_image = {}\n\
                 concurrent_download_chunk_size = \"{}MiB\"\nmax_concurrent_unpacks_per_image = {}\n",
                self.work.join("pronto-root").display(),
                self.socket.display(),
                self.containerd.hosts_dir().display(),
                settings.downloads_per_image,
                settings.chunk_mib,
                settings.unpacks_per_image,
            ),
        )?;
        let mut serve_cmd = Command::new(&self.args.pronto);
        serve_cmd.arg("--config").arg(&config).arg("serve");
        let log = self.work.join("serve.log");
        let mut serve = Daemon::spawn("pronto serve", serve_cmd, &log)?;
        pronto_testbed::net::wait_until("pronto serve", Duration::from_secs(60), || {
            ensure!(
                serve.is_running(),
                "pronto serve exited: {}",
                serve.log_tail(20)
            );
            Ok(serve
                .log_tail(20)
                .contains("serving containerd's snapshots API"))
        })?;
        let mut times = Vec::new();
        let mut fetched = 0;
        for _ in 0..self.args.repeat {
            self.cold()?;
            let started = Instant::now();
            let out = Command::new(&self.args.pronto)
                .arg("--config")
                .arg(&config)
                .args([
                    "pull",
                    "--namespace",
                    self.containerd.namespace(),
                    "--address",
                ])
                .arg(self.containerd.socket())
                .arg(self.reference)
                .output()?;
            ensure!(
                out.status.success(),
                "pronto pull: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            self.ready("pronto")?;
            times.push(started.elapsed());
            fetched = self.relay.bytes_down();
        }
        serve.stop();
        self.row(
            "Pronto parallel pull",
            &format!(
                "{} ranges × {} MiB, {} unpacks",
                settings.downloads_per_image, settings.chunk_mib, settings.unpacks_per_image
            ),
            &times,
            fetched,
        );
        Ok(())
    }

    /// Runs the image's workload and checks it printed `ready`.
    fn ready(&self, snapshotter: &str) -> Result<()> {
        let out = self.containerd.run(self.reference, snapshotter, &[])?;
        ensure!(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l == "ready"),
            "the workload did not report ready"
        );
        Ok(())
    }

    /// Removes every image (collecting its content and snapshots at once),
    /// drops the page cache and zeroes the relay's counters.
    fn cold(&self) -> Result<()> {
        let images = self.containerd.ctr_ok(&["images", "ls", "-q"])?;
        for name in images.lines().filter(|l| !l.is_empty()) {
            self.containerd
                .ctr_ok(&["images", "rm", "--sync", name])
                .with_context(|| format!("remove {name}"))?;
        }
        let _ = Command::new("sync").status();
        std::fs::write("/proc/sys/vm/drop_caches", "3").context("drop the page cache")?;
        self.relay.reset();
        Ok(())
    }

    fn row(&self, system: &str, settings: &str, times: &[Duration], fetched: u64) {
        let (median, min, max) = summary(times);
        println!(
            "| {system} | {settings} | {:.2} s ({:.2}–{:.2}) | {:.0} MiB |",
            median.as_secs_f64(),
            min.as_secs_f64(),
            max.as_secs_f64(),
            fetched as f64 / (1 << 20) as f64
        );
    }
}
