//! Clients and pools: the promises of tmem kept over any backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hashbrown::{HashMap, HashSet};
use parking_lot::Mutex;
use xxhash_rust::xxh3::xxh3_128;

use crate::{Backend, Key, Kind, Oid, Page, PoolFlags, Put, TmemError, Usage};

/// A connected client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(pub u32);

/// A pool, as its members name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolId(pub u32);

/// What one client may take, so that it cannot starve the others. Ephemeral pages need no
/// quota: they are evicted least-recently-used first across all clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Clients at once.
    pub clients: usize,
    /// Pools a client is a member of.
    pub pools_per_client: usize,
    /// Persistent pages in the pools a client created.
    pub persistent_pages_per_client: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            clients: 1024,
            pools_per_client: 64,
            persistent_pages_per_client: 1 << 20,
        }
    }
}

/// Operation counts and what the backends hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connected clients.
    pub clients: u64,
    /// Open pools.
    pub pools: u64,
    /// Puts asked for.
    pub puts: u64,
    /// Puts refused (full, or a limit).
    pub puts_refused: u64,
    /// Gets asked for.
    pub gets: u64,
    /// Gets that found their page.
    pub hits: u64,
    /// flush_page and flush_object calls.
    pub flushes: u64,
    /// The ephemeral pools' backend.
    pub ephemeral: Usage,
    /// The persistent pools' backend (the same numbers when one backend holds both).
    pub persistent: Usage,
}

struct Client {
    name: String,
    pools: HashSet<u32>,
}

struct Pool {
    flags: PoolFlags,
    /// How it is found again (by UUID, or by client name and UUID), if it can be.
    lookup: Option<u128>,
    /// Where its pages live: the lookup key for a persistent pool; for an ephemeral one, a
    /// namespace of this incarnation only, so a backend never has to remember a flushed
    /// ephemeral pool (its pages are unreachable from any later pool).
    ns: u128,
    members: HashSet<u32>,
}

/// A persistent namespace's pages and whose quota they count against: kept while its pages
/// are, open or not, so that closing a pool does not hand its pages' quota back.
struct Persist {
    owner: String,
    pages: u64,
}

#[derive(Default)]
struct State {
    clients: HashMap<u32, Client>,
    pools: HashMap<u32, Pool>,
    /// Open pools by lookup key: a shared pool's UUID, or a private persistent pool's client
    /// name and UUID, lead back to the same pool.
    by_ns: HashMap<u128, u32>,
    /// Persistent namespaces with pages, open or not.
    persist: HashMap<u128, Persist>,
    /// Persistent pages by owner (the client name that created the pool).
    owner_pages: HashMap<String, u64>,
    /// Namespaces being flushed or counted outside the lock: opening one waits.
    busy: HashSet<u128>,
    /// Pools created so far: part of every ephemeral namespace.
    incarnations: u64,
    next_client: u32,
    next_pool: u32,
}

impl State {
    /// The next id after `next` that `taken` does not hold (ids wrap after 2^32).
    fn fresh_id(next: &mut u32, taken: impl Fn(u32) -> bool) -> u32 {
        loop {
            let id = *next;
            *next = next.wrapping_add(1);
            if !taken(id) {
                return id;
            }
        }
    }

    fn adjust(&mut self, ns: u128, delta: i64) {
        if let Some(p) = self.persist.get_mut(&ns) {
            p.pages = p.pages.saturating_add_signed(delta);
            let total = self.owner_pages.entry(p.owner.clone()).or_insert(0);
            *total = total.saturating_add_signed(delta);
        }
    }

    fn forget_persist(&mut self, ns: u128) {
        if let Some(p) = self.persist.remove(&ns)
            && let Some(total) = self.owner_pages.get_mut(&p.owner)
        {
            *total = total.saturating_sub(p.pages);
            if *total == 0 {
                self.owner_pages.remove(&p.owner);
            }
        }
    }
}

