//! `pronto config show|check`.

use anyhow::{Context, Result};

use crate::cli::ConfigCommand;
use crate::config::LoadedConfig;

pub fn run(cmd: ConfigCommand, loaded: &LoadedConfig) -> Result<()> {
    match cmd {
        ConfigCommand::Show => {
            let text =
                toml::to_string(&loaded.config).context("cannot render the configuration")?;
            print!("{text}");
        }
        ConfigCommand::Check => println!("configuration OK ({})", loaded.source()),
    }
    Ok(())
}
