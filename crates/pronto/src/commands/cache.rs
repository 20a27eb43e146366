//! `pronto cache stats|prune`.

use anyhow::Result;
use serde_json::json;

use crate::cli::CacheCommand;
use crate::commands::mount::open_cache;
use crate::config::Config;
use crate::text::human_size;

pub fn run(cmd: CacheCommand, config: &Config) -> Result<()> {
    let cache = match (&cmd, open_cache(config)) {
        (_, Ok(cache)) => cache,
        // A running mount or daemon holds the cache: count its files.
        (CacheCommand::Stats { json }, Err(err)) => {
            tracing::debug!("{err:#}");
            let (entries, bytes) = pronto_store::scan_usage(&config.root)?;
            let budget = config.cache.budget_bytes();
            if *json {
                println!(
                    "{}",
                    json!({"entries": entries, "bytes": bytes, "budget": budget, "in_use": true})
                );
            } else {
                println!(
                    "{entries} entries, {} of {} budget (in use by a running pronto)",
                    human_size(bytes),
                    human_size(budget)
                );
            }
            return Ok(());
        }
        (CacheCommand::Prune { .. }, Err(err)) => return Err(err),
    };
    match cmd {
        CacheCommand::Stats { json } => {
            let s = cache.stats();
            if json {
                let value = json!({"entries": s.entries, "bytes": s.bytes, "budget": s.budget, "in_use": false});
                println!("{value}");
            } else {
                println!(
                    "{} entries, {} of {} budget ({:.1}%)",
                    s.entries,
                    human_size(s.bytes),
                    human_size(s.budget),
                    100.0 * s.bytes as f64 / s.budget.max(1) as f64
                );
            }
        }
        CacheCommand::Prune { to } => {
            let before = cache.stats();
            cache.evict_to(to)?;
            let after = cache.stats();
            println!(
                "pruned {} entries ({}); {} left",
                before.entries - after.entries,
                human_size(before.bytes - after.bytes),
                human_size(after.bytes)
            );
        }
    }
    Ok(())
}
