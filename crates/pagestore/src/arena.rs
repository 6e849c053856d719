//! Where payload bytes live: one arena per shard, with no allocator header per page.
//!
//! A malloc'd box per stored page costs a 16-byte fat pointer in the entry and some 17 bytes
//! of glibc chunk header and rounding per object (measured by `memvisor bench pagestore`), and
//! that overhead is invisible to the store's accounting. The arena is one address space of
//! bytes, backed by 16 KiB chunks; objects are rounded up to 8 bytes and placed end to end, an
//! object at a chunk's end continuing in the next (read back by copying its two parts, into the
//! caller's page or a fresh buffer), so no chunk ends in a gap where the next object did not
//! fit. Freed space goes to free lists by size and is reused best-fit, the remainder split off.
//! A 4-byte handle names an object. Every byte of every chunk is accounted for: as payload, as rounding, or
//! as free space (freed objects and the unfilled end of the newest chunk).

use std::borrow::Cow;
use std::collections::BTreeMap;

/// Objects are rounded up to this.
const GRAIN: usize = 8;
/// Bytes per chunk: small, because each shard has one partly filled.
pub(crate) const CHUNK: usize = 16 << 10;

/// Names an object in an [`Arena`]: its offset in grains (so 32 GiB per arena).
pub(crate) type Handle = u32;

#[derive(Debug, Default)]
pub(crate) struct Arena {
    /// Each of capacity CHUNK; all full but the newest, which grows as objects are appended
    /// (so no chunk is ever zeroed first).
    chunks: Vec<Vec<u8>>,
    /// Bytes used from the start of the arena by bump allocation.
    top: usize,
    /// Freed objects by size in grains.
    free: BTreeMap<u16, Vec<Handle>>,
    /// Bytes in `free`.
    free_bytes: usize,
}

/// The arena ran out of handle space (32 GiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ArenaFull;

fn grains(len: usize) -> u16 {
    u16::try_from(len.div_ceil(GRAIN)).expect("objects are at most a page")
}

fn offset(h: Handle) -> usize {
    h as usize * GRAIN
}

impl Arena {
    /// Copies `bytes` (1 to 4096 of them) into the arena.
    pub(crate) fn alloc(&mut self, bytes: &[u8]) -> Result<Handle, ArenaFull> {
        let g = grains(bytes.len());
        let Some(h) = self.take_free(g) else {
            return self.append(bytes, usize::from(g) * GRAIN);
        };
        let at = offset(h);
        let (c, o) = (at / CHUNK, at % CHUNK);
        let first = bytes.len().min(CHUNK - o);
        self.chunks[c][o..o + first].copy_from_slice(&bytes[..first]);
        if first < bytes.len() {
            self.chunks[c + 1][..bytes.len() - first].copy_from_slice(&bytes[first..]);
        }
        Ok(h)
    }

    /// The smallest free object of at least `g` grains, its remainder split off and kept free.
    fn take_free(&mut self, g: u16) -> Option<Handle> {
        let (&have, list) = self.free.range_mut(g..).next()?;
        let h = list.pop().expect("no empty lists are kept");
        if list.is_empty() {
            self.free.remove(&have);
        }
        self.free_bytes -= usize::from(have) * GRAIN;
        if have > g {
            self.put_free(h + u32::from(g), have - g);
        }
        Some(h)
    }

    fn put_free(&mut self, h: Handle, g: u16) {
        self.free.entry(g).or_default().push(h);
        self.free_bytes += usize::from(g) * GRAIN;
    }

