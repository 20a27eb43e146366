//! Checks an index before anything trusts it: every count, offset, length
//! and name is within bounds and consistent, so that readers can index
//! slices and add offsets without further checks.

use crate::error::IndexError;
use crate::format::{IndexMeta, LayerCompression, Limits};
use crate::gzip::WINDOW_SIZE;

pub fn validate(meta: &IndexMeta, limits: &Limits) -> Result<(), IndexError> {
    let bad = |problem: String| Err(IndexError::Malformed(problem));
    let layer = &meta.layer;
    let hex_ok = layer.digest.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if !hex_ok {
        return bad(format!(
            "layer digest {:?} is not a sha256 digest",
            layer.digest
        ));
    }
    if meta.entries.len() > limits.max_entries {
        return bad(format!(
            "{} entries, over the limit of {}",
            meta.entries.len(),
            limits.max_entries
        ));
    }
    if meta.spans.len() > limits.max_spans {
        return bad(format!(
            "{} spans, over the limit of {}",
            meta.spans.len(),
            limits.max_spans
        ));
    }
    if meta.head_size != 0 && !(4096..=16 << 20).contains(&meta.head_size) {
        return bad(format!(
            "span heads of {} bytes (0, or 4 KiB to 16 MiB)",
            meta.head_size
        ));
    }
    validate_spans(meta)?;
    let entry_limits = pronto_layer::EntryLimits {
        max_name_len: limits.max_name_len,
        max_xattrs: limits.max_xattrs_per_entry,
        max_xattr_value: limits.max_xattr_value,
    };
    for (i, entry) in meta.entries.iter().enumerate() {
        if let Some(problem) = entry.problem(&entry_limits) {
            return bad(format!("entry {i} ({:?}) has {problem}", entry.path));
        }
        let end = entry.offset.checked_add(entry.size);
        if end.is_none_or(|end| end > layer.uncompressed_size) {
            return bad(format!(
                "entry {:?} ends past the {}-byte tar stream",
                entry.path, layer.uncompressed_size
            ));
        }
    }
    Ok(())
}

fn validate_spans(meta: &IndexMeta) -> Result<(), IndexError> {
    let bad = |problem: String| Err(IndexError::Malformed(problem));
    let layer = &meta.layer;
    let Some(first) = meta.spans.first() else {
        return bad("the index has no spans".into());
    };
    if first.uncompressed_start != 0 || first.compressed_start != 0 {
        return bad("the first span does not start at byte 0".into());
    }
    if layer.compression == LayerCompression::Zstd {
        return bad("it claims a zstd layer, and zstd layers are not indexed".into());
    }
    let gzip = layer.compression == LayerCompression::Gzip;
    for (i, span) in meta.spans.iter().enumerate() {
        let next_start = meta
            .spans
            .get(i + 1)
            .map_or(layer.uncompressed_size, |n| n.uncompressed_start);
        if next_start <= span.uncompressed_start || next_start > layer.uncompressed_size {
            return bad(format!(
                "span {i} has an empty or out-of-order output range"
            ));
        }
        if span.compressed_start >= span.compressed_end || span.compressed_end > layer.size {
            return bad(format!(
                "span {i} lies outside the {}-byte layer",
                layer.size
            ));
        }
        if let Some(next) = meta.spans.get(i + 1)
            && (next.compressed_start < span.compressed_start
                || next.compressed_start > span.compressed_end)
        {
            return bad(format!("spans {i} and {} do not follow each other", i + 1));
        }
        match (&span.checkpoint, gzip) {
            (None, false) => {
                let same = span.compressed_start == span.uncompressed_start
                    && span.compressed_end == next_start;
                if !same {
                    return bad(format!("span {i} of an uncompressed layer is not 1:1"));
                }
            }
            (Some(cp), true) => {
                let prime = u64::from(cp.bits > 0);
                if cp.bits > 7
                    || cp.deflate_offset < span.compressed_start + prime
                    || cp.deflate_offset > span.compressed_end
                {
                    return bad(format!("span {i} has an invalid checkpoint position"));
                }
                let window_end = cp.window_offset.checked_add(u64::from(cp.window_length));
                if cp.window_size as usize > WINDOW_SIZE
                    || window_end.is_none_or(|end| end > meta.windows_length)
                {
                    return bad(format!("span {i} has an invalid window"));
                }
            }
            _ => return bad(format!("span {i} does not match the layer's compression")),
        }
    }
    if meta.spans.last().map(|s| s.compressed_end) != Some(layer.size) {
        return bad("the spans do not cover the whole layer".into());
    }
    Ok(())
}
