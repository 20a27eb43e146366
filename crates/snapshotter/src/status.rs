//! `pronto.v1.Status`: what the daemon has mounted lazily and how much of
//! it is local, served next to containerd's snapshots API on the same
//! socket so `pronto status` needs no other address. The messages are
//! declared here (no `.proto` file); field numbers are the wire contract.

use std::sync::Arc;

use pronto_store::ContentCache;
use tonic::{Request, Response, Status};

use crate::remote::Remote;

pub use tonic::async_trait;

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StatusResponse {
    #[prost(message, repeated, tag = "1")]
    pub images: Vec<ImageStatus>,
    /// Bytes in the node cache.
    #[prost(uint64, tag = "2")]
    pub cache_bytes: u64,
    #[prost(uint64, tag = "3")]
    pub cache_budget: u64,
    /// Layers not served lazily since the daemon started, by reason.
    #[prost(message, repeated, tag = "4")]
    pub fallbacks: Vec<FallbackCount>,
    /// The node's warm set (`[warm]`, and images warmed by hand).
    #[prost(message, repeated, tag = "5")]
    pub warm: Vec<WarmStatus>,
    /// Registry requests the daemon sent since it started.
    #[prost(uint64, tag = "6")]
    pub registry_requests: u64,
    /// Of those, the ones sent while no other was waiting for its answer:
    /// round trips of their own.
    #[prost(uint64, tag = "7")]
    pub registry_round_trips: u64,
}

/// An image of the node's warm set.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WarmStatus {
    /// As configured (a tag or a digest).
    #[prost(string, tag = "1")]
    pub reference: String,
    /// `lazy` or `full`.
    #[prost(string, tag = "2")]
    pub mode: String,
    /// `warm`, `warming`, `failed` or `waiting` (not tried yet).
    #[prost(string, tag = "3")]
    pub state: String,
    /// The manifest digest warm, or being warmed.
    #[prost(string, tag = "4")]
    pub digest: String,
    /// Why the last attempt failed.
    #[prost(string, tag = "5")]
    pub reason: String,
    /// From the registry's push notification to warm, when a push started
    /// it; 0 otherwise.
    #[prost(double, tag = "6")]
    pub lag_seconds: f64,
    /// Bytes the last warming made local (besides metadata).
    #[prost(uint64, tag = "7")]
    pub bytes: u64,
    /// When it last became warm (seconds since the epoch).
    #[prost(uint64, tag = "8")]
    pub warmed_at: u64,
    /// What started the last warming: join, push, poll, refresh, manual.
    #[prost(string, tag = "9")]
    pub source: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WarmRequest {
    #[prost(string, tag = "1")]
    pub reference: String,
    /// `lazy` (default when empty) or `full`.
    #[prost(string, tag = "2")]
    pub mode: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct WarmResponse {
    #[prost(message, optional, tag = "1")]
    pub status: Option<WarmStatus>,
}

/// An image about to be pulled: the daemon looks up what it needs to
/// serve the image's layers (manifest, config, index, the layers' index
/// prefixes, startup profile) while the puller resolves the image, so the
/// `Prepare` calls that follow find it ready.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExpectRequest {
    /// The reference being pulled (a tag or a digest).
    #[prost(string, tag = "1")]
    pub reference: String,
    /// `os/arch[/variant]`; `linux/amd64` when empty.
    #[prost(string, tag = "2")]
    pub platform: String,
}

/// Sent at once: the look-ups go on in the daemon.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExpectResponse {}

/// The daemon's warming, as the status service reports and triggers it.
#[tonic::async_trait]
pub trait Warmer: Send + Sync + 'static {
    /// Every image of the warm set.
    fn states(&self) -> Vec<WarmStatus>;
    /// Warms `reference` now (`mode`: lazy or full) and says how it ended.
    async fn warm_now(&self, reference: String, mode: String) -> Result<WarmStatus, String>;
}

