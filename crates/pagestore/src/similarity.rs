//! The similarity index: finds a stored page that is probably similar to a new one.
//!
//! After Difference Engine's HashSimilarityDetector(k, s): a page's `k` keys each hash `s`
//! 64-byte blocks taken at fixed pseudo-random offsets; two pages that share a key share those
//! blocks exactly, so they are likely to differ in few bytes. Each of the `k` tables is
//! direct-mapped and lossy, a hint and never a truth: a candidate is only used when the patch
//! actually comes out small. Slots are atomics, so lookups and updates take no lock.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::contention::Waits;
use crate::page::{PAGE_SIZE, Page};

/// Bytes in a similarity block.
pub const BLOCK: usize = 64;
/// Most indices a store can have.
pub const MAX_INDICES: usize = 8;
/// Most blocks one key may cover.
pub const MAX_BLOCKS: usize = 8;

/// Shape of the similarity index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimilarityConfig {
    /// `k`: independent keys per page (1 to 8). More finds more references, at 8 bytes or
    /// more of index per reference page each.
    pub indices: usize,
    /// `s`: 64-byte blocks hashed into each key (1 to 8). More makes each match stronger
    /// evidence of similarity, and rarer.
    pub blocks_per_index: usize,
    /// Seed for the block offsets; fixed so that every run picks the same blocks.
    pub seed: u64,
}

impl Default for SimilarityConfig {
    fn default() -> Self {
        // Difference Engine found (2,1) the best of its variants; docs/pagestore.md has ours.
        SimilarityConfig {
            indices: 2,
            blocks_per_index: 1,
            seed: 0x6d65_6d76_6973_6f72,
        }
    }
}

/// Where a candidate page lives, as the index's user numbers them, in 31 bits (at most
/// [`MAX_LOC`]). The page store packs shard and slot into it; the snapshot store an object
/// number.
pub type Loc = u32;
/// The largest [`Loc`] the index can hold.
pub const MAX_LOC: Loc = 0x7fff_ffff;
const VALID: u64 = 1 << 31;

/// A page's similarity keys; `None` for an index whose blocks are all zero (zero blocks are
/// common to unrelated pages, so they are no evidence of similarity).
pub type Keys = [Option<u64>; MAX_INDICES];

#[derive(Debug)]
struct Tables {
    /// `indices` tables of `per` slots each, back to back.
    slots: Box<[AtomicU64]>,
    per: usize,
}

/// Difference Engine's HashSimilarityDetector(k, s): lossy, lock-free tables from a page's
/// similarity keys to the [`Loc`] of a page that had the same keys. A hint, never a truth: the
/// caller checks a candidate by encoding a patch against it.
#[derive(Debug)]
pub struct SimilarityIndex {
    offsets: Vec<[u16; MAX_BLOCKS]>,
    blocks: usize,
    tables: RwLock<Tables>,
    refs: AtomicUsize,
    waits: Waits,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

const INITIAL_SLOTS: usize = 1 << 12;

impl SimilarityIndex {
    /// An empty index of the given shape (`cfg` is assumed valid: see
    /// [`crate::Config::validate`]).
    pub fn new(cfg: &SimilarityConfig) -> Self {
        Self::with_waits(cfg, Waits::default())
    }

    /// [`SimilarityIndex::new`], telling `waits` when a thread is about to wait for its
    /// tables' lock.
    pub(crate) fn with_waits(cfg: &SimilarityConfig, waits: Waits) -> Self {
        // Distinct block offsets for all k*s blocks, so that keys are independent.
        let mut state = cfg.seed;
        let mut used = [false; PAGE_SIZE / BLOCK];
        let mut offsets = vec![[0u16; MAX_BLOCKS]; cfg.indices];
        for idx in &mut offsets {
            for off in idx.iter_mut().take(cfg.blocks_per_index) {
                let b = loop {
                    let b = usize::try_from(splitmix(&mut state) % (PAGE_SIZE / BLOCK) as u64)
                        .expect("< 64");
                    if !used[b] {
                        break b;
                    }
                };
                used[b] = true;
                *off = u16::try_from(b * BLOCK).expect("page offsets fit u16");
            }
        }
        SimilarityIndex {
            offsets,
            blocks: cfg.blocks_per_index,
            tables: RwLock::new(Tables::new(cfg.indices, INITIAL_SLOTS)),
            refs: AtomicUsize::new(0),
            waits,
        }
    }

    /// The `k` similarity keys of `page`; the same page always gives the same keys for the
    /// same configuration, so keys may be kept (on disk, say) and inserted later.
    pub fn keys(&self, page: &Page) -> Keys {
        let mut keys = [None; MAX_INDICES];
        for (key, offs) in keys.iter_mut().zip(&self.offsets) {
            let mut k = 0u64;
            let mut all_zero = true;
            for &o in &offs[..self.blocks] {
                let block = &page[usize::from(o)..usize::from(o) + BLOCK];
                all_zero &= block.iter().all(|&b| b == 0);
                k = k.rotate_left(23) ^ xxh3_64(block);
            }
            if !all_zero {
                *key = Some(k);
            }
        }
        keys
    }

    fn entry(key: u64, loc: Loc) -> u64 {
        (key & !0xffff_ffff) | VALID | u64::from(loc)
    }

