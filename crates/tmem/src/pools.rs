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
    ns: u128,
    /// The client whose quota its persistent pages count against.
    owner: u32,
    members: HashSet<u32>,
    /// Persistent pages held (counted as puts and flushes go by).
    pages: u64,
}

#[derive(Default)]
struct State {
    clients: HashMap<u32, Client>,
    pools: HashMap<u32, Pool>,
    /// Open pools by namespace: a shared pool's UUID, or a private persistent pool's client
    /// name and UUID, lead back to the same pool.
    by_ns: HashMap<u128, u32>,
    next_client: u32,
    next_pool: u32,
}

/// Transcendent memory: clients, pools and their promises, over one backend for ephemeral
/// pools and one for persistent pools (they may be the same).
pub struct Tmem {
    ephemeral: Arc<dyn Backend>,
    persistent: Arc<dyn Backend>,
    limits: Limits,
    state: Mutex<State>,
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
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            boot,
            puts: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            gets: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        }
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
        let id = st.next_client;
        st.next_client = st.next_client.wrapping_add(1);
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
        let mut st = self.state.lock();
        let st = &mut *st;
        let c = st
            .clients
            .get(&client.0)
            .ok_or(TmemError::NoClient(client.0))?;
        if c.pools.len() >= self.limits.pools_per_client {
            return Err(TmemError::Limit("too many pools for this client"));
        }
        let uuid_bytes = uuid.to_le_bytes();
        // Stable namespaces for what must be found again; a fresh one for a private
        // ephemeral pool.
        let ns = match (flags.shared, flags.kind) {
            (true, Kind::Persistent) => Some(ns_of(&[b"shared", kind_tag, &uuid_bytes])),
            (true, Kind::Ephemeral) => Some(ns_of(&[
                b"shared",
                kind_tag,
                &uuid_bytes,
                &self.boot.to_le_bytes(),
            ])),
            (false, Kind::Persistent) => Some(ns_of(&[
                b"private",
                kind_tag,
                c.name.as_bytes(),
                &uuid_bytes,
            ])),
            (false, Kind::Ephemeral) => None,
        };
        if let Some(ns) = ns
            && let Some(&existing) = st.by_ns.get(&ns)
        {
            let pool = st.pools.get_mut(&existing).expect("indexed pools exist");
            if pool.flags == flags {
                pool.members.insert(client.0);
                st.clients
                    .get_mut(&client.0)
                    .expect("checked")
                    .pools
                    .insert(existing);
                return Ok(PoolId(existing));
            }
        }
        let id = st.next_pool;
        st.next_pool = st.next_pool.wrapping_add(1);
        let ns = ns.unwrap_or_else(|| {
            ns_of(&[
                b"private",
                kind_tag,
                &self.boot.to_le_bytes(),
                &id.to_le_bytes(),
            ])
        });
        // A persistent pool opened again after a restart: count what it still holds.
        let pages = match flags.kind {
            Kind::Persistent => backend.pool_pages(ns, flags.kind)?,
            Kind::Ephemeral => 0,
        };
        st.pools.insert(
            id,
            Pool {
                flags,
                ns,
                owner: client.0,
                members: HashSet::from_iter([client.0]),
                pages,
            },
        );
        st.by_ns.insert(ns, id);
        st.clients
            .get_mut(&client.0)
            .expect("checked")
            .pools
            .insert(id);
        Ok(PoolId(id))
    }

    /// Destroys a pool: its pages are flushed, unless it is shared and others are still in
    /// it (then this client only leaves).
    pub fn destroy_pool(&self, client: ClientId, pool: PoolId) -> Result<(), TmemError> {
        self.leave(client, pool, true)
    }

    fn leave(&self, client: ClientId, pool: PoolId, destroy: bool) -> Result<(), TmemError> {
        let flush = {
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
            st.by_ns.remove(&p.ns);
            // A persistent pool left without being destroyed keeps its pages.
            (destroy || p.flags.kind == Kind::Ephemeral).then_some((p.ns, p.flags.kind))
        };
        if let Some((ns, kind)) = flush {
            self.backend(kind).flush_pool(ns, kind)?;
        }
        Ok(())
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

    fn adjust_pages(&self, pool: PoolId, delta: i64) {
        if delta == 0 {
            return;
        }
        if let Some(p) = self.state.lock().pools.get_mut(&pool.0) {
            p.pages = p.pages.saturating_add_signed(delta);
        }
    }

    /// Whether the owner of `pool` may hold one more persistent page.
    fn under_quota(&self, pool: PoolId) -> bool {
        let st = self.state.lock();
        let Some(owner) = st.pools.get(&pool.0).map(|p| p.owner) else {
            return false;
        };
        let held: u64 = st
            .pools
            .values()
            .filter(|p| p.owner == owner && p.flags.kind == Kind::Persistent)
            .map(|p| p.pages)
            .sum();
        held < self.limits.persistent_pages_per_client
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
        let (ns, flags) = self.member(client, pool)?;
        let key = Key {
            ns,
            kind: flags.kind,
            oid,
            index,
        };
        let backend = self.backend(flags.kind);
        let _g = self.stripe(&key);
        if flags.kind == Kind::Persistent && !self.under_quota(pool) {
            // Over quota: refuse, and leave no old page behind under the key.
            if backend.flush_page(&key)? {
                self.adjust_pages(pool, -1);
            }
            self.refused.fetch_add(1, Ordering::Relaxed);
            return Ok(false);
        }
        match backend.put(&key, page)? {
            Put::Stored { new } => {
                if new && flags.kind == Kind::Persistent {
                    self.adjust_pages(pool, 1);
                }
                Ok(true)
            }
            Put::Refused => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Ok(false)
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
        let (ns, flags) = self.member(client, pool)?;
        let key = Key {
            ns,
            kind: flags.kind,
            oid,
            index,
        };
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
        let (ns, flags) = self.member(client, pool)?;
        let key = Key {
            ns,
            kind: flags.kind,
            oid,
            index,
        };
        let had = {
            let _g = self.stripe(&key);
            self.backend(flags.kind).flush_page(&key)?
        };
        if had && flags.kind == Kind::Persistent {
            self.adjust_pages(pool, -1);
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
            self.adjust_pages(pool, -i64::try_from(n).unwrap_or(i64::MAX));
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
