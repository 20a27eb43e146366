//! Tables of contents of chunked layers, parsed and checked before anything
//! trusts them.
//!
//! A chunked layer is a valid `tar+gzip` or `tar+zstd` layer whose file
//! data is cut into chunks, each compressed as its own gzip member or zstd
//! frame, with a table of contents (TOC) that says where every chunk lies
//! in the blob and what its uncompressed bytes hash to. Two forms of one
//! TOC document (CRFS's JSON) are read:
//! - eStargz, what BuildKit, `ctr-remote` and stargz-snapshotter write: the
//!   TOC (`stargz.index.json`) is in a tar in a gzip member near the end of
//!   the blob, found through a 51-byte footer (47 bytes in the legacy
//!   stargz form); the image manifest names the SHA-256 of the TOC's JSON
//!   in the layer annotation [`TOC_DIGEST_ANNOTATION`];
//! - zstd:chunked, what Podman, Buildah and `ctr-remote --zstdchunked`
//!   write: the TOC (the "manifest") is one zstd frame in a skippable
//!   frame near the end of the blob; layer annotations name where it lies
//!   and the SHA-256 of its compressed bytes ([`ZstdManifest`]).
//!
//! Those digests, signed into the manifest digest, are what make the TOC
//! and every chunk digest in it trustworthy.
//!
//! Only what the filesystem needs leaves this crate: the entries as
//! [`pronto_layer::Entry`] and per regular file its [`Chunk`]s. Every
//! offset, length, name and count is checked first, so that readers can
//! index and add without further checks.

use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;

use base64::Engine as _;
pub use pronto_layer::Compression;
use pronto_layer::{Entry, EntryKind, EntryLimits};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The layer annotation holding `sha256:<hex>` of the TOC's JSON.
pub const TOC_DIGEST_ANNOTATION: &str = "containerd.io/snapshot/stargz/toc.digest";

/// The layer annotation holding the size of the uncompressed tar.
pub const UNCOMPRESSED_SIZE_ANNOTATION: &str = "io.containers.estargz.uncompressed-size";

/// The name of the TOC inside its tar.
pub const TOC_TAR_NAME: &str = "stargz.index.json";

/// Size of the eStargz footer at the end of the blob.
pub const FOOTER_SIZE: u64 = 51;

/// Size of the legacy stargz footer.
pub const LEGACY_FOOTER_SIZE: u64 = 47;

/// Layer annotations of zstd:chunked naming the SHA-256 of the compressed
/// manifest (the TOC): containers/storage's current name, then the one
/// stargz-snapshotter writes.
pub const ZSTD_CHECKSUM_ANNOTATIONS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];

/// Layer annotations of zstd:chunked naming where the manifest lies:
/// `offset:compressed:uncompressed:type`.
pub const ZSTD_POSITION_ANNOTATIONS: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];

/// The manifest type of zstd:chunked whose document is the CRFS TOC.
const ZSTD_MANIFEST_TYPE_TOC: u64 = 1;

/// Regular files of at most this many bytes, held in one chunk, are small:
/// a run of them shares one gzip member when Pronto writes a layer, and one
/// span and cache entry when Pronto reads one.
pub const SMALL_FILE: u64 = 64 << 10;

/// A run of small files holds this many bytes of file data at most.
pub const SMALL_RUN: u64 = 128 << 10;

/// Whether a run of small files ends after a chunk with SHA-256 `digest`,
/// the run then holding `run_bytes` of file data. Where runs end depends on
/// the files alone (one chunk in 16 ends one, on average), so the same
/// files form the same runs in every layer and image, and around a change
/// as before it.
pub fn ends_run(digest: &[u8; 32], run_bytes: u64) -> bool {
    digest[0] % 16 == 0 || run_bytes >= SMALL_RUN
}

/// Magic number of a zstd skippable frame (the first of sixteen).
const ZSTD_SKIPPABLE_MAGIC: u32 = 0x184D_2A50;

/// Where a chunked layer's TOC is and what vouches for it, read from the
/// layer's descriptor in the image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocRef {
    /// How the layer's chunks are compressed: gzip (eStargz) or zstd.
    pub compression: Compression,
    /// `sha256:<hex>` of the TOC's JSON, if the manifest names it.
    pub json_digest: Option<String>,
    /// Where a zstd:chunked layer's TOC lies, with its checksum.
    pub zstd: Option<ZstdManifest>,
}

