//! Images assembled from layers into an OCI image layout directory
//! (`oci-layout`, `index.json`, `blobs/sha256/…`), ready for `skopeo copy`.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use super::digest::sha256;
use super::layer::Layer;

pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";

/// The platform an image is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    pub fn new(os: &str, architecture: &str) -> Self {
        Self {
            os: os.to_owned(),
            architecture: architecture.to_owned(),
            variant: None,
        }
    }

    fn to_json(&self) -> Value {
        let mut value = json!({"os": self.os, "architecture": self.architecture});
        if let Some(variant) = &self.variant {
            value["variant"] = json!(variant);
        }
        value
    }
}

impl Default for Platform {
    fn default() -> Self {
        Platform::new("linux", "amd64")
    }
}

/// An image to build: layers bottom-up, plus what the config says to run.
#[derive(Debug, Clone, Default)]
pub struct ImageBuilder {
    pub layers: Vec<Layer>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub labels: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub platform: Platform,
    /// What the config says the layers' diff IDs are, instead of the
    /// truth: a hostile or broken image.
    pub claimed_diff_ids: Option<Vec<String>>,
}

/// A layer as written into a layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltLayer {
    pub digest: String,
    pub size: u64,
    pub diff_id: String,
    pub uncompressed_size: u64,
    pub media_type: String,
}

/// An image as written into a layout.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    pub manifest_digest: String,
    pub manifest: Vec<u8>,
    pub config_digest: String,
    pub layers: Vec<BuiltLayer>,
    pub platform: Platform,
}

impl BuiltImage {
    /// Sum of the compressed layer sizes: what a full pull downloads,
    /// besides the manifest and config.
    pub fn layers_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

impl ImageBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn layer(mut self, layer: Layer) -> Self {
        self.layers.push(layer);
        self
    }

    pub fn entrypoint(mut self, args: &[&str]) -> Self {
        self.entrypoint = args.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn cmd(mut self, args: &[&str]) -> Self {
        self.cmd = args.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn env(mut self, var: &str) -> Self {
        self.env.push(var.to_owned());
        self
    }

    /// A label in the image config (`config.Labels`).
    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn platform(mut self, platform: Platform) -> Self {
        self.platform = platform;
        self
    }

    /// Has the config name `diff_ids` as the layers' diff IDs, whatever
    /// the layers unpack to.
    pub fn claimed_diff_ids(mut self, diff_ids: Vec<String>) -> Self {
        self.claimed_diff_ids = Some(diff_ids);
        self
    }

    /// Writes layers, config and manifest as blobs of `layout`. The image
    /// is not tagged; see [`OciLayout::tag`].
    pub fn build(&self, layout: &OciLayout) -> Result<BuiltImage> {
        let layers = self
            .layers
            .iter()
            .map(|layer| layout.write_layer(layer))
            .collect::<Result<Vec<_>>>()?;
        let mut config = json!({
            "created": "2023-11-14T22:13:20Z",
            "os": self.platform.os,
            "architecture": self.platform.architecture,
            "config": {},
            "rootfs": {
                "type": "layers",
                "diff_ids": self.claimed_diff_ids.clone().unwrap_or_else(
                    || layers.iter().map(|l| l.diff_id.clone()).collect()
                ),
            },
        });
        if let Some(variant) = &self.platform.variant {
            config["variant"] = json!(variant);
        }
        let run = &mut config["config"];
        if !self.entrypoint.is_empty() {
            run["Entrypoint"] = json!(self.entrypoint);
        }
        if !self.cmd.is_empty() {
            run["Cmd"] = json!(self.cmd);
        }
        let mut env = vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".to_owned()];
        env.extend(self.env.iter().cloned());
        run["Env"] = json!(env);
        if let Some(dir) = &self.working_dir {
            run["WorkingDir"] = json!(dir);
        }
        if !self.labels.is_empty() {
            run["Labels"] = self
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        let config = serde_json::to_vec(&config)?;
        let config_digest = layout.write_blob(&config)?;
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": {
                "mediaType": CONFIG_MEDIA_TYPE,
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": layers.iter().map(|l| json!({
                "mediaType": l.media_type,
                "digest": l.digest,
                "size": l.size,
            })).collect::<Vec<_>>(),
        }))?;
        let manifest_digest = layout.write_blob(&manifest)?;
        Ok(BuiltImage {
            manifest_digest,
            manifest,
            config_digest,
            layers,
            platform: self.platform.clone(),
        })
    }
}

