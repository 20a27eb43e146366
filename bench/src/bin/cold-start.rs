//! Pronto's cold-start benchmark: three images, three systems, a shaped
//! link, repeated cold starts. Writes JSON results, a markdown table into
//! `docs/benchmarks.md` and a PNG chart. Run it with `bench/run`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use pronto_bench::stack::{Link, Sample, Stack, System};
use pronto_bench::{machine, summary, write_markdown};
use pronto_testbed::{ImageBuilder, Layer};
use serde_json::json;

#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// The pronto binary.
    #[arg(long)]
    pronto: PathBuf,
    /// Small images and one run per cell: a few minutes.
    #[arg(long)]
    quick: bool,
    /// Cold starts per image and system (default 3; 1 with --quick).
    #[arg(long)]
    repeat: Option<usize>,
    /// Bandwidth of the registry's port, Mbit/s (tc HTB on lo); 0 for none.
    #[arg(long, default_value_t = 1000)]
    bandwidth_mbit: u64,
    /// Latency added to every registry request, ms; 0 for none.
    #[arg(long, default_value_t = 10)]
    latency_ms: u64,
    /// Throughput cap of each registry connection, MiB/s; 0 for none.
    #[arg(long, default_value_t = 32)]
    per_connection_mib: u64,
    /// Where the JSON results go (default: `bench/results/SECTION.json`).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where the chart goes (default: `docs/cold-start.png` for the section
    /// `cold-start`, none for the others).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// The markdown file whose cold-start section is replaced.
    #[arg(long, default_value = "docs/benchmarks.md")]
    markdown: PathBuf,
    /// Turn Pronto's background fetch off (on by default, as on a node).
    #[arg(long)]
    no_background: bool,
    /// Only draw the chart again from the JSON results.
    #[arg(long)]
    replot: bool,
    /// Only these workloads (comma-separated: ml-model, ml-weights,
    /// debian-numpy, small-files); all by default.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Only these systems (comma-separated: containerd, lazy, profile,
    /// converted, parallel); all by default.
    #[arg(long, value_delimiter = ',')]
    systems: Vec<String>,
    /// `--span-size` for `pronto index create` (its default when unset).
    #[arg(long)]
    span_size: Option<String>,
    /// The results section of the markdown file to replace: its markers
    /// read `<!-- SECTION results: written by bench/run -->`.
    #[arg(long, default_value = "cold-start")]
    section: String,
}

/// One benchmark image: how to build it and what it is.
struct Workload {
    name: &'static str,
    description: String,
    image: pronto_testbed::image::BuiltImage,
}

/// Results of one image × system cell.
struct Cell {
    image: &'static str,
    system: System,
    samples: Vec<Sample>,
}

const SYSTEMS: [System; 7] = [
    System::Containerd,
    System::ProntoLazy,
    System::ProntoWarmed,
    System::ProntoProfile,
    System::ProntoConverted,
    System::ProntoConvertedZstd,
    System::ProntoParallel,
];