/// Transcendent memory: clients, pools and their promises, over one backend for ephemeral
/// pools and one for persistent pools (they may be the same).
pub struct Tmem {
    ephemeral: Arc<dyn Backend>,
    persistent: Arc<dyn Backend>,
    limits: Limits,
    state: Mutex<State>,
    /// Signalled when a namespace stops being busy.
    idle: parking_lot::Condvar,
    /// Operations on one key run one at a time (a get-then-delete on memcached, a refused
    /// put's flush): a stripe of locks by key hash.
    stripes: Box<[Mutex<()>]>,
    /// This server's incarnation: ephemeral namespaces include it, so pages put before a
    /// restart are unreachable after it (dropped, as an ephemeral pool may drop anything).
    boot: u128,
    puts: AtomicU64,
    refused: AtomicU64,
    gets: AtomicU64,
    hits: AtomicU64,
    flushes: AtomicU64,
}

impl std::fmt::Debug for Tmem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tmem")
            .field("ephemeral", &self.ephemeral.name())
            .field("persistent", &self.persistent.name())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

const STRIPES: usize = 1024;

fn ns_of(parts: &[&[u8]]) -> u128 {
    let mut bytes = Vec::new();
    for p in parts {
        bytes.extend_from_slice(&(p.len() as u64).to_le_bytes());
        bytes.extend_from_slice(p);
    }
    xxh3_128(&bytes)
}

