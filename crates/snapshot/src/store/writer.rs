//! Writing a snapshot: pages in from any number of threads, each classified and stored once,
//! then one durable, atomic publication.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use pagestore::{
    DeltaCodec, Keys, MAX_COMPRESSED, MAX_LOC, PAGE_SIZE, Page, SimilarityIndex, is_zero,
};
use parking_lot::Mutex;

use super::error::StoreError;
use super::format::{
    BASE_ID, Form, Id, IndexEntry, MAX_PATCH, MAX_RECORD, RECORD_HEADER, codec_byte, decode_whole,
    encode_record, similarity, stored_keys,
};
use super::fsutil::{Lock, LockMode, now, sync_dir};
use super::index::{GlobalIndex, NONE};
use super::manifest::{self, Kind, ObjEntry, Parts};
use super::pack::{PackBuilder, read_record};
use super::{Shared, SnapshotInfo, valid_name};

/// Page-table states: never put, put as zero, or object `n` as `n + FIRST_OBJECT`.
const UNSET: u32 = 0;
const ZERO: u32 = 1;
const FIRST_OBJECT: u32 = 2;

/// A patch this small is kept without trying the compressor (which almost never gets a page
/// that small), as the page store does.
const SMALL_PATCH: usize = 256;
/// The most pages a snapshot may have (4 TiB of RAM): object numbers (at most two per page,
/// a page and a patch's base) then fit the page table's and the similarity index's 31 bits.
const MAX_PAGES: u64 = 1 << 30;
/// A patch this small ends the search for a better base.
const TINY_PATCH: usize = 64;
/// A compressed page is kept only if it saves at least 1/16 of a page; else raw, which reads
/// back without a decoder.
const MAX_COMPRESSED_KEPT: usize = PAGE_SIZE - PAGE_SIZE / 16;

/// The delta codec: xor-rle, measured best in docs/pagestore.md, and it patches in place.
const CODEC: DeltaCodec = DeltaCodec::XorRle;

#[derive(Debug, Clone, Copy)]
enum PackRef {
    /// One of this writer's packs.
    Own(u32),
    /// A finished pack of the store.
    Global(u32),
}

#[derive(Debug, Clone, Copy)]
struct Obj {
    pack: PackRef,
    offset: u32,
    len: u32,
    form: Form,
    /// A delta's base: object number + 1; else 0.
    base: u32,
}

#[derive(Debug, Default)]
struct Tables {
    /// Every object the snapshot refers to: its own and the store's.
    objects: Vec<Obj>,
    /// Content id -> object, for every page put so far.
    by_id: HashMap<Id, u32>,
    /// The store's objects already in `objects`.
    from_global: HashMap<u32, u32>,
    /// This writer's packs; the last takes new records.
    own: Vec<PackBuilder>,
    /// Record bytes in them.
    own_bytes: u64,
}

/// How a new page will be stored.
struct Encoded {
    form: Form,
    record: Vec<u8>,
    /// A delta's base.
    base: Option<PackRefObj>,
}

#[derive(Debug, Clone, Copy)]
enum PackRefObj {
    Own(u32),
    Global(u32),
}

/// A snapshot being written. `put_page` may be called from several threads at once (a live
/// snapshot copies pages from a fault handler and a background copier); [`SnapshotWriter::finish`]
/// makes the snapshot durable and visible at once. Dropped unfinished, it leaves no visible
/// snapshot, and what it had written is removed (or left for the next gc after a crash).
#[derive(Debug)]
pub struct SnapshotWriter {
    shared: Arc<Shared>,
    global: Arc<GlobalIndex>,
    name: String,
    ram_size: u64,
    pages: Box<[AtomicU32]>,
    state: Mutex<Vec<u8>>,
    order: Mutex<Vec<u32>>,
    tables: Mutex<Tables>,
    /// This snapshot's own whole pages, by object number, as patch bases.
    sim: SimilarityIndex,
    /// The first write that failed; the snapshot can then not be finished.
    failed: Mutex<Option<String>>,
    finished: bool,
    _lock: Lock,
}

