//! Manifests: what a snapshot is, as flat little-endian arrays that open in one read and one
//! checksum.
//!
//! ```text
//! header (96 bytes)
//!  0 magic "MVSSNAP\0"   8 version u32   12 kind u32 (1 snapshot, 2 clone)
//! 16 created u64 (unix seconds)   24 RAM bytes u64   32 packs u32   36 objects u32
//! 40 order entries u32   44 base name bytes u32   48 state bytes u64   56 body bytes u64
//! 64 XXH3-64 of the body   72 non-zero pages u64   80 reserved u64   88 XXH3-64 of bytes 0..88
//! body
//!   packs    n x u64          pack ids (packs/<id as 16 hex digits>.pack)
//!   objects  n x 16 bytes     offset u32, pack u16 (index in packs), form u8, 0 u8,
//!                             record length u32, base u32 (a delta's base: object number + 1)
//!   pages    RAM/4096 x u32   0 = zero page, k = object k - 1   (snapshots only)
//!   order    n x u32          first-touch order, page indexes
//!   state    bytes            the VM state blob
//!   base     bytes            a clone's base snapshot name (clones only)
//! ```

use std::ops::Range;

use xxhash_rust::xxh3::xxh3_64;

use super::format::{Bad, FORMAT_VERSION, Form, to_usize, u16_at, u32_at, u64_at};

pub(crate) const MANIFEST_MAGIC: [u8; 8] = *b"MVSSNAP\0";
pub(crate) const MANIFEST_HEADER: usize = 96;
pub(crate) const OBJECT_ENTRY: usize = 16;

/// A snapshot with its own page table, or a clone that names its base.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Snapshot = 1,
    Clone = 2,
}

/// Where one stored page (object) lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ObjEntry {
    pub(crate) offset: u32,
    pub(crate) pack: u16,
    pub(crate) form: Form,
    pub(crate) len: u32,
    /// For a delta: its base's object number + 1; else 0.
    pub(crate) base: u32,
}

impl ObjEntry {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.pack.to_le_bytes());
        out.push(self.form as u8);
        out.push(0);
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.base.to_le_bytes());
    }
}

/// A parsed manifest: the file's bytes and where each section lies in them. Nothing is copied
/// out at parse time, so a manifest of a 1 GiB snapshot opens in a read and a checksum.
#[derive(Debug)]
pub(crate) struct Manifest {
    pub(crate) kind: Kind,
    pub(crate) created: u64,
    pub(crate) ram_size: u64,
    pub(crate) nonzero: u64,
    buf: Vec<u8>,
    packs: Range<usize>,
    objects: Range<usize>,
    pages: Range<usize>,
    order: Range<usize>,
    state: Range<usize>,
    base: Range<usize>,
}

/// The parts of a manifest to write.
#[derive(Debug)]
pub(crate) struct Parts<'a> {
    pub(crate) kind: Kind,
    pub(crate) created: u64,
    pub(crate) ram_size: u64,
    pub(crate) nonzero: u64,
    pub(crate) packs: &'a [u64],
    /// Object entries, already encoded.
    pub(crate) objects: &'a [u8],
    /// Page table, already encoded (empty for a clone).
    pub(crate) pages: &'a [u8],
    /// First-touch order, already encoded.
    pub(crate) order: &'a [u8],
    pub(crate) state: &'a [u8],
    pub(crate) base: &'a str,
}

fn u32_len(n: usize, what: &str) -> Result<u32, String> {
    u32::try_from(n).map_err(|_| format!("{what}: {n} is more than a manifest holds"))
}

/// Writes a whole manifest.
pub(crate) fn encode(p: &Parts<'_>) -> Result<Vec<u8>, String> {
    let n_objects = u32_len(p.objects.len() / OBJECT_ENTRY, "objects")?;
    let n_order = u32_len(p.order.len() / 4, "order entries")?;
    let n_packs = u32_len(p.packs.len(), "packs")?;
    let base_len = u32_len(p.base.len(), "base name")?;
    let body_len = p.packs.len() * 8
        + p.objects.len()
        + p.pages.len()
        + p.order.len()
        + p.state.len()
        + p.base.len();
    let mut m = Vec::with_capacity(MANIFEST_HEADER + body_len);
    m.extend_from_slice(&MANIFEST_MAGIC);
    m.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    m.extend_from_slice(&(p.kind as u32).to_le_bytes());
    m.extend_from_slice(&p.created.to_le_bytes());
    m.extend_from_slice(&p.ram_size.to_le_bytes());
    m.extend_from_slice(&n_packs.to_le_bytes());
    m.extend_from_slice(&n_objects.to_le_bytes());
    m.extend_from_slice(&n_order.to_le_bytes());
    m.extend_from_slice(&base_len.to_le_bytes());
    m.extend_from_slice(&(p.state.len() as u64).to_le_bytes());
    m.extend_from_slice(&(body_len as u64).to_le_bytes());
    m.extend_from_slice(&[0u8; 8]); // body checksum, below
    m.extend_from_slice(&p.nonzero.to_le_bytes());
    m.extend_from_slice(&[0u8; 8]);
    m.extend_from_slice(&[0u8; 8]); // header checksum, below
    for id in p.packs {
        m.extend_from_slice(&id.to_le_bytes());
    }
    m.extend_from_slice(p.objects);
    m.extend_from_slice(p.pages);
    m.extend_from_slice(p.order);
    m.extend_from_slice(p.state);
    m.extend_from_slice(p.base.as_bytes());
    let body = xxh3_64(&m[MANIFEST_HEADER..]);
    m[64..72].copy_from_slice(&body.to_le_bytes());
    let head = xxh3_64(&m[..88]);
    m[88..96].copy_from_slice(&head.to_le_bytes());
    Ok(m)
}

