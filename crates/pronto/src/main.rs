//! `pronto`: the one binary that runs on every node. This file only parses
//! arguments, loads the configuration and hands off to a command in
//! [`commands`]; format, network and filesystem logic live in the library
//! crates.

mod cli;
mod commands;
mod config;
mod metrics_endpoint;
mod text;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_level);
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("pronto: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr so that command output on stdout stays parseable.
fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
