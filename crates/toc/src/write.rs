//! Writing chunked layers: a tar stream becomes a `tar+gzip` layer whose
//! file data is cut into chunks, each its own gzip member, followed by an
//! eStargz TOC and footer.
//!
//! The uncompressed stream is the source tar byte for byte, then the TOC's
//! own small tar. Tar readers stop at the source's end-of-archive marker,
//! so containerd, Docker and Podman unpack exactly the source tree (eStargz
//! as BuildKit writes it would add a `stargz.index.json` file to the
//! tree); readers of eStargz find the TOC through the footer, wherever it
//! lies.

use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use flate2::Compression;
use flate2::write::GzEncoder;
use pronto_layer::EntryKind;
use sha2::{Digest, Sha256};

use crate::{JsonEntry, JsonToc, TOC_TAR_NAME};

/// How a chunked layer is written.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Uncompressed bytes per chunk of a regular file (the last chunk of a
    /// file may be shorter).
    pub chunk_size: u64,
    /// gzip level, 0–9.
    pub level: u32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            chunk_size: 4 << 20,
            level: 6,
        }
    }
}

/// What [`write_chunked`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Converted {
    /// `sha256:<hex>` of the blob written, and its size.
    pub digest: String,
    pub size: u64,
    /// `sha256:<hex>` of the uncompressed stream: the layer's diff ID.
    pub diff_id: String,
    pub uncompressed_size: u64,
    /// `sha256:<hex>` of the TOC's JSON, for the manifest's layer
    /// annotation [`crate::TOC_DIGEST_ANNOTATION`].
    pub toc_digest: String,
}

/// Writes the chunked form of the uncompressed tar in `tar` to `out`.
pub fn write_chunked(
    tar: &std::fs::File,
    out: impl Write,
    options: &WriteOptions,
) -> io::Result<Converted> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let chunk_size = options.chunk_size.max(1);
    let mut members = Members::new(out, Compression::new(options.level.min(9)));
    let mut toc: Vec<JsonEntry> = Vec::new();
    let mut pos = 0u64;
    let mut reader = tar;
    io::Seek::seek(&mut reader, io::SeekFrom::Start(0))?;
    let mut archive = tar::Archive::new(&mut reader);
    // Seeking past file data: it is read once, for its chunks.
    for item in archive.entries_with_seek()? {
        let mut item = item?;
        let data_start = item.raw_file_position();
        let size = item.size();
        let entry = pronto_layer::tar_entry(&mut item).map_err(invalid)?;
        // Headers (and the padding of the entry before) go into the open
        // member.
        members.copy_tar(tar, pos, data_start)?;
        pos = data_start + size;
        let Some(entry) = entry else {
            members.copy_tar(tar, data_start, pos)?;
            continue;
        };
        let mut json = json_entry(&entry);
        if entry.kind != EntryKind::File || size == 0 {
            members.copy_tar(tar, data_start, pos)?;
            toc.push(json);
            continue;
        }
        let mut file_digest = Sha256::new();
        let first = toc.len();
        let mut written = 0u64;
        while written < size {
            let len = chunk_size.min(size - written);
            let mut chunk = vec![0u8; len as usize];
            tar.read_exact_at(&mut chunk, data_start + written)?;
            members.close()?;
            let offset = members.offset();
            members.write_tar(&chunk)?;
            file_digest.update(&chunk);
            let mut chunk_entry = if written == 0 {
                std::mem::take(&mut json)
            } else {
                JsonEntry {
                    name: entry.path.clone(),
                    kind: "chunk".into(),
                    ..Default::default()
                }
            };
            chunk_entry.offset = offset;
            chunk_entry.chunk_offset = written;
            // Zero means "to the end of the file".
            chunk_entry.chunk_size = if written + len < size { len } else { 0 };
            chunk_entry.chunk_digest = format!("sha256:{}", hex::encode(Sha256::digest(&chunk)));
            toc.push(chunk_entry);
            written += len;
        }
        toc[first].digest = format!("sha256:{}", hex::encode(file_digest.finalize()));
    }
    // The last entry's padding and the end-of-archive marker.
    let end = tar.metadata()?.len();
    members.copy_tar(tar, pos, end)?;
    members.close()?;

    let toc_json = serde_json::to_vec_pretty(&JsonToc {
        version: 1,
        entries: toc,
    })
    .map_err(|e| invalid(e.to_string()))?;
    let toc_offset = members.offset();
    let mut toc_tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(toc_json.len() as u64);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    toc_tar.append_data(&mut header, TOC_TAR_NAME, toc_json.as_slice())?;
    members.write_tar(&toc_tar.into_inner()?)?;
    members.close()?;
    members.write_raw(&footer(toc_offset))?;
    let (digest, size, diff_id, uncompressed_size) = members.finish()?;
    Ok(Converted {
        digest,
        size,
        diff_id,
        uncompressed_size,
        toc_digest: format!("sha256:{}", hex::encode(Sha256::digest(&toc_json))),
    })
}

