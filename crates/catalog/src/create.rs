//! Creating the indexes of one image: each layer worth indexing is fetched
//! whole (parallel ranges, verified), then indexed in one streaming pass
//! into a temporary file.

use std::path::{Path, PathBuf};

use pronto_index::{BuiltIndex, LayerCompression, LayerToIndex, build_index};
use pronto_registry::{ParallelFetch, RegistryClient, ResolvedImage};

use crate::artifact::{LayerIndexRef, Subject};
use crate::error::CatalogError;

#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Uncompressed bytes per span.
    pub span_size: u64,
    /// Layers smaller than this get no index; nodes fetch them whole.
    pub min_layer_size: u64,
    pub download: ParallelFetch,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            span_size: pronto_index::DEFAULT_SPAN_SIZE,
            min_layer_size: 10 << 20,
            download: ParallelFetch::default(),
        }
    }
}

/// Progress of [`create_indexes`], for progress bars and logs.
#[derive(Debug, Clone)]
pub enum Event {
    Fetching {
        layer: String,
        size: u64,
        number: usize,
        total: usize,
    },
    Indexing {
        layer: String,
    },
    Indexed {
        layer: String,
        spans: usize,
        files: usize,
        index_size: u64,
    },
    Skipped(Skipped),
}

/// A layer that got no index, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub layer: String,
    pub reason: String,
}

/// Indexes built for an image, in temporary files until pushed or saved.
#[derive(Debug)]
pub struct CreatedIndexes {
    pub subject: Subject,
    pub span_size: u64,
    /// Each indexed layer with the file holding its index blob.
    pub layers: Vec<(LayerIndexRef, PathBuf)>,
    pub built: Vec<BuiltIndex>,
    pub skipped: Vec<Skipped>,
    _workdir: tempfile::TempDir,
}

/// Builds the indexes of `image`'s layers in a temporary directory below
/// `scratch`. Each layer is downloaded to disk, indexed, and deleted.
pub async fn create_indexes(
    client: &RegistryClient,
    image: &ResolvedImage,
    options: CreateOptions,
    scratch: &Path,
    mut on_event: impl FnMut(Event),
) -> Result<CreatedIndexes, CatalogError> {
    std::fs::create_dir_all(scratch).map_err(CatalogError::io("cannot create", scratch))?;
    let workdir = tempfile::Builder::new()
        .prefix("index-")
        .tempdir_in(scratch)
        .map_err(CatalogError::io("cannot create a directory in", scratch))?;
    let mut layers = Vec::new();
    let mut built = Vec::new();
    let mut skipped = Vec::new();
    let total = image.image.layers().len();
    for (number, descriptor) in image.image.layers().iter().enumerate() {
        let layer = descriptor.digest().to_string();
        let size = descriptor.size();
        let media_type = descriptor.media_type().to_string();
        let skip = |reason: String| Skipped {
            layer: layer.clone(),
            reason,
        };
        let Some(compression) = LayerCompression::from_media_type(&media_type) else {
            let s = skip(format!("media type {media_type} cannot be indexed"));
            on_event(Event::Skipped(s.clone()));
            skipped.push(s);
            continue;
        };
        if size < options.min_layer_size {
            let s = skip(format!(
                "{size} bytes is under the minimum of {} (fetched whole instead)",
                options.min_layer_size
            ));
            on_event(Event::Skipped(s.clone()));
            skipped.push(s);
            continue;
        }
        on_event(Event::Fetching {
            layer: layer.clone(),
            size,
            number: number + 1,
            total,
        });
        let blob_path = workdir.path().join("layer");
        client
            .blob_to_file_parallel(
                &image.repository,
                &layer,
                size,
                &blob_path,
                options.download.clone(),
            )
            .await?;
        on_event(Event::Indexing {
            layer: layer.clone(),
        });
        let index_path = workdir.path().join(format!("index-{number}"));
        let target = LayerToIndex {
            digest: layer.clone(),
            size,
            compression,
        };
        let span_size = options.span_size;
        let (index, blob_path) = {
            let index_path = index_path.clone();
            tokio::task::spawn_blocking(move || {
                let input = std::fs::File::open(&blob_path)
                    .map_err(CatalogError::io("cannot read", &blob_path))?;
                let output = std::fs::File::create(&index_path)
                    .map_err(CatalogError::io("cannot write", &index_path))?;
                let built = build_index(
                    std::io::BufReader::with_capacity(1 << 20, input),
                    &target,
                    span_size,
                    std::io::BufWriter::with_capacity(1 << 20, output),
                )?;
                Ok::<_, CatalogError>((built, blob_path))
            })
            .await
            .expect("the indexing task does not panic")?
        };
        let _ = std::fs::remove_file(&blob_path);
        on_event(Event::Indexed {
            layer: layer.clone(),
            spans: index.meta.spans.len(),
            files: index.meta.entries.len(),
            index_size: index.size,
        });
        layers.push((
            LayerIndexRef {
                layer,
                blob: index.digest.clone(),
                size: index.size,
                prefix_size: index.prefix_len,
                prefix_digest: index.prefix_digest.clone(),
            },
            index_path,
        ));
        built.push(index);
    }
    Ok(CreatedIndexes {
        subject: Subject {
            media_type: image.manifest.media_type.clone(),
            digest: image.manifest.digest.clone(),
            size: image.manifest.bytes.len() as u64,
        },
        span_size: options.span_size,
        layers,
        built,
        skipped,
        _workdir: workdir,
    })
}