/// The zstd:chunked manifest annotations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZstdManifest {
    /// The compressed manifest's bytes in the blob (one zstd frame).
    pub range: Range<u64>,
    /// Its size uncompressed.
    pub uncompressed: u64,
    /// `sha256:<hex>` of the compressed bytes, if the manifest names it.
    pub checksum: Option<String>,
}

impl TocRef {
    /// The TOC reference of a layer of `media_type` with `annotations`:
    /// `None` when the layer is not chunked; an error when it claims to be
    /// but nothing vouches for its TOC or its annotations are malformed.
    pub fn of(
        media_type: &str,
        annotations: &HashMap<String, String>,
    ) -> Option<Result<Self, TocError>> {
        let compression = Compression::from_media_type(media_type)?;
        let json_digest = annotations.get(TOC_DIGEST_ANNOTATION).cloned();
        match compression {
            Compression::Gzip => Some(Ok(Self {
                compression,
                json_digest: Some(json_digest?),
                zstd: None,
            })),
            Compression::Zstd => {
                let position = ZSTD_POSITION_ANNOTATIONS
                    .iter()
                    .find_map(|name| annotations.get(*name))?;
                let checksum = ZSTD_CHECKSUM_ANNOTATIONS
                    .iter()
                    .find_map(|name| annotations.get(*name))
                    .cloned();
                Some(zstd_manifest(position, checksum).and_then(|zstd| {
                    if zstd.checksum.is_none() && json_digest.is_none() {
                        return Err(TocError::Annotation(
                            "no digest vouches for the zstd:chunked manifest".into(),
                        ));
                    }
                    Ok(Self {
                        compression,
                        json_digest,
                        zstd: Some(zstd),
                    })
                }))
            }
            Compression::None => None,
        }
    }
}

/// The zstd:chunked manifest position annotation, parsed.
fn zstd_manifest(position: &str, checksum: Option<String>) -> Result<ZstdManifest, TocError> {
    let bad = || {
        TocError::Annotation(format!(
            "the zstd:chunked manifest position {position:?} is not offset:length:length:1"
        ))
    };
    let fields: Vec<u64> = position
        .split(':')
        .map(|f| f.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let &[offset, compressed, uncompressed, kind] = fields.as_slice() else {
        return Err(bad());
    };
    if kind != ZSTD_MANIFEST_TYPE_TOC || compressed == 0 {
        return Err(bad());
    }
    let end = offset.checked_add(compressed).ok_or_else(bad)?;
    Ok(ZstdManifest {
        range: offset..end,
        uncompressed,
        checksum,
    })
}

/// The TOC's JSON from a zstd:chunked manifest frame (the bytes at
/// `manifest.range`), checked against the checksum and, when the manifest
/// names one, the JSON digest. Returns the JSON and its digest.
pub fn zstd_toc_json(
    frame: &[u8],
    manifest: &ZstdManifest,
    json_digest: Option<&str>,
    limits: &Limits,
) -> Result<(Vec<u8>, String), TocError> {
    if frame.len() as u64 > limits.max_toc_compressed || manifest.uncompressed > limits.max_toc_json
    {
        return Err(TocError::Unreadable(format!(
            "the TOC is {} bytes ({} uncompressed), over the limits of {} and {}",
            frame.len(),
            manifest.uncompressed,
            limits.max_toc_compressed,
            limits.max_toc_json
        )));
    }
    if let Some(expected) = &manifest.checksum {
        let found = format!("sha256:{}", hex::encode(Sha256::digest(frame)));
        if &found != expected {
            return Err(TocError::DigestMismatch {
                expected: expected.clone(),
                found,
            });
        }
    }
    let unreadable = |e: std::io::Error| TocError::Unreadable(e.to_string());
    // One byte more than promised is read, to catch a frame that says
    // otherwise.
    let mut json = Vec::new();
    Compression::Zstd
        .decoder(frame)
        .map_err(unreadable)?
        .take(manifest.uncompressed + 1)
        .read_to_end(&mut json)
        .map_err(unreadable)?;
    if json.len() as u64 != manifest.uncompressed {
        return Err(TocError::Unreadable(format!(
            "the TOC decompresses to {}{} bytes, its annotation says {}",
            if json.len() as u64 > manifest.uncompressed {
                "more than "
            } else {
                ""
            },
            json.len().min(manifest.uncompressed as usize),
            manifest.uncompressed
        )));
    }
    let found = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
    if let Some(expected) = json_digest
        && found != expected
    {
        return Err(TocError::DigestMismatch {
            expected: expected.to_owned(),
            found,
        });
    }
    Ok((json, found))
}

/// Where the chunks of a zstd:chunked layer end: at the skippable frame
/// holding its manifest.
pub fn zstd_chunks_end(manifest: &ZstdManifest) -> u64 {
    manifest.range.start.saturating_sub(8)
}

/// The checked TOC of a whole layer blob in memory (tools and tests; nodes
/// fetch only the TOC's bytes).
pub fn blob_toc(blob: &[u8], toc: &TocRef, limits: &Limits) -> Result<Toc, TocError> {
    let slice = |range: Range<u64>| {
        blob.get(range.start as usize..range.end as usize)
            .ok_or_else(|| TocError::Footer(format!("{range:?} is past the blob's end")))
    };
    let (json, end) = match (&toc.zstd, &toc.json_digest) {
        (Some(zstd), _) => {
            let (json, _) = zstd_toc_json(
                slice(zstd.range.clone())?,
                zstd,
                toc.json_digest.as_deref(),
                limits,
            )?;
            (json, zstd_chunks_end(zstd))
        }
        (None, Some(digest)) => {
            let place = parse_footer(blob, blob.len() as u64)?;
            (
                toc_json(slice(place.clone())?, digest, limits)?,
                place.start,
            )
        }
        (None, None) => return Err(TocError::Annotation("no digest vouches for the TOC".into())),
    };
    parse_toc(&json, end, limits)
}

/// Why a chunked layer's TOC cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error("the footer is not an eStargz footer: {0}")]
    Footer(String),
    #[error("the TOC cannot be read: {0}")]
    Unreadable(String),
    #[error("the TOC's digest is {found}, the manifest names {expected}")]
    DigestMismatch { expected: String, found: String },
    #[error("the TOC is malformed: {0}")]
    Malformed(String),
    #[error("the layer's chunked-format annotations cannot be used: {0}")]
    Annotation(String),
}

