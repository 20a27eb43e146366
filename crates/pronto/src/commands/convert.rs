//! `pronto convert SRC DST`: an image becomes its chunked form, registry
//! to registry, every platform of a multi-platform image. Every layer
//! stays a valid `tar+gzip` (eStargz) or `tar+zstd` (zstd:chunked) layer
//! that unpacks to the source's tree (containerd's default snapshotter,
//! Docker and Podman run it); inside, file data is cut into chunks with a
//! table of contents, so nodes with Pronto read it lazily without an
//! index, and chunks shared by layers and images are fetched once per
//! node. When the source image has a startup profile (this node's, or one
//! among its referrers in the registry), the files it names are placed
//! first in each layer, and the profile is carried over to the converted
//! image.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use pronto_fs::profile::{LayerProfile, Profile, ProfileStore};
use pronto_layer::Compression;
use pronto_registry::{
    ManifestKind, OCI_INDEX, OCI_MANIFEST, ParallelFetch, Platform, RegistryClient, Repository,
};
use pronto_toc::{WriteOptions, write_chunked};
use serde_json::{Map, Value, json};

use crate::commands::image::registry_client;
use crate::config::Config;
use crate::text::{human_size, stderr_is_terminal};

pub(crate) const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// What `pronto convert` was asked.
#[derive(Debug)]
pub struct ConvertRequest<'a> {
    pub source: &'a str,
    pub target: &'a str,
    /// One platform only; `None`: every platform of a multi-platform
    /// image.
    pub platform: Option<&'a str>,
    pub options: WriteOptions,
}

pub fn run(request: &ConvertRequest<'_>, config: &Config) -> Result<()> {
    let runtime = super::runtime()?;
    let client = registry_client(config)?;
    let profiles = ProfileStore::new(config.profiles_dir());
    runtime.block_on(convert(&client, request, &profiles))
}

/// One converted image manifest.
struct ConvertedImage {
    digest: String,
    /// The manifest as pushed.
    bytes: bytes::Bytes,
    source_size: u64,
    written: u64,
    layers: usize,
}

async fn convert(
    client: &RegistryClient,
    request: &ConvertRequest<'_>,
    profiles: &ProfileStore,
) -> Result<()> {
    let source = pronto_registry::parse_reference(request.source)?;
    let (repository, tag) = target_tag(request.target)?;
    let options = request.options;
    let source_repository = Repository::of(&source);
    let wanted = source
        .digest()
        .or(source.tag())
        .unwrap_or("latest")
        .to_owned();
    let top = client
        .manifest(&source_repository, &wanted)
        .await
        .with_context(|| format!("read {}", request.source))?;
    let (platforms, index) = match (&top.kind, request.platform) {
        (ManifestKind::Index(index), None) => {
            let mut platforms = Vec::new();
            for entry in index.manifests() {
                let Some(p) = entry.platform() else {
                    println!("{}: no platform, left out", entry.digest());
                    continue;
                };
                if p.os().to_string() == "unknown" {
                    // BuildKit's attestations: nothing to run.
                    println!(
                        "{}: platform unknown (an attestation), left out",
                        entry.digest()
                    );
                    continue;
                }
                let mut platform = format!("{}/{}", p.os(), p.architecture());
                if let Some(variant) = p.variant() {
                    platform = format!("{platform}/{variant}");
                }
                platforms.push((platform, Some(entry.clone())));
            }
            if platforms.is_empty() {
                bail!(
                    "{}: the image index lists no platform to convert",
                    request.source
                );
            }
            (platforms, Some(index.clone()))
        }
        (_, Some(platform)) => (vec![(platform.to_owned(), None)], None),
        (ManifestKind::Image(_), None) => (vec![(String::new(), None)], None),
    };
    let mut converted = Vec::new();
    for (platform, _) in &platforms {
        let image = if platform.is_empty() {
            // A single-platform image: whatever platform it is.
            single_image(client, &source_repository, &top)
                .await
                .with_context(|| format!("resolve {}", request.source))?
        } else {
            let wanted: Platform = platform.parse().map_err(|e: String| anyhow!(e))?;
            client
                .resolve(&source, &wanted)
                .await
                .with_context(|| format!("resolve {} for {platform}", request.source))?
        };
        let profile = startup_profile(client, &image, profiles).await;
        let one = convert_image(client, &image, &repository, &options, profile.as_ref())
            .await
            .with_context(|| match platform.as_str() {
                "" => request.source.to_owned(),
                p => format!("{} ({p})", request.source),
            })?;
        converted.push(one);
    }
    let (digest, media_type, bytes) = match index {
        Some(index) => {
            let manifests: Vec<Value> = platforms
                .iter()
                .zip(&converted)
                .map(|((_, entry), image)| {
                    let entry = entry.as_ref().expect("index entries have descriptors");
                    let mut descriptor = json!({
                        "mediaType": OCI_MANIFEST,
                        "digest": image.digest,
                        "size": image.bytes.len(),
                        "platform": entry.platform(),
                    });
                    if let Some(annotations) = entry.annotations() {
                        descriptor["annotations"] = json!(annotations);
                    }
                    descriptor
                })
                .collect();
            let mut document = json!({
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": manifests,
            });
            if let Some(annotations) = index.annotations() {
                document["annotations"] = json!(annotations);
            }
            let bytes = bytes::Bytes::from(serde_json::to_vec(&document)?);
            let digest = pronto_registry::sha256_digest(&bytes);
            client
                .push_manifest(&repository, &digest, OCI_INDEX, bytes.clone())
                .await
                .context("push the image index")?;
            (digest, OCI_INDEX, bytes)
        }
        None => {
            let image = &converted[0];
            (image.digest.clone(), OCI_MANIFEST, image.bytes.clone())
        }
    };
    // Every manifest was pushed by digest and read back; only now is the
    // tag moved: a conversion that fails leaves no tag pointing at it.
    client
        .push_manifest(&repository, &tag, media_type, bytes)
        .await
        .with_context(|| format!("tag the converted image {tag}"))?;
    let total: u64 = converted.iter().map(|c| c.source_size).sum();
    let written: u64 = converted.iter().map(|c| c.written).sum();
    let layers: usize = converted.iter().map(|c| c.layers).sum();
    println!(
        "{} → {}@{digest}: {} platform{}, {layers} layers, {} → {} ({:+.1}%)",
        request.source,
        request.target,
        converted.len(),
        if converted.len() == 1 { "" } else { "s" },
        human_size(total),
        human_size(written),
        (written as f64 / total.max(1) as f64 - 1.0) * 100.0,
    );
    Ok(())
}

