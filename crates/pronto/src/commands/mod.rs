//! One module per subcommand; each takes the parsed arguments and the loaded
//! configuration and does its work through the library crates.

mod cache;
mod config;
mod convert;
mod doctor;
pub(crate) mod image;
mod index;
mod mount;
mod node;
mod pack;
mod profile;
mod pull;
mod serve;
mod status;
mod warm;

use anyhow::Result;

use crate::cli::{Cli, Command};
use crate::config::LoadedConfig;

/// The runtime of every command that talks to registries or containerd.
fn runtime() -> Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

pub fn run(cli: Cli) -> Result<()> {
    let loaded = LoadedConfig::load(cli.config.as_deref())?;
    match cli.command {
        Command::Config(cmd) => config::run(cmd, &loaded),
        Command::Image(cmd) => image::run(cmd, &loaded.config),
        Command::Index(cmd) => index::run(cmd, &loaded.config),
        Command::Convert {
            source,
            target,
            platform,
            chunks,
        } => convert::run(
            &convert::ConvertRequest {
                source: &source,
                target: &target,
                platform: platform.as_deref(),
                options: chunks.options(),
            },
            &loaded.config,
        ),
        Command::Pack {
            dir,
            target,
            platform,
            chunks,
        } => pack::run(
            &pack::PackRequest {
                dir: &dir,
                target: &target,
                platform: platform.as_deref(),
                options: chunks.options(),
            },
            &loaded.config,
        ),
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
        Command::Doctor {
            reference,
            json,
            containerd_config,
            fuse_device,
            platform,
        } => {
            let healthy = doctor::run(
                &loaded.config,
                &doctor::DoctorArgs {
                    reference,
                    json,
                    containerd_config,
                    fuse_device,
                    platform,
                },
            )?;
            if !healthy {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Serve => serve::run(&loaded.config, loaded.path.as_deref()),
        Command::Keeper { stop, socket } => serve::keeper(&loaded.config, stop, socket),
        Command::Status { json } => status::run(&loaded.config, json),
        Command::Warm { reference, mode } => warm::run(&loaded.config, &reference, &mode),
        Command::WarmHub { listen, token_file } => warm::hub(listen, token_file.as_deref()),
        Command::Umount { dir } => mount::unmount(&dir),
        Command::Cache(cmd) => cache::run(cmd, &loaded.config),
        Command::Node(cmd) => node::run(cmd, &loaded.config),
        Command::Profile(cmd) => profile::run(cmd, &loaded.config),
    }
}

/// The platform of this machine.
pub(crate) fn host_platform() -> pronto_registry::Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    };
    pronto_registry::Platform {
        os: "linux".into(),
        architecture: architecture.into(),
        variant: None,
    }
}