/// Bounds on a TOC, so that a hostile layer cannot make the daemon
/// allocate without limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Compressed bytes of the TOC member.
    pub max_toc_compressed: u64,
    /// Bytes of the TOC's JSON.
    pub max_toc_json: u64,
    pub max_entries: usize,
    /// Uncompressed bytes of one chunk.
    pub max_chunk: u64,
    pub entry: EntryLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_toc_compressed: 256 << 20,
            max_toc_json: 1 << 30,
            max_entries: 8_000_000,
            max_chunk: 64 << 20,
            entry: EntryLimits::default(),
        }
    }
}

/// One chunk of a regular file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Where the chunk starts in its file.
    pub file_offset: u64,
    /// Uncompressed length.
    pub len: u64,
    /// The bytes of the blob to fetch for it: from the start of its gzip
    /// member (or zstd frame) to the start of the next member holding data
    /// (or the TOC). Chunks of several small files may share a member.
    pub blob: Range<u64>,
    /// Where the chunk starts in what `blob` decompresses to (eStargz's
    /// `innerOffset`): 0 unless it shares its member with chunks before it.
    pub inner: u64,
    /// SHA-256 of the chunk's uncompressed bytes.
    pub digest: [u8; 32],
}

/// A checked TOC.
#[derive(Debug, Clone)]
pub struct Toc {
    /// The layer's entries in TOC (tar) order. `offset` is 0: a chunked
    /// layer's data is found through [`Toc::chunks`].
    pub entries: Vec<Entry>,
    /// Per entry, its chunks in file order; empty but for regular files
    /// with data. They cover the file exactly.
    pub chunks: Vec<Vec<Chunk>>,
    /// Where the TOC's member starts: every chunk lies before it.
    pub toc_offset: u64,
}

/// Where the TOC lies, read from the blob's last [`FOOTER_SIZE`] bytes
/// (`tail` may be longer: its end is the blob's end). Returns the offset
/// of the TOC's gzip member; it ends where the footer begins.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<Range<u64>, TocError> {
    let bad = |why: &str| Err(TocError::Footer(why.into()));
    let (footer, footer_size) = if tail.len() as u64 >= FOOTER_SIZE
        && let Some(offset) = footer_offset(&tail[tail.len() - FOOTER_SIZE as usize..], true)
    {
        (offset, FOOTER_SIZE)
    } else if tail.len() as u64 >= LEGACY_FOOTER_SIZE
        && let Some(offset) =
            footer_offset(&tail[tail.len() - LEGACY_FOOTER_SIZE as usize..], false)
    {
        (offset, LEGACY_FOOTER_SIZE)
    } else {
        return bad("no STARGZ footer at the end of the blob");
    };
    let end = blob_size.saturating_sub(footer_size);
    if footer >= end {
        return bad("the TOC offset is past the footer");
    }
    Ok(footer..end)
}

