//! The rules of OCI layers that every path through Pronto shares — the
//! index builder, the lazy tree, the unpacker of the parallel pull: which
//! media types are layers and how they are compressed, and what the
//! whiteout and opaque markers of the OCI image spec (and overlayfs) mean.
//! Each rule has this one owner, so a layer reads the same lazily and
//! unpacked.
//!
//! It knows nothing of the network, FUSE, containerd or any index format.

use serde::{Deserialize, Serialize};

/// How a layer blob is compressed. The order of the variants is part of
/// the index format (it is serialised there): add new ones at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    /// A plain tar.
    None,
    Gzip,
    /// Zstandard frames, as `tar+zstd` layers and zstd:chunked have.
    Zstd,
}

/// Layer media types Pronto reads, with their compression. Foreign
/// formats are not among them: they fall back to containerd.
const MEDIA_TYPES: &[(&str, Compression)] = &[
    (
        "application/vnd.oci.image.layer.v1.tar+zstd",
        Compression::Zstd,
    ),
    (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        Compression::Zstd,
    ),
    (
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Gzip,
    ),
    (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        Compression::Gzip,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        Compression::Gzip,
    ),
    (
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        Compression::Gzip,
    ),
    ("application/vnd.oci.image.layer.v1.tar", Compression::None),
    (
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        Compression::None,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar",
        Compression::None,
    ),
];

impl Compression {
    /// The compression of a layer of `media_type`; `None` when Pronto does
    /// not read such layers.
    pub fn from_media_type(media_type: &str) -> Option<Self> {
        MEDIA_TYPES
            .iter()
            .find(|(known, _)| *known == media_type)
            .map(|(_, compression)| *compression)
    }

    /// A reader of the uncompressed stream of `blob`: every member or
    /// frame, one after another.
    pub fn decoder<'a>(
        self,
        blob: impl std::io::Read + 'a,
    ) -> std::io::Result<Box<dyn std::io::Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(blob),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(blob)),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(blob)?),
        })
    }
}

/// Prefix of a whiteout entry's name: `.wh.NAME` deletes `NAME` of lower
/// layers.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Name of an opaque marker: its directory hides every entry of lower
/// layers.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// The xattr overlayfs reads to treat a lower directory as opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What the last component of a layer entry's path means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marker<'a> {
    /// An ordinary entry.
    Entry,
    /// `.wh..wh..opq`: the directory it is in is opaque.
    Opaque,
    /// `.wh.NAME`: `NAME` of lower layers is deleted.
    Whiteout(&'a str),
    /// Another `.wh..wh.` name (AUFS bookkeeping such as `.wh..wh.plnk`):
    /// it means nothing to an overlay and is left out.
    Ignored,
}

impl<'a> Marker<'a> {
    /// Classifies the entry name `name` (one path component).
    pub fn of(name: &'a str) -> Self {
        if name == OPAQUE_MARKER {
            return Marker::Opaque;
        }
        match name.strip_prefix(WHITEOUT_PREFIX) {
            Some(rest) if rest.starts_with(WHITEOUT_PREFIX) => Marker::Ignored,
            // `.wh.` alone, `.wh..` and `.wh...` would delete nothing a
            // layer can name.
            Some("" | "." | "..") => Marker::Ignored,
            Some(hidden) => Marker::Whiteout(hidden),
            None => Marker::Entry,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers() {
        assert_eq!(Marker::of("file"), Marker::Entry);
        assert_eq!(Marker::of(".wh..wh..opq"), Marker::Opaque);
        assert_eq!(Marker::of(".wh.gone"), Marker::Whiteout("gone"));
        assert_eq!(Marker::of(".wh..hidden"), Marker::Whiteout(".hidden"));
        assert_eq!(Marker::of(".wh..wh.plnk"), Marker::Ignored);
        assert_eq!(Marker::of(".wh."), Marker::Ignored);
        assert_eq!(Marker::of(".wh.."), Marker::Ignored);
    }

    #[test]
    fn media_types() {
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some(Compression::Gzip)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.docker.image.rootfs.diff.tar"),
            Some(Compression::None)
        );
        assert_eq!(
            Compression::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some(Compression::Zstd)
        );
        assert_eq!(Compression::from_media_type("text/plain"), None);
    }
}

/// The type of a tar entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
}

/// One tar entry with all the metadata a filesystem needs. Every lazy
/// format reads tar layers, so this is the shape of an entry for all of
/// them: the seekable index stores it as is, other formats build it from
/// their tables of contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path without a leading `./` or `/`, directories without a
    /// trailing `/`. Whiteouts keep their `.wh.` names.
    pub path: String,
    pub kind: EntryKind,
    /// Permission and special bits (`0o7777`).
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    // Boxed strings and slices (the same on the wire as `String` and
    // `Vec`): a layer's table holds one entry per file, often 100,000.
    pub uname: Box<str>,
    pub gname: Box<str>,
    /// Seconds since the epoch, and nanoseconds (from PAX `mtime`).
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// File size in bytes (0 for everything but regular files).
    pub size: u64,
    /// Where the file's data starts in the uncompressed tar stream.
    pub offset: u64,
    /// Symlink target, or the path a hardlink points to.
    pub link: Box<str>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes (`SCHILY.xattr.*` PAX records).
    pub xattrs: Box<[(String, Vec<u8>)]>,
    /// Other PAX records that Pronto does not interpret, kept verbatim.
    pub pax: Box<[(String, Vec<u8>)]>,
}

/// Bounds on what one entry may hold, so that a hostile table of contents
/// cannot make the daemon allocate without limit.
#[derive(Debug, Clone, Copy)]
pub struct EntryLimits {
    pub max_name_len: usize,
    pub max_xattrs: usize,
    pub max_xattr_value: usize,
}

