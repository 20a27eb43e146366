//! The bytes of a download handed to blocking code as they arrive (the
//! unpacker of a parallel pull, the check of an index against its whole
//! layer): the async download pushes chunks into a bounded channel, and
//! the blocking reader reads them through [`std::io::Read`]. The bound
//! keeps memory to a few chunks; a slow reader slows the download, not the
//! other way round.

use std::io::{Read, Write};

use crate::ChunkSink;
use bytes::{Buf, Bytes};
use tokio::sync::mpsc;

/// Chunks in flight between the download and the reader.
const CHUNKS_IN_FLIGHT: usize = 4;

/// A bounded pipe from a download to a blocking reader.
pub fn channel(keep: Option<std::fs::File>) -> (Feed, FeedReader) {
    let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
    (
        Feed {
            tx,
            keep: keep.map(|f| std::io::BufWriter::with_capacity(1 << 20, f)),
        },
        FeedReader {
            rx,
            current: Bytes::new(),
        },
    )
}

/// The download's end: sends chunks on, and also writes them into `keep`
/// when the blob is to be kept. Dropping it is the end of the blob.
#[derive(Debug)]
pub struct Feed {
    tx: mpsc::Sender<Bytes>,
    keep: Option<std::io::BufWriter<std::fs::File>>,
}

impl ChunkSink for Feed {
    async fn write(&mut self, chunk: Bytes) -> std::io::Result<()> {
        if let Some(mut file) = self.keep.take() {
            // Disk writes block: off the async threads.
            let kept = chunk.clone();
            let file = tokio::task::spawn_blocking(move || file.write_all(&kept).map(|()| file))
                .await
                .map_err(std::io::Error::other)??;
            self.keep = Some(file);
        }
        self.forward(chunk).await
    }

    async fn write_resumed(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.forward(chunk).await
    }
}

impl Feed {
    /// Sends bytes on without keeping them: they are already in the kept
    /// file (read back from it to resume a download).
    async fn forward(&mut self, chunk: Bytes) -> std::io::Result<()> {
        self.tx
            .send(chunk)
            .await
            .map_err(|_| std::io::Error::other("the reader of the download stopped reading"))
    }

    /// Ends the blob; flushes and syncs the kept copy, if any (on a
    /// blocking thread).
    pub async fn finish(self) -> std::io::Result<()> {
        drop(self.tx);
        let Some(file) = self.keep else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || {
            file.into_inner().map_err(|e| e.into_error())?.sync_all()
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// The reader's end. Reads block the calling thread: use it from
/// `spawn_blocking`. The end of the feed reads as the end of the blob.
#[derive(Debug)]
pub struct FeedReader {
    rx: mpsc::Receiver<Bytes>,
    current: Bytes,
}

impl Read for FeedReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_arrive_in_order_and_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("blob");
        let (mut feed, mut reader) = channel(Some(std::fs::File::create(&kept).unwrap()));
        let reading = tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            reader.read_to_end(&mut all).unwrap();
            all
        });
        let mut expected = Vec::new();
        for i in 0..20u8 {
            let chunk = vec![i; 1000 + usize::from(i)];
            expected.extend_from_slice(&chunk);
            feed.write(Bytes::from(chunk)).await.unwrap();
        }
        feed.finish().await.unwrap();
        assert_eq!(reading.await.unwrap(), expected);
        assert_eq!(std::fs::read(&kept).unwrap(), expected);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_that_stops_stops_the_feed() {
        let (mut feed, reader) = channel(None);
        drop(reader);
        let err = feed.write(Bytes::from_static(b"x")).await.unwrap_err();
        assert!(err.to_string().contains("stopped reading"), "{err}");
    }
}
