//! The request engine: one `reqwest` connection pool, a concurrency limit
//! per registry, authentication on demand, timeouts and retries with
//! jittered backoff. Operations (pull, push, referrers) are built on
//! [`RegistryClient::fetch`] and [`RegistryClient::open`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pronto_metrics::{ErrorKind, metrics};
use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::{
    Challenge, CredentialSource, Credentials, StaticCredentials, Token, TokenResponse,
};
use crate::documents::Documents;
use crate::error::{RegistryError, Target};
use crate::hosts::{Endpoint, Hosts};
use crate::{Repository, Result};

/// Requests of this process sent and not yet answered (response headers).
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// A request waiting for its answer, counted in the registry metrics: one
/// sent while no other request of the process waits is a round trip of its
/// own (`pronto_registry_round_trips_total`); one sent while others wait
/// shares their time.
struct Waiting;

impl Waiting {
    /// Counts a request to `url` (with `range`, if any) as sent; logged at
    /// debug level with whether it waits alone.
    fn begin(method: &Method, url: &str, range: Option<&str>) -> Self {
        let alone = WAITING.fetch_add(1, Ordering::SeqCst) == 0;
        metrics().registry_request(alone);
        tracing::debug!(%method, url, range, alone, "registry request");
        Waiting
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// When and how often failed requests are tried again.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Total attempts, the first included.
    pub attempts: u32,
    /// Backoff before the second attempt; doubles each time, with jitter.
    pub base_delay: Duration,
    /// Longest wait between attempts, `Retry-After` included.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// Full-jitter exponential backoff before attempt `attempt + 1`.
    fn backoff(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(1 << attempt.min(16))
            .min(self.max_delay);
        let millis = ceiling.as_millis().max(1) as u64;
        Duration::from_millis(rand::rng().random_range(millis / 2..=millis))
    }
}

#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub hosts: Hosts,
    pub credentials: Arc<dyn CredentialSource>,
    /// Requests in flight to one registry at a time. reqwest has no
    /// per-host connection cap, so this bounds connections as well.
    pub max_concurrent_per_registry: usize,
    pub connect_timeout: Duration,
    /// From sending a request to its response headers.
    pub first_byte_timeout: Duration,
    /// Longest pause between two chunks of a response body.
    pub stall_timeout: Duration,
    pub retry: RetryPolicy,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            hosts: Hosts::new(),
            credentials: Arc::new(StaticCredentials::none()),
            max_concurrent_per_registry: 32,
            connect_timeout: Duration::from_secs(10),
            first_byte_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(30),
            retry: RetryPolicy::default(),
        }
    }
}

/// A registry client; cheap to clone, share one per process.
#[derive(Debug, Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ClientConfig,
    http: reqwest::Client,
    /// For hosts with `skip_verify`.
    http_insecure: reqwest::Client,
    /// Bearer tokens by (registry, scope).
    tokens: Mutex<HashMap<(String, String), Token>>,
    /// Registries that asked for basic auth.
    /// Credentials of registries that asked for basic auth, read when
    /// they asked (a credential helper runs once per challenge, not per
    /// request; a rejected login reads them again).
    basic: Mutex<HashMap<String, Credentials>>,
    limits: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// Manifests and small blobs fetched by digest.
    documents: Documents,
}

/// Where a request goes: an API path below `/v2/<name>/`, sent to each
/// endpoint of the registry in turn, or an absolute URL the registry gave
/// (an upload `Location`).
#[derive(Debug, Clone)]
pub(crate) enum RequestUrl {
    Api(String),
    Absolute(String),
}

impl RequestUrl {
    /// The URL with `key=value` added to its query.
    pub fn with_query(&self, key: &str, value: &str) -> Self {
        let add = |url: &str| {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}{key}={value}")
        };
        match self {
            RequestUrl::Api(path) => RequestUrl::Api(add(path)),
            RequestUrl::Absolute(url) => RequestUrl::Absolute(add(url)),
        }
    }
}

