//! The registry client against Debian's real docker-registry (distribution
//! 2.8), with images pushed by skopeo from the test harness.

use std::sync::Arc;

use bytes::Bytes;
use pronto_registry::{
    ClientConfig, Platform, RegistryClient, RegistryError, Repository, StaticCredentials,
    fallback_tag, parse_reference, sha256_digest,
};
use pronto_testbed::image::{BuiltImage, Platform as BuildPlatform};
use pronto_testbed::registry::ManifestFormat;
use pronto_testbed::{
    Compression, Content, Credentials, ImageBuilder, Layer, OciLayout, Prereq, Registry,
    RegistryOptions, require,
};
use serde_json::json;

const NEEDS: &[Prereq] = &[Prereq::Registry, Prereq::Skopeo];

fn client() -> RegistryClient {
    RegistryClient::new(ClientConfig::default()).unwrap()
}

fn two_layer_image(layout: &OciLayout, platform: BuildPlatform) -> BuiltImage {
    ImageBuilder::new()
        .platform(platform)
        .layer(Layer::new().file("etc/hello", "hello\n"))
        .layer(
            Layer::new()
                .compression(Compression::FAST)
                .file("data/blob", Content::random(3, 3 << 20)),
        )
        .cmd(&["/bin/true"])
        .build(layout)
        .unwrap()
}

#[tokio::test]
async fn resolves_and_reads_blobs_whole_streamed_and_by_range() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let image = two_layer_image(&layout, BuildPlatform::default());
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry.push(&layout, "v1", "team/app:v1").unwrap();

    let client = client();
    let resolved = client
        .resolve(&parse_reference(&reference).unwrap(), &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest.digest, image.manifest_digest);
    assert!(resolved.index.is_none());
    assert_eq!(resolved.config.architecture().to_string(), "amd64");
    let digests: Vec<String> = resolved
        .image
        .layers()
        .iter()
        .map(|l| l.digest().to_string())
        .collect();
    let built: Vec<String> = image.layers.iter().map(|l| l.digest.clone()).collect();
    assert_eq!(digests, built);

    let repo = Repository::of(&parse_reference(&reference).unwrap());
    let layer = &image.layers[1];
    let expected = std::fs::read(layout.blob_path(&layer.digest)).unwrap();
    let whole = client.blob(&repo, &layer.digest, 64 << 20).await.unwrap();
    assert_eq!(whole.as_ref(), expected.as_slice());

    let mut streamed = Vec::new();
    let n = client
        .blob_to_writer(&repo, &layer.digest, layer.size, &mut streamed)
        .await
        .unwrap();
    assert_eq!(n, layer.size);
    assert_eq!(streamed, expected);

    for range in [
        0..1,
        100..70_000,
        layer.size - 10..layer.size,
        0..layer.size,
    ] {
        let bytes = client
            .blob_range(&repo, &layer.digest, range.clone(), layer.size)
            .await
            .unwrap();
        assert_eq!(
            bytes.as_ref(),
            &expected[range.start as usize..range.end as usize]
        );
    }
    // Many concurrent ranges over the pooled connections.
    let reads = (0..64u64).map(|i| {
        let client = client.clone();
        let repo = repo.clone();
        let digest = layer.digest.clone();
        let size = layer.size;
        async move {
            let start = i * 40_000;
            let bytes = client
                .blob_range(&repo, &digest, start..start + 4096, size)
                .await
                .unwrap();
            (start, bytes)
        }
    });
    for (start, bytes) in futures_util::future::join_all(reads).await {
        assert_eq!(
            bytes.as_ref(),
            &expected[start as usize..start as usize + 4096]
        );
    }
    let err = client
        .blob_range(&repo, &layer.digest, 0..layer.size + 1, layer.size)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Invalid { .. }), "{err}");
}

