//! The byte layouts of packs and records (manifests are in `manifest.rs`). All integers are
//! little-endian; every structure carries an XXH3-64 checksum that is checked before any of it
//! is believed, and every parser here takes hostile bytes: it returns an error, never panics.
//!
//! docs/snapshots.md draws the same layouts.

use pagestore::{Compression, DeltaCodec, Keys, PAGE_SIZE, Page, SimilarityConfig};
use xxhash_rust::xxh3::xxh3_64;

/// A page's content id: BLAKE3-256 of its 4096 bytes.
pub(crate) type Id = [u8; 32];

/// The version of packs, records and manifests this code writes and the newest it reads.
pub(crate) const FORMAT_VERSION: u32 = 1;

pub(crate) const PACK_MAGIC: [u8; 8] = *b"MVSPACK\0";
pub(crate) const FOOTER_MAGIC: [u8; 8] = *b"MVSPEND\0";
pub(crate) const RECORD_MAGIC: [u8; 4] = *b"MVSR";

pub(crate) const PACK_HEADER: usize = 64;
const PACK_HEADER_U32: u32 = 64;
pub(crate) const RECORD_HEADER: usize = 48;
pub(crate) const INDEX_ENTRY: usize = 96;
pub(crate) const FOOTER: usize = 40;

/// Bytes of a base id at the start of a delta's payload.
pub(crate) const BASE_ID: usize = 32;
/// The largest record any form makes: a compressed page as large as the compressor's bound
/// (raw pages and deltas are smaller).
pub(crate) const MAX_RECORD: usize = RECORD_HEADER + pagestore::MAX_COMPRESSED;
/// The largest patch kept (Difference Engine's bound, as the page store's default).
pub(crate) const MAX_PATCH: usize = 2048;
/// Keys kept per object: the store's similarity index is the page store's default, (2, 1).
pub(crate) const KEYS: usize = 2;

/// How an object holds its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Form {
    /// The 4096 bytes as they are.
    Raw = 1,
    /// The page store's compressed payload (its first byte names the compressor).
    Compressed = 2,
    /// A base id and a patch against that (never patched) base.
    Delta = 3,
}

impl Form {
    pub(crate) fn from_u8(b: u8) -> Option<Form> {
        match b {
            1 => Some(Form::Raw),
            2 => Some(Form::Compressed),
            3 => Some(Form::Delta),
            _ => None,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Form::Raw => "raw",
            Form::Compressed => "compressed",
            Form::Delta => "delta",
        }
    }
}

pub(crate) fn codec_byte(c: DeltaCodec) -> u8 {
    match c {
        DeltaCodec::XorRle => 0,
        DeltaCodec::XorLz4 => 1,
        DeltaCodec::CopyInsert => 2,
    }
}

pub(crate) fn codec_of(b: u8) -> Option<DeltaCodec> {
    match b {
        0 => Some(DeltaCodec::XorRle),
        1 => Some(DeltaCodec::XorLz4),
        2 => Some(DeltaCodec::CopyInsert),
        _ => None,
    }
}

// Little-endian field access. The `at` functions take a slice already checked to be long
// enough (they are only used on fixed-size headers and entries whose length was checked).
pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn id_at(b: &[u8], at: usize) -> Id {
    let mut a = [0u8; 32];
    a.copy_from_slice(&b[at..at + 32]);
    a
}

/// `usize` from a file's `u64`, saturating: on 64-bit hosts it is exact, and a saturated
/// value fails every later bound check anyway.
pub(crate) fn to_usize(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

/// The similarity index every store uses; packs record its shape so that keys computed under
/// another shape are never mixed in.
pub(crate) fn similarity() -> SimilarityConfig {
    SimilarityConfig::default()
}

// ---------------------------------------------------------------------------------------------
// Pack header (64 bytes)
//
//  0 magic "MVSPACK\0"   8 version u32   12 header length u32 (64)   16 pack id u64
// 24 created u64 (unix seconds)   32 similarity k u16, s u16, reserved u32   40 seed u64
// 48 reserved u64   56 XXH3-64 of bytes 0..56

/// What a pack's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PackHeader {
    pub(crate) id: u64,
    pub(crate) created: u64,
    /// True when the pack's similarity keys were computed with [`similarity`].
    pub(crate) same_similarity: bool,
}