/// One request, rebuilt for every attempt.
#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub method: Method,
    pub url: RequestUrl,
    pub headers: Vec<(&'static str, String)>,
    pub body: Option<Bytes>,
    /// `pull` or `pull,push`: the token scope's actions.
    pub actions: &'static str,
}

impl Request {
    pub fn get(url: RequestUrl) -> Self {
        Self {
            method: Method::GET,
            url,
            headers: Vec::new(),
            body: None,
            actions: "pull",
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

/// A fully read response.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A response whose body is still to be read, holding its registry slot.
#[derive(Debug)]
pub(crate) struct Opened {
    pub response: Response,
    pub _permit: OwnedSemaphorePermit,
}

impl RegistryClient {
    pub fn new(config: ClientConfig) -> Result<Self, reqwest::Error> {
        let build = |insecure: bool| {
            reqwest::Client::builder()
                .user_agent(concat!("pronto/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(config.connect_timeout)
                .pool_idle_timeout(Duration::from_secs(90))
                .tcp_nodelay(true)
                .danger_accept_invalid_certs(insecure)
                .build()
        };
        Ok(Self {
            inner: Arc::new(Inner {
                http: build(false)?,
                http_insecure: build(true)?,
                config,
                tokens: Mutex::new(HashMap::new()),
                basic: Mutex::new(HashMap::new()),
                limits: Mutex::new(HashMap::new()),
                documents: Documents::default(),
            }),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// Manifests and small blobs already fetched by digest.
    pub(crate) fn documents(&self) -> &Documents {
        &self.inner.documents
    }

    /// The API path `<path>` below `/v2/<name>/`, sent to whichever
    /// endpoint of the repository's registry serves the request.
    pub(crate) fn url(&self, _repo: &Repository, path: &str) -> RequestUrl {
        RequestUrl::Api(path.to_owned())
    }

    /// Resolves a `Location` header against the registry's upstream URL.
    pub(crate) fn absolute(&self, repo: &Repository, location: &str) -> RequestUrl {
        if location.starts_with("http://") || location.starts_with("https://") {
            RequestUrl::Absolute(location.to_owned())
        } else {
            let base = self.inner.config.hosts.upstream(&repo.registry).base_url;
            RequestUrl::Absolute(format!("{base}{location}"))
        }
    }

    /// Where `request` may be sent, in order: mirrors first for pulls.
    fn endpoints(&self, repo: &Repository, request: &Request) -> Vec<Endpoint> {
        let hosts = &self.inner.config.hosts;
        match request.url {
            RequestUrl::Api(_) => hosts.endpoints(&repo.registry, request.actions != "pull"),
            RequestUrl::Absolute(_) => vec![hosts.upstream(&repo.registry)],
        }
    }

    /// Sends `request` and reads the whole body (at most `max_len` bytes),
    /// retrying network failures, stalls, truncated bodies, 429 and 5xx.
    /// Other statuses are returned for the caller to judge.
    pub(crate) async fn fetch(
        &self,
        repo: &Repository,
        target: &Target,
        request: &Request,
        max_len: u64,
    ) -> Result<Fetched> {
        let read = |opened: Opened, attempt: u32| self.read_body(target, opened, max_len, attempt);
        self.fetch_with(repo, target, request, read).await
    }

    /// Sends `request` (with retries and mirrors, as [`Self::fetch`]) and
    /// reads its body with `read`.
    async fn fetch_with<F, Fut>(
        &self,
        repo: &Repository,
        target: &Target,
        request: &Request,
        read: F,
    ) -> Result<Fetched>
    where
        F: Fn(Opened, u32) -> Fut,
        Fut: std::future::Future<Output = Result<Bytes>>,
    {
        let once = |endpoint: Endpoint, attempt: u32| {
            let read = &read;
            async move {
                let opened = self
                    .open_once(&endpoint, repo, target, request, attempt)
                    .await?;
                let status = opened.response.status();
                let headers = opened.response.headers().clone();
                let body = read(opened, attempt).await?;
                Ok(Fetched {
                    status,
                    headers,
                    body,
                })
            }
        };
        self.each_endpoint(repo, target, request, |f: &Fetched| f.status, once)
            .await
    }

    /// Sends `request` and returns the response with its body unread, for
    /// streaming large blobs. Retries like [`Self::fetch`] up to the headers.
    pub(crate) async fn open(
        &self,
        repo: &Repository,
        target: &Target,
        request: &Request,
    ) -> Result<Opened> {
        let once = |endpoint: Endpoint, attempt: u32| async move {
            self.open_once(&endpoint, repo, target, request, attempt)
                .await
        };
        let status = |opened: &Opened| opened.response.status();
        self.each_endpoint(repo, target, request, status, once)
            .await
    }

    /// Sends the range request `request` for `range` of a blob and reads
    /// its answer: a `206` whole (at most `max_len` bytes), an error status
    /// up to 1 MiB, and a `200` (a registry or CDN that ignores ranges) as
    /// a stream from which only the bytes of `range` are kept: the rest of
    /// the blob is read past, never held, and the connection is dropped
    /// once the range is complete.
    pub(crate) async fn fetch_range(
        &self,
        repo: &Repository,
        target: &Target,
        request: &Request,
        range: std::ops::Range<u64>,
        max_len: u64,
    ) -> Result<Fetched> {
        let read = |opened: Opened, attempt: u32| {
            let range = range.clone();
            async move {
                match opened.response.status() {
                    StatusCode::OK => self.read_slice(target, opened, range, attempt).await,
                    StatusCode::PARTIAL_CONTENT => {
                        self.read_body(target, opened, max_len, attempt).await
                    }
                    _ => self.read_body(target, opened, 1 << 20, attempt).await,
                }
            }
        };
        self.fetch_with(repo, target, request, read).await
    }

    /// Reads a whole-blob body as it streams by and keeps only `range`.
    async fn read_slice(
        &self,
        target: &Target,
        mut opened: Opened,
        range: std::ops::Range<u64>,
        attempt: u32,
    ) -> Result<Bytes> {
        let mut kept = BytesMut::with_capacity((range.end - range.start) as usize);
        let mut position = 0u64;
        while position < range.end {
            let Some(chunk) = self
                .next_chunk(target, &mut opened.response, attempt)
                .await?
            else {
                break;
            };
            let end = position + chunk.len() as u64;
            if end > range.start {
                let from = range.start.saturating_sub(position) as usize;
                let to = (range.end.min(end) - position) as usize;
                kept.extend_from_slice(&chunk[from..to]);
            }
            position = end;
        }
        Ok(kept.freeze())
    }

    /// Runs `once` against each endpoint of `request` in turn (mirrors
    /// first), with retries on each: the next endpoint is tried when a
    /// mirror does not have the content or fails.
    async fn each_endpoint<T, F, Fut>(
        &self,
        repo: &Repository,
        target: &Target,
        request: &Request,
        status: impl Fn(&T) -> StatusCode,
        once: F,
    ) -> Result<T>
    where
        F: Fn(Endpoint, u32) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let endpoints = self.endpoints(repo, request);
        let last = endpoints.len() - 1;
        for (i, endpoint) in endpoints.into_iter().enumerate() {
            let base_url = endpoint.base_url.clone();
            match self
                .with_retries(target, |attempt| once(endpoint.clone(), attempt))
                .await
            {
                Ok(found) if status(&found) == StatusCode::NOT_FOUND && i < last => {
                    tracing::debug!(%target, mirror = base_url, "not on the mirror; trying the next host");
                }
                Err(err) if i < last && is_endpoint_failure(&err) => {
                    tracing::warn!(%target, mirror = base_url, "mirror failed; trying the next host: {err}");
                }
                other => return other,
            }
        }
        unreachable!("the upstream endpoint is always last and always returns")
    }

    /// Runs `once` until it succeeds, fails for good, or the retry policy
    /// runs out; waits between attempts as the policy (and `Retry-After`)
    /// says.
    async fn with_retries<T, Fut>(
        &self,
        target: &Target,
        mut once: impl FnMut(u32) -> Fut,
    ) -> Result<T>
    where
        Fut: std::future::Future<Output = Result<T>>,
    {
        let policy = &self.inner.config.retry;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match once(attempt).await {
                Ok(done) => return Ok(done),
                Err(err) if attempt < policy.attempts && is_retryable(&err) => {
                    let delay = retry_delay(&err, policy, attempt);
                    tracing::warn!(%target, attempt, ?delay, "retrying: {err}");
                    tokio::time::sleep(delay).await;
                }
                Err(err) => {
                    metrics().error(ErrorKind::Registry);
                    return Err(err);
                }
            }
        }
    }

    /// One attempt: waits for a registry slot, sends with credentials, and
    /// answers a 401 challenge once by authenticating and resending.
    async fn open_once(
        &self,
        endpoint: &Endpoint,
        repo: &Repository,
        target: &Target,
        request: &Request,
        attempt: u32,
    ) -> Result<Opened> {
        let permit = self.slot(&endpoint.base_url).await;
        let scope = format!("repository:{}:{}", repo.name, request.actions);
        let mut authenticated = false;
        loop {
            let response = self
                .send(endpoint, repo, target, request, &scope, attempt)
                .await?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !authenticated {
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(Challenge::parse);
                self.authenticate(endpoint, target, challenge, &scope)
                    .await?;
                authenticated = true;
                continue;
            }
            if status == StatusCode::UNAUTHORIZED {
                return Err(RegistryError::Auth {
                    target: target.clone(),
                    problem: "the registry rejected the credentials (HTTP 401)".into(),
                });
            }
            if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
                return Err(RegistryError::Busy {
                    target: target.clone(),
                    status: status.as_u16(),
                    retry_after: retry_after(response.headers()),
                });
            }
            return Ok(Opened {
                response,
                _permit: permit,
            });
        }
    }

    async fn send(
        &self,
        endpoint: &Endpoint,
        repo: &Repository,
        target: &Target,
        request: &Request,
        scope: &str,
        attempt: u32,
    ) -> Result<Response> {
        let config = &self.inner.config;
        let http = if endpoint.skip_verify {
            &self.inner.http_insecure
        } else {
            &self.inner.http
        };
        let url = match &request.url {
            RequestUrl::Api(path) => format!("{}/v2/{}/{path}", endpoint.base_url, repo.name),
            RequestUrl::Absolute(url) => url.clone(),
        };
        let mut builder = http.request(request.method.clone(), &url);
        for (name, value) in &request.headers {
            builder = builder.header(*name, value);
        }
        match self.authorization(endpoint, scope) {
            Some(Authorization::Bearer(token)) => builder = builder.bearer_auth(token),
            Some(Authorization::Basic(creds)) => {
                builder = builder.basic_auth(creds.username, Some(creds.password));
            }
            None => {}
        }
        if let Some(body) = &request.body {
            builder = builder.body(body.clone());
        }
        let timeout = config.first_byte_timeout;
        let range = request
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("range"))
            .map(|(_, value)| value.as_str());
        let waiting = Waiting::begin(&request.method, &url, range);
        let answered = tokio::time::timeout(timeout, builder.send()).await;
        drop(waiting);
        match answered {
            Err(_) => Err(RegistryError::Timeout {
                target: target.clone(),
                phase: "response headers",
                after: timeout,
                attempts: attempt,
            }),
            Ok(Err(source)) => Err(RegistryError::Transport {
                target: target.clone(),
                attempts: attempt,
                source: source.without_url(),
            }),
            Ok(Ok(response)) => Ok(response),
        }
    }

    /// Reads a body chunk by chunk, failing on a stall or on more than
    /// `max_len` bytes, and on fewer bytes than `Content-Length` promised.
    async fn read_body(
        &self,
        target: &Target,
        mut opened: Opened,
        max_len: u64,
        attempt: u32,
    ) -> Result<Bytes> {
        let expected = opened.response.content_length();
        if expected.is_some_and(|len| len > max_len) {
            return Err(too_large(target, max_len));
        }
        let mut body = BytesMut::with_capacity(expected.unwrap_or(0) as usize);
        while let Some(chunk) = self
            .next_chunk(target, &mut opened.response, attempt)
            .await?
        {
            if body.len() as u64 + chunk.len() as u64 > max_len {
                return Err(too_large(target, max_len));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body.freeze())
    }

    /// The next body chunk, or `None` at the end; a stall or reset is an
    /// error.
    pub(crate) async fn next_chunk(
        &self,
        target: &Target,
        response: &mut Response,
        attempt: u32,
    ) -> Result<Option<Bytes>> {
        let stall = self.inner.config.stall_timeout;
        match tokio::time::timeout(stall, response.chunk()).await {
            Err(_) => Err(RegistryError::Timeout {
                target: target.clone(),
                phase: "more of the response body",
                after: stall,
                attempts: attempt,
            }),
            Ok(Err(source)) => Err(RegistryError::Transport {
                target: target.clone(),
                attempts: attempt,
                source: source.without_url(),
            }),
            Ok(Ok(chunk)) => {
                if let Some(chunk) = &chunk {
                    metrics().registry_received(chunk.len() as u64);
                }
                Ok(chunk)
            }
        }
    }

    async fn slot(&self, registry: &str) -> OwnedSemaphorePermit {
        let semaphore = {
            let mut limits = self.inner.limits.lock().unwrap_or_else(|e| e.into_inner());
            limits
                .entry(registry.to_owned())
                .or_insert_with(|| {
                    Arc::new(Semaphore::new(
                        self.inner.config.max_concurrent_per_registry.max(1),
                    ))
                })
                .clone()
        };
        semaphore
            .acquire_owned()
            .await
            .expect("registry semaphores are never closed")
    }

    /// What to authorize a request with, if we hold anything.
    fn authorization(&self, endpoint: &Endpoint, scope: &str) -> Option<Authorization> {
        let registry = endpoint.credentials_host.as_str();
        let tokens = self.inner.tokens.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = tokens.get(&(registry.to_owned(), scope.to_owned()))
            && token.expires > Instant::now()
        {
            return Some(Authorization::Bearer(token.value.clone()));
        }
        drop(tokens);
        let basic = self.inner.basic.lock().unwrap_or_else(|e| e.into_inner());
        basic.get(registry).cloned().map(Authorization::Basic)
    }

    /// The configured credentials for `registry`, looked up on a blocking
    /// thread: a credential helper is a process, and docker's config a
    /// file.
    async fn credentials(&self, registry: &str, repository: &str) -> Option<Credentials> {
        let source = self.inner.config.credentials.clone();
        let (registry, repository) = (registry.to_owned(), repository.to_owned());
        tokio::task::spawn_blocking(move || source.credentials_for(&registry, &repository))
            .await
            .ok()
            .flatten()
    }

    /// Answers a challenge: remembers that a registry wants basic auth, or
    /// fetches and caches a bearer token for `scope`.
    async fn authenticate(
        &self,
        endpoint: &Endpoint,
        target: &Target,
        challenge: Option<Challenge>,
        scope: &str,
    ) -> Result<()> {
        let registry = &endpoint.credentials_host;
        let creds = self.credentials(registry, &target.repository).await;
        let auth_error = |problem: String| RegistryError::Auth {
            target: target.clone(),
            problem,
        };
        match challenge {
            None => Err(auth_error(
                "HTTP 401 without a usable WWW-Authenticate challenge".into(),
            )),
            Some(Challenge::Basic) => {
                let Some(creds) = creds else {
                    return Err(auth_error(format!(
                        "the registry requires a login and no credentials are configured for {registry}"
                    )));
                };
                self.inner
                    .basic
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(registry.clone(), creds);
                Ok(())
            }
            Some(Challenge::Bearer { realm, service, .. }) => {
                let mut url = reqwest::Url::parse(&realm)
                    .map_err(|e| auth_error(format!("token realm {realm:?} is not a URL: {e}")))?;
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = &service {
                        query.append_pair("service", service);
                    }
                    query.append_pair("scope", scope);
                }
                let mut request = self.inner.http.get(url);
                if let Some(creds) = &creds {
                    request = request.basic_auth(&creds.username, Some(&creds.password));
                }
                let waiting = Waiting::begin(&Method::GET, &realm, None);
                let response =
                    tokio::time::timeout(self.inner.config.first_byte_timeout, request.send())
                        .await
                        .map_err(|_| auth_error("the token service did not answer in time".into()))?
                        .map_err(|e| {
                            auth_error(format!(
                                "cannot reach the token service: {}",
                                e.without_url()
                            ))
                        })?;
                drop(waiting);
                let status = response.status();
                if !status.is_success() {
                    return Err(auth_error(format!(
                        "the token service answered HTTP {}{}",
                        status.as_u16(),
                        if creds.is_none() {
                            " (no credentials configured)"
                        } else {
                            ""
                        }
                    )));
                }
                let body: TokenResponse = response.json().await.map_err(|e| {
                    auth_error(format!("unreadable token response: {}", e.without_url()))
                })?;
                let token = body
                    .into_token(Instant::now())
                    .ok_or_else(|| auth_error("the token response holds no token".into()))?;
                self.inner
                    .tokens
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert((registry.clone(), scope.to_owned()), token);
                Ok(())
            }
        }
    }
}

enum Authorization {
    Bearer(String),
    Basic(Credentials),
}

fn too_large(target: &Target, max_len: u64) -> RegistryError {
    RegistryError::Invalid {
        target: target.clone(),
        problem: format!("the response is larger than the {max_len}-byte limit"),
    }
}

/// Errors after which the next endpoint (after a mirror) is worth a try.
fn is_endpoint_failure(err: &RegistryError) -> bool {
    is_retryable(err)
        || matches!(
            err,
            RegistryError::Status { .. } | RegistryError::Auth { .. }
        )
}

fn is_retryable(err: &RegistryError) -> bool {
    matches!(
        err,
        RegistryError::Transport { .. }
            | RegistryError::Timeout { .. }
            | RegistryError::Busy { .. }
    )
}

fn retry_delay(err: &RegistryError, policy: &RetryPolicy, attempt: u32) -> Duration {
    match err {
        RegistryError::Busy {
            retry_after: Some(wait),
            ..
        } => (*wait).min(policy.max_delay),
        _ => policy.backoff(attempt - 1),
    }
}

/// `Retry-After` in seconds (the HTTP-date form is rare from registries
/// and falls back to backoff).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let policy = RetryPolicy {
            attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        assert!(policy.backoff(0) <= Duration::from_millis(100));
        assert!(policy.backoff(3) >= Duration::from_millis(400));
        assert!(policy.backoff(9) <= Duration::from_secs(1));
    }

    #[test]
    fn retry_after_is_honoured_within_the_cap() {
        let target = Target::new(&Repository::new("r", "n"), "x");
        let err = RegistryError::Busy {
            target,
            status: 429,
            retry_after: Some(Duration::from_secs(3)),
        };
        let policy = RetryPolicy::default();
        assert_eq!(retry_delay(&err, &policy, 1), Duration::from_secs(3));
    }
}
