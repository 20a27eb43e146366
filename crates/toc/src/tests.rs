use std::io::{Read, Write};

use super::*;

/// A tar with the shapes a layer has: directories, small, empty and
/// multi-chunk files, a symlink, a hard link, an xattr, a long name.
fn source_tar() -> (tempfile::NamedTempFile, Files) {
    let mut builder = tar::Builder::new(Vec::new());
    let mut files = Vec::new();
    let dir = |path: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_mtime(1_700_000_000);
        (h, path.to_owned())
    };
    for path in ["app/", "app/lib/"] {
        let (mut h, p) = dir(path);
        builder.append_data(&mut h, p, std::io::empty()).unwrap();
    }
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let long = format!("app/lib/{}.py", "n".repeat(150));
    for (path, data) in [
        ("app/small.txt".to_owned(), b"hello\n".to_vec()),
        ("app/empty".to_owned(), Vec::new()),
        ("app/lib/big.bin".to_owned(), big),
        (long, b"# a long name\n".to_vec()),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_username("app").unwrap();
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_001);
        builder.append_data(&mut h, &path, data.as_slice()).unwrap();
        files.push((path, data));
    }
    builder
        .append_pax_extensions([("SCHILY.xattr.user.kind", b"model".as_slice())])
        .unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o600);
    h.set_size(4);
    builder
        .append_data(&mut h, "app/tagged", b"tag\n".as_slice())
        .unwrap();
    files.push(("app/tagged".into(), b"tag\n".to_vec()));
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    builder
        .append_link(&mut h, "app/current", "lib/big.bin")
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    builder
        .append_link(&mut h, "app/again.txt", "app/small.txt")
        .unwrap();
    let bytes = builder.into_inner().unwrap();
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(&bytes).unwrap();
    (file, files)
}

/// Files by path with their contents.
type Files = Vec<(String, Vec<u8>)>;

/// An edit of a TOC document.
type Edit = Box<dyn Fn(&mut serde_json::Value)>;

fn convert(options: &WriteOptions) -> (Vec<u8>, Converted, Vec<u8>, Files) {
    let (tar, files) = source_tar();
    let mut blob = Vec::new();
    let converted = write_chunked(tar.as_file(), &mut blob, options).unwrap();
    let source = std::fs::read(tar.path()).unwrap();
    (blob, converted, source, files)
}

fn small_chunks() -> WriteOptions {
    WriteOptions {
        chunk_size: 64 << 10,
        level: 6,
    }
}

/// The TOC of `blob`, found through its footer and checked against
/// `digest`.
fn read_toc(blob: &[u8], digest: &str) -> Result<Toc, TocError> {
    let toc = parse_footer(blob, blob.len() as u64)?;
    let member = &blob[toc.start as usize..toc.end as usize];
    let json = toc_json(member, digest, &Limits::default())?;
    parse_toc(&json, toc.start, &Limits::default())
}

#[test]
fn a_converted_layer_unpacks_to_the_source_tar_byte_for_byte() {
    let (blob, converted, source, _) = convert(&small_chunks());
    assert_eq!(converted.size, blob.len() as u64);
    assert_eq!(
        converted.digest,
        format!("sha256:{}", hex::encode(Sha256::digest(&blob)))
    );
    let mut stream = Vec::new();
    flate2::read::MultiGzDecoder::new(blob.as_slice())
        .read_to_end(&mut stream)
        .unwrap();
    assert_eq!(converted.uncompressed_size, stream.len() as u64);
    assert_eq!(
        converted.diff_id,
        format!("sha256:{}", hex::encode(Sha256::digest(&stream)))
    );
    // The source tar, then only the TOC's tar: an extractor stops at the
    // source's end-of-archive marker and never sees the TOC.
    assert_eq!(&stream[..source.len()], source.as_slice());
    let mut names = Vec::new();
    for item in tar::Archive::new(stream.as_slice()).entries().unwrap() {
        names.push(item.unwrap().path().unwrap().display().to_string());
    }
    assert!(!names.iter().any(|n| n.contains(TOC_TAR_NAME)), "{names:?}");
}

