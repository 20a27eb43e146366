//! Resilience against a misbehaving network and registry: the real
//! docker-registry behind the harness's fault-injecting proxy.

use std::sync::Arc;
use std::time::Duration;

use pronto_registry::{
    ClientConfig, Platform, RegistryClient, RegistryError, Repository, RetryPolicy,
    StaticCredentials, parse_reference,
};
use pronto_testbed::image::BuiltImage;
use pronto_testbed::{
    Compression, Content, Credentials, Fault, FaultProxy, ImageBuilder, Layer, OciLayout, Prereq,
    Registry, RegistryOptions, require,
};

const NEEDS: &[Prereq] = &[Prereq::Registry, Prereq::Skopeo];

struct Setup {
    _work: tempfile::TempDir,
    layout: OciLayout,
    image: BuiltImage,
    _registry: Registry,
    proxy: FaultProxy,
}

impl Setup {
    fn new() -> Self {
        let work = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(work.path()).unwrap();
        let image = ImageBuilder::new()
            .layer(
                Layer::new()
                    .compression(Compression::FAST)
                    .file("data", Content::random(5, 1 << 20)),
            )
            .build(&layout)
            .unwrap();
        layout.tag("v1", &image).unwrap();
        let registry = Registry::start().unwrap();
        registry.push(&layout, "v1", "faulty/app:v1").unwrap();
        let proxy = FaultProxy::start(registry.addr()).unwrap();
        Self {
            _work: work,
            layout,
            image,
            _registry: registry,
            proxy,
        }
    }

    fn repo(&self) -> Repository {
        Repository::new(&self.proxy.host(), "faulty/app")
    }

    fn layer(&self) -> (String, u64, Vec<u8>) {
        let layer = &self.image.layers[0];
        let bytes = std::fs::read(self.layout.blob_path(&layer.digest)).unwrap();
        (layer.digest.clone(), layer.size, bytes)
    }

    fn blob_requests(&self) -> usize {
        self.proxy
            .requests()
            .iter()
            .filter(|r| r.path.contains("/blobs/"))
            .count()
    }
}

fn client() -> RegistryClient {
    RegistryClient::new(ClientConfig {
        retry: RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(2),
        },
        stall_timeout: Duration::from_millis(500),
        first_byte_timeout: Duration::from_secs(5),
        ..Default::default()
    })
    .unwrap()
}

#[tokio::test]
async fn resets_errors_and_throttling_are_retried() {
    require!(NEEDS);
    let setup = Setup::new();
    let (digest, size, expected) = setup.layer();
    let client = client();
    let faults = [
        Fault::Reset,
        Fault::Status(500),
        Fault::Status(503),
        Fault::Throttle {
            retry_after_secs: 1,
        },
    ];
    for fault in faults {
        let before = setup.blob_requests();
        setup.proxy.inject("/blobs/", 1, fault.clone());
        let bytes = client.blob(&setup.repo(), &digest, size).await.unwrap();
        assert_eq!(bytes.as_ref(), expected.as_slice(), "{fault:?}");
        assert_eq!(
            setup.blob_requests() - before,
            2,
            "{fault:?}: one failure, one retry"
        );
    }
}

#[tokio::test]
async fn truncated_and_stalled_bodies_are_retried_or_resumed() {
    require!(NEEDS);
    let setup = Setup::new();
    let (digest, size, expected) = setup.layer();
    let client = client();
    let repo = setup.repo();

    setup.proxy.inject("/blobs/", 1, Fault::Truncate);
    let range = client
        .blob_range(&repo, &digest, 1000..300_000, size)
        .await
        .unwrap();
    assert_eq!(range.as_ref(), &expected[1000..300_000]);

    setup
        .proxy
        .inject("/blobs/", 1, Fault::Stall(Duration::from_secs(3)));
    let range = client
        .blob_range(&repo, &digest, 0..4096, size)
        .await
        .unwrap();
    assert_eq!(range.as_ref(), &expected[..4096]);

    // A streamed download that breaks half-way resumes with a range
    // request from where it stopped instead of starting over.
    setup.proxy.inject("/blobs/", 1, Fault::Truncate);
    let mut out = Vec::new();
    client
        .blob_to_writer(&repo, &digest, size, &mut out)
        .await
        .unwrap();
    assert_eq!(out, expected);
    let last = setup.proxy.requests().pop().unwrap();
    let resumed_from: u64 = last
        .range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|r| r.parse().ok())
        .expect("the resumed request asks for the rest");
    assert!(resumed_from > 0 && resumed_from < size, "{last:?}");
}

#[tokio::test]
async fn wrong_content_range_is_retried_and_corruption_is_caught() {
    require!(NEEDS);
    let setup = Setup::new();
    let (digest, size, expected) = setup.layer();
    let client = client();
    let repo = setup.repo();

    setup.proxy.inject("/blobs/", 1, Fault::WrongContentRange);
    let range = client
        .blob_range(&repo, &digest, 10..20, size)
        .await
        .unwrap();
    assert_eq!(range.as_ref(), &expected[10..20]);

    setup.proxy.inject("/blobs/", 10, Fault::WrongContentRange);
    let err = client
        .blob_range(&repo, &digest, 10..20, size)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::RangeMismatch { .. }), "{err}");
    setup.proxy.clear();

    setup.proxy.inject("/blobs/", 1, Fault::Corrupt);
    let err = client.blob(&repo, &digest, size).await.unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
}

