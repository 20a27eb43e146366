//! One connection to containerd, scoped to a namespace and, while a pull
//! runs, to a lease that keeps what it writes from garbage collection.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::{CreateRequest, DeleteRequest, leases_client::LeasesClient};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Request, Status};

use crate::PullError;

/// How long a lease outlives a process that died before deleting it.
const LEASE_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// A containerd connection in one namespace.
#[derive(Debug)]
pub(crate) struct Session {
    pub channel: Channel,
    namespace: String,
    lease: Option<String>,
}

/// containerd's rule for namespace names (`namespaces.Validate`): what it
/// accepts is also a valid gRPC metadata value.
pub fn validate_namespace(name: &str) -> Result<(), PullError> {
    let valid = name.len() <= 76
        && name
            .split(['.', '_', '-'])
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric()));
    if valid {
        Ok(())
    } else {
        Err(PullError::Namespace(name.to_owned()))
    }
}

/// The error for a failed containerd call: what was asked, and its status.
pub(crate) fn containerd(what: impl Into<String>) -> impl FnOnce(Status) -> PullError {
    let what = what.into();
    move |status| PullError::Containerd {
        what,
        status: format!("{:?}: {}", status.code(), status.message()),
    }
}

impl Session {
    /// Connects to containerd at `address` for `namespace`.
    pub async fn connect(address: &Path, namespace: &str) -> Result<Self, PullError> {
        validate_namespace(namespace)?;
        let channel =
            containerd_client::connect(address)
                .await
                .map_err(|e| PullError::Connect {
                    address: address.to_owned(),
                    message: e.to_string(),
                })?;
        Ok(Self {
            channel,
            namespace: namespace.to_owned(),
            lease: None,
        })
    }

    /// A request carrying the namespace and the lease.
    pub fn request<T>(&self, message: T) -> Request<T> {
        let mut request = Request::new(message);
        let md = request.metadata_mut();
        md.insert(
            "containerd-namespace",
            self.namespace
                .parse()
                .expect("validated namespaces are metadata values"),
        );
        if let Some(lease) = &self.lease {
            md.insert(
                "containerd-lease",
                lease.parse().expect("lease ids are ASCII"),
            );
        }
        request
    }

    /// Starts a lease that expires by itself if this process dies; later
    /// requests carry it.
    pub async fn start_lease(&mut self) -> Result<(), PullError> {
        let id = format!("pronto-pull-{}", crate::unique());
        let expire = time::OffsetDateTime::from(SystemTime::now() + LEASE_EXPIRY)
            .format(&time::format_description::well_known::Rfc3339)
            .expect("RFC 3339 formatting of a valid time");
        let labels = HashMap::from([("containerd.io/gc.expire".to_owned(), expire)]);
        LeasesClient::new(self.channel.clone())
            .create(self.request(CreateRequest {
                id: id.clone(),
                labels,
            }))
            .await
            .map_err(containerd("create lease"))?;
        self.lease = Some(id);
        Ok(())
    }

    /// Ends the lease (what it protected is held by image records now).
    pub async fn end_lease(&mut self) {
        let Some(id) = self.lease.take() else {
            return;
        };
        let deleted = LeasesClient::new(self.channel.clone())
            .delete(self.request(DeleteRequest { id, sync: false }))
            .await;
        if let Err(e) = deleted {
            tracing::warn!("cannot delete lease: {}", e.message());
        }
    }
}