impl Default for EntryLimits {
    fn default() -> Self {
        Self {
            max_name_len: 16 * 1024,
            max_xattrs: 256,
            max_xattr_value: 64 * 1024,
        }
    }
}

impl Entry {
    /// Why this entry cannot be trusted to build a tree from, if it
    /// cannot: a path that is absolute, climbs out with `..`, has empty or
    /// `.` components or NUL bytes; names over the limits; a mode beyond
    /// the permission bits; too many or too large attributes.
    pub fn problem(&self, limits: &EntryLimits) -> Option<String> {
        let name_ok = |name: &str| name.len() <= limits.max_name_len && !name.contains('\0');
        if !name_ok(&self.path) || !name_ok(&self.link) {
            return Some("a name that is too long or contains NUL".into());
        }
        if self.path.starts_with('/')
            || self.path.split('/').any(|c| c == ".." || c == ".")
            || self.path.contains("//")
            || (self.path.is_empty() && self.kind != EntryKind::Dir)
        {
            return Some(format!("an unsafe path {:?}", self.path));
        }
        if self.mode > 0o7777 {
            return Some(format!("mode {:o}", self.mode));
        }
        if self.xattrs.len() + self.pax.len() > limits.max_xattrs {
            return Some("too many extended attributes".into());
        }
        for (key, value) in self.xattrs.iter().chain(&self.pax) {
            if !name_ok(key) || value.len() > limits.max_xattr_value {
                return Some(format!("an oversized or invalid attribute {key:?}"));
            }
        }
        None
    }
}

/// The entry a tar item describes, as every lazy format records it, with
/// `offset` where its data starts in the tar stream. `None` for items that
/// describe nothing in the tree (PAX global headers, a file named as the
/// root). An error for what Pronto cannot represent: unknown entry types,
/// sparse files, malformed PAX records. The item's data is not read.
pub fn tar_entry<R: std::io::Read>(item: &mut tar::Entry<'_, R>) -> Result<Option<Entry>, String> {
    let header = item.header();
    let kind = match header.entry_type() {
        tar::EntryType::Regular | tar::EntryType::Continuous => EntryKind::File,
        tar::EntryType::Directory => EntryKind::Dir,
        tar::EntryType::Symlink => EntryKind::Symlink,
        tar::EntryType::Link => EntryKind::Hardlink,
        tar::EntryType::Char => EntryKind::CharDevice,
        tar::EntryType::Block => EntryKind::BlockDevice,
        tar::EntryType::Fifo => EntryKind::Fifo,
        tar::EntryType::XGlobalHeader => return Ok(None),
        other => {
            return Err(format!(
                "tar entry type {:?} ({}) is not supported",
                other.as_byte() as char,
                String::from_utf8_lossy(&item.path_bytes())
            ));
        }
    };
    let path = normalize_path(&String::from_utf8_lossy(&item.path_bytes()));
    if path.is_empty() && kind != EntryKind::Dir {
        return Ok(None);
    }
    let link = match item.link_name_bytes() {
        Some(target) if kind == EntryKind::Hardlink => {
            normalize_path(&String::from_utf8_lossy(&target))
        }
        Some(target) => String::from_utf8_lossy(&target).into_owned(),
        None => String::new(),
    };
    let mut entry = Entry {
        path,
        kind,
        mode: header.mode().unwrap_or(0o644) & 0o7777,
        uid: header.uid().unwrap_or(0),
        gid: header.gid().unwrap_or(0),
        uname: header.username().ok().flatten().unwrap_or("").into(),
        gname: header.groupname().ok().flatten().unwrap_or("").into(),
        mtime: header.mtime().unwrap_or(0) as i64,
        mtime_nsec: 0,
        size: if kind == EntryKind::File {
            item.size()
        } else {
            0
        },
        offset: item.raw_file_position(),
        link: link.into(),
        dev_major: header.device_major().ok().flatten().unwrap_or(0),
        dev_minor: header.device_minor().ok().flatten().unwrap_or(0),
        xattrs: Box::default(),
        pax: Box::default(),
    };
    let (mut xattrs, mut pax) = (Vec::new(), Vec::new());
    if let Ok(Some(records)) = item.pax_extensions() {
        for record in records {
            let record = record.map_err(|e| format!("malformed PAX record: {e}"))?;
            let Ok(key) = record.key() else { continue };
            let value = record.value_bytes().to_vec();
            if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                xattrs.push((name.to_owned(), value));
            } else if key == "mtime" {
                apply_pax_mtime(&mut entry, &value);
            } else if !matches!(
                key,
                "path" | "linkpath" | "size" | "uid" | "gid" | "uname" | "gname"
            ) {
                pax.push((key.to_owned(), value));
            }
        }
    }
    (entry.xattrs, entry.pax) = (xattrs.into(), pax.into());
    if let Some(sparse) = entry.pax.iter().find(|(k, _)| k.starts_with("GNU.sparse")) {
        return Err(format!("sparse file {} ({})", entry.path, sparse.0));
    }
    Ok(Some(entry))
}

/// `./a/b/` → `a/b`; `/` and `.` → `` (the root).
pub fn normalize_path(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

/// PAX `mtime` is decimal seconds with an optional fraction.
fn apply_pax_mtime(entry: &mut Entry, value: &[u8]) {
    let Ok(text) = std::str::from_utf8(value) else {
        return;
    };
    let (secs, frac) = text.split_once('.').unwrap_or((text, ""));
    if let Ok(secs) = secs.parse::<i64>() {
        entry.mtime = secs;
        let digits: String = frac.chars().take(9).collect();
        entry.mtime_nsec = format!("{digits:0<9}").parse().unwrap_or(0);
    }
}