#[tokio::test]
async fn giving_up_names_registry_repository_digest_and_status() {
    require!(NEEDS);
    let setup = Setup::new();
    let (digest, size, _) = setup.layer();
    let client = client();
    setup.proxy.inject("/blobs/", 100, Fault::Status(502));
    let err = client.blob(&setup.repo(), &digest, size).await.unwrap_err();
    let message = err.to_string();
    for part in [
        setup.proxy.host().as_str(),
        "faulty/app",
        &digest,
        "HTTP 502",
    ] {
        assert!(message.contains(part), "{message:?} lacks {part:?}");
    }
    assert_eq!(setup.blob_requests(), 4, "the policy's four attempts");

    setup.proxy.clear();
    setup
        .proxy
        .inject("/blobs/", 100, Fault::Stall(Duration::from_secs(2)));
    let err = client.blob(&setup.repo(), &digest, size).await.unwrap_err();
    assert!(matches!(err, RegistryError::Timeout { .. }), "{err}");
    assert!(err.to_string().contains(&digest), "{err}");
}

#[tokio::test]
async fn cross_host_redirects_drop_the_authorization_header() {
    require!(NEEDS);
    // The private registry redirects blob reads to "object storage": here a
    // second, anonymous registry holding the same blobs, reached by
    // another host name (localhost instead of 127.0.0.1).
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let image = ImageBuilder::new()
        .layer(Layer::new().file("data", Content::random(6, 100_000)))
        .build(&layout)
        .unwrap();
    layout.tag("v1", &image).unwrap();
    let private = Registry::start_with(RegistryOptions {
        basic_auth: Some(Credentials::new("bob", "s3cret")),
        ..Default::default()
    })
    .unwrap();
    private.push(&layout, "v1", "redirect/app:v1").unwrap();
    let storage = Registry::start().unwrap();
    storage.push(&layout, "v1", "redirect/app:v1").unwrap();

    let front = FaultProxy::start(private.addr()).unwrap();
    let object_store = FaultProxy::start(storage.addr()).unwrap();
    let reference = parse_reference(&format!("{}/redirect/app:v1", front.host())).unwrap();
    let client = RegistryClient::new(ClientConfig {
        credentials: Arc::new(StaticCredentials::none().with(&front.host(), "bob", "s3cret")),
        ..Default::default()
    })
    .unwrap();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    let layer = &image.layers[0];
    front.inject_for(
        Some("GET"),
        &format!("/blobs/{}", layer.digest),
        1,
        Fault::Redirect(format!("http://localhost:{}", object_store.addr().port())),
    );
    let bytes = client
        .blob(&resolved.repository, &layer.digest, layer.size)
        .await
        .unwrap();
    assert_eq!(bytes.len() as u64, layer.size);

    let redirected = front
        .requests()
        .into_iter()
        .find(|r| r.fault.is_some())
        .unwrap();
    assert!(
        redirected.authorization.is_some(),
        "the registry got credentials"
    );
    let at_storage = object_store.requests();
    assert_eq!(at_storage.len(), 1, "{at_storage:?}");
    assert_eq!(
        at_storage[0].authorization, None,
        "credentials leaked to another host"
    );
}

#[tokio::test]
async fn a_registry_that_ignores_ranges_is_read_up_to_the_range() {
    require!(NEEDS);
    let setup = Setup::new();
    let (digest, size, bytes) = setup.layer();
    setup.proxy.inject("/blobs/", 2, Fault::IgnoreRange);
    let client = client();
    for range in [1000..2000, size - 10..size] {
        let got = client
            .blob_range(&setup.repo(), &digest, range.clone(), size)
            .await
            .unwrap();
        assert_eq!(
            got.as_ref(),
            &bytes[range.start as usize..range.end as usize]
        );
    }
    let seen = setup.proxy.requests();
    let ignored = seen
        .iter()
        .filter(|r| r.fault == Some(Fault::IgnoreRange))
        .count();
    assert_eq!(ignored, 2, "both ranges were answered with the whole blob");
    assert!(
        seen.iter()
            .all(|r| r.range.is_some() || !r.path.contains("/blobs/"))
    );

    // The whole blob is not waited for: a range in the part that arrives
    // is answered although the rest never comes.
    let before = setup.blob_requests();
    setup.proxy.inject(
        "/blobs/",
        1,
        Fault::IgnoreRangeThenStall(Duration::from_secs(10)),
    );
    let got = client
        .blob_range(&setup.repo(), &digest, 1000..2000, size)
        .await
        .unwrap();
    assert_eq!(got.as_ref(), &bytes[1000..2000]);
    assert_eq!(
        setup.blob_requests(),
        before + 1,
        "answered without a retry"
    );
}
