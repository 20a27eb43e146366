//! Indexes kept on the node, under `<root>/indexes`, for images whose
//! repository the user cannot push to. The layout mirrors a registry:
//!
//! ```text
//! indexes/blobs/sha256/<hex>          index blobs
//! indexes/manifests/sha256/<hex>      artifact manifests
//! indexes/subjects/<image-hex>/<hex>  which manifests belong to an image
//! indexes/poisoned/<hex>              index sets found not to match their
//!                                     layers (wherever they came from),
//!                                     with the reason
//! ```
//!
//! Every file is written to a temporary name, synced and renamed, so a
//! crash leaves either the old state or the new one. Names are built from
//! validated hex digests only, so nothing outside the directory is reached.

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::artifact::{IndexSet, Location, parse_artifact};
use crate::error::CatalogError;

#[derive(Debug, Clone)]
pub struct LocalIndexStore {
    dir: PathBuf,
}

impl LocalIndexStore {
    /// Opens (creating if needed) the store below Pronto's `root`.
    pub fn open(root: &Path) -> Result<Self, CatalogError> {
        let dir = root.join("indexes");
        for sub in ["blobs/sha256", "manifests/sha256", "subjects", "poisoned"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(CatalogError::io("cannot create", &path))?;
        }
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of blob `digest`; `None` for anything but a sha256 digest.
    pub fn blob_path(&self, digest: &str) -> Option<PathBuf> {
        Some(self.dir.join("blobs/sha256").join(hex_of(digest)?))
    }

    /// Moves (or copies) the index blob at `src` into the store and
    /// returns its digest and size.
    pub fn put_blob_file(&self, src: &Path) -> Result<(String, u64), CatalogError> {
        let mut file = std::fs::File::open(src).map_err(CatalogError::io("cannot read", src))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = file
                .read(&mut buf)
                .map_err(CatalogError::io("cannot read", src))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
        let dest = self.blob_path(&digest).expect("computed digests are valid");
        if !dest.exists() {
            let temp = self.temp_path(&dest);
            std::fs::copy(src, &temp).map_err(CatalogError::io("cannot write", &temp))?;
            sync_and_rename(&temp, &dest)?;
        }
        Ok((digest, size))
    }

    /// Stores an artifact manifest for image manifest `subject` and
    /// returns its digest.
    pub fn put_manifest(&self, bytes: &[u8], subject: &str) -> Result<String, CatalogError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
        let path = self
            .manifest_path(&digest)
            .expect("computed digests are valid");
        let temp = self.temp_path(&path);
        std::fs::write(&temp, bytes).map_err(CatalogError::io("cannot write", &temp))?;
        sync_and_rename(&temp, &path)?;
        let subject_hex = hex_of(subject).ok_or_else(|| CatalogError::Artifact {
            digest: digest.clone(),
            problem: format!("subject {subject:?} is not a sha256 digest"),
        })?;
        let marker_dir = self.dir.join("subjects").join(subject_hex);
        std::fs::create_dir_all(&marker_dir)
            .map_err(CatalogError::io("cannot create", &marker_dir))?;
        let marker = marker_dir.join(hex_of(&digest).expect("valid"));
        std::fs::write(&marker, b"").map_err(CatalogError::io("cannot write", &marker))?;
        sync_dir(&marker_dir)?;
        Ok(digest)
    }

    /// Marks index set `digest` (an artifact manifest, local or remote) as
    /// not matching its layers: no pull on this node uses it again.
    pub fn poison(&self, digest: &str, reason: &str) -> Result<(), CatalogError> {
        let Some(hex) = hex_of(digest) else {
            return Ok(());
        };
        let path = self.dir.join("poisoned").join(hex);
        let temp = self.temp_path(&path);
        std::fs::write(&temp, reason).map_err(CatalogError::io("cannot write", &temp))?;
        sync_and_rename(&temp, &path)
    }

    /// Why index set `digest` was poisoned, if it was.
    pub fn poisoned(&self, digest: &str) -> Option<String> {
        let path = self.dir.join("poisoned").join(hex_of(digest)?);
        std::fs::read_to_string(path).ok()
    }

