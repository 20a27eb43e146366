//! Opening an image for mounting: resolve it, find the index set the
//! node's `index.trust` accepts (bound into the image index, built
//! locally, or among the referrers), fetch each indexed layer's
//! prefix, and make every other layer local (fetched whole, verified, and
//! indexed on the node) so that all layers are read the same way.

use std::path::PathBuf;
use std::sync::Arc;

use pronto_catalog::{
    IndexSet, IndexTrust, LayerIndexRef, LocalIndexStore, Location, fetch_prefix, find_trusted,
};
use pronto_index::{LayerIndex, LayerToIndex, build_index};
use pronto_registry::{
    ParallelFetch, Platform, RegistryClient, Repository, ResolvedImage, parse_reference,
};
use pronto_store::ContentCache;
use pronto_toc::{Compression, TocRef};

use crate::indexed::{BlobReader, IndexOrigin, IndexedLayer, LocalBlob, RegistryBlob};
use crate::layout::ChunkedLayout;
use crate::schedule::Scheduler;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Registry(Box<pronto_registry::RegistryError>),
    #[error(transparent)]
    Catalog(Box<pronto_catalog::CatalogError>),
    #[error(transparent)]
    Index(#[from] pronto_index::IndexError),
    #[error("layer {layer} of {image}: {problem}")]
    Layer {
        image: String,
        layer: String,
        problem: String,
    },
    #[error("cannot write {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<pronto_registry::RegistryError> for OpenError {
    fn from(e: pronto_registry::RegistryError) -> Self {
        OpenError::Registry(Box::new(e))
    }
}

impl From<pronto_catalog::CatalogError> for OpenError {
    fn from(e: pronto_catalog::CatalogError) -> Self {
        OpenError::Catalog(Box::new(e))
    }
}

/// How each layer of an opened image is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerMode {
    /// Through an index: spans fetched on demand.
    Lazy,
    /// Fetched whole before mounting (no index, or too small to index).
    Local,
}

/// An image ready to mount: its layers bottom first.
pub struct OpenedImage {
    pub image: ResolvedImage,
    pub index_set: Option<IndexSet>,
    /// Index sets that exist for the image but were not used, and why.
    pub refused: Vec<String>,
    pub layers: Vec<Arc<IndexedLayer>>,
    pub modes: Vec<LayerMode>,
}

impl std::fmt::Debug for OpenedImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenedImage")
            .field("manifest", &self.image.manifest.digest)
            .field("modes", &self.modes)
            .finish()
    }
}

/// Everything opening an image needs from the node.
#[derive(Debug)]
pub struct NodeContext<'a> {
    pub client: &'a RegistryClient,
    pub store: &'a LocalIndexStore,
    /// Which indexes this node accepts (`index.trust`).
    pub trust: &'a IndexTrust,
    pub cache: Arc<ContentCache>,
    /// Where whole layers and their node-made indexes are kept.
    pub layers_dir: PathBuf,
    pub runtime: tokio::runtime::Handle,
    /// Set to true when the mount goes away; pending reads give up.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// How long one read may wait for the registry (`fetch.read_timeout`).
    pub read_timeout: std::time::Duration,
    /// How far ahead of an in-order reader to fetch (`fetch.read_ahead`).
    pub read_ahead: u64,
    /// The node's one scheduler: background fetches wait for reads.
    pub scheduler: Arc<Scheduler>,
}

/// Opens `reference` for `platform`.
pub async fn open_image(
    node: &NodeContext<'_>,
    reference: &str,
    platform: &Platform,
) -> Result<OpenedImage, OpenError> {
    let reference = parse_reference(reference)?;
    let image = node.client.resolve(&reference, platform).await?;
    let found = find_trusted(
        node.client,
        node.store,
        &image.repository,
        &image.manifest.digest,
        image.index.as_ref(),
        node.trust,
    )
    .await?;
    let index_set = found.set;
    let mut layers = Vec::new();
    let mut modes = Vec::new();
    for descriptor in image.image.layers() {
        let digest = descriptor.digest().to_string();
        let size = descriptor.size();
        let indexed = index_set
            .as_ref()
            .and_then(|set| set.layer(&digest).map(|r| (set, r.clone())));
        let toc = descriptor
            .annotations()
            .as_ref()
            .and_then(|a| pronto_toc::TocRef::of(descriptor.media_type().as_ref(), a));
        let toc = toc.transpose().map_err(|e| OpenError::Layer {
            image: image.repository.to_string(),
            layer: digest.clone(),
            problem: e.to_string(),
        })?;
        let layer = match (indexed, toc) {
            (_, Some(toc)) => {
                modes.push(LayerMode::Lazy);
                let toc = fetch_toc(node.client, &image.repository, &digest, size, &toc).await?;
                chunked_layer(node, &image.repository, &digest, size, &toc)?
            }
            (Some((set, layer_ref)), None) => {
                modes.push(LayerMode::Lazy);
                open_lazy_layer(node, &image.repository, set, &layer_ref).await?
            }
            (None, None) => {
                modes.push(LayerMode::Local);
                open_whole_layer(
                    node,
                    &image.repository,
                    &digest,
                    size,
                    descriptor.media_type().as_ref(),
                )
                .await?
                .0
            }
        };
        layers.push(layer.shared());
    }
    Ok(OpenedImage {
        image,
        index_set,
        refused: found.refused,
        layers,
        modes,
    })
}

