//! File contents for generated layers, produced as a stream so that a
//! multi-gigabyte file never sits in memory.

use std::io::{self, Read};

use rand::{RngCore, SeedableRng, rngs::StdRng};

/// What a generated regular file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Exactly these bytes.
    Bytes(Vec<u8>),
    /// `len` incompressible bytes, the same for the same seed.
    Random { seed: u64, len: u64 },
    /// `len` zero bytes (compresses to almost nothing).
    Zeros(u64),
    /// The bytes of a file on the host, read when the layer is written.
    HostFile(std::path::PathBuf),
}

impl Content {
    pub fn random(seed: u64, len: u64) -> Self {
        Content::Random { seed, len }
    }

    /// Size in bytes. For a host file this reads its metadata.
    pub fn len(&self) -> io::Result<u64> {
        Ok(match self {
            Content::Bytes(bytes) => bytes.len() as u64,
            Content::Random { len, .. } | Content::Zeros(len) => *len,
            Content::HostFile(path) => std::fs::metadata(path)?.len(),
        })
    }

    pub fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// A reader over the content.
    pub fn reader(&self) -> io::Result<Box<dyn Read + '_>> {
        Ok(match self {
            Content::Bytes(bytes) => Box::new(bytes.as_slice()),
            Content::Random { seed, len } => Box::new(RandomReader::new(*seed).take(*len)),
            Content::Zeros(len) => Box::new(io::repeat(0).take(*len)),
            Content::HostFile(path) => Box::new(std::fs::File::open(path)?),
        })
    }

    /// The whole content in memory; for tests that compare bytes.
    pub fn to_vec(&self) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        self.reader()?.read_to_end(&mut out)?;
        Ok(out)
    }
}

impl From<&[u8]> for Content {
    fn from(bytes: &[u8]) -> Self {
        Content::Bytes(bytes.to_vec())
    }
}

impl<const N: usize> From<&[u8; N]> for Content {
    fn from(bytes: &[u8; N]) -> Self {
        Content::Bytes(bytes.to_vec())
    }
}

impl From<&str> for Content {
    fn from(text: &str) -> Self {
        Content::Bytes(text.as_bytes().to_vec())
    }
}

impl From<String> for Content {
    fn from(text: String) -> Self {
        Content::Bytes(text.into_bytes())
    }
}

impl From<Vec<u8>> for Content {
    fn from(bytes: Vec<u8>) -> Self {
        Content::Bytes(bytes)
    }
}

/// An endless stream of seeded pseudo-random bytes.
struct RandomReader(StdRng);

impl RandomReader {
    fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }
}

impl Read for RandomReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.fill_bytes(buf);
        Ok(buf.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_content_is_deterministic_and_sized() {
        let a = Content::random(7, 100_000).to_vec().unwrap();
        let b = Content::random(7, 100_000).to_vec().unwrap();
        let c = Content::random(8, 100_000).to_vec().unwrap();
        assert_eq!(a.len(), 100_000);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn zeros_are_zero() {
        let z = Content::Zeros(4097).to_vec().unwrap();
        assert_eq!(z.len(), 4097);
        assert!(z.iter().all(|b| *b == 0));
    }
}
