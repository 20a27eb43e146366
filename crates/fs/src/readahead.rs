//! [`SequentialReads`]: notices a file being read in order (`cat`, a
//! model server loading its weights, `mmap` pages faulted in order) and
//! says which spans to fetch ahead of the reader. The window is as long as
//! what the reader has read in order so far (so it doubles while the
//! reader keeps going, up to a maximum) and never reaches past the file's
//! end; a read elsewhere in the file starts counting again. A reader half
//! way through the span it started in gets the next span asked for, so
//! that it does not wait for it at the span's end. Random readers, small
//! files and short reads (a header, `head -c 1M`) get no read-ahead, so
//! they fetch nothing they do not read; a reader that stops after reading
//! N bytes in order leaves at most about N unread (one span at least).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

/// How many files' read positions are remembered per layer.
const MAX_STREAMS: usize = 256;

/// Bytes read in order before read-ahead starts.
const MIN_IN_ORDER: u64 = 1 << 20;

/// How far a read may start past the end of the previous one and still
/// count as in order: the kernel's readahead sends neighbouring reads from
/// several threads, so they arrive slightly out of order.
const SLACK: u64 = 1 << 20;

#[derive(Debug, Clone)]
struct Stream {
    /// Where the run of reads in order started.
    start: u64,
    /// Where the reads so far end (the furthest byte read).
    end: u64,
    /// The span the run started in.
    first_span: usize,
    /// The first span not yet asked for.
    ahead: usize,
    /// The first span of the last batch asked for: reaching it asks for
    /// the next.
    marker: usize,
    /// For forgetting the least recently read file.
    used: u64,
}

impl Stream {
    fn new(read: &Range<u64>, span: usize, used: u64) -> Self {
        Self {
            start: read.start,
            end: read.end,
            first_span: span,
            ahead: 0,
            marker: 0,
            used,
        }
    }
}

/// Bytes a file must have been read in order before the head of the span
/// after the read's is fetched ahead (see [`Ahead::next_head`]).
const HEAD_AHEAD_AFTER: u64 = 256 << 10;

/// A run of reads in order shorter than this many spans is young: its
/// read-ahead waits until the read that asked for it has its bytes.
const YOUNG_SPANS: u64 = 4;

/// What a read calls for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ahead {
    /// Spans to fetch ahead of the reader (empty when none).
    pub spans: Range<usize>,
    /// The reader has read only a little in order: fetch `spans` once the
    /// read has its own bytes, so that a reader waiting for a span does
    /// not share the link with spans it may never read (it may stop, as
    /// `head -c 4M` does). A reader that has read far gets its spans
    /// asked for at once, to keep the link busy.
    pub after_read: bool,
    /// The span after the read's last, when the reader has read
    /// [`HEAD_AHEAD_AFTER`] bytes in order and the file goes on into it:
    /// if the read waits for its last span, the next one's head is worth
    /// fetching alongside, for the read that crosses into it.
    pub next_head: Option<usize>,
}

impl Ahead {
    /// Nothing to fetch ahead.
    const NONE: Self = Self {
        spans: 0..0,
        after_read: false,
        next_head: None,
    };
}

/// Per-file read positions of one layer.
#[derive(Debug)]
pub struct SequentialReads {
    streams: Mutex<(HashMap<usize, Stream>, u64)>,
    /// The (largest) span size of the layer, to turn bytes into spans.
    span_size: u64,
    /// The largest window, in spans (0: no read-ahead).
    max: usize,
}

impl SequentialReads {
    /// Read-ahead over spans of `span_size` bytes, at most `max` spans at a
    /// time (0 turns it off).
    pub fn new(span_size: u64, max: usize) -> Self {
        Self {
            streams: Mutex::new((HashMap::new(), 0)),
            span_size: span_size.max(1),
            max,
        }
    }

