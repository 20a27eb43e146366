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