    /// The index sets stored for image manifest `subject`.
    pub fn sets_for(&self, subject: &str) -> Result<Vec<IndexSet>, CatalogError> {
        let Some(subject_hex) = hex_of(subject) else {
            return Ok(Vec::new());
        };
        let marker_dir = self.dir.join("subjects").join(subject_hex);
        let Ok(entries) = std::fs::read_dir(&marker_dir) else {
            return Ok(Vec::new());
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut sets = Vec::new();
        for name in names {
            let digest = format!("sha256:{name}");
            match self.manifest(&digest) {
                Ok(bytes) => sets.push(parse_artifact(&digest, &bytes, subject, Location::Local)?),
                Err(CatalogError::NotFound { .. }) => continue,
                Err(err) => return Err(err),
            }
        }
        Ok(sets)
    }

    /// A stored manifest, verified against its digest.
    pub fn manifest(&self, digest: &str) -> Result<Vec<u8>, CatalogError> {
        let path = self
            .manifest_path(digest)
            .ok_or_else(|| CatalogError::NotFound {
                digest: digest.to_owned(),
            })?;
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CatalogError::NotFound {
                    digest: digest.to_owned(),
                });
            }
            Err(e) => return Err(CatalogError::io("cannot read", &path)(e)),
        };
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
        if actual != digest {
            return Err(CatalogError::Artifact {
                digest: digest.to_owned(),
                problem: format!("the stored file hashes to {actual}"),
            });
        }
        Ok(bytes)
    }

    /// The subject (image manifest digest) of a stored index manifest.
    pub fn subject_of(&self, digest: &str) -> Result<String, CatalogError> {
        let bytes = self.manifest(digest)?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| CatalogError::Artifact {
                digest: digest.to_owned(),
                problem: format!("not JSON: {e}"),
            })?;
        value["subject"]["digest"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| CatalogError::Artifact {
                digest: digest.to_owned(),
                problem: "no subject".into(),
            })
    }

    /// Reads `range` of blob `digest`. The caller verifies the bytes.
    pub fn read_range(&self, digest: &str, range: Range<u64>) -> Result<Vec<u8>, CatalogError> {
        let path = self
            .blob_path(digest)
            .ok_or_else(|| CatalogError::NotFound {
                digest: digest.to_owned(),
            })?;
        let mut file =
            std::fs::File::open(&path).map_err(CatalogError::io("cannot read", &path))?;
        file.seek(SeekFrom::Start(range.start))
            .map_err(CatalogError::io("cannot read", &path))?;
        let mut out = vec![0u8; (range.end - range.start) as usize];
        file.read_exact(&mut out)
            .map_err(CatalogError::io("cannot read", &path))?;
        Ok(out)
    }

    /// Forgets index manifest `digest` of `subject`, and deletes the blobs
    /// no remaining manifest uses.
    pub fn remove(&self, subject: &str, digest: &str) -> Result<(), CatalogError> {
        if let (Some(s), Some(d)) = (hex_of(subject), hex_of(digest)) {
            let marker = self.dir.join("subjects").join(s).join(d);
            let _ = std::fs::remove_file(&marker);
            let _ = std::fs::remove_dir(self.dir.join("subjects").join(s));
        }
        if let Some(path) = self.manifest_path(digest) {
            let _ = std::fs::remove_file(path);
        }
        self.collect_garbage()
    }

    /// Deletes blobs that no stored manifest references.
    fn collect_garbage(&self) -> Result<(), CatalogError> {
        let manifests = self.dir.join("manifests/sha256");
        let mut used = std::collections::HashSet::new();
        for entry in std::fs::read_dir(&manifests)
            .map_err(CatalogError::io("cannot list", &manifests))?
            .flatten()
        {
            let Ok(bytes) = std::fs::read(entry.path()) else {
                continue;
            };
            let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            for layer in value["layers"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                if let Some(hex) = layer["digest"].as_str().and_then(hex_of) {
                    used.insert(hex.to_owned());
                }
            }
        }
        let blobs = self.dir.join("blobs/sha256");
        for entry in std::fs::read_dir(&blobs)
            .map_err(CatalogError::io("cannot list", &blobs))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !used.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    fn manifest_path(&self, digest: &str) -> Option<PathBuf> {
        Some(self.dir.join("manifests/sha256").join(hex_of(digest)?))
    }

    fn temp_path(&self, dest: &Path) -> PathBuf {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        dest.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
    }
}

/// The hex of a `sha256:<64 lowercase hex>` digest; `None` otherwise.
fn hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    (hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(hex)
}

fn sync_and_rename(temp: &Path, dest: &Path) -> Result<(), CatalogError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(temp)
        .map_err(CatalogError::io("cannot open", temp))?;
    file.sync_all()
        .map_err(CatalogError::io("cannot sync", temp))?;
    std::fs::rename(temp, dest).map_err(CatalogError::io("cannot rename into place", dest))?;
    if let Some(parent) = dest.parent() {
        sync_dir(parent)?;
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), CatalogError> {
    let handle = std::fs::File::open(dir).map_err(CatalogError::io("cannot open", dir))?;
    handle
        .sync_all()
        .map_err(CatalogError::io("cannot sync", dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{LayerIndexRef, OCI_MANIFEST, Subject, artifact_manifest};

    #[test]
    fn store_and_find_by_subject_then_remove() {
        let root = tempfile::tempdir().unwrap();
        let store = LocalIndexStore::open(root.path()).unwrap();
        let src = root.path().join("blob");
        std::fs::write(&src, b"index bytes").unwrap();
        let (blob, size) = store.put_blob_file(&src).unwrap();
        let subject = Subject {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            size: 10,
        };
        let layer = LayerIndexRef {
            layer: format!("sha256:{}", "b".repeat(64)),
            blob: blob.clone(),
            size,
            prefix_size: 5,
            prefix_digest: format!("sha256:{}", "c".repeat(64)),
        };
        let manifest = artifact_manifest(&subject, 1 << 20, &[layer]);
        let digest = store.put_manifest(&manifest, &subject.digest).unwrap();
        let sets = store.sets_for(&subject.digest).unwrap();
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0].manifest_digest, digest);
        assert_eq!(store.read_range(&blob, 0..5).unwrap(), b"index");
        assert_eq!(store.subject_of(&digest).unwrap(), subject.digest);

        store.remove(&subject.digest, &digest).unwrap();
        assert!(store.sets_for(&subject.digest).unwrap().is_empty());
        assert!(
            !store.blob_path(&blob).unwrap().exists(),
            "unused blob collected"
        );
    }

    #[test]
    fn hostile_digests_never_become_paths() {
        let root = tempfile::tempdir().unwrap();
        let store = LocalIndexStore::open(root.path()).unwrap();
        assert!(store.blob_path("sha256:../../etc/passwd").is_none());
        assert!(store.read_range("sha256:../x", 0..1).is_err());
        assert!(store.sets_for("../../").unwrap().is_empty());
    }
}