/// The TOC offset in a footer: an empty gzip member whose extra field is
/// `SG` + length 22 + `%016xSTARGZ` (or, legacy, just the 22 bytes).
fn footer_offset(footer: &[u8], estargz: bool) -> Option<u64> {
    // Gzip header: magic, deflate, FEXTRA set.
    if footer.len() < 12 || footer[..3] != [0x1f, 0x8b, 8] || footer[3] & 4 == 0 {
        return None;
    }
    let xlen = u16::from_le_bytes([footer[10], footer[11]]) as usize;
    let extra = footer.get(12..12 + xlen)?;
    let field = if estargz {
        if extra.len() != 26 || &extra[..2] != b"SG" || extra[2..4] != [22, 0] {
            return None;
        }
        &extra[4..]
    } else {
        if extra.len() != 22 {
            return None;
        }
        extra
    };
    if &field[16..] != b"STARGZ" {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(&field[..16]).ok()?, 16).ok()
}

/// The TOC's JSON from its gzip member (a tar holding
/// [`TOC_TAR_NAME`]), checked against `expected` (`sha256:<hex>`, from the
/// manifest) before it is parsed.
pub fn toc_json(member: &[u8], expected: &str, limits: &Limits) -> Result<Vec<u8>, TocError> {
    if member.len() as u64 > limits.max_toc_compressed {
        return Err(TocError::Unreadable(format!(
            "the TOC member is {} bytes, over the limit of {}",
            member.len(),
            limits.max_toc_compressed
        )));
    }
    let unreadable = |e: std::io::Error| TocError::Unreadable(e.to_string());
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(member));
    let mut entries = archive.entries().map_err(unreadable)?;
    let entry = entries
        .next()
        .ok_or_else(|| TocError::Unreadable("the TOC tar is empty".into()))?
        .map_err(unreadable)?;
    let name = entry.path_bytes().into_owned();
    if name != TOC_TAR_NAME.as_bytes() {
        return Err(TocError::Unreadable(format!(
            "the TOC tar holds {:?}, not {TOC_TAR_NAME}",
            String::from_utf8_lossy(&name)
        )));
    }
    if entry.size() > limits.max_toc_json {
        return Err(TocError::Unreadable(format!(
            "the TOC is {} bytes, over the limit of {}",
            entry.size(),
            limits.max_toc_json
        )));
    }
    // Grown as bytes arrive: a header may claim a size its data does not
    // have.
    let mut json = Vec::new();
    entry
        .take(limits.max_toc_json)
        .read_to_end(&mut json)
        .map_err(unreadable)?;
    let found = format!("sha256:{}", hex::encode(Sha256::digest(&json)));
    if found != expected {
        return Err(TocError::DigestMismatch {
            expected: expected.to_owned(),
            found,
        });
    }
    Ok(json)
}

/// The TOC document, as eStargz writes it.
#[derive(Debug, Serialize, Deserialize)]
struct JsonToc {
    version: u32,
    entries: Vec<JsonEntry>,
}

/// One TOC entry. Empty and zero fields are left out when written, as Go's
/// `omitempty` does.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JsonEntry {
    #[serde(default)]
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    modtime: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    link_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    mode: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    uid: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    gid: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    user_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    group_name: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    offset: u64,
    #[serde(default, skip_serializing_if = "is_zero32")]
    dev_major: u32,
    #[serde(default, skip_serializing_if = "is_zero32")]
    dev_minor: u32,
    /// Values are base64, as Go encodes `[]byte`.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    xattrs: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    digest: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    inner_offset: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    chunk_offset: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
    /// zstd:chunked: where the entry's frames end.
    #[serde(default, skip_serializing_if = "is_zero")]
    end_offset: u64,
    /// zstd:chunked: `zeros` for a hole with no data in the blob.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    chunk_type: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero32(n: &u32) -> bool {
    *n == 0
}

