//! The store: pages in, ids out, exact bytes back.
//!
//! Layout: 16 shards chosen by the top bits of a page's XXH3 hash, each behind its own
//! read-write lock; a page's id names its shard, so a read takes one shard's read lock (two for
//! a patched page, one after the other) and never a global one. No thread ever holds two shard
//! locks at once, which rules out lock-order deadlocks whatever the mix of calls.

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::HashTable;
use std::collections::VecDeque;

use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::arena::{self, Arena, Handle};
use crate::compress::{CompressError, Compression, MAX_COMPRESSED};
use crate::config::{Config, ConfigError};
use crate::contention::{ContentionHook, Waits};
use crate::delta::{DecodeError, DeltaCodec};
use crate::page::{PAGE_SIZE, Page, is_zero};
use crate::similarity::{Keys, Loc, SimilarityIndex};

// 16 shards: enough that inserts and reads on a few cores rarely meet on one lock, few enough
// that the per-shard fixed costs (a partly filled arena chunk each) stay small; 64 shards
// measured 0.4 MiB more arena slack on a 22 MiB store (docs/pagestore.md).
const SHARD_BITS: u32 = 4;
const SHARDS: usize = 1 << SHARD_BITS;
const SLOT_BITS: u32 = 27;
/// Most stored pages per shard; 2^31 pages (8 TiB of distinct content) in all.
const MAX_SLOTS: usize = 1 << SLOT_BITS;
const GEN_BITS: u32 = 29;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;
const NO_SLOT: u32 = u32::MAX;
/// Tag bit of a whole page not yet in the similarity index (deferred, not settled).
const UNINDEXED: u32 = 1 << 31;
/// Bytes in front of a patch naming its reference page.
const REF_BYTES: usize = 4;
thread_local! {
    // Reused by every insert on the thread, so that none pays to zero a fresh buffer.
    static COMPRESSED: std::cell::RefCell<Box<[u8; MAX_COMPRESSED]>> =
        std::cell::RefCell::new(Box::new([0; MAX_COMPRESSED]));
}

/// A patch this small is kept without asking whether compression would do better.
const SURE_PATCH: usize = 256;

/// A handle to a page held by a [`PageStore`].
///
/// Each successful insert hands out one reference, which one `remove` gives back; identical
/// pages inserted twice get the same id twice. The id carries a generation, so a removed id
/// is refused rather than confused with a later page in the same slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PageId(u64);

impl PageId {
    /// The zero page: costs nothing to hold and reads back as 4096 zero bytes.
    pub const ZERO: PageId = PageId(0);

    /// The id as a number, for callers that keep ids in their own tables.
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// An id from [`PageId::as_u64`]. An arbitrary number is safe: the store refuses it.
    pub fn from_u64(v: u64) -> Self {
        PageId(v)
    }

    fn new(shard: usize, slot: usize, generation: u32) -> Self {
        PageId((u64::from(generation) << 32) | u64::from(loc(shard, slot)))
    }