pub(crate) fn encode_pack_header(id: u64, created: u64) -> [u8; PACK_HEADER] {
    let sim = similarity();
    let mut h = [0u8; PACK_HEADER];
    h[0..8].copy_from_slice(&PACK_MAGIC);
    h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&PACK_HEADER_U32.to_le_bytes());
    h[16..24].copy_from_slice(&id.to_le_bytes());
    h[24..32].copy_from_slice(&created.to_le_bytes());
    h[32..34].copy_from_slice(&u16::try_from(sim.indices).unwrap_or(0).to_le_bytes());
    h[34..36].copy_from_slice(
        &u16::try_from(sim.blocks_per_index)
            .unwrap_or(0)
            .to_le_bytes(),
    );
    h[40..48].copy_from_slice(&sim.seed.to_le_bytes());
    let sum = xxh3_64(&h[..56]);
    h[56..64].copy_from_slice(&sum.to_le_bytes());
    h
}

/// Why a structure was refused: damaged (with the decoder's own complaint, if a decoder
/// made it), or of a newer version.
#[derive(Debug)]
pub(crate) enum Bad {
    Corrupt(String),
    Decoder(&'static str, Box<dyn std::error::Error + Send + Sync>),
    Newer(u32),
}

impl Bad {
    pub(crate) fn into_error(self, path: &std::path::Path) -> crate::store::StoreError {
        match self {
            Bad::Corrupt(what) => crate::store::StoreError::corrupt(path, what),
            Bad::Decoder(what, source) => crate::store::StoreError::Corrupt {
                path: path.to_path_buf(),
                what: what.to_string(),
                source: Some(source),
            },
            Bad::Newer(found) => crate::store::StoreError::NewerVersion {
                path: path.to_path_buf(),
                found,
                supported: FORMAT_VERSION,
            },
        }
    }
}

fn bad<T>(what: impl Into<String>) -> Result<T, Bad> {
    Err(Bad::Corrupt(what.into()))
}

pub(crate) fn decode_pack_header(h: &[u8]) -> Result<PackHeader, Bad> {
    if h.len() < PACK_HEADER {
        return bad(format!(
            "pack header is {} bytes, not {PACK_HEADER}",
            h.len()
        ));
    }
    if h[0..8] != PACK_MAGIC {
        return bad("no pack magic at the start");
    }
    // The version is read before the checksum: a newer layout may checksum differently.
    let version = u32_at(h, 8);
    if version > FORMAT_VERSION {
        return Err(Bad::Newer(version));
    }
    if version == 0 {
        return bad("pack version 0");
    }
    if xxh3_64(&h[..56]) != u64_at(h, 56) {
        return bad("pack header checksum mismatch");
    }
    if u32_at(h, 12) != PACK_HEADER_U32 {
        return bad("pack header length is not 64");
    }
    let sim = similarity();
    let same_similarity = usize::from(u16_at(h, 32)) == sim.indices
        && usize::from(u16_at(h, 34)) == sim.blocks_per_index
        && u64_at(h, 40) == sim.seed;
    Ok(PackHeader {
        id: u64_at(h, 16),
        created: u64_at(h, 24),
        same_similarity,
    })
}

// ---------------------------------------------------------------------------------------------
// Record (48-byte header, then the payload)
//
//  0 XXH3-64 of bytes 8..end   8 form u8   9 delta codec u8   10 payload length u16
// 12 magic "MVSR"   16 id: BLAKE3-256 of the page   48 payload
//    raw: the 4096 bytes; compressed: the page store's payload; delta: base id (32) + patch

/// Appends a whole record for a page to `out`.
pub(crate) fn encode_record(form: Form, codec: u8, id: &Id, payload: &[&[u8]], out: &mut Vec<u8>) {
    let len: usize = payload.iter().map(|p| p.len()).sum();
    let start = out.len();
    out.extend_from_slice(&[0u8; 8]);
    out.push(form as u8);
    out.push(codec);
    out.extend_from_slice(&u16::try_from(len).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(id);
    for p in payload {
        out.extend_from_slice(p);
    }
    let sum = xxh3_64(&out[start + 8..]);
    out[start..start + 8].copy_from_slice(&sum.to_le_bytes());
}

/// A record that passed its checks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Record<'a> {
    pub(crate) form: Form,
    pub(crate) codec: u8,
    pub(crate) id: Id,
    pub(crate) payload: &'a [u8],
}

/// Checks a whole record (exactly its bytes): checksum, magic, form, payload length. One
/// XXH3 of at most a few KiB: the cheap check that keeps a damaged file from giving wrong
/// bytes.
pub(crate) fn check_record(r: &[u8]) -> Result<Record<'_>, Bad> {
    if r.len() < RECORD_HEADER || r.len() > MAX_RECORD {
        return bad(format!("record of {} bytes", r.len()));
    }
    if xxh3_64(&r[8..]) != u64_at(r, 0) {
        return bad("record checksum mismatch");
    }
    if r[12..16] != RECORD_MAGIC {
        return bad("no record magic");
    }
    let Some(form) = Form::from_u8(r[8]) else {
        return bad(format!("record form {}", r[8]));
    };
    let len = usize::from(u16_at(r, 10));
    if len != r.len() - RECORD_HEADER {
        return bad("record payload length disagrees with its size");
    }
    Ok(Record {
        form,
        codec: r[9],
        id: id_at(r, 16),
        payload: &r[RECORD_HEADER..],
    })
}

