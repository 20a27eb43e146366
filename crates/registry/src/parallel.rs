//! Whole-blob downloads split into concurrent range requests: for links
//! where one connection is throttled (object stores behind registries cap
//! per-connection throughput), many ranges in parallel fill the pipe.

use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
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

/// Where the in-order bytes of a parallel download go: a file, an unpacker,
/// or both.
pub trait ChunkSink {
    /// Takes the next bytes of the blob. An error stops the download.
    fn write(&mut self, chunk: Bytes) -> impl Future<Output = std::io::Result<()>> + Send;

    /// Takes the next bytes of the blob, read back from what an earlier,
    /// interrupted download kept (see [`Resume`]), not fetched.
    fn write_resumed(&mut self, chunk: Bytes) -> impl Future<Output = std::io::Result<()>> + Send {
        self.write(chunk)
    }
}

/// The first bytes of a blob that an interrupted download kept, in a
/// file: read back (and hashed with the rest) instead of fetched again.
/// They are checked with the whole blob's digest at the end.
#[derive(Debug)]
pub struct Resume {
    pub file: std::fs::File,
    pub len: u64,
}

/// Writes the blob into a file (buffered; synced by [`FileSink::finish`]).
struct FileSink(std::io::BufWriter<std::fs::File>);

impl ChunkSink for FileSink {
    async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        // One chunk into the page cache: cheap next to the network wait.
        self.0.write_all(&chunk)
    }
}

impl FileSink {
    fn finish(self) -> std::io::Result<()> {
        self.0.into_inner().map_err(|e| e.into_error())?.sync_all()
    }
}

impl RegistryClient {
    /// Downloads blob `digest` of `size` bytes into the file at `path` with
    /// concurrent range requests, and verifies its digest. On error the
    /// file is removed.
    pub async fn blob_to_file_parallel(
        &self,
        repo: &Repository,
        digest: &str,
        size: u64,
        path: &Path,
        plan: ParallelFetch,
    ) -> Result<()> {
        let target = Target::new(repo, format!("blob {digest}"));
        let write_error = |source| RegistryError::Write {
            target: target.clone(),
            source,
        };
        let result = async {
            let file = std::fs::File::create(path).map_err(write_error)?;
            let mut sink = FileSink(std::io::BufWriter::with_capacity(1 << 20, file));
            self.blob_parallel_into(repo, digest, size, plan, &mut sink, None)
                .await?;
            sink.finish().map_err(write_error)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(path);
        }
        result
    }

    /// Makes blob `digest` a file in `dir` named by its hex digest, the
    /// one place Pronto keeps whole layers: downloaded with concurrent
    /// range requests into a temporary name, verified, then renamed; a
    /// file already there (an earlier verified download) is used as it is.
    pub async fn blob_in_dir(
        &self,
        repo: &Repository,
        digest: &str,
        size: u64,
        dir: &Path,
        plan: ParallelFetch,
    ) -> Result<std::path::PathBuf> {
        let target = Target::new(repo, format!("blob {digest}"));
        let write_error = |source| RegistryError::Write {
            target: target.clone(),
            source,
        };
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        let path = dir.join(hex);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() == size) {
            return Ok(path);
        }
        std::fs::create_dir_all(dir).map_err(write_error)?;
        static DOWNLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = DOWNLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let partial = dir.join(format!("{hex}.{}.{n}.partial", std::process::id()));
        self.blob_to_file_parallel(repo, digest, size, &partial, plan)
            .await?;
        std::fs::rename(&partial, &path).map_err(write_error)?;
        Ok(path)
    }

    /// Downloads blob `digest` of `size` bytes with concurrent range
    /// requests and hands its bytes to `sink` in order, while hashing them.
    /// Ranges complete in any order but are passed on in order, so memory
    /// stays within `concurrency` chunks. The digest is checked after the
    /// last byte: on a mismatch (an error) the sink has seen bytes that must
    /// not be used. With `resume`, the blob's first bytes come from its
    /// file and only the rest is fetched.
    pub async fn blob_parallel_into(
        &self,
        repo: &Repository,
        digest: &str,
        size: u64,
        plan: ParallelFetch,
        sink: &mut impl ChunkSink,
        resume: Option<Resume>,
    ) -> Result<()> {
        let target = Target::new(repo, format!("blob {digest}"));
        check_algorithm(&target, digest)?;
        let write_error = |source| RegistryError::Write {
            target: target.clone(),
            source,
        };
        let mut hasher = StreamDigest::default();
        let start = match resume {
            Some(Resume { file, len }) => {
                let len = len.min(size);
                let mut file = tokio::fs::File::from_std(file);
                let mut left = len;
                while left > 0 {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; left.min(1 << 20) as usize];
                    file.read_exact(&mut buf).await.map_err(write_error)?;
                    left -= buf.len() as u64;
                    hasher.update(&buf);
                    sink.write_resumed(Bytes::from(buf))
                        .await
                        .map_err(write_error)?;
                }
                len
            }
            None => 0,
        };
        let chunk = plan.chunk_size.max(1);
        let ranges = (0..(size - start).div_ceil(chunk))
            .map(|i| start + i * chunk..(start + (i + 1) * chunk).min(size));
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
        while let Some(bytes) = chunks.try_next().await? {
            hasher.update(&bytes);
            sink.write(bytes)
                .await
                .map_err(|source| RegistryError::Write {
                    target: target.clone(),
                    source,
                })?;
        }
        let actual = hasher.finish();
        if actual != digest {
            return Err(mismatch(&target, digest, actual));
        }
        Ok(())
    }
}
