//! Pronto's main job on one machine: a real registry and a real containerd
//! on loopback, a generated ML-style image (a small userland plus large
//! incompressible model files), and a cold start measured from pull to the
//! workload's ready line, with the bytes the registry served counted by a
//! relay in front of it.
//!
//! Until Pronto's lazy snapshotter lands, this measures containerd's own
//! pull (overlayfs snapshotter): the baseline Pronto is built to beat.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use pronto_testbed::{
    Compression, Containerd, ContainerdOptions, Content, Entry, ImageBuilder, Layer, OciLayout,
    Prereq, Registry, Relay,
};

/// Cold-start demo: registry + containerd on loopback, generated image,
/// time and bytes from pull to ready.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Total size of the model files in the image, in MiB.
    #[arg(long, default_value_t = 512)]
    size_mib: u64,
    /// Number of model files the size is split into.
    #[arg(long, default_value_t = 4)]
    files: u64,
    /// MiB the workload reads from the first model file before it is ready.
    #[arg(long, default_value_t = 4)]
    read_mib: u64,
    /// The pronto binary (for the lazy row); without it only containerd's
    /// pull is measured.
    #[arg(long)]
    pronto: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let missing: Vec<String> = Prereq::FULL_STACK
        .iter()
        .filter_map(|p| p.problem())
        .collect();
    ensure!(
        missing.is_empty(),
        "cannot run the demo: {}",
        missing.join("; ")
    );
    ensure!(args.files > 0, "--files must be at least 1");

    let work = tempfile::Builder::new().prefix("pronto-demo-").tempdir()?;
    let layout = OciLayout::create(&work.path().join("layout"))?;
    let started = Instant::now();
    let image = build_image(&args, &layout)?;
    layout.tag("latest", &image)?;
    let size = image.layers_size();
    println!(
        "built image: {} layers, {} compressed, in {}",
        image.layers.len(),
        mib(size),
        secs(started.elapsed())
    );

    let registry = Registry::start()?;
    let started = Instant::now();
    registry.push(&layout, "latest", "demo/model:v1")?;
    println!(
        "registry on {}: pushed demo/model:v1 in {}",
        registry.host(),
        secs(started.elapsed())
    );
    let relay = Relay::start(registry.addr())?;
    let reference = format!("{}/demo/model:v1", relay.host());
    let containerd = Containerd::start_with(ContainerdOptions {
        plain_http_registries: vec![relay.host()],
        ..Default::default()
    })?;
    println!("containerd on {}", containerd.socket().display());

    println!("\ncold start with containerd's default pull (overlayfs snapshotter):");
    let started = Instant::now();
    containerd.pull(&reference, "overlayfs")?;
    let pulled = started.elapsed();
    let out = containerd.run(&reference, "overlayfs", &[])?;
    let ready = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        stdout.lines().any(|l| l == "ready"),
        "the workload did not report ready; it printed: {stdout}"
    );
    let fetched = relay.bytes_down();
    println!("  workload said: {}", stdout.trim().replace('\n', " | "));
    let mut rows = vec![format!(
        "| containerd overlayfs | {} | {} | {} | {:.0}% |",
        secs(pulled),
        secs(ready),
        mib(fetched),
        100.0 * fetched as f64 / size as f64
    )];

    if let Some(pronto) = &args.pronto {
        rows.push(lazy_start(
            pronto,
            work.path(),
            &reference,
            &relay,
            size,
            &args,
        )?);
    }
    println!();
    println!("| system | pull / mount | pull to ready | fetched from registry | share of image |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!("{row}");
    }
    Ok(())
}

/// The same workload started lazily: index the image once (as its owner
/// would), then mount it with `pronto mount` and run the workload in a
/// chroot of the mount. (Through containerd once the snapshotter lands.)
fn lazy_start(
    pronto: &std::path::Path,
    work: &std::path::Path,
    reference: &str,
    relay: &Relay,
    size: u64,
    args: &Args,
) -> Result<String> {
    use std::process::Command;
    let config = work.join("pronto.toml");
    std::fs::write(
        &config,
        format!(
            "root = \"{}\"\n[registry]\nhosts_dir = \"{}\"\n[fetch]\nbackground = false\n",
            work.join("pronto-root").display(),
            work.join("hosts").display()
        ),
    )?;
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new(pronto)
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "pronto {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    println!("\nindexing the image once (pronto index create --push)...");
    run(&["index", "create", reference, "--push"])?;
    println!("cold start with pronto mount (lazy FUSE mount, workload in a chroot):");
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    relay.reset();
    let started = Instant::now();
    let log = std::fs::File::create(work.join("mount.log"))?;
    let mut child = Command::new(pronto)
        .arg("--config")
        .arg(&config)
        .args(["mount", reference])
        .arg(&mnt)
        .stderr(log)
        .spawn()?;
    let target = mnt.to_string_lossy().into_owned();
    while !std::fs::read_to_string("/proc/self/mountinfo")?
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
    {
        ensure!(
            child.try_wait()?.is_none(),
            "pronto mount exited; see {}",
            work.join("mount.log").display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mounted = started.elapsed();
    let script = format!(
        "head -c {} /models/weights-0.bin | wc -c; echo ready",
        args.read_mib * 1024 * 1024
    );
    let out = Command::new("chroot")
        .arg(&mnt)
        .args(["/bin/sh", "-c", &script])
        .output()?;
    let ready = started.elapsed();
    let fetched = relay.bytes_down();
    let _ = run(&["umount", &target]);
    if std::env::var_os("PRONTO_DEMO_KEEP_LOG").is_some() {
        let _ = std::fs::copy(work.join("mount.log"), "/tmp/pronto-demo-mount.log");
    }
    let _ = child.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected = (args.read_mib * 1024 * 1024).to_string();
    ensure!(
        stdout.lines().any(|l| l == "ready") && stdout.lines().any(|l| l.trim() == expected),
        "the lazy workload did not read its data: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("  workload said: {}", stdout.trim().replace('\n', " | "));
    Ok(format!(
        "| Pronto lazy (pronto mount) | {} | {} | {} | {:.1}% |",
        secs(mounted),
        secs(ready),
        mib(fetched),
        100.0 * fetched as f64 / size as f64
    ))
}

/// A busybox userland, then one layer per model file: the shape of an
/// inference image whose weights dwarf its code.
fn build_image(args: &Args, layout: &OciLayout) -> Result<pronto_testbed::image::BuiltImage> {
    let file_size = args.size_mib * 1024 * 1024 / args.files;
    let mut builder = ImageBuilder::new().layer(
        Layer::busybox(&["sh", "head", "wc", "echo"])
            .dir("models")
            .file("etc/model.conf", "name=demo\n"),
    );
    for i in 0..args.files {
        builder = builder.layer(
            Layer::new().compression(Compression::FAST).entry(
                Entry::file(
                    format!("models/weights-{i}.bin"),
                    Content::random(i, file_size),
                )
                .mode(0o444),
            ),
        );
    }
    let script = format!(
        "head -c {} /models/weights-0.bin | wc -c; echo ready",
        args.read_mib * 1024 * 1024
    );
    builder
        .cmd(&["/bin/sh", "-c", &script])
        .build(layout)
        .context("build the demo image")
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}
