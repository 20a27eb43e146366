//! The next version of an image on a node that ran the last one: what
//! each system fetches and how soon it is ready. Version 2 of an app has
//! 100 bytes inserted in the middle of its weights and 1 in 100 of its
//! small files changed; its start reads every weight and every small file.
//! containerd fetches the changed layer again whole, Pronto lazy (an index
//! per layer) fetches what the start reads again, Pronto converted fetches
//! only the chunks whose content changed. Run it as docs/benchmarks.md
//! says ("The next version of an image").

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use pronto_bench::stack::{Link, Sample, Stack, System};
use pronto_bench::{machine, write_markdown};
use pronto_testbed::image::BuiltImage;
use pronto_testbed::{Compression, Content, ImageBuilder, Layer, OciLayout};

#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// The pronto binary.
    #[arg(long)]
    pronto: PathBuf,
    /// Size of the weights file, MiB.
    #[arg(long, default_value_t = 512)]
    weights_mib: usize,
    /// Runs per system.
    #[arg(long, default_value_t = 2)]
    repeat: usize,
    /// Bandwidth of the registry's port, Mbit/s (tc HTB on lo); 0 for none.
    #[arg(long, default_value_t = 1000)]
    bandwidth_mbit: u64,
    /// Latency added to every registry request, ms; 0 for none.
    #[arg(long, default_value_t = 10)]
    latency_ms: u64,
    /// Throughput cap of each registry connection, MiB/s; 0 for none.
    #[arg(long, default_value_t = 32)]
    per_connection_mib: u64,
    /// The markdown file whose next-version section is replaced.
    #[arg(long, default_value = "docs/benchmarks.md")]
    markdown: PathBuf,
}

/// Small files in the app layer, and one in this many changes in v2.
const SMALL_FILES: usize = 2000;
const CHANGED_EVERY: usize = 100;

fn main() -> Result<()> {
    let args = Args::parse();
    let nonzero = |v: u64| (v > 0).then_some(v);
    let link = Link {
        bandwidth_mbit: nonzero(args.bandwidth_mbit),
        latency: nonzero(args.latency_ms).map(Duration::from_millis),
        per_connection_mib: nonzero(args.per_connection_mib),
    };
    let mut stack = Stack::start(&args.pronto, link, true)?;
    println!("machine: {}", machine());
    println!("link: {link}");
    let v1 = app(&stack.layout, args.weights_mib, 1)?;
    let v2 = app(&stack.layout, args.weights_mib, 2)?;
    stack.layout.tag("app-v1", &v1)?;
    stack.layout.tag("app-v2", &v2)?;
    let mut references = Vec::new();
    for (tag, image) in [("v1", &v1), ("v2", &v2)] {
        let plain = stack.push(&format!("app-{tag}"), &format!("plain/app:{tag}"))?;
        let indexed = stack.push(&format!("app-{tag}"), &format!("lazy/app:{tag}"))?;
        stack.pronto(&["index", "create", &indexed, "--bind"])?;
        let converted = plain.replace("/plain/", "/chunked/");
        let said = stack.pronto(&["convert", &stack.direct(&plain), &stack.direct(&converted)])?;
        println!("{tag}: {} MiB; {}", image.layers_size() >> 20, said.trim());
        references.push((plain, indexed, converted));
    }
    stack.start_serve("")?;
    let systems = [
        System::Containerd,
        System::ProntoLazy,
        System::ProntoConverted,
    ];
    let mut rows = Vec::new();
    for system in systems {
        let pick = |(plain, indexed, converted): &(String, String, String)| match system {
            System::ProntoLazy => indexed.clone(),
            System::ProntoConverted => converted.clone(),
            _ => plain.clone(),
        };
        let (first, next) = (pick(&references[0]), pick(&references[1]));
        let mut samples: Vec<(Sample, Sample)> = Vec::new();
        for run in 0..args.repeat {
            let one = stack.cold_start(system, &first)?;
            // v2 on the node that ran v1: nothing cleared but the counters.
            stack.relay.reset();
            let two = stack.start_image(system, &next)?;
            println!(
                "  {:<22} run {}: v1 ready in {:.2} s, {:.1} MiB; then v2 ready in {:.2} s, {:.1} MiB",
                system.name(),
                run + 1,
                one.ready.as_secs_f64(),
                one.fetched as f64 / (1 << 20) as f64,
                two.ready.as_secs_f64(),
                two.fetched as f64 / (1 << 20) as f64,
            );
            samples.push((one, two));
        }
        rows.push((system, samples));
    }
    stack.remove_images()?;
    stack.stop_serve();

    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let median = |values: Vec<f64>| {
        let mut v = values;
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut table = format!(
        "Machine: {}. Link: {link}. Background fetch on. {} runs per row (median). \
         The app: busybox and one layer of {} MiB of weights and {SMALL_FILES} files of 1–4 KiB \
         ({:.0} MiB compressed); v2 inserts 100 bytes in the middle of the weights and changes \
         1 small file in {CHANGED_EVERY}; the start reads all of it.\n\n\
         | system | v1 cold: ready | v1 fetched | v2 after v1: ready | v2 fetched | v2 fetched / v2 image |\n\
         |---|---|---|---|---|---|\n",
        machine(),
        args.repeat,
        args.weights_mib,
        mib(v2.layers_size()),
    );
    for (system, samples) in &rows {
        let secs = |f: fn(&(Sample, Sample)) -> Duration| {
            median(samples.iter().map(|s| f(s).as_secs_f64()).collect())
        };
        let bytes =
            |f: fn(&(Sample, Sample)) -> u64| median(samples.iter().map(|s| f(s) as f64).collect());
        let fetched_two = bytes(|s| s.1.fetched);
        table.push_str(&format!(
            "| {} | {:.2} s | {:.1} MiB | {:.2} s | {:.1} MiB | {:.1}% |\n",
            system.name(),
            secs(|s| s.0.ready),
            mib(bytes(|s| s.0.fetched) as u64),
            secs(|s| s.1.ready),
            mib(fetched_two as u64),
            fetched_two / v2.layers_size() as f64 * 100.0,
        ));
    }
    println!("\n{table}");
    write_markdown(&args.markdown, "next-version", &table)?;
    println!("wrote {}", args.markdown.display());
    Ok(())
}

/// Version `version` (1 or 2) of the app.
fn app(layout: &OciLayout, weights_mib: usize, version: u64) -> Result<BuiltImage> {
    let mut weights = Content::random(40, (weights_mib as u64) << 20).to_vec()?;
    if version == 2 {
        let middle = weights.len() / 2;
        weights.splice(middle..middle, [7u8; 100]);
    }
    let mut layer = Layer::new()
        .compression(Compression::Gzip(6))
        .dir("app")
        .file("app/version", format!("{version}\n"))
        .file("app/weights.bin", weights);
    for i in 0..SMALL_FILES {
        if i % 100 == 0 {
            layer = layer.dir(&format!("app/lib/d{:02}", i / 100));
        }
        let changed = version == 2 && i % CHANGED_EVERY == 0;
        let seed = 1000 + i as u64 + if changed { 1_000_000 } else { 0 };
        let len = 1024 + (i as u64 * 7919) % 3072;
        layer = layer.file(
            &format!("app/lib/d{:02}/f{i:04}", i / 100),
            Content::random(seed, len),
        );
    }
    ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat", "echo"]))
        .layer(layer)
        .cmd(&[
            "/bin/sh",
            "-c",
            "cat /app/weights.bin /app/lib/*/* > /dev/null && echo ready",
        ])
        .build(layout)
}
