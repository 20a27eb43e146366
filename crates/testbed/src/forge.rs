//! Forged Pronto indexes, made as an attacker who can push to a repository
//! (but not change the image or its tag) would: the index metadata decoded,
//! edited and encoded again, windows replaced with their digests
//! recomputed, so that every digest in and around the index is correct and
//! only the comparison with the layer itself can tell.

use std::io::{Read, Write};

use anyhow::{Context, Result, bail};
use pronto_index::{EntryKind, IndexMeta, LayerIndex, encode_prefix};
use sha2::{Digest, Sha256};

/// One way of lying about a layer.
#[derive(Debug, Clone)]
pub enum Forgery {
    /// File `path` is served with the bytes of file `source`.
    OtherFilesBytes { path: String, source: String },
    /// File `path` becomes setuid root (`-rwsr-xr-x root root`).
    SetuidRoot { path: String },
    /// A file `path` that the layer does not have, with the bytes of file
    /// `source`.
    AddedEntry { path: String, source: String },
    /// Span `span`'s output is said to start `by` bytes later.
    ShiftedSpan { span: usize, by: u64 },
    /// Span `span`'s head digest is that of other bytes.
    WrongHead { span: usize },
    /// Span `span`'s window has its ASCII letters upper-cased (and its
    /// digest recomputed): data decoded through it changes.
    AlteredWindow { span: usize },
}

/// A forged index blob and what an artifact manifest says about it.
#[derive(Debug, Clone)]
pub struct ForgedIndex {
    pub blob: Vec<u8>,
    pub digest: String,
    pub prefix_size: u64,
    pub prefix_digest: String,
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Applies `forgery` to the genuine index blob `genuine`.
pub fn forge(genuine: &[u8], forgery: &Forgery) -> Result<ForgedIndex> {
    let index = LayerIndex::parse(genuine).context("parse the genuine index")?;
    let mut meta = index.meta().clone();
    let mut windows = genuine[index.prefix_len() as usize..].to_vec();
    let file = |meta: &IndexMeta, path: &str| {
        meta.entries
            .iter()
            .position(|e| e.path == path && e.kind == EntryKind::File)
            .with_context(|| format!("the layer has no file {path}"))
    };
    match forgery {
        Forgery::OtherFilesBytes { path, source } => {
            let (target, source) = (file(&meta, path)?, file(&meta, source)?);
            let source = meta.entries[source].clone();
            meta.entries[target].offset = source.offset;
            meta.entries[target].size = source.size;
        }
        Forgery::SetuidRoot { path } => {
            let target = file(&meta, path)?;
            let entry = &mut meta.entries[target];
            entry.mode = 0o4755;
            entry.uid = 0;
            entry.gid = 0;
            entry.uname = "root".into();
            entry.gname = "root".into();
        }
        Forgery::AddedEntry { path, source } => {
            let mut entry = meta.entries[file(&meta, source)?].clone();
            entry.path = path.clone();
            entry.mode = 0o755;
            meta.entries.push(entry);
        }
        Forgery::ShiftedSpan { span, by } => {
            let Some(target) = meta.spans.get_mut(*span) else {
                bail!("the index has no span {span}");
            };
            target.uncompressed_start += by;
        }
        Forgery::WrongHead { span } => {
            let Some(target) = meta.spans.get_mut(*span) else {
                bail!("the index has no span {span}");
            };
            target.head_digest = Sha256::digest(b"other bytes").into();
        }
        Forgery::AlteredWindow { span } => {
            let Some(checkpoint) = meta.spans.get(*span).and_then(|s| s.checkpoint.clone()) else {
                bail!("span {span} has no checkpoint");
            };
            let start = checkpoint.window_offset as usize;
            let compressed = &windows[start..start + checkpoint.window_length as usize];
            let mut window = Vec::new();
            flate2::read::DeflateDecoder::new(compressed).read_to_end(&mut window)?;
            window.make_ascii_uppercase();
            let mut encoder =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(6));
            encoder.write_all(&window)?;
            let altered = encoder.finish()?;
            let cp = meta.spans[*span]
                .checkpoint
                .as_mut()
                .expect("checked above");
            cp.window_offset = windows.len() as u64;
            cp.window_length = altered.len() as u32;
            cp.window_digest = Sha256::digest(&altered).into();
            windows.extend_from_slice(&altered);
            meta.windows_length = windows.len() as u64;
        }
    }
    let prefix = encode_prefix(&meta)?;
    let mut blob = prefix.clone();
    blob.extend_from_slice(&windows);
    Ok(ForgedIndex {
        digest: sha256(&blob),
        prefix_size: prefix.len() as u64,
        prefix_digest: sha256(&prefix),
        blob,
    })
}
