//! Scale: an image of 10 GiB in 100,000 files (one layer, over busybox),
//! through containerd and `pronto serve` on loopback. Measures index
//! creation on one core, the time from `Prepare` to the layer mounted (the
//! pull's "lazy layers" phase), the daemon's threads and memory with the
//! image mounted, and a walk of the whole tree (`stat` of every path)
//! through the lazy mount, cold and again. Run as root:
//!
//!   cargo build --release -p pronto -p pronto-bench --bin pronto --bin scale
//!   target/release/scale --pronto target/release/pronto

use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use pronto_bench::stack::{Link, Stack, System};
use pronto_bench::{drop_caches, footprint, machine, walk};
use pronto_index::{DEFAULT_SPAN_SIZE, LayerCompression, LayerToIndex, build_index};
use pronto_testbed::{Compression, Content, Entry, ImageBuilder, Layer};

#[derive(Debug, Parser)]
#[command(about = "An image of 10 GiB in 100,000 files: index, mount, memory, tree walk")]
struct Args {
    /// The pronto binary.
    #[arg(long)]
    pronto: PathBuf,
    /// Files in the big layer.
    #[arg(long, default_value_t = 100_000)]
    files: u64,
    /// Bytes of file data in the big layer, GiB.
    #[arg(long, default_value_t = 10)]
    size_gib: u64,
    /// Files per directory.
    #[arg(long, default_value_t = 100)]
    per_dir: u64,
    /// Latency the relay adds to every request, ms.
    #[arg(long, default_value_t = 10)]
    latency_ms: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    println!("machine: {}", machine());
    let link = Link {
        latency: Some(Duration::from_millis(args.latency_ms)).filter(|l| !l.is_zero()),
        ..Link::default()
    };
    let mut stack = Stack::start(&args.pronto, link, true)?;
    println!("link: {link}; background fetch on");

    // File sizes vary from half to one and a half times the mean, so that
    // the layer has files of many sizes and the total is as asked.
    let total = args.size_gib << 30;
    let mean = total / args.files;
    let mut data = Layer::new()
        .compression(Compression::FAST)
        .entry(Entry::dir("data"));
    let mut written = 0;
    for i in 0..args.files {
        let dir = i / args.per_dir;
        if i % args.per_dir == 0 {
            data = data.entry(Entry::dir(format!("data/d{dir:05}")));
        }
        let size = if i + 1 == args.files {
            total - written
        } else {
            mean / 2 + (i * 7919) % mean.max(1)
        };
        written += size;
        data = data.entry(Entry::file(
            format!("data/d{dir:05}/f{i:06}"),
            Content::random(i, size),
        ));
    }
    let started = Instant::now();
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat", "echo"]))
        .layer(data)
        .cmd(&[
            "/bin/sh",
            "-c",
            "cat /data/d00000/f000000 > /dev/null && echo ready",
        ])
        .build(&stack.layout)?;
    let layer = &image.layers[1];
    println!(
        "built the image in {:.0} s: {} files, {:.2} GiB of data, layer {:.2} GiB gzip",
        started.elapsed().as_secs_f64(),
        args.files,
        written as f64 / (1u64 << 30) as f64,
        layer.size as f64 / (1u64 << 30) as f64
    );

    // Index creation on one core, from the layer on local disk.
    let (index_time, index_size, spans) = index_on_one_core(
        &stack.layout.blob_path(&layer.digest),
        &layer.digest,
        layer.size,
        &stack.work().join("layer.index"),
    )?;
    println!(
        "index on one core: {:.1} s, {:.0} MB/s of gzip, {spans} spans, index {:.1} MiB",
        index_time.as_secs_f64(),
        layer.size as f64 / 1e6 / index_time.as_secs_f64(),
        index_size as f64 / (1 << 20) as f64
    );

    stack.layout.tag("scale", &image)?;
    let started = Instant::now();
    let reference = stack.push("scale", "scale/big:v1")?;
    println!("pushed in {:.0} s", started.elapsed().as_secs_f64());
    // The index is made from the registry itself, not through the relay
    // (whose latency is added to every read of an upload as well).
    let direct = format!("{}/scale/big:v1", stack.registry.host());
    let started = Instant::now();
    stack.pronto(&["index", "create", &direct, "--bind"])?;
    let created = started.elapsed();
    println!(
        "`pronto index create --bind` (download included): {:.0} s",
        created.as_secs_f64()
    );

