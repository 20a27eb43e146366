//! Pronto in front of containerd's CRI image service, for kubelet's pull
//! credentials.
//!
//! kubelet sends the credentials of a pod's `imagePullSecrets` (or of its
//! credential provider) with each `PullImage` and nowhere else. containerd
//! uses them to fetch the manifest, but a lazy snapshotter fetches layer
//! data later, on its own, and never sees them. With kubelet's
//! `--image-service-endpoint` pointed at Pronto's `cri_address`, every
//! image-service call reaches containerd unchanged (forwarded as bytes, so
//! any field kubelet sends survives), and `PullImage`'s credentials are
//! remembered in memory, per registry and repository, until they expire.
//! [`KubeletCredentials`] hands them to the registry client.
//!
//! The credentials are never logged, never in an error, metric or status,
//! and never written to disk.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::{Buf, BufMut, Bytes};
use pronto_registry::{CredentialSource, Credentials};
use prost::Message as _;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::{NamedService, UnaryService};
use tonic::{Status, transport::Channel};

/// CRI's `runtime.v1` messages, only the fields Pronto reads (the rest is
/// forwarded untouched). Field numbers are those of Kubernetes'
/// `api.proto`.
mod messages {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ImageSpec {
        #[prost(string, tag = "1")]
        pub image: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AuthConfig {
        #[prost(string, tag = "1")]
        pub username: String,
        #[prost(string, tag = "2")]
        pub password: String,
        /// base64 of `username:password`.
        #[prost(string, tag = "3")]
        pub auth: String,
        #[prost(string, tag = "4")]
        pub server_address: String,
        #[prost(string, tag = "5")]
        pub identity_token: String,
        #[prost(string, tag = "6")]
        pub registry_token: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PullImageRequest {
        #[prost(message, optional, tag = "1")]
        pub image: Option<ImageSpec>,
        #[prost(message, optional, tag = "2")]
        pub auth: Option<AuthConfig>,
    }
}

/// Credentials kubelet pulled with, by (registry, repository), each until
/// its expiry. A later pull of the same repository replaces them and
/// starts the expiry again.
#[derive(Clone)]
pub struct KubeletCredentials {
    entries: Arc<Mutex<HashMap<(String, String), Remembered>>>,
    ttl: Duration,
}

#[derive(Clone)]
struct Remembered {
    credentials: Credentials,
    expires: Instant,
}

impl std::fmt::Debug for KubeletCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletCredentials")
            .field("repositories", &self.len())
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl KubeletCredentials {
    pub fn new(ttl: Duration) -> Self {
        Self {
            entries: Arc::default(),
            ttl,
        }
    }

    /// Repositories with credentials that have not expired.
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.lock().values().filter(|r| r.expires > now).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Remembered>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remembers `credentials` for `key`; returns what was there before.
    fn remember(&self, key: (String, String), credentials: Credentials) -> Option<Remembered> {
        let now = Instant::now();
        let mut entries = self.lock();
        entries.retain(|_, r| r.expires > now);
        entries.insert(
            key,
            Remembered {
                credentials,
                expires: now + self.ttl,
            },
        )
    }

    /// Puts `previous` back for `key` (a pull with new credentials failed).
    fn restore(&self, key: (String, String), previous: Option<Remembered>) {
        let mut entries = self.lock();
        match previous {
            Some(previous) => entries.insert(key, previous),
            None => entries.remove(&key),
        };
    }
}

impl CredentialSource for KubeletCredentials {
    /// Only per repository: a pull secret of one repository says nothing
    /// about another on the same registry.
    fn credentials(&self, _host: &str) -> Option<Credentials> {
        None
    }

    fn credentials_for(&self, host: &str, repository: &str) -> Option<Credentials> {
        let entries = self.lock();
        let remembered = entries.get(&(host.to_owned(), repository.to_owned()))?;
        (remembered.expires > Instant::now()).then(|| remembered.credentials.clone())
    }
}

/// The credentials in a CRI `AuthConfig`: a user name and password,
/// either given apart or as base64 `auth`. Identity and registry tokens
/// are not used (kubelet's pull secrets carry passwords; see
/// docs/kubernetes.md).
fn credentials_of(auth: &messages::AuthConfig) -> Option<Credentials> {
    if !auth.username.is_empty() || !auth.password.is_empty() {
        return Some(Credentials {
            username: auth.username.clone(),
            password: auth.password.clone(),
        });
    }
    if auth.auth.is_empty() {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.auth.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (username, password) = text.split_once(':')?;
    Some(Credentials {
        username: username.to_owned(),
        password: password.to_owned(),
    })
}

/// Told the image of every `PullImage` kubelet sends, before containerd
/// gets it: the snapshotter looks up what the image's layers need while
/// containerd resolves it.
pub type PullAnnounce = Arc<dyn Fn(&str) + Send + Sync>;

/// containerd's CRI image service, served again on Pronto's socket.
#[derive(Clone)]
pub struct ImageServiceProxy {
    containerd: Channel,
    credentials: KubeletCredentials,
    announce: Option<PullAnnounce>,
}

impl std::fmt::Debug for ImageServiceProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageServiceProxy").finish_non_exhaustive()
    }
}

impl ImageServiceProxy {
    /// Forwards to containerd over `containerd` (a channel to its socket,
    /// connected lazily so that Pronto starts before containerd does).
    pub fn new(
        containerd: Channel,
        credentials: KubeletCredentials,
        announce: Option<PullAnnounce>,
    ) -> Self {
        Self {
            containerd,
            credentials,
            announce,
        }
    }

