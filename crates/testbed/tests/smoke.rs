//! The harness end to end: a generated image is pushed to the real
//! registry, pulled by the real containerd with its own overlayfs
//! snapshotter, and run with runc. This is the baseline that Pronto's lazy
//! path is compared with.

use pronto_testbed::image::LongNames;
use pronto_testbed::registry::ManifestFormat;
use pronto_testbed::{
    Compression, Containerd, ContainerdOptions, Content, CriOptions, Entry, ImageBuilder, Layer,
    OciLayout, Prereq, Registry, RegistryOptions, require,
};

/// Three layers that exercise what a layer can hold; the command prints a
/// digest of what it sees so the output proves the merged tree is right.
fn edge_case_image(layout: &OciLayout) -> pronto_testbed::image::BuiltImage {
    let long_dir = format!("opt/{}", "n".repeat(150));
    let base = Layer::busybox(&[
        "sh", "cat", "ls", "stat", "md5sum", "readlink", "find", "wc",
    ])
    .dir("data")
    .file("data/gone", "removed by a whiteout\n")
    .dir("data/opaque")
    .file("data/opaque/old", "hidden by an opaque marker\n")
    .dir("opt")
    .dir(&long_dir)
    .file(&format!("{long_dir}/{}", "f".repeat(200)), "long name\n");
    let middle = Layer::new()
        .compression(Compression::None)
        .long_names(LongNames::Gnu)
        .dir("data")
        .whiteout("data/gone")
        .dir("data/opaque")
        .opaque("data/opaque")
        .file("data/opaque/new", "new\n")
        .entry(Entry::file("data/big", Content::random(42, 5 << 20)).mode(0o600))
        .entry(Entry::hardlink("data/big-link", "data/big").mode(0o600))
        .symlink("data/sym", "opaque/new")
        .entry(
            Entry::file("data/owned", "x\n")
                .owner(1234, 5678)
                .xattr("user.pronto", "yes"),
        );
    let top = Layer::new()
        .compression(Compression::FAST)
        .dir("data")
        .many_small_files("data/small", 300, 9);
    let script = "cat /data/opaque/new; ls /data/opaque; test ! -e /data/gone && echo gone-ok; \
                  readlink /data/sym; stat -c '%s %a %u:%g %h' /data/big /data/owned; \
                  md5sum /data/big | cut -c1-32; find /data/small -type f | wc -l; \
                  cat /opt/n*/f*";
    ImageBuilder::new()
        .layer(base)
        .layer(middle)
        .layer(top)
        .cmd(&["/bin/sh", "-c", script])
        .build(layout)
        .unwrap()
}

