//! Whole-blob downloads split into concurrent range requests: for links
//! where one connection is throttled (object stores behind registries cap
//! per-connection throughput), many ranges in parallel fill the pipe.

use std::io::Write;
use std::path::Path;

use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt, stream};
use tokio::sync::Semaphore;

use crate::digest::{StreamDigest, check_algorithm, mismatch};
use crate::error::{RegistryError, Target};
use crate::{RegistryClient, Repository, Result};

/// How a parallel download is cut up.
#[derive(Debug, Clone)]
pub struct ParallelFetch {
    /// Bytes per range request.
    pub chunk_size: u64,
    /// Range requests in flight at once (the client's per-registry limit
    /// still applies).
    pub concurrency: usize,
    /// Shared limits: each range request holds a permit of every one (e.g.
    /// a node-wide and a per-image cap on downloads).
    pub limits: Vec<Arc<Semaphore>>,
}

impl Default for ParallelFetch {
    fn default() -> Self {
        Self {
            chunk_size: 16 << 20,
            concurrency: 8,
            limits: Vec::new(),
        }
    }
}

impl RegistryClient {
    /// Downloads blob `digest` of `size` bytes into the file at `path` with
    /// concurrent range requests, and verifies its digest. Ranges complete
    /// in any order but are written and hashed in order, so memory stays
    /// within `concurrency` chunks and the blob is read only once. On error
    /// the file is removed.
    pub async fn blob_to_file_parallel(
        &self,
        repo: &Repository,
        digest: &str,
        size: u64,
        path: &Path,
        plan: ParallelFetch,
    ) -> Result<()> {
        let target = Target::new(repo, format!("blob {digest}"));
        check_algorithm(&target, digest)?;
        let result = self
            .fetch_parallel(repo, &target, digest, size, path, plan)
            .await;
        if result.is_err() {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    async fn fetch_parallel(
        &self,
        repo: &Repository,
        target: &Target,
        digest: &str,
        size: u64,
        path: &Path,
        plan: ParallelFetch,
    ) -> Result<()> {
        let write_error = |source| RegistryError::Write {
            target: target.clone(),
            source,
        };
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::File::create(path).map_err(write_error)?,
        );
        let chunk = plan.chunk_size.max(1);
        let ranges = (0..size.div_ceil(chunk)).map(|i| i * chunk..((i + 1) * chunk).min(size));
        let mut chunks = stream::iter(ranges)
            .map(|range| {
                let limits = &plan.limits;
                async move {
                    let mut permits = Vec::with_capacity(limits.len());
                    for limit in limits {
                        permits.push(
                            limit
                                .acquire()
                                .await
                                .expect("download limits are never closed"),
                        );
                    }
                    self.blob_range(repo, digest, range, size).await
                }
            })
            .buffered(plan.concurrency.max(1));
        let mut hasher = StreamDigest::default();
        while let Some(bytes) = chunks.try_next().await? {
            hasher.update(&bytes);
            // Writes of one chunk into the page cache; cheap next to the
            // network wait, so they stay on this task.
            file.write_all(&bytes).map_err(write_error)?;
        }
        file.into_inner()
            .map_err(|e| write_error(e.into_error()))?
            .sync_all()
            .map_err(write_error)?;
        let actual = hasher.finish();
        if actual != digest {
            return Err(mismatch(target, digest, actual));
        }
        Ok(())
    }
}
