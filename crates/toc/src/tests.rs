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
        compression: Compression::Gzip,
        level: None,
    }
}

fn zstd_chunks() -> WriteOptions {
    WriteOptions {
        compression: Compression::Zstd,
        ..small_chunks()
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

/// The annotations `converted` gives its layer.
fn annotations(converted: &Converted) -> HashMap<String, String> {
    converted.annotations.iter().cloned().collect()
}

/// The TOC of a converted layer of either compression, found as a node
/// finds it: through the manifest's annotations.
fn read_converted(blob: &[u8], converted: &Converted) -> Result<Toc, TocError> {
    let toc =
        TocRef::of(converted.media_type, &annotations(converted)).expect("a chunked layer")?;
    if let Some(zstd) = &toc.zstd {
        let frame = &blob[zstd.range.start as usize..zstd.range.end as usize];
        let (_, digest) = zstd_toc_json(frame, zstd, None, &Limits::default())?;
        assert_eq!(digest, converted.toc_digest);
    }
    blob_toc(blob, &toc, &Limits::default())
}

/// The uncompressed stream of a whole layer.
fn decompress(blob: &[u8], compression: Compression) -> Vec<u8> {
    let mut stream = Vec::new();
    compression
        .decoder(blob)
        .unwrap()
        .read_to_end(&mut stream)
        .unwrap();
    stream
}

#[test]
fn a_converted_layer_unpacks_to_the_source_tar_byte_for_byte() {
    for options in [small_chunks(), zstd_chunks()] {
        unpacks_to_the_source(&options);
    }
}

fn unpacks_to_the_source(options: &WriteOptions) {
    let (blob, converted, source, _) = convert(options);
    assert_eq!(
        Compression::from_media_type(converted.media_type),
        Some(options.compression)
    );
    assert_eq!(converted.size, blob.len() as u64);
    assert_eq!(
        converted.digest,
        format!("sha256:{}", hex::encode(Sha256::digest(&blob)))
    );
    let stream = decompress(&blob, options.compression);
    assert_eq!(converted.uncompressed_size, stream.len() as u64);
    assert_eq!(
        converted.diff_id,
        format!("sha256:{}", hex::encode(Sha256::digest(&stream)))
    );
    // The source tar, then only the TOC's tar (gzip) or nothing (zstd,
    // whose TOC is in a skippable frame): an extractor stops at the
    // source's end-of-archive marker and never sees the TOC.
    assert_eq!(&stream[..source.len()], source.as_slice());
    if options.compression == Compression::Zstd {
        assert_eq!(stream.len(), source.len());
    }
    let mut names = Vec::new();
    for item in tar::Archive::new(stream.as_slice()).entries().unwrap() {
        names.push(item.unwrap().path().unwrap().display().to_string());
    }
    assert!(!names.iter().any(|n| n.contains(TOC_TAR_NAME)), "{names:?}");
}

#[test]
fn every_chunk_is_found_through_the_toc_and_matches_its_digest() {
    for options in [small_chunks(), zstd_chunks()] {
        chunks_match(&options);
    }
}

fn chunks_match(options: &WriteOptions) {
    let (blob, converted, _, files) = convert(options);
    let toc = read_converted(&blob, &converted).unwrap();
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
            let bytes = read_chunk(&blob, chunk, options.compression);
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
    // Content-defined: 16 to 256 KiB, 64 KiB on average.
    let chunks = &toc.chunks[big];
    assert!(chunks.len() >= 2, "{chunks:?}");
    for chunk in &chunks[..chunks.len() - 1] {
        assert!((16 << 10..=256 << 10).contains(&chunk.len), "{chunk:?}");
    }
    let by_path = |p: &str| toc.entries.iter().find(|e| e.path == p).unwrap();
    assert_eq!(&*by_path("app/small.txt").uname, "app");
    assert_eq!(by_path("app/small.txt").uid, 1000);
    assert_eq!(by_path("app/small.txt").mtime, 1_700_000_001);
    assert_eq!(by_path("app/lib").kind, EntryKind::Dir);
    assert_eq!(&*by_path("app/current").link, "lib/big.bin");
    assert_eq!(by_path("app/again.txt").kind, EntryKind::Hardlink);
    assert_eq!(&*by_path("app/again.txt").link, "app/small.txt");
    assert_eq!(
        *by_path("app/tagged").xattrs,
        [("user.kind".to_owned(), b"model".to_vec())]
    );
}

/// The bytes of `chunk`, decompressed from its member alone.
fn read_chunk(blob: &[u8], chunk: &Chunk, compression: Compression) -> Vec<u8> {
    let member = &blob[chunk.blob.start as usize..chunk.blob.end as usize];
    let mut decoder = compression.decoder(member).unwrap();
    let mut bytes = vec![0u8; chunk.inner as usize];
    decoder.read_exact(&mut bytes).unwrap();
    bytes.resize(chunk.len as usize, 0);
    decoder.read_exact(&mut bytes).unwrap();
    bytes
}

#[test]
fn runs_of_small_files_share_a_gzip_member_but_not_a_zstd_frame() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut files = Vec::new();
    for i in 0..64u32 {
        // Bytes that do not compress, as a file's own would not.
        let data: Vec<u8> = (0u32..)
            .flat_map(|n| Sha256::digest([i.to_le_bytes(), n.to_le_bytes()].concat()))
            .take(1000 + i as usize * 37)
            .collect();
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        let path = format!("lib/m{i:02}.py");
        builder.append_data(&mut h, &path, data.as_slice()).unwrap();
        files.push((path, data));
    }
    let mut tar = tempfile::NamedTempFile::new().unwrap();
    tar.write_all(&builder.into_inner().unwrap()).unwrap();
    for compression in [Compression::Gzip, Compression::Zstd] {
        let mut blob = Vec::new();
        let options = WriteOptions {
            compression,
            ..WriteOptions::default()
        };
        let converted = write_chunked(tar.as_file(), &mut blob, &options).unwrap();
        let toc = read_converted(&blob, &converted).unwrap();
        let mut members = std::collections::BTreeSet::new();
        for (path, data) in &files {
            let i = toc.entries.iter().position(|e| &e.path == path).unwrap();
            let [chunk] = toc.chunks[i].as_slice() else {
                panic!("{path}: {:?}", toc.chunks[i]);
            };
            assert!(read_chunk(&blob, chunk, compression) == *data, "{path}");
            members.insert(chunk.blob.start);
        }
        match compression {
            // A run ends after one file in 16 on average.
            Compression::Gzip => assert!(
                members.len() > 1 && members.len() * 4 < files.len(),
                "{} members for {} small files",
                members.len(),
                files.len()
            ),
            _ => assert_eq!(members.len(), files.len()),
        }
    }
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
                let entry = entry_named(t, "app/small.txt").as_object_mut().unwrap();
                entry.remove("chunkDigest");
                entry.remove("digest");
            }),
        ),
        (
            "chunk type \"zeros\"",
            Box::new(|t| entry_named(t, "app/small.txt")["chunkType"] = "zeros".into()),
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
        (
            "overlap in their member",
            Box::new(|t| {
                let long = format!("app/lib/{}.py", "n".repeat(150));
                let before = entry_named(t, &long).clone();
                let tagged = entry_named(t, "app/tagged");
                tagged["offset"] = before["offset"].clone();
                tagged["innerOffset"] = before.get("innerOffset").cloned().unwrap_or(0.into());
            }),
        ),
        (
            "bytes into its member, over the limit",
            Box::new(|t| entry_named(t, "app/small.txt")["innerOffset"] = (1u64 << 40).into()),
        ),
    ];
    for (want, edit) in cases {
        let err = edited(edit).expect_err(want).to_string();
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn a_file_digest_stands_for_its_one_chunk_as_zstd_chunked_writes_it() {
    let toc = edited(|t| {
        for entry in t["entries"].as_array_mut().unwrap() {
            if entry["type"] == "reg" && entry.get("chunkSize").is_none() {
                entry.as_object_mut().unwrap().remove("chunkDigest");
            }
        }
    })
    .unwrap();
    let small = toc
        .entries
        .iter()
        .position(|e| e.path == "app/small.txt")
        .unwrap();
    assert_eq!(
        toc.chunks[small][0].digest,
        <[u8; 32]>::from(Sha256::digest(b"hello\n"))
    );
}

#[test]
fn a_zstd_toc_that_its_annotations_do_not_vouch_for_is_refused() {
    let (blob, converted, _, _) = convert(&zstd_chunks());
    let mut tampered = annotations(&converted);
    for name in ZSTD_CHECKSUM_ANNOTATIONS {
        if let Some(value) = tampered.get_mut(name) {
            *value = format!("sha256:{}", "1".repeat(64));
        }
    }
    let toc = TocRef::of(converted.media_type, &tampered)
        .unwrap()
        .unwrap();
    let zstd = toc.zstd.as_ref().unwrap();
    let frame = &blob[zstd.range.start as usize..zstd.range.end as usize];
    assert!(matches!(
        zstd_toc_json(frame, zstd, None, &Limits::default()),
        Err(TocError::DigestMismatch { .. })
    ));
    // A size the frame does not have.
    let mut wrong = zstd.clone();
    wrong.uncompressed -= 1;
    wrong.checksum = None;
    let err = zstd_toc_json(frame, &wrong, None, &Limits::default()).unwrap_err();
    assert!(err.to_string().contains("its annotation says"), "{err}");
    // Nothing vouches for it at all.
    let mut bare = annotations(&converted);
    bare.retain(|k, _| !k.contains("checksum") && k != TOC_DIGEST_ANNOTATION);
    assert!(matches!(
        TocRef::of(converted.media_type, &bare),
        Some(Err(TocError::Annotation(_)))
    ));
    // A plain zstd layer is not chunked.
    assert!(TocRef::of(converted.media_type, &HashMap::new()).is_none());
}

#[test]
fn an_edit_inside_a_big_file_keeps_its_other_chunks() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut data = vec![0u8; 4 << 20];
    rng.fill(data.as_mut_slice());
    let mut edited = data.clone();
    // Sixty bytes inserted near the start shift everything after them.
    edited.splice(100_000..100_000, [9u8; 60]);
    let digests = |data: &[u8]| -> std::collections::HashSet<[u8; 32]> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        builder.append_data(&mut h, "model.bin", data).unwrap();
        let mut tar = tempfile::NamedTempFile::new().unwrap();
        tar.write_all(&builder.into_inner().unwrap()).unwrap();
        let mut blob = Vec::new();
        let converted = write_chunked(tar.as_file(), &mut blob, &small_chunks()).unwrap();
        let toc = read_converted(&blob, &converted).unwrap();
        toc.chunks.iter().flatten().map(|c| c.digest).collect()
    };
    let (before, after) = (digests(&data), digests(&edited));
    let kept = before.intersection(&after).count();
    assert!(
        kept + 3 >= before.len(),
        "{kept} of {} chunks kept after a 60-byte insertion",
        before.len()
    );
}