/// Parses and checks the TOC's JSON (already checked against its digest)
/// of a blob whose TOC member starts at `toc_offset`.
pub fn parse_toc(json: &[u8], toc_offset: u64, limits: &Limits) -> Result<Toc, TocError> {
    let bad = |problem: String| TocError::Malformed(problem);
    let toc: JsonToc =
        serde_json::from_slice(json).map_err(|e| bad(format!("not a TOC document: {e}")))?;
    if toc.version != 1 {
        return Err(bad(format!(
            "TOC version {} (only 1 is known)",
            toc.version
        )));
    }
    if toc.entries.len() > limits.max_entries {
        return Err(bad(format!(
            "{} entries, over the limit of {}",
            toc.entries.len(),
            limits.max_entries
        )));
    }
    let mut entries: Vec<Entry> = Vec::new();
    let mut chunks: Vec<Vec<Chunk>> = Vec::new();
    // Names are written only for the first entry of each owner.
    let mut users: HashMap<u64, String> = HashMap::new();
    let mut groups: HashMap<u64, String> = HashMap::new();
    // Chunks in blob order, to find where each one's member ends.
    let mut order: Vec<(usize, usize)> = Vec::new();
    for json in toc.entries {
        if json.kind == "chunk" {
            let Some(file) = entries
                .len()
                .checked_sub(1)
                .filter(|&i| entries[i].kind == EntryKind::File && !chunks[i].is_empty())
            else {
                return Err(bad(format!(
                    "a chunk of {:?} follows no regular file",
                    json.name
                )));
            };
            let chunk = chunk_of(&json, entries[file].size, limits)?;
            let last = chunks[file].last().expect("checked above");
            if chunk.file_offset != last.file_offset + last.len {
                return Err(bad(format!(
                    "the chunks of {:?} do not follow each other",
                    entries[file].path
                )));
            }
            chunks[file].push(chunk);
            order.push((file, chunks[file].len() - 1));
            continue;
        }
        let kind = match json.kind.as_str() {
            "reg" => EntryKind::File,
            "dir" => EntryKind::Dir,
            "symlink" => EntryKind::Symlink,
            "hardlink" => EntryKind::Hardlink,
            "char" => EntryKind::CharDevice,
            "block" => EntryKind::BlockDevice,
            "fifo" => EntryKind::Fifo,
            other => return Err(bad(format!("{:?} has unknown type {other:?}", json.name))),
        };
        if !json.user_name.is_empty() {
            users.insert(json.uid, json.user_name.clone());
        }
        if !json.group_name.is_empty() {
            groups.insert(json.gid, json.group_name.clone());
        }
        let (mtime, mtime_nsec) = modtime(&json.modtime)
            .ok_or_else(|| bad(format!("{:?} has modtime {:?}", json.name, json.modtime)))?;
        let mut xattrs = Vec::with_capacity(json.xattrs.len());
        for (key, value) in &json.xattrs {
            let value = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|_| bad(format!("{:?} has a bad value for xattr {key:?}", json.name)))?;
            xattrs.push((key.clone(), value));
        }
        let link = match kind {
            EntryKind::Hardlink => pronto_layer::normalize_path(&json.link_name),
            EntryKind::Symlink => json.link_name.clone(),
            _ => String::new(),
        };
        let entry = Entry {
            path: pronto_layer::normalize_path(&json.name),
            kind,
            mode: (json.mode & 0o7777) as u32,
            uid: json.uid,
            gid: json.gid,
            uname: users.get(&json.uid).cloned().unwrap_or_default().into(),
            gname: groups.get(&json.gid).cloned().unwrap_or_default().into(),
            mtime,
            mtime_nsec,
            size: if kind == EntryKind::File {
                json.size
            } else {
                0
            },
            offset: 0,
            link: link.into(),
            dev_major: json.dev_major,
            dev_minor: json.dev_minor,
            xattrs: xattrs.into(),
            pax: Box::default(),
        };
        if entry.path.is_empty() && kind == EntryKind::Dir {
            // The layer's root ("./"): the tree has its own.
            continue;
        }
        if let Some(problem) = entry.problem(&limits.entry) {
            return Err(bad(format!("entry {:?} has {problem}", json.name)));
        }
        let mut own = Vec::new();
        if kind == EntryKind::File && entry.size > 0 {
            if json.chunk_offset != 0 {
                return Err(bad(format!(
                    "{:?} does not start at its first byte",
                    json.name
                )));
            }
            own.push(chunk_of(&json, entry.size, limits)?);
            order.push((entries.len(), 0));
        }
        entries.push(entry);
        chunks.push(own);
    }
    for (i, entry) in entries.iter().enumerate() {
        let covered = chunks[i].last().map_or(0, |c| c.file_offset + c.len);
        if covered != entry.size {
            return Err(bad(format!(
                "the chunks of {:?} cover {covered} of its {} bytes",
                entry.path, entry.size
            )));
        }
    }
    // Each member ends where the next one holding data begins; chunks
    // sharing a member follow each other in it.
    for w in 0..order.len() {
        let (file, chunk) = order[w];
        let this = &chunks[file][chunk];
        let (start, inner, len) = (this.blob.start, this.inner, this.len);
        let next = order
            .get(w + 1)
            .map(|&(f, c)| &chunks[f][c])
            .filter(|next| next.blob.start == start);
        if let Some(next) = next {
            if next.inner < inner + len {
                return Err(bad(format!(
                    "the chunks of {:?} and {:?} overlap in their member",
                    entries[file].path,
                    entries[order[w + 1].0].path
                )));
            }
            continue;
        }
        let end = order
            .get(w + 1)
            .map_or(toc_offset, |&(f, c)| chunks[f][c].blob.start);
        if end <= start {
            return Err(bad(format!(
                "the chunks of {:?} are not in blob order before the TOC",
                entries[file].path
            )));
        }
        // zstd:chunked says where a chunk's frames end; the tar header
        // frames after it need not be fetched.
        let stated = this.blob.end;
        let end = if stated > start && stated < end && inner == 0 {
            stated
        } else {
            end
        };
        // Every chunk of the member ends where the member does.
        for &(f, c) in order[..=w].iter().rev() {
            if chunks[f][c].blob.start != start {
                break;
            }
            chunks[f][c].blob.end = end;
        }
    }
    Ok(Toc {
        entries,
        chunks,
        toc_offset,
    })
}

