//! Fetching one large blob as parallel range requests vs one GET, through a
//! relay that caps each connection's throughput the way object stores
//! behind registries do. Everything runs on loopback.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use pronto_registry::{ClientConfig, ParallelFetch, RegistryClient, Repository};
use pronto_testbed::{
    Compression, Content, ImageBuilder, Layer, OciLayout, Registry, Relay, RelayOptions,
};

#[derive(Debug, Parser)]
#[command(about = "Parallel range fetch vs a single GET of one blob")]
struct Args {
    /// Blob size in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Per-connection throughput cap in MiB/s.
    #[arg(long, default_value_t = 32)]
    cap_mib: u64,
    /// Range size in MiB for the parallel fetch.
    #[arg(long, default_value_t = 16)]
    chunk_mib: u64,
    /// Parallel fetches to measure, comma-separated concurrencies.
    #[arg(long, default_value = "4,8,16", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Runs per configuration.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::Builder::new().prefix("pronto-bench-").tempdir()?;
    let layout = OciLayout::create(&work.path().join("layout"))?;
    let image = ImageBuilder::new()
        .layer(
            Layer::new()
                .compression(Compression::None)
                .file("blob", Content::random(1, args.size_mib << 20)),
        )
        .build(&layout)?;
    layout.tag("v1", &image)?;
    let registry = Registry::start()?;
    registry.push(&layout, "v1", "bench/blob:v1")?;
    let relay = Relay::start_with(
        registry.addr(),
        RelayOptions {
            down_bytes_per_sec_per_connection: Some(args.cap_mib << 20),
            ..Default::default()
        },
    )?;
    let client = RegistryClient::new(ClientConfig::default())?;
    let repo = Repository::new(&relay.host(), "bench/blob");
    let layer = &image.layers[0];
    let out = work.path().join("out");

    println!("machine: {}", pronto_bench::machine());
    println!(
        "blob: {} MiB, per-connection cap {} MiB/s, ranges of {} MiB, {} runs each\n",
        args.size_mib, args.cap_mib, args.chunk_mib, args.repeat
    );
    println!("| mode | median | min | max | throughput (median) |");
    println!("|---|---|---|---|---|");

    let mut single = Vec::new();
    for _ in 0..args.repeat {
        let started = Instant::now();
        let mut file = tokio::fs::File::create(&out).await?;
        client
            .blob_to_writer(&repo, &layer.digest, layer.size, &mut file)
            .await
            .context("single GET")?;
        single.push(started.elapsed());
    }
    report("one GET", &single, layer.size);

    for &concurrency in &args.concurrency {
        let plan = ParallelFetch {
            chunk_size: args.chunk_mib << 20,
            concurrency,
            limits: Vec::new(),
        };
        let mut runs = Vec::new();
        for _ in 0..args.repeat {
            let started = Instant::now();
            client
                .blob_to_file_parallel(&repo, &layer.digest, layer.size, &out, plan.clone())
                .await
                .context("parallel fetch")?;
            runs.push(started.elapsed());
        }
        report(&format!("{concurrency} parallel ranges"), &runs, layer.size);
    }
    Ok(())
}

fn report(mode: &str, runs: &[Duration], bytes: u64) {
    let (median, min, max) = pronto_bench::summary(runs);
    println!(
        "| {mode} | {:.2} s | {:.2} s | {:.2} s | {:.0} MiB/s |",
        median.as_secs_f64(),
        min.as_secs_f64(),
        max.as_secs_f64(),
        bytes as f64 / (1 << 20) as f64 / median.as_secs_f64()
    );
}
