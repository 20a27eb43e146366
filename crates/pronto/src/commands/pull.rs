//! `pronto pull`: an image pull through containerd with the labels that
//! let Pronto's snapshotter serve layers lazily.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, anyhow};
use pronto_containerd::{LayerOutcome, PullOptions, pull};
use pronto_registry::Platform;

use crate::commands::image::registry_client;
use crate::config::Config;
use crate::text::human_size;

pub fn run(
    config: &Config,
    reference: &str,
    address: PathBuf,
    namespace: String,
    snapshotter: String,
    platform: &str,
) -> Result<()> {
    let platform: Platform = platform.parse().map_err(|e: String| anyhow!(e))?;
    let runtime = super::runtime()?;
    let client = registry_client(config)?;
    let options = PullOptions {
        address,
        namespace,
        snapshotter,
        platform,
        work_dir: config.root.join("pull"),
    };
    let started = Instant::now();
    let report = runtime.block_on(pull(&client, reference, &options, &|line| {
        eprintln!("{line}")
    }))?;
    let count = |outcome| report.layers.iter().filter(|(_, o)| *o == outcome).count();
    println!(
        "pulled {} ({}) into namespace {} in {:.2}s: {} layers lazy, {} fetched whole by Pronto, {} unpacked by containerd, {} already present; {} fetched for unpacking",
        report.name,
        report.target,
        options.namespace,
        started.elapsed().as_secs_f64(),
        count(LayerOutcome::Remote),
        count(LayerOutcome::PulledByPronto),
        count(LayerOutcome::Unpacked),
        count(LayerOutcome::Present),
        human_size(report.bytes_fetched),
    );
    let phases: Vec<String> = report
        .phases
        .iter()
        .map(|(phase, spent)| format!("{} {:.2}s", phase.name(), spent.as_secs_f64()))
        .collect();
    println!("phases: {}", phases.join(", "));
    Ok(())
}