    /// The stored page that most keys point at.
    pub fn lookup(&self, keys: &Keys) -> Option<Loc> {
        let t = self.waits.read(&self.tables);
        let mut found: [(Loc, u8); MAX_INDICES] = [(0, 0); MAX_INDICES];
        let mut n = 0;
        for (i, key) in keys.iter().enumerate().take(self.offsets.len()) {
            let Some(key) = *key else { continue };
            let e = t.slot(i, key).load(Ordering::Relaxed);
            if e & VALID == 0 || e >> 32 != key >> 32 {
                continue;
            }
            let loc = (e & 0x7fff_ffff) as Loc;
            match found[..n].iter_mut().find(|(l, _)| *l == loc) {
                Some((_, votes)) => *votes += 1,
                None => {
                    found[n] = (loc, 1);
                    n += 1;
                }
            }
        }
        found[..n].iter().max_by_key(|(_, v)| *v).map(|(l, _)| *l)
    }

    /// Makes `loc` (at most [`MAX_LOC`]) the page that `keys` find, growing the tables as
    /// references multiply.
    pub fn insert(&self, keys: &Keys, loc: Loc) {
        debug_assert!(loc <= MAX_LOC, "similarity locations have 31 bits");
        let loc = loc & MAX_LOC;
        {
            let t = self.waits.read(&self.tables);
            for (i, key) in keys.iter().enumerate().take(self.offsets.len()) {
                if let Some(key) = *key {
                    t.slot(i, key)
                        .store(Self::entry(key, loc), Ordering::Relaxed);
                }
            }
        }
        let refs = self.refs.fetch_add(1, Ordering::Relaxed) + 1;
        if refs > self.waits.read(&self.tables).per {
            self.grow(refs);
        }
    }

    /// Forgets `loc` wherever its keys still point at it.
    pub fn remove(&self, keys: &Keys, loc: Loc) {
        let loc = loc & MAX_LOC;
        let t = self.waits.read(&self.tables);
        for (i, key) in keys.iter().enumerate().take(self.offsets.len()) {
            if let Some(key) = *key {
                let _ = t.slot(i, key).compare_exchange(
                    Self::entry(key, loc),
                    0,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
        }
        self.refs.fetch_sub(1, Ordering::Relaxed);
    }

    fn grow(&self, refs: usize) {
        let mut t = self.waits.write(&self.tables);
        let old_slots = t.per;
        if refs <= old_slots {
            return; // another thread grew it
        }
        let k = self.offsets.len();
        // Grow by half, not double: every slot is metadata the store pays for.
        let new = Tables::new(k, refs + refs / 2);
        // A slot is chosen from the tag (the key's top 32 bits) alone, so entries can move.
        for i in 0..k {
            for s in &t.slots[i * old_slots..(i + 1) * old_slots] {
                let e = s.load(Ordering::Relaxed);
                if e & VALID != 0 {
                    new.slot(i, e).store(e, Ordering::Relaxed);
                }
            }
        }
        *t = new;
    }

    /// Bytes the index holds.
    pub fn bytes(&self) -> usize {
        self.waits.read(&self.tables).slots.len() * std::mem::size_of::<AtomicU64>()
            + self.offsets.len() * std::mem::size_of::<[u16; MAX_BLOCKS]>()
    }
}

impl Tables {
    fn new(k: usize, per: usize) -> Self {
        Tables {
            slots: (0..k * per).map(|_| AtomicU64::new(0)).collect(),
            per,
        }
    }

    fn slot(&self, index: usize, key: u64) -> &AtomicU64 {
        // Multiply-shift maps the 32-bit tag onto any table size, not only powers of two.
        let at = ((key >> 32) * self.per as u64) >> 32;
        &self.slots[index * self.per + at as usize]
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test data is built by truncating on purpose
mod tests {
    use super::*;

    fn page(seed: u64) -> Page {
        let mut p = [0u8; PAGE_SIZE];
        let mut s = seed;
        for w in p.chunks_exact_mut(8) {
            w.copy_from_slice(&splitmix(&mut s).to_le_bytes());
        }
        p
    }

    #[test]
    fn finds_a_page_with_one_changed_byte_and_forgets_it() {
        let cfg = SimilarityConfig {
            indices: 4,
            ..Default::default()
        };
        let idx = SimilarityIndex::new(&cfg);
        let a = page(1);
        idx.insert(&idx.keys(&a), 42);
        let mut b = a;
        b[100] ^= 1;
        assert_eq!(idx.lookup(&idx.keys(&b)), Some(42));
        assert_eq!(idx.lookup(&idx.keys(&page(2))), None);
        idx.remove(&idx.keys(&a), 42);
        assert_eq!(idx.lookup(&idx.keys(&b)), None);
    }

    #[test]
    fn growth_keeps_entries() {
        let idx = SimilarityIndex::new(&SimilarityConfig::default());
        let n = INITIAL_SLOTS as u64 * 3;
        for i in 0..n {
            idx.insert(&idx.keys(&page(i)), i as Loc);
        }
        assert!(idx.bytes() >= 2 * 8 * n as usize);
        // The tables are lossy, but after growth nearly every page is still found.
        let found = (0..n)
            .filter(|&i| idx.lookup(&idx.keys(&page(i))) == Some(i as Loc))
            .count();
        assert!(found as u64 > n * 7 / 10, "found {found} of {n}");
    }

    #[test]
    fn zero_blocks_give_no_keys() {
        let idx = SimilarityIndex::new(&SimilarityConfig::default());
        assert_eq!(idx.keys(&[0u8; PAGE_SIZE]), [None; MAX_INDICES]);
    }
}
