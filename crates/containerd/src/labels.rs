//! The snapshot labels containerd and Pronto exchange: what containerd's
//! CRI plugin passes on `Prepare` (with `disable_snapshot_annotations =
//! false`) and `pronto pull` passes the same way, and what Pronto records
//! on the snapshots it makes.

use std::collections::HashMap;

/// The chain ID a layer snapshot is to be committed as: the
/// remote-snapshot handshake.
pub const LABEL_TARGET: &str = "containerd.io/snapshot.ref";
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";
/// The layer and those above it, comma-separated, within
/// [`IMAGE_LAYERS_MAX`].
pub const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";
/// CRI keeps the layer list label under this size.
pub const IMAGE_LAYERS_MAX: usize = 4 << 10;
/// How Pronto made a layer snapshot: `lazy` (mounted on demand) or
/// `parallel` (fetched whole and unpacked by Pronto). Shown by `ctr
/// snapshots info`; absent on snapshots containerd unpacked.
pub const LABEL_PRONTO_LAYER: &str = "pronto/layer";

/// The labels CRI passes when it prepares the snapshot of layer `layer`
/// (committed as `chain_id`) of image `image_ref` at `manifest`; `above`
/// are the layer digests from this one up.
pub fn layer_labels(
    chain_id: &str,
    image_ref: &str,
    manifest: &str,
    layer: &str,
    above: &[String],
) -> HashMap<String, String> {
    HashMap::from([
        (LABEL_TARGET.to_owned(), chain_id.to_owned()),
        (LABEL_IMAGE_REF.to_owned(), image_ref.to_owned()),
        (LABEL_MANIFEST.to_owned(), manifest.to_owned()),
        (LABEL_LAYER.to_owned(), layer.to_owned()),
        (LABEL_IMAGE_LAYERS.to_owned(), image_layers(above)),
    ])
}

/// As many of `digests` as fit in [`IMAGE_LAYERS_MAX`], comma-separated.
fn image_layers(digests: &[String]) -> String {
    let mut list = String::new();
    for digest in digests {
        if list.len() + digest.len() + 1 > IMAGE_LAYERS_MAX {
            break;
        }
        if !list.is_empty() {
            list.push(',');
        }
        list.push_str(digest);
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layer_list_stays_within_crs_limit() {
        let digests: Vec<String> = (0..100).map(|i| format!("sha256:{:064x}", i)).collect();
        let labels = layer_labels("sha256:c", "r", "sha256:m", &digests[0], &digests);
        let list = &labels[LABEL_IMAGE_LAYERS];
        assert!(list.len() <= IMAGE_LAYERS_MAX);
        assert!(list.starts_with(&digests[0]));
        assert_eq!(list.split(',').count(), IMAGE_LAYERS_MAX / 72);
        assert_eq!(labels[LABEL_TARGET], "sha256:c");
    }
}
