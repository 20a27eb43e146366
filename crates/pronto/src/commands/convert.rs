//! `pronto convert SRC DST`: an image becomes its chunked form, registry
//! to registry. Every layer stays a valid `tar+gzip` layer that unpacks to
//! the source's tree (containerd's default snapshotter, Docker and Podman
//! run it); inside, file data is cut into chunks with an eStargz table of
//! contents, so nodes with Pronto read it lazily without an index, and
//! chunks shared by layers and images are fetched once per node.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use pronto_layer::Compression;
use pronto_registry::{OCI_MANIFEST, ParallelFetch, Platform, RegistryClient, Repository};
use pronto_toc::{
    TOC_DIGEST_ANNOTATION, UNCOMPRESSED_SIZE_ANNOTATION, WriteOptions, write_chunked,
};
use serde_json::{Map, Value, json};

use crate::commands::image::registry_client;
use crate::config::Config;
use crate::text::{human_size, stderr_is_terminal};

const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// What `pronto convert` was asked.
#[derive(Debug)]
pub struct ConvertRequest<'a> {
    pub source: &'a str,
    pub target: &'a str,
    pub platform: &'a str,
    pub chunk_size: u64,
}

pub fn run(request: &ConvertRequest<'_>, config: &Config) -> Result<()> {
    let runtime = super::runtime()?;
    let client = registry_client(config)?;
    runtime.block_on(convert(&client, request))
}

