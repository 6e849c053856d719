//! Sub-page patching: a page held as the few bytes where it differs from a similar reference.
//!
//! Three codecs are kept so that `memvisor bench pagestore` can re-measure the choice on any
//! machine and any memory; docs/pagestore.md has the figures that made [`DeltaCodec::XorRle`]
//! the default. Every decoder treats its input as hostile: malformed bytes give a
//! [`DecodeError`], never a panic or an out-of-bounds access.

use serde::{Deserialize, Serialize};

use crate::page::{PAGE_SIZE, Page, match_len};

/// How a patch is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeltaCodec {
    /// Runs of (bytes equal to the reference at the same offset, literal bytes): the XOR of
    /// page and reference, run-length coded. Cheapest to encode and decode.
    #[default]
    XorRle,
    /// The XOR of page and reference, compressed with LZ4.
    XorLz4,
    /// xdelta-style copy (from any offset of the reference) and insert operations, which also
    /// catches data that moved within the page.
    CopyInsert,
}

impl DeltaCodec {
    /// Every codec, for benchmarks that compare them.
    pub const ALL: [DeltaCodec; 3] = [
        DeltaCodec::XorRle,
        DeltaCodec::XorLz4,
        DeltaCodec::CopyInsert,
    ];

    /// The codec's name as the command line spells it.
    pub fn name(self) -> &'static str {
        match self {
            DeltaCodec::XorRle => "xor-rle",
            DeltaCodec::XorLz4 => "xor-lz4",
            DeltaCodec::CopyInsert => "copy-insert",
        }
    }

    /// Encodes `target` against `reference` into `out` (cleared first). Returns false, with
    /// `out` in an unspecified state, as soon as the patch would exceed `limit` bytes.
    pub fn encode(self, target: &Page, reference: &Page, limit: usize, out: &mut Vec<u8>) -> bool {
        out.clear();
        match self {
            DeltaCodec::XorRle => xor_rle_encode(target, reference, limit, out),
            DeltaCodec::XorLz4 => xor_lz4_encode(target, reference, limit, out),
            DeltaCodec::CopyInsert => copy_insert_encode(target, reference, limit, out),
        }
    }

    /// True when [`DeltaCodec::patch_in_place`] works: the patch only overwrites bytes at their
    /// own offsets, so the reference can be decoded straight into the output.
    pub fn patches_in_place(self) -> bool {
        self == DeltaCodec::XorRle
    }

    /// Turns `page`, holding the reference, into the patched page. Only for codecs whose
    /// [`DeltaCodec::patches_in_place`] is true; others return [`DecodeError::NotInPlace`].
    pub fn patch_in_place(self, delta: &[u8], page: &mut Page) -> Result<(), DecodeError> {
        match self {
            DeltaCodec::XorRle => xor_rle_apply(delta, page),
            _ => Err(DecodeError::NotInPlace),
        }
    }

    /// Rebuilds the page that `delta` was encoded from, given the same `reference`.
    pub fn decode(self, delta: &[u8], reference: &Page, out: &mut Page) -> Result<(), DecodeError> {
        match self {
            DeltaCodec::XorRle => xor_rle_decode(delta, reference, out),
            DeltaCodec::XorLz4 => xor_lz4_decode(delta, reference, out),
            DeltaCodec::CopyInsert => copy_insert_decode(delta, reference, out),
        }
    }
}

/// Why a patch could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// patch ends in the middle of an operation
    #[error("patch ends in the middle of an operation")]
    Truncated,
    /// an operation reaches past the end of the page
    #[error("patch operation reaches past the end of the page")]
    OutOfBounds,
    /// the operations rebuild fewer bytes than a page
    #[error("patch rebuilds {0} bytes, not a page")]
    WrongLength(usize),
    /// the codec needs the reference apart from the output
    #[error("this codec cannot patch in place")]
    NotInPlace,
    /// the LZ4 payload of an xor-lz4 patch is malformed
    #[error("malformed LZ4 payload in patch")]
    Lz4(#[source] lz4_flex::block::DecompressError),
}

// LEB128 varints, at most three bytes for any value a page can need (< 2^21).
#[inline]
fn put_varint(out: &mut Vec<u8>, mut v: usize) {
    while v >= 0x80 {
        out.push(v.to_le_bytes()[0] | 0x80);
        v >>= 7;
    }
    out.push(v.to_le_bytes()[0]);
}

#[inline]
fn get_varint(data: &[u8], pos: &mut usize) -> Result<usize, DecodeError> {
    let mut v = 0usize;
    for shift in [0, 7, 14] {
        let b = *data.get(*pos).ok_or(DecodeError::Truncated)?;
        *pos += 1;
        v |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    // A fourth byte would encode values beyond any page offset.
    Err(DecodeError::OutOfBounds)
}

#[inline]
fn take<'a>(data: &'a [u8], pos: &mut usize, len: usize) -> Result<&'a [u8], DecodeError> {
    let end = pos.checked_add(len).ok_or(DecodeError::Truncated)?;
    let s = data.get(*pos..end).ok_or(DecodeError::Truncated)?;
    *pos = end;
    Ok(s)
}

