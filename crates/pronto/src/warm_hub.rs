//! `pronto warm-hub`: takes a registry's push notifications (the CNCF
//! distribution `notifications` webhook that `docker-registry` sends) and
//! fans them out to the node daemons that subscribe, so that a new digest
//! under a warmed tag is warm on every node within seconds of the push.
//!
//! - `POST /notifications`: the registry's envelope
//!   (`application/vnd.docker.distribution.events.v1+json`), or a
//!   Harbor webhook, an ECR event through EventBridge, or an Artifact
//!   Registry / GCR Pub/Sub push message (see [`pushes`]). With a token
//!   configured, the request must carry `Authorization: Bearer TOKEN`
//!   (the registry's endpoint `headers`) or `?token=TOKEN` (for senders
//!   that cannot set headers); anything else is refused with 401 and a
//!   log line, and changes nothing. A body that is none of those is
//!   refused with 400. Pushes of tagged images are kept; blob pushes,
//!   pulls and deletes are not.
//! - `GET /events?after=SEQ&hub=ID`: the kept events from `SEQ` on, as
//!   JSON, waiting up to 20 s for one when there is none (a long poll).
//!   The answer names this hub's `hub` ID (new at every start) and the
//!   `next` sequence number. When the subscriber's ID is not this hub's,
//!   or the events it asks for were dropped (the hub keeps the last
//!   10,000), the answer says `resync`: the node then checks every tag of
//!   its warm set itself. So a hub that goes away and comes back loses no
//!   push: the registry retries the notifications it could not deliver,
//!   and nodes check their tags when they reconnect.
//! - `GET /healthz`: 200.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

/// Events kept for subscribers that fall behind.
const KEPT: usize = 10_000;

/// How long `GET /events` waits for an event.
const LONG_POLL: Duration = Duration::from_secs(20);

/// A push of a tagged manifest, as the hub passes it on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushEvent {
    pub seq: u64,
    /// The registry host the pusher used (`request.host`), if it said.
    pub host: String,
    pub repository: String,
    pub tag: String,
    pub digest: String,
    /// When the registry saw the push, seconds since the epoch.
    pub pushed_at: f64,
}

/// What `GET /events` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsPage {
    pub hub: String,
    /// The sequence number to ask from next.
    pub next: u64,
    pub events: Vec<PushEvent>,
    /// Events the subscriber asked for are not here (another hub, or
    /// dropped): check every tag instead.
    pub resync: bool,
}

/// The distribution envelope's events (only what the hub reads).
#[derive(Debug, Deserialize)]
struct Envelope {
    events: Vec<RegistryEvent>,
}

#[derive(Debug, Deserialize)]
struct RegistryEvent {
    action: String,
    #[serde(default)]
    timestamp: String,
    target: Target,
    #[serde(default)]
    request: RequestInfo,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Target {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    digest: String,
    #[serde(default)]
    repository: String,
    #[serde(default)]
    tag: String,
}

#[derive(Debug, Default, Deserialize)]
struct RequestInfo {
    #[serde(default)]
    host: String,
}

/// Media types of manifests a tag can name.
const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// The pushes of tagged images in a notification `body`, or why it is not
/// a notification. Four forms are read:
/// - the CNCF distribution envelope (`docker-registry`, and registries
///   built on distribution): `{"events": [...]}`, pushes of manifests
///   with a tag;
/// - Harbor's webhook (HTTP, default payload): `type` `PUSH_ARTIFACT`;
/// - Amazon ECR through EventBridge (an API destination): `source`
///   `aws.ecr`, `detail-type` `ECR Image Action`, `action-type` `PUSH`;
/// - Google Artifact Registry and GCR through a Pub/Sub push
///   subscription: `message.data`, base64 of `{"action": "INSERT", ...}`.
///
/// Other events of those sources (deletes, pulls, scans) are no pushes.
pub fn pushes(body: &[u8]) -> Result<Vec<PushEvent>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    if value.get("events").is_some() {
        return distribution(value);
    }
    if value["type"].is_string() && value["event_data"].is_object() {
        return Ok(harbor(&value));
    }
    if value["source"] == "aws.ecr" {
        return Ok(ecr(&value));
    }
    if let Some(data) = value["message"]["data"].as_str() {
        return pubsub(data, &value["message"]["publishTime"]);
    }
    Err(
        "not a registry notification: neither a distribution envelope ({\"events\": [...]}), \
         a Harbor webhook, an ECR EventBridge event nor a Pub/Sub push message"
            .into(),
    )
}