    /// Places `bytes`, padded to `size`, at the end of the arena.
    fn append(&mut self, bytes: &[u8], size: usize) -> Result<Handle, ArenaFull> {
        // The object's end must be addressable too: free space split from it gets handles.
        Handle::try_from((self.top + size) / GRAIN).map_err(|_| ArenaFull)?;
        let h = Handle::try_from(self.top / GRAIN).map_err(|_| ArenaFull)?;
        let mut rest = bytes;
        let mut pad = size - bytes.len();
        while !rest.is_empty() || pad > 0 {
            if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
                self.chunks.push(Vec::with_capacity(CHUNK));
            }
            let c = self.chunks.last_mut().expect("just ensured");
            let n = rest.len().min(CHUNK - c.len());
            c.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            let p = pad.min(CHUNK - c.len());
            c.resize(c.len() + p, 0);
            pad -= p;
        }
        self.top += size;
        Ok(h)
    }

    /// The `len` bytes of object `h`: borrowed from its chunk, or, for an object that continues
    /// into the next chunk (about one object per chunk), copied out.
    pub(crate) fn get(&self, h: Handle, len: usize) -> Cow<'_, [u8]> {
        let at = offset(h);
        let (c, o) = (at / CHUNK, at % CHUNK);
        if o + len <= CHUNK {
            return Cow::Borrowed(&self.chunks[c][o..o + len]);
        }
        let first = CHUNK - o;
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&self.chunks[c][o..]);
        v.extend_from_slice(&self.chunks[c + 1][..len - first]);
        Cow::Owned(v)
    }

    /// Copies the `out.len()` bytes of object `h` into `out`, from one chunk or two.
    pub(crate) fn copy_to(&self, h: Handle, out: &mut [u8]) {
        let at = offset(h);
        let (c, o) = (at / CHUNK, at % CHUNK);
        let first = out.len().min(CHUNK - o);
        out[..first].copy_from_slice(&self.chunks[c][o..o + first]);
        if first < out.len() {
            let rest = out.len() - first;
            out[first..].copy_from_slice(&self.chunks[c + 1][..rest]);
        }
    }

    /// Gives object `h` of `len` bytes back for reuse.
    pub(crate) fn free(&mut self, h: Handle, len: usize) {
        self.put_free(h, grains(len));
    }

    /// Bytes of all chunks: payload, rounding and free space.
    pub(crate) fn capacity(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    /// Bytes of the arena's own bookkeeping: the chunk list and the free lists (a B-tree
    /// node's share estimated at 48 bytes a size).
    pub(crate) fn list_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Vec<u8>>()
            + self
                .free
                .values()
                .map(|v| v.capacity() * 4 + 48)
                .sum::<usize>()
    }

    /// Bytes of chunks not holding an object: free objects and the newest chunk's unused end.
    pub(crate) fn unused_bytes(&self) -> usize {
        self.free_bytes + (self.capacity() - self.top)
    }
}

/// Rounded size of an object of `len` bytes, for audits.
pub(crate) fn rounded(len: usize) -> usize {
    len.div_ceil(GRAIN) * GRAIN
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test bytes are built by truncating on purpose
mod tests {
    use super::*;

    #[test]
    fn objects_keep_their_bytes_across_chunks_and_space_is_reused() {
        let mut a = Arena::default();
        let mut held = Vec::new();
        for i in 0..3000usize {
            let len = 1 + (i * 37) % 4096;
            let bytes: Vec<u8> = (0..len).map(|j| ((i + j) % 251) as u8).collect();
            held.push((a.alloc(&bytes).unwrap(), bytes));
        }
        let spanning = held
            .iter()
            .filter(|(h, b)| offset(*h) % CHUNK + b.len() > CHUNK)
            .count();
        assert!(
            spanning > 100,
            "objects continue across chunk ends: {spanning}"
        );
        for (h, b) in &held {
            assert_eq!(&a.get(*h, b.len())[..], &b[..]);
        }
        let cap = a.capacity();
        // Free every other object, then allocate the same sizes again: no new chunks.
        let mut again = Vec::new();
        for (h, b) in held.iter().step_by(2) {
            a.free(*h, b.len());
            again.push(b.clone());
        }
        for b in &again {
            let h = a.alloc(b).unwrap();
            assert_eq!(&a.get(h, b.len())[..], &b[..]);
        }
        assert_eq!(a.capacity(), cap);
        for (h, b) in held.iter().skip(1).step_by(2) {
            assert_eq!(
                &a.get(*h, b.len())[..],
                &b[..],
                "a live object was overwritten"
            );
        }
        // Used + unused adds up to the chunks.
        let used: usize = held.iter().map(|(_, b)| rounded(b.len())).sum();
        assert_eq!(used + a.unused_bytes(), a.capacity());
    }
}
