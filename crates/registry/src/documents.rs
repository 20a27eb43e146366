//! Manifests and small blobs by digest, kept in memory. A document named by
//! its digest never changes, so a process fetches it once: a node's daemon
//! reads an image's manifest and config for the index lookup, the layers'
//! annotations and the whole-layer pull, and each of those used to be a
//! round trip of its own.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

use crate::{Manifest, Repository};

/// Bytes of documents kept; the oldest go first.
const MAX_KEPT_BYTES: usize = 8 << 20;
/// Larger documents are not kept.
const MAX_DOCUMENT: usize = 1 << 20;

/// A document kept by digest.
#[derive(Debug, Clone)]
pub(crate) enum Kept {
    Manifest(Manifest),
    Blob(Bytes),
}

impl Kept {
    fn len(&self) -> usize {
        match self {
            Kept::Manifest(m) => m.bytes.len(),
            Kept::Blob(b) => b.len(),
        }
    }
}

/// Verified documents by repository and digest, bounded in bytes.
#[derive(Debug, Default)]
pub(crate) struct Documents {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    kept: HashMap<String, Kept>,
    /// Keys, oldest first.
    order: VecDeque<String>,
    bytes: usize,
}

/// Documents are kept per repository: a digest readable in one repository
/// is not handed out for another.
fn key(repo: &Repository, digest: &str) -> String {
    format!("{repo}@{digest}")
}

impl Documents {
    pub fn get(&self, repo: &Repository, digest: &str) -> Option<Kept> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.kept.get(&key(repo, digest)).cloned()
    }

    /// Keeps `document`, verified against `digest` by the caller.
    pub fn put(&self, repo: &Repository, digest: &str, document: Kept) {
        let size = document.len();
        if size > MAX_DOCUMENT {
            return;
        }
        let key = key(repo, digest);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.kept.contains_key(&key) {
            return;
        }
        while inner.bytes + size > MAX_KEPT_BYTES {
            let Some(oldest) = inner.order.pop_front() else {
                break;
            };
            if let Some(gone) = inner.kept.remove(&oldest) {
                inner.bytes -= gone.len();
            }
        }
        inner.bytes += size;
        inner.order.push_back(key.clone());
        inner.kept.insert(key, document);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(name: &str) -> Repository {
        Repository {
            registry: "r.example".into(),
            name: name.into(),
        }
    }

    #[test]
    fn documents_are_kept_per_repository_and_the_oldest_go_first() {
        let documents = Documents::default();
        let big = Bytes::from(vec![0u8; MAX_DOCUMENT]);
        documents.put(
            &repo("a"),
            "sha256:1",
            Kept::Blob(Bytes::from_static(b"{}")),
        );
        assert!(documents.get(&repo("a"), "sha256:1").is_some());
        assert!(documents.get(&repo("b"), "sha256:1").is_none());
        // Too big to keep.
        let huge = Bytes::from(vec![0u8; MAX_DOCUMENT + 1]);
        documents.put(&repo("a"), "sha256:huge", Kept::Blob(huge));
        assert!(documents.get(&repo("a"), "sha256:huge").is_none());
        // Filling the budget pushes the oldest out.
        for i in 0..MAX_KEPT_BYTES / MAX_DOCUMENT {
            documents.put(
                &repo("a"),
                &format!("sha256:big{i}"),
                Kept::Blob(big.clone()),
            );
        }
        assert!(documents.get(&repo("a"), "sha256:1").is_none());
        assert!(documents.get(&repo("a"), "sha256:big1").is_some());
        let inner = documents.inner.lock().unwrap();
        assert!(inner.bytes <= MAX_KEPT_BYTES);
        assert_eq!(inner.kept.len(), inner.order.len());
    }
}