fn distribution(value: serde_json::Value) -> Result<Vec<PushEvent>, String> {
    let envelope: Envelope = serde_json::from_value(value)
        .map_err(|e| format!("not a registry notification envelope: {e}"))?;
    Ok(envelope
        .events
        .into_iter()
        .filter(|e| e.action == "push" && MANIFEST_TYPES.contains(&e.target.media_type.as_str()))
        .filter_map(|e| {
            push(
                e.request.host,
                e.target.repository,
                e.target.tag,
                e.target.digest,
                rfc3339(&e.timestamp),
            )
        })
        .collect())
}

/// Harbor: `event_data.resources[]` with `digest`, `tag` and
/// `resource_url` (`HOST/PROJECT/REPO:TAG`).
fn harbor(value: &serde_json::Value) -> Vec<PushEvent> {
    if value["type"] != "PUSH_ARTIFACT" {
        return Vec::new();
    }
    let repository = value["event_data"]["repository"]["repo_full_name"]
        .as_str()
        .unwrap_or_default();
    let at = value["occur_at"].as_f64();
    value["event_data"]["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| {
            let url = r["resource_url"].as_str().unwrap_or_default();
            push(
                url.split('/').next().unwrap_or_default().to_owned(),
                repository.to_owned(),
                r["tag"].as_str().unwrap_or_default().to_owned(),
                r["digest"].as_str().unwrap_or_default().to_owned(),
                at,
            )
        })
        .collect()
}

/// ECR through EventBridge: one push per event.
fn ecr(value: &serde_json::Value) -> Vec<PushEvent> {
    let detail = &value["detail"];
    if value["detail-type"] != "ECR Image Action"
        || detail["action-type"] != "PUSH"
        || detail["result"] != "SUCCESS"
    {
        return Vec::new();
    }
    let host = format!(
        "{}.dkr.ecr.{}.amazonaws.com",
        value["account"].as_str().unwrap_or_default(),
        value["region"].as_str().unwrap_or_default()
    );
    push(
        host,
        detail["repository-name"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        detail["image-tag"].as_str().unwrap_or_default().to_owned(),
        detail["image-digest"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        rfc3339(value["time"].as_str().unwrap_or_default()),
    )
    .into_iter()
    .collect()
}

/// Artifact Registry / GCR through Pub/Sub: `data` is base64 of
/// `{"action": "INSERT", "digest": "HOST/REPO@sha256:...", "tag":
/// "HOST/REPO:TAG"}`.
fn pubsub(data: &str, published: &serde_json::Value) -> Result<Vec<PushEvent>, String> {
    use base64::Engine as _;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("a Pub/Sub message whose data is not base64: {e}"))?;
    let event: serde_json::Value = serde_json::from_slice(&decoded)
        .map_err(|e| format!("a Pub/Sub message whose data is not JSON: {e}"))?;
    if event["action"] != "INSERT" {
        return Ok(Vec::new());
    }
    let (Some((name, digest)), Some(tagged)) = (
        event["digest"].as_str().and_then(|d| d.split_once('@')),
        event["tag"].as_str(),
    ) else {
        return Ok(Vec::new());
    };
    let Some(tag) = tagged.strip_prefix(name).and_then(|t| t.strip_prefix(':')) else {
        return Ok(Vec::new());
    };
    let (host, repository) = name.split_once('/').unwrap_or(("", name));
    Ok(push(
        host.to_owned(),
        repository.to_owned(),
        tag.to_owned(),
        digest.to_owned(),
        rfc3339(published.as_str().unwrap_or_default()),
    )
    .into_iter()
    .collect())
}

/// A push of `repository:tag` at `digest`, if all three are there.
fn push(
    host: String,
    repository: String,
    tag: String,
    digest: String,
    at: Option<f64>,
) -> Option<PushEvent> {
    let valid = !repository.is_empty()
        && !tag.is_empty()
        && digest.len() == 71
        && digest.starts_with("sha256:");
    valid.then(|| PushEvent {
        seq: 0,
        host,
        repository,
        tag,
        digest,
        pushed_at: at.unwrap_or_else(now),
    })
}

/// Seconds since the epoch of an RFC 3339 time.
fn rfc3339(text: &str) -> Option<f64> {
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp_nanos() as f64 / 1e9)
}

/// Seconds since the epoch.
pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The hub's state: its ID and the events kept.
#[derive(Debug)]
pub struct Hub {
    id: String,
    token: Option<String>,
    events: Mutex<(u64, VecDeque<PushEvent>)>,
    arrived: tokio::sync::Notify,
}

impl Hub {
    /// A hub that requires `token` (when set) of notifications.
    pub fn new(token: Option<String>) -> Self {
        Self {
            id: format!("{:x}-{:x}", std::process::id(), now().to_bits()),
            token,
            events: Mutex::new((0, VecDeque::new())),
            arrived: tokio::sync::Notify::new(),
        }
    }

