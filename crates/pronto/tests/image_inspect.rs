//! `pronto image inspect` against the real registry.

use std::process::Command;

use pronto_testbed::image::Platform;
use pronto_testbed::{ImageBuilder, Layer, OciLayout, Prereq, Registry, require};

#[test]
fn inspect_shows_platforms_layers_config_and_referrers() {
    require!(&[Prereq::Registry, Prereq::Skopeo]);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let build = |arch: &str| {
        ImageBuilder::new()
            .platform(Platform::new("linux", arch))
            .layer(Layer::new().file("a", arch))
            .layer(Layer::new().file("b", "second layer"))
            .entrypoint(&["/bin/app"])
            .build(&layout)
            .unwrap()
    };
    let (amd, arm) = (build("amd64"), build("arm64"));
    layout
        .tag_multi_platform("v1", &[amd.clone(), arm.clone()])
        .unwrap();
    let registry = Registry::start().unwrap();
    let reference = registry.push(&layout, "v1", "inspect/app:v1").unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_pronto"))
        .args([
            "image",
            "inspect",
            &reference,
            "--platform",
            "linux/arm64",
            "--json",
        ])
        .env("DOCKER_CONFIG", work.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["manifest"]["digest"], arm.manifest_digest);
    assert_eq!(
        report["index"]["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    assert_eq!(report["config"]["architecture"], "arm64");
    assert_eq!(
        report["config"]["entrypoint"],
        serde_json::json!(["/bin/app"])
    );
    let layers: Vec<&str> = report["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    let built: Vec<&str> = arm.layers.iter().map(|l| l.digest.as_str()).collect();
    assert_eq!(layers, built);
    assert_eq!(report["referrers"], serde_json::json!([]));

    let text = Command::new(env!("CARGO_BIN_EXE_pronto"))
        .args(["image", "inspect", &reference])
        .env("DOCKER_CONFIG", work.path())
        .output()
        .unwrap();
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&amd.manifest_digest), "{text}");
    assert!(text.contains("layers     2 layers"), "{text}");

    // A single-platform image is not another platform's image.
    layout.tag("single", &amd).unwrap();
    let single = registry
        .push(&layout, "single", "inspect/single:v1")
        .unwrap();
    let wrong = Command::new(env!("CARGO_BIN_EXE_pronto"))
        .args(["image", "inspect", &single, "--platform", "linux/arm64"])
        .env("DOCKER_CONFIG", work.path())
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        err.contains("no manifest for platform linux/arm64") && err.contains("linux/amd64"),
        "{err}"
    );

    let missing = Command::new(env!("CARGO_BIN_EXE_pronto"))
        .args([
            "image",
            "inspect",
            &format!("{}/inspect/none:v1", registry.host()),
        ])
        .env("DOCKER_CONFIG", work.path())
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("not found") && err.contains("inspect/none"),
        "{err}"
    );
}

/// Credentials reach `pronto` the way docker users keep them: `auths` in
/// config.json, a `credsStore`, or a per-registry `credHelpers` entry.
#[test]
fn docker_config_credentials_are_used() {
    use std::os::unix::fs::PermissionsExt;

    require!(&[Prereq::Registry, Prereq::Skopeo]);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(&work.path().join("layout")).unwrap();
    let image = ImageBuilder::new()
        .layer(Layer::new().file("a", "private\n"))
        .build(&layout)
        .unwrap();
    layout.tag("v1", &image).unwrap();
    let creds = pronto_testbed::Credentials::new("dave", "pa55");
    let registry = Registry::start_with(pronto_testbed::RegistryOptions {
        basic_auth: Some(creds),
        ..Default::default()
    })
    .unwrap();
    let reference = registry.push(&layout, "v1", "private/app:v1").unwrap();
    let host = registry.host();

    // A credential helper, as docker runs it: `get` reads the server on stdin.
    let bin = work.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-pronto-test");
    std::fs::write(
        &helper,
        "#!/bin/sh\nread server\nprintf '{\"ServerURL\":\"%s\",\"Username\":\"dave\",\"Secret\":\"pa55\"}' \"$server\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );

    let configs = [
        (
            "auths",
            serde_json::json!({"auths": {&host: {"auth": "ZGF2ZTpwYTU1"}}}),
        ),
        (
            "credsStore",
            serde_json::json!({"credsStore": "pronto-test"}),
        ),
        (
            "credHelpers",
            serde_json::json!({"credHelpers": {&host: "pronto-test"}}),
        ),
        ("none", serde_json::json!({})),
    ];
    for (kind, config) in &configs {
        let dir = work.path().join(kind);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_pronto"))
            .args(["image", "inspect", &reference, "--json"])
            .env("DOCKER_CONFIG", &dir)
            .env("PATH", &path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("pa55"),
            "{kind}: a secret reached the output: {stderr}"
        );
        if *kind == "none" {
            assert!(!out.status.success(), "anonymous access must fail");
            assert!(stderr.contains("no credentials are configured"), "{stderr}");
        } else {
            assert!(out.status.success(), "{kind}: {stderr}");
            let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            assert_eq!(
                report["manifest"]["digest"], image.manifest_digest,
                "{kind}"
            );
        }
    }

    // `registry.docker_config` names the file, wherever it is; the debug
    // log of the whole exchange carries no secret either.
    let elsewhere = work.path().join("etc-pronto-docker.json");
    std::fs::write(&elsewhere, configs[0].1.to_string()).unwrap();
    let config = work.path().join("pronto.toml");
    std::fs::write(
        &config,
        format!("[registry]\ndocker_config = \"{}\"\n", elsewhere.display()),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pronto"))
        .args(["--config", config.to_str().unwrap()])
        .args(["image", "inspect", &reference, "--json"])
        .env("DOCKER_CONFIG", work.path().join("none"))
        .env("PRONTO_LOG", "trace")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "docker_config: {stderr}");
    assert!(stderr.contains("DEBUG"), "debug logging was on: {stderr}");
    for secret in ["pa55", "ZGF2ZTpwYTU1"] {
        assert!(
            !stderr.contains(secret),
            "a secret reached the log: {stderr}"
        );
    }
}
