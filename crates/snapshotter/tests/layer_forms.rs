//! One layer, two forms: the lazy tree a FUSE mount serves for an overlay
//! lower directory (from the layer's index, or from a chunked layer's TOC)
//! and the directory the parallel pull unpacks must be the same tree —
//! same entries, types, modes, owners, sizes, link targets, devices, link
//! counts and overlay markers — for every kind of layer and compression
//! (tar, gzip, zstd, eStargz, zstd:chunked), whiteouts and odd markers
//! included.

use std::collections::BTreeMap;
use std::path::Path;

use pronto_fs::{NodeKind, ROOT, Tree, TreeMode};
use pronto_index::{LayerCompression, LayerIndex, LayerToIndex, build_index};
use pronto_snapshotter::unpack::unpack;
use pronto_testbed::tree::{SnapshotOptions, snapshot};
use pronto_testbed::{Compression, Content, Entry, Layer, Prereq, require};

/// What both forms must agree on, per path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attrs {
    kind: &'static str,
    mode: u32,
    owner: (u32, u32),
    size: u64,
    link: Vec<u8>,
    rdev: u64,
    nlink: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn layers() -> Vec<(&'static str, Layer)> {
    vec![
        (
            "files, links and devices",
            Layer::new()
                .dir("etc")
                .entry(Entry::file("etc/passwd", "root:x:0:0\n").mode(0o600))
                .entry(Entry::file("bin/tool", Content::random(3, 70_000)).mode(0o4755))
                .entry(Entry::file("data/owned", "x").owner(1000, 1001))
                .symlink("bin/link", "tool")
                .hardlink("bin/hard", "bin/tool")
                .entry(Entry::char_device("dev/null", 1, 3))
                .entry(Entry::block_device("dev/loop0", 7, 0))
                .entry(Entry::fifo("run/pipe"))
                .entry(Entry::file("data/attr", "a").xattr("user.note", b"kept".to_vec())),
        ),
        (
            "whiteouts and opaque directories",
            Layer::new()
                .dir("keep")
                .opaque("keep")
                .file("keep/new", "new\n")
                .whiteout("gone")
                .whiteout("etc/.hidden")
                .file("etc/visible", "v"),
        ),
        (
            "markers that mean nothing to an overlay",
            Layer::new()
                .file(".wh..wh.plnk", "")
                .file("dir/.wh..wh.aufs", "")
                .file("dir/regular", "r"),
        ),
    ]
}

fn kind_name(kind: NodeKind) -> &'static str {
    match kind {
        NodeKind::Dir => "dir",
        NodeKind::File => "file",
        NodeKind::Symlink => "symlink",
        NodeKind::CharDevice => "char",
        NodeKind::BlockDevice => "block",
        NodeKind::Fifo => "fifo",
    }
}

fn child_path(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    }
}

fn lazy_tree(tree: &Tree) -> BTreeMap<String, Attrs> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(String::new(), ROOT)];
    while let Some((path, ino)) = stack.pop() {
        let node = tree.get(ino).unwrap();
        let kind = kind_name(node.kind);
        let mut xattrs = node.xattrs().to_vec();
        xattrs.sort();
        for (name, child) in tree.children(ino) {
            stack.push((child_path(&path, &name.to_string_lossy()), child));
        }
        if path.is_empty() {
            // The root itself, which the directory description leaves out.
            continue;
        }
        out.insert(
            path,
            Attrs {
                kind,
                mode: node.mode & 0o7777,
                owner: (node.uid, node.gid),
                size: if kind == "file" { node.size } else { 0 },
                link: node.link().to_vec(),
                rdev: u64::from(node.rdev),
                nlink: if kind == "dir" {
                    0
                } else {
                    u64::from(node.nlink)
                },
                xattrs,
            },
        );
    }
    out
}

/// The unpacked directory, through the harness's tree description.
fn unpacked_tree(root: &Path) -> BTreeMap<String, Attrs> {
    snapshot(root, SnapshotOptions::default())
        .unwrap()
        .into_iter()
        .map(|(path, info)| {
            let attrs = Attrs {
                kind: info.kind,
                mode: info.mode,
                owner: (info.uid, info.gid),
                size: if info.kind == "file" { info.size } else { 0 },
                link: info.link.unwrap_or_default().into_bytes(),
                rdev: info.rdev,
                nlink: if info.kind == "dir" { 0 } else { info.nlink },
                xattrs: info
                    .xattrs
                    .into_iter()
                    .filter(|(n, _)| n.starts_with("user.") || n.starts_with("trusted."))
                    .collect(),
            };
            (path, attrs)
        })
        .collect()
}