/// Equal bytes shorter than this inside a changed region are sent as literals: a new
/// (skip, length) pair costs two bytes, so shorter gaps are cheaper inline.
const RLE_MIN_GAP: usize = 3;

fn xor_rle_encode(target: &Page, reference: &Page, limit: usize, out: &mut Vec<u8>) -> bool {
    let mut pos = 0;
    loop {
        let start = pos + match_len(&target[pos..], &reference[pos..]);
        if start >= PAGE_SIZE {
            return true;
        }
        // Extend the literal until a gap of RLE_MIN_GAP equal bytes (or the page end).
        let mut end = start + 1;
        loop {
            while end < PAGE_SIZE && target[end] != reference[end] {
                end += 1;
            }
            let gap = match_len(&target[end..], &reference[end..]);
            if gap >= RLE_MIN_GAP || end + gap >= PAGE_SIZE {
                break;
            }
            end += gap;
        }
        put_varint(out, start - pos);
        put_varint(out, end - start);
        out.extend_from_slice(&target[start..end]);
        if out.len() > limit {
            return false;
        }
        pos = end;
    }
}

fn xor_rle_decode(delta: &[u8], reference: &Page, out: &mut Page) -> Result<(), DecodeError> {
    out.copy_from_slice(reference);
    xor_rle_apply(delta, out)
}

fn xor_rle_apply(delta: &[u8], out: &mut Page) -> Result<(), DecodeError> {
    let (mut i, mut pos) = (0, 0usize);
    while i < delta.len() {
        let skip = get_varint(delta, &mut i)?;
        let len = get_varint(delta, &mut i)?;
        let lit = take(delta, &mut i, len)?;
        let start = pos + skip; // both < 2^21: no overflow
        let end = start + len;
        out.get_mut(start..end)
            .ok_or(DecodeError::OutOfBounds)?
            .copy_from_slice(lit);
        pos = end;
    }
    Ok(())
}

fn xor_lz4_encode(target: &Page, reference: &Page, limit: usize, out: &mut Vec<u8>) -> bool {
    let mut x = [0u8; PAGE_SIZE];
    for ((x, t), r) in x.iter_mut().zip(target).zip(reference) {
        *x = t ^ r;
    }
    out.resize(lz4_flex::block::get_maximum_output_size(PAGE_SIZE), 0);
    match lz4_flex::block::compress_into(&x, out) {
        Ok(n) if n <= limit => {
            out.truncate(n);
            true
        }
        _ => false,
    }
}

fn xor_lz4_decode(delta: &[u8], reference: &Page, out: &mut Page) -> Result<(), DecodeError> {
    let n = lz4_flex::block::decompress_into(delta, out).map_err(DecodeError::Lz4)?;
    if n != PAGE_SIZE {
        return Err(DecodeError::WrongLength(n));
    }
    for (o, r) in out.iter_mut().zip(reference) {
        *o ^= r;
    }
    Ok(())
}

/// Shortest copy worth an operation (a copy op costs up to five bytes).
const COPY_MIN: usize = 8;
const INDEX_BITS: u32 = 10;

#[inline]
fn window_hash(w: &[u8]) -> usize {
    let v = u64::from_le_bytes(w[..8].try_into().expect("8-byte window"));
    (v.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - INDEX_BITS)) as usize
}

fn emit_insert(out: &mut Vec<u8>, bytes: &[u8]) {
    if !bytes.is_empty() {
        put_varint(out, bytes.len() << 1);
        out.extend_from_slice(bytes);
    }
}

fn copy_insert_encode(target: &Page, reference: &Page, limit: usize, out: &mut Vec<u8>) -> bool {
    // Index the reference's 8-byte windows at every 4th offset (position + 1; 0 is empty),
    // so that any match of 11 bytes or more at any shift is found.
    let mut index = [0u16; 1 << INDEX_BITS];
    for p in (0..=PAGE_SIZE - 8).step_by(4) {
        index[window_hash(&reference[p..])] = u16::try_from(p + 1).expect("page offsets fit u16");
    }
    let (mut i, mut lit) = (0, 0);
    while i + 8 <= PAGE_SIZE {
        let same = match_len(&target[i..i + 8], &reference[i..i + 8]) == 8;
        let cand = if same {
            Some(i)
        } else {
            match index[window_hash(&target[i..])] {
                0 => None,
                p => Some(usize::from(p) - 1),
            }
        };
        if let Some(c) = cand {
            let fwd = match_len(&target[i..], &reference[c..]);
            if fwd >= 8 {
                let mut back = 0;
                while i - back > lit
                    && c - back > 0
                    && target[i - back - 1] == reference[c - back - 1]
                {
                    back += 1;
                }
                let (s, cs, len) = (i - back, c - back, fwd + back);
                if len >= COPY_MIN {
                    emit_insert(out, &target[lit..s]);
                    put_varint(out, (len << 1) | 1);
                    put_varint(out, cs);
                    i = s + len;
                    lit = i;
                    if out.len() > limit {
                        return false;
                    }
                    continue;
                }
            }
        }
        i += 1;
        if i - lit > limit {
            return false;
        }
    }
    emit_insert(out, &target[lit..]);
    out.len() <= limit
}