/// An OCI image layout directory.
#[derive(Debug)]
pub struct OciLayout {
    dir: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl OciLayout {
    /// Creates an empty layout in `dir` (created if missing).
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("blobs/sha256"))
            .with_context(|| format!("create OCI layout in {}", dir.display()))?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        let layout = Self {
            dir: dir.to_path_buf(),
        };
        if !dir.join("index.json").exists() {
            layout.write_index(&[])?;
        }
        Ok(layout)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the blob with `digest` is stored.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir.join("blobs/sha256").join(hex)
    }

    /// Stores `bytes` as a blob and returns its digest.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<String> {
        let digest = sha256(bytes);
        std::fs::write(self.blob_path(&digest), bytes)?;
        Ok(digest)
    }

    /// Streams `layer` into a blob and returns its description.
    pub fn write_layer(&self, layer: &Layer) -> Result<BuiltLayer> {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp = self
            .dir
            .join(format!("blobs/tmp-{}-{n}", std::process::id()));
        let file = File::create(&temp).with_context(|| format!("create {}", temp.display()))?;
        let digests = layer.write(BufWriter::with_capacity(1 << 20, file))?;
        std::fs::rename(&temp, self.blob_path(&digests.digest))?;
        Ok(BuiltLayer {
            digest: digests.digest,
            size: digests.size,
            diff_id: digests.diff_id,
            uncompressed_size: digests.uncompressed_size,
            media_type: layer.compression.media_type().to_owned(),
        })
    }

    /// Names `image` as `name` in `index.json` (the `ref.name` that
    /// `skopeo copy oci:DIR:NAME` refers to).
    pub fn tag(&self, name: &str, image: &BuiltImage) -> Result<()> {
        self.add_to_index(json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": image.manifest_digest,
            "size": image.manifest.len(),
            "platform": image.platform.to_json(),
            "annotations": {"org.opencontainers.image.ref.name": name},
        }))
    }

    /// Writes an image index over `images` (one per platform) and names it
    /// `name`. Returns the index digest.
    pub fn tag_multi_platform(&self, name: &str, images: &[BuiltImage]) -> Result<String> {
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": images.iter().map(|image| json!({
                "mediaType": MANIFEST_MEDIA_TYPE,
                "digest": image.manifest_digest,
                "size": image.manifest.len(),
                "platform": image.platform.to_json(),
            })).collect::<Vec<_>>(),
        }))?;
        let digest = self.write_blob(&index)?;
        self.add_to_index(json!({
            "mediaType": INDEX_MEDIA_TYPE,
            "digest": digest,
            "size": index.len(),
            "annotations": {"org.opencontainers.image.ref.name": name},
        }))?;
        Ok(digest)
    }

    fn add_to_index(&self, descriptor: Value) -> Result<()> {
        let name = &descriptor["annotations"]["org.opencontainers.image.ref.name"];
        let mut manifests = self.read_index()?;
        manifests.retain(|m| &m["annotations"]["org.opencontainers.image.ref.name"] != name);
        manifests.push(descriptor);
        self.write_index(&manifests)
    }

    fn read_index(&self) -> Result<Vec<Value>> {
        let text = std::fs::read(self.dir.join("index.json"))?;
        let index: Value = serde_json::from_slice(&text)?;
        Ok(index["manifests"].as_array().cloned().unwrap_or_default())
    }

    fn write_index(&self, manifests: &[Value]) -> Result<()> {
        let index = json!({
            "schemaVersion": 2,
            "mediaType": INDEX_MEDIA_TYPE,
            "manifests": manifests,
        });
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec_pretty(&index)?,
        )?;
        Ok(())
    }

    /// Writes the whole layout as a tar archive (for `ctr images import`).
    pub fn write_archive(&self, path: &Path) -> Result<()> {
        let file = File::create(path).with_context(|| format!("create {}", path.display()))?;
        let mut tar = tar::Builder::new(BufWriter::new(file));
        tar.follow_symlinks(false);
        for name in ["oci-layout", "index.json"] {
            tar.append_path_with_name(self.dir.join(name), name)?;
        }
        tar.append_dir_all("blobs", self.dir.join("blobs"))?;
        tar.into_inner()?.into_inner()?.sync_all()?;
        Ok(())
    }

    /// True when the name refers to an image index (multi-platform).
    pub fn is_multi_platform(&self, name: &str) -> Result<bool> {
        Ok(self.read_index()?.iter().any(|m| {
            m["annotations"]["org.opencontainers.image.ref.name"] == name
                && m["mediaType"] == INDEX_MEDIA_TYPE
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Compression;

    #[test]
    fn layout_holds_verifiable_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(dir.path()).unwrap();
        let image = ImageBuilder::new()
            .layer(Layer::new().file("a", "1"))
            .layer(Layer::new().compression(Compression::None).file("b", "2"))
            .cmd(&["/bin/true"])
            .build(&layout)
            .unwrap();
        layout.tag("latest", &image).unwrap();
        for digest in std::iter::once(&image.manifest_digest)
            .chain(std::iter::once(&image.config_digest))
            .chain(image.layers.iter().map(|l| &l.digest))
        {
            let bytes = std::fs::read(layout.blob_path(digest)).unwrap();
            assert_eq!(&sha256(&bytes), digest);
        }
        let config: Value =
            serde_json::from_slice(&std::fs::read(layout.blob_path(&image.config_digest)).unwrap())
                .unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            json!(image.layers[0].diff_id)
        );
        assert_eq!(config["config"]["Cmd"], json!(["/bin/true"]));
        // The uncompressed layer's diff_id is its digest.
        assert_eq!(image.layers[1].diff_id, image.layers[1].digest);
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(
            index["manifests"][0]["digest"],
            json!(image.manifest_digest)
        );
        assert!(!layout.is_multi_platform("latest").unwrap());
    }
}
