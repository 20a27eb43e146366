//! containerd's snapshotter conformance suite against `pronto serve`.

use std::collections::BTreeMap;
use std::process::Command;

use pronto_testbed::{Prereq, require};

/// The cases of containerd 1.6's `SnapshotterSuite`. Pronto must end each
/// exactly as containerd's overlayfs snapshotter does in the same run (the
/// suite skips `Rename` for every snapshotter).
const CASES: usize = 21;

#[test]
fn containerd_snapshotter_suite_passes_against_pronto_serve() {
    require!(&[Prereq::Root, Prereq::ContainerdSuite]);
    let gopath = tempfile::tempdir().unwrap();
    let package = gopath.path().join("src/pronto.test/suite");
    std::fs::create_dir_all(&package).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/containerd-suite/suite_test.go"
        ),
        package.join("suite_test.go"),
    )
    .unwrap();
    let out = Command::new("go")
        .args(["test", "-count=1", "-v", "."])
        .current_dir(&package)
        .env("GO111MODULE", "off")
        .env(
            "GOPATH",
            format!("{}:/usr/share/gocode", gopath.path().display()),
        )
        .env("GOCACHE", gopath.path().join("cache"))
        .env("PRONTO_BIN", env!("CARGO_BIN_EXE_pronto"))
        .output()
        .expect("run go test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // `--- PASS: TestPronto/Basic (0.21s)` → ("Basic", "PASS").
    let results = |suite: &str| -> BTreeMap<String, String> {
        let prefix = format!("{suite}/");
        stdout
            .lines()
            .filter_map(|l| l.trim_start().strip_prefix("--- "))
            .filter_map(|l| {
                let (verdict, rest) = l.split_once(": ")?;
                let case = rest.strip_prefix(&prefix)?.split_whitespace().next()?;
                Some((case.to_owned(), verdict.to_owned()))
            })
            .collect()
    };
    let (pronto, overlay) = (results("TestPronto"), results("TestOverlay"));
    assert!(
        out.status.success() && pronto.len() == CASES && pronto == overlay,
        "containerd's suite ({}): pronto {pronto:?}\noverlayfs {overlay:?}\n{stdout}\n{stderr}",
        out.status
    );
    // Every case runs; the suite itself skips Rename for every snapshotter.
    assert!(pronto.values().all(|v| v == "PASS" || v == "SKIP"));
    assert!(pronto.values().filter(|v| *v == "PASS").count() >= CASES - 1);
}
