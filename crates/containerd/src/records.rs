//! After the layers: the config, manifest (and index) in the content store
//! with the labels that tie them together for containerd's garbage
//! collector, then the image records under the names CRI would give them.

use std::collections::HashMap;

use containerd_client::services::v1::{
    CreateImageRequest, Image, UpdateImageRequest, images_client::ImagesClient,
};
use containerd_client::tonic::Code;
use containerd_client::types::Descriptor;
use pronto_registry::{Manifest, Reference, ResolvedImage};

use crate::PullError;
use crate::content::{Blob, Source, write_content};
use crate::session::{Session, containerd};

/// Stores `image`'s documents and names it `name` (and by digest), its
/// config holding the top layer's snapshot `top_chain` in `snapshotter`.
pub(crate) async fn write_records(
    session: &Session,
    image: &ResolvedImage,
    reference: &Reference,
    name: &str,
    top_chain: Option<&String>,
    snapshotter: &str,
) -> Result<(), PullError> {
    let config_digest = image.image.config().digest().to_string();
    let config_labels = top_chain
        .map(|top| {
            (
                format!("containerd.io/gc.ref.snapshot.{snapshotter}"),
                top.clone(),
            )
        })
        .into_iter()
        .collect();
    let config = Blob {
        digest: &config_digest,
        size: image.config_bytes.len() as u64,
        source: Source::Bytes(&image.config_bytes),
    };
    write_content(session, config, config_labels).await?;
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_owned(),
        config_digest.clone(),
    )]);
    for (i, layer) in image.image.layers().iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            layer.digest().to_string(),
        );
    }
    write_document(session, &image.manifest, manifest_labels).await?;
    let target = match &image.index {
        Some(index) => {
            let labels = HashMap::from([(
                "containerd.io/gc.ref.content.m.0".to_owned(),
                image.manifest.digest.clone(),
            )]);
            write_document(session, index, labels).await?;
            index
        }
        None => &image.manifest,
    };
    // As CRI does: the name pulled, and the repository at the digest.
    let mut names = vec![name.to_owned()];
    if reference.digest().is_none() {
        names.push(format!(
            "{}/{}@{}",
            reference.registry(),
            reference.repository(),
            target.digest
        ));
    }
    for name in names {
        put_image(session, &name, target).await?;
    }
    Ok(())
}

async fn write_document(
    session: &Session,
    document: &Manifest,
    labels: HashMap<String, String>,
) -> Result<(), PullError> {
    let blob = Blob {
        digest: &document.digest,
        size: document.bytes.len() as u64,
        source: Source::Bytes(&document.bytes),
    };
    write_content(session, blob, labels).await
}

/// Creates the image record `name` pointing at `target`, or updates it.
async fn put_image(session: &Session, name: &str, target: &Manifest) -> Result<(), PullError> {
    let record = Image {
        name: name.to_owned(),
        labels: HashMap::from([("io.cri-containerd.image".to_owned(), "managed".to_owned())]),
        target: Some(Descriptor {
            media_type: target.media_type.clone(),
            digest: target.digest.clone(),
            size: target.bytes.len() as i64,
            annotations: HashMap::new(),
        }),
        created_at: None,
        updated_at: None,
    };
    let mut images = ImagesClient::new(session.channel.clone());
    let created = images
        .create(session.request(CreateImageRequest {
            image: Some(record.clone()),
            source_date_epoch: None,
        }))
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => {
            images
                .update(session.request(UpdateImageRequest {
                    image: Some(record),
                    update_mask: None,
                    source_date_epoch: None,
                }))
                .await
                .map_err(containerd(format!("update image {name}")))?;
            Ok(())
        }
        Err(s) => Err(containerd(format!("create image {name}"))(s)),
    }
}

/// The digest image record `name` of `namespace` points at, if it exists.
pub async fn image_target(
    address: &std::path::Path,
    namespace: &str,
    name: &str,
) -> Result<Option<String>, PullError> {
    use containerd_client::services::v1::GetImageRequest;
    let session = Session::connect(address, namespace).await?;
    let mut images = ImagesClient::new(session.channel.clone());
    match images
        .get(session.request(GetImageRequest {
            name: name.to_owned(),
        }))
        .await
    {
        Ok(found) => Ok(found
            .into_inner()
            .image
            .and_then(|i| i.target)
            .map(|t| t.digest)),
        Err(s) if s.code() == Code::NotFound => Ok(None),
        Err(s) => Err(containerd(format!("get image {name}"))(s)),
    }
}

/// Removes image record `name` of `namespace` (gone already is fine);
/// containerd's garbage collector then frees what only it held.
pub async fn remove_image(
    address: &std::path::Path,
    namespace: &str,
    name: &str,
) -> Result<(), PullError> {
    use containerd_client::services::v1::DeleteImageRequest;
    let session = Session::connect(address, namespace).await?;
    let mut images = ImagesClient::new(session.channel.clone());
    match images
        .delete(session.request(DeleteImageRequest {
            name: name.to_owned(),
            sync: false,
            target: None,
        }))
        .await
    {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(containerd(format!("remove image {name}"))(s)),
    }
}