fn main() -> Result<()> {
    let mut args = Args::parse();
    // Each section keeps its own results and chart.
    args.json
        .get_or_insert_with(|| PathBuf::from(format!("bench/results/{}.json", args.section)));
    if args.section == "cold-start" {
        args.chart
            .get_or_insert_with(|| PathBuf::from("docs/cold-start.png"));
    }
    if args.replot {
        return replot(&args);
    }
    let repeat = args.repeat.unwrap_or(if args.quick { 1 } else { 3 });
    let nonzero = |v: u64| (v > 0).then_some(v);
    let link = Link {
        bandwidth_mbit: nonzero(args.bandwidth_mbit),
        latency: nonzero(args.latency_ms).map(Duration::from_millis),
        per_connection_mib: nonzero(args.per_connection_mib),
    };
    let mut stack = Stack::start(&args.pronto, link, !args.no_background)?;
    println!(
        "background fetch: {}",
        if args.no_background { "off" } else { "on" }
    );
    println!("machine: {}", machine());
    println!("link: {link}");
    let workloads: Vec<Workload> = build_workloads(&stack, args.quick)?
        .into_iter()
        .filter(|w| args.only.is_empty() || args.only.iter().any(|o| o == w.name))
        .collect();
    anyhow::ensure!(!workloads.is_empty(), "--only names no workload");
    let systems: Vec<System> = SYSTEMS
        .into_iter()
        .filter(|s| args.systems.is_empty() || args.systems.iter().any(|o| o == s.short_name()))
        .collect();
    anyhow::ensure!(!systems.is_empty(), "--systems names no system");

    let mut cells = Vec::new();
    for workload in &workloads {
        let tag = workload.name;
        let indexed = stack.push(tag, &format!("lazy/{tag}:v1"))?;
        let plain = stack.push(tag, &format!("plain/{tag}:v1"))?;
        println!(
            "\n{}: {} ({:.0} MiB compressed); indexing...",
            workload.name,
            workload.description,
            workload.image.layers_size() as f64 / (1 << 20) as f64
        );
        let mut create = vec!["index", "create", &indexed, "--bind"];
        if let Some(size) = &args.span_size {
            create.extend(["--span-size", size]);
        }
        stack.pronto(&create)?;
        let chunked = plain.replace("/plain/", "/chunked/");
        let chunked_zstd = plain.replace("/plain/", "/chunked-zstd/");
        for (system, target, compression) in [
            (System::ProntoConverted, &chunked, "gzip"),
            (System::ProntoConvertedZstd, &chunked_zstd, "zstd"),
        ] {
            if !systems.contains(&system) {
                continue;
            }
            let started = std::time::Instant::now();
            // Converted once, as a CI step would, straight from the
            // registry: not through the measured link.
            let said = stack.pronto(&[
                "convert",
                &stack.direct(&plain),
                &stack.direct(target),
                "--compression",
                compression,
            ])?;
            let took = started.elapsed().as_secs_f64();
            println!(
                "converted ({compression}) in {took:.1} s ({:.1} MiB/s of compressed input, one process on one core): {}",
                workload.image.layers_size() as f64 / (1 << 20) as f64 / took,
                said.trim()
            );
        }
        stack.start_serve("")?;
        for system in systems.iter().copied() {
            let reference = match system {
                System::ProntoLazy | System::ProntoProfile | System::ProntoWarmed => &indexed,
                System::Containerd | System::ProntoParallel => &plain,
                System::ProntoConverted => &chunked,
                System::ProntoConvertedZstd => &chunked_zstd,
            };
            if system == System::ProntoProfile {
                stack
                    .record_profile(reference)
                    .with_context(|| format!("record the profile of {}", workload.name))?;
            }
            let mut samples = Vec::new();
            for run in 0..repeat {
                let sample = stack
                    .cold_start(system, reference)
                    .with_context(|| format!("{} with {}", workload.name, system.name()))?;
                println!(
                    "  {:<22} run {}: ready in {:.2} s (pull {:.2} s; again, image local, page cache cold: {:.2} s), {:.1} MiB fetched{}",
                    system.name(),
                    run + 1,
                    sample.ready.as_secs_f64(),
                    sample.pulled.as_secs_f64(),
                    sample.again.as_secs_f64(),
                    sample.fetched as f64 / (1 << 20) as f64,
                    sample
                        .phases
                        .as_ref()
                        .map(|p| format!("; pull phases: {p}"))
                        .unwrap_or_default()
                        + &sample
                            .round_trips
                            .map(|n| format!("; {n} registry round trips"))
                            .unwrap_or_default()
                );
                samples.push(sample);
            }
            cells.push(Cell {
                image: workload.name,
                system,
                samples,
            });
        }
    }
    // The daemon unmounts the layers of the images removed.
    stack.remove_images()?;
    stack.stop_serve();

    let table = markdown(&cells, &workloads, &link, repeat);
    println!("\n{table}");
    write_json(json_path(&args), &cells, &link, repeat)?;
    write_markdown(&args.markdown, &args.section, &table)?;
    let times: Vec<(&str, &str, Vec<Duration>)> = cells
        .iter()
        .map(|c| (c.image, c.system.name(), ready_times(c)))
        .collect();
    println!(
        "wrote {} and {}",
        json_path(&args).display(),
        args.markdown.display()
    );
    if let Some(path) = &args.chart {
        chart(path, &times)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// The chart of (image, system, ready times) cells.
fn chart(path: &std::path::Path, cells: &[(&str, &str, Vec<Duration>)]) -> Result<()> {
    let mut images: Vec<&str> = Vec::new();
    for (image, _, _) in cells {
        if !images.contains(image) {
            images.push(image);
        }
    }
    pronto_bench::chart::bars(
        path,
        "Cold start: pull to ready (median, min–max)",
        &images,
        &SYSTEMS.iter().map(|s| s.name()).collect::<Vec<_>>(),
        |image, system| {
            let (_, _, times) = cells.iter().find(|c| c.0 == image && c.1 == system)?;
            let (median, min, max) = summary(times);
            Some((median.as_secs_f64(), min.as_secs_f64(), max.as_secs_f64()))
        },
    )
}

/// Draws the chart from earlier JSON results.
fn replot(args: &Args) -> Result<()> {
    let text = std::fs::read_to_string(json_path(args))
        .with_context(|| format!("read {}", json_path(args).display()))?;
    let doc: serde_json::Value = serde_json::from_str(&text)?;
    let results = doc["results"]
        .as_array()
        .context("no results in the JSON")?;
    let cells: Vec<(&str, &str, Vec<Duration>)> = results
        .iter()
        .map(|r| {
            let times = r["ready_seconds"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_f64())
                        .map(Duration::from_secs_f64)
                        .collect()
                })
                .unwrap_or_default();
            (
                r["image"].as_str().unwrap_or("?"),
                r["system"].as_str().unwrap_or("?"),
                times,
            )
        })
        .filter(|(_, _, times): &(&str, &str, Vec<Duration>)| !times.is_empty())
        .collect();
    let path = args
        .chart
        .as_deref()
        .context("--replot draws the chart of the section cold-start, or --chart")?;
    chart(path, &cells)?;
    println!("wrote {}", path.display());
    Ok(())
}

