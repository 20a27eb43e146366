//! Tables of contents of chunked layers, parsed and checked before anything
//! trusts them.
//!
//! A chunked layer is a valid `tar+gzip` layer whose file data is cut into
//! chunks, each compressed as its own gzip member, with a table of
//! contents (TOC) that says where every chunk lies in the blob and what its
//! uncompressed bytes hash to. The format read here is eStargz, what
//! BuildKit, `ctr-remote` and stargz-snapshotter write: the TOC is a JSON
//! document (`stargz.index.json`) in a tar in a gzip member near the end of
//! the blob, found through a 51-byte footer (47 bytes in the legacy stargz
//! form). The image manifest names the SHA-256 of the TOC's JSON in the
//! layer annotation [`TOC_DIGEST_ANNOTATION`]; that digest, signed into the
//! manifest digest, is what makes the TOC and every chunk digest in it
//! trustworthy.
//!
//! Only what the filesystem needs leaves this crate: the entries as
//! [`pronto_layer::Entry`] and per regular file its [`Chunk`]s. Every
//! offset, length, name and count is checked first, so that readers can
//! index and add without further checks.

use std::collections::HashMap;
use std::io::Read;
use std::ops::Range;

use base64::Engine as _;
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
    /// member to the start of the next member holding data (or the TOC).
    /// The first `len` bytes this decompresses to are the chunk.
    pub blob: Range<u64>,
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
    chunk_offset: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    chunk_size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    chunk_digest: String,
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
            uname: users.get(&json.uid).cloned().unwrap_or_default(),
            gname: groups.get(&json.gid).cloned().unwrap_or_default(),
            mtime,
            mtime_nsec,
            size: if kind == EntryKind::File {
                json.size
            } else {
                0
            },
            offset: 0,
            link,
            dev_major: json.dev_major,
            dev_minor: json.dev_minor,
            xattrs,
            pax: Vec::new(),
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
    // Each member ends where the next one holding data begins.
    for w in 0..order.len() {
        let (file, chunk) = order[w];
        let start = chunks[file][chunk].blob.start;
        let end = match order.get(w + 1) {
            Some(&(f, c)) => chunks[f][c].blob.start,
            None => toc_offset,
        };
        if end <= start {
            return Err(bad(format!(
                "the chunks of {:?} are not in blob order before the TOC",
                entries[file].path
            )));
        }
        chunks[file][chunk].blob.end = end;
    }
    Ok(Toc {
        entries,
        chunks,
        toc_offset,
    })
}

/// The chunk `json` describes in a file of `size` bytes (its member's end
/// is set later).
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
    let digest = json
        .chunk_digest
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
        blob: json.offset..json.offset,
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

mod write;

pub use write::{Converted, WriteOptions, write_chunked};

#[cfg(test)]
mod tests;