/// The chunk `json` describes in a file of `size` bytes (its member's end
/// is set later; `blob.end` is what the TOC says, if anything).
fn chunk_of(json: &JsonEntry, size: u64, limits: &Limits) -> Result<Chunk, TocError> {
    let bad = |problem: String| TocError::Malformed(problem);
    if json.chunk_offset >= size {
        return Err(bad(format!(
            "a chunk of {:?} starts past its end",
            json.name
        )));
    }
    let len = if json.chunk_size == 0 {
        size - json.chunk_offset
    } else {
        json.chunk_size.min(size - json.chunk_offset)
    };
    if len > limits.max_chunk {
        return Err(bad(format!(
            "a chunk of {:?} is {len} bytes, over the limit of {}",
            json.name, limits.max_chunk
        )));
    }
    // What a reader decompresses to reach the chunk is bounded too.
    if json.inner_offset > limits.max_chunk {
        return Err(bad(format!(
            "a chunk of {:?} starts {} bytes into its member, over the limit of {}",
            json.name, json.inner_offset, limits.max_chunk
        )));
    }
    if !json.chunk_type.is_empty() {
        return Err(bad(format!(
            "a chunk of {:?} has chunk type {:?}, which Pronto does not read",
            json.name, json.chunk_type
        )));
    }
    // zstd:chunked names only the file's digest when one chunk holds it.
    let whole = json.chunk_offset == 0 && len == size;
    let digest = if json.chunk_digest.is_empty() && whole {
        &json.digest
    } else {
        &json.chunk_digest
    };
    let digest = digest
        .strip_prefix("sha256:")
        .and_then(|h| hex::decode(h).ok())
        .and_then(|d| <[u8; 32]>::try_from(d).ok())
        .ok_or_else(|| {
            bad(format!(
                "a chunk of {:?} has no SHA-256 chunk digest ({:?}): its bytes could not be verified",
                json.name, json.chunk_digest
            ))
        })?;
    Ok(Chunk {
        file_offset: json.chunk_offset,
        len,
        blob: json.offset..json.end_offset,
        inner: json.inner_offset,
        digest,
    })
}

/// Seconds and nanoseconds since the epoch of an RFC 3339 time; empty is
/// the epoch.
fn modtime(text: &str) -> Option<(i64, u32)> {
    if text.is_empty() {
        return Some((0, 0));
    }
    let time =
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    Some((time.unix_timestamp(), time.nanosecond()))
}

mod dir;
mod order;
mod write;

pub use dir::{PackError, Packed, tar_of_dir};
pub use order::startup_first;

pub use write::{Converted, WriteOptions, write_chunked};

/// A zstd skippable frame holding `payload`.
fn skippable_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 8);
    frame.extend_from_slice(&ZSTD_SKIPPABLE_MAGIC.to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[cfg(test)]
mod tests;
