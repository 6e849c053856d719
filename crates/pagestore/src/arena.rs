//! Where payload bytes live: one arena per shard, with no allocator header per page.
//!
//! A malloc'd box per stored page costs a 16-byte fat pointer in the entry and some 17 bytes
//! of glibc chunk header and rounding per object (measured by `memvisor bench pagestore`), and
//! that overhead is invisible to the store's accounting. The arena packs objects, rounded up to
//! 8 bytes, into chunks that double from 4 KiB to 64 KiB as the shard grows (a small store
//! keeps small partly filled chunks; a large one loses less to the ends of chunks, where an
//! object did not fit); a 4-byte handle names an object. Freed space goes to free lists by size
//! and is reused best-fit, the remainder split off. Every byte of every chunk is accounted for:
//! as payload, as rounding, or as free space.

use std::collections::BTreeMap;

/// Objects are rounded up to this.
const GRAIN: usize = 8;
const FIRST_CHUNK: usize = 4 << 10;
const MAX_CHUNK: usize = 64 << 10;
/// Offsets inside a chunk are stored in grains, in the handle's low 13 bits.
const OFFSET_BITS: u32 = 13;

/// Names an object in an [`Arena`]: chunk (high 19 bits, so 32 GiB per arena) and offset in
/// grains (low 13).
pub(crate) type Handle = u32;

#[derive(Debug, Default)]
pub(crate) struct Arena {
    chunks: Vec<Box<[u8]>>,
    /// Bytes used at the front of the last chunk.
    top: usize,
    /// Freed objects by size in grains.
    free: BTreeMap<u16, Vec<Handle>>,
    /// Bytes of all chunks.
    capacity: usize,
    /// Bytes in `free`.
    free_bytes: usize,
}

/// The arena ran out of handle space (2^19 chunks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ArenaFull;

fn grains(len: usize) -> u16 {
    u16::try_from(len.div_ceil(GRAIN)).expect("objects are at most a page")
}

fn handle(chunk: usize, offset: usize) -> Handle {
    let chunk = u32::try_from(chunk).expect("chunk count checked");
    let grain = u32::try_from(offset / GRAIN).expect("chunk offset < 64 KiB");
    (chunk << OFFSET_BITS) | grain
}

fn split(h: Handle) -> (usize, usize) {
    (
        (h >> OFFSET_BITS) as usize,
        (h & ((1 << OFFSET_BITS) - 1)) as usize * GRAIN,
    )
}

impl Arena {
    /// Copies `bytes` (1 to 4096 of them) into the arena.
    pub(crate) fn alloc(&mut self, bytes: &[u8]) -> Result<Handle, ArenaFull> {
        let g = grains(bytes.len());
        let size = usize::from(g) * GRAIN;
        let h = match self.take_free(g) {
            Some(h) => h,
            None => self.bump(size)?,
        };
        let (c, o) = split(h);
        self.chunks[c][o..o + bytes.len()].copy_from_slice(bytes);
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

    fn bump(&mut self, size: usize) -> Result<Handle, ArenaFull> {
        let room = self.chunks.last().map_or(0, |c| c.len() - self.top);
        if room < size {
            if self.chunks.len() >= 1 << (32 - OFFSET_BITS) {
                return Err(ArenaFull);
            }
            // The unused tail of the old chunk stays usable as a free object.
            if room >= GRAIN {
                let tail = handle(self.chunks.len() - 1, self.top);
                self.put_free(tail, u16::try_from(room / GRAIN).expect("tail < chunk"));
            }
            let len = self
                .chunks
                .last()
                .map_or(FIRST_CHUNK, |c| (c.len() * 2).min(MAX_CHUNK));
            self.chunks.push(vec![0u8; len].into_boxed_slice());
            self.capacity += len;
            self.top = 0;
        }
        let h = handle(self.chunks.len() - 1, self.top);
        self.top += size;
        Ok(h)
    }

    /// The first `len` bytes of object `h`.
    pub(crate) fn get(&self, h: Handle, len: usize) -> &[u8] {
        let (c, o) = split(h);
        &self.chunks[c][o..o + len]
    }

    /// Gives object `h` of `len` bytes back for reuse.
    pub(crate) fn free(&mut self, h: Handle, len: usize) {
        self.put_free(h, grains(len));
    }

    /// Bytes of all chunks: payload, rounding and free space.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of the arena's own bookkeeping: the chunk list and the free lists (a B-tree
    /// node's share estimated at 48 bytes a size).
    pub(crate) fn list_bytes(&self) -> usize {
        self.chunks.capacity() * std::mem::size_of::<Box<[u8]>>()
            + self
                .free
                .values()
                .map(|v| v.capacity() * 4 + 48)
                .sum::<usize>()
    }

    /// Bytes of chunks not holding an object: free objects and the last chunk's tail.
    pub(crate) fn unused_bytes(&self) -> usize {
        self.free_bytes + self.chunks.last().map_or(0, |c| c.len() - self.top)
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test bytes are built by truncating on purpose
mod tests {
    use super::*;

    #[test]
    fn objects_keep_their_bytes_and_space_is_reused() {
        let mut a = Arena::default();
        let mut held = Vec::new();
        for i in 0..3000usize {
            let len = 1 + (i * 37) % 4096;
            let bytes: Vec<u8> = (0..len).map(|j| ((i + j) % 251) as u8).collect();
            held.push((a.alloc(&bytes).unwrap(), bytes));
        }
        for (h, b) in &held {
            assert_eq!(a.get(*h, b.len()), &b[..]);
        }
        let cap = a.capacity;
        // Free every other object, then allocate the same sizes again: no new chunks.
        let mut again = Vec::new();
        for (h, b) in held.iter().step_by(2) {
            a.free(*h, b.len());
            again.push(b.clone());
        }
        for b in &again {
            a.alloc(b).unwrap();
        }
        assert_eq!(a.capacity, cap);
        for (h, b) in held.iter().skip(1).step_by(2) {
            assert_eq!(a.get(*h, b.len()), &b[..], "a live object was overwritten");
        }
        // Used + unused adds up to the chunks.
        let used: usize = held
            .iter()
            .map(|(_, b)| b.len().div_ceil(GRAIN) * GRAIN)
            .sum();
        assert_eq!(used + a.unused_bytes(), a.capacity);
    }
}