/// The repository and tag an image is pushed to: a tag, not a digest
/// (`latest` when the reference names neither).
pub(crate) fn target_tag(target: &str) -> Result<(Repository, String)> {
    let reference = pronto_registry::parse_reference(target)?;
    let tag = match (reference.digest(), reference.tag()) {
        (Some(_), _) => bail!("{target}: name the target by tag, not by digest"),
        (None, Some(tag)) => tag.to_owned(),
        (None, None) => "latest".to_owned(),
    };
    Ok((Repository::of(&reference), tag))
}

/// The single-platform image `top` (already fetched), with its config.
async fn single_image(
    client: &RegistryClient,
    repository: &Repository,
    top: &pronto_registry::Manifest,
) -> Result<pronto_registry::ResolvedImage> {
    let ManifestKind::Image(image) = &top.kind else {
        bail!("{} is not an image manifest", top.digest);
    };
    let config_digest = image.config().digest().to_string();
    let config_bytes = client
        .blob(repository, &config_digest, pronto_registry::MAX_CONFIG_SIZE)
        .await?;
    let config = serde_json::from_slice(&config_bytes).context("the image config")?;
    Ok(pronto_registry::ResolvedImage {
        repository: repository.clone(),
        index: None,
        manifest: top.clone(),
        image: (**image).clone(),
        config,
        config_bytes,
    })
}

/// The startup profile of the source image: this node's and those among
/// its referrers in the registry, merged. `None` when there is none.
async fn startup_profile(
    client: &RegistryClient,
    image: &pronto_registry::ResolvedImage,
    profiles: &ProfileStore,
) -> Option<Profile> {
    let manifest = image.manifest.digest.to_string();
    let local = match profiles.load(&manifest) {
        Ok(local) => local,
        Err(e) => {
            println!("{manifest}: this node's startup profile is not used: {e}");
            None
        }
    };
    let remote =
        match pronto_snapshotter::profiles::registry_profile(client, &image.repository, &manifest)
            .await
        {
            Ok(remote) => remote,
            Err(e) => {
                println!("{manifest}: no startup profile from the registry: {e}");
                None
            }
        };
    match (local, remote) {
        (Some(local), Some(remote)) => Some(local.merge(&remote)),
        (local, remote) => local.or(remote),
    }
}

