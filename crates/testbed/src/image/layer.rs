//! One image layer described entry by entry, and its serialisation to a
//! (compressed) tar stream.

use std::io::{self, Write};
use std::path::Path;

use anyhow::{Context, Result};
use flate2::write::GzEncoder;
use tar::{EntryType, Header};

use super::content::Content;
use super::digest::Digested;

/// Modification time given to entries unless set, so builds are reproducible.
pub const DEFAULT_MTIME: u64 = 1_700_000_000;

/// The kind of a tar entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File(Content),
    Symlink(String),
    /// A hard link to another path of the same layer.
    Hardlink(String),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

/// One tar entry with its metadata. Paths are relative, as in image layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: String,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    /// Extended attributes, written as `SCHILY.xattr.*` PAX records.
    pub xattrs: Vec<(String, Vec<u8>)>,
}

impl Entry {
    fn new(path: impl Into<String>, kind: EntryKind, mode: u32) -> Self {
        Self {
            path: path.into(),
            kind,
            mode,
            uid: 0,
            gid: 0,
            mtime: DEFAULT_MTIME,
            xattrs: Vec::new(),
        }
    }

    pub fn dir(path: impl Into<String>) -> Self {
        Self::new(path, EntryKind::Dir, 0o755)
    }

    pub fn file(path: impl Into<String>, content: impl Into<Content>) -> Self {
        Self::new(path, EntryKind::File(content.into()), 0o644)
    }

    pub fn symlink(path: impl Into<String>, target: impl Into<String>) -> Self {
        Self::new(path, EntryKind::Symlink(target.into()), 0o777)
    }

    pub fn hardlink(path: impl Into<String>, target: impl Into<String>) -> Self {
        Self::new(path, EntryKind::Hardlink(target.into()), 0o644)
    }

    pub fn char_device(path: impl Into<String>, major: u32, minor: u32) -> Self {
        Self::new(path, EntryKind::CharDevice { major, minor }, 0o666)
    }

    pub fn block_device(path: impl Into<String>, major: u32, minor: u32) -> Self {
        Self::new(path, EntryKind::BlockDevice { major, minor }, 0o660)
    }

    pub fn fifo(path: impl Into<String>) -> Self {
        Self::new(path, EntryKind::Fifo, 0o644)
    }

    /// The OCI whiteout for `path`: an empty file `.wh.<name>` beside it,
    /// which hides `path` of lower layers.
    pub fn whiteout(path: &str) -> Self {
        let (parent, name) = split_parent(path);
        Self::file(format!("{parent}.wh.{name}"), Content::Bytes(Vec::new()))
    }

    /// The OCI opaque marker for directory `dir`: lower layers' children of
    /// `dir` are hidden.
    pub fn opaque(dir: &str) -> Self {
        let dir = dir.trim_end_matches('/');
        Self::file(format!("{dir}/.wh..wh..opq"), Content::Bytes(Vec::new()))
    }

    pub fn mode(mut self, mode: u32) -> Self {
        self.mode = mode;
        self
    }

    pub fn owner(mut self, uid: u64, gid: u64) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    pub fn mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    pub fn xattr(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.xattrs.push((name.into(), value.into()));
        self
    }
}

fn split_parent(path: &str) -> (&str, &str) {
    let path = path.trim_end_matches('/');
    match path.rfind('/') {
        Some(i) => (&path[..=i], &path[i + 1..]),
        None => ("", path),
    }
}

/// How a layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain tar (`application/vnd.oci.image.layer.v1.tar`).
    None,
    /// gzip at this level, 0–9 (`…tar+gzip`). Registries mostly hold
    /// level 6, the default of Docker and BuildKit.
    Gzip(u32),
    /// zstd at this level, 1–19 (`…tar+zstd`), one frame.
    Zstd(i32),
}

impl Compression {
    /// The fastest gzip level that still stores incompressible data as is,
    /// for large generated layers. (zlib-rs level 1 uses quick deflate, which
    /// grows random data by about 5%; level 2 is barely slower than level 1
    /// and keeps it at 1.000.)
    pub const FAST: Compression = Compression::Gzip(2);

    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip(_) => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd(_) => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }
}

