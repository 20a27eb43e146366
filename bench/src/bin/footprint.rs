//! The daemon's footprint: threads and resident memory of `pronto serve`
//! idle, with one image of many lazy layers mounted, and over a soak of
//! repeated starts and removals of that image (the daemon keeps running).
//! Run as root:
//!
//!   cargo run --release -p pronto-bench --bin footprint -- --pronto target/release/pronto

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use pronto_bench::stack::{Link, Stack, System};
use pronto_bench::{footprint, machine};
use pronto_testbed::{Compression, Content, Entry, ImageBuilder, Layer};

#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// The pronto binary.
    #[arg(long)]
    pronto: PathBuf,
    /// Lazy layers in the image.
    #[arg(long, default_value_t = 32)]
    layers: u64,
    /// Size of each layer's file, MiB.
    #[arg(long, default_value_t = 4)]
    layer_mib: u64,
    /// How long to keep starting and removing the image, minutes.
    #[arg(long, default_value_t = 10)]
    soak_minutes: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut stack = Stack::start(&args.pronto, Link::default(), true)?;
    println!("machine: {}", machine());
    let mut builder = ImageBuilder::new().layer(Layer::busybox(&["sh", "head", "cat", "echo"]));
    let mut script = String::new();
    for i in 0..args.layers {
        builder = builder.layer(
            Layer::new()
                .compression(Compression::FAST)
                .entry(Entry::file(
                    format!("data/layer-{i:03}.bin"),
                    Content::random(i, args.layer_mib << 20),
                )),
        );
        script.push_str(&format!(
            "head -c 65536 /data/layer-{i:03}.bin > /dev/null && "
        ));
    }
    script.push_str("echo ready");
    let image = builder
        .cmd(&["/bin/sh", "-c", &script])
        .build(&stack.layout)?;
    stack.layout.tag("many", &image)?;
    let reference = stack.push("many", "lazy/many:v1")?;
    stack.pronto(&[
        "index",
        "create",
        &reference,
        "--bind",
        "--min-layer-size",
        "1MiB",
    ])?;
    stack.start_serve("")?;
    let pid = stack.serve_pid().context("pronto serve runs")?;
    let idle = footprint(pid)?;
    stack.start_image(System::ProntoLazy, &reference)?;
    let mounted = footprint(pid)?;
    println!(
        "idle: {} threads, {} KiB RSS; {} lazy layers mounted: {} threads, {} KiB RSS",
        idle.0, idle.1, args.layers, mounted.0, mounted.1
    );
    let started = Instant::now();
    let mut rounds = 0;
    let mut samples = Vec::new();
    // `ctr run` loses the output of a task that exits right after
    // printing, now and then (containerd#770): a start whose container
    // exited 0 with no output is counted, not fatal. A failed read makes
    // the container's shell exit non-zero, which stays an error.
    let mut lost_output = 0;
    while started.elapsed() < Duration::from_secs(args.soak_minutes * 60) {
        stack.remove_images()?;
        match stack.start_image(System::ProntoLazy, &reference) {
            Ok(_) => {}
            Err(e) if e.to_string().ends_with("did not print ready: ") => {
                lost_output += 1;
                println!("round {}: ctr printed nothing (exit 0)", rounds + 1);
            }
            Err(e) => return Err(e),
        }
        rounds += 1;
        let now = footprint(pid)?;
        samples.push(now);
        println!(
            "round {rounds} ({:.0} s): {} threads, {} KiB RSS",
            started.elapsed().as_secs_f64(),
            now.0,
            now.1
        );
    }
    println!("starts whose output ctr lost: {lost_output} of {rounds}");
    let last = samples.last().copied().unwrap_or(mounted);
    let max_rss = samples.iter().map(|s| s.1).max().unwrap_or(mounted.1);
    println!(
        "\n| state | threads | RSS |\n|---|---|---|\n\
         | idle, nothing mounted | {} | {:.1} MiB |\n\
         | one image, {} lazy layers mounted | {} | {:.1} MiB |\n\
         | after {rounds} starts and removals ({} min), image mounted | {} | {:.1} MiB (max {:.1} MiB) |",
        idle.0,
        idle.1 as f64 / 1024.0,
        args.layers,
        mounted.0,
        mounted.1 as f64 / 1024.0,
        args.soak_minutes,
        last.0,
        last.1 as f64 / 1024.0,
        max_rss as f64 / 1024.0,
    );
    Ok(())
}
