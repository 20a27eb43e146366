//! Unpacking a layer tar into a snapshot directory, safely, in the form
//! overlayfs expects of a lower directory: whiteouts become 0/0 character
//! devices, opaque markers become the `trusted.overlay.opaque` xattr.
//!
//! Layers are hostile input. An entry is rejected, and the whole layer with
//! it, when its path is absolute or has a `..` component, when a directory
//! on its path is not a real directory that this layer or its own entries
//! made (a symlink, say), or when it is a hard link to anything but a
//! non-directory entry earlier in the same layer. Nothing is ever opened
//! through a symlink: every parent is checked with `lstat` before an entry
//! is created, and the directory is private to the unpacker while it runs.
//! The error names the entry.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub use pronto_layer::Compression;
use pronto_layer::{Marker, OPAQUE_XATTR};

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// The layer is not acceptable: it would write outside its directory,
    /// or it is malformed.
    #[error("layer rejected: entry {entry:?}: {problem}")]
    Rejected { entry: String, problem: String },
    #[error("layer unreadable: {0}")]
    Read(String),
    /// Unpacking would leave less than the configured free space: the
    /// layer is larger than the node can hold, or a decompression bomb.
    #[error(
        "{path} has {free} bytes free, less than the {min_free} bytes Pronto keeps free (pull.min_free_space): the layer does not fit on this node"
    )]
    NoSpace {
        path: PathBuf,
        free: u64,
        min_free: u64,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What an unpack produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unpacked {
    /// `sha256:` digest of the uncompressed tar (the layer's diff ID).
    pub diff_id: String,
    pub entries: u64,
}

/// Unpacks the layer read from `blob` into `dir` (an empty directory).
/// Unpacks `blob` into `dir`, stopping with [`UnpackError::NoSpace`] when
/// the filesystem would have less than `min_free` bytes free (0: no check).
pub fn unpack(
    blob: impl Read,
    compression: Compression,
    dir: &Path,
    min_free: u64,
) -> Result<Unpacked, UnpackError> {
    let input = compression
        .decoder(blob)
        .map_err(|e| UnpackError::Read(format!("cannot start decompressing: {e}")))?;
    let mut hashing = HashingReader {
        inner: input,
        hasher: Sha256::new(),
    };
    let mut state = State {
        root: dir.to_owned(),
        made: HashSet::new(),
        dirs: Vec::new(),
        min_free,
        unchecked: 0,
        buffer: vec![0; COPY_BUFFER],
    };
    state.check_space()?;
    let mut entries = 0;
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let items = archive
            .entries()
            .map_err(|e| UnpackError::Read(e.to_string()))?;
        for item in items {
            let mut item = item.map_err(|e| UnpackError::Read(format!("bad tar header: {e}")))?;
            state.apply(&mut item)?;
            entries += 1;
        }
    }
    // The tar's end blocks are read; anything after them counts as well.
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| UnpackError::Read(e.to_string()))?;
    state.finish()?;
    Ok(Unpacked {
        diff_id: format!("sha256:{}", hex::encode(hashing.hasher.finalize())),
        entries,
    })
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

struct State {
    root: PathBuf,
    /// Relative paths of non-directory entries this layer made (hard link
    /// targets must be among them).
    made: HashSet<Vec<u8>>,
    /// Directories and their times, applied last (entries change them).
    dirs: Vec<(PathBuf, i64)>,
    /// Free space to leave on the filesystem of `root`.
    min_free: u64,
    /// File bytes written since free space was last checked.
    unchecked: u64,
    buffer: Vec<u8>,
}

/// File bytes written between two checks of the free space: small next to
/// any sensible `min_free`, large enough that the check costs nothing.
const CHECK_EVERY: u64 = 8 << 20;
const COPY_BUFFER: usize = 256 << 10;

/// `./a/b/` → `a/b` with every component checked.
fn clean(raw: &[u8]) -> Result<Vec<u8>, String> {
    if raw.first() == Some(&b'/') {
        return Err("absolute path".into());
    }
    let mut parts: Vec<&[u8]> = Vec::new();
    for component in raw.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err("path has a `..` component".into()),
            c => parts.push(c),
        }
    }
    Ok(parts.join(&b'/'))
}

fn write_error(path: &Path) -> impl FnOnce(io::Error) -> UnpackError + '_ {
    move |source| UnpackError::Write {
        path: path.to_owned(),
        source,
    }
}

impl State {
    fn reject(entry: &[u8], problem: impl Into<String>) -> UnpackError {
        UnpackError::Rejected {
            entry: String::from_utf8_lossy(entry).into_owned(),
            problem: problem.into(),
        }
    }

