//! Writing chunked layers: a tar stream becomes a `tar+gzip` layer whose
//! file data is cut into chunks, each its own gzip member, followed by an
//! eStargz TOC and footer; or a `tar+zstd` layer whose chunks are zstd
//! frames, followed by the same TOC in a skippable frame (zstd:chunked, as
//! stargz-snapshotter writes it).
//!
//! The uncompressed stream is the source tar byte for byte, then (gzip
//! only) the TOC's own small tar. Tar readers stop at the source's
//! end-of-archive marker, so containerd, Docker and Podman unpack exactly
//! the source tree (eStargz as BuildKit writes it would add a
//! `stargz.index.json` file to the tree); readers of eStargz find the TOC
//! through the footer, wherever it lies. zstd decoders skip skippable
//! frames.
//!
//! Files are cut where their content says (FastCDC, around
//! [`WriteOptions::chunk_size`] bytes), not at fixed offsets: a file that
//! changes in one place keeps its other chunks, and so their digests, and a
//! node that has them does not fetch them again.

use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use flate2::write::GzEncoder;
use pronto_layer::{Compression, EntryKind};
use sha2::{Digest, Sha256};

use crate::{
    JsonEntry, JsonToc, SMALL_FILE, TOC_DIGEST_ANNOTATION, TOC_TAR_NAME,
    UNCOMPRESSED_SIZE_ANNOTATION, ZSTD_CHECKSUM_ANNOTATIONS, ZSTD_MANIFEST_TYPE_TOC,
    ZSTD_POSITION_ANNOTATIONS,
};

/// How a chunked layer is written.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// The average uncompressed size of a chunk of a regular file; chunks
    /// are a quarter to four times this.
    pub chunk_size: u64,
    /// gzip (eStargz) or zstd (zstd:chunked).
    pub compression: Compression,
    /// The compression level: gzip 0–9, zstd 1–19; `None` is the
    /// format's usual default (6, 3).
    pub level: Option<u32>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            chunk_size: 1 << 20,
            compression: Compression::Gzip,
            level: None,
        }
    }
}

/// The magic number ending a zstd:chunked footer ("GNUlInUx").
const ZSTD_FOOTER_MAGIC: &[u8; 8] = b"GNUlInUx";

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
    /// The layer annotations the image manifest needs for readers to find
    /// and trust the TOC.
    pub annotations: Vec<(String, String)>,
    /// The layer's media type.
    pub media_type: &'static str,
}

