//! One module per subcommand; each takes the parsed arguments and the loaded
//! configuration and does its work through the library crates.

mod cache;
mod config;
pub(crate) mod image;
mod index;
mod mount;
mod pull;
mod serve;

use anyhow::Result;

use crate::cli::{Cli, Command};
use crate::config::LoadedConfig;

pub fn run(cli: Cli) -> Result<()> {
    let loaded = LoadedConfig::load(cli.config.as_deref())?;
    match cli.command {
        Command::Config(cmd) => config::run(cmd, &loaded),
        Command::Image(cmd) => image::run(cmd, &loaded.config),
        Command::Index(cmd) => index::run(cmd, &loaded.config),
        Command::Mount {
            reference,
            dir,
            platform,
            layer,
        } => mount::run(
            &loaded.config,
            &reference,
            &dir,
            &platform,
            layer.as_deref(),
        ),
        Command::Pull {
            reference,
            address,
            namespace,
            snapshotter,
            platform,
        } => pull::run(
            &loaded.config,
            &reference,
            address,
            namespace,
            snapshotter,
            &platform,
        ),
        Command::Serve => serve::run(&loaded.config),
        Command::Umount { dir } => mount::unmount(&dir),
        Command::Cache(cmd) => cache::run(cmd, &loaded.config),
    }
}