#[tokio::test]
async fn multi_platform_docker_images_resolve_per_platform() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let amd = two_layer_image(&layout, BuildPlatform::new("linux", "amd64"));
    let arm = {
        let mut p = BuildPlatform::new("linux", "arm64");
        p.variant = Some("v8".into());
        ImageBuilder::new()
            .platform(p)
            .layer(Layer::new().file("arch", "arm64\n"))
            .build(&layout)
            .unwrap()
    };
    layout
        .tag_multi_platform("multi", &[amd.clone(), arm.clone()])
        .unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry
        .push_as(&layout, "multi", "team/multi:v1", ManifestFormat::Docker)
        .unwrap();
    let reference = parse_reference(&reference).unwrap();
    let client = client();

    let default = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(
        default.index.as_ref().unwrap().media_type,
        "application/vnd.docker.distribution.manifest.list.v2+json"
    );
    assert_eq!(
        default.manifest.media_type,
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(default.config.architecture().to_string(), "amd64");
    let arm64 = client
        .resolve(&reference, &"linux/arm64".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(arm64.config.architecture().to_string(), "arm64");
    let err = client
        .resolve(&reference, &"linux/s390x".parse().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("linux/s390x") && err.contains("linux/arm64/v8"),
        "{err}"
    );

    let missing = client
        .resolve(
            &parse_reference(&format!("{}/team/multi:nope", registry.host())).unwrap(),
            &Platform::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(missing.status(), Some(404), "{missing}");
}

#[tokio::test]
async fn basic_auth_with_and_without_credentials() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let image = two_layer_image(&layout, BuildPlatform::default());
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start_with(RegistryOptions {
        basic_auth: Some(Credentials::new("alice", "correct horse")),
        ..Default::default()
    })
    .unwrap();
    let reference =
        parse_reference(&registry.push(&layout, "v1", "private/app:v1").unwrap()).unwrap();

    let anonymous = client()
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    let message = anonymous.to_string();
    assert!(matches!(anonymous, RegistryError::Auth { .. }), "{message}");
    assert!(
        message.contains("no credentials are configured"),
        "{message}"
    );

    let with = |password: &str| {
        RegistryClient::new(ClientConfig {
            credentials: Arc::new(StaticCredentials::none().with(
                &registry.host(),
                "alice",
                password,
            )),
            ..Default::default()
        })
        .unwrap()
    };
    let resolved = with("correct horse")
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest.digest, image.manifest_digest);

    let wrong = with("battery staple")
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    let message = wrong.to_string();
    assert!(matches!(wrong, RegistryError::Auth { .. }), "{message}");
    assert!(!message.contains("battery staple"), "{message}");

    // The credentials (a helper process, a file) are read when the registry
    // asks for them, not for every request.
    let counting = Arc::new(CountingCredentials {
        inner: StaticCredentials::none().with(&registry.host(), "alice", "correct horse"),
        lookups: std::sync::atomic::AtomicUsize::new(0),
    });
    let client = RegistryClient::new(ClientConfig {
        credentials: counting.clone(),
        ..Default::default()
    })
    .unwrap();
    for _ in 0..5 {
        client
            .resolve(&reference, &Platform::default())
            .await
            .unwrap();
    }
    assert_eq!(
        counting.lookups.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one lookup for the one challenge"
    );
}

#[derive(Debug)]
struct CountingCredentials {
    inner: StaticCredentials,
    lookups: std::sync::atomic::AtomicUsize,
}

impl pronto_registry::CredentialSource for CountingCredentials {
    fn credentials(&self, host: &str) -> Option<pronto_registry::Credentials> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.credentials(host)
    }
}

#[tokio::test]
async fn referrers_use_the_tag_schema_on_distribution_2_8() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let image = two_layer_image(&layout, BuildPlatform::default());
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = parse_reference(&registry.push(&layout, "v1", "team/app:v1").unwrap()).unwrap();
    let repo = Repository::of(&reference);
    let client = client();
    let subject = &image.manifest_digest;

    assert!(
        client
            .referrers(&repo, subject, None)
            .await
            .unwrap()
            .is_empty()
    );

    let empty = client
        .push_blob(&repo, Bytes::from_static(b"{}"))
        .await
        .unwrap();
    let mut pushed = Vec::new();
    for (artifact_type, payload) in [
        ("application/vnd.pronto.index.v1", &b"index one"[..]),
        ("application/vnd.example.signature", &b"signature"[..]),
    ] {
        let blob = client
            .push_blob(&repo, Bytes::copy_from_slice(payload))
            .await
            .unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": artifact_type,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": blob, "size": payload.len()}],
            "subject": {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": subject,
                "size": image.manifest.len(),
            },
        }))
        .unwrap();
        let result = client
            .push_referrer(
                &repo,
                subject,
                "application/vnd.oci.image.manifest.v1+json",
                artifact_type,
                manifest.into(),
            )
            .await
            .unwrap();
        assert!(
            !result.subject_accepted,
            "distribution 2.8 has no referrers API"
        );
        pushed.push(result.digest);
    }

    let all = client.referrers(&repo, subject, None).await.unwrap();
    let digests: Vec<String> = all.iter().map(|d| d.digest().to_string()).collect();
    assert_eq!(digests, pushed);
    let only_index = client
        .referrers(&repo, subject, Some("application/vnd.pronto.index.v1"))
        .await
        .unwrap();
    assert_eq!(only_index.len(), 1);
    assert_eq!(only_index[0].digest().to_string(), pushed[0]);

    // The fallback index is a real tag holding an OCI index.
    let tag = client
        .manifest(&repo, &fallback_tag(subject))
        .await
        .unwrap();
    assert_eq!(tag.media_type, "application/vnd.oci.image.index.v1+json");

    // Pushing the same referrer again does not duplicate it.
    client
        .remove_referrer(&repo, subject, &pushed[1])
        .await
        .unwrap();
    let left = client.referrers(&repo, subject, None).await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].digest().to_string(), pushed[0]);
}