fn bad<T>(what: impl Into<String>) -> Result<T, Bad> {
    Err(Bad::Corrupt(what.into()))
}

/// Checks only the header: magic, version, checksum. Enough to tell a clone from a snapshot
/// and to read a clone's base without the body.
pub(crate) fn check_header(h: &[u8]) -> Result<(), Bad> {
    if h.len() < MANIFEST_HEADER {
        return bad(format!(
            "manifest is {} bytes, shorter than its header",
            h.len()
        ));
    }
    if h[..8] != MANIFEST_MAGIC {
        return bad("no manifest magic at the start");
    }
    let version = u32_at(h, 8);
    if version > FORMAT_VERSION {
        return Err(Bad::Newer(version));
    }
    if version == 0 {
        return bad("manifest version 0");
    }
    if xxh3_64(&h[..88]) != u64_at(h, 88) {
        return bad("manifest header checksum mismatch");
    }
    Ok(())
}

impl Manifest {
    /// Parses a whole manifest file, checking its header, its layout against its size, and
    /// its body's checksum.
    pub(crate) fn parse(buf: Vec<u8>) -> Result<Manifest, Bad> {
        check_header(&buf)?;
        let kind = match u32_at(&buf, 12) {
            1 => Kind::Snapshot,
            2 => Kind::Clone,
            k => return bad(format!("manifest kind {k}")),
        };
        let ram_size = u64_at(&buf, 24);
        let n_packs = to_usize(u64::from(u32_at(&buf, 32)));
        let n_objects = to_usize(u64::from(u32_at(&buf, 36)));
        let n_order = to_usize(u64::from(u32_at(&buf, 40)));
        let base_len = to_usize(u64::from(u32_at(&buf, 44)));
        let state_len = to_usize(u64_at(&buf, 48));
        let body_len = to_usize(u64_at(&buf, 56));
        if !ram_size.is_multiple_of(4096) || ram_size == 0 {
            return bad(format!(
                "RAM size {ram_size} is not a positive multiple of a page"
            ));
        }
        let n_pages = match kind {
            Kind::Snapshot => to_usize(ram_size / 4096),
            Kind::Clone => 0,
        };
        // Section ends, with overflow checks: a hostile header can name any sizes.
        let mut at = MANIFEST_HEADER;
        let mut section = |len: Option<usize>| -> Result<Range<usize>, Bad> {
            let end = len
                .and_then(|l| at.checked_add(l))
                .ok_or_else(|| Bad::Corrupt("manifest sections overflow".into()))?;
            let r = at..end;
            at = end;
            Ok(r)
        };
        let packs = section(n_packs.checked_mul(8))?;
        let objects = section(n_objects.checked_mul(OBJECT_ENTRY))?;
        let pages = section(n_pages.checked_mul(4))?;
        let order = section(n_order.checked_mul(4))?;
        let state = section(Some(state_len))?;
        let base = section(Some(base_len))?;
        if at - MANIFEST_HEADER != body_len || at != buf.len() {
            return bad(format!(
                "manifest is {} bytes but its header describes {at} (truncated or overwritten)",
                buf.len()
            ));
        }
        if xxh3_64(&buf[MANIFEST_HEADER..]) != u64_at(&buf, 64) {
            return bad("manifest body checksum mismatch");
        }
        if kind == Kind::Snapshot && n_packs > usize::from(u16::MAX) + 1 {
            return bad("more packs than an object entry can name");
        }
        let m = Manifest {
            kind,
            created: u64_at(&buf, 16),
            ram_size,
            nonzero: u64_at(&buf, 72),
            buf,
            packs,
            objects,
            pages,
            order,
            state,
            base,
        };
        if kind == Kind::Clone && m.base().is_none() {
            return bad("clone without a valid base name");
        }
        Ok(m)
    }

