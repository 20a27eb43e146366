//! `pronto pull`: an image pull through containerd with the labels that
//! let Pronto's snapshotter serve layers lazily.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, anyhow};
use pronto_containerd::{LayerOutcome, PullOptions, pull};
use pronto_metrics::metrics;
use pronto_registry::Platform;
use pronto_snapshotter::status::{expect, query};

/// How long the daemon is given to take the pull's announcement.
const EXPECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

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
    // The daemon's registry counters before and after the pull: the
    // round trips it made for the pull (the layers' indexes and mounts).
    // A node starting one image at a time sees its own only.
    let daemon_requests = || {
        runtime
            .block_on(query(&config.address))
            .ok()
            .map(|s| (s.registry_requests, s.registry_round_trips))
    };
    let daemon_before = daemon_requests();
    let started = Instant::now();
    // The daemon looks up what the image's layers need while this pull
    // resolves the image; an older daemon that cannot is no matter.
    let expected = runtime.block_on(async {
        tokio::time::timeout(
            EXPECT_TIMEOUT,
            expect(&config.address, reference, &options.platform.to_string()),
        )
        .await
    });
    if let Ok(Err(e)) = expected {
        tracing::debug!("the daemon did not look ahead of the pull: {e}");
    }
    let report = runtime.block_on(pull(&client, reference, &options, &|line| {
        eprintln!("{line}")
    }))?;
    let elapsed = started.elapsed();
    let daemon_after = daemon_requests();
    let count = |outcome| report.layers.iter().filter(|(_, o)| *o == outcome).count();
    println!(
        "pulled {} ({}) into namespace {} in {:.2}s: {} layers lazy, {} fetched whole by Pronto, {} unpacked by containerd, {} already present; {} fetched for unpacking",
        report.name,
        report.target,
        options.namespace,
        elapsed.as_secs_f64(),
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
    let (requests, round_trips) = metrics().registry_requests();
    let mut line = format!("registry round trips: {round_trips} here ({requests} requests)");
    if let (Some(before), Some(after)) = (daemon_before, daemon_after) {
        line.push_str(&format!(
            ", {} in pronto serve ({} requests)",
            after.1.saturating_sub(before.1),
            after.0.saturating_sub(before.0)
        ));
    }
    println!("{line}");
    Ok(())
}
