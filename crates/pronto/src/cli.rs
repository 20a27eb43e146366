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
    /// Look at images in a registry.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Show an image's platforms, layers, config and referrers, read from
    /// its registry (nothing is pulled). Credentials come from docker's
    /// config.json and its credential helpers.
    Inspect {
        /// Image reference; short names are normalised as containerd does
        /// (`busybox` is `docker.io/library/busybox:latest`).
        reference: String,
        /// Platform to show from a multi-platform image.
        #[arg(long, default_value = "linux/amd64", value_name = "OS/ARCH[/VARIANT]")]
        platform: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the effective configuration (file values over defaults) as TOML.
    Show,
    /// Load the configuration and report whether it is valid.
    Check,
}