/// The TOC entry of `entry` (chunk fields are filled by the caller).
fn json_entry(entry: &pronto_layer::Entry) -> JsonEntry {
    use base64::Engine as _;
    let kind = match entry.kind {
        EntryKind::File => "reg",
        EntryKind::Dir => "dir",
        EntryKind::Symlink => "symlink",
        EntryKind::Hardlink => "hardlink",
        EntryKind::CharDevice => "char",
        EntryKind::BlockDevice => "block",
        EntryKind::Fifo => "fifo",
    };
    let modtime = time::OffsetDateTime::from_unix_timestamp(entry.mtime)
        .ok()
        .and_then(|t| t.replace_nanosecond(entry.mtime_nsec).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    JsonEntry {
        name: if entry.kind == EntryKind::Dir {
            format!("{}/", entry.path)
        } else {
            entry.path.clone()
        },
        kind: kind.into(),
        size: entry.size,
        modtime,
        link_name: entry.link.clone(),
        mode: u64::from(entry.mode),
        uid: entry.uid,
        gid: entry.gid,
        user_name: entry.uname.clone(),
        group_name: entry.gname.clone(),
        dev_major: entry.dev_major,
        dev_minor: entry.dev_minor,
        xattrs: entry
            .xattrs
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    base64::engine::general_purpose::STANDARD.encode(v),
                )
            })
            .collect(),
        ..Default::default()
    }
}

/// The 51-byte eStargz footer: an empty gzip member whose extra field
/// names where the TOC's member starts.
fn footer(toc_offset: u64) -> Vec<u8> {
    let mut footer = vec![
        0x1f, 0x8b, 8, 4, 0, 0, 0, 0, 0, 0xff, 26, 0, b'S', b'G', 22, 0,
    ];
    footer.extend_from_slice(format!("{toc_offset:016x}STARGZ").as_bytes());
    // An empty, final, stored deflate block; CRC-32 and size of nothing.
    footer.extend_from_slice(&[1, 0, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    debug_assert_eq!(footer.len() as u64, crate::FOOTER_SIZE);
    footer
}

/// The blob being written: gzip members one after another, with the
/// digests of the blob and of the uncompressed stream.
struct Members<W> {
    out: W,
    written: u64,
    blob: Sha256,
    diff: Sha256,
    uncompressed: u64,
    level: Compression,
    member: Option<GzEncoder<Vec<u8>>>,
}

impl<W: Write> Members<W> {
    fn new(out: W, level: Compression) -> Self {
        Self {
            out,
            written: 0,
            blob: Sha256::new(),
            diff: Sha256::new(),
            uncompressed: 0,
            level,
            member: None,
        }
    }

    /// Where the next member starts (when none is open).
    fn offset(&self) -> u64 {
        self.written
    }

    /// Appends uncompressed bytes to the open member, opening one if none
    /// is.
    fn write_tar(&mut self, bytes: &[u8]) -> io::Result<()> {
        let level = self.level;
        let member = self
            .member
            .get_or_insert_with(|| GzEncoder::new(Vec::new(), level));
        member.write_all(bytes)?;
        self.diff.update(bytes);
        self.uncompressed += bytes.len() as u64;
        Ok(())
    }

    /// [`Self::write_tar`] of bytes `start..end` of `tar`.
    fn copy_tar(&mut self, tar: &std::fs::File, start: u64, end: u64) -> io::Result<()> {
        if end <= start {
            return Ok(());
        }
        // Most calls copy one header (512 bytes to a few KiB): the buffer
        // is no larger than what is copied.
        let mut buf = vec![0u8; (end - start).min(1 << 20) as usize];
        let mut at = start;
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            tar.read_exact_at(&mut buf[..n], at)?;
            self.write_tar(&buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// Ends the open member, if any.
    fn close(&mut self) -> io::Result<()> {
        if let Some(member) = self.member.take() {
            let bytes = member.finish()?;
            self.write_raw(&bytes)?;
        }
        Ok(())
    }

    fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.blob.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Blob digest and size, diff ID and uncompressed size.
    fn finish(mut self) -> io::Result<(String, u64, String, u64)> {
        self.close()?;
        self.out.flush()?;
        Ok((
            format!("sha256:{}", hex::encode(self.blob.finalize())),
            self.written,
            format!("sha256:{}", hex::encode(self.diff.finalize())),
            self.uncompressed,
        ))
    }
}
