//! What a test needs from the machine, and what happens when it is missing:
//! outside CI the test prints why it is skipped and passes; with `CI=true`
//! a missing prerequisite fails the test.

use std::path::Path;

/// Something a test needs that `cargo` alone does not provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prereq {
    /// Running as root (mounts, containerd, runc).
    Root,
    /// `/dev/fuse` exists.
    Fuse,
    /// `containerd`, `containerd-shim-runc-v2` and `ctr` are installed.
    Containerd,
    /// `runc` is installed.
    Runc,
    /// Debian's `docker-registry` is installed.
    Registry,
    /// `skopeo` is installed (the harness pushes images with it).
    Skopeo,
    /// A statically linked busybox at `/bin/busybox` (Debian's
    /// `busybox-static`), the userland of generated images.
    Busybox,
    /// `debootstrap`, to build a real Debian root filesystem.
    Debootstrap,
    /// Go and containerd 1.6's sources (its snapshotter test suite), from
    /// Debian's `golang-go` and `golang-github-containerd-containerd-dev`.
    ContainerdSuite,
    /// Go with the template libraries Helm renders charts with (sprig and
    /// yaml.v3), from Debian's `golang-github-masterminds-sprig-dev` and
    /// `golang-gopkg-yaml.v3-dev`.
    ChartTemplates,
    /// `buildah`, which builds images from a Containerfile without a
    /// daemon.
    Buildah,
    /// stargz-snapshotter's `ctr-remote`, which converts images to eStargz.
    CtrRemote,
    /// `systemd-analyze`, to check unit files.
    SystemdAnalyze,
}

impl Prereq {
    /// Everything an end-to-end test through containerd and a registry needs.
    pub const FULL_STACK: &'static [Prereq] = &[
        Prereq::Root,
        Prereq::Containerd,
        Prereq::Runc,
        Prereq::Registry,
        Prereq::Skopeo,
        Prereq::Busybox,
    ];

    /// `None` when present, else what is missing and how to get it.
    pub fn problem(self) -> Option<String> {
        let ok = match self {
            Prereq::Root => nix::unistd::geteuid().is_root(),
            Prereq::Fuse => Path::new("/dev/fuse").exists(),
            Prereq::Containerd => {
                on_path("containerd") && on_path("containerd-shim-runc-v2") && on_path("ctr")
            }
            Prereq::Runc => on_path("runc"),
            Prereq::Registry => on_path("docker-registry"),
            Prereq::Skopeo => on_path("skopeo"),
            Prereq::Busybox => is_static_busybox(Path::new(BUSYBOX)),
            Prereq::Debootstrap => on_path("debootstrap"),
            Prereq::ContainerdSuite => on_path("go") && Path::new(CONTAINERD_SUITE).is_dir(),
            Prereq::Buildah => on_path("buildah"),
            Prereq::CtrRemote => on_path("ctr-remote"),
            Prereq::ChartTemplates => {
                on_path("go")
                    && Path::new("/usr/share/gocode/src/github.com/Masterminds/sprig").is_dir()
                    && Path::new("/usr/share/gocode/src/gopkg.in/yaml.v3").is_dir()
            }
            Prereq::SystemdAnalyze => on_path("systemd-analyze"),
        };
        (!ok).then(|| self.hint().to_owned())
    }

    fn hint(self) -> &'static str {
        match self {
            Prereq::Root => "not running as root",
            Prereq::Fuse => "/dev/fuse is missing (modprobe fuse; apt-get install fuse3)",
            Prereq::Containerd => "containerd is not installed (apt-get install containerd)",
            Prereq::Runc => "runc is not installed (apt-get install runc)",
            Prereq::Registry => {
                "docker-registry is not installed (apt-get install docker-registry)"
            }
            Prereq::Skopeo => "skopeo is not installed (apt-get install skopeo)",
            Prereq::Busybox => {
                "/bin/busybox is not a static busybox (apt-get install busybox-static)"
            }
            Prereq::Debootstrap => "debootstrap is not installed (apt-get install debootstrap)",
            Prereq::SystemdAnalyze => "systemd-analyze is missing (apt-get install systemd)",
            Prereq::Buildah => "buildah is not installed (apt-get install buildah)",
            Prereq::CtrRemote => "ctr-remote is not installed (apt-get install stargz-snapshotter)",
            Prereq::ChartTemplates => {
                "Go or Helm's template libraries are missing (apt-get install golang-go \
                 golang-github-masterminds-sprig-dev golang-gopkg-yaml.v3-dev)"
            }
            Prereq::ContainerdSuite => {
                "Go or containerd's snapshotter test suite is missing \
                 (apt-get install golang-go golang-github-containerd-containerd-dev)"
            }
        }
    }
}

/// containerd 1.6's snapshotter test suite, as Debian installs it.
pub const CONTAINERD_SUITE: &str =
    "/usr/share/gocode/src/github.com/containerd/containerd/snapshots/testsuite";

/// Where generated images take their userland from.
pub const BUSYBOX: &str = "/bin/busybox";

/// True when running under CI, where a missing prerequisite is a failure.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Checks `prereqs`. Returns `true` when all are present. Otherwise, under
/// CI it panics naming what is missing; elsewhere it prints why the current
/// test is skipped and returns `false`.
pub fn check(prereqs: &[Prereq]) -> bool {
    let missing: Vec<String> = prereqs.iter().filter_map(|p| p.problem()).collect();
    if missing.is_empty() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    let reasons = missing.join("; ");
    if in_ci() {
        panic!("{test}: CI=true and a prerequisite is missing: {reasons}");
    }
    eprintln!("skipping {test}: {reasons} (set CI=true to make this a failure)");
    false
}

/// Returns early from the calling test when a prerequisite is missing
/// (outside CI), after printing why.
#[macro_export]
macro_rules! require {
    ($prereqs:expr) => {
        if !$crate::prereq::check($prereqs) {
            return;
        }
    };
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let candidate = dir.join(program);
            std::fs::metadata(&candidate).is_ok_and(|m| m.is_file())
        })
    })
}

/// A dynamically linked busybox would not run inside a generated image that
/// has no libc, so check that the 64-bit ELF has no `PT_INTERP` header.
fn is_static_busybox(path: &Path) -> bool {
    const PT_INTERP: u32 = 3;
    let Ok(elf) = std::fs::read(path) else {
        return false;
    };
    let field = |at: usize, len: usize| -> Option<u64> {
        let bytes = elf.get(at..at + len)?;
        Some(
            bytes
                .iter()
                .rev()
                .fold(0, |acc, b| (acc << 8) | u64::from(*b)),
        )
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) =
        (field(0x20, 8), field(0x36, 2), field(0x38, 2))
    else {
        return false;
    };
    (0..phnum).all(|i| {
        let at = phoff + i * phentsize;
        usize::try_from(at)
            .ok()
            .and_then(|at| field(at, 4))
            .is_some_and(|kind| kind != u64::from(PT_INTERP))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_binaries_are_not_static_busybox() {
        // /bin/ls on any Debian machine is dynamically linked.
        assert!(!is_static_busybox(Path::new("/bin/ls")));
        assert!(!is_static_busybox(Path::new("/nonexistent")));
    }
}
