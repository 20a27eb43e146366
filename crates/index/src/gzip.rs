//! A safe wrapper over zlib's streaming inflate (zlib-rs through its C
//! API), with the three calls the seekable index needs and `flate2` lacks:
//! stopping at deflate block boundaries (`Z_BLOCK`), priming leftover bits
//! (`inflatePrime`) and presetting the 32 KiB window
//! (`inflateSetDictionary`). This is the technique of zlib's `zran.c`.

use std::ffi::c_int;

use libz_rs_sys::{
    Z_BLOCK, Z_BUF_ERROR, Z_NO_FLUSH, Z_OK, Z_STREAM_END, inflate, inflateEnd, inflateInit2_,
    inflatePrime, inflateSetDictionary, z_stream, zlibVersion,
};

/// Size of the deflate history window a checkpoint must carry.
pub const WINDOW_SIZE: usize = 32 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InflateError(pub String);

/// What one call to [`Inflate::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// The end of the deflate stream (and gzip trailer) was reached.
    pub end: bool,
}

/// An inflate stream. The `z_stream` is boxed because zlib keeps a pointer
/// back to it: it must not move after initialisation.
pub struct Inflate {
    strm: Box<z_stream>,
}

impl std::fmt::Debug for Inflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflate")
            .field("total_in", &self.strm.total_in)
            .field("total_out", &self.strm.total_out)
            .finish()
    }
}

impl Inflate {
    /// Decodes a gzip stream (header, deflate data, trailer).
    pub fn gzip() -> Result<Self, InflateError> {
        Self::init(16 + 15)
    }

    /// Decodes raw deflate data, as from a checkpoint.
    pub fn raw() -> Result<Self, InflateError> {
        Self::init(-15)
    }

    fn init(window_bits: c_int) -> Result<Self, InflateError> {
        let mut strm = Box::new(z_stream::default());
        // SAFETY: `strm` is a valid, default-initialised z_stream (null
        // allocators select zlib-rs's own) that lives in a Box and is never
        // moved; the version string and struct size are the library's own.
        let ret = unsafe {
            inflateInit2_(
                &mut *strm,
                window_bits,
                zlibVersion(),
                std::mem::size_of::<z_stream>() as c_int,
            )
        };
        if ret != Z_OK {
            return Err(InflateError(format!("inflateInit2 failed ({ret})")));
        }
        Ok(Self { strm })
    }

    /// Feeds the top `bits` bits of `byte` before the next input: resuming
    /// in the middle of a byte.
    pub fn prime(&mut self, bits: u8, byte: u8) -> Result<(), InflateError> {
        if bits == 0 {
            return Ok(());
        }
        if bits > 7 {
            return Err(InflateError(format!("cannot prime {bits} bits")));
        }
        let value = c_int::from(byte >> (8 - bits));
        // SAFETY: the stream was initialised in `init` and is still alive.
        let ret = unsafe { inflatePrime(&mut *self.strm, c_int::from(bits), value) };
        check(ret, "inflatePrime")
    }

    /// Presets the history window (the output that preceded a checkpoint).
    pub fn set_dictionary(&mut self, window: &[u8]) -> Result<(), InflateError> {
        if window.is_empty() {
            return Ok(());
        }
        // SAFETY: the stream is initialised; `window` is a valid slice whose
        // length fits in u32 (at most WINDOW_SIZE, checked by callers) and
        // zlib copies it before returning.
        let ret =
            unsafe { inflateSetDictionary(&mut *self.strm, window.as_ptr(), window.len() as u32) };
        check(ret, "inflateSetDictionary")
    }

    /// Inflates from `input` into `output`. With `stop_at_block`, returns at
    /// the next deflate block boundary (and after the gzip header).
    pub fn step(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_block: bool,
    ) -> Result<Step, InflateError> {
        let avail_in = u32::try_from(input.len()).unwrap_or(u32::MAX);
        let avail_out = u32::try_from(output.len()).unwrap_or(u32::MAX);
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        let flush = if stop_at_block { Z_BLOCK } else { Z_NO_FLUSH };
        // SAFETY: next_in/avail_in and next_out/avail_out describe live
        // slices borrowed for the duration of this call; zlib reads and
        // writes only within them.
        let ret = unsafe { inflate(&mut *self.strm, flush) };
        let consumed = (avail_in - self.strm.avail_in) as usize;
        let produced = (avail_out - self.strm.avail_out) as usize;
        // Do not keep pointers into the caller's buffers.
        self.strm.next_in = std::ptr::null();
        self.strm.next_out = std::ptr::null_mut();
        match ret {
            Z_OK => Ok(Step {
                consumed,
                produced,
                end: false,
            }),
            Z_STREAM_END => Ok(Step {
                consumed,
                produced,
                end: true,
            }),
            // No progress possible with what was given: not an error here.
            Z_BUF_ERROR => Ok(Step {
                consumed,
                produced,
                end: false,
            }),
            _ => Err(InflateError(format!(
                "corrupt deflate data ({})",
                self.message()
                    .unwrap_or_else(|| format!("zlib error {ret}"))
            ))),
        }
    }

    /// zlib's `data_type`: unused bits in the last input byte (low 3 bits),
    /// +64 while in the last block, +128 right after a block boundary or the
    /// gzip header.
    pub fn data_type(&self) -> i32 {
        self.strm.data_type
    }

    pub fn total_in(&self) -> u64 {
        self.strm.total_in
    }

    pub fn total_out(&self) -> u64 {
        self.strm.total_out
    }

    fn message(&self) -> Option<String> {
        if self.strm.msg.is_null() {
            return None;
        }
        // SAFETY: zlib sets `msg` to a static NUL-terminated string or null.
        let text = unsafe { std::ffi::CStr::from_ptr(self.strm.msg) };
        Some(text.to_string_lossy().into_owned())
    }
}

impl Drop for Inflate {
    fn drop(&mut self) {
        // SAFETY: the stream was initialised and is ended exactly once.
        unsafe {
            inflateEnd(&mut *self.strm);
        }
    }
}

fn check(ret: c_int, what: &str) -> Result<(), InflateError> {
    if ret == Z_OK {
        Ok(())
    } else {
        Err(InflateError(format!("{what} failed ({ret})")))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn gzip_round_trip_stops_at_blocks() {
        let data: Vec<u8> = (0..200_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
        enc.write_all(&data).unwrap();
        let gz = enc.finish().unwrap();
        let mut inflate = Inflate::gzip().unwrap();
        let mut out = vec![0u8; data.len() + 10];
        let mut pos_in = 0;
        let mut pos_out = 0;
        let mut boundaries = 0;
        loop {
            let step = inflate
                .step(&gz[pos_in..], &mut out[pos_out..], true)
                .unwrap();
            pos_in += step.consumed;
            pos_out += step.produced;
            if inflate.data_type() & 128 != 0 {
                boundaries += 1;
            }
            if step.end {
                break;
            }
        }
        assert_eq!(&out[..pos_out], data.as_slice());
        assert_eq!(pos_in, gz.len());
        assert!(boundaries >= 2, "header and at least one block boundary");
    }

    #[test]
    fn garbage_is_an_error() {
        let mut inflate = Inflate::raw().unwrap();
        let mut out = [0u8; 64];
        assert!(inflate.step(&[0xff; 32], &mut out, false).is_err());
    }
}
