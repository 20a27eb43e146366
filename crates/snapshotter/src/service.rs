//! containerd's snapshots gRPC service over `LocalSnapshots` and `Remote`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use containerd_client::services::v1::snapshots as api;
use containerd_client::types::Mount as ApiMount;
use tonic::{Request, Response, Status};

use crate::SnapshotError;
use crate::choice::{Outcome, make_layer};
use crate::filter::Filters;
use crate::generated::Empty;
use crate::generated::snapshots_server::Snapshots;
use crate::local::{Info, Kind, LocalSnapshots, Mount};
use crate::remote::Remote;
use crate::whole::WholeLayers;
use pronto_containerd::labels::LABEL_TARGET;
use pronto_metrics::{ErrorKind, metrics};

/// The snapshotter containerd talks to.
#[derive(Debug, Clone)]
pub struct Snapshotter {
    pub local: Arc<LocalSnapshots>,
    pub remote: Option<Arc<Remote>>,
    /// Pronto's own parallel pull of layers that cannot be lazy.
    pub whole: Option<Arc<WholeLayers>>,
}

impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Self {
        let message = e.to_string();
        if !matches!(
            e,
            SnapshotError::NotFound(_) | SnapshotError::AlreadyExists(_)
        ) {
            metrics().error(ErrorKind::SnapshotApi);
        }
        match e {
            SnapshotError::NotFound(_) => Status::not_found(message),
            SnapshotError::AlreadyExists(_) => Status::already_exists(message),
            SnapshotError::InvalidArgument(_) => Status::invalid_argument(message),
            SnapshotError::FailedPrecondition(_) => Status::failed_precondition(message),
            SnapshotError::Unavailable(_) => Status::unavailable(message),
            SnapshotError::Internal(_) => Status::internal(message),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, SnapshotError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("snapshot task failed: {e}")))?
        .map_err(Status::from)
}

fn labels(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn timestamp((seconds, nanos): (i64, u32)) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds,
        nanos: nanos as i32,
    }
}

fn api_info(info: Info) -> api::Info {
    api::Info {
        name: info.name,
        parent: info.record.parent,
        kind: match info.record.kind {
            Kind::View => api::Kind::View,
            Kind::Active => api::Kind::Active,
            Kind::Committed => api::Kind::Committed,
        } as i32,
        created_at: Some(timestamp(info.record.created)),
        updated_at: Some(timestamp(info.record.updated)),
        labels: info.record.labels.into_iter().collect(),
    }
}

fn api_mounts(mounts: Vec<Mount>) -> Vec<ApiMount> {
    mounts
        .into_iter()
        .map(|m| ApiMount {
            r#type: m.kind,
            source: m.source,
            target: String::new(),
            options: m.options,
        })
        .collect()
}

impl Snapshotter {
    /// Makes sure every remote layer below `parent` is mounted, so that an
    /// overlay never stacks on an empty directory. `in_use`: a container
    /// (or a view) is made of them, not a layer being unpacked.
    async fn ensure_lowers(&self, parent: &str, in_use: bool) -> Result<(), Status> {
        let Some(remote) = &self.remote else {
            return Ok(());
        };
        let mut next = parent.to_owned();
        while !next.is_empty() {
            let Some(record) = self.local.get(&next)? else {
                // Reported by the operation itself.
                return Ok(());
            };
            if let Some(layer) = &record.remote
                && !remote.is_mounted(record.id)
            {
                remote
                    .ensure_mounted(&self.local, record.id, layer)
                    .await
                    .map_err(|e| {
                        Status::from(SnapshotError::Unavailable(format!(
                            "lazy layer {} ({}) is not available: {e}",
                            next, layer.layer_digest
                        )))
                    })?;
            }
            if in_use && record.remote.is_some() {
                remote.in_use(record.id);
            }
            next = record.parent;
        }
        Ok(())
    }

    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<ApiMount>, Status> {
        // A layer being unpacked names its target; a container does not.
        let in_use = !labels.contains_key(LABEL_TARGET);
        self.ensure_lowers(&parent, in_use).await?;
        let local = self.local.clone();
        let mounts = blocking(move || local.create(kind, &key, &parent, labels)).await?;
        Ok(api_mounts(mounts))
    }

    /// The remote-layer handshake: `Ok(true)` when the layer snapshot
    /// `target` exists (now) and containerd should skip it.
    async fn try_remote(
        &self,
        target: &str,
        parent: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<bool, Status> {
        let Some(remote) = &self.remote else {
            return Ok(false);
        };
        if let Some(existing) = self.local.get(target)? {
            if existing.kind == Kind::Committed && existing.parent == parent {
                self.ensure_lowers(target, false).await?;
                return Ok(true);
            }
            return Ok(false);
        }
        // Mounting may fetch index prefixes: parents must be there first.
        self.ensure_lowers(parent, false).await?;
        let whole = self.whole.as_ref();
        match make_layer(remote.as_ref(), whole, &self.local, target, parent, labels).await {
            Outcome::Made => Ok(true),
            Outcome::Containerd => Ok(false),
            Outcome::Refused(message) => Err(Status::invalid_argument(message)),
        }
    }
}

#[tonic::async_trait]
impl Snapshots for Snapshotter {
    async fn prepare(
        &self,
        request: Request<api::PrepareSnapshotRequest>,
    ) -> Result<Response<api::PrepareSnapshotResponse>, Status> {
        let r = request.into_inner();
        let labels = labels(r.labels);
        if let Some(target) = labels.get(LABEL_TARGET)
            && self.try_remote(target, &r.parent, &labels).await?
        {
            return Err(Status::already_exists(format!(
                "target snapshot {target:?}: already exists"
            )));
        }
        let mounts = self.create(Kind::Active, r.key, r.parent, labels).await?;
        Ok(Response::new(api::PrepareSnapshotResponse { mounts }))
    }