/// Converts one image manifest's layers, pushes them and its config and
/// manifest by digest, and reads it back. With a startup `profile`, the
/// files it names come first in each layer, and the profile, its layers
/// renamed, is pushed as a referrer of the converted image.
async fn convert_image(
    client: &RegistryClient,
    image: &pronto_registry::ResolvedImage,
    repository: &Repository,
    options: &WriteOptions,
    profile: Option<&Profile>,
) -> Result<ConvertedImage> {
    let work = tempfile::tempdir().context("create a working directory")?;
    let layers = image.image.layers();
    let total: u64 = layers.iter().map(|l| l.size()).sum();
    let progress = if stderr_is_terminal() {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
                .expect("a valid template"),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut descriptors = Vec::new();
    let mut diff_ids = Vec::new();
    let mut written = 0u64;
    let mut placed = 0;
    // Source layer digest to converted layer digest.
    let mut renamed: Vec<(String, String)> = Vec::new();
    for (i, layer) in layers.iter().enumerate() {
        let digest = layer.digest().to_string();
        progress.set_message(format!("layer {}/{}", i + 1, layers.len()));
        let media_type = layer.media_type().to_string();
        let compression = Compression::from_media_type(&media_type).ok_or_else(|| {
            anyhow!("layer {digest}: media type {media_type} cannot be converted (tar, tar+gzip and tar+zstd layers can)")
        })?;
        let blob = work.path().join(format!("source-{i}"));
        client
            .blob_to_file_parallel(
                &image.repository,
                &digest,
                layer.size(),
                &blob,
                ParallelFetch::default(),
            )
            .await
            .with_context(|| format!("fetch layer {digest}"))?;
        let out = work.path().join(format!("chunked-{i}"));
        let mut first: Vec<String> = Vec::new();
        for range in profile.map(|p| p.wanted(&digest)).unwrap_or_default() {
            if !first.contains(&range.path) {
                first.push(range.path);
            }
        }
        let (converted, moved) = tokio::task::spawn_blocking({
            let (blob, out, digest, options) =
                (blob.clone(), out.clone(), digest.clone(), *options);
            move || chunk_layer(&blob, compression, &out, &options, &digest, &first)
        })
        .await??;
        placed += moved;
        renamed.push((digest.clone(), converted.digest.clone()));
        push_layer(client, repository, &out, &converted.digest)
            .await
            .with_context(|| format!("push the chunked form of layer {digest}"))?;
        descriptors.push(layer_descriptor(&converted, layer.annotations().as_ref()));
        diff_ids.push(Value::String(converted.diff_id));
        written += converted.size;
        progress.inc(layer.size());
        let _ = std::fs::remove_file(&blob);
        let _ = std::fs::remove_file(&out);
    }
    progress.finish_and_clear();

    // The config names each layer's uncompressed digest, which now
    // includes the TOC; everything else is kept.
    let mut config: Value =
        serde_json::from_slice(&image.config_bytes).context("the source image's config")?;
    config["rootfs"]["diff_ids"] = Value::Array(diff_ids);
    let (digest, bytes) = push_image(
        client,
        repository,
        &config,
        descriptors,
        image.image.annotations().as_ref(),
    )
    .await?;
    if let Some(profile) = profile {
        let carried = Profile {
            manifest: digest.clone(),
            layers: profile
                .layers
                .iter()
                .filter_map(|l| {
                    let (_, to) = renamed.iter().find(|(from, _)| *from == l.digest)?;
                    Some(LayerProfile {
                        digest: to.clone(),
                        ranges: l.ranges.clone(),
                    })
                })
                .collect(),
            ..profile.clone()
        };
        let pushed = pronto_snapshotter::profiles::push(client, repository, &carried)
            .await
            .context("push the startup profile of the converted image")?;
        println!(
            "{}: startup profile ({} start(s)): {placed} files placed first; carried over as {pushed}",
            image.manifest.digest, profile.starts
        );
    }
    Ok(ConvertedImage {
        digest,
        bytes,
        source_size: total,
        written,
        layers: layers.len(),
    })
}

/// The manifest's descriptor of a chunked layer: `source` annotations
/// (the layer's before conversion, if any) and those the TOC needs.
pub(crate) fn layer_descriptor(
    converted: &pronto_toc::Converted,
    source: Option<&std::collections::HashMap<String, String>>,
) -> Value {
    let mut annotations: Map<String, Value> = source
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    for (key, value) in &converted.annotations {
        annotations.insert(key.clone(), value.clone().into());
    }
    json!({
        "mediaType": converted.media_type,
        "digest": converted.digest,
        "size": converted.size,
        "annotations": annotations,
    })
}

/// Pushes `config` and an image manifest over `layers` (already pushed)
/// by digest, then reads the image back as a node would. Returns the
/// manifest's digest and bytes; nothing is tagged.
pub(crate) async fn push_image(
    client: &RegistryClient,
    repository: &Repository,
    config: &Value,
    layers: Vec<Value>,
    annotations: Option<&std::collections::HashMap<String, String>>,
) -> Result<(String, bytes::Bytes)> {
    let config_bytes = serde_json::to_vec(config)?;
    let config_size = config_bytes.len();
    let config_digest = client
        .push_blob(repository, config_bytes.into())
        .await
        .context("push the config")?;
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": layers,
    });
    if let Some(annotations) = annotations {
        manifest["annotations"] = json!(annotations);
    }
    let bytes = bytes::Bytes::from(serde_json::to_vec(&manifest)?);
    let digest = pronto_registry::sha256_digest(&bytes);
    client
        .push_manifest(repository, &digest, OCI_MANIFEST, bytes.clone())
        .await
        .context("push the manifest")?;
    verify(client, repository, &digest)
        .await
        .context("read the image back")?;
    Ok((digest, bytes))
}

