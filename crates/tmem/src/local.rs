//! The local backend: pages held in memvisor's pagestore (zero, shared, patched, compressed,
//! raw), ephemeral pages evicted least-recently-used first across every client, persistent
//! pages refused once a capacity is reached.
//!
//! With write-back on, a put is answered once its page is copied (zero and identical pages
//! are still found at once), and a maintenance thread at idle priority patches and compresses
//! it later. The thread also compacts the store's arena when freed space piles up, and hands
//! the freed memory back to the system.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hashbrown::{HashMap, HashSet};
use lru::LruCache;
use pagestore::{PageId, PageStore, StoreError};
use parking_lot::Mutex;

use crate::{Backend, Key, Kind, Oid, Page, Put, TmemError, Usage};

/// Pages in the pagestore, indexed by key.
pub struct LocalBackend {
    store: Arc<PageStore>,
    index: Mutex<Index>,
    ephemeral_cap: usize,
    persistent_cap: usize,
    evictions: AtomicU64,
    /// Most pages kept raw awaiting the maintenance thread (0: every put encodes inline).
    write_back: AtomicUsize,
    maint: Maintenance,
}

/// The maintenance threads, which end with the backend: a settler at idle priority encodes
/// deferred pages; a compactor at normal priority compacts the arena and trims the heap.
///
/// Two threads, not one switching priority: a thread cannot leave SCHED_IDLE without
/// CAP_SYS_NICE, and compaction and malloc_trim hold locks (a shard's for about a
/// millisecond, the heap's) that an idle-priority thread must not be preempted inside
/// while the server's threads wait. The settler's locked sections are microseconds long.
struct Maintenance {
    shared: Arc<MaintShared>,
    settler: Option<std::thread::JoinHandle<()>>,
    compactor: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct MaintShared {
    stop: AtomicBool,
    /// The settler is parked (or about to be) for want of work.
    sleeping: AtomicBool,
    /// The settler is draining the queue.
    working: AtomicBool,
    /// Drains of the queue finished by the settler, and the last of them the compactor
    /// has compacted after: while they differ, the store is not at rest.
    drained: AtomicU64,
    compacted: AtomicU64,
}

/// Pages settled between checks for the end.
const SETTLE_BATCH: usize = 32;
/// Compact a shard once this much of its arena is free space: a shard copies its payloads
/// in about a millisecond, so an eighth of waste is worth it.
const COMPACT_AT: f64 = 0.125;
/// How often the idle threads look for work anyway (removes free space too).
const IDLE_TICK: Duration = Duration::from_millis(100);

impl Maintenance {
    fn start(store: &Arc<PageStore>) -> Self {
        let shared = Arc::new(MaintShared::default());
        let (sh, weak) = (Arc::clone(&shared), Arc::downgrade(store));
        let compactor = std::thread::Builder::new()
            .name("tmem-compact".into())
            .spawn(move || {
                while !sh.stop.load(Ordering::SeqCst) {
                    let Some(store) = weak.upgrade() else { break };
                    let drained = sh.drained.load(Ordering::SeqCst);
                    if store.compact(COMPACT_AT) > 0 {
                        trim_heap();
                    }
                    sh.compacted.store(drained, Ordering::SeqCst);
                    drop(store);
                    if sh.drained.load(Ordering::SeqCst) == drained {
                        std::thread::park_timeout(IDLE_TICK);
                    }
                }
            })
            .ok();
        let (sh, weak) = (Arc::clone(&shared), Arc::downgrade(store));
        let compactor_thread = compactor.as_ref().map(|t| t.thread().clone());
        let settler = std::thread::Builder::new()
            .name("tmem-settle".into())
            .spawn(move || {
                idle_priority();
                while !sh.stop.load(Ordering::SeqCst) {
                    let Some(store) = weak.upgrade() else { break };
                    if store.pending() > 0 {
                        // Set before the batch, cleared only once the drain is counted, so
                        // that the store never looks at rest between the two.
                        sh.working.store(true, Ordering::SeqCst);
                        if let Err(e) = store.settle(SETTLE_BATCH) {
                            // A page that does not decode is a store bug; its own get reports
                            // it. Keep the rest going.
                            eprintln!("tmem: settling a page failed: {e}");
                        }
                        continue;
                    }
                    if sh.working.load(Ordering::SeqCst) {
                        sh.drained.fetch_add(1, Ordering::SeqCst);
                        sh.working.store(false, Ordering::SeqCst);
                        if let Some(t) = &compactor_thread {
                            t.unpark();
                        }
                    }
                    sh.sleeping.store(true, Ordering::SeqCst);
                    // A put queued after this check finds `sleeping` set and unparks us.
                    if store.pending() == 0 {
                        drop(store);
                        std::thread::park_timeout(IDLE_TICK);
                    }
                    sh.sleeping.store(false, Ordering::SeqCst);
                }
            })
            .ok();
        Maintenance {
            shared,
            settler,
            compactor,
        }
    }