/// How names longer than the ustar header holds are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LongNames {
    /// PAX `path`/`linkpath` records, as Go's archive/tar (Docker,
    /// BuildKit) writes them.
    Pax,
    /// GNU `././@LongLink` entries, as GNU tar writes them.
    Gnu,
}

/// A layer under construction: entries in the order they go into the tar.
#[derive(Debug, Clone)]
pub struct Layer {
    pub entries: Vec<Entry>,
    pub compression: Compression,
    pub long_names: LongNames,
}

impl Default for Layer {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            compression: Compression::Gzip(6),
            long_names: LongNames::Pax,
        }
    }
}

/// Sizes and digests of a written layer blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerDigests {
    /// Digest of the blob as stored (compressed).
    pub digest: String,
    pub size: u64,
    /// Digest of the uncompressed tar (the config's `diff_id`).
    pub diff_id: String,
    pub uncompressed_size: u64,
}

impl Layer {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn entry(mut self, entry: Entry) -> Self {
        self.entries.push(entry);
        self
    }

    pub fn dir(self, path: &str) -> Self {
        self.entry(Entry::dir(path))
    }

    pub fn file(self, path: &str, content: impl Into<Content>) -> Self {
        self.entry(Entry::file(path, content))
    }

    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.entry(Entry::symlink(path, target))
    }

    pub fn hardlink(self, path: &str, target: &str) -> Self {
        self.entry(Entry::hardlink(path, target))
    }

    pub fn whiteout(self, path: &str) -> Self {
        self.entry(Entry::whiteout(path))
    }

    pub fn opaque(self, dir: &str) -> Self {
        self.entry(Entry::opaque(dir))
    }

    pub fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    pub fn long_names(mut self, long_names: LongNames) -> Self {
        self.long_names = long_names;
        self
    }

    /// A userland: the host's static busybox as `/bin/busybox` with
    /// `/bin/<applet>` symlinks, plus `/tmp`, `/proc`, `/sys`, `/dev` and
    /// `/etc` for runc.
    pub fn busybox(applets: &[&str]) -> Self {
        let mut layer = Layer::new();
        for dir in ["bin", "dev", "etc", "proc", "sys", "tmp"] {
            layer = layer.dir(dir);
        }
        layer = layer.entry(
            Entry::file(
                "bin/busybox",
                Content::HostFile(crate::prereq::BUSYBOX.into()),
            )
            .mode(0o755),
        );
        for applet in applets {
            layer = layer.symlink(&format!("bin/{applet}"), "busybox");
        }
        layer
    }

    /// `count` small files of 1–4 KiB under `dir`, spread over
    /// subdirectories of 100 files each.
    pub fn many_small_files(mut self, dir: &str, count: usize, seed: u64) -> Self {
        let dir = dir.trim_end_matches('/');
        self = self.dir(dir);
        for i in 0..count {
            if i % 100 == 0 {
                self = self.dir(&format!("{dir}/d{:04}", i / 100));
            }
            let len = 1024 + (seed.wrapping_add(i as u64) * 7919) % 3072;
            let path = format!("{dir}/d{:04}/f{i:06}", i / 100);
            self = self.file(&path, Content::random(seed.wrapping_add(i as u64), len));
        }
        self
    }

    /// `count` compressible text files (source-code-like lines, 1–8 KiB)
    /// under `dir`, 100 to a subdirectory.
    pub fn many_text_files(mut self, dir: &str, count: usize) -> Self {
        let dir = dir.trim_end_matches('/');
        for i in 0..count {
            if i % 100 == 0 {
                self = self.dir(&format!("{dir}/d{:04}", i / 100));
            }
            let lines = 20 + (i * 7919) % 200;
            let text: String = (0..lines)
                .map(|l| {
                    format!(
                        "    let value_{l} = compute({i}, {l}) + offset_{};\n",
                        l % 13
                    )
                })
                .collect();
            self = self.file(&format!("{dir}/d{:04}/m{i:06}.rs", i / 100), text);
        }
        self
    }

    /// A layer holding the tree below `root` on the host, as `tar -c`
    /// would: directories, files, symlinks, hardlinks (by inode), devices
    /// and FIFOs, with modes, owners, mtimes and xattrs. Sockets are
    /// skipped. Paths are relative to `root`, in sorted order.
    pub fn from_dir(root: &std::path::Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let mut layer = Layer::new();
        let mut inodes: std::collections::HashMap<(u64, u64), String> = Default::default();
        let mut stack = vec![root.to_path_buf()];
        let mut paths = Vec::new();
        while let Some(dir) = stack.pop() {
            let mut children: Vec<_> = std::fs::read_dir(&dir)?.collect::<std::io::Result<_>>()?;
            children.sort_by_key(|e| e.file_name());
            for child in children.iter().rev() {
                let path = child.path();
                if child.file_type()?.is_dir() {
                    stack.push(path.clone());
                }
            }
            for child in children {
                paths.push(child.path());
            }
        }
        paths.sort();
        for path in paths {
            let meta = std::fs::symlink_metadata(&path)?;
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            let kind = meta.file_type();
            let mut entry = if kind.is_dir() {
                Entry::dir(rel.clone())
            } else if kind.is_symlink() {
                Entry::symlink(
                    rel.clone(),
                    std::fs::read_link(&path)?.to_string_lossy().into_owned(),
                )
            } else if kind.is_file() {
                let id = (meta.dev(), meta.ino());
                if meta.nlink() > 1 {
                    if let Some(first) = inodes.get(&id) {
                        let link = Entry::hardlink(rel.clone(), first.clone());
                        layer = layer.entry(
                            link.mode(meta.mode() & 0o7777)
                                .owner(meta.uid().into(), meta.gid().into())
                                .mtime(meta.mtime() as u64),
                        );
                        continue;
                    }
                    inodes.insert(id, rel.clone());
                }
                Entry::file(rel.clone(), Content::HostFile(path.clone()))
            } else if kind.is_char_device() || kind.is_block_device() {
                let (major, minor) = (
                    nix::sys::stat::major(meta.rdev()) as u32,
                    nix::sys::stat::minor(meta.rdev()) as u32,
                );
                if kind.is_char_device() {
                    Entry::char_device(rel.clone(), major, minor)
                } else {
                    Entry::block_device(rel.clone(), major, minor)
                }
            } else if kind.is_fifo() {
                Entry::fifo(rel.clone())
            } else {
                continue;
            };
            entry = entry
                .mode(meta.mode() & 0o7777)
                .owner(meta.uid().into(), meta.gid().into())
                .mtime(meta.mtime().max(0) as u64);
            if !kind.is_symlink()
                && let Ok(names) = xattr::list(&path)
            {
                for name in names {
                    if let Ok(Some(value)) = xattr::get(&path, &name) {
                        entry = entry.xattr(name.to_string_lossy().into_owned(), value);
                    }
                }
            }
            layer = layer.entry(entry);
        }
        Ok(layer)
    }

    /// Writes the layer blob to `out` and returns its digests.
    pub fn write<W: Write>(&self, out: W) -> Result<LayerDigests> {
        match self.compression {
            Compression::None => {
                let (mut out, digest, size) = self.write_tar(Digested::new(out))?.finish();
                out.flush()?;
                Ok(LayerDigests {
                    diff_id: digest.clone(),
                    uncompressed_size: size,
                    digest,
                    size,
                })
            }
            Compression::Gzip(level) => self.write_compressed(
                GzEncoder::new(Digested::new(out), flate2::Compression::new(level)),
                |gz| gz.finish().context("finish the gzip stream"),
            ),
            Compression::Zstd(level) => self
                .write_compressed(zstd::Encoder::new(Digested::new(out), level)?, |zstd| {
                    zstd.finish().context("finish the zstd frame")
                }),
        }
    }

    /// Writes the tar through `encoder` (over the digested output) and
    /// `finish`es it.
    fn write_compressed<W: Write, E: Write>(
        &self,
        encoder: E,
        finish: impl FnOnce(E) -> Result<Digested<W>>,
    ) -> Result<LayerDigests> {
        let (encoder, diff_id, uncompressed_size) =
            self.write_tar(Digested::new(encoder))?.finish();
        let (mut out, digest, size) = finish(encoder)?.finish();
        out.flush()?;
        Ok(LayerDigests {
            digest,
            size,
            diff_id,
            uncompressed_size,
        })
    }

    /// Writes the tar stream (with its end-of-archive blocks) into `out`.
    fn write_tar<W: Write>(&self, out: W) -> Result<W> {
        let mut tar = tar::Builder::new(out);
        for entry in &self.entries {
            self.append(&mut tar, entry)
                .with_context(|| format!("write tar entry {:?}", entry.path))?;
        }
        Ok(tar.into_inner()?)
    }

    fn append<W: Write>(&self, tar: &mut tar::Builder<W>, entry: &Entry) -> Result<()> {
        let mut header = match self.long_names {
            LongNames::Pax => Header::new_ustar(),
            LongNames::Gnu => Header::new_gnu(),
        };
        let (entry_type, size) = match &entry.kind {
            EntryKind::Dir => (EntryType::Directory, 0),
            EntryKind::File(content) => (EntryType::Regular, content.len()?),
            EntryKind::Symlink(_) => (EntryType::Symlink, 0),
            EntryKind::Hardlink(_) => (EntryType::Link, 0),
            EntryKind::CharDevice { .. } => (EntryType::Char, 0),
            EntryKind::BlockDevice { .. } => (EntryType::Block, 0),
            EntryKind::Fifo => (EntryType::Fifo, 0),
        };
        header.set_entry_type(entry_type);
        header.set_size(size);
        header.set_mode(entry.mode);
        header.set_uid(entry.uid);
        header.set_gid(entry.gid);
        header.set_mtime(entry.mtime);
        if let EntryKind::CharDevice { major, minor } | EntryKind::BlockDevice { major, minor } =
            entry.kind
        {
            header.set_device_major(major)?;
            header.set_device_minor(minor)?;
        }
        let path = match entry.kind {
            EntryKind::Dir => format!("{}/", entry.path.trim_end_matches('/')),
            _ => entry.path.clone(),
        };
        let link = match &entry.kind {
            EntryKind::Symlink(target) | EntryKind::Hardlink(target) => Some(target.as_str()),
            _ => None,
        };

        let mut pax: Vec<(String, Vec<u8>)> = entry
            .xattrs
            .iter()
            .map(|(name, value)| (format!("SCHILY.xattr.{name}"), value.clone()))
            .collect();
        if self.long_names == LongNames::Pax {
            if header.set_path(&path).is_err() {
                pax.push(("path".into(), path.clone().into_bytes()));
                set_truncated_name(&mut header, &path);
            }
            if let Some(target) = link
                && header.set_link_name(target).is_err()
            {
                pax.push(("linkpath".into(), target.as_bytes().to_vec()));
                set_truncated_link(&mut header, target);
            }
        }
        if !pax.is_empty() {
            tar.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }

        let mut data: Box<dyn io::Read> = match &entry.kind {
            EntryKind::File(content) => content.reader()?,
            _ => Box::new(io::empty()),
        };
        match (self.long_names, link) {
            (LongNames::Pax, _) => {
                header.set_cksum();
                tar.append(&header, &mut data)?;
            }
            (LongNames::Gnu, Some(target)) => tar.append_link(&mut header, &path, target)?,
            (LongNames::Gnu, None) => tar.append_data(&mut header, Path::new(&path), &mut data)?,
        }
        Ok(())
    }
}

