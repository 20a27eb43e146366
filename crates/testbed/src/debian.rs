//! Real Debian root filesystems for tests and benchmarks, built once with
//! `debootstrap` (minbase plus packages) and cached between runs.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The mirror apt on this machine uses; Debian's package registry.
const MIRROR: &str = "http://deb.debian.org/debian";

/// Where the root filesystem is kept: `$PRONTO_TEST_CACHE` or
/// `/var/cache/pronto-test`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("PRONTO_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/pronto-test"))
}

/// A bookworm minbase root with python3, building it if it is not cached.
/// Building takes about 30 seconds and needs root.
pub fn bookworm_with_python() -> Result<PathBuf> {
    bookworm_with(
        "debootstrap-bookworm-python3-v2",
        &["python3"],
        "usr/bin/python3",
    )
}

/// A bookworm minbase root with python3 and numpy: a real distribution
/// image of the kind data workloads run on.
pub fn bookworm_with_numpy() -> Result<PathBuf> {
    bookworm_with(
        "debootstrap-bookworm-python3-numpy-v1",
        &["python3", "python3-numpy"],
        "usr/lib/python3/dist-packages/numpy/__init__.py",
    )
}

/// A bookworm minbase root with what a Rust build needs besides the
/// toolchain (a C compiler and linker, libc headers, protoc): the base of
/// an image like `rust:bookworm`, whose toolchain the test binds in.
pub fn bookworm_for_building() -> Result<PathBuf> {
    bookworm_with(
        "debootstrap-bookworm-build-v1",
        &[
            "gcc",
            "libc6-dev",
            "protobuf-compiler",
            "ca-certificates",
            "binutils",
        ],
        "usr/bin/protoc",
    )
}

/// A bookworm minbase root with `packages`, cached under `name` and
/// considered built when `marker` exists in it.
fn bookworm_with(name: &str, packages: &[&str], marker: &str) -> Result<PathBuf> {
    let cache = cache_dir();
    let root = cache.join(name);
    if root.join(marker).exists() {
        return Ok(root);
    }
    std::fs::create_dir_all(&cache).with_context(|| format!("create {}", cache.display()))?;
    let building = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(&cache)?;
    let target = building.path().join("root");
    let out = Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", packages.join(",")))
        .arg("bookworm")
        .arg(&target)
        .arg(MIRROR)
        .output()
        .context("run debootstrap")?;
    if !out.status.success() {
        bail!(
            "debootstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(10)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // Logs and caches that differ from run to run and say nothing.
    let _ = std::fs::remove_dir_all(target.join("var/cache/apt/archives"));
    std::fs::rename(&target, &root)
        .with_context(|| format!("move the root into {}", root.display()))?;
    Ok(root)
}
