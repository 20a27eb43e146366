//! A directory as a tar, for `pronto pack`: what a layer of it holds,
//! read from the filesystem in a fixed order.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// What [`tar_of_dir`] put in the tar.
#[derive(Debug, Default)]
pub struct Packed {
    pub entries: u64,
    /// Bytes of regular files.
    pub bytes: u64,
    /// Paths left out (sockets).
    pub skipped: Vec<String>,
}

/// Why a directory cannot be packed.
#[derive(Debug, thiserror::Error)]
#[error("cannot pack {path}: {source}")]
pub struct PackError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Writes the tree under `root` as a tar (names relative to it, in name
/// order, so the same tree gives the same layer): directories, regular
/// files, symlinks, hard links (as links to the first name), devices and
/// FIFOs with their modes, owners, times and extended attributes.
pub fn tar_of_dir(root: &Path, out: impl Write) -> Result<Packed, PackError> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut packed = Packed::default();
    let mut links: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = root.join(&rel);
        let mut names: Vec<_> = std::fs::read_dir(&path)
            .map_err(at(&path))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()
            .map_err(at(&path))?;
        names.sort();
        // Subdirectories are walked after this directory's other entries,
        // in name order (pushed in reverse).
        let mut dirs = Vec::new();
        for name in names {
            let rel = rel.join(&name);
            let path = root.join(&rel);
            let meta = std::fs::symlink_metadata(&path).map_err(at(&path))?;
            let kind = meta.file_type();
            if kind.is_socket() {
                packed.skipped.push(rel.display().to_string());
                continue;
            }
            let mut header = tar::Header::new_gnu();
            header.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
            append_xattrs(&mut builder, &path, kind.is_symlink())?;
            packed.entries += 1;
            if kind.is_dir() {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_size(0);
                builder
                    .append_data(&mut header, &rel, std::io::empty())
                    .map_err(at(&path))?;
                dirs.push(rel);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(at(&path))?;
                header.set_size(0);
                builder
                    .append_link(&mut header, &rel, &target)
                    .map_err(at(&path))?;
            } else if kind.is_file() {
                if meta.nlink() > 1 {
                    if let Some(first) = links.get(&(meta.dev(), meta.ino())) {
                        header.set_entry_type(tar::EntryType::Link);
                        header.set_size(0);
                        builder
                            .append_link(&mut header, &rel, first)
                            .map_err(at(&path))?;
                        continue;
                    }
                    links.insert((meta.dev(), meta.ino()), rel.clone());
                }
                let file = std::fs::File::open(&path).map_err(at(&path))?;
                let data = Exactly {
                    inner: file.take(meta.len()),
                    left: meta.len(),
                };
                builder
                    .append_data(&mut header, &rel, data)
                    .map_err(at(&path))?;
                packed.bytes += meta.len();
            } else {
                // Devices and FIFOs: the header says it all.
                let rdev = meta.rdev();
                if kind.is_char_device() || kind.is_block_device() {
                    header
                        .set_device_major(nix::sys::stat::major(rdev) as u32)
                        .map_err(at(&path))?;
                    header
                        .set_device_minor(nix::sys::stat::minor(rdev) as u32)
                        .map_err(at(&path))?;
                }
                header.set_size(0);
                builder
                    .append_data(&mut header, &rel, std::io::empty())
                    .map_err(at(&path))?;
            }
        }
        stack.extend(dirs.into_iter().rev());
    }
    builder.into_inner().map_err(at(root))?;
    Ok(packed)
}

/// The error of an I/O failure at `path`.
fn at(path: &Path) -> impl Fn(std::io::Error) -> PackError + '_ {
    move |source| PackError {
        path: path.to_owned(),
        source,
    }
}

/// Extended attributes a layer carries: user, trusted and file
/// capabilities (SELinux labels and ACLs belong to the node).
fn append_xattrs(
    builder: &mut tar::Builder<impl Write>,
    path: &Path,
    symlink: bool,
) -> Result<(), PackError> {
    if symlink {
        return Ok(());
    }
    let mut records = Vec::new();
    let names = xattr::list(path).map_err(at(path))?;
    for name in names {
        let Some(text) = name.to_str() else { continue };
        if !(text.starts_with("user.")
            || text.starts_with("trusted.")
            || text == "security.capability")
        {
            continue;
        }
        if let Some(value) = xattr::get(path, &name).map_err(at(path))? {
            records.push((format!("SCHILY.xattr.{text}"), value));
        }
    }
    if !records.is_empty() {
        builder
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(at(path))?;
    }
    Ok(())
}

/// A file's bytes, exactly as many as it had when its header was written:
/// a file that shrinks while it is packed is an error, not a corrupt tar.
struct Exactly<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exactly<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && self.left > 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the file shrank while it was packed",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}
