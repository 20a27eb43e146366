//! Pull-to-ready of an image without an index: containerd's default pull
//! (overlayfs snapshotter) against Pronto's parallel pull (`pronto serve`
//! fetching and unpacking the layers itself), through a relay that caps
//! each connection's throughput the way object stores behind registries do.
//!
//! Each run starts cold (see `Stack::cold`). `--sweep` measures a grid of
//! `[pull]` settings instead, to choose the defaults.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use pronto_bench::stack::{Link, Sample, Stack, System};
use pronto_bench::{machine, summary};

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

fn main() -> Result<()> {
    let args = Args::parse();
    let mut stack = Stack::start(
        &args.pronto,
        Link {
            per_connection_mib: Some(args.cap_mib),
            ..Default::default()
        },
        // Whole layers only: nothing lazy to fetch in the background.
        false,
    )?;
    let image = pronto_testbed::image::model_image(&stack.layout, args.size_mib, args.files, 4)?;
    stack.layout.tag("v1", &image)?;
    let reference = stack.push("v1", "bench/model:v1")?;
    println!("machine: {}", machine());
    println!(
        "image: {} layers, {:.0} MiB compressed, no index; relay caps each connection at {} MiB/s",
        image.layers.len(),
        image.layers_size() as f64 / (1 << 20) as f64,
        args.cap_mib
    );
    println!("\n| system | settings | pull to ready, median (min–max) | fetched |");
    println!("|---|---|---|---|");
    // The defaults of `[pull]`.
    let mut grid = vec![(32, 8, 2)];
    if args.sweep {
        // Downloads and chunk size first, then unpacks at the default.
        grid = [4, 8, 16, 32]
            .into_iter()
            .flat_map(|d| [8, 16, 32].map(|c| (d, c, 2)))
            .chain([(16, 16, 1), (16, 16, 4)])
            .collect();
    } else {
        let samples = runs(&mut stack, System::Containerd, &reference, args.repeat)?;
        row("containerd default (overlayfs)", "-", &samples);
    }
    for (downloads, chunk_mib, unpacks) in grid {
        stack.start_serve(&format!(
            "max_concurrent_downloads_per_image = {downloads}\n\
             concurrent_download_chunk_size = \"{chunk_mib}MiB\"\n\
             max_concurrent_unpacks_per_image = {unpacks}"
        ))?;
        let samples = runs(&mut stack, System::ProntoParallel, &reference, args.repeat)?;
        row(
            "Pronto parallel pull",
            &format!("{downloads} ranges × {chunk_mib} MiB, {unpacks} unpacks"),
            &samples,
        );
    }
    Ok(())
}

fn runs(stack: &mut Stack, system: System, reference: &str, repeat: usize) -> Result<Vec<Sample>> {
    (0..repeat)
        .map(|_| stack.cold_start(system, reference))
        .collect()
}

fn row(system: &str, settings: &str, samples: &[Sample]) {
    let times: Vec<Duration> = samples.iter().map(|s| s.ready).collect();
    let (median, min, max) = summary(&times);
    let fetched = samples.last().map_or(0, |s| s.fetched);
    println!(
        "| {system} | {settings} | {:.2} s ({:.2}–{:.2}) | {:.0} MiB |",
        median.as_secs_f64(),
        min.as_secs_f64(),
        max.as_secs_f64(),
        fetched as f64 / (1 << 20) as f64
    );
}
