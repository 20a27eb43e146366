//! `pronto pack DIR --target REF`: a directory becomes a one-layer image
//! in the chunked form `pronto convert` writes, pushed to a registry (what
//! `nydusify pack` does for Nydus). The layer is a valid `tar+gzip` or
//! `tar+zstd` layer, so any runtime unpacks it; Pronto reads it lazily.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use pronto_registry::{OCI_MANIFEST, Platform, RegistryClient};
use pronto_toc::{WriteOptions, write_chunked};
use serde_json::json;

use crate::commands::convert::{layer_descriptor, push_image, push_layer, target_tag};
use crate::commands::image::registry_client;
use crate::config::Config;
use crate::text::human_size;

/// What `pronto pack` was asked.
#[derive(Debug)]
pub struct PackRequest<'a> {
    pub dir: &'a Path,
    pub target: &'a str,
    pub platform: Option<&'a str>,
    pub options: WriteOptions,
}

pub fn run(request: &PackRequest<'_>, config: &Config) -> Result<()> {
    let runtime = super::runtime()?;
    let client = registry_client(config)?;
    runtime.block_on(pack(&client, request))
}

async fn pack(client: &RegistryClient, request: &PackRequest<'_>) -> Result<()> {
    let meta =
        std::fs::metadata(request.dir).with_context(|| format!("{}", request.dir.display()))?;
    if !meta.is_dir() {
        bail!("{} is not a directory", request.dir.display());
    }
    let platform: Platform = match request.platform {
        Some(text) => text.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        None => super::host_platform(),
    };
    let (repository, tag) = target_tag(request.target)?;
    let work = tempfile::tempdir().context("create a working directory")?;
    let tar_path = work.path().join("layer.tar");
    let out = work.path().join("layer");
    let options = request.options;
    let dir = request.dir.to_owned();
    let (converted, packed) = tokio::task::spawn_blocking({
        let (tar_path, out) = (tar_path.clone(), out.clone());
        move || -> Result<(pronto_toc::Converted, pronto_toc::Packed)> {
            let packed = {
                let mut tar = BufWriter::new(std::fs::File::create(&tar_path)?);
                let packed = pronto_toc::tar_of_dir(&dir, &mut tar)?;
                tar.flush()?;
                packed
            };
            let tar = std::fs::File::open(&tar_path)?;
            let mut writer = BufWriter::new(std::fs::File::create(&out)?);
            let converted = write_chunked(&tar, &mut writer, &options)?;
            writer.flush()?;
            Ok((converted, packed))
        }
    })
    .await??;
    let _ = std::fs::remove_file(&tar_path);
    push_layer(client, &repository, &out, &converted.digest)
        .await
        .context("push the layer")?;
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .context("format the time")?;
    let mut config = json!({
        "created": created,
        "architecture": platform.architecture,
        "os": platform.os,
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": [converted.diff_id]},
        "history": [{
            "created": created,
            "created_by": format!("pronto pack {}", request.dir.display()),
        }],
    });
    if let Some(variant) = &platform.variant {
        config["variant"] = variant.clone().into();
    }
    let layer = layer_descriptor(&converted, None);
    let (digest, bytes) = push_image(client, &repository, &config, vec![layer], None).await?;
    client
        .push_manifest(&repository, &tag, OCI_MANIFEST, bytes)
        .await
        .with_context(|| format!("tag the packed image {tag}"))?;
    for skipped in &packed.skipped {
        println!("{skipped}: a socket, left out");
    }
    println!(
        "{} → {}@{digest}: {} entries, {} of files → {} layer",
        request.dir.display(),
        request.target,
        packed.entries,
        human_size(packed.bytes),
        human_size(converted.size),
    );
    Ok(())
}