    fn loc(self) -> Loc {
        (self.0 & 0x7fff_ffff) as Loc
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

fn loc(shard: usize, slot: usize) -> Loc {
    // shard < 2^6 and slot < 2^25 (MAX_SLOTS), so this fits 31 bits.
    Loc::try_from((shard << SLOT_BITS) | slot).expect("shard and slot in range")
}

/// A slot index as stored in the 32-bit tables; always < MAX_SLOTS.
fn slot32(slot: usize) -> u32 {
    u32::try_from(slot).expect("slot < MAX_SLOTS")
}

/// Shard (top bits) and 32-bit table hash (low bits) of a page's XXH3 hash.
fn hash_parts(h: u64) -> (usize, u32) {
    ((h >> (64 - SHARD_BITS)) as usize, (h & 0xffff_ffff) as u32)
}

fn split(loc: Loc) -> (usize, usize) {
    let l = loc as usize;
    (l >> SLOT_BITS, l & (MAX_SLOTS - 1))
}

/// What an insert did with the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "class")]
pub enum Outcome {
    /// All zero: nothing stored.
    Zero,
    /// Byte-for-byte equal to a page already held: one more reference to it.
    Shared,
    /// Stored as a patch of `bytes` against a similar page.
    Patched {
        /// patch bytes
        bytes: usize,
    },
    /// Stored compressed to `bytes`.
    Compressed {
        /// compressed bytes
        bytes: usize,
    },
    /// Stored as it is.
    Raw,
}

impl Outcome {
    /// Payload bytes this insert added to the store.
    pub fn stored_bytes(self) -> usize {
        match self {
            Outcome::Zero | Outcome::Shared => 0,
            Outcome::Patched { bytes } | Outcome::Compressed { bytes } => bytes,
            Outcome::Raw => PAGE_SIZE,
        }
    }
}

/// What [`PageStore::classify`] found for a page, without storing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// All zero.
    Zero,
    /// Identical to a held page.
    Duplicate(PageId),
    /// Not held, but the similarity index names a candidate reference.
    Similar,
    /// Nothing like it is held.
    Unique,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// the id is not held: removed already, from another store, or never issued
    #[error("page {0:?} is not held by this store (removed already, or never issued by it)")]
    UnknownPage(PageId),
    /// a stored patch failed to decode: a bug in the store, never expected
    #[error("stored patch of page {0:?} does not decode")]
    CorruptPatch(PageId, #[source] DecodeError),
    /// a stored compressed page failed to decode: a bug in the store, never expected
    #[error("stored compressed page {0:?} does not decode")]
    CorruptCompressed(PageId, #[source] CompressError),
    /// a shard ran out of slots
    #[error("store is full ({MAX_SLOTS} distinct pages in one of its {SHARDS} shards)")]
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Form {
    Free = 0,
    Patched = 1,
    Compressed = 2,
    Raw = 3,
}

impl Form {
    fn from_tag(tag: u32) -> Form {
        match (tag >> GEN_BITS) & 3 {
            1 => Form::Patched,
            2 => Form::Compressed,
            3 => Form::Raw,
            _ => Form::Free,
        }
    }

    /// Counter index; only for stored forms.
    fn ix(self) -> usize {
        self as usize - 1
    }

    /// Only whole pages serve as references, so a patch never needs more than one decode.
    fn is_reference(self) -> bool {
        matches!(self, Form::Compressed | Form::Raw)
    }
}

/// One stored page: 20 bytes of metadata, measured by a test.
#[derive(Debug, Default)]
struct Entry {
    /// Where the payload lives in the shard's arena: raw page, compressed page, or reference
    /// loc (4 bytes LE) followed by the patch.
    handle: Handle,
    /// Low 32 bits of the XXH3 hash (the shard took the top bits); the next free slot when free.
    hash: u32,
    /// References handed out by inserts and not yet removed.
    owners: u32,
    /// Not-indexed flag (1 bit), form (2 bits) and generation (29 bits).
    tag: u32,
    /// Payload bytes.
    len: u16,
    /// Patches that use this page as their reference (a page stops serving as a reference
    /// once 65,535 patches use it).
    deps: u16,
}

impl Entry {
    fn form(&self) -> Form {
        Form::from_tag(self.tag)
    }

    fn generation(&self) -> u32 {
        self.tag & GEN_MASK
    }

    /// In the similarity index, if a whole page (every whole page is, once settled).
    fn indexed(&self) -> bool {
        self.tag & UNINDEXED == 0
    }

    fn holds(&self, id: PageId) -> bool {
        self.form() != Form::Free && self.generation() == id.generation() && self.owners > 0
    }
}

/// The reference a patch payload names.
fn patch_ref(payload: &[u8]) -> Loc {
    u32::from_le_bytes(payload[..REF_BYTES].try_into().expect("patch has a ref"))
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counters {
    stored: u64,
    live: u64,
    owners: u64,
    payload: u64,
}

#[derive(Debug)]
struct Shard {
    entries: Vec<Entry>,
    free_head: u32,
    /// Slots by content hash, for sharing.
    dedup: HashTable<u32>,
    counts: [Counters; 3],
    arena: Arena,
}

/// hashbrown takes its control byte from the top bits; spread our 32 bits over all 64.
fn table_hash(h: u32) -> u64 {
    u64::from(h).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What a freed page leaves to settle once its shard's lock is let go.
enum Freed {
    /// A patch: its reference loses a dependent.
    Patch(Loc),
    /// A whole page: its similarity keys must go, computed from a copy of its payload.
    Whole {
        loc: Loc,
        form: Form,
        payload: Vec<u8>,
    },
    /// Nothing.
    Done,
}

impl Shard {
    fn new() -> Self {
        Shard {
            entries: Vec::new(),
            free_head: NO_SLOT,
            dedup: HashTable::new(),
            counts: [Counters::default(); 3],
            arena: Arena::default(),
        }
    }

    fn payload(&self, e: &Entry) -> Cow<'_, [u8]> {
        self.arena.get(e.handle, usize::from(e.len))
    }

    /// Rebuilds a raw or compressed entry's page into `out`.
    fn decode(&self, e: &Entry, cfg: Config, out: &mut Page) -> Result<(), CompressError> {
        match e.form() {
            Form::Raw => {
                self.arena.copy_to(e.handle, out);
                Ok(())
            }
            _ => cfg.compression.decompress(&self.payload(e), out),
        }
    }

    fn alloc(
        &mut self,
        form: Form,
        hash: u32,
        payload: &[u8],
        flags: u32,
    ) -> Result<(usize, u32), StoreError> {
        if self.free_head == NO_SLOT && self.entries.len() >= MAX_SLOTS {
            return Err(StoreError::Full);
        }
        let handle = self.arena.alloc(payload).map_err(|_| StoreError::Full)?;
        let slot = if self.free_head != NO_SLOT {
            let s = self.free_head as usize;
            self.free_head = self.entries[s].hash;
            s
        } else {
            if self.entries.len() == self.entries.capacity() {
                // Grow by an eighth, not double: spare capacity is metadata we pay for.
                self.entries.reserve_exact(self.entries.len() / 8 + 16);
            }
            self.entries.push(Entry::default());
            self.entries.len() - 1
        };
        let e = &mut self.entries[slot];
        let generation = match (e.generation() + 1) & GEN_MASK {
            0 => 1,
            g => g,
        };
        let c = &mut self.counts[form.ix()];
        c.stored += 1;
        c.live += 1;
        c.owners += 1;
        c.payload += payload.len() as u64;
        *e = Entry {
            handle,
            hash,
            owners: 1,
            tag: ((form as u32) << GEN_BITS) | generation | flags,
            len: u16::try_from(payload.len()).expect("payload is at most a page"),
            deps: 0,
        };
        let entries = &self.entries;
        self.dedup
            .insert_unique(table_hash(hash), slot32(slot), |&s| {
                table_hash(entries[s as usize].hash)
            });
        Ok((slot, generation))
    }

    /// Takes the entry out; the caller has already settled owners and deps. A whole page's
    /// payload is copied out only when `keys` says a similarity index needs it.
    fn free(&mut self, shard: usize, slot: usize, keys: bool) -> Freed {
        let e = &self.entries[slot];
        let (form, len) = (e.form(), usize::from(e.len));
        let freed = match form {
            Form::Patched => Freed::Patch(patch_ref(&self.payload(e))),
            _ if keys && e.indexed() => Freed::Whole {
                loc: loc(shard, slot),
                form,
                payload: self.payload(e).into_owned(),
            },
            _ => Freed::Done,
        };
        self.arena.free(e.handle, len);
        let c = &mut self.counts[form.ix()];
        c.stored -= 1;
        c.payload -= len as u64;
        let e = &mut self.entries[slot];
        let hash = e.hash;
        e.tag = e.generation(); // form Free, generation kept for the next tenant
        e.hash = self.free_head;
        self.free_head = slot32(slot);
        if let Ok(found) = self
            .dedup
            .find_entry(table_hash(hash), |&s| s as usize == slot)
        {
            found.remove();
        }
        freed
    }

    /// Drops one owner reference; frees the entry when nothing needs it.
    fn release_owner(&mut self, shard: usize, slot: usize, keys: bool) -> Option<Freed> {
        let e = &mut self.entries[slot];
        e.owners -= 1;
        let c = &mut self.counts[e.form().ix()];
        c.owners -= 1;
        if e.owners > 0 {
            return None;
        }
        c.live -= 1;
        (e.deps == 0).then(|| self.free(shard, slot, keys))
    }

    fn add_owner(&mut self, slot: usize) {
        let e = &mut self.entries[slot];
        e.owners += 1;
        let c = &mut self.counts[e.form().ix()];
        c.owners += 1;
        if e.owners == 1 {
            c.live += 1; // a reference-only page is wanted again
        }
    }

    /// Holds the whole page in `slot` as `form` with `payload` instead, in place: its id,
    /// owners, deps and hash stay, and it counts as settled. False (and nothing changed) if
    /// the arena is full.
    fn reform(&mut self, slot: usize, form: Form, payload: &[u8]) -> bool {
        let (old, handle, len) = {
            let e = &self.entries[slot];
            (e.form(), e.handle, usize::from(e.len))
        };
        // The new payload is smaller than the old, so the arena has room for it: allocate
        // before freeing, so the page is held throughout.
        let Ok(h) = self.arena.alloc(payload) else {
            return false;
        };
        self.arena.free(handle, len);
        let e = &mut self.entries[slot];
        let (owners, live) = (u64::from(e.owners), u64::from(e.owners > 0));
        e.handle = h;
        e.len = u16::try_from(payload.len()).expect("payload is at most a page");
        // Settled: a patch is never indexed, and the caller indexes a whole page.
        e.tag = ((form as u32) << GEN_BITS) | e.generation();
        for (f, sign, bytes) in [(old, -1i64, len), (form, 1, payload.len())] {
            let c = &mut self.counts[f.ix()];
            let apply = |v: &mut u64, by: u64| {
                *v = if sign > 0 { *v + by } else { *v - by };
            };
            apply(&mut c.stored, 1);
            apply(&mut c.live, live);
            apply(&mut c.owners, owners);
            apply(&mut c.payload, bytes as u64);
        }
        true
    }

    /// Free space past two chunks and past `min_unused` (a fraction) of the arena.
    fn wasteful(&self, min_unused: f64) -> bool {
        let unused = self.arena.unused_bytes();
        unused >= 2 * arena::CHUNK && unused as f64 >= min_unused * self.arena.capacity() as f64
    }

    /// Copies every payload, in arena order, into a fresh arena with no free space but the
    /// newest chunk's end; returns the bytes of chunks given back.
    fn compact(&mut self) -> usize {
        let mut live: Vec<(Handle, u32)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.form() != Form::Free)
            .map(|(slot, e)| (e.handle, slot32(slot)))
            .collect();
        live.sort_unstable();
        let mut fresh = Arena::default();
        let mut buf = [0u8; PAGE_SIZE];
        for (h, slot) in live {
            let e = &mut self.entries[slot as usize];
            let bytes = &mut buf[..usize::from(e.len)];
            self.arena.copy_to(h, bytes);
            // The fresh arena holds less than the old one did, so its handles fit.
            e.handle = fresh
                .alloc(bytes)
                .expect("a compacted arena fits its old space");
        }
        let before = self.arena.capacity();
        self.arena = fresh;
        before - self.arena.capacity()
    }

    /// Bookkeeping bytes: entries, the sharing table, the arena's own lists.
    fn bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.dedup.allocation_size()
            + self.arena.list_bytes()
    }
}

/// Sums over shards, for [`Stats`].
#[derive(Debug, Default)]
struct Totals {
    counts: [Counters; 3],
    /// Entries, tables and arena lists.
    bookkeeping: usize,
    /// Arena chunk bytes.
    arena: usize,
}

impl Totals {
    fn add_shard(&mut self, sh: &Shard, counts: &[Counters; 3]) {
        for (a, b) in self.counts.iter_mut().zip(counts) {
            a.stored += b.stored;
            a.live += b.live;
            a.owners += b.owners;
            a.payload += b.payload;
        }
        self.bookkeeping += sh.bytes();
        self.arena += sh.arena.capacity();
    }
}

/// Logical pages and stored bytes of one stored form.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormStats {
    /// Distinct pages held in this form (reference-only pages included).
    pub stored: u64,
    /// Of those, pages that some owner still holds.
    pub live: u64,
    /// Payload bytes (patch references count as metadata, not here).
    pub payload_bytes: u64,
    /// Metadata that belongs to this form's pages alone: their entries, and for patches the
    /// reference each names. Tables shared by all forms are in [`Stats::metadata_bytes`] only.
    pub metadata_bytes: u64,
}

/// Everything a store holds, exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Zero pages handed out and not removed (they cost nothing).
    pub zero_pages: u64,
    /// References served by an existing copy: owners beyond the first of each stored page.
    pub shared_pages: u64,
    /// Pages held as patches.
    pub patched: FormStats,
    /// Pages held compressed.
    pub compressed: FormStats,
    /// Pages held as they are.
    pub raw: FormStats,
    /// Pages kept only because a patch needs them as its reference.
    pub reference_only_pages: u64,
    /// Every byte of bookkeeping: entries (the per-form figures) and the vector's spare room,
    /// the sharing tables, the similarity index, the arena's lists, patch references, and the
    /// store's fixed structures.
    pub metadata_bytes: u64,
    /// Arena bytes holding no payload: rounding to 16 bytes, freed objects not yet reused,
    /// the unused end of the newest chunk.
    pub slack_bytes: u64,
    /// Pages stored raw by [`PageStore::insert_deferred`] that [`PageStore::settle`] has not
    /// encoded yet (counted in `raw` meanwhile).
    pub pending_pages: u64,
}

impl Stats {
    /// Pages the owners hold: what the store stands in for.
    pub fn logical_pages(&self) -> u64 {
        self.zero_pages
            + self.shared_pages
            + self.patched.live
            + self.compressed.live
            + self.raw.live
    }