/// An image with lazily mounted layers, named as containerd's CRI named it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ImageStatus {
    #[prost(string, tag = "1")]
    pub reference: String,
    #[prost(message, repeated, tag = "2")]
    pub layers: Vec<LayerStatus>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct LayerStatus {
    #[prost(string, tag = "1")]
    pub digest: String,
    /// Compressed size of the layer blob.
    #[prost(uint64, tag = "2")]
    pub size: u64,
    /// Compressed bytes of the layer the node cache holds.
    #[prost(uint64, tag = "3")]
    pub local_bytes: u64,
    #[prost(uint64, tag = "4")]
    pub fetched_on_demand: u64,
    #[prost(uint64, tag = "5")]
    pub fetched_in_background: u64,
    /// `running`, `complete` (whole layer local and verified), `failed`
    /// (see the log) or `off` (`[fetch] background = false`).
    #[prost(string, tag = "6")]
    pub background: String,
    #[prost(uint64, tag = "7")]
    pub snapshot_id: u64,
    #[prost(string, tag = "8")]
    pub mountpoint: String,
    /// Bytes fetched ahead of programs reading files in order.
    #[prost(uint64, tag = "9")]
    pub fetched_ahead: u64,
    /// When the layer was mounted (seconds since the epoch); the mount
    /// outlives daemon restarts.
    #[prost(uint64, tag = "10")]
    pub served_since: u64,
    /// How many times a restarted daemon took the mount over.
    #[prost(uint32, tag = "11")]
    pub handovers: u32,
    /// Bytes fetched ahead from the image's startup profile.
    #[prost(uint64, tag = "12")]
    pub fetched_by_profile: u64,
    /// Range requests reads had to wait for (what the profile missed).
    #[prost(uint64, tag = "13")]
    pub on_demand_requests: u64,
    /// `prefetched`, `recording`, both, or empty: what the startup
    /// profile does for this mount.
    #[prost(string, tag = "14")]
    pub profile: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FallbackCount {
    #[prost(string, tag = "1")]
    pub reason: String,
    #[prost(uint64, tag = "2")]
    pub count: u64,
}

/// The status service over the daemon's lazy layers and cache.
#[derive(Clone)]
pub struct StatusService {
    pub remote: Arc<Remote>,
    pub cache: Arc<ContentCache>,
    pub warm: Option<Arc<dyn Warmer>>,
}

impl std::fmt::Debug for StatusService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatusService").finish_non_exhaustive()
    }
}

impl StatusService {
    pub fn snapshot(&self) -> StatusResponse {
        let cache = self.cache.stats();
        let (registry_requests, registry_round_trips) =
            pronto_metrics::metrics().registry_requests();
        StatusResponse {
            images: self.remote.status(),
            cache_bytes: cache.bytes,
            cache_budget: cache.budget,
            fallbacks: self
                .remote
                .fallback_counts()
                .into_iter()
                .map(|(reason, count)| FallbackCount {
                    reason: reason.as_str().to_owned(),
                    count,
                })
                .collect(),
            warm: self.warm.as_ref().map(|w| w.states()).unwrap_or_default(),
            registry_requests,
            registry_round_trips,
        }
    }
}

#[tonic::async_trait]
impl crate::generated::status::status_server::Status for StatusService {
    async fn images(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.snapshot()))
    }

    async fn expect(
        &self,
        request: Request<ExpectRequest>,
    ) -> Result<Response<ExpectResponse>, Status> {
        let ExpectRequest {
            reference,
            platform,
        } = request.into_inner();
        let platform = if platform.is_empty() {
            pronto_registry::Platform::default()
        } else {
            platform.parse().map_err(Status::invalid_argument)?
        };
        pronto_registry::parse_reference(&reference)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let remote = self.remote.clone();
        tokio::spawn(async move { remote.expect(&reference, &platform).await });
        Ok(Response::new(ExpectResponse {}))
    }

    async fn warm(&self, request: Request<WarmRequest>) -> Result<Response<WarmResponse>, Status> {
        let Some(warm) = &self.warm else {
            return Err(Status::unavailable("this daemon does not warm images"));
        };
        let WarmRequest { reference, mode } = request.into_inner();
        match warm.warm_now(reference, mode).await {
            Ok(status) => Ok(Response::new(WarmResponse {
                status: Some(status),
            })),
            Err(problem) => Err(Status::invalid_argument(problem)),
        }
    }
}

/// Tells the daemon on unix socket `address` that `reference` is about to
/// be pulled for `platform`. The answer comes at once.
pub async fn expect(
    address: &std::path::Path,
    reference: &str,
    platform: &str,
) -> Result<(), String> {
    let channel = containerd_client::connect(address)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", address.display()))?;
    let mut client = crate::generated::status::status_client::StatusClient::new(channel);
    client
        .expect(ExpectRequest {
            reference: reference.to_owned(),
            platform: platform.to_owned(),
        })
        .await
        .map(|_| ())
        .map_err(|e| e.message().to_owned())
}

/// Asks the daemon on unix socket `address` to warm `reference` now.
pub async fn warm(
    address: &std::path::Path,
    reference: &str,
    mode: &str,
) -> Result<WarmStatus, String> {
    let channel = containerd_client::connect(address)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", address.display()))?;
    let mut client = crate::generated::status::status_client::StatusClient::new(channel);
    client
        .warm(WarmRequest {
            reference: reference.to_owned(),
            mode: mode.to_owned(),
        })
        .await
        .map_err(|e| e.message().to_owned())?
        .into_inner()
        .status
        .ok_or_else(|| "the daemon answered without a status".to_owned())
}

/// Asks the daemon on unix socket `address` for its status.
pub async fn query(address: &std::path::Path) -> Result<StatusResponse, String> {
    if !address.exists() {
        return Err(format!("there is no socket at {}", address.display()));
    }
    let channel = containerd_client::connect(address)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", address.display()))?;
    let mut client = crate::generated::status::status_client::StatusClient::new(channel);
    client
        .images(StatusRequest {})
        .await
        .map(Response::into_inner)
        .map_err(|e| {
            format!(
                "{} does not answer pronto's status call: {}",
                address.display(),
                e.message()
            )
        })
}