#[test]
fn every_chunk_is_found_through_the_toc_and_matches_its_digest() {
    let (blob, converted, _, files) = convert(&small_chunks());
    let toc = read_toc(&blob, &converted.toc_digest).unwrap();
    for (path, data) in &files {
        let i = toc
            .entries
            .iter()
            .position(|e| &e.path == path)
            .unwrap_or_else(|| panic!("{path} missing"));
        let entry = &toc.entries[i];
        assert_eq!(entry.kind, EntryKind::File);
        assert_eq!(entry.size, data.len() as u64, "{path}");
        let mut read = Vec::new();
        for chunk in &toc.chunks[i] {
            let member = &blob[chunk.blob.start as usize..chunk.blob.end as usize];
            let mut bytes = vec![0u8; chunk.len as usize];
            flate2::read::GzDecoder::new(member)
                .read_exact(&mut bytes)
                .unwrap();
            assert_eq!(<[u8; 32]>::from(Sha256::digest(&bytes)), chunk.digest);
            assert_eq!(chunk.file_offset, read.len() as u64);
            read.extend_from_slice(&bytes);
        }
        assert_eq!(&read, data, "{path}");
    }
    let big = toc
        .entries
        .iter()
        .position(|e| e.path == "app/lib/big.bin")
        .unwrap();
    assert_eq!(toc.chunks[big].len(), 5, "300,000 bytes in 64 KiB chunks");
    let by_path = |p: &str| toc.entries.iter().find(|e| e.path == p).unwrap();
    assert_eq!(by_path("app/small.txt").uname, "app");
    assert_eq!(by_path("app/small.txt").uid, 1000);
    assert_eq!(by_path("app/small.txt").mtime, 1_700_000_001);
    assert_eq!(by_path("app/lib").kind, EntryKind::Dir);
    assert_eq!(by_path("app/current").link, "lib/big.bin");
    assert_eq!(by_path("app/again.txt").kind, EntryKind::Hardlink);
    assert_eq!(by_path("app/again.txt").link, "app/small.txt");
    assert_eq!(
        by_path("app/tagged").xattrs,
        vec![("user.kind".to_owned(), b"model".to_vec())]
    );
}

#[test]
fn a_toc_that_is_not_the_one_the_manifest_names_is_refused() {
    let (blob, _, _, _) = convert(&small_chunks());
    let wrong = format!("sha256:{}", "0".repeat(64));
    assert!(matches!(
        read_toc(&blob, &wrong),
        Err(TocError::DigestMismatch { .. })
    ));
}

#[test]
fn a_blob_without_a_footer_is_refused() {
    let (blob, converted, _, _) = convert(&small_chunks());
    let cut = &blob[..blob.len() - 10];
    assert!(matches!(
        read_toc(cut, &converted.toc_digest),
        Err(TocError::Footer(_))
    ));
}

/// The TOC of a converted layer, edited by `edit`, parsed again.
fn edited(edit: impl Fn(&mut serde_json::Value)) -> Result<Toc, TocError> {
    let (blob, converted, _, _) = convert(&small_chunks());
    let range = parse_footer(&blob, blob.len() as u64).unwrap();
    let json = toc_json(
        &blob[range.start as usize..range.end as usize],
        &converted.toc_digest,
        &Limits::default(),
    )
    .unwrap();
    let mut value: serde_json::Value = serde_json::from_slice(&json).unwrap();
    edit(&mut value);
    parse_toc(
        &serde_json::to_vec(&value).unwrap(),
        range.start,
        &Limits::default(),
    )
}

fn entry_named<'a>(toc: &'a mut serde_json::Value, name: &str) -> &'a mut serde_json::Value {
    toc["entries"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|e| e["name"] == name)
        .unwrap()
}

#[test]
fn hostile_tocs_are_refused_with_the_entry_named() {
    let cases: Vec<(&str, Edit)> = vec![
        (
            "unsafe path",
            Box::new(|t| entry_named(t, "app/small.txt")["name"] = "app/../../etc/passwd".into()),
        ),
        (
            "do not follow each other",
            Box::new(|t| entry_named(t, "app/lib/big.bin")["chunkSize"] = 1000.into()),
        ),
        (
            "cover 262144 of its 300000 bytes",
            Box::new(|t| {
                let entries = t["entries"].as_array_mut().unwrap();
                let last = entries
                    .iter()
                    .rposition(|e| e["type"] == "chunk" && e["name"] == "app/lib/big.bin")
                    .unwrap();
                entries.remove(last);
            }),
        ),
        (
            "no SHA-256 chunk digest",
            Box::new(|t| {
                entry_named(t, "app/small.txt")
                    .as_object_mut()
                    .unwrap()
                    .remove("chunkDigest");
            }),
        ),
        (
            "blob order",
            Box::new(|t| entry_named(t, "app/small.txt")["offset"] = (u64::MAX / 2).into()),
        ),
        (
            "unknown type",
            Box::new(|t| entry_named(t, "app/small.txt")["type"] = "socket".into()),
        ),
        (
            "follows no regular file",
            Box::new(|t| {
                let entries = t["entries"].as_array_mut().unwrap();
                let chunk = entries
                    .iter()
                    .find(|e| e["type"] == "chunk")
                    .unwrap()
                    .clone();
                entries.insert(0, chunk);
            }),
        ),
        ("version", Box::new(|t| t["version"] = 2.into())),
    ];
    for (want, edit) in cases {
        let err = edited(edit).expect_err(want).to_string();
        assert!(err.contains(want), "{want}: {err}");
    }
}