    /// Distinct pages actually stored.
    pub fn stored_pages(&self) -> u64 {
        self.patched.stored + self.compressed.stored + self.raw.stored
    }

    /// Page content bytes held.
    pub fn payload_bytes(&self) -> u64 {
        self.patched.payload_bytes + self.compressed.payload_bytes + self.raw.payload_bytes
    }

    /// All bytes held: payload, metadata and arena slack.
    pub fn held_bytes(&self) -> u64 {
        self.payload_bytes() + self.metadata_bytes + self.slack_bytes
    }

    /// What the logical pages would take as plain non-zero pages, less what is held
    /// (negative when the store's metadata outweighs what it saved).
    pub fn saved_bytes(&self) -> i128 {
        let plain = (self.logical_pages() - self.zero_pages) * PAGE_SIZE as u64;
        i128::from(plain) - i128::from(self.held_bytes())
    }
}

/// How [`PageStore::reencode`] may hold a page anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reencode {
    /// The compressor to try.
    pub compression: Compression,
    /// Try a patch against a similar page too (not for a page other patches use).
    pub patch: bool,
    /// Also reencode a page that patches use as their reference: each read of those
    /// patches, and each new patch against it, decodes it.
    pub references: bool,
    /// Leave alone a page held in fewer bytes than this: a page LZ4 already took to a
    /// quarter has little left for zstd to save, for the same CPU as any other.
    pub min_bytes: usize,
}