    /// The proxy as a service of a tonic server, for `runtime.v1` (every
    /// kubelet since 1.26) and `runtime.v1alpha2` (older ones).
    pub fn services(self) -> (ImageServiceV1, ImageServiceV1alpha2) {
        (ImageServiceV1(self.clone()), ImageServiceV1alpha2(self))
    }

    async fn forward(
        self,
        path: String,
        request: tonic::Request<Bytes>,
    ) -> Result<tonic::Response<Bytes>, Status> {
        let remembered = if path.ends_with("/PullImage") {
            let remembered = self.remember_pull(request.get_ref());
            // After the credentials: the look-ups use them.
            if let Some(announce) = &self.announce
                && let Ok(pull) = messages::PullImageRequest::decode(request.get_ref().clone())
                && let Some(image) = pull.image
            {
                announce(&image.image);
            }
            remembered
        } else {
            None
        };
        let path = PathAndQuery::try_from(path.as_str())
            .map_err(|_| Status::unimplemented(format!("no such method {path}")))?;
        let mut client = tonic::client::Grpc::new(self.containerd.clone());
        client
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("containerd cannot be reached: {e}")))?;
        let answer = client.unary(request, path, RawCodec).await;
        if answer.is_err()
            && let Some((key, previous)) = remembered
        {
            // Credentials that did not pull are not kept.
            self.credentials.restore(key, previous);
        }
        answer
    }

    /// Remembers the credentials of a `PullImage` request, if it has any;
    /// returns the key and what it replaced.
    #[allow(clippy::type_complexity)]
    fn remember_pull(&self, body: &Bytes) -> Option<((String, String), Option<Remembered>)> {
        let request = messages::PullImageRequest::decode(body.clone()).ok()?;
        let image = request.image?.image;
        let credentials = credentials_of(request.auth.as_ref()?)?;
        let reference = pronto_registry::parse_reference(&image).ok()?;
        let key = (
            reference.registry().to_owned(),
            reference.repository().to_owned(),
        );
        tracing::debug!(
            registry = %key.0,
            repository = %key.1,
            "kubelet's pull credentials remembered for lazy fetches"
        );
        let previous = self.credentials.remember(key.clone(), credentials);
        Some((key, previous))
    }

    fn call_path<B>(
        &self,
        request: http::Request<B>,
    ) -> BoxFuture<http::Response<tonic::body::Body>, std::convert::Infallible>
    where
        B: tonic::codegen::Body + Send + 'static,
        B::Error: Into<tonic::codegen::StdError> + Send + 'static,
    {
        let proxy = self.clone();
        let path = request.uri().path().to_owned();
        Box::pin(async move {
            let method = Forward { proxy, path };
            let mut grpc = tonic::server::Grpc::new(RawCodec);
            Ok(grpc.unary(method, request).await)
        })
    }
}

/// Serves CRI's image service on `listener` until `shutdown`, forwarding
/// to containerd at `containerd` (connected on first use, so either may
/// start first, and again after containerd restarts).
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    containerd: &std::path::Path,
    credentials: KubeletCredentials,
    announce: Option<PullAnnounce>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let containerd = containerd.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://containerd")
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let containerd = containerd.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(containerd).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }));
    let (v1, v1alpha2) = ImageServiceProxy::new(channel, credentials, announce).services();
    listener.set_nonblocking(true)?;
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(
        tokio::net::UnixListener::from_std(listener)?,
    );
    tonic::transport::Server::builder()
        .add_service(v1)
        .add_service(v1alpha2)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(std::io::Error::other)
}

/// One call, forwarded.
struct Forward {
    proxy: ImageServiceProxy,
    path: String,
}

impl UnaryService<Bytes> for Forward {
    type Response = Bytes;
    type Future = BoxFuture<tonic::Response<Bytes>, Status>;

    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        Box::pin(self.proxy.clone().forward(self.path.clone(), request))
    }
}