/// Puts the first 100 bytes of `path` in the ustar name field; the PAX
/// `path` record written before the header carries the full name.
fn set_truncated_name(header: &mut Header, path: &str) {
    let field = &mut header.as_old_mut().name;
    let n = path.len().min(field.len());
    field.fill(0);
    field[..n].copy_from_slice(&path.as_bytes()[..n]);
}

fn set_truncated_link(header: &mut Header, target: &str) {
    let field = &mut header.as_old_mut().linkname;
    let n = target.len().min(field.len());
    field.fill(0);
    field[..n].copy_from_slice(&target.as_bytes()[..n]);
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn read_back(layer: &Layer) -> Vec<(String, EntryType, Vec<u8>, Option<String>)> {
        let mut blob = Vec::new();
        let digests = layer.write(&mut blob).unwrap();
        assert_eq!(digests.size, blob.len() as u64);
        assert_eq!(digests.digest, super::super::digest::sha256(&blob));
        let tar_bytes = match layer.compression {
            Compression::None => blob,
            Compression::Gzip(_) => {
                let mut out = Vec::new();
                flate2::read::GzDecoder::new(blob.as_slice())
                    .read_to_end(&mut out)
                    .unwrap();
                out
            }
            Compression::Zstd(_) => zstd::decode_all(blob.as_slice()).unwrap(),
        };
        assert_eq!(digests.diff_id, super::super::digest::sha256(&tar_bytes));
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().display().to_string();
                let path = path.trim_end_matches('/').to_owned();
                let kind = e.header().entry_type();
                let link = e.link_name().unwrap().map(|l| l.display().to_string());
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, kind, data, link)
            })
            .collect()
    }

    #[test]
    fn entries_round_trip_through_tar() {
        let long = format!("deep/{}/{}", "d".repeat(120), "f".repeat(200));
        for (long_names, compression) in [
            (LongNames::Pax, Compression::Gzip(1)),
            (LongNames::Gnu, Compression::None),
            (LongNames::Pax, Compression::Zstd(3)),
        ] {
            let layer = Layer::new()
                .compression(compression)
                .long_names(long_names)
                .dir("etc")
                .file(
                    "etc/hello",
                    "hi
",
                )
                .symlink("etc/link", "hello")
                .hardlink("etc/hard", "etc/hello")
                .whiteout("etc/gone")
                .opaque("var")
                .file(&long, Content::random(1, 5000))
                .symlink("longlink", &long);
            let entries = read_back(&layer);
            let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
            assert_eq!(
                names,
                [
                    "etc",
                    "etc/hello",
                    "etc/link",
                    "etc/hard",
                    "etc/.wh.gone",
                    "var/.wh..wh..opq",
                    long.as_str(),
                    "longlink"
                ],
                "{long_names:?}"
            );
            assert_eq!(
                entries[1].2,
                b"hi
"
            );
            assert_eq!(entries[3].1, EntryType::Link);
            assert_eq!(entries[3].3.as_deref(), Some("etc/hello"));
            assert_eq!(entries[6].2, Content::random(1, 5000).to_vec().unwrap());
            assert_eq!(entries[7].3.as_deref(), Some(long.as_str()));
        }
    }

    #[test]
    fn xattrs_are_pax_records() {
        let layer = Layer::new().entry(Entry::file("f", "x").xattr("user.pronto", b"v1".to_vec()));
        let mut blob = Vec::new();
        layer.write(&mut blob).unwrap();
        let tar_bytes = {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(blob.as_slice())
                .read_to_end(&mut out)
                .unwrap();
            out
        };
        let mut archive = tar::Archive::new(tar_bytes.as_slice());
        let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
        let records: Vec<(String, Vec<u8>)> = entry
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                (r.key().unwrap().to_owned(), r.value_bytes().to_vec())
            })
            .collect();
        assert_eq!(
            records,
            [("SCHILY.xattr.user.pronto".to_owned(), b"v1".to_vec())]
        );
    }

    #[test]
    fn whiteout_names() {
        assert_eq!(Entry::whiteout("a/b/c").path, "a/b/.wh.c");
        assert_eq!(Entry::whiteout("top").path, ".wh.top");
        assert_eq!(Entry::opaque("a/b/").path, "a/b/.wh..wh..opq");
    }
}
