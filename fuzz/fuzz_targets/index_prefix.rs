//! Hostile index bytes: parsing must return an error or a validated index,
//! and every read operation on a validated index must return an error or
//! bytes, never panic or allocate without bound.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pronto_index::LayerIndex;

fuzz_target!(|data: &[u8]| {
    let Ok(index) = LayerIndex::parse(data) else {
        return;
    };
    let meta = index.meta();
    let end = meta.layer.uncompressed_size;
    let _ = index.spans_for(0..end);
    for i in 0..meta.spans.len().min(8) {
        let input = index.span_input(i);
        let len = (input.end - input.start).min(1 << 20) as usize;
        let _ = index.decode_span(i, &vec![0u8; len], &[]);
        if let Some(range) = index.window_range(i) {
            let len = (range.end - range.start).min(1 << 16) as usize;
            let _ = index.decode_window(i, &vec![0u8; len]);
        }
    }
});
