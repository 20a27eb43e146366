//! Index sets in the registry: pushed as referrers of the image manifest,
//! found through the referrers API or its tag-schema fallback, and fetched
//! a prefix at a time.

use bytes::Bytes;
use pronto_index::{ARTIFACT_TYPE, LayerIndex};
use pronto_registry::{RegistryClient, Repository};
use sha2::{Digest, Sha256};

use crate::artifact::{
    IndexSet, LayerIndexRef, Location, OCI_MANIFEST, artifact_manifest, parse_artifact,
};
use crate::create::CreatedIndexes;
use crate::error::CatalogError;
use crate::local::LocalIndexStore;
use pronto_metrics::{Purpose, metrics};

/// Pushes the index blobs and their artifact manifest (as a referrer of
/// the image) to `repo`. Returns the artifact manifest's digest.
pub async fn push_indexes(
    client: &RegistryClient,
    repo: &Repository,
    created: &CreatedIndexes,
) -> Result<String, CatalogError> {
    client.push_blob(repo, Bytes::from_static(b"{}")).await?;
    for (layer, path) in &created.layers {
        let bytes = tokio::fs::read(path)
            .await
            .map_err(CatalogError::io("cannot read", path))?;
        let pushed = client.push_blob(repo, Bytes::from(bytes)).await?;
        debug_assert_eq!(pushed, layer.blob);
    }
    let refs: Vec<LayerIndexRef> = created.layers.iter().map(|(l, _)| l.clone()).collect();
    let manifest = artifact_manifest(&created.subject, created.span_size, &refs);
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

/// Index sets for image manifest `subject`: those in the local store first,
/// then those in the registry. A referrer that is not a valid index set is
/// skipped with a warning.
pub async fn find_indexes(
    client: &RegistryClient,
    store: Option<&LocalIndexStore>,
    repo: &Repository,
    subject: &str,
) -> Result<Vec<IndexSet>, CatalogError> {
    let mut sets = match store {
        Some(store) => store.sets_for(subject)?,
        None => Vec::new(),
    };
    for referrer in client.referrers(repo, subject, Some(ARTIFACT_TYPE)).await? {
        let digest = referrer.digest().to_string();
        let manifest = client.manifest(repo, &digest).await?;
        match parse_artifact(&digest, &manifest.bytes, subject, Location::Registry) {
            Ok(set) => sets.push(set),
            Err(err) => tracing::warn!(%repo, subject, "ignoring a referrer: {err}"),
        }
    }
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
    let bytes = match set.location {
        Location::Local => {
            let store = store.ok_or_else(|| CatalogError::NotFound {
                digest: layer.blob.clone(),
            })?;
            store.read_range(&layer.blob, 0..layer.prefix_size)?
        }
        Location::Registry => client
            .blob_range(repo, &layer.blob, 0..layer.prefix_size, layer.size)
            .await
            .inspect(|bytes| metrics().fetched(Purpose::Index, bytes.len() as u64))?
            .to_vec(),
    };
    verify_prefix(set, layer, &bytes)
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
