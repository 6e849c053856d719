//! The writers' view of what the store already holds: every object of every finished pack by
//! content id, and the whole pages among them in a similarity index, for dedup and for patch
//! bases. Built from the packs' own indexes (not from the pages), kept by the `Store` and
//! refreshed when a writer starts; readers never need it.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pagestore::{Keys, MAX_LOC, SimilarityIndex};
use parking_lot::RwLock;

use super::error::StoreError;
use super::format::{Form, Id, IndexEntry, similarity};
use super::pack::{list_packs, pack_path, read_index};

/// No object.
pub(crate) const NONE: u32 = u32::MAX;

/// An object of a finished pack.
#[derive(Debug, Clone, Copy)]
pub(crate) struct GObj {
    /// Index in the pack list.
    pub(crate) pack: u32,
    pub(crate) offset: u32,
    pub(crate) len: u32,
    pub(crate) form: Form,
    /// A delta's base (an object of this index, never a delta); else [`NONE`].
    pub(crate) base: u32,
}

/// A finished pack, held open.
#[derive(Debug)]
pub(crate) struct GPack {
    pub(crate) id: u64,
    pub(crate) file: Arc<File>,
    pub(crate) path: PathBuf,
}

/// A pack to add: its id, open file, path, index entries and whether its similarity keys were
/// made with this store's similarity shape.
pub(crate) type NewPack = (u64, Arc<File>, PathBuf, Vec<IndexEntry>, bool);

#[derive(Debug, Default)]
struct Data {
    packs: Vec<GPack>,
    pack_ix: HashMap<u64, u32>,
    objs: Vec<GObj>,
    by_id: HashMap<Id, u32>,
}

/// See the module documentation. Only ever grows: a gc, which removes packs, makes the store
/// drop its index and build a new one, so indexes handed to live writers stay valid.
#[derive(Debug)]
pub(crate) struct GlobalIndex {
    data: RwLock<Data>,
    sim: SimilarityIndex,
}

impl GlobalIndex {
    pub(crate) fn new() -> GlobalIndex {
        GlobalIndex {
            data: RwLock::new(Data::default()),
            sim: SimilarityIndex::new(&similarity()),
        }
    }

    /// Loads every pack of `packs_dir` not yet in the index. Returns false if a pack the
    /// index holds has gone (a gc ran elsewhere): the caller then builds a new index.
    pub(crate) fn refresh(&self, packs_dir: &Path) -> Result<bool, StoreError> {
        let on_disk = list_packs(packs_dir)?;
        {
            let d = self.data.read();
            let present: std::collections::HashSet<u64> = on_disk.iter().copied().collect();
            if d.packs.iter().any(|p| !present.contains(&p.id)) {
                return Ok(false);
            }
        }
        let mut new = Vec::new();
        for id in on_disk {
            if self.data.read().pack_ix.contains_key(&id) {
                continue;
            }
            let path = pack_path(packs_dir, id);
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(StoreError::io("open", &path, e)),
            };
            // A damaged pack is left out: no new snapshot will point into it (fsck names it).
            if let Ok(ix) = read_index(&file, &path, id) {
                new.push((
                    id,
                    Arc::new(file),
                    path,
                    ix.entries,
                    ix.header.same_similarity,
                ));
            }
        }
        self.add(new);
        Ok(true)
    }

    /// Adds finished packs. Whole pages first, then deltas, so that a delta finds its base in
    /// any of them; a delta whose base is nowhere is left out.
    pub(crate) fn add(&self, packs: Vec<NewPack>) {
        let mut d = self.data.write();
        let mut deltas = Vec::new();
        for (id, file, path, entries, same_sim) in packs {
            if d.pack_ix.contains_key(&id) {
                continue;
            }
            let Ok(pix) = u32::try_from(d.packs.len()) else {
                return;
            };
            d.packs.push(GPack { id, file, path });
            d.pack_ix.insert(id, pix);
            for e in entries {
                // Manifests hold 32-bit offsets; packs never grow past them.
                let Ok(offset) = u32::try_from(e.offset) else {
                    continue;
                };
                if e.form == Form::Delta {
                    deltas.push((pix, offset, e));
                    continue;
                }
                if d.by_id.contains_key(&e.id) {
                    continue;
                }
                let Ok(n) = u32::try_from(d.objs.len()) else {
                    return;
                };
                d.objs.push(GObj {
                    pack: pix,
                    offset,
                    len: e.len,
                    form: e.form,
                    base: NONE,
                });
                d.by_id.insert(e.id, n);
                if same_sim && n <= MAX_LOC {
                    self.sim.insert(&e.sim_keys(), n);
                }
            }
        }
        for (pix, offset, e) in deltas {
            if d.by_id.contains_key(&e.id) {
                continue;
            }
            let Some(&base) = d.by_id.get(&e.base) else {
                continue;
            };
            if d.objs[base as usize].form == Form::Delta {
                continue;
            }
            let Ok(n) = u32::try_from(d.objs.len()) else {
                return;
            };
            d.objs.push(GObj {
                pack: pix,
                offset,
                len: e.len,
                form: Form::Delta,
                base,
            });
            d.by_id.insert(e.id, n);
        }
    }

    /// The object holding the page with this id.
    pub(crate) fn lookup(&self, id: &Id) -> Option<u32> {
        self.data.read().by_id.get(id).copied()
    }

    pub(crate) fn obj(&self, n: u32) -> GObj {
        self.data.read().objs[n as usize]
    }

    /// A pack's id and open file.
    pub(crate) fn pack(&self, p: u32) -> (u64, Arc<File>, PathBuf) {
        let d = self.data.read();
        let g = &d.packs[p as usize];
        (g.id, g.file.clone(), g.path.clone())
    }

    /// A whole page that the similarity index says is probably like a page with `keys`.
    pub(crate) fn similar(&self, keys: &Keys) -> Option<u32> {
        let n = self.sim.lookup(keys)?;
        let d = self.data.read();
        // The tables are lossy and shared: check that the hint names a whole page.
        (d.objs.get(n as usize)?.form != Form::Delta).then_some(n)
    }
}

/// Builds a new index of every pack in `packs_dir`.
pub(crate) fn build(packs_dir: &Path) -> Result<GlobalIndex, StoreError> {
    let ix = GlobalIndex::new();
    // An empty index holds no pack that could have gone: this refresh always loads.
    ix.refresh(packs_dir)?;
    Ok(ix)
}