/// Writes the chunked form of the uncompressed tar in `tar` to `out`.
pub fn write_chunked(
    tar: &std::fs::File,
    out: impl Write,
    options: &WriteOptions,
) -> io::Result<Converted> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let cuts = Cuts::around(options.chunk_size);
    let (compression, media_type) = match options.compression {
        Compression::Gzip => (
            Codec::Gzip(flate2::Compression::new(options.level.unwrap_or(6).min(9))),
            "application/vnd.oci.image.layer.v1.tar+gzip",
        ),
        Compression::Zstd => (
            Codec::Zstd(options.level.unwrap_or(3).clamp(1, 19) as i32),
            "application/vnd.oci.image.layer.v1.tar+zstd",
        ),
        Compression::None => {
            return Err(invalid("a chunked layer is compressed".into()));
        }
    };
    let mut members = Members::new(out, compression);
    let mut toc: Vec<JsonEntry> = Vec::new();
    let mut pos = 0u64;
    // The file bytes of the run of small files whose member is open.
    let mut run: Option<u64> = None;
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
        let mut chunks = cuts.chunks(tar, data_start, size);
        // A small file's chunks are cut first, to know whether it is one.
        let cut: Vec<io::Result<Vec<u8>>> = if size <= SMALL_FILE {
            chunks.by_ref().collect()
        } else {
            Vec::new()
        };
        let small = cut.len() == 1 && members.groups();
        for chunk in cut.into_iter().chain(chunks) {
            let chunk = chunk?;
            let len = chunk.len() as u64;
            let digest: [u8; 32] = Sha256::digest(&chunk).into();
            if !small || run.is_none() {
                members.close()?;
            }
            let offset = members.offset();
            let inner = members.open_bytes();
            members.write_tar(&chunk)?;
            file_digest.update(&chunk);
            run = if small {
                let bytes = run.unwrap_or(0) + len;
                (!crate::ends_run(&digest, bytes)).then_some(bytes)
            } else {
                None
            };
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
            chunk_entry.inner_offset = inner;
            chunk_entry.chunk_offset = written;
            // Zero means "to the end of the file".
            chunk_entry.chunk_size = if written + len < size { len } else { 0 };
            chunk_entry.chunk_digest = format!("sha256:{}", hex::encode(digest));
            toc.push(chunk_entry);
            written += len;
        }
        if written != size {
            return Err(invalid(format!(
                "{}: {written} of its {size} bytes were read",
                entry.path
            )));
        }
        toc[first].digest = format!("sha256:{}", hex::encode(file_digest.finalize()));
    }
    // The last entry's padding and the end-of-archive marker.
    let end = tar.metadata()?.len();
    members.copy_tar(tar, pos, end)?;
    members.close()?;

    let toc_json = serde_json::to_vec(&JsonToc {
        version: 1,
        entries: toc,
    })
    .map_err(|e| invalid(e.to_string()))?;
    let toc_digest = format!("sha256:{}", hex::encode(Sha256::digest(&toc_json)));
    let toc_offset = members.offset();
    let mut annotations = vec![(TOC_DIGEST_ANNOTATION.to_owned(), toc_digest.clone())];
    match members.codec {
        Codec::Gzip(_) => {
            let mut toc_tar = tar::Builder::new(Vec::new());
            let mut header = tar::Header::new_ustar();
            header.set_size(toc_json.len() as u64);
            header.set_mode(0o644);
            header.set_entry_type(tar::EntryType::Regular);
            toc_tar.append_data(&mut header, TOC_TAR_NAME, toc_json.as_slice())?;
            members.write_tar(&toc_tar.into_inner()?)?;
            members.close()?;
            members.write_raw(&footer(toc_offset))?;
        }
        Codec::Zstd(level) => {
            // The TOC is compressed, but not part of the layer's stream.
            let compressed = zstd::bulk::compress(&toc_json, level)?;
            let start = toc_offset + 8;
            members.write_raw(&crate::skippable_frame(&compressed))?;
            let mut footer = Vec::with_capacity(40);
            for n in [
                start,
                compressed.len() as u64,
                toc_json.len() as u64,
                ZSTD_MANIFEST_TYPE_TOC,
            ] {
                footer.extend_from_slice(&n.to_le_bytes());
            }
            footer.extend_from_slice(ZSTD_FOOTER_MAGIC);
            members.write_raw(&crate::skippable_frame(&footer))?;
            // The names stargz-snapshotter writes: containers/storage's
            // newer names promise tar-split data, which these layers do
            // not carry.
            annotations.push((
                ZSTD_CHECKSUM_ANNOTATIONS[1].to_owned(),
                format!("sha256:{}", hex::encode(Sha256::digest(&compressed))),
            ));
            annotations.push((
                ZSTD_POSITION_ANNOTATIONS[1].to_owned(),
                format!(
                    "{start}:{}:{}:{ZSTD_MANIFEST_TYPE_TOC}",
                    compressed.len(),
                    toc_json.len()
                ),
            ));
        }
    }
    let (digest, size, diff_id, uncompressed_size) = members.finish()?;
    annotations.push((
        UNCOMPRESSED_SIZE_ANNOTATION.to_owned(),
        uncompressed_size.to_string(),
    ));
    Ok(Converted {
        digest,
        size,
        diff_id,
        uncompressed_size,
        toc_digest,
        annotations,
        media_type,
    })
}

/// FastCDC's bounds around an average chunk size, within what its 2020
/// variant accepts.
struct Cuts {
    min: u32,
    average: u32,
    max: u32,
}

impl Cuts {
    fn around(average: u64) -> Self {
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MINIMUM_MIN};
        let average = (average.min(u64::from(AVERAGE_MAX)) as u32).max(AVERAGE_MIN);
        Self {
            min: (average / 4).max(MINIMUM_MIN),
            average,
            max: average.saturating_mul(4).min(MAXIMUM_MAX),
        }
    }
}