async fn convert(client: &RegistryClient, request: &ConvertRequest<'_>) -> Result<()> {
    let platform: Platform = request.platform.parse().map_err(|e: String| anyhow!(e))?;
    let source = pronto_registry::parse_reference(request.source)?;
    let target = pronto_registry::parse_reference(request.target)?;
    let tag = match (target.digest(), target.tag()) {
        (Some(_), _) => bail!("{}: name the target by tag, not by digest", request.target),
        (None, Some(tag)) => tag.to_owned(),
        (None, None) => "latest".to_owned(),
    };
    let image = client
        .resolve(&source, &platform)
        .await
        .with_context(|| format!("resolve {}", request.source))?;
    let repository = Repository::of(&target);
    let work = tempfile::tempdir().context("create a working directory")?;
    let options = WriteOptions {
        chunk_size: request.chunk_size,
        ..Default::default()
    };
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
    for (i, layer) in layers.iter().enumerate() {
        let digest = layer.digest().to_string();
        progress.set_message(format!("layer {}/{}", i + 1, layers.len()));
        let media_type = layer.media_type().to_string();
        let compression = Compression::from_media_type(&media_type).ok_or_else(|| {
            anyhow!("layer {digest}: media type {media_type} cannot be converted (tar and tar+gzip layers can)")
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
        let converted = tokio::task::spawn_blocking({
            let (blob, out, digest) = (blob.clone(), out.clone(), digest.clone());
            move || chunk_layer(&blob, compression, &out, &options, &digest)
        })
        .await??;
        let pushed = push_layer(client, &repository, &out, &converted.digest)
            .await
            .with_context(|| format!("push the chunked form of layer {digest}"))?;
        if pushed != converted.digest {
            bail!(
                "layer {digest}: the registry stored {pushed}, Pronto wrote {}",
                converted.digest
            );
        }
        let mut annotations: Map<String, Value> = layer
            .annotations()
            .as_ref()
            .map(|a| {
                a.iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect()
            })
            .unwrap_or_default();
        annotations.insert(
            TOC_DIGEST_ANNOTATION.into(),
            converted.toc_digest.clone().into(),
        );
        annotations.insert(
            UNCOMPRESSED_SIZE_ANNOTATION.into(),
            converted.uncompressed_size.to_string().into(),
        );
        descriptors.push(json!({
            "mediaType": OCI_LAYER_GZIP,
            "digest": converted.digest,
            "size": converted.size,
            "annotations": annotations,
        }));
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
    let config_bytes = serde_json::to_vec(&config)?;
    let config_size = config_bytes.len();
    let config_digest = client
        .push_blob(&repository, config_bytes.into())
        .await
        .context("push the config")?;
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": descriptors,
    });
    if let Some(annotations) = image.image.annotations() {
        manifest["annotations"] = json!(annotations);
    }
    let manifest_bytes = bytes::Bytes::from(serde_json::to_vec(&manifest)?);
    let digest = pronto_registry::sha256_digest(&manifest_bytes);
    // Pushed by digest, read back, and only then tagged: a conversion that
    // fails leaves no tag pointing at it.
    client
        .push_manifest(&repository, &digest, OCI_MANIFEST, manifest_bytes.clone())
        .await
        .context("push the manifest")?;
    verify(client, &repository, &digest)
        .await
        .context("read the converted image back")?;
    client
        .push_manifest(&repository, &tag, OCI_MANIFEST, manifest_bytes)
        .await
        .with_context(|| format!("tag the converted image {tag}"))?;
    println!(
        "{} → {}@{digest}: {} layers, {} → {} ({:+.1}%)",
        request.source,
        request.target,
        layers.len(),
        human_size(total),
        human_size(written),
        (written as f64 / total.max(1) as f64 - 1.0) * 100.0,
    );
    Ok(())
}

/// Uploads the layer at `path` (digest `digest`) unless the repository has
/// it; a big one in parts, so that no single request outlasts the
/// registry client's timeouts on a slow link.
async fn push_layer(
    client: &RegistryClient,
    repository: &Repository,
    path: &Path,
    digest: &str,
) -> Result<String> {
    const PART: usize = 16 << 20;
    if client.blob_exists(repository, digest).await? {
        return Ok(digest.to_owned());
    }
    let bytes = bytes::Bytes::from(std::fs::read(path)?);
    Ok(if bytes.len() > PART {
        client.push_blob_chunked(repository, bytes, PART).await?
    } else {
        client.push_blob(repository, bytes).await?
    })
}

/// Decompresses the layer blob at `blob` and writes its chunked form to
/// `out`.
fn chunk_layer(
    blob: &Path,
    compression: Compression,
    out: &Path,
    options: &WriteOptions,
    digest: &str,
) -> Result<pronto_toc::Converted> {
    let tar_path = out.with_extension("tar");
    {
        let source = std::fs::File::open(blob)?;
        let mut tar = BufWriter::new(std::fs::File::create(&tar_path)?);
        match compression {
            Compression::Gzip => {
                std::io::copy(&mut flate2::read::MultiGzDecoder::new(source), &mut tar)
                    .with_context(|| format!("layer {digest} does not decompress"))?;
            }
            Compression::None => {
                std::io::copy(&mut &source, &mut tar)?;
            }
        }
        tar.flush()?;
    }
    let tar = std::fs::File::open(&tar_path)?;
    let mut writer = BufWriter::new(std::fs::File::create(out)?);
    let converted = write_chunked(&tar, &mut writer, options)
        .with_context(|| format!("layer {digest} is not a tar Pronto can convert"))?;
    writer.flush()?;
    drop(tar);
    let _ = std::fs::remove_file(&tar_path);
    Ok(converted)
}

/// Reads the image `digest` back: the manifest, and every layer's TOC
/// through its footer, checked against the manifest's annotations.
async fn verify(client: &RegistryClient, repository: &Repository, digest: &str) -> Result<()> {
    let manifest = client.manifest(repository, digest).await?;
    let pronto_registry::ManifestKind::Image(image) = manifest.kind else {
        bail!("{digest} is not an image manifest");
    };
    for layer in image.layers() {
        let toc_digest = layer
            .annotations()
            .as_ref()
            .and_then(|a| a.get(TOC_DIGEST_ANNOTATION))
            .ok_or_else(|| anyhow!("layer {} has no TOC annotation", layer.digest()))?;
        let (json, toc_offset) = pronto_fs::fetch_toc(
            client,
            repository,
            layer.digest().as_ref(),
            layer.size(),
            toc_digest,
        )
        .await?;
        pronto_toc::parse_toc(&json, toc_offset, &pronto_toc::Limits::default())
            .with_context(|| format!("layer {}", layer.digest()))?;
    }
    Ok(())
}