fn build_workloads(stack: &Stack, quick: bool) -> Result<Vec<Workload>> {
    let layout = &stack.layout;
    let mut workloads = Vec::new();

    let model_mib = if quick { 256 } else { 2048 };
    let image = pronto_testbed::image::model_image(layout, model_mib, 4, 4)?;
    layout.tag("ml-model", &image)?;
    workloads.push(Workload {
        name: "ml-model",
        description: format!("busybox + {model_mib} MiB of model weights in 4 layers; reads 4 MiB"),
        image,
    });

    let image = pronto_testbed::image::model_server_image(layout, model_mib, 4)?;
    layout.tag("ml-weights", &image)?;
    workloads.push(Workload {
        name: "ml-weights",
        description:
            "the ml-model image's layers; reads every weight file whole, as a model server does"
                .into(),
        image,
    });

    let rootfs = pronto_testbed::debian::bookworm_with_numpy()?;
    let image = ImageBuilder::new()
        .layer(Layer::from_dir(&rootfs)?)
        .cmd(&[
            "/usr/bin/python3",
            "-c",
            "import numpy, json, decimal, email.parser, http.client; \
             numpy.ones((64, 64)).sum(); print('ready')",
        ])
        .build(layout)?;
    layout.tag("debian-numpy", &image)?;
    workloads.push(Workload {
        name: "debian-numpy",
        description: "Debian 12 (debootstrap) with python3 and numpy; imports a few modules".into(),
        image,
    });

    let files = 50_000;
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["sh", "cat", "echo", "seq"]))
        .layer(Layer::new().many_small_files("data", files, 11))
        .cmd(&[
            "/bin/sh",
            "-c",
            "for i in $(seq 0 299); do cat /data/d$(printf %04d $((i * 7 / 100)))/f$(printf %06d $((i * 7))) > /dev/null || exit 1; done; echo ready",
        ])
        .build(layout)?;
    layout.tag("small-files", &image)?;
    workloads.push(Workload {
        name: "small-files",
        description: format!("busybox + {files} files of 1–4 KiB; reads 300 of them"),
        image,
    });
    Ok(workloads)
}

fn ready_times(cell: &Cell) -> Vec<Duration> {
    cell.samples.iter().map(|s| s.ready).collect()
}

