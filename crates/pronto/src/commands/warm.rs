//! `pronto warm REF` (through the running daemon) and `pronto warm-hub`.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::config::Config;
use crate::text::human_size;
use crate::warm_hub::{Hub, serve};

pub fn run(config: &Config, reference: &str, mode: &str) -> Result<()> {
    let runtime = super::runtime()?;
    let status = runtime
        .block_on(pronto_snapshotter::status::warm(
            &config.address,
            reference,
            mode,
        ))
        .map_err(|problem| {
            anyhow::anyhow!("pronto serve at {}: {problem}", config.address.display())
        })?;
    if status.state != "warm" {
        bail!("{reference} is not warm: {}", status.reason);
    }
    println!(
        "{reference} is warm ({}): {}, {} fetched ahead",
        status.mode,
        status.digest,
        human_size(status.bytes)
    );
    Ok(())
}

pub fn hub(listen: std::net::SocketAddr, token_file: Option<&Path>) -> Result<()> {
    let token = match token_file {
        Some(path) => {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("read the token file {}", path.display()))?;
            let token = token.trim().to_owned();
            if token.is_empty() {
                bail!("the token file {} is empty", path.display());
            }
            Some(token)
        }
        None => {
            tracing::warn!(
                "no --token-file: notifications are taken from anyone who can reach the hub"
            );
            None
        }
    };
    let runtime = super::runtime()?;
    runtime.block_on(async {
        let shutdown = async {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
        };
        serve(std::sync::Arc::new(Hub::new(token)), listen, shutdown).await
    })
}
