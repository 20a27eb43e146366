//! [`SequentialReads`]: notices a file being read in order (`cat`, a
//! model server loading its weights, `mmap` pages faulted in order) and
//! says which spans to fetch ahead of the reader. The window starts small,
//! doubles while the reader keeps up and never reaches past the file's
//! end; a read elsewhere in the file ends the run. Random readers and
//! small files get no read-ahead, so they fetch nothing they do not read.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

/// How many files' read positions are remembered per layer.
const MAX_STREAMS: usize = 256;

/// Reads in order so far before read-ahead starts: the first read of a
/// file may be all a program wants of it (a header, a magic number).
const SEQUENTIAL_READS_BEFORE_READ_AHEAD: u32 = 2;

/// How far a read may start past the end of the previous one and still
/// count as in order: the kernel's readahead sends neighbouring reads from
/// several threads, so they arrive slightly out of order.
const SLACK: u64 = 1 << 20;

#[derive(Debug, Clone)]
struct Stream {
    /// Where the reads so far end (the furthest byte read).
    end: u64,
    /// Reads in order so far.
    reads: u32,
    /// Spans fetched ahead of the reader, beyond the one it reads now.
    window: usize,
    /// The first span not yet asked for.
    ahead: usize,
    /// The first span of the last batch asked for: reaching it asks for
    /// the next.
    marker: usize,
    /// For forgetting the least recently read file.
    used: u64,
}

/// Per-file read positions of one layer.
#[derive(Debug)]
pub struct SequentialReads {
    streams: Mutex<(HashMap<usize, Stream>, u64)>,
    /// The first window, in spans.
    initial: usize,
    /// The largest window, in spans.
    max: usize,
}

impl SequentialReads {
    /// Read-ahead windows from `initial` up to `max` spans (`max` 0 turns
    /// read-ahead off).
    pub fn new(initial: usize, max: usize) -> Self {
        Self {
            streams: Mutex::new((HashMap::new(), 0)),
            initial: initial.clamp(1, max.max(1)),
            max,
        }
    }

