//! `pronto index create|list|inspect|rm`: seekable indexes for unmodified
//! images, in the registry (as referrers) or in the local store.

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use indicatif::{ProgressBar, ProgressStyle};
use pronto_catalog::{
    BindTarget, Binding, CreateOptions, Event, IndexSet, LocalIndexStore, Location, OCI_INDEX,
    binding_index, create_indexes, fetch_prefix, find_indexes, parse_artifact, push_bound,
    push_indexes, remove_remote, save_local, unbind_index, verify_prefix,
};
use pronto_index::LayerIndex;
use pronto_registry::{ManifestKind, Platform, RegistryClient, ResolvedImage, parse_reference};
use serde_json::{Value, json};

use crate::cli::{IndexCommand, PlatformArgs};
use crate::commands::image::registry_client;
use crate::config::Config;
use crate::text::{human_size, stderr_is_terminal};

pub fn run(cmd: IndexCommand, config: &Config) -> Result<()> {
    let runtime = super::runtime()?;
    let client = registry_client(config)?;
    let store = LocalIndexStore::open(&config.root)
        .with_context(|| format!("open the local index store under {}", config.root.display()))?;
    runtime.block_on(async {
        match cmd {
            IndexCommand::Create {
                reference,
                platforms,
                span_size,
                min_layer_size,
                push,
                bind,
            } => {
                let options = CreateOptions {
                    span_size,
                    min_layer_size,
                    ..Default::default()
                };
                let place = match (push, bind) {
                    (_, true) => Placement::Bind,
                    (true, false) => Placement::Referrers,
                    (false, false) => Placement::Local,
                };
                create(
                    &client, &store, config, &reference, &platforms, options, place,
                )
                .await
            }
            IndexCommand::List {
                reference,
                platforms,
            } => list(&client, &store, &reference, &platforms).await,
            IndexCommand::Inspect {
                target,
                platform,
                json,
            } => inspect(&client, &store, &target, &platform, json).await,
            IndexCommand::Rm {
                reference,
                platforms,
                index,
            } => remove(&client, &store, &reference, &platforms, index.as_deref()).await,
        }
    })
}

/// The images `platforms` selects from `reference`.
async fn resolve_all(
    client: &RegistryClient,
    reference: &str,
    platforms: &PlatformArgs,
) -> Result<Vec<(Platform, ResolvedImage)>> {
    let reference = parse_reference(reference)?;
    let wanted: Vec<Platform> = if platforms.all_platforms {
        let repo = pronto_registry::Repository::of(&reference);
        let tag = reference
            .digest()
            .or(reference.tag())
            .unwrap_or("latest")
            .to_owned();
        match client.manifest(&repo, &tag).await?.kind {
            ManifestKind::Index(index) => index
                .manifests()
                .iter()
                .filter_map(|m| m.platform().as_ref())
                .map(|p| Platform {
                    os: p.os().to_string(),
                    architecture: p.architecture().to_string(),
                    variant: p.variant().clone(),
                })
                .collect(),
            ManifestKind::Image(_) => vec![Platform::default()],
        }
    } else {
        vec![platforms.platform.parse().map_err(|e: String| anyhow!(e))?]
    };
    let mut images = Vec::new();
    for platform in wanted {
        let image = client.resolve(&reference, &platform).await?;
        images.push((platform, image));
    }
    Ok(images)
}

/// Where `index create` puts what it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Local,
    Referrers,
    Bind,
}

async fn create(
    client: &RegistryClient,
    store: &LocalIndexStore,
    config: &Config,
    reference: &str,
    platforms: &PlatformArgs,
    options: CreateOptions,
    place: Placement,
) -> Result<()> {
    let parsed = parse_reference(reference)?;
    let tag = match (place, parsed.digest()) {
        (Placement::Bind, Some(_)) => bail!(
            "--bind moves a tag to the image index that binds the indexes; {reference} names a digest"
        ),
        _ => parsed.tag().unwrap_or("latest").to_owned(),
    };
    let scratch = config.root.join("tmp");
    let mut bindings = Vec::new();
    let mut bound_to = None;
    for (platform, image) in resolve_all(client, reference, platforms).await? {
        let mut progress = Progress::new();
        let created = create_indexes(client, &image, options.clone(), &scratch, |e| {
            progress.event(e)
        })
        .await?;
        progress.finish();
        let indexed = created.layers.len();
        let total = image.image.layers().len();
        let (digest, place) = match place {
            Placement::Bind => {
                let binding = push_bound(client, &image.repository, &created).await?;
                let digest = binding.artifact.clone();
                bindings.push(binding);
                bound_to = Some(image.clone());
                (digest, format!("pushed to {}", image.repository))
            }
            Placement::Referrers => {
                let digest = push_indexes(client, &image.repository, &created).await?;
                (
                    digest,
                    format!("pushed to {} as a referrer", image.repository),
                )
            }
            Placement::Local => (
                save_local(store, &created)?,
                format!("saved in {}", store.dir().display()),
            ),
        };
        println!(
            "{platform}: indexed {indexed} of {total} layers of {}; index {digest} {place}",
            image.manifest.digest
        );
        for built in &created.built {
            let layer = &built.meta.layer;
            println!(
                "  {}  {:>10}  {} spans, {} files, index {} ({:.2}% of the layer)",
                layer.digest,
                human_size(layer.size),
                built.meta.spans.len(),
                built.meta.entries.len(),
                human_size(built.size),
                100.0 * built.size as f64 / layer.size.max(1) as f64
            );
        }
        for skipped in &created.skipped {
            println!("  {}  not indexed: {}", skipped.layer, skipped.reason);
        }
    }
    if let Some(image) = bound_to {
        let digest = bind(client, &image, &tag, &bindings).await?;
        println!(
            "{}:{tag} now names image index {digest}, which binds {} index set(s) to the unchanged image",
            image.repository,
            bindings.len()
        );
    }
    Ok(())
}