fn copy_insert_decode(delta: &[u8], reference: &Page, out: &mut Page) -> Result<(), DecodeError> {
    let (mut i, mut pos) = (0, 0usize);
    while i < delta.len() {
        let head = get_varint(delta, &mut i)?;
        let len = head >> 1;
        let dst = out
            .get_mut(pos..pos + len)
            .ok_or(DecodeError::OutOfBounds)?;
        if head & 1 == 1 {
            let off = get_varint(delta, &mut i)?;
            dst.copy_from_slice(
                reference
                    .get(off..off + len)
                    .ok_or(DecodeError::OutOfBounds)?,
            );
        } else {
            dst.copy_from_slice(take(delta, &mut i, len)?);
        }
        pos += len;
    }
    if pos != PAGE_SIZE {
        return Err(DecodeError::WrongLength(pos));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data is built by truncating on purpose
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page_from(seed: u8) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i / 97) as u8);
        }
        p
    }

    fn round_trip(codec: DeltaCodec, t: &Page, r: &Page) -> Option<usize> {
        let mut d = Vec::new();
        if !codec.encode(t, r, PAGE_SIZE * 2, &mut d) {
            return None;
        }
        let mut out = [0u8; PAGE_SIZE];
        codec.decode(&d, r, &mut out).expect("own patch decodes");
        assert_eq!(&out[..], &t[..], "{}", codec.name());
        Some(d.len())
    }

    #[test]
    fn identical_pages_need_almost_nothing() {
        let r = page_from(1);
        for c in DeltaCodec::ALL {
            assert!(round_trip(c, &r, &r).unwrap() <= 32, "{}", c.name());
        }
    }

    #[test]
    fn small_edits_give_small_patches() {
        let r = page_from(1);
        let mut t = r;
        t[10] ^= 0xff;
        t[2000..2016].copy_from_slice(&[9; 16]);
        t[4095] = 0;
        for c in DeltaCodec::ALL {
            let n = round_trip(c, &t, &r).unwrap();
            assert!(n < 64, "{} gave {n}", c.name());
        }
    }

    #[test]
    fn copy_insert_finds_shifted_data() {
        let r = page_from(3);
        let mut t = [0u8; PAGE_SIZE];
        t[5..].copy_from_slice(&r[..PAGE_SIZE - 5]);
        let ci = round_trip(DeltaCodec::CopyInsert, &t, &r).unwrap();
        assert!(ci < 32, "copy-insert gave {ci}");
        let xr = round_trip(DeltaCodec::XorRle, &t, &r).unwrap();
        assert!(xr > 1000, "xor-rle cannot follow a shift, gave {xr}");
    }

    #[test]
    fn limit_is_respected() {
        let r = page_from(1);
        let t = page_from(200);
        for c in DeltaCodec::ALL {
            let mut d = Vec::new();
            assert!(!c.encode(&t, &r, 100, &mut d), "{}", c.name());
        }
    }

    fn arb_page() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), PAGE_SIZE)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn decoders_never_panic_on_garbage(delta in proptest::collection::vec(any::<u8>(), 0..600), seed in any::<u8>()) {
            let r = page_from(seed);
            let mut out = [0u8; PAGE_SIZE];
            for c in DeltaCodec::ALL {
                let _ = c.decode(&delta, &r, &mut out);
            }
        }

        #[test]
        fn decoders_survive_mutated_patches(edits in proptest::collection::vec((0usize..PAGE_SIZE, any::<u8>()), 1..40), flip in any::<(usize, u8)>(), cut in any::<usize>()) {
            let r = page_from(7);
            let mut t = r;
            for (i, b) in edits { t[i] = b; }
            let mut out = [0u8; PAGE_SIZE];
            for c in DeltaCodec::ALL {
                let mut d = Vec::new();
                prop_assert!(c.encode(&t, &r, PAGE_SIZE * 2, &mut d));
                if !d.is_empty() {
                    let mut bad = d.clone();
                    let at = flip.0 % bad.len();
                    bad[at] ^= flip.1 | 1;
                    let _ = c.decode(&bad, &r, &mut out);
                    let _ = c.decode(&d[..cut % d.len()], &r, &mut out);
                }
            }
        }

        #[test]
        fn any_pair_round_trips(t in arb_page(), r in arb_page(), keep in 0usize..PAGE_SIZE) {
            // Make the pages share a prefix so that both similar and unrelated pairs are seen.
            let mut t: Page = t.try_into().unwrap();
            let r: Page = r.try_into().unwrap();
            t[..keep].copy_from_slice(&r[..keep]);
            for c in DeltaCodec::ALL {
                round_trip(c, &t, &r);
            }
        }
    }
}