macro_rules! image_service {
    ($name:ident, $service:literal) => {
        #[doc = concat!("`", $service, "`, forwarded to containerd.")]
        #[derive(Debug, Clone)]
        pub struct $name(ImageServiceProxy);

        impl NamedService for $name {
            const NAME: &'static str = $service;
        }

        impl<B> Service<http::Request<B>> for $name
        where
            B: tonic::codegen::Body + Send + 'static,
            B::Error: Into<tonic::codegen::StdError> + Send + 'static,
        {
            type Response = http::Response<tonic::body::Body>;
            type Error = std::convert::Infallible;
            type Future = BoxFuture<Self::Response, Self::Error>;

            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }

            fn call(&mut self, request: http::Request<B>) -> Self::Future {
                self.0.call_path(request)
            }
        }
    };
}

image_service!(ImageServiceV1, "runtime.v1.ImageService");
image_service!(ImageServiceV1alpha2, "runtime.v1alpha2.ImageService");

/// Messages as bytes, both ways.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pull(image: &str, auth: Option<messages::AuthConfig>) -> Bytes {
        messages::PullImageRequest {
            image: Some(messages::ImageSpec {
                image: image.into(),
            }),
            auth,
        }
        .encode_to_vec()
        .into()
    }

    fn proxy(ttl: Duration) -> ImageServiceProxy {
        let channel = tonic::transport::Endpoint::from_static("http://[::1]:1").connect_lazy();
        ImageServiceProxy::new(channel, KubeletCredentials::new(ttl), None)
    }

    #[tokio::test]
    async fn pull_credentials_are_kept_per_repository_until_they_expire() {
        let proxy = proxy(Duration::from_millis(300));
        let auth = messages::AuthConfig {
            username: "robot".into(),
            password: "s3cret".into(),
            ..Default::default()
        };
        proxy.remember_pull(&pull("registry.example:5000/team/model:v1", Some(auth)));
        let creds = &proxy.credentials;
        let found = creds
            .credentials_for("registry.example:5000", "team/model")
            .unwrap();
        assert_eq!(
            (found.username.as_str(), found.password.as_str()),
            ("robot", "s3cret")
        );
        assert!(
            creds
                .credentials_for("registry.example:5000", "team/other")
                .is_none()
        );
        assert!(creds.credentials("registry.example:5000").is_none());
        // Debug output never holds them.
        assert!(!format!("{creds:?}").contains("s3cret"));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            creds
                .credentials_for("registry.example:5000", "team/model")
                .is_none()
        );
        assert!(creds.is_empty());
    }

    #[tokio::test]
    async fn base64_auth_and_short_names_are_understood() {
        let proxy = proxy(Duration::from_secs(60));
        let auth = messages::AuthConfig {
            auth: base64::engine::general_purpose::STANDARD.encode("user:pa:ss"),
            ..Default::default()
        };
        proxy.remember_pull(&pull("busybox", Some(auth)));
        let found = proxy
            .credentials
            .credentials_for("docker.io", "library/busybox")
            .unwrap();
        assert_eq!(
            (found.username.as_str(), found.password.as_str()),
            ("user", "pa:ss")
        );
        // A pull without credentials remembers nothing.
        assert!(
            proxy
                .remember_pull(&pull("registry.example/a/b:1", None))
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_failed_pull_puts_the_earlier_credentials_back() {
        let proxy = proxy(Duration::from_secs(60));
        let with = |password: &str| {
            Some(messages::AuthConfig {
                username: "u".into(),
                password: password.into(),
                ..Default::default()
            })
        };
        proxy.remember_pull(&pull("r.example/a/b:1", with("good")));
        // containerd cannot be reached here, so the forward fails.
        let request = tonic::Request::new(pull("r.example/a/b:1", with("bad")));
        let answer = proxy
            .clone()
            .forward("/runtime.v1.ImageService/PullImage".into(), request)
            .await;
        assert!(answer.is_err());
        let found = proxy
            .credentials
            .credentials_for("r.example", "a/b")
            .unwrap();
        assert_eq!(found.password, "good");
    }

    #[tokio::test]
    async fn a_pull_is_announced_after_its_credentials_are_kept_and_other_calls_are_not() {
        let announced = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
        let credentials = KubeletCredentials::new(Duration::from_secs(60));
        let (seen, kept) = (announced.clone(), credentials.clone());
        let announce: PullAnnounce = Arc::new(move |image: &str| {
            // The look-ahead reads with the pull's credentials.
            let has = kept.credentials_for("r.example", "a/b").is_some();
            seen.lock().unwrap().push((image.to_owned(), has));
        });
        let channel = tonic::transport::Endpoint::from_static("http://[::1]:1").connect_lazy();
        let proxy = ImageServiceProxy::new(channel, credentials, Some(announce));
        let auth = messages::AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        for path in [
            "/runtime.v1.ImageService/ImageStatus",
            "/runtime.v1.ImageService/PullImage",
        ] {
            let request = tonic::Request::new(pull("r.example/a/b:1", Some(auth.clone())));
            let _ = proxy.clone().forward(path.into(), request).await;
        }
        assert_eq!(
            *announced.lock().unwrap(),
            [("r.example/a/b:1".to_owned(), true)]
        );
    }
}