    /// Records a read of file `entry` covering tar-stream bytes `read`,
    /// which lies in spans `spans`; the file's data lies in spans `file`.
    /// Returns the spans to fetch ahead of the reader, and when.
    pub fn on_read(
        &self,
        entry: usize,
        read: Range<u64>,
        spans: Range<usize>,
        file: Range<usize>,
    ) -> Ahead {
        if self.max == 0 || spans.is_empty() {
            return Ahead::NONE;
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
        let stream = streams
            .entry(entry)
            .or_insert_with(|| Stream::new(&read, spans.start, used));
        let in_order = read.start <= stream.end + SLACK
            && read.start + SLACK * 64 >= stream.end
            && read.start >= stream.start;
        if !in_order {
            // A jump: start counting again from here.
            *stream = Stream::new(&read, spans.start, used);
            return Ahead::NONE;
        }
        stream.used = used;
        stream.end = stream.end.max(read.end);
        let in_order_bytes = stream.end - stream.start;
        Ahead {
            spans: self.next_spans(stream, spans.end - 1, &file),
            after_read: in_order_bytes < YOUNG_SPANS * self.span_size,
            next_head: (in_order_bytes >= HEAD_AHEAD_AFTER && spans.end < file.end)
                .then_some(spans.end),
        }
    }

    /// The spans to ask for now for `stream`, whose reader is in span
    /// `current` of a file in spans `file`; moves the stream's marks.
    fn next_spans(&self, stream: &mut Stream, current: usize, file: &Range<usize>) -> Range<usize> {
        let in_order_bytes = stream.end - stream.start;
        if in_order_bytes < MIN_IN_ORDER {
            return 0..0;
        }
        if current == stream.first_span {
            // Half way through the span the reader started in, the next
            // one: a reader that goes on finds it local or on its way
            // instead of asking for it when it gets there.
            let next = current + 1;
            if in_order_bytes < self.span_size / 2 || stream.ahead > next || next >= file.end {
                return 0..0;
            }
            stream.marker = next;
            stream.ahead = next + 1;
            return next..next + 1;
        }
        // Like the kernel's own readahead: a batch is asked for when the
        // reader reaches the first span of the previous one.
        if stream.ahead > current + 1 && current < stream.marker {
            return 0..0;
        }
        let window = (in_order_bytes.div_ceil(self.span_size) as usize).clamp(1, self.max);
        let from = stream.ahead.max(current + 1);
        let target = (from + window).min(file.end);
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

    /// Reads the first `upto` bytes of a file of `spans` spans in
    /// `chunk`-byte reads; returns every read-ahead asked for, in order,
    /// and the furthest span asked for beyond the one read, at each read.
    fn read_in_order(
        reads: &SequentialReads,
        spans: usize,
        chunk: u64,
        upto: u64,
    ) -> (Vec<usize>, Vec<usize>) {
        let mut asked = Vec::new();
        let mut lead = Vec::new();
        let mut offset = 0;
        while offset < upto {
            let read = offset..offset + chunk;
            let first = (read.start / SPAN) as usize;
            let last = ((read.end - 1) / SPAN) as usize;
            asked.extend(reads.on_read(7, read, first..last + 1, 0..spans).spans);
            if let Some(furthest) = asked.last() {
                lead.push(furthest.saturating_sub(last));
            }
            offset += chunk;
        }
        (asked, lead)
    }

    #[test]
    fn a_file_read_in_order_is_fetched_ahead_once_to_its_end() {
        let reads = SequentialReads::new(SPAN, 16);
        let (asked, _) = read_in_order(&reads, 100, 128 << 10, 100 * SPAN);
        let expected: Vec<usize> = (1..100).collect();
        assert_eq!(asked, expected, "every later span once, in order");
    }

    #[test]
    fn the_window_grows_while_the_reader_keeps_up_and_stops_at_the_maximum() {
        let reads = SequentialReads::new(SPAN, 8);
        let (_, lead) = read_in_order(&reads, 1000, 1 << 20, 200 * SPAN);
        assert!(lead.iter().any(|d| *d > 4), "the window grew: {lead:?}");
        assert!(
            lead.iter().all(|d| *d <= 2 * 8),
            "never more than two windows of 8 spans ahead: {lead:?}"
        );
    }

    #[test]
    fn a_reader_that_stops_leaves_little_unread() {
        // `head -c 8M` of a big file: at most about as much again.
        let reads = SequentialReads::new(SPAN, 16);
        let (asked, _) = read_in_order(&reads, 100, 128 << 10, 2 * SPAN);
        assert!(asked.len() <= 3, "fetched ahead: {asked:?}");
        // Half of the first span: the next one, asked for once.
        let reads = SequentialReads::new(SPAN, 16);
        let (asked, _) = read_in_order(&reads, 100, 128 << 10, SPAN / 2 + (128 << 10));
        assert_eq!(asked, [1]);
        // `head -c 1000000`: nothing.
        let reads = SequentialReads::new(SPAN, 16);
        let (asked, _) = read_in_order(&reads, 100, 128 << 10, 1_000_000);
        assert!(asked.is_empty(), "{asked:?}");
    }

    #[test]
    fn random_and_single_reads_fetch_nothing_ahead() {
        let reads = SequentialReads::new(SPAN, 16);
        // One read of a small file.
        assert!(reads.on_read(3, 0..4096, 0..1, 0..1).spans.is_empty());
        // Reads jumping around a big file.
        for (i, span) in [50usize, 3, 77, 20, 90, 8].into_iter().enumerate() {
            let start = span as u64 * SPAN + (i as u64 * 4096);
            let got = reads
                .on_read(4, start..start + (1 << 20), span..span + 1, 0..100)
                .spans;
            assert!(got.is_empty(), "read {i} at span {span} got {got:?}");
        }
    }

    #[test]
    fn two_readers_of_different_files_are_followed_apart() {
        let reads = SequentialReads::new(SPAN, 16);
        let mut a = Vec::new();
        let mut b = Vec::new();
        for i in 0..16u64 {
            let read = i * (1 << 20)..(i + 1) * (1 << 20);
            let span = (read.start / SPAN) as usize;
            a.extend(reads.on_read(1, read.clone(), span..span + 1, 0..10).spans);
            let shifted = 100 * SPAN + read.start..100 * SPAN + read.end;
            b.extend(
                reads
                    .on_read(2, shifted, 100 + span..101 + span, 100..110)
                    .spans,
            );
        }
        assert_eq!(a.first(), Some(&1));
        assert_eq!(b.first(), Some(&101));
        assert!(b.iter().all(|s| (100..110).contains(s)));
    }

    #[test]
    fn a_young_reader_gets_its_own_bytes_first_and_a_long_one_a_full_link() {
        let reads = SequentialReads::new(SPAN, 16);
        let mut when = Vec::new();
        let mut offset = 0;
        while offset < 40 * SPAN {
            let span = (offset / SPAN) as usize;
            let ahead = reads.on_read(7, offset..offset + (1 << 20), span..span + 1, 0..100);
            if !ahead.spans.is_empty() {
                when.push((offset / SPAN, ahead.after_read));
            }
            offset += 1 << 20;
        }
        let young: Vec<_> = when.iter().filter(|(_, after)| *after).collect();
        assert!(!young.is_empty(), "{when:?}");
        assert!(
            young.iter().all(|(span, _)| *span < YOUNG_SPANS),
            "only the first spans wait for their read: {when:?}"
        );
        assert!(when.iter().any(|(_, after)| !after), "{when:?}");
    }

    #[test]
    fn read_ahead_off_asks_for_nothing() {
        let reads = SequentialReads::new(SPAN, 0);
        let (asked, _) = read_in_order(&reads, 10, 1 << 20, 10 * SPAN);
        assert!(asked.is_empty());
    }
}