    /// Takes one notification request (its `token` query parameter, if
    /// any, for senders that cannot set headers); returns the status to
    /// answer and what to say.
    pub fn notify(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
        body: &[u8],
        from: &str,
    ) -> (StatusCode, String) {
        if let Some(token) = &self.token {
            let given = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if given != Some(token.as_str()) && query_token != Some(token.as_str()) {
                tracing::warn!(
                    from,
                    "rejected a notification: no valid Authorization: Bearer token (or ?token=); nothing changed"
                );
                return (
                    StatusCode::UNAUTHORIZED,
                    "a bearer token is required\n".into(),
                );
            }
        }
        let pushes = match pushes(body) {
            Ok(pushes) => pushes,
            Err(problem) => {
                tracing::warn!(from, "rejected a notification: {problem}; nothing changed");
                return (StatusCode::BAD_REQUEST, format!("{problem}\n"));
            }
        };
        let kept = pushes.len();
        {
            let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            for mut push in pushes {
                push.seq = events.0;
                events.0 += 1;
                tracing::info!(
                    seq = push.seq,
                    from,
                    "push of {}/{}:{} ({})",
                    push.host,
                    push.repository,
                    push.tag,
                    push.digest
                );
                events.1.push_back(push);
                if events.1.len() > KEPT {
                    events.1.pop_front();
                }
            }
        }
        if kept > 0 {
            self.arrived.notify_waiters();
        }
        (StatusCode::OK, format!("{kept} push(es) taken\n"))
    }

    /// The events from `after` on, for a subscriber that last saw hub
    /// `hub`; waits up to `wait` for one.
    pub async fn events(&self, after: u64, hub: Option<&str>, wait: Duration) -> EventsPage {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let arrived = self.arrived.notified();
            let page = self.page(after, hub);
            if !page.events.is_empty() || page.resync {
                return page;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.page(after, hub);
            }
        }
    }

    fn page(&self, after: u64, hub: Option<&str>) -> EventsPage {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let (next, kept) = &*events;
        let oldest = kept.front().map_or(*next, |e| e.seq);
        let resync = hub.is_some_and(|h| h != self.id) || after < oldest || after > *next;
        EventsPage {
            hub: self.id.clone(),
            next: *next,
            events: if resync {
                Vec::new()
            } else {
                kept.iter().filter(|e| e.seq >= after).cloned().collect()
            },
            resync,
        }
    }
}

/// The value of `key` in a query string.
fn query<'a>(raw: Option<&'a str>, key: &str) -> Option<&'a str> {
    raw.unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, v)| *k == key && !v.is_empty())
        .map(|(_, v)| v)
}