    fn wake(&self) {
        if self.shared.sleeping.swap(false, Ordering::SeqCst)
            && let Some(t) = &self.settler
        {
            t.thread().unpark();
        }
    }

    /// A drain under way, or one whose compaction has not finished yet.
    fn owed(&self) -> bool {
        let sh = &self.shared;
        sh.working.load(Ordering::SeqCst)
            || sh.compacted.load(Ordering::SeqCst) != sh.drained.load(Ordering::SeqCst)
    }
}

impl Drop for Maintenance {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for t in [self.settler.take(), self.compactor.take()]
            .into_iter()
            .flatten()
        {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// SCHED_IDLE for the calling thread: it runs only on a core nothing else wants, so the
/// work it defers never slows the puts and gets it was deferred for.
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler reads `param`, which lives for the call; pid 0 is the
    // calling thread. A failure leaves the thread at normal priority, which is safe.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_IDLE, &raw const param);
    }
}

/// Hands the heap's free pages back to the system: compaction frees arena chunks, which
/// glibc would otherwise keep in the process (and its RSS) for reuse.
fn trim_heap() {
    // SAFETY: malloc_trim only releases free heap memory; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl std::fmt::Debug for LocalBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackend")
            .field("ephemeral_cap", &self.ephemeral_cap)
            .field("persistent_cap", &self.persistent_cap)
            .finish_non_exhaustive()
    }
}

/// A pool's namespace and kind.
type PoolKey = (u128, Kind);

struct Index {
    /// Ephemeral pages, most recently used last: one order across all clients and pools, so
    /// the coldest page anywhere goes first.
    ephemeral: LruCache<Key, PageId>,
    persistent: HashMap<Key, PageId>,
    /// Each pool's objects and their indices, for flush_object, flush_pool and pool_pages
    /// without a scan of every object.
    objects: HashMap<PoolKey, HashMap<Oid, HashSet<u32>>>,
}

impl Index {
    fn map_remove(&mut self, key: &Key) -> Option<PageId> {
        let id = match key.kind {
            Kind::Ephemeral => self.ephemeral.pop(key),
            Kind::Persistent => self.persistent.remove(key),
        }?;
        self.unlink(key);
        Some(id)
    }

    fn link(&mut self, key: &Key) {
        self.objects
            .entry((key.ns, key.kind))
            .or_default()
            .entry(key.oid)
            .or_default()
            .insert(key.index);
    }

    fn unlink(&mut self, key: &Key) {
        let pk = (key.ns, key.kind);
        let Some(pool) = self.objects.get_mut(&pk) else {
            return;
        };
        if let Some(set) = pool.get_mut(&key.oid) {
            set.remove(&key.index);
            if set.is_empty() {
                pool.remove(&key.oid);
            }
        }
        if pool.is_empty() {
            self.objects.remove(&pk);
        }
    }
}

impl LocalBackend {
    /// A backend over `store` holding at most `ephemeral_cap` ephemeral pages (the least
    /// recently used go first) and `persistent_cap` persistent ones (puts beyond are refused).
    pub fn new(store: PageStore, ephemeral_cap: usize, persistent_cap: usize) -> Self {
        let store = Arc::new(store);
        LocalBackend {
            maint: Maintenance::start(&store),
            write_back: AtomicUsize::new(0),
            store,
            index: Mutex::new(Index {
                ephemeral: LruCache::unbounded(),
                persistent: HashMap::new(),
                objects: HashMap::new(),
            }),
            ephemeral_cap,
            persistent_cap,
            evictions: AtomicU64::new(0),
        }
    }

    /// Turns write-back on: up to `max_pending` pages are held raw, answered at the cost of a
    /// copy, and encoded by the maintenance thread when a core is idle; beyond that, puts
    /// encode inline again. 0 turns it off.
    #[must_use]
    pub fn with_write_back(self, max_pending: usize) -> Self {
        self.write_back.store(max_pending, Ordering::Relaxed);
        self
    }

    /// The page store underneath, for its statistics.
    pub fn store(&self) -> &PageStore {
        &self.store
    }

    fn release(&self, ids: impl IntoIterator<Item = PageId>) -> Result<(), TmemError> {
        for id in ids {
            self.store.remove(id)?;
        }
        Ok(())
    }
}

impl Backend for LocalBackend {
    fn name(&self) -> String {
        "local".into()
    }

    fn supports(&self, _: Kind) -> bool {
        true
    }