    /// The absolute path of relative `rel` after checking that every
    /// directory above it is a real directory (creating missing ones).
    fn parent_checked(&self, entry: &[u8], rel: &[u8]) -> Result<PathBuf, UnpackError> {
        let mut path = self.root.clone();
        let components: Vec<&[u8]> = rel.split(|b| *b == b'/').collect();
        for component in &components[..components.len() - 1] {
            path.push(OsStr::from_bytes(component));
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(Self::reject(
                        entry,
                        format!(
                            "{} on its path is not a directory (a symlink or file)",
                            path.strip_prefix(&self.root).unwrap_or(&path).display()
                        ),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    // As tar does: parents that have no entry of their own.
                    std::fs::create_dir(&path).map_err(write_error(&path))?;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                        .map_err(write_error(&path))?;
                }
                Err(e) => return Err(write_error(&path)(e)),
            }
        }
        path.push(OsStr::from_bytes(components[components.len() - 1]));
        Ok(path)
    }

    /// Removes whatever is at `path` (not a directory unless `dirs_too`).
    fn clear(path: &Path, keep_dir: bool) -> Result<(), UnpackError> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_dir() => {
                if !keep_dir {
                    std::fs::remove_dir_all(path).map_err(write_error(path))?;
                }
            }
            Ok(_) => std::fs::remove_file(path).map_err(write_error(path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(write_error(path)(e)),
        }
        Ok(())
    }

    /// Copies a file's data, checking the free space every
    /// [`CHECK_EVERY`] bytes written (counted across files).
    fn copy_checked(
        &mut self,
        from: &mut impl Read,
        to: &mut std::fs::File,
        path: &Path,
    ) -> Result<(), UnpackError> {
        loop {
            let n = match from.read(&mut self.buffer) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(UnpackError::Read(format!("{}: {e}", path.display()))),
            };
            to.write_all(&self.buffer[..n]).map_err(write_error(path))?;
            self.unchecked += n as u64;
            if self.unchecked >= CHECK_EVERY {
                self.unchecked = 0;
                self.check_space()?;
            }
        }
    }

    fn check_space(&self) -> Result<(), UnpackError> {
        if self.min_free == 0 {
            return Ok(());
        }
        let free = free_space(&self.root).map_err(write_error(&self.root))?;
        if free < self.min_free {
            return Err(UnpackError::NoSpace {
                path: self.root.clone(),
                free,
                min_free: self.min_free,
            });
        }
        Ok(())
    }

    fn apply<R: Read>(&mut self, item: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = item.path_bytes().into_owned();
        let rel = clean(&raw).map_err(|p| Self::reject(&raw, p))?;
        let header = item.header().clone();
        let kind = header.entry_type();
        if rel.is_empty() {
            // The root itself: only its metadata applies.
            if kind.is_dir() {
                self.metadata(&raw, &self.root.clone(), &header, item, true)?;
            }
            return Ok(());
        }
        let name = rel.rsplit(|b| *b == b'/').next().unwrap_or(&rel).to_vec();
        let path = self.parent_checked(&raw, &rel)?;
        let name_str = String::from_utf8_lossy(&name);
        match Marker::of(&name_str) {
            Marker::Entry => {}
            Marker::Ignored => return Ok(()),
            Marker::Opaque => {
                let dir = path.parent().expect("has a parent").to_owned();
                xattr::set(&dir, OPAQUE_XATTR, b"y").map_err(write_error(&dir))?;
                return Ok(());
            }
            Marker::Whiteout(hidden) => {
                let target = path.with_file_name(OsStr::from_bytes(hidden.as_bytes()));
                Self::clear(&target, false)?;
                nix::sys::stat::mknod(
                    &target,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    0,
                )
                .map_err(|e| write_error(&target)(e.into()))?;
                return Ok(());
            }
        }
        match kind {
            tar::EntryType::Directory => {
                match std::fs::symlink_metadata(&path) {
                    Ok(meta) if meta.file_type().is_dir() => {}
                    _ => {
                        Self::clear(&path, false)?;
                        std::fs::create_dir(&path).map_err(write_error(&path))?;
                    }
                }
                self.metadata(&raw, &path, &header, item, true)?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                Self::clear(&path, false)?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .custom_flags(libc_o_nofollow())
                    .mode(0o600)
                    .open(&path)
                    .map_err(write_error(&path))?;
                self.copy_checked(item, &mut file, &path)?;
                drop(file);
                self.made.insert(rel.clone());
                self.metadata(&raw, &path, &header, item, false)?;
            }
            tar::EntryType::Symlink => {
                let target = item
                    .link_name_bytes()
                    .ok_or_else(|| Self::reject(&raw, "symlink without a target"))?
                    .into_owned();
                Self::clear(&path, false)?;
                std::os::unix::fs::symlink(OsString::from_vec(target), &path)
                    .map_err(write_error(&path))?;
                self.made.insert(rel.clone());
                self.metadata(&raw, &path, &header, item, false)?;
            }
            tar::EntryType::Link => {
                let target_raw = item
                    .link_name_bytes()
                    .ok_or_else(|| Self::reject(&raw, "hard link without a target"))?
                    .into_owned();
                let target_rel = clean(&target_raw)
                    .map_err(|p| Self::reject(&raw, format!("hard link target: {p}")))?;
                if !self.made.contains(&target_rel) {
                    return Err(Self::reject(
                        &raw,
                        format!(
                            "hard link to {:?}, which is not an earlier file of this layer",
                            String::from_utf8_lossy(&target_raw)
                        ),
                    ));
                }
                let target = self.parent_checked(&raw, &target_rel)?;
                Self::clear(&path, false)?;
                std::fs::hard_link(&target, &path).map_err(write_error(&path))?;
                self.made.insert(rel.clone());
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                use nix::sys::stat::{Mode, SFlag, makedev, mknod};
                let flag = match kind {
                    tar::EntryType::Char => SFlag::S_IFCHR,
                    tar::EntryType::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                Self::clear(&path, false)?;
                mknod(
                    &path,
                    flag,
                    Mode::from_bits_truncate(0o600),
                    makedev(major.into(), minor.into()),
                )
                .map_err(|e| write_error(&path)(e.into()))?;
                self.made.insert(rel.clone());
                self.metadata(&raw, &path, &header, item, false)?;
            }
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader => {}
            other => {
                return Err(Self::reject(
                    &raw,
                    format!("unsupported entry type {other:?}"),
                ));
            }
        }
        Ok(())
    }

    /// Owner, mode, xattrs and times, never following a symlink.
    fn metadata<R: Read>(
        &mut self,
        raw: &[u8],
        path: &Path,
        header: &tar::Header,
        item: &mut tar::Entry<'_, R>,
        is_dir: bool,
    ) -> Result<(), UnpackError> {
        let uid = header
            .uid()
            .map_err(|e| Self::reject(raw, format!("bad uid: {e}")))?;
        let gid = header
            .gid()
            .map_err(|e| Self::reject(raw, format!("bad gid: {e}")))?;
        let uid = u32::try_from(uid).map_err(|_| Self::reject(raw, "uid out of range"))?;
        let gid = u32::try_from(gid).map_err(|_| Self::reject(raw, "gid out of range"))?;
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(write_error(path))?;
        let is_symlink = header.entry_type() == tar::EntryType::Symlink;
        if !is_symlink {
            let mode = header
                .mode()
                .map_err(|e| Self::reject(raw, format!("bad mode: {e}")))?;
            // After chown, which clears set-id bits.
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777))
                .map_err(write_error(path))?;
        }
        if let Ok(Some(records)) = item.pax_extensions() {
            for record in records.flatten() {
                let Ok(key) = record.key() else { continue };
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    if let Err(e) = xattr::set(path, name, record.value_bytes()) {
                        tracing::debug!("xattr {name} on {}: {e}", path.display());
                    }
                }
            }
        }
        let mtime = header.mtime().unwrap_or(0) as i64;
        if is_dir {
            self.dirs.push((path.to_owned(), mtime));
        } else {
            set_mtime(path, mtime)?;
        }
        Ok(())
    }

    fn finish(self) -> Result<(), UnpackError> {
        // Deepest first, so setting a child's time does not change its
        // parent's afterwards.
        let mut dirs = self.dirs;
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (path, mtime) in dirs {
            set_mtime(&path, mtime)?;
        }
        Ok(())
    }
}