impl Cuts {
    /// The chunks of the `size` bytes at `start` of `file`. A file that
    /// fits in a few chunks is read whole and cut in memory; a bigger one
    /// is streamed, never held whole.
    fn chunks<'a>(
        &self,
        file: &'a std::fs::File,
        start: u64,
        size: u64,
    ) -> Box<dyn Iterator<Item = io::Result<Vec<u8>>> + 'a> {
        if size <= u64::from(self.max) * 4 {
            let mut data = vec![0u8; size as usize];
            if let Err(e) = file.read_exact_at(&mut data, start) {
                return Box::new(std::iter::once(Err(e)));
            }
            if size <= u64::from(self.min) {
                return Box::new(std::iter::once(Ok(data)));
            }
            let cuts: Vec<(usize, usize)> =
                fastcdc::v2020::FastCDC::new(&data, self.min, self.average, self.max)
                    .map(|c| (c.offset, c.length))
                    .collect();
            return Box::new(
                cuts.into_iter()
                    .map(move |(offset, length)| Ok(data[offset..offset + length].to_vec())),
            );
        }
        let data = FileRange {
            file,
            at: start,
            end: start + size,
        };
        Box::new(
            fastcdc::v2020::StreamCDC::new(data, self.min, self.average, self.max).map(|chunk| {
                chunk
                    .map(|c| c.data)
                    .map_err(|e| io::Error::other(e.to_string()))
            }),
        )
    }
}

/// Bytes `at..end` of a file, read by position.
struct FileRange<'a> {
    file: &'a std::fs::File,
    at: u64,
    end: u64,
}

impl Read for FileRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.end - self.at).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..n], self.at)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.at += n as u64;
        Ok(n)
    }
}

/// How members are compressed.
#[derive(Debug, Clone, Copy)]
enum Codec {
    Gzip(flate2::Compression),
    /// zstd level.
    Zstd(i32),
}

/// One member or frame being written.
enum Member {
    Gzip(GzEncoder<Vec<u8>>),
    Zstd(zstd::Encoder<'static, Vec<u8>>),
}

impl Member {
    fn new(codec: Codec) -> io::Result<Self> {
        Ok(match codec {
            Codec::Gzip(level) => Member::Gzip(GzEncoder::new(Vec::new(), level)),
            Codec::Zstd(level) => Member::Zstd(zstd::Encoder::new(Vec::new(), level)?),
        })
    }

    fn write_all(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Member::Gzip(e) => e.write_all(bytes),
            Member::Zstd(e) => e.write_all(bytes),
        }
    }

    fn finish(self) -> io::Result<Vec<u8>> {
        match self {
            Member::Gzip(e) => e.finish(),
            Member::Zstd(e) => e.finish(),
        }
    }
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
        link_name: entry.link.to_string(),
        mode: u64::from(entry.mode),
        uid: entry.uid,
        gid: entry.gid,
        user_name: entry.uname.to_string(),
        group_name: entry.gname.to_string(),
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

/// The blob being written: gzip members or zstd frames one after another,
/// with the digests of the blob and of the uncompressed stream.
struct Members<W> {
    out: W,
    written: u64,
    blob: Sha256,
    diff: Sha256,
    uncompressed: u64,
    codec: Codec,
    member: Option<Member>,
    /// Uncompressed bytes in the open member.
    open: u64,
}

impl<W: Write> Members<W> {
    fn new(out: W, codec: Codec) -> Self {
        Self {
            out,
            written: 0,
            blob: Sha256::new(),
            diff: Sha256::new(),
            uncompressed: 0,
            codec,
            member: None,
            open: 0,
        }
    }

    /// Whether small files share members: gzip only, as eStargz's
    /// `innerOffset` allows; zstd:chunked readers know no such offset.
    fn groups(&self) -> bool {
        matches!(self.codec, Codec::Gzip(_))
    }

    /// Uncompressed bytes written to the open member so far.
    fn open_bytes(&self) -> u64 {
        self.open
    }

    /// Where the next member starts (when none is open).
    fn offset(&self) -> u64 {
        self.written
    }

    /// Appends uncompressed bytes to the open member, opening one if none
    /// is.
    fn write_tar(&mut self, bytes: &[u8]) -> io::Result<()> {
        let member = match &mut self.member {
            Some(member) => member,
            None => self.member.insert(Member::new(self.codec)?),
        };
        member.write_all(bytes)?;
        self.open += bytes.len() as u64;
        self.diff.update(bytes);
        self.uncompressed += bytes.len() as u64;
        Ok(())
    }

    /// [`Self::write_tar`] of bytes `start..end` of `tar`.
    fn copy_tar(&mut self, tar: &std::fs::File, start: u64, end: u64) -> io::Result<()> {
        crate::order::each_part(tar, start..end, |part| self.write_tar(part))
    }

    /// Ends the open member, if any.
    fn close(&mut self) -> io::Result<()> {
        if let Some(member) = self.member.take() {
            self.open = 0;
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