/// A chunked layer's table of contents, fetched and checked against the
/// digests its manifest names.
#[derive(Debug, Clone)]
pub struct ChunkedToc {
    /// How the chunks are compressed.
    pub compression: Compression,
    /// The TOC's JSON.
    pub json: Vec<u8>,
    /// `sha256:<hex>` of [`Self::json`].
    pub json_digest: String,
    /// Where the chunks end: the start of the TOC's member or frame.
    pub chunks_end: u64,
}

/// Fetches a chunked layer's table of contents and checks it against the
/// digests of `toc` (from the manifest's layer annotations): for eStargz
/// two range requests, the footer and then the TOC; for zstd:chunked one,
/// as the annotations say where it lies.
pub async fn fetch_toc(
    client: &RegistryClient,
    repository: &Repository,
    digest: &str,
    size: u64,
    toc: &TocRef,
) -> Result<ChunkedToc, OpenError> {
    let bad = |problem: String| OpenError::Layer {
        image: repository.to_string(),
        layer: digest.to_owned(),
        problem,
    };
    let limits = pronto_toc::Limits::default();
    if let Some(zstd) = &toc.zstd {
        if zstd.range.end > size || zstd.range.end - zstd.range.start > limits.max_toc_compressed {
            return Err(bad(format!(
                "its zstd:chunked manifest at {:?} is past the {size}-byte blob or over the limit of {} bytes",
                zstd.range, limits.max_toc_compressed
            )));
        }
        let frame = client
            .blob_range(repository, digest, zstd.range.clone(), size)
            .await?;
        let (json, json_digest) =
            pronto_toc::zstd_toc_json(&frame, zstd, toc.json_digest.as_deref(), &limits)
                .map_err(|e| bad(e.to_string()))?;
        return Ok(ChunkedToc {
            compression: toc.compression,
            json,
            json_digest,
            chunks_end: pronto_toc::zstd_chunks_end(zstd),
        });
    }
    let Some(toc_digest) = toc.json_digest.as_deref() else {
        return Err(bad("no digest vouches for its TOC".into()));
    };
    let tail_len = pronto_toc::FOOTER_SIZE.min(size);
    let tail = client
        .blob_range(repository, digest, size - tail_len..size, size)
        .await?;
    let place = pronto_toc::parse_footer(&tail, size).map_err(|e| bad(e.to_string()))?;
    if place.end - place.start > limits.max_toc_compressed {
        return Err(bad(format!(
            "its TOC is {} bytes, over the limit of {}",
            place.end - place.start,
            limits.max_toc_compressed
        )));
    }
    let member = client
        .blob_range(repository, digest, place.clone(), size)
        .await?;
    let json =
        pronto_toc::toc_json(&member, toc_digest, &limits).map_err(|e| bad(e.to_string()))?;
    Ok(ChunkedToc {
        compression: toc.compression,
        json,
        json_digest: toc_digest.to_owned(),
        chunks_end: place.start,
    })
}

/// A lazy chunked layer over its TOC's JSON, checked against its digest
/// once more (it may come from a mount record on disk).
pub fn chunked_layer(
    node: &NodeContext<'_>,
    repository: &Repository,
    digest: &str,
    size: u64,
    toc: &ChunkedToc,
) -> Result<IndexedLayer, OpenError> {
    use sha2::Digest as _;
    let bad = |problem: String| OpenError::Layer {
        image: repository.to_string(),
        layer: digest.to_owned(),
        problem,
    };
    let found = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&toc.json)));
    if found != toc.json_digest {
        return Err(bad(format!(
            "its TOC hashes to {found}, not {}",
            toc.json_digest
        )));
    }
    let parsed = pronto_toc::parse_toc(&toc.json, toc.chunks_end, &pronto_toc::Limits::default())
        .map_err(|e| bad(e.to_string()))?;
    let layout = ChunkedLayout::new(digest, size, parsed, toc.compression).map_err(bad)?;
    let layer_blob: Box<dyn BlobReader> = Box::new(RegistryBlob {
        client: node.client.clone(),
        repository: repository.clone(),
        digest: digest.to_owned(),
        size,
    });
    Ok(IndexedLayer::chunked(
        layout,
        layer_blob,
        node.cache.clone(),
        node.runtime.clone(),
        node.shutdown.clone(),
    )
    .with_read_timeout(node.read_timeout)
    .with_read_ahead(node.read_ahead)
    .with_scheduler(node.scheduler.clone()))
}

