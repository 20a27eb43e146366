//! Command-line surface of `pronto`: global options and subcommands.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Pronto starts containers from large images in seconds: it mounts image
/// layers lazily and fetches file data on demand from any OCI registry.
#[derive(Debug, Parser)]
#[command(name = "pronto", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Configuration file (TOML) [default: /etc/pronto/config.toml].
    /// When the default file does not exist, built-in defaults apply; a file
    /// named here or in PRONTO_CONFIG must exist.
    #[arg(long, global = true, value_name = "FILE", env = "PRONTO_CONFIG")]
    pub config: Option<PathBuf>,

    /// Log filter, as a level (`debug`) or per-module directives
    /// (`info,pronto_registry=debug`). Logs are written to stderr.
    #[arg(
        long,
        global = true,
        value_name = "FILTER",
        env = "PRONTO_LOG",
        default_value = "info"
    )]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show or check Pronto's configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (file values over defaults) as TOML.
    Show,
    /// Load the configuration and report whether it is valid.
    Check,
}