/// For a delta record, the id of its base.
pub(crate) fn delta_base(rec: &Record<'_>) -> Result<Id, Bad> {
    if rec.payload.len() < BASE_ID {
        return bad("delta shorter than its base id");
    }
    Ok(id_at(rec.payload, 0))
}

/// Rebuilds the page of a whole (raw or compressed) record.
pub(crate) fn decode_whole(rec: &Record<'_>, out: &mut Page) -> Result<(), Bad> {
    match rec.form {
        Form::Raw => {
            if rec.payload.len() != PAGE_SIZE {
                return bad("raw record is not a page long");
            }
            out.copy_from_slice(rec.payload);
            Ok(())
        }
        // `decompress` reads the compressor from the payload's first byte.
        Form::Compressed => Compression::Lz4
            .decompress(rec.payload, out)
            .map_err(|e| Bad::Decoder("a compressed record does not decode", Box::new(e))),
        Form::Delta => bad("a delta where a whole page was expected"),
    }
}

/// Applies a delta record to `out`, which holds its base's page.
pub(crate) fn apply_delta(rec: &Record<'_>, out: &mut Page) -> Result<(), Bad> {
    let Some(codec) = codec_of(rec.codec) else {
        return bad(format!("delta codec {}", rec.codec));
    };
    let patch = rec
        .payload
        .get(BASE_ID..)
        .ok_or_else(|| Bad::Corrupt("delta shorter than its base id".into()))?;
    let r = if codec.patches_in_place() {
        codec.patch_in_place(patch, out)
    } else {
        let base = *out;
        codec.decode(patch, &base, out)
    };
    r.map_err(|e| Bad::Decoder("a patch does not apply to its base", Box::new(e)))
}

// ---------------------------------------------------------------------------------------------
// Index entry (96 bytes; one per record, in record order, after the last record)
//
//  0 id (32)   32 base id (32; zeros unless a delta)   64 record offset u64
// 72 record length u32   76 form u8   77 codec u8   78 key mask u8   79 reserved u8
// 80 similarity keys, 2 x u64 (whole pages only; bit i of the mask says key i is present)

/// One record as the pack's index lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub(crate) id: Id,
    pub(crate) base: Id,
    pub(crate) offset: u64,
    pub(crate) len: u32,
    pub(crate) form: Form,
    pub(crate) codec: u8,
    pub(crate) keys: [Option<u64>; KEYS],
}

impl IndexEntry {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.base);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.push(self.form as u8);
        out.push(self.codec);
        let mut mask = 0u8;
        for (i, k) in self.keys.iter().enumerate() {
            if k.is_some() {
                mask |= 1 << i;
            }
        }
        out.push(mask);
        out.push(0);
        for k in self.keys {
            out.extend_from_slice(&k.unwrap_or(0).to_le_bytes());
        }
    }

    pub(crate) fn decode(b: &[u8]) -> Result<IndexEntry, Bad> {
        if b.len() != INDEX_ENTRY {
            return bad("short index entry");
        }
        let Some(form) = Form::from_u8(b[76]) else {
            return bad(format!("index entry of form {}", b[76]));
        };
        let mask = b[78];
        let mut keys = [None; KEYS];
        for (i, k) in keys.iter_mut().enumerate() {
            if mask & (1 << i) != 0 {
                *k = Some(u64_at(b, 80 + 8 * i));
            }
        }
        Ok(IndexEntry {
            id: id_at(b, 0),
            base: id_at(b, 32),
            offset: u64_at(b, 64),
            len: u32_at(b, 72),
            form,
            codec: b[77],
            keys,
        })
    }

    /// The keys as the similarity index takes them.
    pub(crate) fn sim_keys(&self) -> Keys {
        let mut k = Keys::default();
        k[..KEYS].copy_from_slice(&self.keys);
        k
    }
}