#[tokio::test]
async fn pushes_blobs_whole_in_chunks_and_by_mount() {
    require!(NEEDS);
    let registry = Registry::start().unwrap();
    let client = client();
    let repo = Repository::new(&registry.host(), "push/a");
    let other = Repository::new(&registry.host(), "push/b");
    let data = Bytes::from(Content::random(11, 300_000).to_vec().unwrap());

    let whole = client.push_blob(&repo, data.slice(..1000)).await.unwrap();
    assert_eq!(
        client.blob(&repo, &whole, 1 << 20).await.unwrap(),
        data.slice(..1000)
    );
    // From memory, in parts.
    let parts = client
        .push_blob_in_parts(&repo, data.slice(..200_000), 64 * 1024)
        .await
        .unwrap();
    assert_eq!(
        client.blob(&repo, &parts, 1 << 20).await.unwrap(),
        data.slice(..200_000)
    );
    // From a file, in parts; the registry checks the digest it is given.
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &data).unwrap();
    let chunked = sha256_digest(&data);
    client
        .push_blob_file(&repo, file.path(), &chunked, 64 * 1024)
        .await
        .unwrap();
    assert_eq!(client.blob(&repo, &chunked, 1 << 20).await.unwrap(), data);
    let wrong = sha256_digest(b"something else");
    let err = client
        .push_blob_file(&repo, file.path(), &wrong, 64 * 1024)
        .await
        .unwrap_err();
    assert!(!client.blob_exists(&repo, &wrong).await.unwrap(), "{err}");

    assert!(!client.blob_exists(&other, &chunked).await.unwrap());
    assert!(client.mount_blob(&other, "push/a", &chunked).await.unwrap());
    assert!(client.blob_exists(&other, &chunked).await.unwrap());
}

#[tokio::test]
async fn a_corrupted_blob_is_rejected_by_digest() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let image = two_layer_image(&layout, BuildPlatform::default());
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = parse_reference(&registry.push(&layout, "v1", "team/app:v1").unwrap()).unwrap();
    let repo = Repository::of(&reference);
    let layer = &image.layers[1];

    // Flip one byte of the stored blob behind the registry's back.
    let hex = layer.digest.strip_prefix("sha256:").unwrap();
    let data = registry.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let client = client();
    let err = client
        .blob(&repo, &layer.digest, 64 << 20)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains(&layer.digest), "{err}");
    let mut sink = Vec::new();
    let err = client
        .blob_to_writer(&repo, &layer.digest, layer.size, &mut sink)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
}

#[tokio::test]
async fn mirrors_serve_pulls_and_fall_back_to_upstream() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let image = two_layer_image(&layout, BuildPlatform::default());
    layout.tag("v1", &image).unwrap();
    let upstream = Registry::start().unwrap();
    upstream.push(&layout, "v1", "team/app:v1").unwrap();
    let mirror = Registry::start().unwrap();
    let upstream_relay = pronto_testbed::Relay::start(upstream.addr()).unwrap();
    let mirror_relay = pronto_testbed::Relay::start(mirror.addr()).unwrap();
    let reference = parse_reference(&format!("{}/team/app:v1", upstream_relay.host())).unwrap();

    let with_mirror = |url: &str| {
        let mut hosts = pronto_registry::Hosts::new();
        hosts.add_mirror(&upstream_relay.host(), url, false);
        RegistryClient::new(ClientConfig {
            hosts,
            ..Default::default()
        })
        .unwrap()
    };

    // An empty mirror answers 404; the upstream host serves the image.
    let client = with_mirror(&format!("http://{}", mirror_relay.host()));
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest.digest, image.manifest_digest);
    assert!(mirror_relay.bytes_down() > 0 && upstream_relay.bytes_down() > 0);

    // A mirror that has the image serves everything.
    mirror.push(&layout, "v1", "team/app:v1").unwrap();
    upstream_relay.reset();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    let layer = &resolved.image.layers()[1];
    let blob = client
        .blob(&resolved.repository, layer.digest().as_ref(), layer.size())
        .await
        .unwrap();
    assert_eq!(blob.len() as u64, layer.size());
    assert_eq!(upstream_relay.bytes_down(), 0);

    // A mirror that is down is skipped.
    let dead_port = pronto_testbed::net::free_loopback_port().unwrap();
    let client = with_mirror(&format!("http://127.0.0.1:{dead_port}"));
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest.digest, image.manifest_digest);
}