impl Reencode {
    /// What an insert would have done to a page stored raw: patch it or compress it with
    /// `compression`, whichever is smaller.
    pub fn settle(compression: Compression) -> Reencode {
        Reencode {
            compression,
            patch: true,
            references: true,
            min_bytes: 0,
        }
    }
}

/// A concurrent store of 4 KiB pages, each held in the cheapest form that gives back its
/// exact bytes: zero, shared, patched against a similar page, compressed, or raw.
///
/// ```
/// use pagestore::{PageStore, Config, Outcome, PAGE_SIZE};
/// let store = PageStore::new(Config::default()).unwrap();
/// let mut page = [0u8; PAGE_SIZE];
/// page[..11].copy_from_slice(b"hello, page");
/// let (a, first) = store.insert_with_outcome(&page).unwrap();
/// let (b, second) = store.insert_with_outcome(&page).unwrap();
/// assert_eq!((a, second), (b, Outcome::Shared));
/// assert!(matches!(first, Outcome::Compressed { .. }));
/// let mut out = [0u8; PAGE_SIZE];
/// store.read(a, &mut out).unwrap();
/// assert_eq!(out, page);
/// store.remove(a).unwrap();
/// store.remove(b).unwrap();
/// assert_eq!(store.stats().stored_pages(), 0);
/// ```
#[derive(Debug)]
pub struct PageStore {
    cfg: Config,
    codec: DeltaCodec,
    shards: Box<[RwLock<Shard>]>,
    sim: Option<SimilarityIndex>,
    zero: AtomicU64,
    /// Ids stored raw by `insert_deferred`, oldest first, for `settle` to encode.
    pending: Mutex<VecDeque<PageId>>,
    /// Ids taken off `pending` whose encoding has not finished.
    settling: AtomicU64,
    /// Whom a thread tells before it waits for a shard's or the index's lock.
    waits: Waits,
}

impl PageStore {
    /// A new, empty store.
    pub fn new(cfg: Config) -> Result<Self, ConfigError> {
        cfg.validate()?;
        let waits = Waits::default();
        Ok(PageStore {
            codec: cfg.patch.map(|p| p.codec).unwrap_or_default(),
            sim: cfg
                .patch
                .map(|p| SimilarityIndex::with_waits(&p.similarity, waits.clone())),
            shards: (0..SHARDS).map(|_| RwLock::new(Shard::new())).collect(),
            zero: AtomicU64::new(0),
            pending: Mutex::new(VecDeque::new()),
            settling: AtomicU64::new(0),
            waits,
            cfg,
        })
    }

    /// Sets what a thread calls before it waits for one of the store's locks that another
    /// thread holds: for a caller whose own threads take those locks at idle priority (the
    /// pager's scanner), so that a waiter can lift the holder. Set once; false if a hook
    /// was set already.
    pub fn on_contention(&self, hook: ContentionHook) -> bool {
        self.waits.set(hook)
    }

    /// The configuration the store runs with.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Stores `page`; the returned id reads it back until it is removed.
    pub fn insert(&self, page: &Page) -> Result<PageId, StoreError> {
        self.insert_with_outcome(page).map(|(id, _)| id)
    }

    /// Stores `page` and says which form it took.
    pub fn insert_with_outcome(&self, page: &Page) -> Result<(PageId, Outcome), StoreError> {
        self.insert_compressed_with(page, self.cfg.compression)
    }

    /// [`PageStore::insert_with_outcome`], compressing with `compression` if it compresses
    /// the page at all: a caller that knows how cold a page is picks the compressor (LZ4 for
    /// a page that may come back soon, zstd for a cold one). Either is read back alike.
    pub fn insert_compressed_with(
        &self,
        page: &Page,
        compression: Compression,
    ) -> Result<(PageId, Outcome), StoreError> {
        let (si, h32) = match self.existing(page)? {
            Ok(found) => return Ok(found),
            Err(parts) => parts,
        };
        let keys = self.sim.as_ref().map(|s| s.keys(page));
        let patch = self.try_patch(page, keys.as_ref(), None);
        COMPRESSED.with_borrow_mut(|cbuf| {
            let (form, payload, reference) = self.choose(page, patch.as_ref(), compression, cbuf);
            let done = self.commit(si, h32, page, form, payload, 0);
            if let (Some(r), Ok((_, Outcome::Shared)) | Err(_)) = (reference, &done) {
                self.unpin(r);
            }
            if let (Some(sim), Some(keys), Ok((id, o))) = (&self.sim, &keys, &done)
                && form.is_reference()
                && *o != Outcome::Shared
            {
                sim.insert(keys, id.loc());
            }
            done
        })
    }

