//! Index sets in the registry: pushed as referrers of the image manifest,
//! found through the referrers API or its tag-schema fallback, and fetched
//! a prefix at a time.

use bytes::Bytes;
use pronto_index::{ARTIFACT_TYPE, LayerIndex};
use pronto_registry::{Manifest, RegistryClient, Repository};
use sha2::{Digest, Sha256};

use crate::artifact::{IndexSet, LayerIndexRef, Location, OCI_MANIFEST, artifact_manifest};
use crate::create::CreatedIndexes;
use crate::error::CatalogError;
use crate::local::LocalIndexStore;
use crate::trust::{Binding, bound_sets, referrer_sets};
use pronto_metrics::{Purpose, metrics};

/// Pushes the index blobs and their artifact manifest (as a referrer of
/// the image) to `repo`. Returns the artifact manifest's digest.
pub async fn push_indexes(
    client: &RegistryClient,
    repo: &Repository,
    created: &CreatedIndexes,
) -> Result<String, CatalogError> {
    let manifest = push_index_blobs(client, repo, created).await?;
    let pushed = client
        .push_referrer(
            repo,
            &created.subject.digest,
            OCI_MANIFEST,
            ARTIFACT_TYPE,
            manifest.into(),
        )
        .await?;
    Ok(pushed.digest)
}

/// Pushes the index blobs and their artifact manifest by digest only (to
/// be bound into the image index, not listed among the referrers).
pub async fn push_bound(
    client: &RegistryClient,
    repo: &Repository,
    created: &CreatedIndexes,
) -> Result<Binding, CatalogError> {
    let manifest = push_index_blobs(client, repo, created).await?;
    let size = manifest.len() as u64;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
    client
        .push_manifest(repo, &digest, OCI_MANIFEST, manifest.into())
        .await?;
    Ok(Binding {
        subject: created.subject.digest.clone(),
        artifact: digest,
        artifact_size: size,
    })
}

/// Pushes the empty config and the index blobs; returns the artifact
/// manifest that lists them.
async fn push_index_blobs(
    client: &RegistryClient,
    repo: &Repository,
    created: &CreatedIndexes,
) -> Result<Vec<u8>, CatalogError> {
    client.push_blob(repo, Bytes::from_static(b"{}")).await?;
    for (layer, path) in &created.layers {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(CatalogError::io("cannot read", path))?;
        let pushed = client.push_blob(repo, Bytes::from(bytes)).await?;
        debug_assert_eq!(pushed, layer.blob);
    }
    let refs: Vec<LayerIndexRef> = created.layers.iter().map(|(l, _)| l.clone()).collect();
    Ok(artifact_manifest(
        &created.subject,
        created.span_size,
        &refs,
    ))
}

/// Saves the index blobs and manifest in the node's local store. Returns
/// the artifact manifest's digest.
pub fn save_local(
    store: &LocalIndexStore,
    created: &CreatedIndexes,
) -> Result<String, CatalogError> {
    for (_, path) in &created.layers {
        store.put_blob_file(path)?;
    }
    let refs: Vec<LayerIndexRef> = created.layers.iter().map(|(l, _)| l.clone()).collect();
    let manifest = artifact_manifest(&created.subject, created.span_size, &refs);
    store.put_manifest(&manifest, &created.subject.digest)
}

/// Every index set for image manifest `subject`, whatever `index.trust`
/// says (for listing and removing): bound into `image_index` first, then
/// those in the local store, then the referrers.
pub async fn find_indexes(
    client: &RegistryClient,
    store: Option<&LocalIndexStore>,
    repo: &Repository,
    subject: &str,
    image_index: Option<&Manifest>,
) -> Result<Vec<IndexSet>, CatalogError> {
    let mut sets = match image_index {
        Some(top) => bound_sets(client, repo, top, subject).await?,
        None => Vec::new(),
    };
    if let Some(store) = store {
        sets.extend(store.sets_for(subject)?);
    }
    sets.extend(referrer_sets(client, repo, subject).await?);
    Ok(sets)
}

/// Fetches and parses the prefix of one layer's index: all a node needs to
/// mount the layer. The prefix is verified against the digest the artifact
/// records, and must describe the layer it claims to.
pub async fn fetch_prefix(
    client: &RegistryClient,
    store: Option<&LocalIndexStore>,
    repo: &Repository,
    set: &IndexSet,
    layer: &LayerIndexRef,
) -> Result<LayerIndex, CatalogError> {
    let bytes = prefix_bytes(client, store, repo, set, layer).await?;
    verify_prefix(set, layer, &bytes)
}

/// The prefix of one layer's index as stored, not yet verified: see
/// [`verify_prefix`].
pub async fn prefix_bytes(
    client: &RegistryClient,
    store: Option<&LocalIndexStore>,
    repo: &Repository,
    set: &IndexSet,
    layer: &LayerIndexRef,
) -> Result<Vec<u8>, CatalogError> {
    Ok(match set.location {
        Location::Local => {
            let store = store.ok_or_else(|| CatalogError::NotFound {
                digest: layer.blob.clone(),
            })?;
            store.read_range(&layer.blob, 0..layer.prefix_size)?
        }
        Location::Registry | Location::Bound => client
            .blob_range(repo, &layer.blob, 0..layer.prefix_size, layer.size)
            .await
            .inspect(|bytes| metrics().fetched(Purpose::Index, bytes.len() as u64))?
            .to_vec(),
    })
}

/// Checks a fetched prefix against the digest the artifact records, parses
/// it, and checks it describes the layer it is listed for.
pub fn verify_prefix(
    set: &IndexSet,
    layer: &LayerIndexRef,
    bytes: &[u8],
) -> Result<LayerIndex, CatalogError> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    if digest != layer.prefix_digest {
        return Err(CatalogError::Artifact {
            digest: set.manifest_digest.clone(),
            problem: format!(
                "the index of layer {} does not match its recorded prefix digest",
                layer.layer
            ),
        });
    }
    let index = LayerIndex::parse(bytes)?;
    if index.meta().layer.digest != layer.layer {
        return Err(CatalogError::Artifact {
            digest: set.manifest_digest.clone(),
            problem: format!(
                "the index listed for layer {} describes layer {}",
                layer.layer,
                index.meta().layer.digest
            ),
        });
    }
    Ok(index)
}

/// Removes index set `digest` of `subject` from the registry.
pub async fn remove_remote(
    client: &RegistryClient,
    repo: &Repository,
    subject: &str,
    digest: &str,
) -> Result<(), CatalogError> {
    client.remove_referrer(repo, subject, digest).await?;
    Ok(())
}