/// The paths and bytes of every entry of a tar, in order.
fn tar_items(tar: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut archive = tar::Archive::new(tar);
    archive
        .entries()
        .unwrap()
        .map(|item| {
            let mut item = item.unwrap();
            let path = item.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            item.read_to_end(&mut data).unwrap();
            (path, data)
        })
        .collect()
}

#[test]
fn startup_files_move_to_the_front_only_where_order_cannot_change_the_tree() {
    let mut builder = tar::Builder::new(Vec::new());
    let mut add = |path: &str, kind: tar::EntryType, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o750
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        if kind == tar::EntryType::Link {
            builder
                .append_link(&mut h, path, "app/lib/main.py")
                .unwrap();
        } else {
            builder.append_data(&mut h, path, data).unwrap();
        }
    };
    use tar::EntryType::{Directory, Link, Regular};
    add("app/", Directory, b"");
    add("app/README", Regular, b"read me");
    add("app/lib/", Directory, b"");
    add("app/lib/main.py", Regular, b"print('hi')");
    add("app/lib/alias.py", Link, b"");
    add("app/old/", Directory, b"");
    add("app/old/.wh.gone.py", Regular, b"");
    add("app/old/gone.py", Regular, b"back again");
    add("app/twice", Regular, b"first");
    add("app/twice", Regular, b"second");
    add(
        &format!("app/{}", "long".repeat(40)),
        Regular,
        b"a long name",
    );
    let source = builder.into_inner().unwrap();
    let mut tar = tempfile::NamedTempFile::new().unwrap();
    tar.write_all(&source).unwrap();
    let first: Vec<String> = [
        format!("app/{}", "long".repeat(40)),
        "app/lib/main.py".into(),
        "app/old/gone.py".into(),
        "app/twice".into(),
        "app/lib/alias.py".into(),
        "app/missing".into(),
        "app/lib/main.py".into(),
    ]
    .into();
    let mut out = Vec::new();
    let moved = startup_first(tar.as_file(), &mut out, &first).unwrap();
    assert_eq!(moved, 2);
    let before = tar_items(&source);
    let after = tar_items(&out);
    let paths: Vec<&str> = after.iter().map(|(p, _)| p.as_str()).collect();
    let long = format!("app/{}", "long".repeat(40));
    assert_eq!(
        paths,
        [
            "app/",
            long.as_str(),
            "app/lib/",
            "app/lib/main.py",
            "app/README",
            "app/lib/alias.py",
            "app/old/",
            "app/old/.wh.gone.py",
            "app/old/gone.py",
            "app/twice",
            "app/twice",
        ]
    );
    // The same entries, byte for byte, and the same size.
    let mut sorted_before = before.clone();
    let mut sorted_after = after.clone();
    sorted_before.sort();
    sorted_after.sort();
    assert_eq!(sorted_before, sorted_after);
    assert_eq!(out.len(), source.len());
    // Nothing named: the tar is unchanged.
    let mut same = Vec::new();
    assert_eq!(startup_first(tar.as_file(), &mut same, &[]).unwrap(), 0);
    assert!(same == source);
}