    /// Stores `page` at the cost of a copy: zero and identical pages are found as by
    /// [`PageStore::insert`], but a new page is kept raw and queued, and patching and
    /// compression wait for [`PageStore::settle`]. For callers that must answer fast and
    /// have idle time later (a server taking a burst of puts). The id is final: settling
    /// changes how the page is held, never its id or its bytes.
    pub fn insert_deferred(&self, page: &Page) -> Result<(PageId, Outcome), StoreError> {
        let done = self.insert_raw(page)?;
        if done.1 == Outcome::Raw {
            self.pending.lock().push_back(done.0);
        }
        Ok(done)
    }

    /// [`PageStore::insert_deferred`] without the queue: the caller settles a page stored
    /// [`Outcome::Raw`] itself, with [`PageStore::reencode`] and [`Reencode::settle`], when
    /// it must know each page's new form (the pager keeps it per guest page). Until then
    /// the page is held raw and is no reference for patches.
    pub fn insert_raw(&self, page: &Page) -> Result<(PageId, Outcome), StoreError> {
        let (si, h32) = match self.existing(page)? {
            Ok(found) => return Ok(found),
            Err(parts) => parts,
        };
        // Indexed when settled, not now: settled in order, each page then looks for a
        // reference among the pages settled before it, as inserts in that order would.
        self.commit(si, h32, page, Form::Raw, page, UNINDEXED)
    }

    /// Encodes up to `max` pages that [`PageStore::insert_deferred`] kept raw, oldest first,
    /// as an insert would have (patch or compress with the store's compressor); pages
    /// removed meanwhile are skipped. Returns how many were taken off the queue.
    pub fn settle(&self, max: usize) -> Result<usize, StoreError> {
        let mut taken = 0;
        while taken < max {
            let id = {
                let mut q = self.pending.lock();
                let Some(id) = q.pop_front() else { break };
                // Counted before the queue's lock goes, so `pending` never reads 0 while a
                // page is still being encoded.
                self.settling.fetch_add(1, Ordering::SeqCst);
                id
            };
            taken += 1;
            let done = self.reencode(id, Reencode::settle(self.cfg.compression));
            self.settling.fetch_sub(1, Ordering::SeqCst);
            done?;
        }
        Ok(taken)
    }

    /// Pages inserted deferred and not settled yet: queued (some may have been removed
    /// since), or being encoded.
    pub fn pending(&self) -> usize {
        let queued = self.pending.lock().len();
        queued + usize::try_from(self.settling.load(Ordering::SeqCst)).unwrap_or(usize::MAX)
    }

    /// Holds a stored whole page anew, in place, as `how` says: as a patch against a similar
    /// page or compressed, whichever is smallest, if that is smaller than what holds it now.
    /// Its id and bytes stay. For pages that have gone cold (LZ4 at reclaim,
    /// zstd later) and for [`PageStore::settle`]. Returns the new outcome, or `None` when
    /// nothing smaller was found or the page is gone, is a patch, or changed meanwhile.
    pub fn reencode(&self, id: PageId, how: Reencode) -> Result<Option<Outcome>, StoreError> {
        let Reencode {
            compression,
            patch,
            references,
            min_bytes,
        } = how;
        if id == PageId::ZERO {
            return Ok(None);
        }
        let (si, slot) = split(id.loc());
        let mut page = [0u8; PAGE_SIZE];
        let (old_form, old_len, deps) = {
            let sh = self.waits.read(&self.shards[si]);
            let Some(e) = sh.entries.get(slot).filter(|e| e.holds(id)) else {
                return Ok(None);
            };
            if !e.form().is_reference()
                || (e.deps > 0 && !references)
                || usize::from(e.len) < min_bytes
            {
                return Ok(None);
            }
            sh.decode(e, self.cfg, &mut page)
                .map_err(|err| StoreError::CorruptCompressed(id, err))?;
            (e.form(), e.len, e.deps)
        };
        let keys = self.sim.as_ref().map(|s| s.keys(&page));
        // A page others patch against stays whole; none patches against itself.
        let patch = if patch && deps == 0 {
            self.try_patch(&page, keys.as_ref(), Some(id.loc()))
        } else {
            None
        };
        COMPRESSED.with_borrow_mut(|cbuf| {
            let (form, payload, reference) = self.choose(&page, patch.as_ref(), compression, cbuf);
            let smaller = payload.len() < usize::from(old_len);
            let mut sh = self.waits.write(&self.shards[si]);
            let e = &sh.entries[slot];
            let same = e.holds(id) && e.form() == old_form && e.len == old_len;
            // Read under the lock: another reencode of this id may have settled it meanwhile.
            let indexed = e.indexed();
            let changed = same
                && smaller
                && (form != Form::Patched || e.deps == 0)
                && sh.reform(slot, form, payload);
            let whole = if changed { form } else { old_form };
            // Settled whole: a reference for the pages settled after it.
            let index = same && !indexed && whole.is_reference();
            if index {
                sh.entries[slot].tag &= !UNINDEXED;
            }
            drop(sh);
            // The index is updated unlocked, as inserts and frees do: its growth copies the
            // whole table, which no shard lock should wait for.
            if let (Some(sim), Some(keys)) = (&self.sim, &keys) {
                if index {
                    sim.insert(keys, id.loc());
                } else if changed && indexed && form == Form::Patched {
                    sim.remove(keys, id.loc()); // a patch is no reference
                }
            }
            if !changed {
                if let Some(r) = reference {
                    self.unpin(r);
                }
                return Ok(None);
            }
            Ok(Some(match form {
                Form::Patched => Outcome::Patched {
                    bytes: payload.len() - REF_BYTES,
                },
                _ => Outcome::Compressed {
                    bytes: payload.len(),
                },
            }))
        })
    }