impl Tmem {
    /// Pools over `ephemeral` and `persistent` backends, with `limits` per client.
    pub fn new(ephemeral: Arc<dyn Backend>, persistent: Arc<dyn Backend>, limits: Limits) -> Self {
        let boot = {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            ns_of(&[&t.to_le_bytes(), &std::process::id().to_le_bytes()])
        };
        Tmem {
            ephemeral,
            persistent,
            limits,
            state: Mutex::new(State::default()),
            idle: parking_lot::Condvar::new(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            boot,
            puts: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
    }

    /// The limits per client.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// One backend for both kinds of pool.
    pub fn with_backend(backend: Arc<dyn Backend>, limits: Limits) -> Self {
        Tmem::new(Arc::clone(&backend), backend, limits)
    }

    fn backend(&self, kind: Kind) -> &dyn Backend {
        match kind {
            Kind::Ephemeral => &*self.ephemeral,
            Kind::Persistent => &*self.persistent,
        }
    }

    /// A new client; `name` identifies it across reconnections (its private persistent pools
    /// are found again by name and UUID).
    pub fn connect(&self, name: &str) -> Result<ClientId, TmemError> {
        let mut st = self.state.lock();
        if st.clients.len() >= self.limits.clients {
            return Err(TmemError::Limit("too many clients"));
        }
        let st = &mut *st;
        let clients = &st.clients;
        let id = State::fresh_id(&mut st.next_client, |i| clients.contains_key(&i));
        st.clients.insert(
            id,
            Client {
                name: name.to_owned(),
                pools: HashSet::new(),
            },
        );
        Ok(ClientId(id))
    }

    /// A client leaves: it leaves every pool; an ephemeral pool nobody is in is flushed; a
    /// persistent pool keeps its pages (it can be opened again) until destroyed.
    pub fn disconnect(&self, client: ClientId) -> Result<(), TmemError> {
        let pools: Vec<u32> = {
            let st = self.state.lock();
            let c = st
                .clients
                .get(&client.0)
                .ok_or(TmemError::NoClient(client.0))?;
            c.pools.iter().copied().collect()
        };
        let mut first_err = None;
        for p in pools {
            if let Err(e) = self.leave(client, PoolId(p), false) {
                first_err.get_or_insert(e);
            }
        }
        self.state.lock().clients.remove(&client.0);
        first_err.map_or(Ok(()), Err)
    }

    /// Creates a pool, or joins the shared pool with this UUID, or reopens this client's
    /// private persistent pool with this UUID.
    pub fn new_pool(
        &self,
        client: ClientId,
        flags: PoolFlags,
        uuid: u128,
    ) -> Result<PoolId, TmemError> {
        let backend = self.backend(flags.kind);
        if !backend.supports(flags.kind) {
            return Err(TmemError::Unsupported {
                backend: backend.name(),
                kind: flags.kind,
            });
        }
        let kind_tag: &[u8] = match flags.kind {
            Kind::Ephemeral => b"e",
            Kind::Persistent => b"p",
        };
        let uuid_bytes = uuid.to_le_bytes();
        let mut st = self.state.lock();
        loop {
            let c = st
                .clients
                .get(&client.0)
                .ok_or(TmemError::NoClient(client.0))?;
            if c.pools.len() >= self.limits.pools_per_client {
                return Err(TmemError::Limit("too many pools for this client"));
            }
            let name = c.name.clone();
            // How the pool is found again, if it can be.
            let lookup = match (flags.shared, flags.kind) {
                (true, _) => Some(ns_of(&[b"shared", kind_tag, &uuid_bytes])),
                (false, Kind::Persistent) => {
                    Some(ns_of(&[b"private", kind_tag, name.as_bytes(), &uuid_bytes]))
                }
                (false, Kind::Ephemeral) => None,
            };
            if let Some(ns) = lookup {
                // Being flushed (a destroy) or counted (another open): wait, then look again,
                // so no page put after this open can be caught by that flush.
                if st.busy.contains(&ns) {
                    self.idle.wait(&mut st);
                    continue;
                }
                if let Some(&existing) = st.by_ns.get(&ns) {
                    let st = &mut *st;
                    let pool = st.pools.get_mut(&existing).expect("indexed pools exist");
                    if pool.flags != flags {
                        return Err(TmemError::Limit("a pool of other flags has this UUID"));
                    }
                    pool.members.insert(client.0);
                    st.clients
                        .get_mut(&client.0)
                        .expect("checked")
                        .pools
                        .insert(existing);
                    return Ok(PoolId(existing));
                }
                // A persistent namespace this server does not know may hold pages from
                // before a restart: count them (outside the lock; the namespace is busy).
                if flags.kind == Kind::Persistent && !st.persist.contains_key(&ns) {
                    st.busy.insert(ns);
                    let counted = parking_lot::MutexGuard::unlocked(&mut st, || {
                        backend.pool_pages(ns, flags.kind)
                    });
                    st.busy.remove(&ns);
                    self.idle.notify_all();
                    let pages = counted?;
                    st.persist.insert(
                        ns,
                        Persist {
                            owner: name.clone(),
                            pages: 0,
                        },
                    );
                    st.adjust(ns, i64::try_from(pages).unwrap_or(i64::MAX));
                    continue; // the client may have gone meanwhile: check again
                }
            }
            let st = &mut *st;
            let pools = &st.pools;
            let id = State::fresh_id(&mut st.next_pool, |i| pools.contains_key(&i));
            st.incarnations += 1;
            let ns = match (flags.kind, lookup) {
                (Kind::Persistent, Some(l)) => l,
                _ => ns_of(&[
                    b"ephemeral",
                    &lookup.unwrap_or(0).to_le_bytes(),
                    &self.boot.to_le_bytes(),
                    &st.incarnations.to_le_bytes(),
                ]),
            };
            if flags.kind == Kind::Persistent {
                st.persist.entry(ns).or_insert(Persist {
                    owner: name,
                    pages: 0,
                });
            }
            st.pools.insert(
                id,
                Pool {
                    flags,
                    lookup,
                    ns,
                    members: HashSet::from_iter([client.0]),
                },
            );
            if let Some(l) = lookup {
                st.by_ns.insert(l, id);
            }
            st.clients
                .get_mut(&client.0)
                .expect("checked")
                .pools
                .insert(id);
            return Ok(PoolId(id));
        }
    }

    /// Destroys a pool: its pages are flushed, unless it is shared and others are still in
    /// it (then this client only leaves).
    pub fn destroy_pool(&self, client: ClientId, pool: PoolId) -> Result<(), TmemError> {
        self.leave(client, pool, true)
    }

    fn leave(&self, client: ClientId, pool: PoolId, destroy: bool) -> Result<(), TmemError> {
        let (ns, flags) = {
            let mut st = self.state.lock();
            let c = st
                .clients
                .get_mut(&client.0)
                .ok_or(TmemError::NoClient(client.0))?;
            if !c.pools.remove(&pool.0) {
                return Err(TmemError::NoPool(pool.0));
            }
            let p = st.pools.get_mut(&pool.0).expect("a member's pool exists");
            p.members.remove(&client.0);
            if !p.members.is_empty() {
                return Ok(());
            }
            let p = st.pools.remove(&pool.0).expect("present");
            if let Some(l) = p.lookup {
                st.by_ns.remove(&l);
            }
            if p.flags.kind == Kind::Persistent && !destroy {
                // Its pages stay, and stay counted; an empty namespace need not be kept.
                if st.persist.get(&p.ns).is_some_and(|x| x.pages == 0) {
                    st.forget_persist(p.ns);
                }
                return Ok(());
            }
            st.forget_persist(p.ns);
            // Until the flush is over, opening this namespace waits (see new_pool).
            st.busy.insert(p.ns);
            (p.ns, p.flags)
        };
        // An ephemeral namespace is never used again; a persistent one may be reopened.
        let reused = flags.kind == Kind::Persistent;
        let r = self.backend(flags.kind).flush_pool(ns, flags.kind, reused);
        self.state.lock().busy.remove(&ns);
        self.idle.notify_all();
        r
    }

    /// The pool's key and flags, if `client` is a member.
    fn member(&self, client: ClientId, pool: PoolId) -> Result<(u128, PoolFlags), TmemError> {
        let st = self.state.lock();
        let c = st
            .clients
            .get(&client.0)
            .ok_or(TmemError::NoClient(client.0))?;
        if !c.pools.contains(&pool.0) {
            return Err(TmemError::NoPool(pool.0));
        }
        let p = &st.pools[&pool.0];
        Ok((p.ns, p.flags))
    }

    /// The backend key of page (`oid`, `index`) of `pool`, and the pool's flags, if `client`
    /// is a member.
    fn key(
        &self,
        client: ClientId,
        pool: PoolId,
        oid: Oid,
        index: u32,
    ) -> Result<(Key, PoolFlags), TmemError> {
        let (ns, flags) = self.member(client, pool)?;
        let key = Key {
            ns,
            kind: flags.kind,
            oid,
            index,
        };
        Ok((key, flags))
    }

    fn stripe(&self, key: &Key) -> parking_lot::MutexGuard<'_, ()> {
        let mut bytes = [0u8; 44];
        bytes[..16].copy_from_slice(&key.ns.to_le_bytes());
        for (i, w) in key.oid.0.iter().enumerate() {
            bytes[16 + 8 * i..24 + 8 * i].copy_from_slice(&w.to_le_bytes());
        }
        bytes[40..].copy_from_slice(&key.index.to_le_bytes());
        let h = xxhash_rust::xxh3::xxh3_64(&bytes);
        self.stripes[usize::try_from(h % STRIPES as u64).expect("below STRIPES")].lock()
    }

    fn adjust_pages(&self, ns: u128, delta: i64) {
        if delta != 0 {
            self.state.lock().adjust(ns, delta);
        }
    }

    /// Whether the owner of the persistent namespace `ns` may hold one more page.
    fn under_quota(&self, ns: u128) -> bool {
        let st = self.state.lock();
        let Some(owner) = st.persist.get(&ns).map(|p| &p.owner) else {
            return false;
        };
        st.owner_pages.get(owner).copied().unwrap_or(0) < self.limits.persistent_pages_per_client
    }

    /// Puts a page; false if it was refused (then the key holds nothing, not an older page).
    pub fn put(
        &self,
        client: ClientId,
        pool: PoolId,
        oid: Oid,
        index: u32,
        page: &Page,
    ) -> Result<bool, TmemError> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        let (key, flags) = self.key(client, pool, oid, index)?;
        let ns = key.ns;
        let backend = self.backend(flags.kind);
        let persistent = flags.kind == Kind::Persistent;
        let _g = self.stripe(&key);
        if persistent && !self.under_quota(ns) {
            // Over quota: refuse, and leave no old page behind under the key.
            if backend.flush_page(&key)? {
                self.adjust_pages(ns, -1);
            }
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        match backend.put(&key, page) {
            Ok(Put::Stored { new }) => {
                if new && persistent {
                    self.adjust_pages(ns, 1);
                }
                Ok(true)
            }
            Ok(Put::Refused) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => {
                // A put that failed must not leave the older page to be read back: flush it
                // if the backend still answers.
                if let Ok(true) = backend.flush_page(&key)
                    && persistent
                {
                    self.adjust_pages(ns, -1);
                }
                Err(e)
            }
        }
    }

    /// Gets a page into `out`; false on a miss. From a private ephemeral pool the page is
    /// removed as it is returned.
    pub fn get(
        &self,
        client: ClientId,
        pool: PoolId,
        oid: Oid,
        index: u32,
        out: &mut Page,
    ) -> Result<bool, TmemError> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        let (key, flags) = self.key(client, pool, oid, index)?;
        let take = flags.kind == Kind::Ephemeral && !flags.shared;
        let hit = {
            let _g = self.stripe(&key);
            self.backend(flags.kind).get(&key, out, take)?
        };
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        Ok(hit)
    }