/// Uploads the layer at `path` (digest `digest`) unless the repository has
/// it, in parts of `UPLOAD_PART` (16 MiB) read from the file one at a
/// time; the registry checks the digest.
pub(crate) async fn push_layer(
    client: &RegistryClient,
    repository: &Repository,
    path: &Path,
    digest: &str,
) -> Result<()> {
    if client.blob_exists(repository, digest).await? {
        return Ok(());
    }
    client
        .push_blob_file(repository, path, digest, pronto_registry::UPLOAD_PART)
        .await?;
    Ok(())
}

/// Decompresses the layer blob at `blob` and writes its chunked form to
/// `out`, the regular files named in `first` placed first. Returns what
/// was written and how many files were placed first.
fn chunk_layer(
    blob: &Path,
    compression: Compression,
    out: &Path,
    options: &WriteOptions,
    digest: &str,
    first: &[String],
) -> Result<(pronto_toc::Converted, usize)> {
    let tar_path = out.with_extension("tar");
    {
        let source = std::fs::File::open(blob)?;
        let mut tar = BufWriter::new(std::fs::File::create(&tar_path)?);
        std::io::copy(&mut compression.decoder(source)?, &mut tar)
            .with_context(|| format!("layer {digest} does not decompress"))?;
        tar.flush()?;
    }
    let mut moved = 0;
    if !first.is_empty() {
        let ordered_path = out.with_extension("ordered.tar");
        let mut ordered = BufWriter::new(std::fs::File::create(&ordered_path)?);
        moved = pronto_toc::startup_first(&std::fs::File::open(&tar_path)?, &mut ordered, first)
            .with_context(|| format!("layer {digest} is not a tar Pronto can convert"))?;
        ordered.flush()?;
        std::fs::rename(&ordered_path, &tar_path)?;
    }
    let tar = std::fs::File::open(&tar_path)?;
    let mut writer = BufWriter::new(std::fs::File::create(out)?);
    let converted = write_chunked(&tar, &mut writer, options)
        .with_context(|| format!("layer {digest} is not a tar Pronto can convert"))?;
    writer.flush()?;
    drop(tar);
    let _ = std::fs::remove_file(&tar_path);
    Ok((converted, moved))
}

/// Reads the image `digest` back: the manifest, and every layer's TOC,
/// found and checked as a node would through the manifest's annotations.
pub(crate) async fn verify(
    client: &RegistryClient,
    repository: &Repository,
    digest: &str,
) -> Result<()> {
    let manifest = client.manifest(repository, digest).await?;
    let ManifestKind::Image(image) = manifest.kind else {
        bail!("{digest} is not an image manifest");
    };
    for layer in image.layers() {
        let toc = layer
            .annotations()
            .as_ref()
            .and_then(|a| pronto_toc::TocRef::of(layer.media_type().as_ref(), a))
            .ok_or_else(|| anyhow!("layer {} has no TOC annotations", layer.digest()))??;
        let fetched = pronto_fs::fetch_toc(
            client,
            repository,
            layer.digest().as_ref(),
            layer.size(),
            &toc,
        )
        .await?;
        pronto_toc::parse_toc(
            &fetched.json,
            fetched.chunks_end,
            &pronto_toc::Limits::default(),
        )
        .with_context(|| format!("layer {}", layer.digest()))?;
    }
    Ok(())
}