    /// Zero, or a stored duplicate given one more owner: the insert is done. Else the
    /// shard and hash the page goes to.
    #[allow(clippy::type_complexity)]
    fn existing(&self, page: &Page) -> Result<Result<(PageId, Outcome), (usize, u32)>, StoreError> {
        if is_zero(page) {
            self.zero.fetch_add(1, Ordering::Relaxed);
            return Ok(Ok((PageId::ZERO, Outcome::Zero)));
        }
        let (si, h32) = hash_parts(xxh3_64(page));
        if let Some(id) = self.find_duplicate(si, h32, page)? {
            let mut sh = self.waits.write(&self.shards[si]);
            let slot = split(id.loc()).1;
            let e = &sh.entries[slot];
            // It may have gone between the lookup and this lock: then store it anew.
            if e.form() != Form::Free && e.generation() == id.generation() {
                sh.add_owner(slot);
                return Ok(Ok((id, Outcome::Shared)));
            }
        }
        Ok(Err((si, h32)))
    }

    /// The smallest of the patch (if any), the page compressed into `cbuf`, and the raw page;
    /// a patch not chosen is unpinned. Returns the form, its payload and a chosen patch's
    /// (pinned) reference.
    fn choose<'a>(
        &self,
        page: &'a Page,
        patch: Option<&'a (Loc, Vec<u8>)>,
        compression: Compression,
        cbuf: &'a mut [u8; MAX_COMPRESSED],
    ) -> (Form, &'a [u8], Option<Loc>) {
        // A small patch is kept without trying the compressor: LZ4 rarely gets a page that
        // small, and skipping it halves the cost of a patched insert.
        let clen = match (patch, self.cfg.max_compressed) {
            (_, 0) => None,
            (Some((_, p)), _) if p.len() - REF_BYTES <= SURE_PATCH => None,
            (_, max) => compression.compress(page, cbuf).filter(|&n| n <= max),
        };
        match (patch, clen) {
            (Some((r, p)), Some(n)) if n <= p.len() - REF_BYTES => {
                self.unpin(*r);
                (Form::Compressed, &cbuf[..n], None)
            }
            (Some((r, p)), _) => (Form::Patched, p, Some(*r)),
            (None, Some(n)) => (Form::Compressed, &cbuf[..n], None),
            (None, None) => (Form::Raw, page, None),
        }
    }

    /// Moves each shard's payloads end to end, giving whole arena chunks back, where freed
    /// space not yet reused has grown past `min_unused` (a fraction) of the shard's arena
    /// and past two chunks. A shard is locked for the copy of its own payloads only.
    /// Returns the bytes given back. The allocator may keep them until `malloc_trim`.
    pub fn compact(&self, min_unused: f64) -> usize {
        let mut freed = 0;
        for s in self.shards.iter() {
            if !self.waits.read(s).wasteful(min_unused) {
                continue;
            }
            let mut sh = self.waits.write(s);
            if sh.wasteful(min_unused) {
                freed += sh.compact();
            }
        }
        freed
    }

    /// Whether [`PageStore::compact`] with `min_unused` would compact any shard now.
    pub fn wasteful(&self, min_unused: f64) -> bool {
        self.shards
            .iter()
            .any(|s| self.waits.read(s).wasteful(min_unused))
    }

    /// Stores the chosen form, unless an identical page was stored meanwhile.
    fn commit(
        &self,
        si: usize,
        h32: u32,
        page: &Page,
        form: Form,
        payload: &[u8],
        flags: u32,
    ) -> Result<(PageId, Outcome), StoreError> {
        let mut sh = self.waits.write(&self.shards[si]);
        // An identical page may have been stored while this one was being encoded.
        if let Some(slot) = find_whole(&sh, si, h32, page, self.cfg)? {
            sh.add_owner(slot);
            return Ok((
                PageId::new(si, slot, sh.entries[slot].generation()),
                Outcome::Shared,
            ));
        }
        let (slot, generation) = sh.alloc(form, h32, payload, flags)?;
        let outcome = match form {
            Form::Patched => Outcome::Patched {
                bytes: payload.len() - REF_BYTES,
            },
            Form::Compressed => Outcome::Compressed {
                bytes: payload.len(),
            },
            _ => Outcome::Raw,
        };
        Ok((PageId::new(si, slot, generation), outcome))
    }

    /// Finds a reference through the similarity index and encodes `page` against it. On
    /// success the reference is pinned (its deps count raised) and the payload returned.
    fn try_patch(
        &self,
        page: &Page,
        keys: Option<&Keys>,
        exclude: Option<Loc>,
    ) -> Option<(Loc, Vec<u8>)> {
        let (sim, keys, pc) = (self.sim.as_ref()?, keys?, self.cfg.patch?);
        let r = sim.lookup(keys).filter(|&r| Some(r) != exclude)?;
        let mut reference = [0u8; PAGE_SIZE];
        if !self.pin(r, &mut reference) {
            return None;
        }
        let mut delta = Vec::with_capacity(pc.max_patch + 64);
        if !pc.codec.encode(page, &reference, pc.max_patch, &mut delta) {
            self.unpin(r);
            return None;
        }
        let mut payload = Vec::with_capacity(REF_BYTES + delta.len());
        payload.extend_from_slice(&r.to_le_bytes());
        payload.extend_from_slice(&delta);
        Some((r, payload))
    }

    /// Reads a stored page back into `out`.
    pub fn read(&self, id: PageId, out: &mut Page) -> Result<(), StoreError> {
        if id == PageId::ZERO {
            out.fill(0);
            return Ok(());
        }
        let (si, slot) = split(id.loc());
        let sh = self.waits.read(&self.shards[si]);
        let e = sh
            .entries
            .get(slot)
            .filter(|e| e.holds(id))
            .ok_or(StoreError::UnknownPage(id))?;
        if e.form().is_reference() {
            return sh
                .decode(e, self.cfg, out)
                .map_err(|err| StoreError::CorruptCompressed(id, err));
        }
        // A patch: copy it out and let go of this shard before touching the reference's.
        let payload = sh.payload(e);
        let r = patch_ref(&payload);
        let delta = payload[REF_BYTES..].to_vec();
        drop(payload);
        drop(sh);
        let decoded = if self.codec.patches_in_place() {
            self.read_reference(r, out)
                .map(|()| self.codec.patch_in_place(&delta, out))
        } else {
            let mut reference = [0u8; PAGE_SIZE];
            self.read_reference(r, &mut reference)
                .map(|()| self.codec.decode(&delta, &reference, out))
        };
        // The reference was read unlocked from this page: it was pinned all along only if
        // this page still stands (a free and a reuse would have changed its generation). Else
        // the caller removed its own id during the read: refuse, never guess.
        if !self.waits.read(&self.shards[si]).entries[slot].holds(id) {
            return Err(StoreError::UnknownPage(id));
        }
        decoded?.map_err(|err| StoreError::CorruptPatch(id, err))
    }

    /// Gives back one reference to a page; the page is freed when no owner and no patch
    /// needs it.
    pub fn remove(&self, id: PageId) -> Result<(), StoreError> {
        if id == PageId::ZERO {
            return self
                .zero
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |z| z.checked_sub(1))
                .map(drop)
                .map_err(|_| StoreError::UnknownPage(id));
        }
        let (si, slot) = split(id.loc());
        let mut sh = self.waits.write(&self.shards[si]);
        if !sh.entries.get(slot).is_some_and(|e| e.holds(id)) {
            return Err(StoreError::UnknownPage(id));
        }
        let freed = sh.release_owner(si, slot, self.sim.is_some());
        drop(sh);
        if let Some(f) = freed {
            self.after_free(&f);
        }
        Ok(())
    }

    /// What an insert of `page` would find, without storing anything: the hash, the lookups
    /// and the byte compare, but no encoding.
    pub fn classify(&self, page: &Page) -> Result<Class, StoreError> {
        if is_zero(page) {
            return Ok(Class::Zero);
        }
        let (si, h32) = hash_parts(xxh3_64(page));
        if let Some(id) = self.find_duplicate(si, h32, page)? {
            return Ok(Class::Duplicate(id));
        }
        let similar = self.sim.as_ref().and_then(|s| s.lookup(&s.keys(page)));
        Ok(if similar.is_some() {
            Class::Similar
        } else {
            Class::Unique
        })
    }

    /// Reads into `out` the reference page that the similarity index proposes for `page`, if
    /// any: what an insert would try to patch against. For benchmarks of delta codecs.
    pub fn similar_reference(&self, page: &Page, out: &mut Page) -> bool {
        let Some(sim) = &self.sim else { return false };
        sim.lookup(&sim.keys(page))
            .is_some_and(|r| self.read_reference(r, out).is_ok())
    }

    /// Counters of everything held. Cheap: sums per-shard counters under each shard's read lock.
    pub fn stats(&self) -> Stats {
        let mut t = Totals::default();
        for s in self.shards.iter() {
            let g = self.waits.read(s);
            t.add_shard(&g, &g.counts);
        }
        self.stats_from(&t)
    }

    /// Walks every entry, checks the store's invariants, and returns stats recounted from
    /// scratch. For tests and `fsck`-like checks: it holds every shard's read lock at once.
    pub fn audit(&self) -> Result<Stats, String> {
        let guards: Vec<_> = self.shards.iter().map(|s| self.waits.read(s)).collect();
        let mut t = Totals::default();
        let mut deps = std::collections::HashMap::<Loc, u32>::new();
        for (si, sh) in guards.iter().enumerate() {
            let mut own = [Counters::default(); 3];
            let mut rounded = 0;
            for (slot, e) in sh.entries.iter().enumerate() {
                let form = e.form();
                if form == Form::Free {
                    continue;
                }
                let k = &mut own[form.ix()];
                k.stored += 1;
                k.live += u64::from(e.owners > 0);
                k.owners += u64::from(e.owners);
                k.payload += u64::from(e.len);
                rounded += arena::rounded(usize::from(e.len));
                let at = format!("shard {si} slot {slot}");
                if e.owners == 0 && e.deps == 0 {
                    return Err(format!("{at}: held by nothing but not freed"));
                }
                // (An unsettled page may still be pinned as a reference, through a stale
                // similarity entry left at its slot by an earlier tenant: that is safe.)
                if !e.indexed() && form != Form::Raw {
                    return Err(format!("{at}: unsettled but not raw"));
                }
                if sh
                    .dedup
                    .find(table_hash(e.hash), |&s| s as usize == slot)
                    .is_none()
                {
                    return Err(format!("{at}: missing from the sharing table"));
                }
                if form == Form::Patched {
                    *deps.entry(patch_ref(&sh.payload(e))).or_default() += 1;
                }
            }
            let stored: u64 = own.iter().map(|k| k.stored).sum();
            if sh.dedup.len() as u64 != stored {
                return Err(format!(
                    "shard {si}: sharing table has {} slots, {stored} stored",
                    sh.dedup.len()
                ));
            }
            if sh.counts != own {
                return Err(format!("shard {si}: counters disagree with its entries"));
            }
            if rounded + sh.arena.unused_bytes() != sh.arena.capacity() {
                return Err(format!("shard {si}: arena bytes do not add up"));
            }
            t.add_shard(sh, &own);
        }
        for (si, sh) in guards.iter().enumerate() {
            for (slot, e) in sh.entries.iter().enumerate() {
                let want = deps.get(&loc(si, slot)).copied().unwrap_or(0);
                if e.form() != Form::Free && u32::from(e.deps) != want {
                    return Err(format!(
                        "shard {si} slot {slot}: {} deps recorded, {want} patches use it",
                        e.deps
                    ));
                }
                if want > 0 && !e.form().is_reference() {
                    return Err(format!(
                        "shard {si} slot {slot}: patches point at a non-reference"
                    ));
                }
            }
        }
        Ok(self.stats_from(&t))
    }

    fn fixed_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.shards.len() * std::mem::size_of::<RwLock<Shard>>()
            + self.sim.as_ref().map_or(0, SimilarityIndex::bytes)
            + self.pending.lock().capacity() * std::mem::size_of::<PageId>()
    }

    fn stats_from(&self, t: &Totals) -> Stats {
        let f = |k: &Counters| FormStats {
            stored: k.stored,
            live: k.live,
            payload_bytes: k.payload,
            metadata_bytes: k.stored * std::mem::size_of::<Entry>() as u64,
        };
        let c = &t.counts;
        let mut patched = f(&c[Form::Patched.ix()]);
        let refs = patched.stored * REF_BYTES as u64;
        patched.payload_bytes -= refs;
        patched.metadata_bytes += refs;
        let sum = |g: fn(&Counters) -> u64| c.iter().map(g).sum::<u64>();
        let (owners, live, stored) = (sum(|k| k.owners), sum(|k| k.live), sum(|k| k.stored));
        Stats {
            zero_pages: self.zero.load(Ordering::Relaxed),
            shared_pages: owners - live,
            patched,
            compressed: f(&c[Form::Compressed.ix()]),
            raw: f(&c[Form::Raw.ix()]),
            reference_only_pages: stored - live,
            metadata_bytes: (self.fixed_bytes() + t.bookkeeping) as u64 + refs,
            slack_bytes: t.arena as u64 - sum(|k| k.payload),
            pending_pages: self.pending() as u64,
        }
    }

    /// A duplicate of `page` among the stored pages with hash `h32`, compared byte for byte.
    fn find_duplicate(
        &self,
        si: usize,
        h32: u32,
        page: &Page,
    ) -> Result<Option<PageId>, StoreError> {
        let patched: Vec<PageId> = {
            let sh = self.waits.read(&self.shards[si]);
            if let Some(slot) = find_whole(&sh, si, h32, page, self.cfg)? {
                return Ok(Some(PageId::new(si, slot, sh.entries[slot].generation())));
            }
            sh.dedup
                .iter_hash(table_hash(h32))
                .map(|&slot| (slot as usize, &sh.entries[slot as usize]))
                .filter(|(_, e)| e.hash == h32 && e.form() == Form::Patched)
                .map(|(slot, e)| PageId::new(si, slot, e.generation()))
                .collect()
        };
        // Patched candidates need their reference, which may live in another shard: read them
        // as any owner would, after letting go of this shard.
        let mut candidate = [0u8; PAGE_SIZE];
        for id in patched {
            if self.read(id, &mut candidate).is_ok() && candidate == *page {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// Reads a whole (raw or compressed) page by location.
    fn read_reference(&self, r: Loc, out: &mut Page) -> Result<(), StoreError> {
        let (si, slot) = split(r);
        let sh = self.waits.read(&self.shards[si]);
        let e = sh.entries.get(slot).filter(|e| e.form().is_reference());
        let e = e.ok_or(StoreError::UnknownPage(PageId::new(si, slot, 0)))?;
        sh.decode(e, self.cfg, out).map_err(|err| {
            StoreError::CorruptCompressed(PageId::new(si, slot, e.generation()), err)
        })
    }

    /// Raises the deps count of a reference, then reads it (under a read lock only: the
    /// count keeps it alive); false if it is gone or unusable.
    fn pin(&self, r: Loc, out: &mut Page) -> bool {
        let (si, slot) = split(r);
        {
            let mut sh = self.waits.write(&self.shards[si]);
            match sh.entries.get_mut(slot) {
                Some(e) if e.form().is_reference() && e.deps < u16::MAX => e.deps += 1,
                _ => return false,
            }
        }
        if self.read_reference(r, out).is_err() {
            self.unpin(r);
            return false;
        }
        true
    }

    fn unpin(&self, r: Loc) {
        let (si, slot) = split(r);
        let mut sh = self.waits.write(&self.shards[si]);
        let e = &mut sh.entries[slot];
        e.deps -= 1;
        let freed = (e.deps == 0 && e.owners == 0).then(|| sh.free(si, slot, self.sim.is_some()));
        drop(sh);
        if let Some(f) = freed {
            self.after_free(&f);
        }
    }

    /// Settles what a freed page leaves behind: its reference's deps, or its similarity keys.
    fn after_free(&self, f: &Freed) {
        match f {
            Freed::Patch(r) => self.unpin(*r),
            Freed::Whole { loc, form, payload } => {
                let Some(sim) = &self.sim else { return };
                let mut page = [0u8; PAGE_SIZE];
                let ok = match form {
                    Form::Raw => {
                        page.copy_from_slice(payload);
                        true
                    }
                    _ => self.cfg.compression.decompress(payload, &mut page).is_ok(),
                };
                if ok {
                    sim.remove(&sim.keys(&page), *loc);
                }
            }
            Freed::Done => {}
        }
    }
}

/// A raw or compressed page in `sh` equal to `page`.
fn find_whole(
    sh: &Shard,
    si: usize,
    h32: u32,
    page: &Page,
    cfg: Config,
) -> Result<Option<usize>, StoreError> {
    for &slot in sh.dedup.iter_hash(table_hash(h32)) {
        let e = &sh.entries[slot as usize];
        if e.hash != h32 {
            continue;
        }
        let equal = match e.form() {
            Form::Raw => *sh.payload(e) == page[..],
            Form::Compressed => {
                let mut buf = [0u8; PAGE_SIZE];
                cfg.compression
                    .decompress(&sh.payload(e), &mut buf)
                    .map_err(|err| {
                        StoreError::CorruptCompressed(
                            PageId::new(si, slot as usize, e.generation()),
                            err,
                        )
                    })?;
                buf == *page
            }
            _ => false,
        };
        if equal {
            return Ok(Some(slot as usize));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_20_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 20);
    }

    #[test]
    fn ids_round_trip_their_parts() {
        let id = PageId::new(SHARDS - 1, MAX_SLOTS - 1, GEN_MASK);
        assert_eq!(split(id.loc()), (SHARDS - 1, MAX_SLOTS - 1));
        assert_eq!(id.generation(), GEN_MASK);
        assert_ne!(id, PageId::ZERO);
    }
}