#[test]
fn the_lazy_tree_and_the_unpacked_directory_are_the_same() {
    require!(&[Prereq::Root]);
    for (what, layer) in layers() {
        for form in [
            Form::Indexed(Compression::Gzip(6)),
            Form::Indexed(Compression::None),
            Form::Chunked(LayerCompression::Gzip),
            Form::Chunked(LayerCompression::Zstd),
        ] {
            let (blob, format, entries) = form.of(&layer);
            let tree = Tree::build(&[&entries], TreeMode::OverlayLower);

            let dir = tempfile::tempdir().unwrap();
            let unpacked = dir.path().join("layer");
            std::fs::create_dir(&unpacked).unwrap();
            unpack(blob.as_slice(), format, &unpacked, 0).unwrap();
            // A plain zstd layer unpacks to the same directory.
            if form == Form::Chunked(LayerCompression::Zstd) {
                let mut plain = Vec::new();
                layer
                    .clone()
                    .compression(Compression::Zstd(3))
                    .write(&mut plain)
                    .unwrap();
                let again = dir.path().join("plain");
                std::fs::create_dir(&again).unwrap();
                unpack(plain.as_slice(), LayerCompression::Zstd, &again, 0).unwrap();
                assert_eq!(unpacked_tree(&again), unpacked_tree(&unpacked), "{what}");
            }

            let (lazy, unpacked) = (lazy_tree(&tree), unpacked_tree(&unpacked));
            if what.starts_with("whiteouts") {
                // The overlay forms really are there.
                assert_eq!(lazy["gone"].kind, "char");
                assert_eq!(lazy["etc/.hidden"].kind, "char");
                let opaque = ("trusted.overlay.opaque".to_owned(), b"y".to_vec());
                assert_eq!(lazy["keep"].xattrs, [opaque]);
            }
            let paths = |t: &BTreeMap<String, Attrs>| t.keys().cloned().collect::<Vec<_>>();
            assert_eq!(paths(&lazy), paths(&unpacked), "{what}: the same paths");
            for (path, attrs) in &lazy {
                assert_eq!(
                    Some(attrs),
                    unpacked.get(path),
                    "{what} ({form:?}): {path:?}"
                );
            }
        }
    }
}

/// How a test layer reaches both forms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// Written with this compression and indexed.
    Indexed(Compression),
    /// Converted to a chunked layer with this compression; its entries
    /// come from its TOC.
    Chunked(LayerCompression),
}

impl Form {
    /// The layer's blob in this form, its compression and its entries.
    fn of(self, layer: &Layer) -> (Vec<u8>, LayerCompression, Vec<pronto_index::Entry>) {
        match self {
            Form::Indexed(compression) => {
                let mut blob = Vec::new();
                let digests = layer
                    .clone()
                    .compression(compression)
                    .write(&mut blob)
                    .unwrap();
                let format = LayerCompression::from_media_type(compression.media_type())
                    .expect("a layer media type");
                let target = LayerToIndex {
                    digest: digests.digest,
                    size: digests.size,
                    compression: format,
                };
                let mut index_blob = Vec::new();
                build_index(blob.as_slice(), &target, 64 * 1024, &mut index_blob).unwrap();
                let index = LayerIndex::parse(&index_blob).unwrap();
                (blob, format, index.meta().entries.clone())
            }
            Form::Chunked(compression) => {
                use std::io::Write as _;
                let mut tar = tempfile::tempfile().unwrap();
                let mut plain = Vec::new();
                layer
                    .clone()
                    .compression(Compression::None)
                    .write(&mut plain)
                    .unwrap();
                tar.write_all(&plain).unwrap();
                let options = pronto_toc::WriteOptions {
                    compression,
                    ..Default::default()
                };
                let mut blob = Vec::new();
                let converted = pronto_toc::write_chunked(&tar, &mut blob, &options).unwrap();
                let annotations = converted.annotations.iter().cloned().collect();
                let toc = pronto_toc::TocRef::of(converted.media_type, &annotations)
                    .unwrap()
                    .unwrap();
                let toc = pronto_toc::blob_toc(&blob, &toc, &Default::default()).unwrap();
                (blob, compression, toc.entries)
            }
        }
    }
}
