//! `pronto profile list|show|rm`: the startup profiles kept on this node
//! (`<root>/profiles/`), recorded by `pronto serve` as images start.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use pronto_containerd::{LayerOutcome, PullOptions, pull};
use pronto_fs::profile::{Profile, ProfileStore};
use pronto_registry::{Platform, Repository, parse_reference};
use serde_json::json;

use crate::cli::{ProfileCommand, RecordArgs};
use crate::commands::image::registry_client;
use crate::config::Config;
use crate::text::human_size;

pub fn run(command: ProfileCommand, config: &Config) -> Result<()> {
    let store = ProfileStore::new(config.profiles_dir());
    match command {
        ProfileCommand::List { json } => {
            let profiles: Vec<(String, Result<Option<Profile>, String>)> = store
                .list()
                .into_iter()
                .map(|(manifest, _)| {
                    let loaded = store.load(&manifest).map_err(|e| e.to_string());
                    (manifest, loaded)
                })
                .collect();
            if json {
                let list: Vec<_> = profiles
                    .iter()
                    .map(|(manifest, loaded)| match loaded {
                        Ok(Some(p)) => json!({
                            "manifest": manifest, "starts": p.starts,
                            "ranges": p.layers.iter().map(|l| l.ranges.len()).sum::<usize>(),
                            "bytes": p.bytes(),
                        }),
                        Ok(None) => json!({"manifest": manifest}),
                        Err(e) => json!({"manifest": manifest, "error": e}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(());
            }
            if profiles.is_empty() {
                println!("no startup profiles in {}", store.dir().display());
            }
            for (manifest, loaded) in profiles {
                match loaded {
                    Ok(Some(p)) => println!(
                        "{manifest}  {} start(s), {} ranges, {}",
                        p.starts,
                        p.layers.iter().map(|l| l.ranges.len()).sum::<usize>(),
                        human_size(p.bytes())
                    ),
                    Ok(None) => {}
                    Err(e) => println!("{manifest}  unusable: {e}"),
                }
            }
            Ok(())
        }
        ProfileCommand::Show {
            image,
            platform,
            json,
        } => {
            let manifest = manifest_digest(config, &image, &platform)?;
            let profile = store
                .load(&manifest)
                .map_err(|e| anyhow!("the profile of {manifest} is unusable: {e}"))?
                .with_context(|| format!("no startup profile for {manifest} on this node"))?;
            if json {
                println!("{}", String::from_utf8_lossy(&profile.to_bytes()));
                return Ok(());
            }
            println!(
                "{manifest}: {} start(s), {}",
                profile.starts,
                human_size(profile.bytes())
            );
            for layer in &profile.layers {
                println!("layer {}", layer.digest);
                for range in &layer.ranges {
                    println!(
                        "  {:>10} +{:<10} {} (read by {} of {})",
                        range.offset, range.len, range.path, range.seen, profile.starts
                    );
                }
            }
            Ok(())
        }
        ProfileCommand::Record(args) => record(config, &store, &args),
        ProfileCommand::Rm { image, platform } => {
            let manifest = manifest_digest(config, &image, &platform)?;
            if store.remove(&manifest)? {
                println!("removed the startup profile of {manifest}");
            } else {
                println!("no startup profile for {manifest} on this node");
            }
            Ok(())
        }
    }
}

/// `pronto profile record`: pull, run once, wait for the daemon's
/// recording, push.
fn record(config: &Config, store: &ProfileStore, args: &RecordArgs) -> Result<()> {
    let manifest = manifest_digest(config, &args.reference, &args.platform)?;
    let starts_before = store.load(&manifest).ok().flatten().map_or(0, |p| p.starts);
    let platform: Platform = args.platform.parse().map_err(|e: String| anyhow!(e))?;
    let runtime = super::runtime()?;
    let client = registry_client(config)?;
    let options = PullOptions {
        address: args.address.clone(),
        namespace: args.namespace.clone(),
        snapshotter: "pronto".into(),
        platform,
        work_dir: config.root.join("pull"),
    };
    let report = runtime.block_on(pull(&client, &args.reference, &options, &|line| {
        eprintln!("{line}")
    }))?;
    let lazy = report
        .layers
        .iter()
        .filter(|(_, o)| *o == LayerOutcome::Remote || *o == LayerOutcome::Present)
        .count();
    println!("pulled {} ({lazy} layers lazy or present)", report.name);
    let id = format!("pronto-profile-{}", std::process::id());
    let ctr = |args_: &[&str]| {
        let mut command = std::process::Command::new("ctr");
        command
            .arg("--address")
            .arg(&args.address)
            .args(["--namespace", &args.namespace])
            .args(args_);
        command
    };
    // The pull named the image by its reference and by digest, as CRI
    // does; both go afterwards so that containerd drops its snapshots.
    let by_digest = parse_reference(&report.name)
        .map(|r| format!("{}/{}@{}", r.registry(), r.repository(), report.target))
        .unwrap_or_default();
    let remove_images = || {
        let _ = ctr(&["images", "rm", "--sync", &report.name, &by_digest]).output();
    };
    let mut run = ctr(&["run", "--rm", "--snapshotter", "pronto", &report.name, &id])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("run the image with ctr")?;
    let deadline = Instant::now() + args.time_limit;
    let status = loop {
        if let Some(status) = run.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    match status {
        Some(status) => println!("the container exited ({status})"),
        None => {
            println!(
                "the container ran for {}s: stopped",
                args.time_limit.as_secs()
            );
            let _ = ctr(&["task", "kill", "--signal", "SIGKILL", &id]).output();
            let _ = run.wait();
        }
    }
    // The daemon stores the recording once the start has gone quiet.
    let deadline = Instant::now() + Duration::from_secs(120);
    let profile = loop {
        if let Ok(Some(profile)) = store.load(&manifest)
            && profile.starts > starts_before
        {
            break profile;
        }
        if Instant::now() >= deadline {
            remove_images();
            bail!(
                "pronto serve recorded no profile of {manifest} (is it running with this configuration, with [profile] record on? a profile of {starts_before} starts is complete)"
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };
    remove_images();
    println!(
        "recorded: {} start(s), {} ranges, {}",
        profile.starts,
        profile.layers.iter().map(|l| l.ranges.len()).sum::<usize>(),
        human_size(profile.bytes())
    );
    if args.push {
        let reference = parse_reference(&args.reference)?;
        let digest = runtime.block_on(pronto_snapshotter::profiles::push(
            &client,
            &Repository::of(&reference),
            &profile,
        ))?;
        println!("pushed as {digest}, a referrer of {manifest}");
    }
    Ok(())
}

/// `image` as a manifest digest: given as one, or resolved in the
/// registry for `platform`.
fn manifest_digest(config: &Config, image: &str, platform: &str) -> Result<String> {
    if image.starts_with("sha256:") {
        return Ok(image.to_owned());
    }
    let reference = parse_reference(image)?;
    let platform: Platform = platform.parse().map_err(|e: String| anyhow!(e))?;
    let client = registry_client(config)?;
    let resolved = super::runtime()?.block_on(client.resolve(&reference, &platform))?;
    Ok(resolved.manifest.digest.to_string())
}
