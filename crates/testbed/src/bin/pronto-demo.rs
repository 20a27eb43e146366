//! Pronto's main job on one machine: a real registry and a real containerd
//! on loopback, a generated ML-style image (a small userland plus large
//! incompressible model files), and a cold start measured from pull to the
//! workload's ready line, with the bytes the registry served counted by a
//! relay in front of it.
//!
//! Until Pronto's lazy snapshotter lands, this measures containerd's own
//! pull (overlayfs snapshotter): the baseline Pronto is built to beat.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use pronto_testbed::{
    Compression, Containerd, ContainerdOptions, Content, Entry, ImageBuilder, Layer, OciLayout,
    Prereq, Registry, Relay,
};

/// Cold-start demo: registry + containerd on loopback, generated image,
/// time and bytes from pull to ready.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Total size of the model files in the image, in MiB.
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Number of model files the size is split into.
    #[arg(long, default_value_t = 4)]
    files: u64,
    /// MiB the workload reads from the first model file before it is ready.
    #[arg(long, default_value_t = 4)]
    read_mib: u64,
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
    let image = build_image(&args, &layout)?;
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
        ..Default::default()
    })?;
    println!("containerd on {}", containerd.socket().display());

    println!("\ncold start with containerd's default pull (overlayfs snapshotter):");
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
    println!();
    println!("| system | pull | pull to ready | fetched from registry | share of image |");
    println!("|---|---|---|---|---|");
    println!(
        "| containerd overlayfs | {} | {} | {} | {:.0}% |",
        secs(pulled),
        secs(ready),
        mib(fetched),
        100.0 * fetched as f64 / size as f64
    );
    Ok(())
}

/// A busybox userland, then one layer per model file: the shape of an
/// inference image whose weights dwarf its code.
fn build_image(args: &Args, layout: &OciLayout) -> Result<pronto_testbed::image::BuiltImage> {
    let file_size = args.size_mib * 1024 * 1024 / args.files;
    let mut builder = ImageBuilder::new().layer(
        Layer::busybox(&["sh", "head", "wc", "echo"])
            .dir("models")
            .file("etc/model.conf", "name=demo\n"),
    );
    for i in 0..args.files {
        builder = builder.layer(
            Layer::new().compression(Compression::FAST).entry(
                Entry::file(
                    format!("models/weights-{i}.bin"),
                    Content::random(i, file_size),
                )
                .mode(0o444),
            ),
        );
    }
    let script = format!(
        "head -c {} /models/weights-0.bin | wc -c; echo ready",
        args.read_mib * 1024 * 1024
    );
    builder
        .cmd(&["/bin/sh", "-c", &script])
        .build(layout)
        .context("build the demo image")
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
