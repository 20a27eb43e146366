//! Hostile chunked-layer bytes: a footer or a TOC document must parse into
//! a checked TOC or an error, never panic or allocate without bound; a
//! checked TOC's chunks cover each file exactly, in blob order.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pronto_toc::parse_footer(data, data.len() as u64);
    let limits = pronto_toc::Limits {
        max_entries: 100_000,
        ..Default::default()
    };
    let Ok(toc) = pronto_toc::parse_toc(data, 1 << 40, &limits) else {
        return;
    };
    let mut last_end = 0;
    for (entry, chunks) in toc.entries.iter().zip(&toc.chunks) {
        let mut covered = 0;
        for chunk in chunks {
            assert_eq!(chunk.file_offset, covered);
            assert!(chunk.blob.start >= last_end && chunk.blob.end > chunk.blob.start);
            last_end = chunk.blob.end;
            covered += chunk.len;
        }
        assert_eq!(covered, entry.size);
    }
});
