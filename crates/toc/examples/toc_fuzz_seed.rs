//! Writes the TOC of a small chunked layer, and its blob's last bytes,
//! into a directory, as the seed corpus for the `toc` fuzz target
//! (`scripts/fuzz-smoke` runs this first).

use std::io::Write;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: toc_fuzz_seed DIR")?;
    std::fs::create_dir_all(&dir)?;
    let mut builder = tar::Builder::new(Vec::new());
    for (path, len) in [("app/small", 10usize), ("app/big", 200_000)] {
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(len as u64);
        builder.append_data(&mut header, path, data.as_slice())?;
    }
    let mut tar = tempfile::tempfile()?;
    tar.write_all(&builder.into_inner()?)?;
    let mut blob = Vec::new();
    let options = pronto_toc::WriteOptions {
        chunk_size: 64 << 10,
        level: Some(1),
        ..Default::default()
    };
    let converted = pronto_toc::write_chunked(&tar, &mut blob, &options)?;
    let range = pronto_toc::parse_footer(&blob, blob.len() as u64)?;
    let json = pronto_toc::toc_json(
        &blob[range.start as usize..range.end as usize],
        &converted.toc_digest,
        &pronto_toc::Limits::default(),
    )?;
    std::fs::write(std::path::Path::new(&dir).join("toc.json"), json)?;
    std::fs::write(
        std::path::Path::new(&dir).join("footer"),
        &blob[blob.len() - pronto_toc::FOOTER_SIZE as usize..],
    )?;
    Ok(())
}