    async fn view(
        &self,
        request: Request<api::ViewSnapshotRequest>,
    ) -> Result<Response<api::ViewSnapshotResponse>, Status> {
        let r = request.into_inner();
        let mounts = self
            .create(Kind::View, r.key, r.parent, labels(r.labels))
            .await?;
        Ok(Response::new(api::ViewSnapshotResponse { mounts }))
    }

    async fn mounts(
        &self,
        request: Request<api::MountsRequest>,
    ) -> Result<Response<api::MountsResponse>, Status> {
        let key = request.into_inner().key;
        if let Some(record) = self.local.get(&key)? {
            let in_use = !record.labels.contains_key(LABEL_TARGET);
            self.ensure_lowers(&record.parent, in_use).await?;
        }
        let local = self.local.clone();
        let mounts = blocking(move || local.mounts(&key)).await?;
        Ok(Response::new(api::MountsResponse {
            mounts: api_mounts(mounts),
        }))
    }

    async fn commit(
        &self,
        request: Request<api::CommitSnapshotRequest>,
    ) -> Result<Response<Empty>, Status> {
        let r = request.into_inner();
        let local = self.local.clone();
        blocking(move || local.commit(&r.name, &r.key, labels(r.labels))).await?;
        Ok(Response::new(()))
    }

    async fn remove(
        &self,
        request: Request<api::RemoveSnapshotRequest>,
    ) -> Result<Response<Empty>, Status> {
        let key = request.into_inner().key;
        let local = self.local.clone();
        let remote = self.remote.clone();
        blocking(move || {
            let record = local.remove(&key)?;
            if record.remote.is_some()
                && let Some(remote) = &remote
            {
                remote.release(record.id, true);
            }
            local.remove_dir(record.id);
            tracing::debug!(snapshot = key, id = record.id, "removed");
            Ok(())
        })
        .await?;
        Ok(Response::new(()))
    }

    async fn stat(
        &self,
        request: Request<api::StatSnapshotRequest>,
    ) -> Result<Response<api::StatSnapshotResponse>, Status> {
        let (local, key) = (self.local.clone(), request.into_inner().key);
        let info = blocking(move || local.stat(&key)).await?;
        Ok(Response::new(api::StatSnapshotResponse {
            info: Some(api_info(info)),
        }))
    }

    async fn update(
        &self,
        request: Request<api::UpdateSnapshotRequest>,
    ) -> Result<Response<api::UpdateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let info = r
            .info
            .ok_or_else(|| Status::invalid_argument("update without snapshot info"))?;
        let paths = r.update_mask.map(|m| m.paths).unwrap_or_default();
        let local = self.local.clone();
        let info = blocking(move || local.update(&info.name, labels(info.labels), &paths)).await?;
        Ok(Response::new(api::UpdateSnapshotResponse {
            info: Some(api_info(info)),
        }))
    }

    type ListStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<api::ListSnapshotsResponse, Status>>>;

    async fn list(
        &self,
        request: Request<api::ListSnapshotsRequest>,
    ) -> Result<Response<Self::ListStream>, Status> {
        let filters =
            Filters::parse(&request.into_inner().filters).map_err(Status::invalid_argument)?;
        let local = self.local.clone();
        let infos = blocking(move || local.walk(&filters)).await?;
        let batches: Vec<Result<api::ListSnapshotsResponse, Status>> = infos
            .chunks(100)
            .map(|chunk| {
                Ok(api::ListSnapshotsResponse {
                    info: chunk.iter().cloned().map(api_info).collect(),
                })
            })
            .collect();
        Ok(Response::new(tokio_stream::iter(batches)))
    }

    async fn usage(
        &self,
        request: Request<api::UsageRequest>,
    ) -> Result<Response<api::UsageResponse>, Status> {
        let key = request.into_inner().key;
        let local = self.local.clone();
        let (size, inodes) = blocking(move || local.usage(&key)).await?;
        Ok(Response::new(api::UsageResponse { size, inodes }))
    }

    async fn cleanup(
        &self,
        _request: Request<api::CleanupRequest>,
    ) -> Result<Response<Empty>, Status> {
        let local = self.local.clone();
        blocking(move || {
            for dir in local.orphan_dirs()? {
                let fs = dir.join("fs");
                if pronto_fs::mounts::is_mounted(&fs)
                    && let Err(e) = pronto_fs::mounts::detach_and_abort(&fs)
                {
                    tracing::warn!("cannot unmount {}: {e}", fs.display());
                    continue;
                }
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    tracing::warn!("cannot remove {}: {e}", dir.display());
                }
            }
            Ok(())
        })
        .await?;
        Ok(Response::new(()))
    }
}
