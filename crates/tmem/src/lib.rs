//! `tmem`: transcendent memory for memvisor.
//!
//! Memory that no guest owns: clients put 4 KiB pages into pools and get them back by key.
//! The semantics are Xen's tmem ABI and Linux's cleancache/frontswap (docs/tmem.md):
//!
//! - a pool is **ephemeral** (a put may be refused, a page may be dropped at any time, so a
//!   get may miss) or **persistent** (a put may be refused, but an accepted page comes back
//!   until it is flushed), and **private** to one client or **shared**, joined by a 128-bit
//!   UUID;
//! - a page's key is (pool, 192-bit object id, 32-bit index);
//! - a get never returns stale data (put-put-get), after a miss there is no hit without a new
//!   put (get-get), and a get from a private ephemeral pool removes the page (exclusive).
//!
//! [`Tmem`] keeps those promises over any [`Backend`]: [`LocalBackend`] (the pagestore:
//! dedup, patching, compression, LRU eviction across clients), [`MemcachedBackend`]
//! (ephemeral pools only, since memcached evicts) and [`RedisBackend`] (persistent pools).
//! [`server`] exposes it over a Unix socket and TCP with the binary protocol of [`proto`],
//! and [`client`] speaks it.
#![warn(missing_docs)]

pub mod client;
mod local;
mod memcached;
mod pools;
pub mod proto;
mod redis_backend;
pub mod server;

pub use local::LocalBackend;
pub use memcached::MemcachedBackend;
pub use pools::{ClientId, Limits, PoolId, Stats, Tmem};
pub use redis_backend::RedisBackend;

/// A page: 4 KiB.
pub use pagestore::{PAGE_SIZE, Page};

/// Which promise a pool makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Pages may be dropped; a get may miss.
    Ephemeral,
    /// Accepted pages stay until flushed.
    Persistent,
}

/// A pool's flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolFlags {
    /// Ephemeral or persistent.
    pub kind: Kind,
    /// Shared (joined by UUID) or private to its client.
    pub shared: bool,
}

/// A 192-bit object id (a file's inode, a swap device's type, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Oid(pub [u64; 3]);

/// Where a page lives in a backend: the pool's namespace (stable across server restarts for
/// a client that comes back with the same name and pool UUID), the pool's kind, the object
/// and the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    /// The pool's namespace.
    pub ns: u128,
    /// The pool's kind: a backend may treat ephemeral pages differently (evict them).
    pub kind: Kind,
    /// The object.
    pub oid: Oid,
    /// The page's index in the object.
    pub index: u32,
}

/// What a backend did with a put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// Stored; `new` when the key held nothing before (so a page count grows).
    Stored {
        /// The key was empty before.
        new: bool,
    },
    /// Not stored (full); the key now holds nothing, not the old page.
    Refused,
}

/// What a backend holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Pages it holds.
    pub pages: u64,
    /// Bytes it uses for them, by its own count (payload and metadata).
    pub bytes: u64,
    /// Ephemeral pages it dropped to make room.
    pub evictions: u64,
    /// Pages accepted and held raw, not yet patched or compressed (write-back).
    pub pending: u64,
}

/// Why a tmem operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TmemError {
    /// no such pool for this client
    #[error("no pool {0} for this client")]
    NoPool(u32),
    /// no such client
    #[error("no client {0}")]
    NoClient(u32),
    /// a per-client limit was reached
    #[error("client limit reached: {0}")]
    Limit(&'static str),
    /// this backend cannot hold such a pool
    #[error("the {backend} backend cannot hold {kind:?} pools")]
    Unsupported {
        /// the backend
        backend: String,
        /// the kind asked for
        kind: Kind,
    },
    /// the page store failed
    #[error("page store")]
    Store(#[from] pagestore::StoreError),
    /// a remote server failed or could not be reached
    #[error("{backend} at {addr}: {what}")]
    Remote {
        /// memcached or Redis
        backend: &'static str,
        /// its address
        addr: String,
        /// what went wrong
        what: String,
        /// the underlying error, when there is one
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// the wire protocol was broken
    #[error("protocol: {0}")]
    Protocol(String),
    /// an I/O error on a connection
    #[error("connection")]
    Io(#[from] std::io::Error),
}

/// Where pages are held. Implementations keep each key's latest page (or nothing), never an
/// older one, and must be safe to call from many threads; [`Tmem`] serialises the operations
/// on any one key, so a backend need not make a get-then-delete atomic itself.
pub trait Backend: Send + Sync {
    /// A short name for messages and benchmarks.
    fn name(&self) -> String;
    /// Whether it can hold pools of `kind`.
    fn supports(&self, kind: Kind) -> bool;
    /// Stores `page` under `key`, replacing what was there.
    fn put(&self, key: &Key, page: &Page) -> Result<Put, TmemError>;
    /// Copies the page under `key` into `out`; with `take`, removes it too. False on a miss.
    fn get(&self, key: &Key, out: &mut Page, take: bool) -> Result<bool, TmemError>;
    /// Removes the page under `key`; true if there was one.
    fn flush_page(&self, key: &Key) -> Result<bool, TmemError>;
    /// Removes every page of an object; how many, when the backend can tell.
    fn flush_object(&self, ns: u128, kind: Kind, oid: &Oid) -> Result<Option<u64>, TmemError>;
    /// Removes every page of a pool; `reused` is false when the namespace will never be used
    /// again (a private ephemeral pool's), so nothing need be remembered of it.
    fn flush_pool(&self, ns: u128, kind: Kind, reused: bool) -> Result<(), TmemError>;
    /// How many pages a pool holds (for a persistent pool opened again; 0 where a backend
    /// cannot tell, which only an ephemeral backend may).
    fn pool_pages(&self, ns: u128, kind: Kind) -> Result<u64, TmemError>;
    /// What it holds.
    fn usage(&self) -> Result<Usage, TmemError>;
}