#[tokio::test]
async fn bearer_tokens_are_fetched_cached_per_scope_and_refreshed() {
    require!(NEEDS);
    use pronto_testbed::{TokenServer, TokenServerOptions};
    let creds = Credentials::new("carol", "tok3n-pass");
    // Tokens die after 2 s although the response claims 300 s: the
    // registry's 401 must make the client fetch a new one.
    let tokens = TokenServer::start(TokenServerOptions {
        credentials: Some(creds.clone()),
        token_lifetime: std::time::Duration::from_secs(2),
        announced_lifetime: std::time::Duration::from_secs(300),
    })
    .unwrap();
    let registry = Registry::start_with(RegistryOptions {
        token_auth: Some(tokens.auth().clone()),
        push_credentials: Some(creds.clone()),
        ..Default::default()
    })
    .unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let image = two_layer_image(&layout, BuildPlatform::default());
    layout.tag("v1", &image).unwrap();
    let reference =
        parse_reference(&registry.push(&layout, "v1", "secure/app:v1").unwrap()).unwrap();
    let pushes = tokens.requests().len();

    let anonymous = client()
        .resolve(&reference, &Platform::default())
        .await
        .unwrap_err();
    assert!(
        matches!(anonymous, RegistryError::Auth { .. }),
        "{anonymous}"
    );

    let client = RegistryClient::new(ClientConfig {
        credentials: Arc::new(StaticCredentials::none().with(
            &registry.host(),
            "carol",
            "tok3n-pass",
        )),
        ..Default::default()
    })
    .unwrap();
    let resolved = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(resolved.manifest.digest, image.manifest_digest);
    for layer in &image.layers {
        client
            .blob(&resolved.repository, &layer.digest, layer.size)
            .await
            .unwrap();
    }
    let asked: Vec<_> = tokens.requests()[pushes + 1..].to_vec();
    assert_eq!(
        asked.len(),
        1,
        "one token for the pull scope, reused: {asked:?}"
    );
    assert_eq!(
        asked[0].scope.as_deref(),
        Some("repository:secure/app:pull")
    );
    assert_eq!(asked[0].service.as_deref(), Some("pronto-test-registry"));
    assert!(asked[0].granted);

    std::thread::sleep(std::time::Duration::from_secs(3));
    let again = client
        .resolve(&reference, &Platform::default())
        .await
        .unwrap();
    assert_eq!(again.manifest.digest, image.manifest_digest);
    assert_eq!(
        tokens.requests().len(),
        pushes + 3,
        "a refreshed token after the 401"
    );
}

#[tokio::test]
async fn parallel_download_writes_and_verifies_the_whole_blob() {
    require!(NEEDS);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let image = two_layer_image(&layout, BuildPlatform::default());
    layout.tag("v1", &image).unwrap();
    let registry = Registry::start().unwrap();
    let reference = parse_reference(&registry.push(&layout, "v1", "team/app:v1").unwrap()).unwrap();
    let repo = Repository::of(&reference);
    let layer = &image.layers[1];
    let expected = std::fs::read(layout.blob_path(&layer.digest)).unwrap();
    let client = client();
    // Six ranges wanted, but a shared limit lets only two run at a time.
    let plan = pronto_registry::ParallelFetch {
        chunk_size: 100_000,
        concurrency: 6,
        limits: vec![std::sync::Arc::new(tokio::sync::Semaphore::new(2))],
    };
    let out = work.path().join("layer.tar.gz");
    client
        .blob_to_file_parallel(&repo, &layer.digest, layer.size, &out, plan.clone())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), expected);

    // A blob whose stored bytes were altered fails and leaves no file.
    let hex = layer.digest.strip_prefix("sha256:").unwrap();
    let data = registry.storage_dir().join(format!(
        "docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[200_000] ^= 1;
    std::fs::write(&data, &bytes).unwrap();
    let bad = work.path().join("bad.tar.gz");
    let err = client
        .blob_to_file_parallel(&repo, &layer.digest, layer.size, &bad, plan)
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::DigestMismatch { .. }), "{err}");
    assert!(!bad.exists());
}
