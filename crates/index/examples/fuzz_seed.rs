//! Writes valid index prefixes into a directory, as the seed corpus for the
//! `index_prefix` fuzz target (`scripts/fuzz-smoke` runs this first).

use pronto_index::{LayerCompression, LayerToIndex, build_index};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: fuzz_seed DIR")?;
    std::fs::create_dir_all(&dir)?;
    for (name, compression) in [
        ("gzip", LayerCompression::Gzip),
        ("tar", LayerCompression::None),
    ] {
        let tar = sample_tar()?;
        let blob = match compression {
            LayerCompression::Gzip => {
                use std::io::Write;
                let mut gz = flate2_writer();
                gz.write_all(&tar)?;
                gz.finish()?
            }
            LayerCompression::None => tar,
            LayerCompression::Zstd => unreachable!("zstd layers are not indexed"),
        };
        let layer = LayerToIndex {
            digest: format!("sha256:{}", sha256_hex(&blob)),
            size: blob.len() as u64,
            compression,
        };
        let mut index = Vec::new();
        let built = build_index(blob.as_slice(), &layer, 64 * 1024, &mut index)?;
        std::fs::write(
            format!("{dir}/{name}-prefix"),
            &index[..built.prefix_len as usize],
        )?;
        std::fs::write(format!("{dir}/{name}-whole"), &index)?;
    }
    Ok(())
}

fn sample_tar() -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    for i in 0..6u32 {
        let data: Vec<u8> = (0..40_000u32)
            .map(|b| (b.wrapping_mul(i + 7) >> 3) as u8)
            .collect();
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, format!("dir/file-{i}"), data.as_slice())?;
    }
    builder.into_inner()
}

fn flate2_writer() -> flate2::write::GzEncoder<Vec<u8>> {
    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6))
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
