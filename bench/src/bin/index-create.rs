//! Index creation: throughput (MB/s of compressed input on one core), index
//! size as a share of the layer, the prefix a node fetches to mount, and
//! what one small read costs, for several span sizes.

use std::io::BufWriter;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use pronto_index::{LayerCompression, LayerIndex, LayerToIndex, build_index};
use pronto_testbed::{Compression, Content, Layer};

#[derive(Debug, Parser)]
#[command(about = "Index creation throughput and size")]
struct Args {
    /// Size of the incompressible layer in MiB (a few large files).
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Number of small compressible files in the second layer.
    #[arg(long, default_value_t = 20_000)]
    small_files: usize,
    /// Span sizes to measure, in MiB.
    #[arg(long, default_value = "1,2,4,8", value_delimiter = ',')]
    span_mib: Vec<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::Builder::new().prefix("pronto-bench-").tempdir()?;
    println!("machine: {}\n", pronto_bench::machine());
    let per_file = (args.size_mib << 20) / 4;
    let layers = [
        (
            format!("{} MiB incompressible, 4 files", args.size_mib),
            (0..4).fold(Layer::new().compression(Compression::Gzip(6)), |l, i| {
                l.file(&format!("model-{i}.bin"), Content::random(i, per_file))
            }),
        ),
        (
            format!("{} small text files", args.small_files),
            Layer::new()
                .compression(Compression::Gzip(6))
                .entry(pronto_testbed::Entry::dir("src"))
                .many_text_files("src", args.small_files),
        ),
    ];
    println!(
        "| layer | span size | index time | MB/s per core | spans | index size | share of layer | mount prefix | fetched for one 4 KiB read |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, layer) in layers {
        let path = work.path().join("layer.tar.gz");
        let digests = layer.write(BufWriter::new(std::fs::File::create(&path)?))?;
        let target = LayerToIndex {
            digest: digests.digest.clone(),
            size: digests.size,
            compression: LayerCompression::Gzip,
        };
        for &span_mib in &args.span_mib {
            let out = work.path().join("index");
            let started = Instant::now();
            let input = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&path)?);
            let built = build_index(
                input,
                &target,
                span_mib << 20,
                BufWriter::new(std::fs::File::create(&out)?),
            )?;
            let elapsed = started.elapsed();
            let index = LayerIndex::parse(&std::fs::read(&out)?[..built.prefix_len as usize])?;
            // One 4 KiB read in the middle of the stream: its span's
            // compressed bytes plus its window.
            let middle = index.meta().layer.uncompressed_size / 2;
            let cost: u64 = index
                .spans_for(middle..middle + 4096)
                .map(|i| {
                    let input = index.span_input(i);
                    let window = index.window_range(i).map_or(0, |r| r.end - r.start);
                    input.end - input.start + window
                })
                .sum();
            println!(
                "| {name} ({:.0} MiB gzip) | {span_mib} MiB | {:.2} s | {:.0} | {} | {:.2} MiB | {:.2}% | {:.1} KiB | {:.2} MiB |",
                digests.size as f64 / (1 << 20) as f64,
                elapsed.as_secs_f64(),
                digests.size as f64 / 1e6 / elapsed.as_secs_f64(),
                index.meta().spans.len(),
                built.size as f64 / (1 << 20) as f64,
                100.0 * built.size as f64 / digests.size as f64,
                built.prefix_len as f64 / 1024.0,
                cost as f64 / (1 << 20) as f64,
            );
        }
    }
    Ok(())
}
