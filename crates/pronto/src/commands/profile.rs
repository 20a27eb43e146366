//! `pronto profile list|show|rm`: the startup profiles kept on this node
//! (`<root>/profiles/`), recorded by `pronto serve` as images start.

use anyhow::{Context, Result, anyhow};
use pronto_fs::profile::{Profile, ProfileStore};
use pronto_registry::{Platform, parse_reference};
use serde_json::json;

use crate::cli::ProfileCommand;
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