#[test]
fn generated_image_runs_through_containerd_overlayfs() {
    require!(Prereq::FULL_STACK);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let image = edge_case_image(&layout);
    layout.tag("latest", &image).unwrap();

    let registry = Registry::start().unwrap();
    let reference = registry.push(&layout, "latest", "smoke/edge:v1").unwrap();
    let containerd = Containerd::start_with(ContainerdOptions {
        plain_http_registries: vec![registry.host()],
        ..Default::default()
    })
    .unwrap();
    containerd.pull(&reference, "overlayfs").unwrap();

    // The image containerd stored is the one we built, digest for digest.
    let listed = containerd.ctr_ok(&["images", "ls"]).unwrap();
    assert!(listed.contains(&image.manifest_digest), "{listed}");

    // busybox has no getfattr, so read the xattr from the unpacked
    // snapshot on the host.
    let snapshots = containerd
        .root_dir()
        .join("io.containerd.snapshotter.v1.overlayfs/snapshots");
    let owned: Vec<_> = std::fs::read_dir(&snapshots)
        .unwrap()
        .map(|e| e.unwrap().path().join("fs/data/owned"))
        .filter(|p| p.exists())
        .collect();
    assert_eq!(owned.len(), 1, "{owned:?}");
    assert_eq!(
        xattr::get(&owned[0], "user.pronto").unwrap().as_deref(),
        Some(&b"yes"[..])
    );

    let out = containerd.run(&reference, "overlayfs", &[]).unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let big_md5 = format!("{:x}", md5_of(&Content::random(42, 5 << 20)));
    let expected = format!(
        "new\nnew\ngone-ok\nopaque/new\n{} 600 0:0 2\n2 644 1234:5678 1\n{big_md5}\n300\nlong name\n",
        5 << 20
    );
    assert_eq!(
        stdout,
        expected,
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn basic_auth_registry_and_docker_manifests() {
    require!(Prereq::FULL_STACK);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let image = ImageBuilder::new()
        .layer(Layer::busybox(&["echo"]))
        .cmd(&["echo", "hello from docker media types"])
        .build(&layout)
        .unwrap();
    layout.tag("latest", &image).unwrap();

    let creds = pronto_testbed::Credentials::new("pronto", "s3cret");
    let registry = Registry::start_with(RegistryOptions {
        basic_auth: Some(creds.clone()),
        ..Default::default()
    })
    .unwrap();
    let reference = registry
        .push_as(&layout, "latest", "auth/echo:v1", ManifestFormat::Docker)
        .unwrap();
    let containerd = Containerd::start_with(ContainerdOptions {
        plain_http_registries: vec![registry.host()],
        ..Default::default()
    })
    .unwrap();
    // Anonymous pulls are refused...
    assert!(containerd.pull(&reference, "overlayfs").is_err());
    // ...and credentials work.
    containerd
        .ctr_ok(&[
            "images",
            "pull",
            "--hosts-dir",
            containerd.hosts_dir().to_str().unwrap(),
            "--user",
            "pronto:s3cret",
            &reference,
        ])
        .unwrap();
    let media = containerd.ctr_ok(&["images", "ls"]).unwrap();
    assert!(
        media.contains("application/vnd.docker.distribution.manifest.v2+json"),
        "{media}"
    );
    let out = containerd.run(&reference, "overlayfs", &[]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from docker media types\n"
    );
}

#[test]
fn containerd_starts_with_pronto_proxy_plugin_and_cri_settings() {
    require!(Prereq::FULL_STACK);
    let work = tempfile::tempdir().unwrap();
    let layout = OciLayout::create(work.path()).unwrap();
    let pause = ImageBuilder::new()
        .layer(Layer::busybox(&["sleep"]))
        .entrypoint(&["/bin/sleep", "2147483647"])
        .build(&layout)
        .unwrap();
    layout.tag("3.9", &pause).unwrap();
    let archive = work.path().join("pause.tar");
    layout.write_archive(&archive).unwrap();

    let containerd = Containerd::start_with(ContainerdOptions {
        proxy_snapshotters: vec![("pronto".into(), work.path().join("pronto.sock"))],
        cri: Some(CriOptions {
            snapshotter: "overlayfs".into(),
            sandbox_image: "pronto.test/pause:3.9".into(),
        }),
        plain_http_registries: Vec::new(),
        extra_config: String::new(),
        supervised: false,
    })
    .unwrap();
    let plugins = containerd.ctr_ok(&["plugins", "ls"]).unwrap();
    let line = |id: &str| {
        plugins
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(id))
            .unwrap_or_else(|| panic!("plugin {id} missing:\n{plugins}"))
            .trim_end()
            .to_owned()
    };
    assert!(line("pronto").contains("io.containerd.snapshotter.v1"));
    assert!(line("cri").ends_with("ok"), "{}", line("cri"));

    containerd
        .import("k8s.io", &archive, "pronto.test/pause", "overlayfs")
        .unwrap();
    let images = containerd
        .ctr_in("k8s.io")
        .args(["images", "ls", "-q"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&images.stdout).contains("pronto.test/pause:3.9"));
}

#[test]
fn everything_is_stopped_and_unmounted_when_a_test_panics() {
    require!(Prereq::FULL_STACK);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let record = seen.clone();
    let panicked = std::thread::spawn(move || {
        let work = tempfile::tempdir().unwrap();
        let layout = OciLayout::create(work.path()).unwrap();
        let image = ImageBuilder::new()
            .layer(Layer::busybox(&["sleep"]))
            .cmd(&["sleep", "600"])
            .build(&layout)
            .unwrap();
        layout.tag("latest", &image).unwrap();
        let registry = Registry::start().unwrap();
        let reference = registry.push(&layout, "latest", "panic/sleep:v1").unwrap();
        let containerd = Containerd::start_with(ContainerdOptions {
            plain_http_registries: vec![registry.host()],
            ..Default::default()
        })
        .unwrap();
        containerd.pull(&reference, "overlayfs").unwrap();
        // A running container: a shim, runc's init and an overlay mount.
        containerd
            .ctr_ok(&["run", "-d", &reference, "sleeper"])
            .unwrap();
        let shims = pronto_testbed::process::pids_with_args(&[
            "-address",
            containerd.socket().to_str().unwrap(),
        ]);
        assert_eq!(shims.len(), 1);
        assert!(!pronto_testbed::process::mounts_below(containerd.dir()).is_empty());
        *record.lock().unwrap() = Some((
            registry.pid().unwrap() as i32,
            containerd.pid().unwrap() as i32,
            shims[0],
            containerd.dir().to_path_buf(),
        ));
        panic!("deliberate panic with a container running");
    })
    .join();
    assert!(panicked.is_err());
    let (registry, containerd, shim, dir) = seen.lock().unwrap().take().unwrap();
    for pid in [registry, containerd, shim] {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z "),
            "process {pid} still runs: {state}"
        );
    }
    assert!(pronto_testbed::process::mounts_below(&dir).is_empty());
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

fn md5_of(content: &Content) -> md5::Digest {
    md5::compute(content.to_vec().unwrap())
}
