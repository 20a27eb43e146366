//! `pronto`: the one binary that runs on every node. This file only parses
//! arguments, loads the configuration and hands off to a command in
//! [`commands`]; format, network and filesystem logic live in the library
//! crates.

mod cli;
mod commands;
mod config;
mod kube;
mod metrics_endpoint;
mod text;
mod warm;
mod warm_hub;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;

fn main() -> ExitCode {
    tune_allocator();
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

/// Keeps the daemon's memory from growing with mounts and uptime. glibc
/// raises its mmap threshold each time a large block is freed; after that
/// every large buffer (each FUSE session's 16 MiB request buffer, span
/// data) comes from a heap arena, is zeroed page by page, and is not
/// returned when freed: resident memory grew by about 16 MiB per mount and
/// kept growing as images came and went. A fixed threshold keeps large
/// buffers mapped on demand (untouched pages cost nothing) and returned
/// when freed; fewer arenas keep freed small blocks reusable.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use nix::libc::{M_ARENA_MAX, M_MMAP_THRESHOLD, mallopt};
        // SAFETY: mallopt only sets allocator parameters; it is called
        // before any other thread exists.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 1 << 20);
            mallopt(M_ARENA_MAX, 4);
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