/// Moves `tag` to an image index that lists what it names today plus
/// `bindings`. Returns the new image index's digest.
async fn bind(
    client: &RegistryClient,
    image: &ResolvedImage,
    tag: &str,
    bindings: &[Binding],
) -> Result<String> {
    let top = client.manifest(&image.repository, tag).await?;
    let target = match &top.kind {
        ManifestKind::Index(_) => BindTarget::Index(&top.bytes),
        ManifestKind::Image(_) => BindTarget::Image {
            digest: &top.digest,
            media_type: &top.media_type,
            size: top.bytes.len() as u64,
            platform: platform_json(&image.config),
        },
    };
    let bytes = binding_index(&target, bindings);
    let pushed = client
        .push_manifest(&image.repository, tag, OCI_INDEX, bytes.into())
        .await?;
    Ok(pushed.digest)
}

/// The platform of an image, as an image index lists it.
fn platform_json(config: &pronto_registry::ImageConfiguration) -> Value {
    let mut platform = json!({
        "os": config.os().to_string(),
        "architecture": config.architecture().to_string(),
    });
    if let Some(variant) = config.variant() {
        platform["variant"] = json!(variant);
    }
    platform
}

async fn list(
    client: &RegistryClient,
    store: &LocalIndexStore,
    reference: &str,
    platforms: &PlatformArgs,
) -> Result<()> {
    println!(
        "{:<72} {:<14} {:<9} {:>6} {:>10}",
        "INDEX", "PLATFORM", "WHERE", "LAYERS", "SPAN SIZE"
    );
    for (platform, image) in resolve_all(client, reference, platforms).await? {
        let sets = find_indexes(
            client,
            Some(store),
            &image.repository,
            &image.manifest.digest,
            image.index.as_ref(),
        )
        .await?;
        for set in sets {
            println!(
                "{:<72} {:<14} {:<9} {:>6} {:>10}",
                set.manifest_digest,
                platform.to_string(),
                set.location.to_string(),
                set.layers.len(),
                human_size(set.span_size)
            );
        }
    }
    Ok(())
}

