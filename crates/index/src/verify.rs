//! Checking an index against the layer it claims to describe, once the
//! whole layer blob is at hand. An index is metadata anyone who can push a
//! referrer may have written; the layer blob is verified against the image
//! manifest. Everything the index says is derived again from the blob —
//! the file table, the span boundaries, each checkpoint's position and
//! window, each span's digest — and compared. Spans are scanned at the
//! boundaries the index claims, so an index built with another span size
//! (or by another version of Pronto) checks out as long as it is true.

use std::io::{Read, Seek};

use crate::build::{Boundaries, LayerToIndex, Scanned, scan};
use crate::error::IndexError;
use crate::format::{Entry, IndexMeta};
use crate::read::LayerIndex;

/// Checks `index` against the whole layer `blob` (which must hash to the
/// layer digest the index names). `windows` is the index blob's
/// [`LayerIndex::windows_range`], as the index claims it.
///
/// Returns [`IndexError::Mismatch`] naming the first difference found.
pub fn verify_against_layer(
    index: &LayerIndex,
    blob: impl Read,
    windows: &[u8],
) -> Result<(), IndexError> {
    LayerTruth::scan(index, blob)?.compare(index, windows)
}

/// What a layer blob itself says, scanned at the span boundaries an index
/// claims; compared with the index afterwards (so that the index's windows
/// can be fetched once the scan is known to have succeeded).
pub struct LayerTruth {
    scanned: Scanned,
}

impl std::fmt::Debug for LayerTruth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerTruth")
            .field("layer", &self.scanned.layer.digest)
            .finish_non_exhaustive()
    }
}

impl LayerTruth {
    /// Reads the whole layer `blob` once. Fails if it is not the layer the
    /// index names, or not a layer at all.
    pub fn scan(index: &LayerIndex, blob: impl Read) -> Result<Self, IndexError> {
        let meta = index.meta();
        let layer = LayerToIndex {
            digest: meta.layer.digest.clone(),
            size: meta.layer.size,
            compression: meta.layer.compression,
        };
        let starts = meta.spans.iter().map(|s| s.uncompressed_start).collect();
        let scanned =
            scan(blob, &layer, Boundaries::At(starts), meta.head_size).map_err(|e| match e {
                // A claimed tar stream that the layer does not have.
                IndexError::Unsupported { digest, problem }
                | IndexError::CorruptLayer {
                    digest, problem, ..
                } => IndexError::Mismatch {
                    layer: digest,
                    problem: format!("the layer does not read as the index says: {problem}"),
                },
                other => other,
            })?;
        Ok(Self { scanned })
    }

    /// Compares the index with what the scan found.
    pub fn compare(mut self, index: &LayerIndex, windows: &[u8]) -> Result<(), IndexError> {
        let meta = index.meta();
        let truth = &mut self.scanned;
        let mismatch = |problem: String| IndexError::Mismatch {
            layer: meta.layer.digest.clone(),
            problem,
        };
        if truth.layer.uncompressed_size != meta.layer.uncompressed_size {
            return Err(mismatch(format!(
                "the index says the tar stream has {} bytes, the layer has {}",
                meta.layer.uncompressed_size, truth.layer.uncompressed_size
            )));
        }
        compare_entries(&meta.entries, &truth.entries).map_err(mismatch)?;
        let mut true_windows = Vec::new();
        truth.windows.rewind()?;
        truth.windows.read_to_end(&mut true_windows)?;
        compare_spans(index, &truth.spans, &true_windows, windows).map_err(mismatch)
    }
}

fn compare_entries(claimed: &[Entry], truth: &[Entry]) -> Result<(), String> {
    for (i, (c, t)) in claimed.iter().zip(truth).enumerate() {
        if c == t {
            continue;
        }
        if c.path != t.path {
            return Err(format!(
                "entry {i} is {:?} in the index but {:?} in the layer",
                c.path, t.path
            ));
        }
        let field = differing_field(c, t);
        return Err(format!(
            "entry {:?}: its {field} in the index differs from the layer's",
            c.path
        ));
    }
    if claimed.len() != truth.len() {
        let extra = claimed
            .get(truth.len())
            .map(|e| format!(" (first extra: {:?})", e.path))
            .unwrap_or_default();
        return Err(format!(
            "the index lists {} entries, the layer has {}{extra}",
            claimed.len(),
            truth.len()
        ));
    }
    Ok(())
}