fn set_mtime(path: &Path, mtime: i64) -> Result<(), UnpackError> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let t = TimeSpec::new(mtime, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| write_error(path)(e.into()))
}

fn libc_o_nofollow() -> i32 {
    nix::fcntl::OFlag::O_NOFOLLOW.bits()
}

/// Bytes an unprivileged writer may still write on the filesystem of
/// `path`.
pub fn free_space(path: &Path) -> std::io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(path)?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Name, type, link target and data of one raw tar entry.
    type RawEntry<'a> = (&'a str, tar::EntryType, &'a str, &'a [u8]);

    /// A tar with raw headers, so that hostile names can be written.
    fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, link, data) in entries {
            let mut header = tar::Header::new_gnu();
            let gnu = header.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
            gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_entry_type(*kind);
            header.set_size(data.len() as u64);
            header.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(1_700_000_000);
            header.set_cksum();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        layer: PathBuf,
        outside: PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let layer = dir.path().join("snapshot/fs");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(&layer).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        Fixture {
            _dir: dir,
            layer,
            outside,
        }
    }

    fn everything_below(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            out.push(e.path());
            if e.file_type().unwrap().is_dir() {
                out.extend(everything_below(&e.path()));
            }
        }
        out
    }

    #[test]
    fn hostile_layers_are_rejected_naming_the_entry_and_nothing_escapes() {
        pronto_testbed::require!(&[pronto_testbed::Prereq::Root]);
        use tar::EntryType as T;
        let cases: Vec<(&str, Vec<RawEntry<'_>>, &str)> = vec![
            (
                "dot-dot",
                vec![("a/../../outside/evil", T::Regular, "", b"x")],
                "a/../../outside/evil",
            ),
            (
                "absolute",
                vec![("/etc/evil", T::Regular, "", b"x")],
                "/etc/evil",
            ),
            (
                "symlinked parent",
                vec![
                    ("link", T::Symlink, "../../outside", b""),
                    ("link/evil", T::Regular, "", b"x"),
                ],
                "link/evil",
            ),
            (
                "symlinked parent (absolute target)",
                vec![
                    ("link", T::Symlink, "/", b""),
                    ("link/tmp/evil", T::Regular, "", b"x"),
                ],
                "link/tmp/evil",
            ),
            (
                "hard link outside the layer",
                vec![("evil", T::Link, "../../outside/secret", b"")],
                "evil",
            ),
            (
                "hard link to a file not in the layer",
                vec![("evil", T::Link, "etc/passwd", b"")],
                "evil",
            ),
            (
                "hard link through a symlink",
                vec![
                    ("dir", T::Symlink, "../../outside", b""),
                    ("evil", T::Link, "dir/secret", b""),
                ],
                "evil",
            ),
        ];
        for (what, entries, named) in cases {
            let f = fixture();
            std::fs::write(f.outside.join("secret"), "secret").unwrap();
            let err = unpack(raw_tar(&entries).as_slice(), Compression::None, &f.layer, 0)
                .expect_err(what);
            let message = err.to_string();
            assert!(
                matches!(err, UnpackError::Rejected { .. }) && message.contains(named),
                "{what}: {message}"
            );
            assert_eq!(
                everything_below(&f.outside),
                vec![f.outside.join("secret")],
                "{what}: something was written outside"
            );
            assert_eq!(std::fs::read(f.outside.join("secret")).unwrap(), b"secret");
        }
    }

    #[test]
    fn unpacking_stops_before_the_disk_is_full() {
        pronto_testbed::require!(&[pronto_testbed::Prereq::Root]);
        use tar::EntryType as T;
        let data = vec![0u8; 9 << 20];
        let tar = raw_tar(&[("big", T::Regular, "", data.as_slice())]);
        // More free space asked for than any disk has: refused, saying why.
        let f = fixture();
        let err = unpack(tar.as_slice(), Compression::None, &f.layer, u64::MAX).unwrap_err();
        assert!(matches!(err, UnpackError::NoSpace { .. }), "{err}");
        assert!(err.to_string().contains("pull.min_free_space"), "{err}");
        // A reserve the disk has: the check (after 8 MiB) passes.
        let f = fixture();
        unpack(tar.as_slice(), Compression::None, &f.layer, 1).unwrap();
        assert_eq!(std::fs::read(f.layer.join("big")).unwrap(), data);
    }

    #[test]
    fn whiteouts_and_opaque_directories_become_overlayfs_markers() {
        pronto_testbed::require!(&[pronto_testbed::Prereq::Root]);
        use tar::EntryType as T;
        let f = fixture();
        let tar = raw_tar(&[
            ("dir/", T::Directory, "", b""),
            ("dir/.wh..wh..opq", T::Regular, "", b""),
            ("dir/kept", T::Regular, "", b"kept"),
            ("etc/.wh.gone", T::Regular, "", b""),
            ("file", T::Regular, "", b"data"),
            ("hard", T::Link, "file", b""),
            ("sym", T::Symlink, "file", b""),
        ]);
        let unpacked = unpack(tar.as_slice(), Compression::None, &f.layer, 0).unwrap();
        assert_eq!(unpacked.entries, 7);
        assert_eq!(
            unpacked.diff_id,
            format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
        );
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let gone = std::fs::symlink_metadata(f.layer.join("etc/gone")).unwrap();
        assert!(gone.file_type().is_char_device() && gone.rdev() == 0);
        assert_eq!(
            xattr::get(f.layer.join("dir"), "trusted.overlay.opaque").unwrap(),
            Some(b"y".to_vec())
        );
        assert!(!f.layer.join("dir/.wh..wh..opq").exists());
        assert_eq!(std::fs::read(f.layer.join("dir/kept")).unwrap(), b"kept");
        let file = std::fs::metadata(f.layer.join("file")).unwrap();
        assert_eq!(file.nlink(), 2);
        assert_eq!(file.mtime(), 1_700_000_000);
        assert_eq!(
            std::fs::read_link(f.layer.join("sym")).unwrap(),
            Path::new("file")
        );
    }
}