/// The first [`KEYS`] of a page's keys, as an index entry keeps them.
pub(crate) fn stored_keys(k: &Keys) -> [Option<u64>; KEYS] {
    let mut s = [None; KEYS];
    s.copy_from_slice(&k[..KEYS]);
    s
}

// ---------------------------------------------------------------------------------------------
// Footer (40 bytes, the end of the file)
//
//  0 magic "MVSPEND\0"   8 index offset u64   16 entries u64   24 XXH3-64 of the index
// 32 XXH3-64 of bytes 0..32

pub(crate) fn encode_footer(index_offset: u64, count: u64, index_sum: u64) -> [u8; FOOTER] {
    let mut f = [0u8; FOOTER];
    f[0..8].copy_from_slice(&FOOTER_MAGIC);
    f[8..16].copy_from_slice(&index_offset.to_le_bytes());
    f[16..24].copy_from_slice(&count.to_le_bytes());
    f[24..32].copy_from_slice(&index_sum.to_le_bytes());
    let sum = xxh3_64(&f[..32]);
    f[32..40].copy_from_slice(&sum.to_le_bytes());
    f
}

/// A footer that passed its checks: where the index is and how many entries it has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Footer {
    pub(crate) index_offset: u64,
    pub(crate) count: u64,
    pub(crate) index_sum: u64,
}

/// Checks a footer against the file's size, so that the index it names lies exactly between
/// the records and the footer.
pub(crate) fn decode_footer(f: &[u8], file_len: u64) -> Result<Footer, Bad> {
    if f.len() != FOOTER || f[0..8] != FOOTER_MAGIC {
        return bad("no pack footer (the pack is truncated or was never finished)");
    }
    if xxh3_64(&f[..32]) != u64_at(f, 32) {
        return bad("pack footer checksum mismatch");
    }
    let footer = Footer {
        index_offset: u64_at(f, 8),
        count: u64_at(f, 16),
        index_sum: u64_at(f, 24),
    };
    let end = footer
        .count
        .checked_mul(INDEX_ENTRY as u64)
        .and_then(|n| n.checked_add(footer.index_offset))
        .and_then(|n| n.checked_add(FOOTER as u64));
    if end != Some(file_len) || footer.index_offset < PACK_HEADER as u64 {
        return bad("pack footer does not match the file's size");
    }
    Ok(footer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_refuses_any_flipped_byte() {
        let page = [7u8; PAGE_SIZE];
        let id = *blake3::hash(&page).as_bytes();
        let mut buf = [0u8; pagestore::MAX_COMPRESSED];
        let n = Compression::Zstd { level: 3 }
            .compress(&page, &mut buf)
            .unwrap();
        let mut rec = Vec::new();
        encode_record(Form::Compressed, 0, &id, &[&buf[..n]], &mut rec);
        let r = check_record(&rec).unwrap();
        assert_eq!((r.form, r.id), (Form::Compressed, id));
        let mut out = [0u8; PAGE_SIZE];
        decode_whole(&r, &mut out).unwrap();
        assert_eq!(out, page);
        for i in 0..rec.len() {
            let mut bad = rec.clone();
            bad[i] ^= 0x10;
            assert!(check_record(&bad).is_err(), "flip at {i} passed");
        }
        assert!(check_record(&rec[..rec.len() - 1]).is_err());
    }

    #[test]
    fn headers_name_a_newer_version() {
        let mut h = encode_pack_header(42, 1);
        let p = decode_pack_header(&h).unwrap();
        assert_eq!((p.id, p.same_similarity), (42, true));
        h[8] = 9;
        assert!(matches!(decode_pack_header(&h), Err(Bad::Newer(9))));
    }

    #[test]
    fn index_entry_and_footer_round_trip() {
        let e = IndexEntry {
            id: [1; 32],
            base: [2; 32],
            offset: 1 << 33,
            len: 4144,
            form: Form::Delta,
            codec: 0,
            keys: [Some(5), None],
        };
        let mut b = Vec::new();
        e.encode(&mut b);
        assert_eq!(b.len(), INDEX_ENTRY);
        assert_eq!(IndexEntry::decode(&b).unwrap(), e);
        let f = encode_footer(64, 2, 99);
        let len = 64 + 2 * INDEX_ENTRY as u64 + FOOTER as u64;
        assert_eq!(decode_footer(&f, len).unwrap().count, 2);
        assert!(decode_footer(&f, len + 1).is_err());
    }
}