/// Serves `hub` on `listen` until `shutdown`.
pub async fn serve(
    hub: std::sync::Arc<Hub>,
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let app = Router::new()
        .route(
            "/notifications",
            post(
                |State(hub): State<std::sync::Arc<Hub>>,
                 ConnectInfo(from): ConnectInfo<SocketAddr>,
                 RawQuery(raw): RawQuery,
                 headers: HeaderMap,
                 body: Bytes| async move {
                    let token = query(raw.as_deref(), "token");
                    hub.notify(&headers, token, &body, &from.to_string())
                },
            ),
        )
        .route(
            "/events",
            get(
                |State(hub): State<std::sync::Arc<Hub>>, RawQuery(raw): RawQuery| async move {
                    let after = query(raw.as_deref(), "after")
                        .and_then(|n| n.parse().ok())
                        .unwrap_or(0);
                    let id = query(raw.as_deref(), "hub");
                    let page = hub.events(after, id, LONG_POLL).await;
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        serde_json::to_string(&page).expect("a page serialises"),
                    )
                },
            ),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(hub);
    tracing::info!(
        address = %listener.local_addr()?,
        "warm hub: POST /notifications from the registry, GET /events for nodes"
    );
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("the warm hub stopped")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENVELOPE: &str = r#"{"events":[
        {"id":"1","timestamp":"2026-12-03T10:00:00.5Z","action":"push",
         "target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","repository":"team/app","tag":"v2"},
         "request":{"host":"registry.example:5000"}},
        {"id":"2","timestamp":"2026-12-03T10:00:00Z","action":"push",
         "target":{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","repository":"team/app"}},
        {"id":"3","timestamp":"2026-12-03T10:00:00Z","action":"pull",
         "target":{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:3333333333333333333333333333333333333333333333333333333333333333","repository":"team/app","tag":"v1"}}
    ]}"#;

    #[test]
    fn only_pushes_of_tagged_manifests_are_kept() {
        let kept = pushes(ENVELOPE.as_bytes()).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].repository, "team/app");
        assert_eq!(kept[0].tag, "v2");
        assert_eq!(kept[0].host, "registry.example:5000");
        assert_eq!(kept[0].pushed_at, 1_796_292_000.5);
        assert!(pushes(b"{\"nothing\": 1}").is_err());
        assert!(pushes(b"not json").is_err());
    }

    const DIGEST: &str = "sha256:4444444444444444444444444444444444444444444444444444444444444444";

    #[test]
    fn harbor_ecr_and_artifact_registry_pushes_are_read_too() {
        let harbor = format!(
            r#"{{"type":"PUSH_ARTIFACT","occur_at":1796292000,"operator":"ci",
               "event_data":{{"resources":[{{"digest":"{DIGEST}","tag":"v3","resource_url":"harbor.example/ml/server:v3"}}],
               "repository":{{"name":"server","namespace":"ml","repo_full_name":"ml/server"}}}}}}"#
        );
        let ecr = format!(
            r#"{{"version":"0","detail-type":"ECR Image Action","source":"aws.ecr","account":"123456789012",
               "time":"2026-12-03T10:00:00Z","region":"eu-west-1","resources":[],
               "detail":{{"result":"SUCCESS","repository-name":"ml/server","image-digest":"{DIGEST}","action-type":"PUSH","image-tag":"v3"}}}}"#
        );
        use base64::Engine as _;
        let data = base64::engine::general_purpose::STANDARD.encode(format!(
            r#"{{"action":"INSERT","digest":"europe-docker.pkg.dev/proj/ml/server@{DIGEST}","tag":"europe-docker.pkg.dev/proj/ml/server:v3"}}"#
        ));
        let gcr = format!(
            r#"{{"message":{{"data":"{data}","messageId":"1","publishTime":"2026-12-03T10:00:00Z"}},"subscription":"s"}}"#
        );
        for (body, host, repository) in [
            (harbor, "harbor.example", "ml/server"),
            (
                ecr,
                "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
                "ml/server",
            ),
            (gcr, "europe-docker.pkg.dev", "proj/ml/server"),
        ] {
            let kept = pushes(body.as_bytes()).unwrap();
            assert_eq!(kept.len(), 1, "{body}");
            assert_eq!(kept[0].host, host);
            assert_eq!(kept[0].repository, repository);
            assert_eq!(kept[0].tag, "v3");
            assert_eq!(kept[0].digest, DIGEST);
            assert_eq!(kept[0].pushed_at, 1_796_292_000.0);
        }
        // Deletes are no pushes.
        let delete = r#"{"type":"DELETE_ARTIFACT","event_data":{"resources":[]}}"#;
        assert!(pushes(delete.as_bytes()).unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_notification_without_the_token_changes_nothing() {
        let hub = Hub::new(Some("secret".into()));
        let (status, _) = hub.notify(&HeaderMap::new(), None, ENVELOPE.as_bytes(), "test");
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer wrong".parse().unwrap());
        assert_eq!(
            hub.notify(&headers, None, ENVELOPE.as_bytes(), "test").0,
            StatusCode::UNAUTHORIZED
        );
        headers.insert("authorization", "Bearer secret".parse().unwrap());
        assert_eq!(
            hub.notify(&headers, None, b"{\"events\": 7}", "test").0,
            StatusCode::BAD_REQUEST
        );
        let page = hub.events(0, None, Duration::ZERO).await;
        assert!(page.events.is_empty() && !page.resync && page.next == 0);
        assert_eq!(
            hub.notify(&headers, None, ENVELOPE.as_bytes(), "test").0,
            StatusCode::OK
        );
        let page = hub.events(0, None, Duration::ZERO).await;
        assert_eq!(page.events.len(), 1);
        assert_eq!(page.next, 1);
        // Caught up: nothing new; another hub's ID: resync.
        let page = hub.events(1, Some(&page.hub), Duration::ZERO).await;
        assert!(page.events.is_empty() && !page.resync);
        assert!(hub.events(1, Some("gone"), Duration::ZERO).await.resync);
    }

    #[tokio::test]
    async fn a_waiting_subscriber_gets_the_next_push() {
        let hub = std::sync::Arc::new(Hub::new(None));
        let waiting = tokio::spawn({
            let hub = hub.clone();
            async move { hub.events(0, None, Duration::from_secs(10)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        hub.notify(&HeaderMap::new(), None, ENVELOPE.as_bytes(), "test");
        let page = waiting.await.unwrap();
        assert_eq!(page.events.len(), 1);
    }
}
