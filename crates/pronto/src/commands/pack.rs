//! `pronto pack DIR --target REF`: a directory becomes a one-layer image
//! in the chunked form `pronto convert` writes, pushed to a registry (what
//! `nydusify pack` does for Nydus). The layer is a valid `tar+gzip` or
//! `tar+zstd` layer, so any runtime unpacks it; Pronto reads it lazily.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pronto_layer::Compression;
use pronto_registry::{OCI_MANIFEST, Platform, RegistryClient, Repository};
use pronto_toc::{WriteOptions, write_chunked};
use serde_json::{Map, Value, json};

use crate::commands::convert::{OCI_CONFIG, push_layer, verify};
use crate::commands::image::registry_client;
use crate::config::Config;
use crate::text::human_size;

/// What `pronto pack` was asked.
#[derive(Debug)]
pub struct PackRequest<'a> {
    pub dir: &'a Path,
    pub target: &'a str,
    pub platform: Option<&'a str>,
    pub chunk_size: u64,
    pub compression: Compression,
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
        None => host_platform(),
    };
    let target = pronto_registry::parse_reference(request.target)?;
    let tag = match (target.digest(), target.tag()) {
        (Some(_), _) => bail!("{}: name the target by tag, not by digest", request.target),
        (None, Some(tag)) => tag.to_owned(),
        (None, None) => "latest".to_owned(),
    };
    let repository = Repository::of(&target);
    let work = tempfile::tempdir().context("create a working directory")?;
    let tar_path = work.path().join("layer.tar");
    let out = work.path().join("layer");
    let options = WriteOptions {
        chunk_size: request.chunk_size,
        compression: request.compression,
        level: None,
    };
    let dir = request.dir.to_owned();
    let (converted, packed) = tokio::task::spawn_blocking({
        let (tar_path, out) = (tar_path.clone(), out.clone());
        move || -> Result<(pronto_toc::Converted, Packed)> {
            let packed = {
                let mut tar = BufWriter::new(std::fs::File::create(&tar_path)?);
                let packed = write_tar(&dir, &mut tar)?;
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
    let pushed = push_layer(client, &repository, &out, &converted.digest)
        .await
        .context("push the layer")?;
    if pushed != converted.digest {
        bail!(
            "the registry stored {pushed}, Pronto wrote {}",
            converted.digest
        );
    }
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
    let config_bytes = serde_json::to_vec(&config)?;
    let config_size = config_bytes.len();
    let config_digest = client
        .push_blob(&repository, config_bytes.into())
        .await
        .context("push the config")?;
    let annotations: Map<String, Value> = converted
        .annotations
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{
            "mediaType": converted.media_type,
            "digest": converted.digest,
            "size": converted.size,
            "annotations": annotations,
        }],
    });
    let bytes = bytes::Bytes::from(serde_json::to_vec(&manifest)?);
    let digest = pronto_registry::sha256_digest(&bytes);
    client
        .push_manifest(&repository, &digest, OCI_MANIFEST, bytes.clone())
        .await
        .context("push the manifest")?;
    verify(client, &repository, &digest)
        .await
        .context("read the packed image back")?;
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

/// The platform of this machine.
fn host_platform() -> Platform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    };
    Platform {
        os: "linux".into(),
        architecture: architecture.into(),
        variant: None,
    }
}

/// What [`write_tar`] put in the tar.
#[derive(Debug, Default)]
struct Packed {
    entries: u64,
    /// Bytes of regular files.
    bytes: u64,
    /// Paths left out (sockets).
    skipped: Vec<String>,
}

/// Writes the tree under `root` as a tar (names relative to it, in name
/// order, so the same tree gives the same layer): directories, regular
/// files, symlinks, hard links (as links to the first name), devices and
/// FIFOs with their modes, owners, times and extended attributes.
fn write_tar(root: &Path, out: impl Write) -> Result<Packed> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut packed = Packed::default();
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&path)
            .with_context(|| format!("read {}", path.display()))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("read {}", path.display()))?;
        names.sort();
        // Subdirectories are walked after this directory's other entries,
        // in name order (pushed in reverse).
        let mut dirs = Vec::new();
        for name in names {
            let rel = rel.join(&name);
            let path = root.join(&rel);
            let meta = std::fs::symlink_metadata(&path)
                .with_context(|| format!("read {}", path.display()))?;
            let kind = meta.file_type();
            if kind.is_socket() {
                packed.skipped.push(rel.display().to_string());
                continue;
            }
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            append_xattrs(&mut builder, &path, kind.is_symlink())?;
            let failed = || format!("pack {}", path.display());
            packed.entries += 1;
            if kind.is_dir() {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, &rel, std::io::empty())
                    .with_context(failed)?;
                dirs.push(rel);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).with_context(failed)?;
                header.set_size(0);
                builder
                    .append_link(&mut header, &rel, &target)
                    .with_context(failed)?;
            } else if kind.is_file() {
                if meta.nlink() > 1 {
                    if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                        header.set_entry_type(tar::EntryType::Link);
                        header.set_size(0);
                        builder
                            .append_link(&mut header, &rel, first)
                            .with_context(failed)?;
                        continue;
                    }
                    links.insert((meta.dev(), meta.ino()), rel.clone());
                }
                let file = std::fs::File::open(&path).with_context(failed)?;
                let data = Exactly {
                    inner: file.take(meta.len()),
                    left: meta.len(),
                };
                builder
                    .append_data(&mut header, &rel, data)
                    .with_context(failed)?;
                packed.bytes += meta.len();
            } else {
                // Devices and FIFOs: the header says it all.
                let rdev = meta.rdev();
                if kind.is_char_device() || kind.is_block_device() {
                    header.set_device_major(nix::sys::stat::major(rdev) as u32)?;
                    header.set_device_minor(nix::sys::stat::minor(rdev) as u32)?;
                }
                header.set_size(0);
                builder
                    .append_data(&mut header, &rel, std::io::empty())
                    .with_context(failed)?;
            }
        }
        stack.extend(dirs.into_iter().rev());
    }
    builder.into_inner().context("finish the tar")?;
    Ok(packed)
}

/// Extended attributes a layer carries: user, trusted and file
/// capabilities (SELinux labels and ACLs belong to the node).
fn append_xattrs(builder: &mut tar::Builder<impl Write>, path: &Path, symlink: bool) -> Result<()> {
    if symlink {
        return Ok(());
    }
    let mut records = Vec::new();
    let names = xattr::list(path).with_context(|| format!("list xattrs of {}", path.display()))?;
    for name in names {
        let Some(text) = name.to_str() else { continue };
        if !(text.starts_with("user.")
            || text.starts_with("trusted.")
            || text == "security.capability")
        {
            continue;
        }
        if let Some(value) = xattr::get(path, &name)
            .with_context(|| format!("read xattr {text} of {}", path.display()))?
        {
            records.push((format!("SCHILY.xattr.{text}"), value));
        }
    }
    if !records.is_empty() {
        builder.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
    }
    Ok(())
}

/// A file's bytes, exactly as many as it had when its header was written:
/// a file that shrinks while it is packed is an error, not a corrupt tar.
struct Exactly<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while it was packed",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
