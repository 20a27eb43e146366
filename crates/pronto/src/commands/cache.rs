//! `pronto cache stats|prune`.

use anyhow::Result;
use serde_json::json;

use crate::cli::CacheCommand;
use crate::commands::mount::open_cache;
use crate::config::Config;
use crate::text::human_size;

pub fn run(cmd: CacheCommand, config: &Config) -> Result<()> {
    let cache = open_cache(config)?;
    match cmd {
        CacheCommand::Stats { json } => {
            let s = cache.stats();
            if json {
                let value = json!({"entries": s.entries, "bytes": s.bytes, "budget": s.budget});
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
