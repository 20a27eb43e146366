//! Images that exercise every kind of tar entry and overlay marker.

use super::{BuiltImage, Compression, Content, Entry, ImageBuilder, Layer, LongNames, OciLayout};

/// Two layers with what layer handling gets wrong: whiteouts, an opaque
/// directory, hard links, symlinks, a device, set-id bits, xattrs, owners,
/// GNU long names, deep paths and a few hundred small files.
pub fn edge_image(layout: &OciLayout) -> BuiltImage {
    let long_dir = format!("opt/{}", "d".repeat(120));
    let base = Layer::new()
        .compression(Compression::Gzip(6))
        .dir("etc")
        .file("etc/hosts", "127.0.0.1 localhost\n")
        .dir("data")
        .file("data/gone", "whited out\n")
        .dir("data/opaque")
        .file("data/opaque/old", "hidden by opaque\n")
        .dir("opt")
        .dir(&long_dir)
        .file(&format!("{long_dir}/{}", "f".repeat(200)), "long name\n")
        .entry(
            Entry::file("data/big", Content::random(1, 3 << 20))
                .mode(0o600)
                .owner(1000, 1000),
        )
        .many_small_files("data/small", 300, 5);
    let upper = Layer::new()
        .compression(Compression::Gzip(6))
        .long_names(LongNames::Gnu)
        .dir("data")
        .whiteout("data/gone")
        .dir("data/opaque")
        .opaque("data/opaque")
        .file("data/opaque/new", "new\n")
        .entry(Entry::file("data/model", Content::random(2, 2 << 20)).xattr("user.pronto", "yes"))
        .entry(Entry::hardlink("data/model-link", "data/model"))
        .symlink("data/sym", "opaque/new")
        .file("data/empty", "")
        .entry(Entry::char_device("data/tty", 5, 0))
        .entry(Entry::file("data/setuid", "x").mode(0o4755))
        .file("data/deep/a/b/c/d/e/f/g/leaf", "deep\n");
    ImageBuilder::new()
        .layer(base)
        .layer(upper)
        .build(layout)
        .expect("the edge-case image builds")
}

/// An inference-style image: a busybox userland, then one layer per model
/// file (`total_mib` of incompressible data split into `files`). Its
/// command reads `read_mib` from the first model file and prints `ready`.
pub fn model_image(
    layout: &OciLayout,
    total_mib: u64,
    files: u64,
    read_mib: u64,
) -> anyhow::Result<BuiltImage> {
    let script = format!(
        "head -c {} /models/weights-0.bin | wc -c; echo ready",
        read_mib * 1024 * 1024
    );
    model_image_running(layout, total_mib, files, &script)
}

/// The image of [`model_image`] (the same layers) with a model server's
/// start: every weight file read whole, in order, before `ready`.
pub fn model_server_image(
    layout: &OciLayout,
    total_mib: u64,
    files: u64,
) -> anyhow::Result<BuiltImage> {
    let script = "cat /models/weights-*.bin > /dev/null && echo ready";
    model_image_running(layout, total_mib, files, script)
}

/// A model image whose command is `script` (run by `/bin/sh -c`).
fn model_image_running(
    layout: &OciLayout,
    total_mib: u64,
    files: u64,
    script: &str,
) -> anyhow::Result<BuiltImage> {
    anyhow::ensure!(files > 0, "a model image needs at least one file");
    let file_size = total_mib * 1024 * 1024 / files;
    let mut builder = ImageBuilder::new().layer(
        Layer::busybox(&["sh", "head", "wc", "echo", "cat", "sha256sum"])
            .dir("models")
            .file("etc/model.conf", "name=demo\n"),
    );
    for i in 0..files {
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
    builder.cmd(&["/bin/sh", "-c", script]).build(layout)
}