async fn inspect(
    client: &RegistryClient,
    store: &LocalIndexStore,
    target: &str,
    platform: &str,
    as_json: bool,
) -> Result<()> {
    let mut reports = Vec::new();
    if target.starts_with("sha256:") {
        let subject = store.subject_of(target)?;
        let bytes = store.manifest(target)?;
        let set = parse_artifact(target, &bytes, &subject, Location::Local)?;
        let mut layers = Vec::new();
        for layer in &set.layers {
            let prefix = store.read_range(&layer.blob, 0..layer.prefix_size)?;
            layers.push((layer.clone(), verify_prefix(&set, layer, &prefix)?));
        }
        reports.push(report(&set, &layers));
    } else {
        let platforms = PlatformArgs {
            platform: platform.to_owned(),
            all_platforms: false,
        };
        for (_, image) in resolve_all(client, target, &platforms).await? {
            let sets = find_indexes(
                client,
                Some(store),
                &image.repository,
                &image.manifest.digest,
                image.index.as_ref(),
            )
            .await?;
            if sets.is_empty() {
                bail!("image {} ({}) has no index", target, image.manifest.digest);
            }
            for set in sets {
                let mut layers = Vec::new();
                for layer in &set.layers {
                    let index =
                        fetch_prefix(client, Some(store), &image.repository, &set, layer).await?;
                    layers.push((layer.clone(), index));
                }
                reports.push(report(&set, &layers));
            }
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else {
        for r in &reports {
            print!("{}", render(r));
        }
    }
    Ok(())
}

fn report(set: &IndexSet, layers: &[(pronto_catalog::LayerIndexRef, LayerIndex)]) -> Value {
    json!({
        "index": set.manifest_digest,
        "image": set.subject,
        "location": set.location.to_string(),
        "span_size": set.span_size,
        "layers": layers.iter().map(|(r, index)| {
            let meta = index.meta();
            json!({
                "layer": r.layer,
                "layer_size": meta.layer.size,
                "uncompressed_size": meta.layer.uncompressed_size,
                "compression": format!("{:?}", meta.layer.compression).to_lowercase(),
                "spans": meta.spans.len(),
                "files": meta.entries.len(),
                "index_blob": r.blob,
                "index_size": r.size,
                "prefix_size": r.prefix_size,
                "overhead_percent": 100.0 * r.size as f64 / meta.layer.size.max(1) as f64,
            })
        }).collect::<Vec<_>>(),
    })
}

fn render(report: &Value) -> String {
    let mut out = format!(
        "index     {}\nimage     {}\nwhere     {}\nspan size {}\n",
        report["index"].as_str().unwrap_or("-"),
        report["image"].as_str().unwrap_or("-"),
        report["location"].as_str().unwrap_or("-"),
        human_size(report["span_size"].as_u64().unwrap_or(0)),
    );
    for layer in report["layers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let size = |key: &str| human_size(layer[key].as_u64().unwrap_or(0));
        out.push_str(&format!(
            "  {}  {} {} -> {}: {} spans, {} files, index {} (mount prefix {}), {:.2}% overhead\n",
            layer["layer"].as_str().unwrap_or("-"),
            layer["compression"].as_str().unwrap_or("-"),
            size("layer_size"),
            size("uncompressed_size"),
            layer["spans"],
            layer["files"],
            size("index_size"),
            size("prefix_size"),
            layer["overhead_percent"].as_f64().unwrap_or(0.0),
        ));
    }
    out
}

async fn remove(
    client: &RegistryClient,
    store: &LocalIndexStore,
    reference: &str,
    platforms: &PlatformArgs,
    only: Option<&str>,
) -> Result<()> {
    let mut removed = 0;
    for (_, image) in resolve_all(client, reference, platforms).await? {
        let subject = &image.manifest.digest;
        let sets = find_indexes(
            client,
            Some(store),
            &image.repository,
            subject,
            image.index.as_ref(),
        )
        .await?;
        for set in sets
            .iter()
            .filter(|s| only.is_none_or(|d| d == s.manifest_digest))
        {
            match set.location {
                Location::Local => store.remove(subject, &set.manifest_digest)?,
                Location::Registry => {
                    remove_remote(client, &image.repository, subject, &set.manifest_digest).await?
                }
                Location::Bound => unbind(client, reference, &image, &set.manifest_digest).await?,
            }
            println!("removed {} ({})", set.manifest_digest, set.location);
            removed += 1;
        }
    }
    if removed == 0 {
        bail!("no index matched");
    }
    Ok(())
}

/// Removes bound index set `artifact` from the image index `reference`
/// (a tag) names, moving the tag to the image index without it.
async fn unbind(
    client: &RegistryClient,
    reference: &str,
    image: &ResolvedImage,
    artifact: &str,
) -> Result<()> {
    let parsed = parse_reference(reference)?;
    let (None, Some(tag)) = (parsed.digest(), parsed.tag()) else {
        bail!("a bound index is removed by moving a tag; {reference} names no tag");
    };
    let top = image
        .index
        .as_ref()
        .ok_or_else(|| anyhow!("{reference} names no image index"))?;
    let bytes = unbind_index(&top.bytes, artifact)?;
    client
        .push_manifest(&image.repository, tag, OCI_INDEX, bytes.into())
        .await?;
    Ok(())
}

/// Progress of index creation: a spinner per layer on a terminal, plain
/// lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    terminal: bool,
}

impl Progress {
    fn new() -> Self {
        Self {
            bar: None,
            terminal: stderr_is_terminal(),
        }
    }

    fn say(&mut self, message: String) {
        if self.terminal {
            let bar = self.bar.get_or_insert_with(|| {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                        .expect("the template is valid"),
                );
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            });
            bar.set_message(message);
        } else {
            eprintln!("{message}");
        }
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Fetching {
                layer,
                size,
                number,
                total,
            } => self.say(format!(
                "layer {number}/{total} {layer}: fetching {}",
                human_size(size)
            )),
            Event::Indexing { layer } => self.say(format!("{layer}: indexing")),
            Event::Indexed {
                layer,
                spans,
                files,
                index_size,
            } => self.say(format!(
                "{layer}: {spans} spans, {files} files, index {}",
                human_size(index_size)
            )),
            Event::Skipped(s) => self.say(format!("{}: skipped, {}", s.layer, s.reason)),
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