    /// Removes one page; true if there was one.
    pub fn flush_page(
        &self,
        client: ClientId,
        pool: PoolId,
        oid: Oid,
        index: u32,
    ) -> Result<bool, TmemError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let (key, flags) = self.key(client, pool, oid, index)?;
        let ns = key.ns;
        let had = {
            let _g = self.stripe(&key);
            self.backend(flags.kind).flush_page(&key)?
        };
        if had && flags.kind == Kind::Persistent {
            self.adjust_pages(ns, -1);
        }
        Ok(had)
    }

    /// Removes every page of an object.
    pub fn flush_object(&self, client: ClientId, pool: PoolId, oid: Oid) -> Result<(), TmemError> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let (ns, flags) = self.member(client, pool)?;
        let n = self
            .backend(flags.kind)
            .flush_object(ns, flags.kind, &oid)?;
        if flags.kind == Kind::Persistent {
            let n = n.unwrap_or(0);
            self.adjust_pages(ns, -i64::try_from(n).unwrap_or(i64::MAX));
        }
        Ok(())
    }

    /// Counts and what the backends hold.
    pub fn stats(&self) -> Result<Stats, TmemError> {
        let (clients, pools) = {
            let st = self.state.lock();
            (st.clients.len() as u64, st.pools.len() as u64)
        };
        let ephemeral = self.ephemeral.usage()?;
        let persistent = if Arc::ptr_eq(&self.ephemeral, &self.persistent) {
            ephemeral
        } else {
            self.persistent.usage()?
        };
        Ok(Stats {
            clients,
            pools,
            puts: self.puts.load(Ordering::Relaxed),
            puts_refused: self.refused.load(Ordering::Relaxed),
            gets: self.gets.load(Ordering::Relaxed),
            hits: self.hits.load(Ordering::Relaxed),
            flushes: self.flushes.load(Ordering::Relaxed),
            ephemeral,
            persistent,
        })
    }
}