/// Opens one layer of `repository` through its index in `set`: fetches
/// and verifies the index prefix; file data is fetched on demand.
pub async fn open_lazy_layer(
    node: &NodeContext<'_>,
    repository: &Repository,
    set: &IndexSet,
    layer_ref: &LayerIndexRef,
) -> Result<IndexedLayer, OpenError> {
    let index = fetch_prefix(node.client, Some(node.store), repository, set, layer_ref).await?;
    Ok(lazy_layer(node, repository, set, layer_ref, index))
}

/// A lazy layer over its verified index prefix `index`.
pub fn lazy_layer(
    node: &NodeContext<'_>,
    repository: &Repository,
    set: &IndexSet,
    layer_ref: &LayerIndexRef,
    index: pronto_index::LayerIndex,
) -> IndexedLayer {
    let layer = index.meta().layer.clone();
    let layer_blob: Box<dyn BlobReader> = Box::new(RegistryBlob {
        client: node.client.clone(),
        repository: repository.clone(),
        digest: layer.digest,
        size: layer.size,
    });
    let index_blob: Box<dyn BlobReader> = match set.location {
        Location::Registry | Location::Bound => Box::new(RegistryBlob {
            client: node.client.clone(),
            repository: repository.clone(),
            digest: layer_ref.blob.clone(),
            size: layer_ref.size,
        }),
        Location::Local => Box::new(LocalBlob {
            path: node
                .store
                .blob_path(&layer_ref.blob)
                .expect("catalog digests are valid"),
        }),
    };
    let origin = IndexOrigin {
        store: node.store.clone(),
        set: set.manifest_digest.clone(),
        check_whole: set.location == Location::Registry,
    };
    IndexedLayer::new(
        index,
        layer_blob,
        index_blob,
        node.cache.clone(),
        node.runtime.clone(),
        node.shutdown.clone(),
    )
    .with_origin(origin)
    .with_read_timeout(node.read_timeout)
    .with_read_ahead(node.read_ahead)
    .with_scheduler(node.scheduler.clone())
}

/// Opens a layer that has no index: fetched whole (parallel range
/// requests, verified) into the node's layer directory and indexed there,
/// once. Returns the layer and the files it keeps on the node.
pub async fn open_whole_layer(
    node: &NodeContext<'_>,
    repository: &Repository,
    digest: &str,
    size: u64,
    media_type: &str,
) -> Result<(IndexedLayer, [PathBuf; 2]), OpenError> {
    let (index, blob_path, index_path) =
        fetch_whole(node, repository, digest, size, media_type).await?;
    let layer = IndexedLayer::new(
        index,
        Box::new(LocalBlob {
            path: blob_path.clone(),
        }),
        Box::new(LocalBlob {
            path: index_path.clone(),
        }),
        node.cache.clone(),
        node.runtime.clone(),
        node.shutdown.clone(),
    )
    .with_scheduler(node.scheduler.clone());
    Ok((layer, [blob_path, index_path]))
}

/// Fetches a layer whole (verified) into the node's layer directory and
/// indexes it there, once; later opens reuse both files.
async fn fetch_whole(
    node: &NodeContext<'_>,
    repository: &Repository,
    digest: &str,
    size: u64,
    media_type: &str,
) -> Result<(LayerIndex, PathBuf, PathBuf), OpenError> {
    let layer_error = |problem: String| OpenError::Layer {
        image: repository.name.clone(),
        layer: digest.to_owned(),
        problem,
    };
    let compression = pronto_index::LayerCompression::from_media_type(media_type)
        .ok_or_else(|| layer_error(format!("media type {media_type} is not supported")))?;
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest).to_owned();
    let blob_path = node
        .client
        .blob_in_dir(
            repository,
            digest,
            size,
            &node.layers_dir,
            ParallelFetch::default(),
        )
        .await?;
    let index_path = node.layers_dir.join(format!("{hex}.index"));
    if !index_path.exists() {
        let target = LayerToIndex {
            digest: digest.to_owned(),
            size,
            compression,
        };
        let index_partial = node.layers_dir.join(format!("{hex}.index.partial"));
        let (input, output) = (blob_path.clone(), index_partial.clone());
        tokio::task::spawn_blocking(move || {
            let reader = std::io::BufReader::new(std::fs::File::open(&input)?);
            let writer = std::io::BufWriter::new(std::fs::File::create(&output)?);
            build_index(reader, &target, 4 << 20, writer)
        })
        .await
        .map_err(|e| layer_error(e.to_string()))??;
        std::fs::rename(&index_partial, &index_path).map_err(|source| OpenError::Io {
            path: index_path.clone(),
            source,
        })?;
    }
    let bytes = std::fs::read(&index_path).map_err(|source| OpenError::Io {
        path: index_path.clone(),
        source,
    })?;
    let index = LayerIndex::parse(&bytes)?;
    if index.meta().layer.digest != digest {
        return Err(layer_error(
            "the node-made index describes another layer".into(),
        ));
    }
    Ok((index, blob_path, index_path))
}
