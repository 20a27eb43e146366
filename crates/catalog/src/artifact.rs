//! The index artifact: an OCI image manifest with `artifactType`
//! `application/vnd.pronto.index.v1`, the empty config, one blob per
//! indexed layer, and the image manifest as `subject`.

use pronto_index::{
    ANNOTATION_LAYER, ANNOTATION_PREFIX_DIGEST, ANNOTATION_PREFIX_SIZE, ANNOTATION_SPAN_SIZE,
    ARTIFACT_TYPE, INDEX_MEDIA_TYPE,
};
use serde_json::{Value, json};

use crate::error::CatalogError;
use crate::{EMPTY_CONFIG_DIGEST, EMPTY_CONFIG_MEDIA_TYPE};

pub use pronto_registry::OCI_MANIFEST;

/// The image manifest an index set belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// One indexed layer as the artifact lists it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerIndexRef {
    /// The image layer this index describes.
    pub layer: String,
    /// The index blob.
    pub blob: String,
    pub size: u64,
    /// What a node fetches to mount: the first `prefix_size` bytes, which
    /// hash to `prefix_digest`.
    pub prefix_size: u64,
    pub prefix_digest: String,
}

/// Where an index set was found, which is also how it is bound to the
/// image: what a node's `index.trust` policy accepts or refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Location {
    /// Listed in the image index the image's tag (or digest) names, next
    /// to the image manifest: whoever published the image published it.
    Bound,
    /// Found among the referrers of the image manifest: anyone who can
    /// push to the repository can add one.
    Registry,
    /// Built on this node from the layers themselves.
    Local,
}

impl Location {
    pub const ALL: [Location; 3] = [Location::Bound, Location::Registry, Location::Local];

    /// The name `index.trust` and `pronto index list` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Location::Bound => "bound",
            Location::Registry => "referrers",
            Location::Local => "local",
        }
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Location {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Location::ALL
            .into_iter()
            .find(|l| l.as_str() == text)
            .ok_or_else(|| format!("{text:?} is not one of \"bound\", \"referrers\", \"local\""))
    }
}

/// The indexes of one image manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IndexSet {
    pub manifest_digest: String,
    pub subject: String,
    pub span_size: u64,
    pub layers: Vec<LayerIndexRef>,
    pub location: Location,
}

impl IndexSet {
    /// The index of `layer`, if this set has one.
    pub fn layer(&self, layer: &str) -> Option<&LayerIndexRef> {
        self.layers.iter().find(|l| l.layer == layer)
    }
}

/// The artifact manifest for `layers` of `subject`.
pub fn artifact_manifest(subject: &Subject, span_size: u64, layers: &[LayerIndexRef]) -> Vec<u8> {
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": {"mediaType": EMPTY_CONFIG_MEDIA_TYPE, "digest": EMPTY_CONFIG_DIGEST, "size": 2},
        "layers": layers.iter().map(|l| json!({
            "mediaType": INDEX_MEDIA_TYPE,
            "digest": l.blob,
            "size": l.size,
            "annotations": {
                ANNOTATION_LAYER: l.layer,
                ANNOTATION_PREFIX_SIZE: l.prefix_size.to_string(),
                ANNOTATION_PREFIX_DIGEST: l.prefix_digest,
            },
        })).collect::<Vec<_>>(),
        "subject": {"mediaType": subject.media_type, "digest": subject.digest, "size": subject.size},
        "annotations": {ANNOTATION_SPAN_SIZE: span_size.to_string()},
    });
    serde_json::to_vec(&manifest).expect("JSON values serialise")
}

/// Parses an index artifact fetched by `digest` (already verified) and
/// checks that it belongs to `subject`.
pub fn parse_artifact(
    digest: &str,
    bytes: &[u8],
    subject: &str,
    location: Location,
) -> Result<IndexSet, CatalogError> {
    let invalid = |problem: String| CatalogError::Artifact {
        digest: digest.to_owned(),
        problem,
    };
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    if value["artifactType"] != ARTIFACT_TYPE {
        return Err(invalid(format!(
            "artifactType is {}, not {ARTIFACT_TYPE}",
            value["artifactType"]
        )));
    }
    if value["subject"]["digest"] != subject {
        return Err(invalid(format!(
            "its subject is {}, not {subject}",
            value["subject"]["digest"]
        )));
    }
    let span_size = value["annotations"][ANNOTATION_SPAN_SIZE]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("no span size annotation".into()))?;
    let mut layers = Vec::new();
    for layer in value["layers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if layer["mediaType"] != INDEX_MEDIA_TYPE {
            continue;
        }
        let text = |v: &Value, what: &str| {
            v.as_str()
                .map(str::to_owned)
                .ok_or_else(|| invalid(format!("an index blob has no {what}")))
        };
        let annotations = &layer["annotations"];
        let number = |v: &Value, what: &str| {
            text(v, what)?
                .parse::<u64>()
                .map_err(|_| invalid(format!("an index blob has an invalid {what}")))
        };
        let entry = LayerIndexRef {
            layer: text(&annotations[ANNOTATION_LAYER], "layer annotation")?,
            blob: text(&layer["digest"], "digest")?,
            size: layer["size"]
                .as_u64()
                .ok_or_else(|| invalid("an index blob has no size".into()))?,
            prefix_size: number(&annotations[ANNOTATION_PREFIX_SIZE], "prefix size")?,
            prefix_digest: text(&annotations[ANNOTATION_PREFIX_DIGEST], "prefix digest")?,
        };
        if entry.prefix_size == 0 || entry.prefix_size > entry.size {
            return Err(invalid(format!(
                "index of {} has a prefix outside its blob",
                entry.layer
            )));
        }
        layers.push(entry);
    }
    Ok(IndexSet {
        manifest_digest: digest.to_owned(),
        subject: subject.to_owned(),
        span_size,
        layers,
        location,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> Subject {
        Subject {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "1".repeat(64)),
            size: 100,
        }
    }

    fn layer() -> LayerIndexRef {
        LayerIndexRef {
            layer: format!("sha256:{}", "2".repeat(64)),
            blob: format!("sha256:{}", "3".repeat(64)),
            size: 5000,
            prefix_size: 400,
            prefix_digest: format!("sha256:{}", "4".repeat(64)),
        }
    }

    #[test]
    fn artifact_round_trip() {
        let bytes = artifact_manifest(&subject(), 4 << 20, &[layer()]);
        let set = parse_artifact("sha256:x", &bytes, &subject().digest, Location::Local).unwrap();
        assert_eq!(set.layers, [layer()]);
        assert_eq!(set.span_size, 4 << 20);
        assert!(set.layer(&layer().layer).is_some());
    }

    #[test]
    fn wrong_subject_or_type_is_refused() {
        let bytes = artifact_manifest(&subject(), 4 << 20, &[layer()]);
        let other = format!("sha256:{}", "9".repeat(64));
        assert!(parse_artifact("d", &bytes, &other, Location::Local).is_err());
        let mut value: Value = serde_json::from_slice(&bytes).unwrap();
        value["artifactType"] = json!("application/x-other");
        let bytes = serde_json::to_vec(&value).unwrap();
        assert!(parse_artifact("d", &bytes, &subject().digest, Location::Local).is_err());
    }
}