fn markdown(cells: &[Cell], workloads: &[Workload], link: &Link, repeat: usize) -> String {
    let mut out = format!(
        "Machine: {}. Link: {link}. Each cell: {repeat} cold start(s); median (min–max). \"Again, image local\": the same pull and start right after, with the page cache dropped as before the cold start; \"what the registry added\": pull to ready minus that (median of the differences).\n\n",
        machine()
    );
    out.push_str(
        "| image | system | pull to ready | of which pull | fetched from registry | share of image | again, image local | what the registry added |\n",
    );
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for cell in cells {
        let workload = workloads
            .iter()
            .find(|w| w.name == cell.image)
            .expect("cells come from workloads");
        let (median, min, max) = summary(&ready_times(cell));
        let mut fetched: Vec<u64> = cell.samples.iter().map(|s| s.fetched).collect();
        fetched.sort_unstable();
        let fetched = fetched[fetched.len() / 2];
        let (pulled, _, _) = summary(&cell.samples.iter().map(|s| s.pulled).collect::<Vec<_>>());
        let (again, _, _) = summary(&cell.samples.iter().map(|s| s.again).collect::<Vec<_>>());
        let (added, _, _) = summary(
            &cell
                .samples
                .iter()
                .map(|s| s.ready.saturating_sub(s.again))
                .collect::<Vec<_>>(),
        );
        out.push_str(&format!(
            "| {} | {} | {:.2} s ({:.2}–{:.2}) | {:.2} s | {:.1} MiB | {:.1}% | {:.2} s | {:.2} s |\n",
            cell.image,
            cell.system.name(),
            median.as_secs_f64(),
            min.as_secs_f64(),
            max.as_secs_f64(),
            pulled.as_secs_f64(),
            fetched as f64 / (1 << 20) as f64,
            100.0 * fetched as f64 / workload.image.layers_size().max(1) as f64,
            again.as_secs_f64(),
            added.as_secs_f64(),
        ));
    }
    let warmed: Vec<String> = cells
        .iter()
        .filter_map(|c| {
            let workload = workloads.iter().find(|w| w.name == c.image)?;
            let warms: Vec<_> = c.samples.iter().filter_map(|s| s.warm).collect();
            let median = |mut v: Vec<u64>| {
                v.sort_unstable();
                v[v.len() / 2]
            };
            if warms.is_empty() {
                return None;
            }
            let (took, _, _) = summary(&warms.iter().map(|w| w.took).collect::<Vec<_>>());
            let fetched = median(warms.iter().map(|w| w.fetched).collect());
            let disk = median(warms.iter().map(|w| w.disk).collect());
            let size = workload.image.layers_size().max(1) as f64;
            Some(format!(
                "- {}: `pronto warm` took {:.2} s and fetched {:.1} MiB; Pronto's root then held {:.1} MiB, {:.1}% of the image's {:.0} MiB",
                c.image,
                took.as_secs_f64(),
                fetched as f64 / (1 << 20) as f64,
                disk as f64 / (1 << 20) as f64,
                100.0 * disk as f64 / size,
                size / (1 << 20) as f64,
            ))
        })
        .collect();
    if !warmed.is_empty() {
        out.push_str(
            "\nBefore each \"Pronto warmed\" start, the node was warmed (median); the start's row counts what it fetched after:\n\n",
        );
        out.push_str(&warmed.join("\n"));
        out.push('\n');
    }
    let phases: Vec<String> = cells
        .iter()
        .filter_map(|c| {
            let last = c.samples.iter().rev().find(|s| s.phases.is_some())?;
            let phases = last.phases.as_ref()?;
            let trips = last
                .round_trips
                .map(|n| format!("; {n} registry round trips from pull to ready"))
                .unwrap_or_default();
            Some(format!(
                "- {}, {}: {phases}{trips}",
                c.image,
                c.system.name()
            ))
        })
        .collect();
    if !phases.is_empty() {
        out.push_str("\nWhere `pronto pull` spent its time (last run of each cell):\n\n");
        out.push_str(&phases.join("\n"));
        out.push('\n');
    }
    out
}

fn write_json(path: &std::path::Path, cells: &[Cell], link: &Link, repeat: usize) -> Result<()> {
    let results: Vec<_> = cells
        .iter()
        .map(|cell| {
            json!({
                "image": cell.image,
                "system": cell.system.name(),
                "ready_seconds": cell.samples.iter().map(|s| s.ready.as_secs_f64()).collect::<Vec<_>>(),
                "pull_seconds": cell.samples.iter().map(|s| s.pulled.as_secs_f64()).collect::<Vec<_>>(),
                "fetched_bytes": cell.samples.iter().map(|s| s.fetched).collect::<Vec<_>>(),
                "pull_phases": cell.samples.iter().map(|s| s.phases.clone()).collect::<Vec<_>>(),
                "round_trips": cell.samples.iter().map(|s| s.round_trips).collect::<Vec<_>>(),
                "again_seconds": cell.samples.iter().map(|s| s.again.as_secs_f64()).collect::<Vec<_>>(),
            })
        })
        .collect();
    let doc = json!({
        "machine": machine(),
        "link": {
            "bandwidth_mbit": link.bandwidth_mbit,
            "latency_ms": link.latency.map(|l| l.as_millis() as u64),
            "per_connection_mib": link.per_connection_mib,
        },
        "repeat": repeat,
        "results": results,
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
        .with_context(|| format!("write {}", path.display()))
}

fn json_path(args: &Args) -> &std::path::Path {
    args.json.as_deref().expect("set in main")
}