/// The name of the first field in which two entries of one path differ.
fn differing_field(c: &Entry, t: &Entry) -> &'static str {
    let checks: [(&str, bool); 13] = [
        ("type", c.kind == t.kind),
        ("mode", c.mode == t.mode),
        ("owner", c.uid == t.uid && c.gid == t.gid),
        ("owner name", c.uname == t.uname && c.gname == t.gname),
        ("size", c.size == t.size),
        ("data offset", c.offset == t.offset),
        ("link target", c.link == t.link),
        ("modification time", c.mtime == t.mtime),
        ("modification time", c.mtime_nsec == t.mtime_nsec),
        ("device numbers", c.dev_major == t.dev_major),
        ("device numbers", c.dev_minor == t.dev_minor),
        ("extended attributes", c.xattrs == t.xattrs),
        ("PAX records", c.pax == t.pax),
    ];
    checks
        .into_iter()
        .find(|(_, same)| !same)
        .map_or("metadata", |(name, _)| name)
}

fn compare_spans(
    index: &LayerIndex,
    truth: &[crate::format::Span],
    true_windows: &[u8],
    claimed_windows: &[u8],
) -> Result<(), String> {
    let meta: &IndexMeta = index.meta();
    if truth.len() != meta.spans.len() {
        // Scanning stops making spans where a claimed start is not a
        // deflate block boundary of the layer.
        let i = truth.len();
        return Err(format!(
            "span {i} starts at tar byte {}, which is not a deflate block boundary of the layer",
            meta.spans[i.min(meta.spans.len() - 1)].uncompressed_start
        ));
    }
    for (i, (c, t)) in meta.spans.iter().zip(truth).enumerate() {
        if (c.compressed_start, c.compressed_end) != (t.compressed_start, t.compressed_end) {
            return Err(format!(
                "span {i} covers layer bytes {}..{}, the layer's span there is {}..{}",
                c.compressed_start, c.compressed_end, t.compressed_start, t.compressed_end
            ));
        }
        if c.digest != t.digest {
            return Err(format!("span {i} has a digest that is not its bytes'"));
        }
        if meta.head_size > 0 && c.head_digest != t.head_digest {
            return Err(format!(
                "span {i} has a head digest that is not its first bytes'"
            ));
        }
        match (&c.checkpoint, &t.checkpoint) {
            (None, None) => {}
            (Some(cc), Some(tc)) => {
                if (cc.deflate_offset, cc.bits, cc.window_size)
                    != (tc.deflate_offset, tc.bits, tc.window_size)
                {
                    return Err(format!(
                        "span {i} resumes at bit {} of byte {} with a {}-byte window; the layer's block boundary is at bit {} of byte {} with {} bytes of history",
                        cc.bits,
                        cc.deflate_offset,
                        cc.window_size,
                        tc.bits,
                        tc.deflate_offset,
                        tc.window_size
                    ));
                }
                let claimed = window_bytes(claimed_windows, cc.window_offset, cc.window_length)
                    .ok_or_else(|| format!("span {i}'s window lies outside the windows"))?;
                let claimed = index.decode_window(i, claimed).map_err(|e| e.to_string())?;
                let true_bytes = window_bytes(true_windows, tc.window_offset, tc.window_length)
                    .ok_or_else(|| format!("span {i}: the layer's window is missing"))?;
                if claimed != inflate_window(true_bytes)? {
                    return Err(format!(
                        "span {i}'s window is not the layer's data before it"
                    ));
                }
            }
            _ => return Err(format!("span {i} has a checkpoint the layer does not")),
        }
    }
    Ok(())
}

fn window_bytes(section: &[u8], offset: u64, length: u32) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    section.get(start..start.checked_add(length as usize)?)
}

fn inflate_window(compressed: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::DeflateDecoder::new(compressed)
        .take(crate::gzip::WINDOW_SIZE as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("a window made from the layer does not decompress: {e}"))?;
    Ok(out)
}