    /// Records a read of file `entry` covering tar-stream bytes `read`,
    /// which lies in spans `spans`; the file's data lies in spans `file`.
    /// Returns the spans to fetch ahead of the reader now (empty when
    /// none).
    pub fn on_read(
        &self,
        entry: usize,
        read: Range<u64>,
        spans: Range<usize>,
        file: Range<usize>,
    ) -> Range<usize> {
        if self.max == 0 || spans.is_empty() {
            return 0..0;
        }
        let mut guard = self.streams.lock().unwrap_or_else(|e| e.into_inner());
        let (streams, tick) = &mut *guard;
        *tick += 1;
        let used = *tick;
        if !streams.contains_key(&entry) && streams.len() >= MAX_STREAMS {
            let oldest = streams
                .iter()
                .min_by_key(|(_, s)| s.used)
                .map(|(e, _)| *e)
                .expect("the map is full");
            streams.remove(&oldest);
        }
        let stream = streams.entry(entry).or_insert(Stream {
            end: read.end,
            reads: 0,
            window: 0,
            ahead: 0,
            marker: 0,
            used,
        });
        let in_order = stream.reads == 0 || read.start <= stream.end + SLACK;
        let before = stream.end.saturating_sub(SLACK * 64);
        if !in_order || read.start < before {
            // A jump: start counting again from here.
            *stream = Stream {
                end: read.end,
                reads: 1,
                window: 0,
                ahead: 0,
                marker: 0,
                used,
            };
            return 0..0;
        }
        stream.reads += 1;
        stream.used = used;
        stream.end = stream.end.max(read.end);
        if stream.reads < SEQUENTIAL_READS_BEFORE_READ_AHEAD {
            return 0..0;
        }
        let current = spans.end - 1;
        // Like the kernel's own readahead: a batch is asked for when the
        // reader reaches the first span of the previous one (it keeps up),
        // each batch twice the size of the last, up to the maximum.
        if stream.window > 0 && current < stream.marker {
            return 0..0;
        }
        stream.window = if stream.window == 0 {
            self.initial
        } else {
            (stream.window * 2).min(self.max)
        };
        let from = stream.ahead.max(current + 1);
        let target = (from + stream.window).min(file.end);
        if from >= target {
            // All of the file is asked for already.
            return 0..0;
        }
        stream.marker = from;
        stream.ahead = target;
        from..target
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: u64 = 4 << 20;

    /// Reads a file of `spans` spans in `chunk`-byte reads starting at
    /// span 0; returns every read-ahead asked for, in order.
    fn read_in_order(reads: &SequentialReads, spans: usize, chunk: u64, upto: u64) -> Vec<usize> {
        let mut asked = Vec::new();
        let mut offset = 0;
        while offset < upto {
            let read = offset..offset + chunk;
            let first = (read.start / SPAN) as usize;
            let last = ((read.end - 1) / SPAN) as usize;
            asked.extend(reads.on_read(7, read, first..last + 1, 0..spans));
            offset += chunk;
        }
        asked
    }

    #[test]
    fn a_file_read_in_order_is_fetched_ahead_once_to_its_end() {
        let reads = SequentialReads::new(2, 16);
        let asked = read_in_order(&reads, 100, 128 << 10, 100 * SPAN);
        let expected: Vec<usize> = (1..100).collect();
        assert_eq!(asked, expected, "every later span once, in order");
    }

    #[test]
    fn the_window_grows_while_the_reader_keeps_up_and_stops_at_the_maximum() {
        let reads = SequentialReads::new(2, 8);
        let mut furthest = Vec::new();
        for span in 0..40usize {
            let start = span as u64 * SPAN;
            for part in 0..4 {
                let read = start + part * (1 << 20)..start + (part + 1) * (1 << 20);
                let got = reads.on_read(1, read, span..span + 1, 0..1000);
                if !got.is_empty() {
                    furthest.push(got.end - span);
                }
            }
        }
        assert!(
            furthest.iter().any(|d| *d > 2),
            "the window grew: {furthest:?}"
        );
        assert!(
            furthest.iter().all(|d| *d <= 2 * 8 + 1),
            "never more than two batches of 8 spans ahead: {furthest:?}"
        );
    }

    #[test]
    fn a_reader_that_stops_gets_no_more_read_ahead() {
        let reads = SequentialReads::new(2, 16);
        let asked = read_in_order(&reads, 100, 1 << 20, 2 * SPAN);
        let furthest = *asked.last().unwrap();
        assert!(
            furthest < 2 + 1 + 2 * 16,
            "bounded by the window: {furthest}"
        );
        // Nothing happens without reads: the detector only answers reads.
    }

    #[test]
    fn random_and_single_reads_fetch_nothing_ahead() {
        let reads = SequentialReads::new(2, 16);
        // One read of a small file.
        assert!(reads.on_read(3, 0..4096, 0..1, 0..1).is_empty());
        // Reads jumping around a big file.
        for (i, span) in [50usize, 3, 77, 20, 90, 8].into_iter().enumerate() {
            let start = span as u64 * SPAN + (i as u64 * 4096);
            let got = reads.on_read(4, start..start + 4096, span..span + 1, 0..100);
            assert!(got.is_empty(), "read {i} at span {span} got {got:?}");
        }
    }

    #[test]
    fn two_readers_of_different_files_are_followed_apart() {
        let reads = SequentialReads::new(2, 16);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for i in 0..8u64 {
            let read = i * (1 << 20)..(i + 1) * (1 << 20);
            let span = (read.start / SPAN) as usize;
            a.extend(reads.on_read(1, read.clone(), span..span + 1, 0..10));
            let shifted = 100 * SPAN + read.start..100 * SPAN + read.end;
            b.extend(reads.on_read(2, shifted, 100 + span..101 + span, 100..110));
        }
        assert_eq!(a.first(), Some(&1));
        assert_eq!(b.first(), Some(&101));
        assert!(b.iter().all(|s| (100..110).contains(s)));
    }

    #[test]
    fn read_ahead_off_asks_for_nothing() {
        let reads = SequentialReads::new(2, 0);
        assert!(read_in_order(&reads, 10, 1 << 20, 10 * SPAN).is_empty());
    }
}
