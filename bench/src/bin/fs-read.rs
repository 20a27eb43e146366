//! The lazy filesystem on this machine: time to mount and to the first
//! byte, a sequential read of a fully local 1 GiB file against the same
//! file on local disk, `stat` of every path of a 20,000-file tree against
//! overlayfs, and the memory of the mount process. Needs root and FUSE.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use pronto_bench::{drop_caches, footprint, walk};
use pronto_testbed::{Compression, Content, ImageBuilder, Layer, OciLayout, Registry};

#[derive(Debug, Parser)]
#[command(about = "Lazy filesystem: mount, first byte, sequential read, metadata walk, memory")]
struct Args {
    /// Size of the large file in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Number of small files in the metadata layer.
    #[arg(long, default_value_t = 20_000)]
    files: usize,
    /// The pronto binary to run.
    #[arg(long, default_value = "target/release/pronto")]
    pronto: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::Builder::new()
        .prefix("pronto-bench-fs-")
        .tempdir()?;
    let w = work.path();
    println!("machine: {}\n", pronto_bench::machine());
    let layout = OciLayout::create(&w.join("layout"))?;
    let big = Content::random(7, args.size_mib << 20);
    let image = ImageBuilder::new()
        .layer(
            Layer::new()
                .compression(Compression::FAST)
                .file("big.bin", big.clone()),
        )
        .layer(
            Layer::new()
                .compression(Compression::Gzip(6))
                .many_text_files("files", args.files),
        )
        .build(&layout)?;
    layout.tag("v1", &image)?;
    let registry = Registry::start()?;
    let reference = registry.push(&layout, "v1", "bench/fs:v1")?;
    std::fs::write(
        w.join("config.toml"),
        format!(
            "root = \"{}\"\n[registry]\nhosts_dir = \"{}\"\n[fetch]\nbackground = false\n[cache]\nbudget = \"8GiB\"\n",
            w.join("root").display(),
            w.join("hosts").display()
        ),
    )?;
    let pronto = |args_: &[&str]| -> Result<()> {
        let out = Command::new(&args.pronto)
            .arg("--config")
            .arg(w.join("config.toml"))
            .args(args_)
            .output()
            .context("run pronto")?;
        if !out.status.success() {
            bail!("pronto {args_:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    pronto(&["index", "create", &reference, "--bind"])?;

    // Mount and first byte, cold.
    let mnt = w.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    drop_caches();
    let started = Instant::now();
    let mut child = spawn_mount(&args.pronto, w, &reference, &mnt, "info")?;
    wait_mounted(&mnt, &mut child)?;
    let mount_time = started.elapsed();
    let started = Instant::now();
    let mut first = [0u8; 4096];
    std::io::Read::read_exact(&mut std::fs::File::open(mnt.join("big.bin"))?, &mut first)?;
    let ttfb = started.elapsed();
    let rss_mounted = footprint(child.id())?.1;

    // Metadata walk, cold, against overlayfs over the extracted layer.
    drop_caches();
    let (walk_pronto, count) = walk(&mnt.join("files"))?;
    let rss_walked = footprint(child.id())?.1;
    let extracted = w.join("extracted");
    let empty = w.join("empty");
    let overlay = w.join("overlay");
    for dir in [&extracted, &empty, &overlay] {
        std::fs::create_dir_all(dir)?;
    }
    let status = Command::new("tar")
        .arg("-xf")
        .arg(layout.blob_path(&image.layers[1].digest))
        .arg("-C")
        .arg(&extracted)
        .status()?;
    if !status.success() {
        bail!("tar failed");
    }
    let status = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!(
            "lowerdir={}:{}",
            extracted.display(),
            empty.display()
        ))
        .arg(&overlay)
        .status()?;
    if !status.success() {
        bail!("overlay mount failed");
    }
    drop_caches();
    let (walk_overlay, _) = walk(&overlay.join("files"))?;
    let _ = Command::new("umount").arg(&overlay).status();
    stop_mount(&args.pronto, w, &mnt, child)?;

    // Sequential read of the large file once all of it is local.
    std::fs::write(
        w.join("config.toml"),
        std::fs::read_to_string(w.join("config.toml"))?.replace(
            "background = false",
            "background = true\nbackground_rate = \"0\"",
        ),
    )?;
    let mut child = spawn_mount(&args.pronto, w, &reference, &mnt, "info")?;
    wait_mounted(&mnt, &mut child)?;
    let log = w.join("mount.log");
    let deadline = Instant::now() + Duration::from_secs(600);
    // "mounted … : N of M layers lazy": each lazy layer logs when complete.
    let lazy: usize = std::fs::read_to_string(&log)?
        .split(" of ")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    while std::fs::read_to_string(&log)?
        .matches("fetched completely")
        .count()
        < lazy
    {
        if Instant::now() > deadline {
            bail!("background fetch did not finish");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The first open makes the passthrough copy; measure the second.
    std::fs::File::open(mnt.join("big.bin"))?;
    drop_caches();
    let (read_pronto, bytes) = read_all(&mnt.join("big.bin"))?;
    let passthrough = std::fs::read_to_string(&log)?.contains("passthrough=true");
    let local = w.join("local-big.bin");
    std::io::copy(&mut big.reader()?, &mut std::fs::File::create(&local)?)?;
    drop_caches();
    let (read_local, _) = read_all(&local)?;
    stop_mount(&args.pronto, w, &mnt, child)?;

    let mib = bytes as f64 / (1 << 20) as f64;
    println!("| measurement | Pronto | reference |");
    println!("|---|---|---|");
    println!(
        "| mount (resolve, find index, fetch prefixes, FUSE) | {:.0} ms | – |",
        ms(mount_time)
    );
    println!(
        "| first 4 KiB of the lazy {} MiB file (cold) | {:.0} ms | – |",
        args.size_mib,
        ms(ttfb)
    );
    println!(
        "| sequential read, {mib:.0} MiB fully local, page cache dropped{} | {:.2} s ({:.0} MiB/s) | local disk: {:.2} s ({:.0} MiB/s) → {:.2}× |",
        if passthrough { ", passthrough" } else { "" },
        read_pronto.as_secs_f64(),
        mib / read_pronto.as_secs_f64(),
        read_local.as_secs_f64(),
        mib / read_local.as_secs_f64(),
        read_local.as_secs_f64() / read_pronto.as_secs_f64()
    );
    println!(
        "| find + stat of {count} paths, cold | {:.0} ms | overlayfs: {:.0} ms |",
        ms(walk_pronto),
        ms(walk_overlay)
    );
    println!(
        "| mount process memory (RSS) | {:.1} MiB mounted, {:.1} MiB after the walk | – |",
        rss_mounted as f64 / 1024.0,
        rss_walked as f64 / 1024.0
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn spawn_mount(pronto: &Path, w: &Path, reference: &str, mnt: &Path, log: &str) -> Result<Child> {
    let out = std::fs::File::create(w.join("mount.log"))?;
    Ok(Command::new(pronto)
        .arg("--config")
        .arg(w.join("config.toml"))
        .args(["mount", reference])
        .arg(mnt)
        .env("PRONTO_LOG", log)
        .stderr(out)
        .spawn()?)
}

fn wait_mounted(mnt: &Path, child: &mut Child) -> Result<()> {
    let target = mnt.to_string_lossy().into_owned();
    for _ in 0..6000 {
        if std::fs::read_to_string("/proc/self/mountinfo")?
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
        {
            return Ok(());
        }
        if child.try_wait()?.is_some() {
            bail!("pronto mount exited");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    bail!("not mounted in time")
}

fn stop_mount(pronto: &Path, w: &Path, mnt: &Path, mut child: Child) -> Result<()> {
    let _ = Command::new(pronto)
        .arg("--config")
        .arg(w.join("config.toml"))
        .arg("umount")
        .arg(mnt)
        .output();
    child.wait()?;
    Ok(())
}

fn read_all(path: &Path) -> Result<(Duration, u64)> {
    let started = Instant::now();
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = std::io::Read::read(&mut file, &mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    Ok((started.elapsed(), total))
}