    fn put(&self, key: &Key, page: &Page) -> Result<Put, TmemError> {
        // The expensive part (classify, compress) runs outside the index lock.
        let id = if self.store.pending() < self.write_back.load(Ordering::Relaxed) {
            let (id, outcome) = self.store.insert_deferred(page)?;
            if outcome == pagestore::Outcome::Raw {
                self.maint.wake();
            }
            id
        } else {
            self.store.insert(page)?
        };
        let mut dropped = Vec::new();
        let outcome = {
            let mut ix = self.index.lock();
            let old = match key.kind {
                Kind::Ephemeral => ix.ephemeral.put(*key, id),
                Kind::Persistent => {
                    if !ix.persistent.contains_key(key)
                        && ix.persistent.len() >= self.persistent_cap
                    {
                        drop(ix);
                        self.release([id])?;
                        return Ok(Put::Refused);
                    }
                    ix.persistent.insert(*key, id)
                }
            };
            ix.link(key);
            if key.kind == Kind::Ephemeral {
                while ix.ephemeral.len() > self.ephemeral_cap {
                    let Some((k, victim)) = ix.ephemeral.pop_lru() else {
                        break;
                    };
                    ix.unlink(&k);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    dropped.push(victim);
                }
            }
            dropped.extend(old);
            // With a capacity of 0 the page itself was the victim: refused, and nothing old
            // is left under the key.
            if key.kind == Kind::Ephemeral && !ix.ephemeral.contains(key) {
                Put::Refused
            } else {
                Put::Stored { new: old.is_none() }
            }
        };
        self.release(dropped)?;
        Ok(outcome)
    }

    fn get(&self, key: &Key, out: &mut Page, take: bool) -> Result<bool, TmemError> {
        let id = {
            let mut ix = self.index.lock();
            if take {
                ix.map_remove(key)
            } else {
                match key.kind {
                    Kind::Ephemeral => ix.ephemeral.get(key).copied(),
                    Kind::Persistent => ix.persistent.get(key).copied(),
                }
            }
        };
        let Some(id) = id else {
            return Ok(false);
        };
        match self.store.read(id, out) {
            Ok(()) => {}
            // Evicted or flushed by another thread between the lookup and the read: a miss,
            // as if that had happened first.
            Err(StoreError::UnknownPage(_)) if !take => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        if take {
            self.store.remove(id)?;
        }
        Ok(true)
    }

    fn flush_page(&self, key: &Key) -> Result<bool, TmemError> {
        let id = self.index.lock().map_remove(key);
        let had = id.is_some();
        self.release(id)?;
        Ok(had)
    }

    fn flush_object(&self, ns: u128, kind: Kind, oid: &Oid) -> Result<Option<u64>, TmemError> {
        let ids: Vec<PageId> = {
            let mut ix = self.index.lock();
            let pk = (ns, kind);
            let indices = ix
                .objects
                .get_mut(&pk)
                .and_then(|pool| pool.remove(oid))
                .unwrap_or_default();
            if ix.objects.get(&pk).is_some_and(HashMap::is_empty) {
                ix.objects.remove(&pk);
            }
            indices
                .into_iter()
                .filter_map(|index| {
                    let key = Key {
                        ns,
                        kind,
                        oid: *oid,
                        index,
                    };
                    match kind {
                        Kind::Ephemeral => ix.ephemeral.pop(&key),
                        Kind::Persistent => ix.persistent.remove(&key),
                    }
                })
                .collect()
        };
        let n = ids.len() as u64;
        self.release(ids)?;
        Ok(Some(n))
    }

    fn flush_pool(&self, ns: u128, kind: Kind, _: bool) -> Result<(), TmemError> {
        let ids: Vec<PageId> = {
            let mut ix = self.index.lock();
            let pool = ix.objects.remove(&(ns, kind)).unwrap_or_default();
            let mut ids = Vec::new();
            for (oid, indices) in pool {
                for index in indices {
                    let key = Key {
                        ns,
                        kind,
                        oid,
                        index,
                    };
                    ids.extend(match kind {
                        Kind::Ephemeral => ix.ephemeral.pop(&key),
                        Kind::Persistent => ix.persistent.remove(&key),
                    });
                }
            }
            ids
        };
        self.release(ids)
    }

    fn pool_pages(&self, ns: u128, kind: Kind) -> Result<u64, TmemError> {
        let ix = self.index.lock();
        Ok(ix
            .objects
            .get(&(ns, kind))
            .map_or(0, |pool| pool.values().map(|set| set.len() as u64).sum()))
    }

    fn usage(&self) -> Result<Usage, TmemError> {
        let ix = self.index.lock();
        let pages = (ix.ephemeral.len() + ix.persistent.len()) as u64;
        // The index itself: a key, an id and the LRU's links (or the table's slot) per page.
        let index_bytes = pages * (std::mem::size_of::<Key>() as u64 + 8 + 16)
            + ix.objects
                .values()
                .map(|p| p.len() as u64 * 64)
                .sum::<u64>();
        drop(ix);
        Ok(Usage {
            pages,
            bytes: self.store.stats().held_bytes() + index_bytes,
            evictions: self.evictions.load(Ordering::Relaxed),
            // Pages being encoded count (the store's `pending`), and so does a compaction
            // owed after a drain, so that 0 means the store is at rest.
            pending: self.store.pending() as u64 + u64::from(self.maint.owed()),
        })
    }
}
