//! Whole-page compression: LZ4 (lz4_flex, safe decoder) by default, zstd where its ratio pays.

use std::cell::RefCell;

use serde::{Deserialize, Serialize};

use crate::page::{PAGE_SIZE, Page};

/// The compressor for pages that are neither shared nor patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Compression {
    /// LZ4 block format: what zram and zswap use by default; decodes a page in a microsecond or two.
    #[default]
    Lz4,
    /// zstd at the given level (1 to 19): a better ratio for colder pages, at more CPU.
    Zstd {
        /// zstd compression level.
        level: i32,
    },
}

/// Why a compressed page could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// the LZ4 payload is malformed
    #[error("malformed LZ4 page")]
    Lz4(#[source] lz4_flex::block::DecompressError),
    /// zstd rejected the payload
    #[error("malformed zstd page")]
    Zstd(#[source] std::io::Error),
    /// the payload decodes to something other than one page
    #[error("compressed page decodes to {0} bytes, not a page")]
    WrongLength(usize),
}

/// Room for the largest compressed form of a page: lz4_flex asks for its worst case
/// (110% of the input and a few bytes), which is larger than zstd's; a test checks it.
pub const MAX_COMPRESSED: usize = PAGE_SIZE + PAGE_SIZE / 8;

/// The first byte of every compressed payload names its compressor, so that one store can
/// hold pages compressed both ways (LZ4 for pages that may come back soon, zstd for the
/// coldest) and decode each without being told.
const TAG_LZ4: u8 = 1;
const TAG_ZSTD: u8 = 2;

thread_local! {
    // zstd contexts are costly to build (hundreds of KiB): one per thread, reused.
    static ZSTD_C: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static ZSTD_D: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

impl Compression {
    /// Compresses `page` into `out`, returning the compressed length, or `None` when the
    /// compressor fails (only possible for zstd, on allocation failure).
    pub fn compress(self, page: &Page, out: &mut [u8; MAX_COMPRESSED]) -> Option<usize> {
        let (tag, body) = out.split_first_mut().expect("the buffer is not empty");
        let n = match self {
            Compression::Lz4 => {
                *tag = TAG_LZ4;
                lz4_flex::block::compress_into(page, body).ok()
            }
            Compression::Zstd { level } => {
                *tag = TAG_ZSTD;
                ZSTD_C.with(|c| {
                    let mut c = c.borrow_mut();
                    if c.as_ref().is_none_or(|(l, _)| *l != level) {
                        *c = Some((level, zstd::bulk::Compressor::new(level).ok()?));
                    }
                    let (_, z) = c.as_mut()?;
                    z.compress_to_buffer(&page[..], body).ok()
                })
            }
        }?;
        Some(n + 1)
    }

    /// Rebuilds a page from what [`Compression::compress`] produced, whichever compressor
    /// made it (the payload says). Never panics on bad input.
    pub fn decompress(self, data: &[u8], out: &mut Page) -> Result<(), CompressError> {
        let Some((&tag, data)) = data.split_first() else {
            return Err(CompressError::WrongLength(0));
        };
        let n = match tag {
            TAG_LZ4 => lz4_flex::block::decompress_into(data, out).map_err(CompressError::Lz4)?,
            TAG_ZSTD => ZSTD_D.with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new().map_err(CompressError::Zstd)?);
                }
                let z = d.as_mut().expect("decompressor just made");
                z.decompress_to_buffer(data, &mut out[..])
                    .map_err(CompressError::Zstd)
            })?,
            _ => return Err(CompressError::WrongLength(0)),
        };
        if n != PAGE_SIZE {
            return Err(CompressError::WrongLength(n));
        }
        Ok(())
    }

    /// A short name for tables and JSON.
    pub fn name(self) -> String {
        match self {
            Compression::Lz4 => "lz4".into(),
            Compression::Zstd { level } => format!("zstd-{level}"),
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data is built by truncating on purpose
mod tests {
    use super::*;

    #[test]
    fn buffer_holds_the_worst_case() {
        assert!(MAX_COMPRESSED > lz4_flex::block::get_maximum_output_size(PAGE_SIZE));
        assert!(MAX_COMPRESSED > zstd::zstd_safe::compress_bound(PAGE_SIZE));
    }

    #[test]
    fn both_round_trip_and_reject_garbage() {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i % 13) as u8;
        }
        for c in [Compression::Lz4, Compression::Zstd { level: 3 }] {
            let mut buf = [0u8; MAX_COMPRESSED];
            let n = c.compress(&p, &mut buf).unwrap();
            assert!(n < 200, "{} gave {n}", c.name());
            let mut out = [1u8; PAGE_SIZE];
            c.decompress(&buf[..n], &mut out).unwrap();
            assert_eq!(out, p);
            assert!(c.decompress(&buf[..n / 2], &mut out).is_err());
            assert!(c.decompress(&[0xff; 64], &mut out).is_err());
        }
    }
}