impl SnapshotWriter {
    pub(crate) fn new(shared: Arc<Shared>, name: &str, ram_size: u64) -> Result<Self, StoreError> {
        valid_name(name)?;
        let pages = ram_size / PAGE_SIZE as u64;
        if ram_size == 0 || !ram_size.is_multiple_of(PAGE_SIZE as u64) || pages > MAX_PAGES {
            return Err(StoreError::BadRamSize(ram_size));
        }
        let lock = shared.lock(LockMode::Shared)?;
        {
            let mut writing = shared.writing.lock();
            if writing.contains(name) || shared.manifest_path(name).exists() {
                return Err(StoreError::NameTaken {
                    name: name.to_string(),
                    dir: shared.dir.clone(),
                });
            }
            writing.insert(name.to_string());
        }
        let global = match shared.index() {
            Ok(g) => g,
            Err(e) => {
                shared.writing.lock().remove(name);
                return Err(e);
            }
        };
        Ok(SnapshotWriter {
            global,
            name: name.to_string(),
            ram_size,
            pages: (0..pages).map(|_| AtomicU32::new(UNSET)).collect(),
            state: Mutex::new(Vec::new()),
            order: Mutex::new(Vec::new()),
            tables: Mutex::new(Tables::default()),
            sim: SimilarityIndex::new(&similarity()),
            failed: Mutex::new(None),
            finished: false,
            _lock: lock,
            shared,
        })
    }

