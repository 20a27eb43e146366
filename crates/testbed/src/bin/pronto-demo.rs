//! Pronto's main job on one machine: a real registry and a real containerd
//! on loopback, a generated ML-style image (a small userland plus large
//! incompressible model files), and a cold start measured from pull to the
//! workload's ready line, with the bytes the registry served counted by a
//! relay in front of it.
//!
//! Two rows: containerd's own pull into its overlayfs snapshotter (the
//! baseline), and the same image through containerd with Pronto's proxy
//! snapshotter, where indexed layers are mounted lazily.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use clap::Parser;
use pronto_testbed::{
    Containerd, ContainerdOptions, NodeConfig, OciLayout, Prereq, ProntoNode, Registry, Relay,
};

/// Cold-start demo: registry + containerd on loopback, generated image,
/// time and bytes from pull to ready.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Total size of the model files in the image, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Number of model files the size is split into.
    #[arg(long, default_value_t = 4)]
    files: u64,
    /// MiB the workload reads from the first model file before it is ready.
    #[arg(long, default_value_t = 4)]
    read_mib: u64,
    /// The pronto binary (for the lazy row); without it only containerd's
    /// pull is measured.
    #[arg(long)]
    pronto: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let missing: Vec<String> = Prereq::FULL_STACK
        .iter()
        .filter_map(|p| p.problem())
        .collect();
    ensure!(
        missing.is_empty(),
        "cannot run the demo: {}",
        missing.join("; ")
    );
    ensure!(args.files > 0, "--files must be at least 1");

    let work = tempfile::Builder::new().prefix("pronto-demo-").tempdir()?;
    let layout = OciLayout::create(&work.path().join("layout"))?;
    let started = Instant::now();
    let image =
        pronto_testbed::image::model_image(&layout, args.size_mib, args.files, args.read_mib)?;
    layout.tag("latest", &image)?;
    let size = image.layers_size();
    println!(
        "built image: {} layers, {} compressed, in {}",
        image.layers.len(),
        mib(size),
        secs(started.elapsed())
    );

    let registry = Registry::start()?;
    let started = Instant::now();
    registry.push(&layout, "latest", "demo/model:v1")?;
    println!(
        "registry on {}: pushed demo/model:v1 in {}",
        registry.host(),
        secs(started.elapsed())
    );
    let relay = Relay::start(registry.addr())?;
    let reference = format!("{}/demo/model:v1", relay.host());
    let containerd = Containerd::start_with(ContainerdOptions {
        plain_http_registries: vec![relay.host()],
        proxy_snapshotters: vec![("pronto".into(), work.path().join("pronto.sock"))],
        ..Default::default()
    })?;
    println!("containerd on {}", containerd.socket().display());

    println!("\ncold start with containerd's default pull (overlayfs snapshotter):");
    drop_page_cache();
    let started = Instant::now();
    containerd.pull(&reference, "overlayfs")?;
    let pulled = started.elapsed();
    let out = containerd.run(&reference, "overlayfs", &[])?;
    let ready = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.lines().any(|l| l == "ready"),
        "the workload did not report ready; it printed: {stdout}"
    );
    let fetched = relay.bytes_down();
    println!("  workload said: {}", stdout.trim().replace('\n', " | "));
    let mut rows = vec![format!(
        "| containerd overlayfs | {} | {} | {} | {:.0}% |",
        secs(pulled),
        secs(ready),
        mib(fetched),
        100.0 * fetched as f64 / size as f64
    )];

    if let Some(pronto) = &args.pronto {
        rows.push(lazy_start(
            pronto,
            work.path(),
            &containerd,
            &reference,
            &relay,
            size,
        )?);
    }
    println!();
    println!("| system | pull / mount | pull to ready | fetched from registry | share of image |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

/// The same workload started lazily through containerd: the image is
/// indexed once (as its owner would), `pronto serve` runs as containerd's
/// proxy snapshotter, `pronto pull` pulls through containerd, and the
/// container starts with `ctr run --snapshotter pronto`.
fn lazy_start(
    pronto: &std::path::Path,
    work: &std::path::Path,
    containerd: &Containerd,
    reference: &str,
    relay: &Relay,
    size: u64,
) -> Result<String> {
    let node = ProntoNode::new(
        &work.join("pronto"),
        pronto,
        &NodeConfig {
            root: Some(work.join("pronto-root")),
            address: Some(work.join("pronto.sock")),
            hosts_dir: Some(containerd.hosts_dir()),
            ..Default::default()
        },
    )?;
    let socket = node.socket();
    let run = |args: &[&str]| node.run(args);
    println!("\nindexing the image once (pronto index create --bind)...");
    run(&["index", "create", reference, "--bind"])?;
    let log = work.join("serve.log");
    let _keeper = node.keeper_guard();
    let mut serve = node.serve(&log, "info")?;
    println!(
        "pronto serve on {} (containerd proxy snapshotter \"pronto\")",
        socket.display()
    );
    println!(
        "cold start through containerd with Pronto (pronto pull, then ctr run --snapshotter pronto):"
    );
    drop_page_cache();
    relay.reset();
    let started = Instant::now();
    let pulled = run(&[
        "pull",
        "--address",
        &containerd.socket().to_string_lossy(),
        "--namespace",
        containerd.namespace(),
        reference,
    ])?;
    let pull_time = started.elapsed();
    println!("  {}", pulled.trim());
    let out = containerd.run(reference, "pronto", &[])?;
    let ready = started.elapsed();
    let fetched = relay.bytes_down();
    serve.stop();
    if std::env::var_os("PRONTO_DEMO_KEEP_LOG").is_some() {
        let _ = std::fs::copy(&log, "/tmp/pronto-demo-serve.log");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.lines().any(|l| l == "ready"),
        "the lazy workload did not report ready: {stdout}"
    );
    println!("  workload said: {}", stdout.trim().replace('\n', " | "));
    Ok(format!(
        "| Pronto lazy (containerd + pronto snapshotter) | {} | {} | {} | {:.1}% |",
        secs(pull_time),
        secs(ready),
        mib(fetched),
        100.0 * fetched as f64 / size as f64
    ))
}

/// Empties the kernel's page cache so that neither run reads the
/// registry's files from memory the other one left there.
fn drop_page_cache() {
    let _ = std::process::Command::new("sync").status();
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
        eprintln!("cannot drop the page cache: {e}");
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
