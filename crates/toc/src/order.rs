//! Startup order: a layer's tar with the files a container reads at start
//! moved to its front, so that a converted layer holds them together and a
//! node fetches them in few requests.
//!
//! Only the order of entries changes, never an entry's bytes, and only
//! where order cannot change the tree a tar reader builds: a moved entry is
//! a regular file or directory named once in the layer, and no whiteout or
//! opaque marker of the layer touches it or a directory above it. A file's
//! directories (those the layer has as entries) move with it, ahead of it.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use pronto_layer::{EntryKind, Marker};

/// One tar entry: its bytes (extension headers, header, data, padding).
struct Item {
    span: std::ops::Range<u64>,
    path: String,
    kind: Option<EntryKind>,
}

/// Writes the tar in `tar` to `out` with the regular files named in
/// `first` (layer paths, no leading `/`, in the order wanted) and their
/// directories moved to the front. Returns how many files moved; names
/// that cannot move (absent, not a regular file, named twice, under a
/// whiteout) keep their place.
pub fn startup_first(
    tar: &std::fs::File,
    out: &mut impl Write,
    first: &[String],
) -> io::Result<usize> {
    let invalid = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let mut items: Vec<Item> = Vec::new();
    let mut reader = tar;
    io::Seek::seek(&mut reader, io::SeekFrom::Start(0))?;
    let mut archive = tar::Archive::new(&mut reader);
    let mut end = 0u64;
    for item in archive.entries_with_seek()? {
        let mut item = item?;
        let data_end = item.raw_file_position() + item.size().next_multiple_of(512);
        let entry = pronto_layer::tar_entry(&mut item).map_err(invalid)?;
        items.push(Item {
            span: end..data_end,
            path: entry.as_ref().map(|e| e.path.clone()).unwrap_or_default(),
            kind: entry.map(|e| e.kind),
        });
        end = data_end;
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    // Paths a whiteout deletes, and directories an opaque marker empties.
    let mut deleted: HashSet<String> = HashSet::new();
    let mut opaque: HashSet<&str> = HashSet::new();
    for item in &items {
        *count.entry(&item.path).or_default() += 1;
        let (dir, name) = item.path.rsplit_once('/').unwrap_or(("", &item.path));
        match Marker::of(name) {
            Marker::Whiteout(hidden) if dir.is_empty() => {
                deleted.insert(hidden.to_owned());
            }
            Marker::Whiteout(hidden) => {
                deleted.insert(format!("{dir}/{hidden}"));
            }
            Marker::Opaque => {
                opaque.insert(dir);
            }
            Marker::Entry | Marker::Ignored => {}
        }
    }
    let by_path: HashMap<&str, usize> = items
        .iter()
        .enumerate()
        .map(|(i, item)| (item.path.as_str(), i))
        .collect();
    // Whether `path` may move: named once, and no marker touches it.
    let movable = |path: &str, kind: EntryKind| {
        let &i = by_path.get(path)?;
        let ancestors = path.match_indices('/').map(|(at, _)| &path[..at]);
        let touched = deleted.contains(path)
            || opaque.contains(path)
            || ancestors
                .into_iter()
                .any(|a| deleted.contains(a) || opaque.contains(a));
        (items[i].kind == Some(kind) && count[path] == 1 && !touched).then_some(i)
    };
    let mut order: Vec<usize> = Vec::new();
    let mut moved: HashSet<usize> = HashSet::new();
    let mut files = 0;
    for path in first {
        let Some(i) = movable(path, EntryKind::File) else {
            continue;
        };
        if moved.contains(&i) {
            continue;
        }
        for (at, _) in path.match_indices('/') {
            if let Some(d) = movable(&path[..at], EntryKind::Dir)
                && moved.insert(d)
            {
                order.push(d);
            }
        }
        moved.insert(i);
        order.push(i);
        files += 1;
    }
    order.extend((0..items.len()).filter(|i| !moved.contains(i)));
    for i in order {
        each_part(tar, items[i].span.clone(), |part| out.write_all(part))?;
    }
    // The end-of-archive marker.
    each_part(tar, end..tar.metadata()?.len(), |part| out.write_all(part))?;
    Ok(files)
}

/// Passes bytes `range` of `file` to `sink`, at most a MiB at a time.
pub(crate) fn each_part(
    file: &std::fs::File,
    range: std::ops::Range<u64>,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    // Most ranges are one header (512 bytes to a few KiB): the buffer is
    // no larger than what is copied.
    let mut buf = vec![0u8; range.end.saturating_sub(range.start).min(1 << 20) as usize];
    let mut at = range.start;
    while at < range.end {
        let n = (range.end - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        sink(&buf[..n])?;
        at += n as u64;
    }
    Ok(())
}