    /// The snapshot's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Guest RAM bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    fn slot(&self, index: u64) -> Result<&AtomicU32, StoreError> {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.pages.get(i))
            .ok_or(StoreError::PageOutOfRange {
                index,
                pages: self.pages.len() as u64,
            })
    }

    fn check_failed(&self) -> Result<(), StoreError> {
        match &*self.failed.lock() {
            Some(what) => Err(StoreError::WriterFailed {
                name: self.name.clone(),
                what: what.clone(),
            }),
            None => Ok(()),
        }
    }

    fn fail(&self, e: StoreError) -> StoreError {
        let mut f = self.failed.lock();
        if f.is_none() {
            *f = Some(e.to_string());
        }
        e
    }

    fn claim(&self, slot: &AtomicU32, index: u64, v: u32) -> Result<(), StoreError> {
        slot.compare_exchange(UNSET, v, Ordering::AcqRel, Ordering::Relaxed)
            .map(|_| ())
            .map_err(|_| StoreError::PageTwice {
                name: self.name.clone(),
                index,
            })
    }

    /// Puts guest page `index`. Each index at most once, in any order, from any thread. A
    /// zero page costs a word-wise test; a page the store or this snapshot already holds costs
    /// a BLAKE3 hash and a lookup; a new page is patched against a similar one, compressed or
    /// stored raw, whichever is smallest.
    pub fn put_page(&self, index: u64, page: &[u8; PAGE_SIZE]) -> Result<(), StoreError> {
        self.check_failed()?;
        let slot = self.slot(index)?;
        if slot.load(Ordering::Relaxed) != UNSET {
            return Err(StoreError::PageTwice {
                name: self.name.clone(),
                index,
            });
        }
        if is_zero(page) {
            return self.claim(slot, index, ZERO);
        }
        // Content ids are BLAKE3-256, a cryptographic hash: guests are hostile and share the
        // store, and a 64- or 128-bit non-cryptographic hash (XXH3, say) can be made to
        // collide on purpose, which would let one guest's page be restored as another's.
        let id: Id = *blake3::hash(page).as_bytes();
        if let Some(n) = self.known(&id) {
            return self.claim(slot, index, n + FIRST_OBJECT);
        }
        let keys = self.sim.keys(page);
        let enc = self.encode(page, &id, &keys);
        let (n, file, offset, path) = {
            let mut t = self.tables.lock();
            // An identical page may have been stored by another thread meanwhile.
            if let Some(&n) = t.by_id.get(&id) {
                drop(t);
                return self.claim(slot, index, n + FIRST_OBJECT);
            }
            let base = match enc.base {
                Some(PackRefObj::Own(b)) => b + 1,
                Some(PackRefObj::Global(g)) => self.adopt(&mut t, g) + 1,
                None => 0,
            };
            let len = u32::try_from(enc.record.len()).unwrap_or(u32::MAX);
            let need_pack = t
                .own
                .last()
                .is_none_or(|p| p.next + u64::from(len) > self.shared.opts.pack_limit);
            if need_pack {
                let p = PackBuilder::create(&self.shared.tmp).map_err(|e| self.fail(e))?;
                t.own.push(p);
            }
            let pi = t.own.len() - 1;
            let p = &mut t.own[pi];
            let offset = p.reserve(IndexEntry {
                id,
                base: if enc.form == Form::Delta {
                    enc.record[RECORD_HEADER..RECORD_HEADER + BASE_ID]
                        .try_into()
                        .unwrap_or([0; 32])
                } else {
                    [0; 32]
                },
                offset: 0,
                len,
                form: enc.form,
                codec: enc.record[9],
                keys: if enc.form == Form::Delta {
                    [None; 2]
                } else {
                    stored_keys(&keys)
                },
            });
            let (file, path) = (p.file.clone(), p.tmp.clone());
            let n = u32::try_from(t.objects.len()).unwrap_or(u32::MAX);
            t.objects.push(Obj {
                pack: PackRef::Own(u32::try_from(pi).unwrap_or(u32::MAX)),
                // pack_limit keeps offsets below 4 GiB.
                offset: u32::try_from(offset).unwrap_or(u32::MAX),
                len,
                form: enc.form,
                base,
            });
            t.by_id.insert(id, n);
            t.own_bytes += u64::from(len);
            (n, file, offset, path)
        };
        if let Err(e) = file.write_all_at(&enc.record, offset) {
            return Err(self.fail(StoreError::io("write", path, e)));
        }
        // Only now, with its bytes in the file, may other pages patch against it.
        if enc.form != Form::Delta && n <= MAX_LOC {
            self.sim.insert(&keys, n);
        }
        self.claim(slot, index, n + FIRST_OBJECT)
    }

    /// Marks page `index` zero. Optional: pages never put are zero.
    pub fn put_zero(&self, index: u64) -> Result<(), StoreError> {
        let slot = self.slot(index)?;
        self.claim(slot, index, ZERO)
    }

    /// Sets the opaque VM-state blob (vCPU and device state) kept with the snapshot.
    pub fn set_state(&self, state: Vec<u8>) {
        *self.state.lock() = state;
    }

    /// Sets the first-touch order: page indexes in the order the guest first touched them,
    /// for restore to prefetch. Checked against the RAM size by [`SnapshotWriter::finish`].
    pub fn set_order(&self, order: Vec<u32>) {
        *self.order.lock() = order;
    }

    /// The object for a page already held by this snapshot or by the store, if any.
    fn known(&self, id: &Id) -> Option<u32> {
        if let Some(&n) = self.tables.lock().by_id.get(id) {
            return Some(n);
        }
        let g = self.global.lookup(id)?;
        let mut t = self.tables.lock();
        let n = self.adopt(&mut t, g);
        t.by_id.insert(*id, n);
        Some(n)
    }

    /// Makes the store's object `g` (and a delta's base) one of this snapshot's objects.
    fn adopt(&self, t: &mut Tables, g: u32) -> u32 {
        if let Some(&n) = t.from_global.get(&g) {
            return n;
        }
        let o = self.global.obj(g);
        // Bases are never deltas (the index checks), so this recursion is one level deep.
        let base = if o.base == NONE {
            0
        } else {
            self.adopt(t, o.base) + 1
        };
        let n = u32::try_from(t.objects.len()).unwrap_or(u32::MAX);
        t.objects.push(Obj {
            pack: PackRef::Global(o.pack),
            offset: o.offset,
            len: o.len,
            form: o.form,
            base,
        });
        t.from_global.insert(g, n);
        n
    }

    /// Reads a whole page that serves as a patch base: its id and bytes. `None` if it cannot
    /// be read (a base is only a hint; the page is then stored otherwise).
    fn read_base(&self, base: PackRefObj, out: &mut Page) -> Option<Id> {
        let (file, path, offset, len): (Arc<File>, PathBuf, u64, u32) = match base {
            PackRefObj::Own(n) => {
                let t = self.tables.lock();
                let o = *t.objects.get(n as usize)?;
                let PackRef::Own(p) = o.pack else { return None };
                let p = t.own.get(p as usize)?;
                (p.file.clone(), p.tmp.clone(), u64::from(o.offset), o.len)
            }
            PackRefObj::Global(g) => {
                let o = self.global.obj(g);
                let (_, file, path) = self.global.pack(o.pack);
                (file, path, u64::from(o.offset), o.len)
            }
        };
        let mut buf = [0u8; MAX_RECORD];
        let rec = read_record(&file, &path, offset, len, &mut buf).ok()?;
        decode_whole(&rec, out).ok()?;
        Some(rec.id)
    }

    /// Chooses the form of a new page: the smallest of a patch against a similar whole page
    /// (this snapshot's candidate and the store's, the smaller patch), the compressor's
    /// output, and raw.
    fn encode(&self, page: &Page, id: &Id, keys: &Keys) -> Encoded {
        let mut patch: Option<(PackRefObj, Id, Vec<u8>)> = None;
        let candidates = [
            self.sim.lookup(keys).map(PackRefObj::Own),
            self.global.similar(keys).map(PackRefObj::Global),
        ];
        let mut base_page = [0u8; PAGE_SIZE];
        for c in candidates.into_iter().flatten() {
            // A patch this small will not be beaten by enough to pay for another base read.
            if patch
                .as_ref()
                .is_some_and(|(_, _, d)| d.len() <= TINY_PATCH)
            {
                break;
            }
            let Some(base_id) = self.read_base(c, &mut base_page) else {
                continue;
            };
            let limit = patch
                .as_ref()
                .map_or(MAX_PATCH, |(_, _, d)| d.len().saturating_sub(1));
            let mut d = Vec::with_capacity(MAX_PATCH + 64);
            if CODEC.encode(page, &base_page, limit, &mut d) {
                patch = Some((c, base_id, d));
            }
        }
        let mut record = Vec::with_capacity(RECORD_HEADER + PAGE_SIZE);
        let patch_len = patch
            .as_ref()
            .map_or(usize::MAX, |(_, _, d)| BASE_ID + d.len());
        if let Some((c, base_id, d)) = &patch
            && d.len() <= SMALL_PATCH
        {
            encode_record(
                Form::Delta,
                codec_byte(CODEC),
                id,
                &[base_id, d],
                &mut record,
            );
            return Encoded {
                form: Form::Delta,
                record,
                base: Some(*c),
            };
        }
        let mut buf = [0u8; MAX_COMPRESSED];
        let compressed = self
            .shared
            .opts
            .compression
            .compress(page, &mut buf)
            .filter(|&n| n <= MAX_COMPRESSED_KEPT);
        let c_len = compressed.unwrap_or(usize::MAX);
        if let Some((c, base_id, d)) = patch
            && patch_len < c_len
            && patch_len < PAGE_SIZE
        {
            encode_record(
                Form::Delta,
                codec_byte(CODEC),
                id,
                &[&base_id, &d],
                &mut record,
            );
            return Encoded {
                form: Form::Delta,
                record,
                base: Some(c),
            };
        }
        let (form, payload): (Form, &[u8]) = match compressed {
            Some(n) => (Form::Compressed, &buf[..n]),
            None => (Form::Raw, &page[..]),
        };
        encode_record(form, 0, id, &[payload], &mut record);
        Encoded {
            form,
            record,
            base: None,
        }
    }

    /// Makes the snapshot durable, then visible under its name, atomically: its packs are
    /// finished, fsynced and linked into `packs/`, the directory fsynced, then its manifest is
    /// written, fsynced and linked into `manifests/` (which fails if the name was taken
    /// meanwhile), and that directory fsynced. A crash before the last link leaves no
    /// snapshot, only files the next gc removes.
    pub fn finish(mut self) -> Result<SnapshotInfo, StoreError> {
        self.check_failed()?;
        let pages = self.pages.len() as u64;
        let order = std::mem::take(&mut *self.order.lock());
        if let Some(&bad) = order.iter().find(|&&p| u64::from(p) >= pages) {
            return Err(StoreError::BadOrder {
                name: self.name.clone(),
                index: bad,
                pages,
            });
        }
        let state = std::mem::take(&mut *self.state.lock());
        let mut t = std::mem::take(&mut *self.tables.lock());

        // 1. The packs, durable and in place.
        let mut finished = Vec::new();
        for p in t.own.drain(..) {
            finished.push(p.finish(&self.shared.packs, ["pack-written", "pack-linked"])?);
        }
        if !finished.is_empty() {
            sync_dir(&self.shared.packs)?;
        }

        // 2. The manifest: pack table, objects, pages.
        let mut pack_ids: Vec<u64> = Vec::new();
        let mut table: HashMap<u64, u16> = HashMap::new();
        let mut objects = Vec::with_capacity(t.objects.len() * manifest::OBJECT_ENTRY);
        let mut stored = 0u64;
        for o in &t.objects {
            let id = match o.pack {
                PackRef::Own(i) => finished[i as usize].id,
                PackRef::Global(g) => self.global.pack(g).0,
            };
            let pack = match table.get(&id) {
                Some(&p) => p,
                None => {
                    let p = u16::try_from(pack_ids.len()).map_err(|_| StoreError::TooLarge {
                        name: self.name.clone(),
                        what: "it refers to more than 65,536 packs",
                    })?;
                    pack_ids.push(id);
                    table.insert(id, p);
                    p
                }
            };
            stored += u64::from(o.len);
            ObjEntry {
                offset: o.offset,
                pack,
                form: o.form,
                len: o.len,
                base: o.base,
            }
            .encode(&mut objects);
        }
        let mut page_table = Vec::with_capacity(self.pages.len() * 4);
        let mut nonzero = 0u64;
        for s in &self.pages {
            let v = s.load(Ordering::Acquire);
            let e = if v >= FIRST_OBJECT {
                nonzero += 1;
                v - FIRST_OBJECT + 1
            } else {
                0
            };
            page_table.extend_from_slice(&e.to_le_bytes());
        }
        let order_bytes: Vec<u8> = order.iter().flat_map(|v| v.to_le_bytes()).collect();
        let created = now();
        let bytes = manifest::encode(&Parts {
            kind: Kind::Snapshot,
            created,
            ram_size: self.ram_size,
            nonzero,
            packs: &pack_ids,
            objects: &objects,
            pages: &page_table,
            order: &order_bytes,
            state: &state,
            base: "",
        })
        .map_err(|what| StoreError::TooLarge {
            name: self.name.clone(),
            what: if what.starts_with("objects") {
                "more than 2^32 objects"
            } else {
                "a section larger than 2^32 entries"
            },
        })?;

        // 3. Visible: link the durable manifest into place.
        let tmp = self.shared.write_tmp_manifest(&self.name, &bytes)?;
        self.shared.publish_manifest(&tmp, &self.name)?;
        self.finished = true;

        // The store's index learns the new packs, for the next writers of this process.
        self.global.add(
            finished
                .into_iter()
                .map(|f| {
                    let path = self.shared.pack_path(f.id);
                    (f.id, f.file, path, f.entries, true)
                })
                .collect(),
        );
        Ok(SnapshotInfo {
            name: self.name.clone(),
            created,
            ram_bytes: self.ram_size,
            pages_nonzero: nonzero,
            logical_bytes: nonzero * PAGE_SIZE as u64,
            stored_bytes: stored,
            unique_bytes: t.own_bytes,
            base: None,
        })
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Best effort: whatever is left, the next gc removes.
            for p in self.tables.lock().own.drain(..) {
                let _ = std::fs::remove_file(&p.tmp);
            }
        }
        self.shared.writing.lock().remove(&self.name);
    }
}