    stack.start_serve("")?;
    stack.cold()?;
    let pid = stack.serve_pid().context("pronto serve runs")?;
    let idle = footprint(pid)?;
    let sample = stack.start_image(System::ProntoLazy, &reference)?;
    let phases = sample.phases.clone().unwrap_or_default();
    let mounting = phases
        .split(", ")
        .find_map(|p| p.strip_prefix("lazy layers "))
        .unwrap_or("?")
        .to_owned();
    let mounted = footprint(pid)?;
    println!(
        "start: ready in {:.2} s (pull {:.2} s: {phases}), {:.1} MiB fetched",
        sample.ready.as_secs_f64(),
        sample.pulled.as_secs_f64(),
        sample.fetched as f64 / (1 << 20) as f64
    );

    let mountpoint = data_mount(stack.work())?;
    drop_caches();
    let (cold_walk, paths) = walk(&mountpoint.join("data"))?;
    let walked = footprint(pid)?;
    let (warm_walk, _) = walk(&mountpoint.join("data"))?;

    // The same tree extracted on local disk, walked cold.
    let extracted = stack.work().join("extracted");
    std::fs::create_dir_all(&extracted)?;
    let status = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(stack.layout.blob_path(&layer.digest))
        .arg("-C")
        .arg(&extracted)
        .status()?;
    if !status.success() {
        bail!("tar could not extract the layer");
    }
    drop_caches();
    let (local_walk, _) = walk(&extracted.join("data"))?;
    std::fs::remove_dir_all(&extracted)?;

    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "\n| measurement | result |\n|---|---|\n\
         | image | {} files in {} directories, {:.1} GiB of data; layer {:.2} GiB gzip (level 2) |\n\
         | index creation, one core (local file, {} MiB spans) | {:.1} s, {:.0} MB/s of gzip; {spans} spans, index {:.1} MiB ({:.2}% of the layer) |\n\
         | `pronto index create --bind` from the registry on loopback (download, index, push) | {:.0} s |\n\
         | `Prepare` to mounted (pull phase \"lazy layers\", both layers' snapshots) | {mounting} |\n\
         | pull to ready (the container reads one file) | {:.2} s, {:.1} MiB fetched |\n\
         | daemon idle | {} threads, {:.1} MiB RSS |\n\
         | daemon, image mounted | {} threads, {:.1} MiB RSS |\n\
         | walk: `stat` of {paths} paths through the lazy mount, cold | {:.2} s ({:.0} paths/s); the extracted tree on local disk (ext4): {:.2} s |\n\
         | daemon after the walk | {} threads, {:.1} MiB RSS |\n\
         | the walk again (the kernel's dentry and attribute caches) | {:.2} s |",
        args.files,
        args.files.div_ceil(args.per_dir),
        written as f64 / (1u64 << 30) as f64,
        layer.size as f64 / (1u64 << 30) as f64,
        DEFAULT_SPAN_SIZE >> 20,
        index_time.as_secs_f64(),
        layer.size as f64 / 1e6 / index_time.as_secs_f64(),
        index_size as f64 / (1 << 20) as f64,
        100.0 * index_size as f64 / layer.size as f64,
        created.as_secs_f64(),
        sample.ready.as_secs_f64(),
        sample.fetched as f64 / (1 << 20) as f64,
        idle.0,
        mib(idle.1),
        mounted.0,
        mib(mounted.1),
        cold_walk.as_secs_f64(),
        paths as f64 / cold_walk.as_secs_f64(),
        local_walk.as_secs_f64(),
        walked.0,
        mib(walked.1),
        warm_walk.as_secs_f64(),
    );
    Ok(())
}

/// Builds the index of the gzip layer at `blob` on this thread; returns the
/// time, the index's size and its number of spans.
fn index_on_one_core(
    blob: &Path,
    digest: &str,
    size: u64,
    out: &Path,
) -> Result<(Duration, u64, usize)> {
    drop_caches();
    let target = LayerToIndex {
        digest: digest.to_owned(),
        size,
        compression: LayerCompression::Gzip,
    };
    let started = Instant::now();
    let input = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(blob)?);
    let built = build_index(
        input,
        &target,
        DEFAULT_SPAN_SIZE,
        BufWriter::new(std::fs::File::create(out)?),
    )?;
    let took = started.elapsed();
    Ok((took, built.size, built.meta.spans.len()))
}

/// The lazy mount (FUSE, under the stack's work directory) that holds the
/// big layer's `data` directory.
fn data_mount(work: &Path) -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(point) = fields.get(4) else { continue };
        let fuse = line
            .split(" - ")
            .nth(1)
            .is_some_and(|rest| rest.starts_with("fuse"));
        let point = PathBuf::from(point);
        if fuse && point.starts_with(work) && point.join("data").is_dir() {
            return Ok(point);
        }
    }
    bail!("no lazy mount of the big layer under {}", work.display())
}