    /// Pages of guest RAM.
    pub(crate) fn pages(&self) -> u64 {
        self.ram_size / 4096
    }

    pub(crate) fn n_packs(&self) -> usize {
        self.packs.len() / 8
    }

    pub(crate) fn pack_id(&self, i: usize) -> u64 {
        u64_at(&self.buf, self.packs.start + 8 * i)
    }

    pub(crate) fn pack_ids(&self) -> Vec<u64> {
        (0..self.n_packs()).map(|i| self.pack_id(i)).collect()
    }

    pub(crate) fn n_objects(&self) -> u32 {
        u32::try_from(self.objects.len() / OBJECT_ENTRY).unwrap_or(u32::MAX)
    }

    /// Object `n` (0-based), if its form byte is valid.
    #[inline]
    pub(crate) fn object(&self, n: u32) -> Option<ObjEntry> {
        let i = usize::try_from(n).ok()?;
        if i >= self.objects.len() / OBJECT_ENTRY {
            return None;
        }
        let at = self.objects.start + OBJECT_ENTRY * i;
        let e = &self.buf[at..at + OBJECT_ENTRY];
        Some(ObjEntry {
            offset: u32_at(e, 0),
            pack: u16_at(e, 4),
            form: Form::from_u8(e[6])?,
            len: u32_at(e, 8),
            base: u32_at(e, 12),
        })
    }

    /// The page table's entry for `index`: 0 for a zero page, k for object k - 1. `None`
    /// past the end (and always for a clone, which has no table of its own).
    #[inline]
    pub(crate) fn page(&self, index: u64) -> Option<u32> {
        let at = usize::try_from(index)
            .ok()?
            .checked_mul(4)?
            .checked_add(self.pages.start)?;
        if at.checked_add(4)? > self.pages.end {
            return None;
        }
        Some(u32_at(&self.buf, at))
    }

    /// The page table as stored (for rewriting a manifest unchanged).
    pub(crate) fn pages_bytes(&self) -> &[u8] {
        &self.buf[self.pages.clone()]
    }

    pub(crate) fn order_bytes(&self) -> &[u8] {
        &self.buf[self.order.clone()]
    }

    pub(crate) fn order(&self) -> Vec<u32> {
        self.order_bytes()
            .chunks_exact(4)
            .map(|c| u32_at(c, 0))
            .collect()
    }

    pub(crate) fn state(&self) -> &[u8] {
        &self.buf[self.state.clone()]
    }

    /// A clone's base name (validated as a snapshot name).
    pub(crate) fn base(&self) -> Option<&str> {
        if self.base.is_empty() {
            return None;
        }
        let s = std::str::from_utf8(&self.buf[self.base.clone()]).ok()?;
        super::valid_name(s).ok().map(|()| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let mut objects = Vec::new();
        ObjEntry {
            offset: 64,
            pack: 0,
            form: Form::Raw,
            len: 4144,
            base: 0,
        }
        .encode(&mut objects);
        let pages: Vec<u8> = [1u32, 0, 1, 0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        encode(&Parts {
            kind: Kind::Snapshot,
            created: 5,
            ram_size: 4 * 4096,
            nonzero: 2,
            packs: &[0xabc],
            objects: &objects,
            pages: &pages,
            order: &3u32.to_le_bytes(),
            state: b"vm state",
            base: "",
        })
        .unwrap()
    }

    #[test]
    fn round_trip() {
        let m = Manifest::parse(sample()).unwrap();
        assert_eq!((m.kind, m.pages(), m.nonzero), (Kind::Snapshot, 4, 2));
        assert_eq!(m.pack_ids(), vec![0xabc]);
        assert_eq!(m.object(0).unwrap().len, 4144);
        assert_eq!(m.object(1), None);
        assert_eq!((m.page(0), m.page(1), m.page(4)), (Some(1), Some(0), None));
        assert_eq!(m.order(), vec![3]);
        assert_eq!(m.state(), b"vm state");
    }

    #[test]
    fn truncation_flips_and_newer_versions_are_refused() {
        let m = sample();
        for n in 0..m.len() {
            assert!(Manifest::parse(m[..n].to_vec()).is_err(), "cut at {n}");
        }
        for i in 0..m.len() {
            let mut b = m.clone();
            b[i] ^= 1;
            assert!(Manifest::parse(b).is_err(), "flip at {i}");
        }
        let mut b = m;
        b[8] = 2;
        assert!(matches!(Manifest::parse(b), Err(Bad::Newer(2))));
    }
}
