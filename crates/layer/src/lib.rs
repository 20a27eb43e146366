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
}

/// Layer media types Pronto reads, with their compression. zstd layers
/// and foreign formats are not among them: they fall back to containerd.
const MEDIA_TYPES: &[(&str, Compression)] = &[
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
            None
        );
        assert_eq!(Compression::from_media_type("text/plain"), None);
    }
}
